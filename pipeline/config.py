"""Typed, frozen pipeline settings read from YAML (plus ``--set key=value`` overrides).

One source of truth: every stage receives the same :class:`Config`, a tree of frozen pydantic models.
Each field carries its type, default, allowed range (``Field(ge=..., le=...)``) and, as its attribute
docstring, its meaning. Loading validates the whole file and reports every problem at once: unknown
keys and unknown choices with the nearest valid name, wrong types, and values outside their allowed
range (with the range, read from the field's own constraints).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pipeline.errors import ConfigError, read_utf8

QuantFormat = Literal["int8", "nf4"]
ExportTarget = Literal["safetensors", "onnx", "onnx-int8", "onnx-int4", "gguf", "edge"]
GGUFType = Literal["f16", "q8_0", "q4_1"]
Artifact = Literal["base", "adapter", "merged", "int8", "nf4", "onnx", "onnx-int8", "onnx-int4", "gguf", "edge"]
ARTIFACTS: tuple[str, ...] = typing.get_args(Artifact)
QUANT_FORMATS: tuple[str, ...] = typing.get_args(QuantFormat)
EXPORT_TARGETS: tuple[str, ...] = typing.get_args(ExportTarget)
ONNX_PRECISIONS = {"onnx": "fp32", "onnx-int8": "int8", "onnx-int4": "int4"}
"""ONNX export target -> its precision (the edge bundle's is ``export.edge_precision``)."""
GGUF_PRECISIONS = {"f16": "f16", "q8_0": "int8", "q4_1": "int4"}
"""GGUF weight type -> the precision whose fidelity gate (``export.gates.<precision>``) it must pass."""


def _yaml_number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; accept it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass  # not a number: the float check reports it as the wrong type
    return value


Number = Annotated[float, BeforeValidator(_yaml_number)]
"""A float setting (an integer is accepted too)."""


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise PydanticCustomError("out_of_range", "must be a power of two", {"allowed": "a power of two"})
    return value


def _problem(message: str) -> PydanticCustomError:
    """A validation error shown as written, after its key."""
    return PydanticCustomError("edgetune", message)


def _unknown(what: str, value: Any, choices: Sequence[Any]) -> str:
    """``unknown <what> 'x' (allowed: ...); did you mean 'y'?``"""
    names = [str(c) for c in choices]
    near = difflib.get_close_matches(str(value), names, n=1)
    did = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown {what} {value!r} (allowed: {', '.join(names)}){did}"


def _plain_name(value: str, extra: str = "") -> bool:
    return bool(value) and all(c.isalnum() or c in "-_" + extra for c in value)


class _Section(BaseModel):
    """Frozen and closed (unknown keys are errors); strict, so YAML's ``"3"`` is not taken for 3."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


class TaskConfig(_Section):
    """One task-specialist adapter to train and evaluate."""

    name: str
    """Task name; used for folder names and as the adapter's name (letters, digits, ``-``, ``_``)."""
    train: str
    """Training data: a JSONL or CSV file (prompt/completion, messages, or text rows)."""
    test: str
    """Held-out data in the same formats; used for exact match and perplexity."""
    validation: str | None = None
    """Validation data for evaluation during training (early stopping, the kept checkpoint), in the same
    formats; null: ``tune.validation_share`` of the training rows are held out instead. Never the test file."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Generation budget when scoring a test row; a little above the longest expected answer."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps for this task (null: ``tune.max_steps``); harder tasks can train longer."""

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not _plain_name(value):
            raise _problem(f"{value!r} must be letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _validation_is_not_test(self) -> TaskConfig:
        if self.validation is not None and Path(self.validation).resolve() == Path(self.test).resolve():
            raise _problem(f"validation {self.validation!r} is the test file: choosing the kept checkpoint on "
                           "test rows would make the held-out score optimistic; name another file, or leave "
                           "validation null to hold out tune.validation_share of the training rows")
        return self


class LoraConfig(_Section):
    """LoRA hyper-parameters (PEFT)."""

    r: int = Field(16, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: int = Field(32, gt=0)
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: Number = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear layer except the output head)."""


class UlmfitConfig(_Section):
    """ULMFiT (Howard & Ruder, 2018) applied to a decoder LLM."""

    phases: int = Field(4, ge=1)
    """Layer groups, unfrozen top first, one more per phase; training steps are split evenly over phases."""
    lr_decay: Number = Field(2.6, ge=1)
    """Discriminative learning rates: each lower group's rate is the one above divided by this."""
    cut_frac: Number = Field(0.1, gt=0, lt=1)
    """Slanted triangular schedule: share of steps spent warming up linearly."""
    ratio: Number = Field(32.0, ge=1)
    """Slanted triangular schedule: peak rate / lowest rate."""


class PromptConfig(_Section):
    """Prompt-learning methods (PEFT): ``prompt`` tuning, ``ptuning`` (P-tuning) and ``prefix`` tuning."""

    num_virtual_tokens: int = Field(20, ge=1, le=512)
    """Learned virtual tokens prepended to every input (``prefix``: per layer, as key/value pairs)."""
    init_text: str | None = None
    """Start from a text (null: random): ``prompt`` from its token embeddings, ``prefix`` from the keys
    and values the base computes for it (``ptuning``'s encoder always starts random)."""
    encoder_hidden_size: int = Field(128, ge=1)
    """``ptuning`` only: hidden size of the MLP prompt encoder."""
    prefix_projection: bool = False
    """``prefix`` only: reparameterise the prefix through an MLP (P-tuning v2 trains it directly)."""


class PirConfig(_Section):
    """Parameter-importance ranking: train only the top-k most important individual weights."""

    k: Number = Field(0.01, gt=0, le=1)
    """Share of the chosen modules' weights to train, selected globally across layers (0.01 = 1%)."""
    scorer: Literal["taylor", "fisher", "forest"] = "taylor"
    """Importance: ``taylor`` |g·w| (first-order Taylor), ``fisher`` g² (diagonal Fisher), or ``forest``
    (a random forest ranks modules from probes; top-k Taylor inside the modules it keeps)."""
    target_modules: str | list[str] = "all-linear"
    """Modules whose weights may be chosen: ``all-linear`` (every linear layer of the transformer
    blocks) or a list of module name suffixes such as ``[q_proj, v_proj]``."""
    calibration_batches: int = Field(8, ge=1)
    """Training batches (``tune.batch_size`` each) whose gradients are accumulated into the scores."""
    forest_keep: Number = Field(0.5, gt=0, le=1)
    """``forest`` only: share of modules whose weights stay eligible for the top-k selection."""
    forest_probes: Number = Field(0.3, gt=0, le=1)
    """``forest`` only: share of modules probed (one-module gradient step, loss drop measured) to fit the forest."""


class TuneConfig(_Section):
    """Training loop settings (transformers ``Trainer``)."""

    max_steps: int = Field(60, ge=1)
    """Optimizer steps per task: an upper bound when early stopping is on."""
    batch_size: int = Field(8, ge=1)
    """Examples per device per step."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps (effective batch = batch_size * grad_accum * devices)."""
    learning_rate: Number | None = Field(None, gt=0, le=1)
    """Peak learning rate (null: the method's own default, e.g. 1e-3 for adapters, 5e-5 for full)."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps."""
    weight_decay: Number = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_seq_len: int = Field(256, ge=8, le=131072)
    """Longer examples are truncated (with a warning that counts them)."""
    logging_steps: int = Field(10, ge=1)
    """Log the training loss every N steps."""
    save_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every N steps (``--resume`` continues from the last one); with a
    validation split, a checkpoint is written at every evaluation instead (the best one is kept)."""
    validation_share: Number = Field(0.05, ge=0, lt=1)
    """Share of the training rows held out (chosen with ``seed``) for evaluation during training when a
    task names no ``validation`` file; 0 with no file: no evaluation, train ``max_steps`` and keep the last."""
    eval_steps: int = Field(10, ge=1)
    """Evaluate on the validation rows every N optimizer steps (and at the last step)."""
    eval_rows: int = Field(32, ge=1)
    """Validation rows whose greedy answer is scored for exact match at each evaluation (loss uses all)."""
    eval_batch_size: int = Field(32, ge=1)
    """Rows per batch in evaluation during training (loss and greedy decoding)."""
    metric_for_best: Literal["auto", "exact_match", "loss"] = "auto"
    """What makes a checkpoint the best: ``exact_match`` on the validation rows, ties broken by the lower
    validation loss, or ``loss`` alone; ``auto`` is exact match when the validation rows have answers. An
    evaluation that is not strictly better keeps the earlier step."""
    early_stopping_patience: int | None = Field(3, ge=1)
    """Stop after N evaluations in a row without a new best (null: train ``max_steps``)."""
    load_best_at_end: bool = True
    """Keep the best evaluation's checkpoint as the adapter (false: the last step's)."""
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    """Experiment tracking through the Trainer's integration (each an optional extra: ``pip install
    'edgetune[tensorboard]'``, ``[wandb]``, ``[mlflow]``); offline, under ``runs/<run>/tracking/``."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training arithmetic: ``auto`` is bf16 mixed precision on a GPU that supports it and fp32 elsewhere;
    ``bf16``/``fp16`` are mixed precision (weights and the saved adapter stay fp32; fp16 needs CUDA)."""


class QuantizeConfig(_Section):
    """bitsandbytes quantization of each merged model."""

    formats: list[QuantFormat] = Field(default_factory=lambda: list(QUANT_FORMATS))
    """Formats to produce: ``int8`` (LLM.int8) and/or ``nf4`` (4-bit NormalFloat, double quantization)."""
    unmerged: list[QuantFormat] = Field(default_factory=lambda: ["nf4"])
    """Formats whose artifact is the quantized *base* plus the task adapter kept unmerged in full
    precision (QLoRA-style inference). 4-bit rounding of merged weights erases much of a small LoRA
    delta (measured on the extract task: 0.94 exact match merged-then-NF4 against 0.97 this way)."""
    nf4_method: Literal["gptq", "rtn"] = "gptq"
    """How NF4 codes are chosen: ``gptq`` (bitsandbytes' own block scales, each code chosen by GPTQ on the
    ``calibration`` rows so the layer outputs move least) or ``rtn`` (bitsandbytes' round-to-nearest).
    The checkpoint format is bitsandbytes' either way."""


class CalibrationConfig(_Section):
    """The text 4-bit weights are calibrated on (GPTQ): the tasks' training rows, never their test rows."""

    rows: int = Field(128, ge=1, le=4096)
    """Training rows (prompt + reference answer, as the model sees them) per calibration: a task's own for its
    merged model, shared evenly among every task for a base that serves them all (NF4 base, edge bundle)."""
    batch_size: int = Field(8, ge=1)
    """Rows per forward pass while measuring the layers' inputs."""


class MergeConfig(_Section):
    """The merge stage's fidelity gate: merged weights must give the adapter's logits."""

    max_abs_logit_diff: Number = Field(1e-3, gt=0)
    """Largest |logit difference| (fp32) between the merged model and base + adapter on the gate prompts."""
    fidelity_prompts: int = Field(4, ge=1, le=256)
    """Held-out prompts (the task's first test rows) the merged logits are compared on."""


class GateConfig(_Section):
    """Fidelity gate of an ONNX export against the PyTorch model it came from (null: not checked)."""

    max_abs_logit_diff: Number | None = Field(1e-3, gt=0)
    """Largest |logit difference| allowed at any position of the fidelity rows."""
    min_top1_agreement: Number = Field(0.99, ge=0, le=1)
    """Smallest share of positions whose most likely token must be the same."""
    max_kl: Number | None = Field(1e-4, ge=0)
    """Largest mean KL(PyTorch || ONNX) per position, in nats."""
    max_score_drop: Number = Field(0.0, ge=0, le=1)
    """Largest drop in held-out exact match (PyTorch minus ONNX) on the fidelity rows."""


class GatesConfig(_Section):
    """One fidelity gate per ONNX precision; a gate given in part keeps its precision's other defaults."""

    fp32: GateConfig = Field(default_factory=GateConfig)
    """Gate of fp32 exports: the export should compute what PyTorch computes."""
    f16: GateConfig = Field(default_factory=lambda: GateConfig(
        max_abs_logit_diff=0.1, min_top1_agreement=0.99, max_kl=1e-3, max_score_drop=0.0))
    """Gate of half-precision exports (GGUF ``f16``: weights rounded to 11 significant bits; SmolLM2-135M's
    merged models moved 0.023, 0.043 and 0.055 at the answer positions of the three bundled tasks)."""
    int8: GateConfig = Field(default_factory=lambda: GateConfig(
        max_abs_logit_diff=None, min_top1_agreement=0.98, max_kl=0.01, max_score_drop=0.05))
    """Gate of int8 exports (8-bit weights; measured on SmolLM2-135M's three bundled tasks at the answer
    positions: top-1 1.000, KL at most 6e-5, no exact-match change)."""
    int4: GateConfig = Field(default_factory=lambda: GateConfig(
        max_abs_logit_diff=None, min_top1_agreement=0.95, max_kl=0.25, max_score_drop=0.07))
    """Gate of int4 exports (4-bit weights move a 135M model more: top-1 0.98-1.00 and KL up to 0.12 at
    the answer positions of the bundled tasks; one of 32 rows lost is a drop of 0.031)."""

    @field_validator("fp32", "f16", "int8", "int4", mode="before")
    @classmethod
    def _over_precision_defaults(cls, value: Any, info: Any) -> Any:
        """``int8: {max_kl: 0.02}`` changes max_kl only; the rest stays int8's default, not fp32's."""
        if isinstance(value, dict):
            default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
            return {**default.model_dump(), **value}
        return value


class ExportConfig(_Section):
    """Export targets for each task, and the checks an export must pass to be published."""

    targets: list[ExportTarget] = Field(default_factory=lambda: list(EXPORT_TARGETS))
    """``safetensors`` (merged model, tokenizer, generation config), ``onnx`` (fp32 with KV cache),
    ``onnx-int8`` (dynamic, per-channel), ``onnx-int4`` (MatMulNBits, embedding and head too) and
    ``gguf`` (llama.cpp/Ollama: the merged model at each of ``gguf_types``, a LoRA task's adapter as a GGUF
    adapter over the run's shared GGUF base, and Ollama Modelfiles) and
    ``edge`` (the run's bundle: one base, every task's adapter, runnable without PyTorch)."""
    gguf_types: list[GGUFType] = Field(default_factory=lambda: ["f16", "q8_0", "q4_1"], min_length=1)
    """Weight types of each merged GGUF model: ``f16``, ``q8_0`` (8-bit blocks) and ``q4_1`` (4-bit blocks of 32
    with a minimum; the GPTQ-calibrated int4 weights when ``int4_method`` is ``gptq`` and ``int4_block_size``
    32). Gated as fp16, int8 and int4 (``export.gates``)."""
    gguf_base_type: GGUFType = "q8_0"
    """Weight type of the shared GGUF base that LoRA tasks' GGUF adapters run on (gated per task, base +
    adapter, at this type's precision)."""
    safetensors_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """Weight dtype of the safetensors bundle."""
    int4_block_size: Annotated[int, AfterValidator(_power_of_two)] = Field(32, ge=16, le=256)
    """Weights per int4 scale (16-256, a power of two): smaller is more accurate and larger on disk."""
    int4_method: Literal["gptq", "rtn"] = "gptq"
    """How int4 weights are rounded: ``gptq`` (calibrated on the ``calibration`` rows: the task's own for its
    merged model, every task's for the edge bundle's base) or ``rtn`` (round-to-nearest, no data). Same
    graph, size and speed; only the 4-bit values differ."""
    accuracy_level: int = Field(4, ge=0, le=4)
    """MatMulNBits compute type of int8 and int4: 4 = int8 (fast on x86 CPUs), 0 = fp32 activations (slower here)."""
    edge_precision: Literal["fp32", "int8", "int4"] = "int4"
    """Precision of the edge bundle's shared base (and of its merged-only task models)."""
    edge_fallback: Literal["int8", "fp32"] | None = None
    """A task whose adapter fails its gate on the edge bundle's base ships instead as its merged model at this
    precision (held to that precision's gate; the manifest and report say so). ``null``: it is left out of the
    bundle. Needs a mergeable method and a higher precision than ``edge_precision``."""
    fidelity_rows: int = Field(32, ge=1, le=1000)
    """Held-out rows (prompt + reference answer) each export is checked on."""
    gates: GatesConfig = Field(default_factory=GatesConfig)
    """Fidelity gate per precision; an export that fails its gate fails loudly and is not published."""


def _int4_variant(value: str) -> str:
    method, _, block = value.partition("-b")
    if method not in ("gptq", "rtn") or not block.isdigit() or int(block) not in (16, 32, 64, 128, 256):
        raise _problem(f"{value!r} is not an int4 variant: write <gptq|rtn>-b<16|32|64|128|256>, e.g. rtn-b32")
    return value


class EvaluateConfig(_Section):
    """What evaluate measures and how."""

    artifacts: list[Artifact] = Field(default_factory=lambda: list(ARTIFACTS))
    """Artifacts to score per task (the base model is scored on every task)."""
    max_rows: int | None = Field(None, ge=1)
    """Score at most this many test rows per task (``null``: all)."""
    batch_size: int = Field(16, ge=1)
    """Rows generated together when scoring."""
    speed_new_tokens: int = Field(32, ge=1)
    """Tokens generated per decode-speed measurement (batch 1, greedy)."""
    speed_repeats: int = Field(3, ge=1)
    """Decode-speed repeats; the median is reported."""
    int4_variants: list[Annotated[str, AfterValidator(_int4_variant)]] = Field(default_factory=lambda: ["rtn-b32"])
    """Other int4 roundings of each merged model to measure beside ``onnx-int4`` (what 4 bits cost, and what
    calibration buys): ``<gptq|rtn>-b<block size>``, e.g. ``rtn-b32`` (round-to-nearest), ``gptq-b64``. Scored
    like the artifacts and plotted as ``onnx-int4@<variant>``; built in a scratch folder, never published."""


class Config(_Section):
    """Everything a pipeline run needs. Paths are relative to the working directory."""

    tasks: list[TaskConfig] = Field(min_length=1)
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
    num_threads: int = Field(0, ge=0)
    """CPU threads for torch and ONNX Runtime (0: all cores, shared among the ranks of a multi-process launch)."""
    providers: list[Literal["cpu", "cuda"]] = Field(default_factory=lambda: ["cpu"], min_length=1)
    """ONNX Runtime execution providers for scoring ONNX artifacts (export gates, evaluate), in order of
    preference; ``cuda`` needs the ``gpu`` extra (onnxruntime-gpu). The CPU is always the last fallback."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    ulmfit: UlmfitConfig = Field(default_factory=UlmfitConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    pir: PirConfig = Field(default_factory=PirConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise _problem(f"task name(s) {', '.join(map(repr, repeated))} appear more than once")
        return tasks

    @field_validator("run")
    @classmethod
    def _run_is_a_folder_name(cls, value: str) -> str:
        if not _plain_name(value, ".") or value.startswith("."):
            raise _problem(f"{value!r} must be a plain folder name (letters, digits, '-', '_', '.')")
        return value

    @field_validator("method")
    @classmethod
    def _method_is_registered(cls, value: str) -> str:
        # Imported here, not at the top: importing the config need not register every method module.
        from pipeline.methods import METHODS

        if value not in METHODS:
            raise _problem(_unknown("method", value, list(METHODS)))
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"unknown task {name!r}; the config has: {', '.join(t.name for t in self.tasks)}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named top-level settings: what a stage's output depends on."""
        data = self.to_dict()
        blob = json.dumps({k: data[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value`` (value read as YAML, so numbers and lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set tune.max_steps=50")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _parse_yaml(raw, f"--set {key.strip()}=...", lines=False) if raw.strip() else ""


def _read_yaml_file(path: Path) -> Any:
    """The YAML document in ``path``; ConfigError with file:line when it is not UTF-8 or not YAML."""
    return _parse_yaml(read_utf8(path, ConfigError, "the config"), str(path))


def _parse_yaml(text: str, where: str, *, lines: bool = True) -> Any:
    """``yaml.safe_load`` with its failures as one ConfigError naming ``where`` and (``lines``) the line."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None and lines else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:  # the reader's errors (e.g. a control character) carry no mark
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{where}{f':{_too_deep_line(text)}' if lines else ''}: nested too deeply to read; settings are at most a "
                          "few levels deep") from None


def _too_deep_line(text: str, limit: int = 100) -> int:
    """The line where ``text``'s YAML nesting first passes ``limit`` levels (1 if the scanner cannot tell)."""
    opens = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
             yaml.BlockMappingStartToken)
    closes = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)
    depth = 0
    try:
        for token in yaml.scan(text):
            depth += isinstance(token, opens) - isinstance(token, closes)
            if depth > limit:
                return token.start_mark.line + 1
    except yaml.YAMLError:
        pass
    return 1


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML), apply ``overrides``, validate everything, return a frozen Config.

    Raises :class:`ConfigError` listing every problem (not just the first).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass --config with an existing YAML file")
        data = _read_yaml_file(path) or {}
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
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = _problems(exc)
    where = f" in {path}" if path else ""
    raise ConfigError(f"{len(errors)} problem(s){where}:\n  - " + "\n  - ".join(errors))


# --- Turning pydantic's errors into ``key.path: message`` lines --------------------------------------------

_OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "out_of_range"}


def _problems(exc: ValidationError) -> list[str]:
    """One ``key.path: message`` line per problem of a :class:`Config` validation, in file order.

    A value that fits no alternative of a union (``str | list[str]``) is one problem, not one per
    alternative.
    """
    lines: dict[str, None] = {}
    typed: set[str] = set()
    for err in exc.errors():
        key, owner, field, rest = _locate(err["loc"])
        kind, value = err["type"], err["input"]
        if kind == "extra_forbidden":
            prefix = f"{key}." if key else ""
            near = difflib.get_close_matches(str(rest[0]), list(owner.model_fields), n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid: {', '.join(owner.model_fields)}"
            lines[f"{prefix}{rest[0]}: unknown setting ({hint})"] = None
            continue
        if kind == "missing":
            message = "required setting is missing"
        elif kind in _OUT_OF_RANGE:
            message = f"{value!r} is out of range (allowed: {_allowed(key, field, err.get('ctx') or {})})"
        elif kind == "literal_error" and field is not None:
            message = _unknown("value", value, _choices(field.annotation))
        elif kind in ("model_type", "dict_type"):
            message = f"expected a mapping of settings, got {type(value).__name__}"
        elif kind == "too_short":
            message = "expected a non-empty list"
        elif kind == "edgetune" or field is None:
            message = err["msg"]
        elif key in typed:  # another alternative of the same union: already reported
            continue
        else:
            typed.add(key)
            message = f"expected {_describe(field.annotation)}, got {value!r}"
        lines[f"{key or 'config'}: {message}"] = None
    return list(lines)


def _locate(loc: tuple[str | int, ...]) -> tuple[str, type[BaseModel], FieldInfo | None, tuple[str | int, ...]]:
    """Split an error location into the YAML key (``tasks[0].name``), the model the walk ended in, the
    last field passed (None after a list index) and the rest (an unknown key, union tags, list indexes)."""
    owner: type[BaseModel] = Config
    key, field, i = "", None, 0
    while i < len(loc) and isinstance(loc[i], str) and loc[i] in owner.model_fields:
        field = owner.model_fields[loc[i]]
        key = f"{key}.{loc[i]}" if key else str(loc[i])
        i += 1
        hint = field.annotation
        if typing.get_origin(hint) is list and _is_model(typing.get_args(hint)[0]) and i < len(loc) \
                and isinstance(loc[i], int):
            key, field, hint = f"{key}[{loc[i]}]", None, typing.get_args(hint)[0]
            i += 1
        if not _is_model(hint):
            break
        owner = hint
    return key, owner, field, loc[i:]


def _is_model(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, BaseModel)


def _allowed(key: str, field: FieldInfo | None, ctx: dict[str, Any]) -> str:
    """The allowed values of ``field`` in words, from the constraints declared on it (``1..1024``)."""
    low = high = None
    for bound in field.metadata if field else ():
        if isinstance(bound, (Ge, Gt)):
            low = (bound.ge, "<=") if isinstance(bound, Ge) else (bound.gt, "<")
        elif isinstance(bound, (Le, Lt)):
            high = (bound.le, "<=") if isinstance(bound, Le) else (bound.lt, "<")
    name = key.rsplit(".", 1)[-1]
    if low and high:
        words = f"{low[0]}..{high[0]}" if low[1] == high[1] == "<=" else f"{low[0]} {low[1]} {name} {high[1]} {high[0]}"
    elif low:
        words = f"{'>=' if low[1] == '<=' else '>'} {low[0]}"
    elif high:
        words = f"{high[1]} {high[0]}"
    else:
        words = ""
    if words and field is not None and type(None) in typing.get_args(field.annotation):
        words += " or null"
    return ", ".join(w for w in (words, ctx.get("allowed", "")) if w)


def _choices(hint: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` inside ``hint`` (``list[Literal[...]]``, ``Literal[...] | None``...)."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if found := _choices(arg):
            return found
    return ()


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true/false", "true/false values")}


def _describe(hint: Any, plural: bool = False) -> str:
    """``hint`` in words for a wrong-type message: ``an integer``, ``a string or a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _describe(args[0], plural)
    if origin is Literal:
        return ("values from " if plural else "one of ") + ", ".join(map(str, args))
    if origin is list:
        return "a list of " + _describe(args[0], plural=True)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if hint is type(None):
        return "null"
    if _is_model(hint):
        return "mappings of settings" if plural else "a mapping of settings"
    return _NOUNS.get(hint, (str(hint), str(hint)))[plural]
