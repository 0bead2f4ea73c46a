"""Config loading: defaults, overrides, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError

MINIMAL = "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_config_loads_and_is_frozen() -> None:
    cfg = load_config("configs/default.yaml")
    assert cfg.base == "smollm2-135m-instruct" and cfg.method == "lora"
    assert [t.name for t in cfg.tasks] == ["sentiment", "extract", "dates"]
    with pytest.raises(AttributeError):
        cfg.method = "full"  # type: ignore[misc]


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), ["tune.max_steps=7", "tune.learning_rate=2e-4",
                                                 "quantize.formats=[nf4]", "run=x"])
    assert cfg.tune.max_steps == 7 and cfg.tune.learning_rate == pytest.approx(2e-4)
    assert cfg.quantize.formats == ["nf4"] and cfg.run_dir == Path("runs/x")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "tune:\n  max_stesp: 3\n  batch_size: x\nlora:\n  r: 0\nmethod: lorra\n"
                 "quantize:\n  formats: [int9]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "5 problem(s)" in msg
    assert "tune.max_stesp: unknown setting (did you mean 'tune.max_steps'?)" in msg
    assert "tune.batch_size: expected an integer, got 'x'" in msg
    assert "lora.r: 0 is out of range (allowed: 1..1024)" in msg
    assert "unknown method 'lorra'" in msg and "did you mean 'lora'" in msg
    assert "unknown value 'int9'" in msg


def test_missing_required_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "tasks:\n  - {name: 'a/b', train: x}\n"))
    assert "tasks[0].test: required setting is missing" in str(info.value)
    with pytest.raises(ConfigError, match="must be letters"):
        load_config(write(tmp_path, "tasks:\n  - {name: 'a/b', train: x, test: y}\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["tune.max_steps"])


def test_section_hash_tracks_only_named_sections(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, MINIMAL))
    b = load_config(write(tmp_path, MINIMAL), ["evaluate.batch_size=3"])
    c = load_config(write(tmp_path, MINIMAL), ["tune.max_steps=3"])
    assert a.section_hash("tune") == b.section_hash("tune") != c.section_hash("tune")


def test_task_max_steps_overrides_tune_max_steps(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl, max_steps: 9}\n"))
    assert cfg.tasks[0].max_steps == 9 and cfg.tune.max_steps == 60
    with pytest.raises(ConfigError, match=r"tasks\[0\].max_steps: 0 is out of range"):
        load_config(write(tmp_path, "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl, max_steps: 0}\n"))
