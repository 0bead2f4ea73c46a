"""What the server may load as an adapter, checked before any of it touches the model.

An adapter is named by the client but always lives under the configured adapter root: a name
with a path separator or ``..`` is refused, and the resolved folder must stay inside the root
(symlinks included). Only safetensors weights load; a pickle ``.bin`` is refused with the fix.
Its config and every tensor are validated against the base (module exists, shapes fit, rank within
``max_rank``, values finite) so a bad adapter is a clear 4xx and never a crash mid-request.

What the folder is comes from :func:`pipeline.adapter_spec.read_spec` on its files (never on a
manifest a client could have written: the server loads what PEFT reads). Server kinds: ``lora``
(LoRA, DoRA, QLoRA adapters: PEFT ``LORA``), ``ia3``, ``prompt`` (PEFT prompt tuning, P-tuning,
prefix tuning) and ``pir`` (edgetune's sparse delta).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.adapter_spec import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SPARSE_DELTA_CONFIG,
    SPARSE_DELTA_WEIGHTS,
    AdapterSpec,
    AdapterSpecError,
    kv_layout,
    read_spec,
)
from pipeline.errors import EdgetuneError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdapterError(EdgetuneError):
    """An adapter request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def public_reason(exc: BaseException) -> str:
    """What a client may read about a failed adapter load (``GET /v1/models``): an AdapterError's message is
    written for clients; any other error may carry server internals, so it is named only by its type."""
    if isinstance(exc, AdapterError):
        return str(exc)
    return f"internal error while loading ({type(exc).__name__}); see the server log"


@dataclass(frozen=True)
class AdapterInfo:
    """A validated adapter folder."""

    name: str
    path: Path
    kind: str
    """``lora``, ``ia3``, ``prompt`` or ``pir``."""
    peft_type: str | None
    rank: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    spec: AdapterSpec | None = None
    """What the folder holds (set by :func:`inspect_adapter`; engines read kind details from it)."""


def check_name(name: Any) -> str:
    """``name`` if it is a plain adapter name (letters, digits, ``_.-``, at most 64), else AdapterError."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise AdapterError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
                           "without '..' or path separators")
    return name


def resolve_source(root: Path, source: Any) -> Path:
    """The folder ``source`` names under ``root``: a plain name or a relative path that stays inside it."""
    if not isinstance(source, str) or not source or source.startswith(("/", "\\")) or "\\" in source \
            or ".." in Path(source).parts or "~" in source:
        raise AdapterError(f"adapter source {source!r} must be a folder relative to the adapter root, without "
                           "'..' or an absolute path")
    root = Path(root).resolve()
    folder = (root / source).resolve()
    if not folder.is_relative_to(root):
        raise AdapterError(f"adapter source {source!r} leaves the adapter root (through a link?); refused")
    if not folder.is_dir():
        raise AdapterError(f"adapter source {source!r} is not a folder under the adapter root", status=404)
    return folder


def inspect_adapter(name: str, folder: Path, base_model, max_rank: int) -> AdapterInfo:
    """Validate the adapter in ``folder`` against ``base_model`` (a loaded HF model); AdapterError if unfit."""
    try:
        spec = read_spec(folder, trust_manifest=False)
    except AdapterSpecError as exc:  # name the file relative to the root: no server paths in answers
        where = exc.path.name if exc.path == folder else f"{folder.name}/{exc.path.name}"
        raise AdapterError(f"adapter {name!r}: {where}: {exc.problem}", status=422) from None
    if spec.kind == "pir":
        return _inspect_pir(name, folder, base_model, spec)
    if not spec.peft:
        raise AdapterError(f"adapter {name!r}: {folder.name}/ has no {ADAPTER_CONFIG} (PEFT) or "
                           f"{SPARSE_DELTA_CONFIG} (PIR); it is not an adapter", status=422)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f" it has {', '.join(pickled)}: pickle files can run code when loaded and are refused; re-save with "
                "save_pretrained(..., safe_serialization=True)") if pickled else ""
        raise AdapterError(f"adapter {name!r}: no {ADAPTER_WEIGHTS};{hint}", status=422)
    tensors = _read_tensors(name, weights)
    if spec.kind in ("lora", "dora"):
        _check_lora(name, spec, tensors, base_model, max_rank)
        return AdapterInfo(name, folder, "lora", spec.peft_type, spec.rank, {"dora": spec.kind == "dora"}, spec)
    if spec.kind == "ia3":
        _check_shapes_against_modules(name, tensors, base_model, ("ia3_l",))
        return AdapterInfo(name, folder, "ia3", spec.peft_type, spec=spec)
    # the kinds left are prompt learning (prompt tuning, P-tuning, prefix tuning)
    _check_prompt(name, spec, tensors, base_model)
    return AdapterInfo(name, folder, "prompt", spec.peft_type, None,
                       {"method": spec.kind, "num_virtual_tokens": spec.num_virtual_tokens}, spec)


def _read_tensors(name: str, weights: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: {weights.name} is not a readable safetensors file ({exc})",
                           status=422) from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise AdapterError(f"adapter {name!r}: non-finite values in {bad[:3]}; the adapter is corrupt", status=422)
    return tensors


def _module_of(key: str, marker: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` → ``model.layers.0.self_attn.q_proj``."""
    path = key.split(f".{marker}")[0]
    return path.removeprefix("base_model.model.")


def _base_module(name: str, base_model, module: str):
    try:
        return base_model.get_submodule(module)
    except AttributeError:
        raise AdapterError(f"adapter {name!r}: targets {module!r}, which the base model does not have; it was "
                           "trained on another architecture", status=422) from None


def _check_lora(name: str, spec: AdapterSpec, tensors: dict, base_model, max_rank: int) -> None:
    if spec.rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {spec.rank} exceeds the server's max_rank {max_rank}; raise "
                           "--max-rank or retrain with a smaller lora.r", status=422)
    for key, t in tensors.items():
        for marker, check in (("lora_A", lambda m, t: t.dim() == 2 and t.shape[1] == m.in_features
                                and t.shape[0] <= max_rank),
                              ("lora_B", lambda m, t: t.dim() == 2 and t.shape[0] == m.out_features
                                and t.shape[1] <= max_rank),
                              ("lora_magnitude_vector", lambda m, t: t.numel() == m.out_features)):  # DoRA
            if f".{marker}" in key:
                module = _base_module(name, base_model, _module_of(key, marker))
                base_layer = getattr(module, "base_layer", module)
                if not hasattr(base_layer, "in_features") or not check(base_layer, t):
                    raise AdapterError(f"adapter {name!r}: {key} has shape {tuple(t.shape)}, which does not fit "
                                       f"{_module_of(key, marker)} of the base; it was trained on another model",
                                       status=422)


def _check_shapes_against_modules(name: str, tensors: dict, base_model, markers: tuple[str, ...]) -> None:
    for key, t in tensors.items():
        for marker in markers:
            if f".{marker}" in key:
                module = _base_module(name, base_model, _module_of(key, marker))
                base_layer = getattr(module, "base_layer", module)
                if t.numel() not in (getattr(base_layer, "in_features", -1), getattr(base_layer, "out_features", -1)):
                    raise AdapterError(f"adapter {name!r}: {key} has shape {tuple(t.shape)}, which does not fit "
                                       f"{_module_of(key, marker)} of the base", status=422)


def _check_prompt(name: str, spec: AdapterSpec, tensors: dict, base_model) -> None:
    """The saved virtual tokens must fit the base: [V, hidden] (prompt, P-tuning) or, for a prefix,
    [V, layers * 2 * kv_heads * head_dim] (a key and a value per layer)."""
    cfg = base_model.config
    table = tensors.get("prompt_embeddings")
    if table is None or table.dim() != 2:
        raise AdapterError(f"adapter {name!r}: no prompt_embeddings table in {ADAPTER_WEIGHTS}", status=422)
    width = cfg.hidden_size
    if spec.kind == "prefix":
        layers, kv_heads, head_dim = kv_layout(cfg)
        width = layers * 2 * kv_heads * head_dim
    if table.shape[1] != width:
        raise AdapterError(f"adapter {name!r}: virtual tokens of width {table.shape[1]} do not fit this base "
                           f"(expected {width}); it was trained on another model", status=422)


def _inspect_pir(name: str, folder: Path, base_model, spec: AdapterSpec) -> AdapterInfo:
    if not (folder / SPARSE_DELTA_WEIGHTS).is_file():
        raise AdapterError(f"adapter {name!r}: sparse delta without {SPARSE_DELTA_WEIGHTS}", status=422)
    tensors = _read_tensors(name, folder / SPARSE_DELTA_WEIGHTS)
    for key, t in tensors.items():
        if key.endswith(".indices"):
            module = _base_module(name, base_model, key.rsplit(".", 1)[0])
            numel = getattr(module, "in_features", 0) * getattr(module, "out_features", 0)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= numel):
                raise AdapterError(f"adapter {name!r}: sparse delta indices of {key.rsplit('.', 1)[0]} fall outside "
                                   "its weight; it was trained on another model", status=422)
    return AdapterInfo(name, folder, "pir", None, spec=spec)
