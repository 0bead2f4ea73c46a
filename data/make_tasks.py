"""Generate the bundled task-specialist data sets (deterministic, stdlib only).

Contract:
  - Writes ``<out>/<task>/test.jsonl``, ``train.jsonl`` and ``validation.jsonl`` for the tasks
    ``sentiment``, ``extract`` and ``dates``; ``<out>`` defaults to ``data/tasks`` next to this file.
  - Each task has its own ``random.Random`` seeded from ``--seed`` (default 1234) and a fixed
    per-task offset, so the output is byte-identical on every run and platform.
  - Test rows (120) are sampled first, then train rows (600), then validation rows (60, for evaluation
    during training; drawn last from the same stream so test and train are what they were before the
    validation split existed); a candidate whose prompt (or user message) already appears in any split
    is rejected, so prompts are unique across the three files.
  - Rows are written one per line with ``json.dumps(row, ensure_ascii=False)``, newline-terminated,
    in generation order.

Row formats:
  - sentiment: ``{"prompt": "Review: ...\\nLabel the sentiment.", "completion": "positive" | "negative"}``
    (exactly balanced per split).
  - extract: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` where the assistant
    answer is ``{"name": ..., "qty": <int>, "item": ..., "city": ...}`` copied verbatim from the message.
  - dates: ``{"prompt": "Normalize this date to ISO 8601: <date>", "completion": "YYYY-MM-DD"}``.

Regenerate with ``python data/make_tasks.py`` (``--out DIR`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]

DEFAULT_SEED = 1234
N_TEST = 120
N_TRAIN = 600
N_VALIDATION = 60
MAX_DRAWS_PER_ROW = 1000

# ---------------------------------------------------------------------------- sentiment

PRODUCTS = [
    "blender", "toaster", "kettle", "backpack", "phone case", "desk lamp", "keyboard", "mouse",
    "water bottle", "umbrella", "coffee maker", "vacuum cleaner", "tablet", "charger", "speaker",
    "office chair", "frying pan", "rice cooker", "hair dryer", "smartwatch", "yoga mat", "suitcase",
    "jacket", "wallet", "monitor", "printer", "tent", "bicycle helmet", "alarm clock", "microwave",
]
POS_ADJ = [
    "excellent", "fantastic", "great", "wonderful", "superb", "reliable", "sturdy", "amazing",
    "perfect", "impressive", "brilliant", "lovely",
]
NEG_ADJ = [
    "terrible", "awful", "flimsy", "useless", "disappointing", "poor", "horrible", "defective",
    "unreliable", "dreadful", "broken", "worthless",
]
POS_PHRASE = [
    "works perfectly", "exceeded my expectations", "was worth every penny", "does exactly what I need",
    "feels well made", "arrived quickly and works great", "has made my life easier", "never lets me down",
]
NEG_PHRASE = [
    "stopped working after a week", "broke on the first day", "was a waste of money", "arrived damaged",
    "never worked properly", "feels cheaply made", "fell apart within days", "is not worth it",
]
POS_TEMPLATES = [
    "The {product} is {adj}.",
    "This {product} is {adj} and {phrase}.",
    "My new {product} {phrase}.",
    "I find the {product} {adj}, it {phrase}.",
    "I am happy with this {product}, it {phrase}.",
    "No complaints about the {product}, it is {adj}.",
]
NEG_TEMPLATES = [
    "The {product} is {adj}.",
    "This {product} is {adj} and {phrase}.",
    "My new {product} {phrase}.",
    "I find the {product} {adj}, it {phrase}.",
    "I am unhappy with this {product}, it {phrase}.",
    "The {product} is not {pos_adj} at all, it is {adj}.",
]
POS_CLOSERS = [
    "I would buy it again.", "Highly recommended.", "I love it.", "Five stars from me.",
    "No complaints at all.", "I have nothing bad to say about it.", "Totally worth it.",
]
NEG_CLOSERS = [
    "I want a refund.", "Not worth it.", "I would not recommend it.", "One star.",
    "Do not buy this.", "I regret this purchase.", "Never again.",
]


def make_review(rng: random.Random, positive: bool) -> str:
    """One or two sentences whose polarity is ``positive``."""
    templates, adjs, phrases, closers = (
        (POS_TEMPLATES, POS_ADJ, POS_PHRASE, POS_CLOSERS) if positive else (NEG_TEMPLATES, NEG_ADJ, NEG_PHRASE, NEG_CLOSERS)
    )
    sentence = rng.choice(templates).format(
        product=rng.choice(PRODUCTS), adj=rng.choice(adjs), phrase=rng.choice(phrases), pos_adj=rng.choice(POS_ADJ)
    )
    if rng.random() < 0.6:
        sentence += " " + rng.choice(closers)
    return sentence


def sentiment_row(rng: random.Random, label: str) -> Row:
    review = make_review(rng, label == "positive")
    return {"prompt": f"Review: {review}\nLabel the sentiment.", "completion": label}


# ---------------------------------------------------------------------------- extract

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Chen", "Olivia", "Lucas", "Fatima", "Noah", "Sofia", "Mateo",
    "Emma", "Liam", "Yuki", "Omar", "Chloe", "Ethan", "Priya", "Diego", "Hannah", "Ivan",
    "Grace", "Samuel", "Leila", "Jonas", "Nora", "Kofi", "Elena", "Marco", "Zara", "Felix",
    "Amara", "Tomas", "Ingrid", "Ravi", "Clara", "Hugo", "Mei", "Daniel", "Lucia", "Oscar",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Wang", "Brown", "Silva", "Haddad", "Miller", "Rossi", "Garcia",
    "Johnson", "Murphy", "Tanaka", "Ali", "Martin", "Clarke", "Patel", "Fernandez", "Schmidt", "Petrov",
    "Kim", "Okafor", "Nasser", "Berg", "Larsen", "Mensah", "Popescu", "Bianchi", "Hussain", "Weber",
    "Adeyemi", "Novak", "Lindqvist", "Sharma", "Dubois", "Moreau", "Chang", "Cohen", "Ortiz", "Nguyen",
]
# (singular, plural)
ITEMS = [
    ("blue mug", "blue mugs"), ("red scarf", "red scarves"), ("green notebook", "green notebooks"),
    ("black umbrella", "black umbrellas"), ("white towel", "white towels"), ("yellow raincoat", "yellow raincoats"),
    ("wooden spoon", "wooden spoons"), ("steel water bottle", "steel water bottles"),
    ("leather wallet", "leather wallets"), ("wool sweater", "wool sweaters"), ("glass vase", "glass vases"),
    ("ceramic bowl", "ceramic bowls"), ("purple pen", "purple pens"), ("orange cushion", "orange cushions"),
    ("silver spoon", "silver spoons"), ("pink candle", "pink candles"), ("grey hoodie", "grey hoodies"),
    ("brown belt", "brown belts"), ("cotton t-shirt", "cotton t-shirts"), ("small teapot", "small teapots"),
    ("large backpack", "large backpacks"), ("bamboo cutting board", "bamboo cutting boards"),
    ("striped sock", "striped socks"), ("vintage poster", "vintage posters"), ("copper pan", "copper pans"),
    ("linen tablecloth", "linen tablecloths"), ("navy cap", "navy caps"), ("plastic crate", "plastic crates"),
    ("golden frame", "golden frames"), ("paper lantern", "paper lanterns"),
]
CITIES = [
    "Lisbon", "Madrid", "Paris", "Berlin", "Rome", "Vienna", "Prague", "Warsaw", "Oslo", "Stockholm",
    "Helsinki", "Dublin", "London", "Edinburgh", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul", "Cairo",
    "Nairobi", "Lagos", "Accra", "Cape Town", "Mumbai", "Delhi", "Bangkok", "Singapore", "Tokyo", "Seoul",
    "Sydney", "Auckland", "Toronto", "Chicago", "New York", "San Diego", "Mexico City", "Lima", "Bogota", "Santiago",
]
ORDER_TEMPLATES = [
    "Hi, this is {name}, please send {qty} {item} to {city}.",
    "{name} here, I would like {qty} {item} delivered to {city}.",
    "Please ship {qty} {item} to {city} for {name}.",
    "Order from {name}: {qty} {item}, shipping to {city}.",
    "Hello, could you send {qty} {item} to {city}? Thanks, {name}.",
    "{name} wants to order {qty} {item} for delivery in {city}.",
    "Can I get {qty} {item} sent to {city}? My name is {name}.",
    "New order: {qty} {item} for {name} in {city}.",
    "Good morning, {name} in {city} needs {qty} {item}.",
    "Send {qty} {item} to {name} at the {city} address, please.",
]


def extract_row(rng: random.Random) -> Row:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    qty = rng.randint(1, 12)
    singular, plural = rng.choice(ITEMS)
    item = singular if qty == 1 else plural
    city = rng.choice(CITIES)
    message = rng.choice(ORDER_TEMPLATES).format(name=name, qty=qty, item=item, city=city)
    answer = json.dumps({"name": name, "qty": qty, "item": item, "city": city})
    return {
        "messages": [
            {"role": "user", "content": f"Extract the order as JSON.\nMessage: {message}"},
            {"role": "assistant", "content": answer},
        ]
    }


# ---------------------------------------------------------------------------- dates

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
FIRST_DAY = dt.date(1990, 1, 1)
LAST_DAY = dt.date(2030, 12, 31)


def render_date(day: dt.date, style: int) -> str:
    """``day`` in one of five unambiguous formats (the dotted one is always day.month.year)."""
    month = MONTHS[day.month - 1]
    if style == 0:
        return f"{month} {day.day}, {day.year}"
    if style == 1:
        return f"{day.day} {month} {day.year}"
    if style == 2:
        return f"{month[:3]} {day.day} {day.year}"
    if style == 3:
        return f"{day.year}/{day.month:02d}/{day.day:02d}"
    return f"{day.day:02d}.{day.month:02d}.{day.year}"


def dates_row(rng: random.Random) -> Row:
    day = dt.date.fromordinal(rng.randint(FIRST_DAY.toordinal(), LAST_DAY.toordinal()))
    text = render_date(day, rng.randrange(5))
    return {"prompt": f"Normalize this date to ISO 8601: {text}", "completion": day.isoformat()}


# ---------------------------------------------------------------------------- sampling and output


def prompt_key(row: Row) -> str:
    """The text that must be unique across splits: the prompt, or the first user message."""
    if "prompt" in row:
        return row["prompt"]
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def sample_unique(draw: Callable[[int], Row], n: int, seen: set[str]) -> list[Row]:
    """``n`` rows from ``draw(slot)`` whose prompts are not in ``seen`` (which is updated)."""
    rows: list[Row] = []
    for slot in range(n):
        for _ in range(MAX_DRAWS_PER_ROW):
            row = draw(slot)
            key = prompt_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
                break
        else:
            raise RuntimeError(f"could not draw a new unique row for slot {slot}; the template space is too small")
    return rows


def balanced_labels(rng: random.Random, n: int) -> list[str]:
    labels = ["positive", "negative"] * (n // 2) + ["positive"] * (n % 2)
    rng.shuffle(labels)
    return labels


ROW_MAKERS: dict[str, Callable[[random.Random], Row]] = {"extract": extract_row, "dates": dates_row}


def make_drawer(task: str, rng: random.Random, n: int) -> Callable[[int], Row]:
    """A function from slot index to candidate row for one split of ``task``."""
    if task == "sentiment":
        labels = balanced_labels(rng, n)

        def draw_sentiment(slot: int) -> Row:
            return sentiment_row(rng, labels[slot])

        return draw_sentiment
    make = ROW_MAKERS[task]

    def draw(slot: int) -> Row:
        return make(rng)

    return draw


def make_splits(task: str, rng: random.Random) -> dict[str, list[Row]]:
    """Test rows first, then train rows, then validation rows, all prompts distinct."""
    seen: set[str] = set()
    return {split: sample_unique(make_drawer(task, rng, n), n, seen)
            for split, n in (("test", N_TEST), ("train", N_TRAIN), ("validation", N_VALIDATION))}


# Fixed offsets keep each task's stream independent of the others (never use hash(): it is salted).
TASK_SEED_OFFSETS = {"sentiment": 1, "extract": 2, "dates": 3}


def write_jsonl(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out: Path, seed: int = DEFAULT_SEED) -> dict[Path, int]:
    """Write every task's splits under ``out``; returns each written path with its row count."""
    written: dict[Path, int] = {}
    for task, offset in TASK_SEED_OFFSETS.items():
        rng = random.Random(seed * 1000 + offset)
        for split, rows in make_splits(task, rng).items():
            path = out / task / f"{split}.jsonl"
            write_jsonl(path, rows)
            written[path] = len(rows)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tasks", help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (default %(default)s)")
    args = parser.parse_args(argv)
    for path, n in generate(args.out, args.seed).items():
        print(f"{path}: {n} rows")


if __name__ == "__main__":
    main()
