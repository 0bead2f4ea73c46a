"""The bundled task data under data/tasks: well-formed, leak-free and reproducible by data/make_tasks.py."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"
TASKS_DIR = DATA / "tasks"
TASKS = ("sentiment", "extract", "dates")
SPLITS = ("train", "test", "validation")
ORDER_KEYS = ["name", "qty", "item", "city"]
DATE_FORMATS = ("%B %d, %Y", "%d %B %Y", "%b %d %Y", "%Y/%m/%d", "%d.%m.%Y")


def read_rows(task: str, split: str) -> list[dict[str, Any]]:
    lines = (TASKS_DIR / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def prompt_text(row: dict[str, Any]) -> str:
    if "prompt" in row:
        return row["prompt"]
    return row["messages"][0]["content"]


def answer_text(row: dict[str, Any]) -> str:
    if "completion" in row:
        return row["completion"]
    return row["messages"][-1]["content"]


def check_row_shape(task: str, row: dict[str, Any]) -> None:
    if task == "extract":
        assert list(row) == ["messages"]
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        for m in messages:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip()
    else:
        assert list(row) == ["prompt", "completion"]
        for value in row.values():
            assert isinstance(value, str) and value.strip()


@pytest.mark.parametrize("task", TASKS)
def test_sizes_and_shape(task: str) -> None:
    test_rows, train_rows = read_rows(task, "test"), read_rows(task, "train")
    assert len(test_rows) >= 100
    assert len(train_rows) >= 500
    for row in test_rows + train_rows:
        check_row_shape(task, row)


@pytest.mark.parametrize("task", TASKS)
def test_no_test_prompt_in_train(task: str) -> None:
    test_prompts = [prompt_text(r) for r in read_rows(task, "test")]
    train_prompts = {prompt_text(r) for r in read_rows(task, "train")}
    assert len(set(test_prompts)) == len(test_prompts)
    assert not set(test_prompts) & train_prompts


@pytest.mark.parametrize("task", TASKS)
def test_validation_rows_are_new_and_leave_train_and_test_as_they_were(task: str) -> None:
    validation = [prompt_text(r) for r in read_rows(task, "validation")]
    assert len(validation) == len(set(validation)) == 60
    assert not set(validation) & {prompt_text(r) for split in ("train", "test") for r in read_rows(task, split)}
    for row in read_rows(task, "validation"):
        check_row_shape(task, row)


@pytest.mark.parametrize("split", SPLITS)
def test_sentiment_labels_balanced(split: str) -> None:
    rows = read_rows("sentiment", split)
    labels = [r["completion"] for r in rows]
    assert set(labels) == {"positive", "negative"}
    assert labels.count("positive") == labels.count("negative")
    for row in rows:
        assert row["prompt"].startswith("Review: ") and row["prompt"].endswith("\nLabel the sentiment.")
        assert len(row["prompt"].split()) <= 40


@pytest.mark.parametrize("split", SPLITS)
def test_extract_answers_are_copyable(split: str) -> None:
    for row in read_rows("extract", split):
        user, answer = prompt_text(row), answer_text(row)
        order = json.loads(answer)
        assert list(order) == ORDER_KEYS
        assert json.dumps(order) == answer
        assert isinstance(order["qty"], int) and 1 <= order["qty"] <= 12
        for key in ("name", "item", "city"):
            assert order[key] in user


def parse_date(text: str, fmt: str) -> dt.date | None:
    """``text`` read with ``fmt`` (English month names, the C locale), or None when it does not fit."""
    try:
        return dt.datetime.strptime(text, fmt).date()
    except ValueError:
        return None


@pytest.mark.parametrize("split", SPLITS)
def test_dates_are_correct(split: str) -> None:
    prefix = "Normalize this date to ISO 8601: "
    for row in read_rows("dates", split):
        assert row["prompt"].startswith(prefix)
        text = row["prompt"][len(prefix):]
        parsed = {day for fmt in DATE_FORMATS if (day := parse_date(text, fmt)) is not None}
        assert len(parsed) == 1, text
        day = parsed.pop()
        assert 1990 <= day.year <= 2030
        assert row["completion"] == day.isoformat()


def test_generator_reproduces_bundled_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(DATA / "make_tasks.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    for task in TASKS:
        for split in SPLITS:
            regenerated = (tmp_path / task / f"{split}.jsonl").read_bytes()
            assert regenerated == (TASKS_DIR / task / f"{split}.jsonl").read_bytes(), f"{task}/{split} differs"
