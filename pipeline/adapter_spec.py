"""One description of a tune result, read once: :class:`AdapterSpec`.

Tune writes the spec into its manifest (key ``adapter``); every later stage, the edge bundle, the
server intake and the engines read it from there with :func:`read_spec`. A folder edgetune did not
write (a PEFT adapter from elsewhere, a client's upload) has no such manifest: the spec is then read
from its files, and this module is the only code that parses ``adapter_config.json``. Malformed
configs raise :class:`AdapterSpecError` naming the file and the problem.

Torch-free (stdlib only), so the ONNX server backend and the exporters can use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import EdgetuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja")
"""What a PEFT adapter folder needs to be loaded on a base and prompted (checkpoints and manifests excluded)."""
SPARSE_DELTA_CONFIG = "sparse_delta_config.json"
SPARSE_DELTA_WEIGHTS = "sparse_delta.safetensors"
SPARSE_DELTA_FORMAT = "edgetune-sparse-delta"
"""PIR's own format (see :mod:`pipeline.methods.pir`): indices and values per module, and their config."""
MODEL_CONFIG = "config.json"
MANIFEST_KEY = "adapter"
"""The tune manifest's key holding :meth:`AdapterSpec.to_manifest`."""
_MANIFEST = "manifest.json"

KINDS = ("lora", "dora", "ia3", "prefix", "prompt", "ptuning", "pir", "full")
PROMPT_LEARNING_KINDS = ("prefix", "prompt", "ptuning")
PEFT_KINDS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}
"""PEFT's ``peft_type`` -> kind (a LoRA config with ``use_dora`` is ``dora``)."""


class AdapterSpecError(EdgetuneError):
    """A tune result or adapter folder whose description cannot be read; ``path`` is the file (or
    folder) at fault and ``problem`` says what is wrong with it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class AdapterSpec:
    """What a tune result is, as every consumer needs it (never re-derived from files downstream)."""

    kind: str
    """One of :data:`KINDS`: QLoRA adapters are ``lora``; full fine-tuning and ULMFiT are ``full``."""
    peft_type: str | None = None
    """PEFT's type (``LORA``, ``IA3``, ``PREFIX_TUNING``, ...); None for a PIR delta or a whole model."""
    rank: int | None = None
    """LoRA/DoRA: the largest rank (``r`` and every ``rank_pattern`` value); else None."""
    alpha: float | None = None
    """LoRA/DoRA ``lora_alpha`` (None: not given; consumers then scale by 1, alpha = rank, as before)."""
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    """LoRA/DoRA per-module alpha overrides, (module suffix, alpha)."""
    rslora: bool = False
    """LoRA/DoRA scaled by alpha / sqrt(rank) instead of alpha / rank."""
    fan_in_fan_out: bool = False
    """LoRA on Conv1D-style (transposed) weights."""
    targets: tuple[str, ...] = ()
    """Adapted modules, sorted (PEFT's ``target_modules``; PIR's delta modules)."""
    feedforward_modules: tuple[str, ...] = ()
    """IA3: the targets whose input (not output) is scaled."""
    num_virtual_tokens: int | None = None
    """Prompt learning: how many virtual tokens precede the prompt."""
    kv_layout: tuple[int, int, int] | None = None
    """Prefix tuning: (layers, key/value heads, head size) of its key/value table, when the config says."""
    files: tuple[str, ...] = ()
    """The files holding the adapter's weights and config, relative to its folder."""
    base_changes: tuple[str, ...] = ()
    """PEFT options in its config that change the base model's own modules or weights rather than add the
    adapter's (``modules_to_save``, ``layer_replication``, trained biases, ...): the server refuses these."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def prompt_learning(self) -> bool:
        """Virtual tokens in front of the input (prompt, P-tuning, prefix): nothing in the weights to merge."""
        return self.kind in PROMPT_LEARNING_KINDS

    @property
    def mergeable(self) -> bool:
        """Whether merge can fold the result into the base weights (a whole model passes through)."""
        return not self.prompt_learning

    @property
    def full_model(self) -> bool:
        """The result is a whole model folder, not an adapter on the base."""
        return self.kind == "full"

    @property
    def peft(self) -> bool:
        """The folder is a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        return self.peft_type is not None

    def to_manifest(self) -> dict[str, Any]:
        """JSON-ready form, as stored under the tune manifest's ``adapter`` key."""
        return {"kind": self.kind, "peft_type": self.peft_type, "rank": self.rank, "alpha": self.alpha,
                "alpha_pattern": dict(self.alpha_pattern), "rslora": self.rslora,
                "fan_in_fan_out": self.fan_in_fan_out, "targets": list(self.targets),
                "feedforward_modules": list(self.feedforward_modules),
                "num_virtual_tokens": self.num_virtual_tokens,
                "kv_layout": None if self.kv_layout is None else list(self.kv_layout), "files": list(self.files),
                "base_changes": list(self.base_changes)}

    @classmethod
    def from_manifest(cls, entry: Any, source: Path = Path(_MANIFEST)) -> AdapterSpec:
        """The spec :meth:`to_manifest` wrote; AdapterSpecError (naming ``source``) if ``entry`` is malformed."""
        f = _Fields(source, entry, f"{MANIFEST_KEY}.")
        kind = f.get("kind", str, required=True)
        if kind not in KINDS:
            raise AdapterSpecError(source, f"{MANIFEST_KEY}.kind {kind!r} is not one of {', '.join(KINDS)}")
        layout = f.get("kv_layout", list)
        if layout is not None and (len(layout) != 3 or not all(_is_int(v) and v > 0 for v in layout)):
            raise AdapterSpecError(source, f"{MANIFEST_KEY}.kv_layout must be 3 positive integers, got {layout!r}")
        return cls(kind=kind, peft_type=f.get("peft_type", str), rank=f.positive_int("rank"),
                   alpha=f.number("alpha"), alpha_pattern=f.number_map("alpha_pattern"),
                   rslora=f.get("rslora", bool) or False, fan_in_fan_out=f.get("fan_in_fan_out", bool) or False,
                   targets=f.names("targets"), feedforward_modules=f.names("feedforward_modules"),
                   num_virtual_tokens=f.positive_int("num_virtual_tokens"),
                   kv_layout=None if layout is None else tuple(layout), files=f.names("files", sort=False),
                   base_changes=f.names("base_changes"))


def read_spec(folder: Path, *, trust_manifest: bool = True) -> AdapterSpec:
    """The spec of the tune result or adapter in ``folder``.

    The tune manifest's ``adapter`` entry when there is one (and ``trust_manifest``), else the folder's
    files: ``adapter_config.json`` (PEFT), PIR's ``sparse_delta_config.json``, or a whole model
    (``config.json`` and safetensors weights). The server passes ``trust_manifest=False``: it loads
    what PEFT reads, so it describes those files, never a manifest a client could have written.
    """
    folder = Path(folder)
    manifest = folder / _MANIFEST
    if trust_manifest and manifest.is_file():
        try:  # an unreadable manifest is an unfinished output: describe the files instead
            entry = json.loads(manifest.read_text(encoding="utf-8")).get(MANIFEST_KEY)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            entry = None
        if entry is not None:
            return AdapterSpec.from_manifest(entry, manifest)
    return spec_from_files(folder)


def spec_from_files(folder: Path) -> AdapterSpec:
    """The spec of ``folder`` read from its files alone (see :func:`read_spec`)."""
    folder = Path(folder)
    if (folder / SPARSE_DELTA_CONFIG).is_file():
        return _sparse_delta_spec(folder / SPARSE_DELTA_CONFIG)
    if (folder / ADAPTER_CONFIG).is_file():
        return _peft_spec(folder / ADAPTER_CONFIG)
    if (folder / MODEL_CONFIG).is_file():
        weights = sorted(p.name for p in folder.glob("*.safetensors")) + \
            sorted(p.name for p in folder.glob("*.safetensors.index.json"))
        if not weights:
            raise AdapterSpecError(folder, f"{MODEL_CONFIG} but no safetensors weights; it is neither an adapter "
                                           "nor a complete model")
        extra = [n for n in ("generation_config.json",) if (folder / n).is_file()]
        return AdapterSpec(kind="full", files=(MODEL_CONFIG, *extra, *weights))
    raise AdapterSpecError(folder, f"no {ADAPTER_CONFIG} (PEFT) or {SPARSE_DELTA_CONFIG} (PIR); it is not an adapter")


def kv_layout(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a transformer config: the shape of a prefix's keys and values."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def _peft_spec(path: Path) -> AdapterSpec:
    f = _Fields(path, _load_json_object(path))
    peft_type = f.get("peft_type", str, required=True).upper()
    if peft_type not in PEFT_KINDS:
        raise AdapterSpecError(path, f"PEFT type {peft_type} is not supported; edgetune takes "
                                     f"{', '.join(PEFT_KINDS)}, PIR sparse deltas and whole models")
    kind = PEFT_KINDS[peft_type]
    files = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    changes = _base_changes(f)
    if kind == "lora":
        r = f.positive_int("r", required=True)
        pattern = f.get("rank_pattern", dict) or {}
        ranks = [r]
        for module, value in pattern.items():
            if not _is_int(value) or value < 1:
                raise AdapterSpecError(path, f"rank_pattern[{module!r}] must be a positive integer, got {value!r}")
            ranks.append(value)
        return AdapterSpec(kind="dora" if f.get("use_dora", bool) else "lora", peft_type=peft_type, rank=max(ranks),
                           alpha=f.number("lora_alpha"), alpha_pattern=f.number_map("alpha_pattern"),
                           rslora=f.get("use_rslora", bool) or False,
                           fan_in_fan_out=f.get("fan_in_fan_out", bool) or False,
                           targets=f.names("target_modules"), files=files, base_changes=changes)
    if kind == "ia3":
        return AdapterSpec(kind=kind, peft_type=peft_type, targets=f.names("target_modules"),
                           feedforward_modules=f.names("feedforward_modules"), files=files, base_changes=changes)
    layout = None
    if kind == "prefix":
        layers, heads, width = (f.positive_int(k) for k in ("num_layers", "num_attention_heads", "token_dim"))
        if layers and heads and width and width % heads == 0:  # PEFT sets heads to the base's key/value heads
            layout = (layers, heads, width // heads)
    return AdapterSpec(kind=kind, peft_type=peft_type, num_virtual_tokens=f.positive_int("num_virtual_tokens",
                                                                                         required=True),
                       kv_layout=layout, files=files, base_changes=changes)


BASE_CHANGING_OPTIONS = {"modules_to_save": "copies base modules into the adapter and trains them",
                         "layer_replication": "duplicates the base model's layers",
                         "trainable_token_indices": "retrains rows of the base's embeddings",
                         "target_parameters": "adapts base parameters directly",
                         "lora_bias": "adds a trained bias to the base layers"}
"""PEFT config options (set to anything but null, false or empty) that reach into the base model: what they do."""


def _base_changes(f: _Fields) -> tuple[str, ...]:
    """The options of a PEFT config that change the base model itself (see :attr:`AdapterSpec.base_changes`)."""
    changes = [key for key in BASE_CHANGING_OPTIONS if f.data.get(key) not in (None, False, [], {}, "")]
    bias = f.get("bias", str)
    if bias not in (None, "none"):
        changes.append("bias")  # "all" or "lora_only": the base's biases are trained and saved with the adapter
    return tuple(sorted(changes))


def _sparse_delta_spec(path: Path) -> AdapterSpec:
    f = _Fields(path, _load_json_object(path))
    if f.get("format", str) != SPARSE_DELTA_FORMAT:
        raise AdapterSpecError(path, f"format {f.data.get('format')!r} is not {SPARSE_DELTA_FORMAT!r}")
    modules = f.get("modules", dict) or {}
    if not all(isinstance(v, dict) for v in modules.values()):
        raise AdapterSpecError(path, "modules must map module names to objects")
    return AdapterSpec(kind="pir", targets=tuple(sorted(modules)), files=(SPARSE_DELTA_CONFIG, SPARSE_DELTA_WEIGHTS))


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterSpecError(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise AdapterSpecError(path, f"is not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses per nesting level: a config is never nested this deep
        raise AdapterSpecError(path, "is nested too deeply to be an adapter config") from None
    except OSError as exc:
        raise AdapterSpecError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise AdapterSpecError(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (Python's parser also takes ``NaN`` and ``Infinity``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


class _Fields:
    """Typed access to one JSON object's fields; a wrong type is an AdapterSpecError naming file and key."""

    def __init__(self, path: Path, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise AdapterSpecError(path, f"{prefix.rstrip('.') or 'the file'} must be a JSON object, "
                                         f"got {type(data).__name__}")
        self.path, self.data, self.prefix = path, data, prefix

    def _bad(self, key: str, want: str) -> AdapterSpecError:
        return AdapterSpecError(self.path, f"{self.prefix}{key} must be {want}, got {self.data[key]!r}")

    def get(self, key: str, kind: type | None = None, *, required: bool = False) -> Any:
        """The value of ``key`` (None if absent or null), checked to be a ``kind`` when one is given."""
        value = self.data.get(key)
        if value is None:
            if required:
                raise AdapterSpecError(self.path, f"{self.prefix}{key} is missing")
            return None
        if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise self._bad(key, {str: "a string", bool: "true or false", dict: "an object",
                                  list: "a list"}.get(kind, kind.__name__))
        return value

    def positive_int(self, key: str, *, required: bool = False) -> int | None:
        value = self.get(key, required=required)
        if value is not None and (not _is_int(value) or value < 1):
            raise self._bad(key, "a positive integer")
        return value

    def number(self, key: str) -> float | None:
        value = self.get(key)
        if value is not None and not _is_number(value):
            raise self._bad(key, "a finite number")
        return value

    def number_map(self, key: str) -> tuple[tuple[str, float], ...]:
        value = self.get(key, dict) or {}
        if not all(_is_number(v) for v in value.values()):
            raise self._bad(key, "an object of finite numbers")
        return tuple(sorted(value.items()))

    def names(self, key: str, *, sort: bool = True) -> tuple[str, ...]:
        """A string or a list of strings (PEFT allows either for module lists), as a tuple."""
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a string or a list of strings")
        return tuple(sorted(value)) if sort else tuple(value)
