"""Typed, frozen pipeline settings read from YAML (plus ``--set key=value`` overrides).

One source of truth: every stage receives the same :class:`Config`. Loading validates the whole
file and reports every problem at once: unknown keys with the nearest valid name, wrong types,
and values outside their allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

ARTIFACTS = ("base", "adapter", "merged", "int8", "nf4", "onnx", "onnx-int8", "onnx-int4", "edge")
QUANT_FORMATS = ("int8", "nf4")
EXPORT_TARGETS = ("safetensors", "onnx", "onnx-int8", "onnx-int4", "edge")
ONNX_PRECISIONS = {"onnx": "fp32", "onnx-int8": "int8", "onnx-int4": "int4"}
"""ONNX export target -> its precision (the edge bundle's is ``export.edge_precision``)."""


@dataclass(frozen=True)
class TaskConfig:
    """One task-specialist adapter to train and evaluate."""

    name: str
    """Task name; used for folder names and as the adapter's name (letters, digits, ``-``, ``_``)."""
    train: str
    """Training data: a JSONL or CSV file (prompt/completion, messages, or text rows)."""
    test: str
    """Held-out data in the same formats; used for exact match and perplexity."""
    max_new_tokens: int = 32
    """Generation budget when scoring a test row; a little above the longest expected answer."""
    max_steps: int | None = None
    """Optimizer steps for this task (null: ``tune.max_steps``); harder tasks can train longer."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear layer except the output head)."""


@dataclass(frozen=True)
class UlmfitConfig:
    """ULMFiT (Howard & Ruder, 2018) applied to a decoder LLM."""

    phases: int = 4
    """Layer groups, unfrozen top first, one more per phase; training steps are split evenly over phases."""
    lr_decay: float = 2.6
    """Discriminative learning rates: each lower group's rate is the one above divided by this."""
    cut_frac: float = 0.1
    """Slanted triangular schedule: share of steps spent warming up linearly."""
    ratio: float = 32.0
    """Slanted triangular schedule: peak rate / lowest rate."""


@dataclass(frozen=True)
class PromptConfig:
    """Prompt-learning methods (PEFT): ``prompt`` tuning, ``ptuning`` (P-tuning) and ``prefix`` tuning."""

    num_virtual_tokens: int = 20
    """Learned virtual tokens prepended to every input (``prefix``: per layer, as key/value pairs)."""
    init_text: str | None = None
    """Start from a text (null: random): ``prompt`` from its token embeddings, ``prefix`` from the keys
    and values the base computes for it (``ptuning``'s encoder always starts random)."""
    encoder_hidden_size: int = 128
    """``ptuning`` only: hidden size of the MLP prompt encoder."""
    prefix_projection: bool = False
    """``prefix`` only: reparameterise the prefix through an MLP (P-tuning v2 trains it directly)."""


@dataclass(frozen=True)
class PirConfig:
    """Parameter-importance ranking: train only the top-k most important individual weights."""

    k: float = 0.01
    """Share of the chosen modules' weights to train, selected globally across layers (0.01 = 1%)."""
    scorer: Literal["taylor", "fisher", "forest"] = "taylor"
    """Importance: ``taylor`` |g·w| (first-order Taylor), ``fisher`` g² (diagonal Fisher), or ``forest``
    (a random forest ranks modules from probes; top-k Taylor inside the modules it keeps)."""
    target_modules: str | list[str] = "all-linear"
    """Modules whose weights may be chosen: ``all-linear`` (every linear layer of the transformer
    blocks) or a list of module name suffixes such as ``[q_proj, v_proj]``."""
    calibration_batches: int = 8
    """Training batches (``tune.batch_size`` each) whose gradients are accumulated into the scores."""
    forest_keep: float = 0.5
    """``forest`` only: share of modules whose weights stay eligible for the top-k selection."""
    forest_probes: float = 0.3
    """``forest`` only: share of modules probed (one-module gradient step, loss drop measured) to fit the forest."""


@dataclass(frozen=True)
class TuneConfig:
    """Training loop settings (transformers ``Trainer``)."""

    max_steps: int = 60
    """Optimizer steps per task."""
    batch_size: int = 8
    """Examples per device per step."""
    grad_accum: int = 1
    """Gradient accumulation steps (effective batch = batch_size * grad_accum * devices)."""
    learning_rate: float | None = None
    """Peak learning rate (null: the method's own default, e.g. 1e-3 for adapters, 5e-5 for full)."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_seq_len: int = 256
    """Longer examples are truncated (with a warning that counts them)."""
    logging_steps: int = 10
    """Log the training loss every N steps."""
    save_steps: int = 50
    """Write a resumable checkpoint every N steps (``--resume`` continues from the last one)."""


@dataclass(frozen=True)
class QuantizeConfig:
    """bitsandbytes quantization of each merged model."""

    formats: list[str] = field(default_factory=lambda: list(QUANT_FORMATS))
    """Formats to produce: ``int8`` (LLM.int8) and/or ``nf4`` (4-bit NormalFloat, double quantization)."""
    unmerged: list[str] = field(default_factory=lambda: ["nf4"])
    """Formats whose artifact is the quantized *base* plus the task adapter kept unmerged in full
    precision (QLoRA-style inference). 4-bit rounding of merged weights erases much of a small LoRA
    delta (measured on the extract task: 0.94 exact match merged-then-NF4 against 0.97 this way)."""


@dataclass(frozen=True)
class GateConfig:
    """Fidelity gate of an fp32 ONNX export against the PyTorch model it came from (null: not checked)."""

    max_abs_logit_diff: float | None = 1e-3
    """Largest |logit difference| allowed at any position of the fidelity rows."""
    min_top1_agreement: float = 0.99
    """Smallest share of positions whose most likely token must be the same."""
    max_kl: float | None = 1e-4
    """Largest mean KL(PyTorch || ONNX) per position, in nats."""
    max_score_drop: float = 0.0
    """Largest drop in held-out exact match (PyTorch minus ONNX) on the fidelity rows."""


@dataclass(frozen=True)
class Int8GateConfig(GateConfig):
    """Gate of int8 exports (8-bit weights; measured on SmolLM2-135M's three bundled tasks at the answer
    positions: top-1 1.000, KL at most 6e-5, no exact-match change)."""

    max_abs_logit_diff: float | None = None
    min_top1_agreement: float = 0.98
    max_kl: float | None = 0.01
    max_score_drop: float = 0.05


@dataclass(frozen=True)
class Int4GateConfig(GateConfig):
    """Gate of int4 exports (4-bit weights move a 135M model more: top-1 0.98-1.00 and KL up to 0.12 at
    the answer positions of the bundled tasks; one of 32 rows lost is a drop of 0.031)."""

    max_abs_logit_diff: float | None = None
    min_top1_agreement: float = 0.95
    max_kl: float | None = 0.25
    max_score_drop: float = 0.07


@dataclass(frozen=True)
class GatesConfig:
    """One fidelity gate per ONNX precision."""

    fp32: GateConfig = field(default_factory=GateConfig)
    int8: Int8GateConfig = field(default_factory=Int8GateConfig)
    int4: Int4GateConfig = field(default_factory=Int4GateConfig)


@dataclass(frozen=True)
class ExportConfig:
    """Export targets for each task, and the checks an export must pass to be published."""

    targets: list[str] = field(default_factory=lambda: list(EXPORT_TARGETS))
    """``safetensors`` (merged model, tokenizer, generation config), ``onnx`` (fp32 with KV cache),
    ``onnx-int8`` (dynamic, per-channel), ``onnx-int4`` (MatMulNBits, embedding and head too) and
    ``edge`` (the run's bundle: one base, every task's adapter, runnable without PyTorch)."""
    safetensors_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """Weight dtype of the safetensors bundle."""
    int4_block_size: int = 32
    """Weights per int4 scale (16-256, a power of two): smaller is more accurate and larger on disk."""
    accuracy_level: int = 4
    """MatMulNBits compute type of int8 and int4: 4 = int8 (fast on x86 CPUs), 0 = fp32 activations (slower here)."""
    edge_precision: Literal["fp32", "int8", "int4"] = "int4"
    """Precision of the edge bundle's shared base (and of its merged-only task models)."""
    fidelity_rows: int = 32
    """Held-out rows (prompt + reference answer) each export is checked on."""
    gates: GatesConfig = field(default_factory=GatesConfig)
    """Fidelity gate per precision; an export that fails its gate fails loudly and is not published."""


@dataclass(frozen=True)
class EvaluateConfig:
    """What evaluate measures and how."""

    artifacts: list[str] = field(default_factory=lambda: list(ARTIFACTS))
    """Artifacts to score per task (the base model is scored on every task)."""
    max_rows: int | None = None
    """Score at most this many test rows per task (``null``: all)."""
    batch_size: int = 16
    """Rows generated together when scoring."""
    speed_new_tokens: int = 32
    """Tokens generated per decode-speed measurement (batch 1, greedy)."""
    speed_repeats: int = 3
    """Decode-speed repeats; the median is reported."""


@dataclass(frozen=True)
class Config:
    """Everything a pipeline run needs. Paths are relative to the working directory."""

    tasks: list[TaskConfig]
    """Task-specialist adapters to build (at least one)."""
    run: str = "default"
    """Run name: artifacts go to ``<out_dir>/<run>/``."""
    out_dir: str = "runs"
    """Folder that holds every run."""
    base: str = "smollm2-135m-instruct"
    """Base model: ``smollm2-135m-instruct`` (embedded), a local HF directory, or a hub id."""
    method: str = "lora"
    """Fine-tuning method (``edgetune methods`` lists them)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when available, else the CPU."""
    seed: int = 0
    """Seed for data order, initialisation and anything random."""
    num_threads: int = 0
    """CPU threads for torch and ONNX Runtime (0: all cores)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    ulmfit: UlmfitConfig = field(default_factory=UlmfitConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    pir: PirConfig = field(default_factory=PirConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"unknown task {name!r}; the config has: {', '.join(t.name for t in self.tasks)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named top-level settings: what a stage's output depends on."""
        data = self.to_dict()
        blob = json.dumps({k: data[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Range checks: (dotted key suffix, predicate, allowed range in words).
_RANGES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("lora.r", lambda v: 1 <= v <= 1024, "1..1024"),
    ("ulmfit.phases", lambda v: v >= 1, ">= 1"),
    ("ulmfit.lr_decay", lambda v: v >= 1, ">= 1"),
    ("ulmfit.cut_frac", lambda v: 0 < v < 1, "0 < cut_frac < 1"),
    ("ulmfit.ratio", lambda v: v >= 1, ">= 1"),
    ("lora.alpha", lambda v: v > 0, "> 0"),
    ("prompt.num_virtual_tokens", lambda v: 1 <= v <= 512, "1..512"),
    ("prompt.encoder_hidden_size", lambda v: v >= 1, ">= 1"),
    ("pir.k", lambda v: 0 < v <= 1, "0 < k <= 1"),
    ("pir.calibration_batches", lambda v: v >= 1, ">= 1"),
    ("pir.forest_keep", lambda v: 0 < v <= 1, "0 < forest_keep <= 1"),
    ("pir.forest_probes", lambda v: 0 < v <= 1, "0 < forest_probes <= 1"),
    ("lora.dropout", lambda v: 0 <= v < 1, "0 <= dropout < 1"),
    ("tune.max_steps", lambda v: v >= 1, ">= 1"),
    ("tune.batch_size", lambda v: v >= 1, ">= 1"),
    ("tune.grad_accum", lambda v: v >= 1, ">= 1"),
    ("tune.learning_rate", lambda v: v is None or 0 < v <= 1, "0 < lr <= 1, or null"),
    ("tune.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("tune.weight_decay", lambda v: v >= 0, ">= 0"),
    ("tune.max_seq_len", lambda v: 8 <= v <= 131072, "8..131072"),
    ("tune.logging_steps", lambda v: v >= 1, ">= 1"),
    ("tune.save_steps", lambda v: v >= 1, ">= 1"),
    ("evaluate.batch_size", lambda v: v >= 1, ">= 1"),
    ("evaluate.max_rows", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("evaluate.speed_new_tokens", lambda v: v >= 1, ">= 1"),
    ("evaluate.speed_repeats", lambda v: v >= 1, ">= 1"),
    ("export.int4_block_size", lambda v: 16 <= v <= 256 and not v & (v - 1), "16..256, a power of two"),
    ("export.accuracy_level", lambda v: v in (0, 1, 2, 3, 4), "0..4"),
    ("export.fidelity_rows", lambda v: 1 <= v <= 1000, "1..1000"),
    ("tasks[].max_new_tokens", lambda v: 1 <= v <= 4096, "1..4096"),
    ("tasks[].max_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("num_threads", lambda v: v >= 0, ">= 0 (0: all cores)"),
]
_CHOICES: dict[str, tuple[str, ...]] = {
    "quantize.formats": QUANT_FORMATS,
    "quantize.unmerged": QUANT_FORMATS,
    "export.targets": EXPORT_TARGETS,
    "evaluate.artifacts": ARTIFACTS,
}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed YAML) fits the annotation ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, "null" if hint is type(None) else str(hint)
    )


def _build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``, appending every problem to ``errors``."""
    if not isinstance(data, dict):
        errors.append(f"{where or 'config'}: expected a mapping of settings, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{where}{near[0]}'?)" if near else f" (valid: {', '.join(fields)})"
            errors.append(f"{where}{key}: unknown setting{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: required setting is missing")
            continue
        value, hint = data[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.", errors)
        elif name == "tasks" and cls is Config:
            if not isinstance(value, list) or not value:
                errors.append(f"{key}: expected a non-empty list of tasks (name, train, test)")
                continue
            tasks = [_build(TaskConfig, t, f"tasks[{i}].", errors) for i, t in enumerate(value)]
            if all(t is not None for t in tasks):
                kwargs[name] = tasks
        elif float in typing.get_args(hint) + (hint,) and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string; accept it as the number it looks like.
                kwargs[name] = float(value)
            except ValueError:
                errors.append(f"{key}: expected {_describe(hint)}, got {value!r}")
        elif not _type_ok(value, hint):
            errors.append(f"{key}: expected {_describe(hint)}, got {value!r}")
        else:
            kwargs[name] = value
    if any(v is None and dataclasses.is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None
    # Invalid values were left out above, so their (valid) defaults stand in and the range
    # checks can still run over the rest: every problem is reported in one go.
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing; already reported
        return None


def _check_values(cfg: Config, errors: list[str]) -> None:
    """Range and choice checks that need the whole object; append problems to ``errors``."""
    from pipeline.methods import METHODS

    flat: dict[str, Any] = {}
    for section in ("lora", "ulmfit", "prompt", "pir", "tune", "quantize", "export", "evaluate"):
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{k}"] = v
    flat["num_threads"] = cfg.num_threads
    for key, ok, allowed in _RANGES:
        if key.startswith("tasks[]."):
            attr = key.split(".", 1)[1]
            for i, task in enumerate(cfg.tasks):
                if not ok(getattr(task, attr)):
                    errors.append(f"tasks[{i}].{attr}: {getattr(task, attr)!r} is out of range (allowed: {allowed})")
        elif not ok(flat[key]):
            errors.append(f"{key}: {flat[key]!r} is out of range (allowed: {allowed})")
    for key, choices in _CHOICES.items():
        for item in flat[key]:
            if item not in choices:
                near = difflib.get_close_matches(item, choices, n=1)
                did = f"; did you mean {near[0]!r}?" if near else ""
                errors.append(f"{key}: unknown value {item!r} (allowed: {', '.join(choices)}){did}")
    if cfg.method not in METHODS:
        near = difflib.get_close_matches(cfg.method, list(METHODS), n=1)
        did = f"; did you mean {near[0]!r}?" if near else ""
        errors.append(f"method: unknown method {cfg.method!r} (available: {', '.join(METHODS)}){did}")
    names = [t.name for t in cfg.tasks]
    for i, task in enumerate(cfg.tasks):
        if not task.name or not all(c.isalnum() or c in "-_" for c in task.name):
            errors.append(f"tasks[{i}].name: {task.name!r} must be letters, digits, '-' or '_'")
        if names.count(task.name) > 1:
            errors.append(f"tasks[{i}].name: {task.name!r} appears more than once")
    if not cfg.run or not all(c.isalnum() or c in "-_." for c in cfg.run) or cfg.run.startswith("."):
        errors.append(f"run: {cfg.run!r} must be a plain folder name (letters, digits, '-', '_', '.')")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value`` (value read as YAML, so numbers and lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set tune.max_steps=50")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML), apply ``overrides``, validate everything, return a frozen Config.

    Raises :class:`ConfigError` listing every problem (not just the first).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass --config with an existing YAML file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if cfg is not None:
        _check_values(cfg, errors)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} problem(s){where}:\n  - " + "\n  - ".join(errors))
    return cfg
