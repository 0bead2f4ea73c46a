"""A user's own date task, written the way the README's "Your own task" shows: not one of the bundled tasks.

Issue 13's acceptance task: dates in phrasings the bundled ``dates`` generator never uses (ordinals,
weekdays, "the Nth of", dashes with abbreviated months, ISO week-free US and year-first orders,
lower case), normalised to ``YYYY-MM-DD``. Digit-exact multi-token answers are where 4-bit weights
lose a small model's task, so this is the data the 4-bit recipe is measured on.

Writes ``data/user_dates/{train,test}.jsonl`` (600 and 100 rows, prompts unique across both),
byte-identical on every run: ``python data/make_user_dates.py``. Used by ``configs/user-dates.yaml``.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from make_tasks import MONTHS, sample_unique, write_jsonl  # type: ignore[import-not-found]

SEED = 20261130
N_TEST, N_TRAIN = 100, 600
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
ASKS = ["Convert to YYYY-MM-DD: {}", "What is {} in ISO format?", "ISO date for: {}", "Rewrite as YYYY-MM-DD -> {}"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def phrase(day: dt.date, style: int) -> str:
    """``day`` in one of eight phrasings, none of them the bundled generator's."""
    month, weekday = MONTHS[day.month - 1], WEEKDAYS[day.weekday()]
    return [
        f"the {ordinal(day.day)} of {month}, {day.year}",
        f"{weekday}, {month} {ordinal(day.day)} {day.year}",
        f"{day.day:02d}-{month[:3].upper()}-{day.year}",
        f"{day.month}/{day.day}/{day.year} (US)",
        f"{day.year}.{day.month:02d}.{day.day:02d}",
        f"{month.lower()} {day.day} {day.year}",
        f"{ordinal(day.day)} {month[:3]}. {day.year}",
        f"{weekday[:3]} {day.day} {month} {day.year}",
    ][style]


def row(rng: random.Random) -> dict:
    day = dt.date.fromordinal(rng.randint(FIRST_DAY.toordinal(), LAST_DAY.toordinal()))
    ask = ASKS[rng.randrange(len(ASKS))]
    return {"prompt": ask.format(phrase(day, rng.randrange(8))), "completion": day.isoformat()}


def main() -> None:
    rng, seen = random.Random(SEED), set()
    out = Path(__file__).resolve().parent / "user_dates"
    for split, n in (("test", N_TEST), ("train", N_TRAIN)):
        write_jsonl(out / f"{split}.jsonl", sample_unique(lambda _slot: row(rng), n, seen))
        print(f"{out / split}.jsonl: {n} rows")


if __name__ == "__main__":
    main()
