"""Config loading: defaults, overrides, ranges next to the fields, and every problem reported at once."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from pipeline.config import Config, GateConfig, load_config
from pipeline.errors import ConfigError

MINIMAL = "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl}\n"
README = Path(__file__).resolve().parents[2] / "README.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def problems(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_default_config_loads_and_is_frozen() -> None:
    cfg = load_config("configs/default.yaml")
    assert cfg.base == "smollm2-135m-instruct" and cfg.method == "lora"
    assert [t.name for t in cfg.tasks] == ["sentiment", "extract", "dates"]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.method = "full"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.export.gates.int4.max_kl = 1.0  # type: ignore[misc]


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
    assert msg.startswith(f"5 problem(s) in {path}:\n  - ")
    assert "tune.max_stesp: unknown setting (did you mean 'tune.max_steps'?)" in msg
    assert "tune.batch_size: expected an integer, got 'x'" in msg
    assert "lora.r: 0 is out of range (allowed: 1..1024)" in msg
    assert "unknown method 'lorra'" in msg and "did you mean 'lora'" in msg
    assert "unknown value 'int9'" in msg


def test_missing_required_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "tasks:\n  - {name: 'a/b', train: x}\n"))
    assert "tasks[0].test: required setting is missing" in str(info.value)
    assert "tasks[0].name: 'a/b' must be letters" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["tune.max_steps"])
    with pytest.raises(ConfigError, match=r"tasks: task name\(s\) 't' appear more than once"):
        load_config(write(tmp_path, MINIMAL + "  - {name: t, train: c.jsonl, test: d.jsonl}\n"))
    with pytest.raises(ConfigError, match="tasks: expected a non-empty list"):
        load_config(write(tmp_path, "tasks: []\n"))


def test_section_hash_tracks_only_named_sections(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, MINIMAL))
    b = load_config(write(tmp_path, MINIMAL), ["evaluate.batch_size=3"])
    c = load_config(write(tmp_path, MINIMAL), ["tune.max_steps=3"])
    assert a.section_hash("tune") == b.section_hash("tune") != c.section_hash("tune")


def test_section_hash_depends_on_values_not_spelling(tmp_path: Path) -> None:
    """The same values written differently (flow or block YAML, 1e-3 or 0.001, a default spelled out)
    hash the same: a stage is not redone because its config was reformatted."""
    a = load_config(write(tmp_path, MINIMAL + "tune: {learning_rate: 1e-3}\n"))
    b = load_config(write(tmp_path, MINIMAL + "tune:\n  max_steps: 60\n  learning_rate: 0.001\n"))
    assert a.section_hash("tune", "export") == b.section_hash("tune", "export")
    assert a.to_dict() == b.to_dict() and isinstance(a.to_dict()["export"]["gates"]["int8"], dict)


def test_task_max_steps_overrides_tune_max_steps(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl, max_steps: 9}\n"))
    assert cfg.tasks[0].max_steps == 9 and cfg.tune.max_steps == 60
    assert cfg.task("t") is cfg.tasks[0]
    with pytest.raises(ConfigError, match="unknown task 'u'"):
        cfg.task("u")
    with pytest.raises(ConfigError, match=r"tasks\[0\].max_steps: 0 is out of range \(allowed: >= 1 or null\)"):
        load_config(write(tmp_path, "tasks:\n  - {name: t, train: a.jsonl, test: b.jsonl, max_steps: 0}\n"))


BAD_GATE_VALUES = {"min_top1_agreement": (1.01, -0.1), "max_kl": (-1e-3,), "max_abs_logit_diff": (0, -1.0),
                   "max_score_drop": (1.5, -0.01)}


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize(("setting", "value"), [(k, v) for k, vs in BAD_GATE_VALUES.items() for v in vs])
def test_every_gate_is_range_checked(tmp_path: Path, precision: str, setting: str, value: float) -> None:
    msg = problems(write(tmp_path, MINIMAL), [f"export.gates.{precision}.{setting}={value}"])
    assert msg.startswith("1 problem(s)")
    assert f"export.gates.{precision}.{setting}: {value!r} is out of range (allowed: " in msg


def test_all_gate_problems_come_together(tmp_path: Path) -> None:
    overrides = [f"export.gates.{p}.{k}={vs[0]}" for p in ("fp32", "int8", "int4") for k, vs in BAD_GATE_VALUES.items()]
    msg = problems(write(tmp_path, MINIMAL), overrides + ["merge.max_abs_logit_diff=0", "merge.fidelity_prompts=257"])
    assert msg.startswith("14 problem(s)")
    assert "export.gates.int4.min_top1_agreement: 1.01 is out of range (allowed: 0..1)" in msg
    assert "export.gates.int8.max_abs_logit_diff: 0 is out of range (allowed: > 0 or null)" in msg
    assert "merge.fidelity_prompts: 257 is out of range (allowed: 1..256)" in msg


def test_null_disables_a_gate_and_a_partial_gate_keeps_its_precision_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), ["export.gates.fp32.max_kl=null", "export.gates.int8.max_kl=0.02"])
    assert cfg.export.gates.fp32.max_kl is None
    assert cfg.export.gates.int8 == GateConfig(max_abs_logit_diff=None, min_top1_agreement=0.98, max_kl=0.02,
                                               max_score_drop=0.05)
    assert cfg.export.gates.int4.min_top1_agreement == 0.95  # untouched precisions keep theirs


@pytest.mark.parametrize(("override", "expected"), [
    ("export.targets=[onnx-imt4]", "export.targets: unknown value 'onnx-imt4' (allowed: safetensors, onnx, "
                                   "onnx-int8, onnx-int4, gguf, edge); did you mean 'onnx-int4'?"),
    ("evaluate.artifacts=[mergd]", "did you mean 'merged'?"),
    ("quantize.unmerged=[nf3]", "quantize.unmerged: unknown value 'nf3'"),
    ("tune.lr_scheduler=cosin", "tune.lr_scheduler: unknown value 'cosin'"),
    ("export.gates.int9.max_kl=1", "export.gates.int9: unknown setting (did you mean 'export.gates.int8'?)"),
    ("export.gates.int8.max_kll=1", "export.gates.int8.max_kll: unknown setting (did you mean "
                                    "'export.gates.int8.max_kl'?)"),
    ("export.int4_block_size=48", "export.int4_block_size: 48 is out of range (allowed: 16..256, a power of two)"),
    ("lora.target_modules=[1]", "lora.target_modules: expected a string or a list of strings, got [1]"),
    ("tune.max_steps='3'", "tune.max_steps: expected an integer, got '3'"),  # strict: YAML strings stay strings
    ("export.gates=3", "export.gates: expected a mapping of settings, got int"),
    ("run=.hidden", "run: '.hidden' must be a plain folder name"),
])
def test_one_clear_problem_per_mistake(tmp_path: Path, override: str, expected: str) -> None:
    msg = problems(write(tmp_path, MINIMAL), [override])
    assert msg.startswith("1 problem(s)") and expected in msg


def test_yaml_exponents_read_as_numbers(tmp_path: Path) -> None:
    """PyYAML reads ``1e-3`` (no dot) as a string; a number setting still takes it as 0.001."""
    cfg = load_config(write(tmp_path, MINIMAL + "merge: {max_abs_logit_diff: 1e-3}\nlora: {dropout: 1e-1}\n"))
    assert cfg.merge.max_abs_logit_diff == pytest.approx(1e-3) and cfg.lora.dropout == pytest.approx(0.1)


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting's dotted key, as the README writes it (``tasks[].name``, ``export.gates.<...>.max_kl``)."""
    keys = []
    for name, field in model.model_fields.items():
        hint = field.annotation
        if typing.get_origin(hint) is list and isinstance(typing.get_args(hint)[0], type) \
                and issubclass(typing.get_args(hint)[0], BaseModel):
            keys += _leaf_keys(typing.get_args(hint)[0], f"{prefix}{name}[].")
        elif isinstance(hint, type) and issubclass(hint, BaseModel):
            same_shape = {f.annotation for f in hint.model_fields.values()} == {GateConfig}
            keys += _leaf_keys(GateConfig, f"{prefix}{name}.<") if same_shape else _leaf_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_readme_config_reference_lists_every_setting() -> None:
    section = README.read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"`([^`]+)`", section)
    missing = []
    for key in _leaf_keys(Config):
        if "<" in key:  # one row per gate setting for all precisions: export.gates.<fp32|int8|int4>.max_kl
            head, leaf = key.split("<")
            found = any(d.startswith(head + "<") and d.endswith(">." + leaf) for d in documented)
        else:
            found = key in documented
        if not found:
            missing.append(key)
    assert not missing, f"README's config reference lacks {missing}"


@pytest.mark.parametrize("content, message", [
    (b"run: x\nbase: caf\xe9\n", ":2: not valid UTF-8 (byte 0xe9 at column 10)"),
    (b"run: x\nbase: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", ":2: nested too deeply to read"),
    (b"run: x\ntasks: [\n", ":3: not valid YAML"),
], ids=["latin1", "deep", "unclosed"])
def test_unreadable_yaml_names_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert problems(path, []).startswith(f"{path}{message}")


def test_an_override_that_is_not_yaml_is_a_config_error(tmp_path: Path) -> None:
    assert problems(write(tmp_path, MINIMAL), ["base=[oops"]).startswith("--set base=...: not valid YAML")
    assert "nested too deeply" in problems(write(tmp_path, MINIMAL), ["base=" + "[" * 100_000])
