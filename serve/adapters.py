"""What the server may load as an adapter, checked before any of it touches the model.

An adapter is named by the client but always lives under the configured adapter root: a name
with a path separator or ``..`` is refused, and the resolved folder, and every file in it that is a
symlink, must stay inside the root. Only safetensors weights load; a pickle ``.bin`` is refused with the
fix. Its config and every tensor are validated against the base so a bad adapter is a clear 4xx and never
a crash mid-request, nor a change to anyone else's answers: only the tensors its spec declares (no base
weight, no unexpected key), each of the shape its layer and rank need, values finite and within
:data:`VALUE_BOUND` after scaling, virtual tokens that leave room in the context.

What the folder is comes from :func:`pipeline.adapter_spec.read_spec` on its files (never on a
manifest a client could have written: the server loads what PEFT reads). Server kinds: ``lora``
(LoRA, DoRA, QLoRA adapters: PEFT ``LORA``), ``ia3``, ``prompt`` (PEFT prompt tuning, P-tuning,
prefix tuning) and ``pir`` (edgetune's sparse delta).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.adapter_spec import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_CHANGING_OPTIONS,
    SPARSE_DELTA_CONFIG,
    SPARSE_DELTA_WEIGHTS,
    AdapterSpec,
    AdapterSpecError,
    kv_layout,
    read_spec,
)
from pipeline.errors import EdgetuneError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SOURCE = 255
"""The longest adapter source (a path relative to the root) accepted."""
VALUE_BOUND = 1e4
"""The largest magnitude any adapter value may have after the scaling the server applies (LoRA's B times
alpha / r; IA3 vectors, DoRA magnitudes, PIR values, virtual tokens as they are). Trained adapters stay
around 1 (the strongest test adapters below 1e3). The bound keeps every product an adapter adds finite in
float32 and bfloat16 for any realistic layer: |x @ A.T @ (s B).T| <= |x| * fan_in * r * VALUE_BOUND**2, about
1e20 for activations of 1e3, a fan-in of 1e4 and rank 1e2, far below their range (3.4e38). Isolation between
rows does not rest on it: the mixed-batch LoRA layer selects each row's slice rather than multiplying by 0."""


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
    tensors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The validated weights (set by :func:`inspect_adapter`): what the torch engine loads, never the files again
    (a file changed after validation cannot slip in); the engine drops them once loaded."""


def check_name(name: Any) -> str:
    """``name`` if it is a plain adapter name (letters, digits, ``_.-``, at most 64), else AdapterError."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise AdapterError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
                           "without '..' or path separators")
    return name


def resolve_source(root: Path, source: Any) -> Path:
    """The folder ``source`` names under ``root``: a plain name or a relative path that stays inside it, as
    does every symlink among its files. AdapterError (4xx) for anything else, a link loop included."""
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE or not source.isprintable():
        shown = source[:40] + "..." if isinstance(source, str) and len(source) > 40 else source
        raise AdapterError(f"adapter source {shown!r} must be a folder name of 1-{MAX_SOURCE} printable "
                           "characters (no control characters or NUL bytes)")
    if source.startswith(("/", "\\")) or "\\" in source or ".." in Path(source).parts or "~" in source:
        raise AdapterError(f"adapter source {source!r} must be a folder relative to the adapter root, without "
                           "'..' or an absolute path")
    root = Path(root).resolve()
    try:
        folder = (root / source).resolve(strict=True)
    except FileNotFoundError:
        raise AdapterError(f"adapter source {source!r} is not a folder under the adapter root", status=404) from None
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13), a name too long
        raise AdapterError(f"adapter source {source!r} cannot be resolved ({_why(exc)}); refused",
                           status=422) from None
    if not folder.is_relative_to(root):
        raise AdapterError(f"adapter source {source!r} leaves the adapter root (through a link?); refused")
    if not folder.is_dir():
        raise AdapterError(f"adapter source {source!r} is not a folder under the adapter root", status=404)
    _check_links(root, folder, source)
    return folder


def _why(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == 40:  # ELOOP
        return "a symlink loop"
    return getattr(exc, "strerror", None) or type(exc).__name__


def _check_links(root: Path, folder: Path, source: str) -> None:
    """Every entry of ``folder`` that is a symlink must resolve inside ``root`` (the README's promise covers
    files, not only the folder): AdapterError 422 naming the file otherwise."""
    with os.scandir(folder) as entries:
        links = [Path(e.path) for e in entries if e.is_symlink()]
    for link in links:
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise AdapterError(f"adapter source {source!r}: {link.name} is a symlink that cannot be followed "
                               f"({_why(exc) if not isinstance(exc, FileNotFoundError) else 'dangling'}); refused",
                               status=422) from None
        if not target.is_relative_to(root):
            raise AdapterError(f"adapter source {source!r}: {link.name} is a symlink that leaves the adapter root; "
                               "refused (copy the file into the adapter's folder)", status=422)


def inspect_adapter(name: str, folder: Path, base_model, max_rank: int, *,
                    context_length: int | None = None) -> AdapterInfo:
    """Validate the adapter in ``folder`` against ``base_model`` (a loaded HF model); AdapterError (422) if unfit.

    Accepted are exactly the tensors the adapter's spec declares, each of the shape its layer and rank need and
    within :data:`VALUE_BOUND` after scaling; anything else is refused naming the key. The returned info holds
    those tensors: the engine loads them, never the files again. ``context_length`` (default: the base's
    ``max_position_embeddings``) bounds a prompt-learning adapter's virtual tokens."""
    try:
        return _inspect(name, folder, base_model, max_rank, context_length)
    except AdapterError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, IndexError, OverflowError, re.error) as exc:
        # a file the checks above did not foresee: the client's fault, named without server paths
        log.warning("adapter %s: unreadable (%r)", name, exc)
        raise AdapterError(f"adapter {name!r}: its files cannot be read as an adapter ({type(exc).__name__}); "
                           "re-save it with save_pretrained", status=422) from None


def _inspect(name: str, folder: Path, base_model, max_rank: int, context_length: int | None) -> AdapterInfo:
    try:
        spec = read_spec(folder, trust_manifest=False)
    except AdapterSpecError as exc:  # name the file relative to the root: no server paths in answers
        where = exc.path.name if exc.path == folder else f"{folder.name}/{exc.path.name}"
        raise AdapterError(f"adapter {name!r}: {where}: {exc.problem}", status=422) from None
    if spec.base_changes:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} sets {', '.join(spec.base_changes)}, which "
                           f"{'; '.join(BASE_CHANGING_OPTIONS.get(c, 'trains the base biases') for c in spec.base_changes)}: "
                           "a served adapter may only add its own weights; retrain without it", status=422)
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
        return AdapterInfo(name, folder, "lora", spec.peft_type, spec.rank, {"dora": spec.kind == "dora"}, spec,
                           tensors)
    if spec.kind == "ia3":
        _check_ia3(name, spec, tensors, base_model)
        return AdapterInfo(name, folder, "ia3", spec.peft_type, spec=spec, tensors=tensors)
    # the kinds left are prompt learning (prompt tuning, P-tuning, prefix tuning)
    _check_prompt(name, spec, tensors, base_model, context_length)
    return AdapterInfo(name, folder, "prompt", spec.peft_type, None,
                       {"method": spec.kind, "num_virtual_tokens": spec.num_virtual_tokens}, spec, tensors)



def declared(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``module`` (a dotted path in the base) is one ``patterns`` names, as PEFT matches
    ``target_modules``: one string is a regular expression over the whole path (``all-linear``: every linear
    layer but the output head), a list names paths or their last parts."""
    if len(patterns) == 1 and patterns[0] == "all-linear":
        return not module.endswith("lm_head")
    if len(patterns) == 1 and not re.fullmatch(r"[\w.]+", patterns[0]):  # a regular expression
        return re.fullmatch(patterns[0], module) is not None
    return any(module == p or module.endswith(f".{p}") for p in patterns)


def _read_tensors(name: str, weights: Path) -> dict[str, Any]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:200]
        raise AdapterError(f"adapter {name!r}: {weights.name} is not a readable safetensors file ({reason})",
                           status=422) from None
    floats = [t.reshape(-1).float() for t in tensors.values() if t.is_floating_point()]
    # A NaN or an infinity makes the sum of everything non-finite: one fast pass (hundreds of per-tensor checks
    # cost tens of milliseconds of a hot load). Huge finite values can overflow it too: then look tensor by tensor.
    if floats and not math.isfinite(float(torch.cat(floats).sum())):
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise AdapterError(f"adapter {name!r}: non-finite values in {bad[:3]}; the adapter is corrupt",
                               status=422)
    return tensors


def _refuse(name: str, key: str, problem: str) -> AdapterError:
    return AdapterError(f"adapter {name!r}: tensor {key[:200]!r} {problem}", status=422)


def _linear(name: str, base_model, module: str, key: str):
    """The base's linear layer at ``module`` (inside any PEFT wrapper); AdapterError if there is none."""
    try:
        layer = base_model.get_submodule(module)
    except AttributeError:
        raise _refuse(name, key, f"targets {module!r}, which the base model does not have; it was trained on "
                                 "another architecture") from None
    layer = getattr(layer, "base_layer", layer)
    if not (isinstance(getattr(layer, "in_features", None), int) and isinstance(getattr(layer, "out_features", None),
                                                                                 int)):
        raise _refuse(name, key, f"targets {module!r}, which is not a linear layer of the base")
    return layer


def _bounded(name: str, key: str, t, scale: float = 1.0) -> None:
    """``t`` is floating point and ``|t| * scale <= VALUE_BOUND``."""
    if not t.is_floating_point():
        raise _refuse(name, key, f"holds {str(t.dtype).removeprefix('torch.')} values; adapter weights are "
                                 "floating point")
    peak = float(t.abs().max()) * abs(scale) if t.numel() else 0.0
    if not peak <= VALUE_BOUND:
        raise _refuse(name, key, f"holds values up to {peak:.3g} after scaling, beyond the server's bound "
                                 f"{VALUE_BOUND:g}; a trained adapter stays far below it: it is corrupt")


def _split(name: str, key: str, parts: tuple[str, ...], prefix: str = "base_model.model.") -> tuple[str, str]:
    """(module, part) of ``key`` = ``prefix`` + module + ``.`` + one of ``parts``; AdapterError otherwise."""
    for part in parts:
        if key.startswith(prefix) and key.endswith(f".{part}") and len(key) > len(prefix) + len(part) + 1:
            return key[len(prefix):-len(part) - 1], part
    raise _refuse(name, key, f"is not one this adapter declares (expected {prefix}<target module>."
                             f"{{{', '.join(parts)}}}); a file that also carries other weights (of the base?) is "
                             "refused")


def _check_lora(name: str, spec: AdapterSpec, tensors: dict, base_model, max_rank: int) -> None:
    """Only ``lora_A``/``lora_B`` (and DoRA's magnitude) of declared linear targets, shaped [r, in], [out, r]
    (and [out]) with one r <= max_rank per module, values within the bound after LoRA's scaling."""
    if spec.rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {spec.rank} exceeds the server's max_rank {max_rank}; raise "
                           "--max-rank or retrain with a smaller lora.r", status=422)
    if not spec.targets:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} names no target_modules; name them", status=422)
    parts = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if spec.kind == "dora" else ())
    modules: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        module, part = _split(name, key, parts)
        if not declared(module, spec.targets):
            raise _refuse(name, key, f"adapts {module!r}, which target_modules in {ADAPTER_CONFIG} does not name")
        modules.setdefault(module, {})[part] = (key, t, _linear(name, base_model, module, key))
    alphas = [abs(a) for a in (spec.alpha if spec.alpha is not None else _PEFT_DEFAULT_ALPHA,
                               *(a for _, a in spec.alpha_pattern))]
    for module, found in modules.items():
        if "lora_A.weight" not in found or "lora_B.weight" not in found:
            key = next(iter(found.values()))[0]
            raise _refuse(name, key, f"has no {'lora_B' if 'lora_A.weight' in found else 'lora_A'} beside it")
        (a_key, a, layer), (b_key, b, _) = found["lora_A.weight"], found["lora_B.weight"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if not (a.dim() == 2 and a.shape[1] == layer.in_features and 1 <= rank <= max_rank):
            raise _refuse(name, a_key, f"has shape {tuple(a.shape)}, which does not fit {module} of the base "
                                       f"([rank <= {max_rank}, {layer.in_features}]); it was trained on another model")
        if tuple(b.shape) != (layer.out_features, rank):
            raise _refuse(name, b_key, f"has shape {tuple(b.shape)}, which does not fit {module} of the base "
                                       f"({layer.out_features}, {rank}); it was trained on another model")
        scaling = max(alphas) / (math.sqrt(rank) if spec.rslora else rank)
        _bounded(name, a_key, a)
        _bounded(name, b_key, b, scaling)  # the batched layer holds B * scaling
        if "lora_magnitude_vector" in found:
            m_key, magnitude, _ = found["lora_magnitude_vector"]
            if tuple(magnitude.shape) != (layer.out_features,):
                raise _refuse(name, m_key, f"has shape {tuple(magnitude.shape)}, which does not fit {module} of "
                                           f"the base ({layer.out_features},)")
            _bounded(name, m_key, magnitude)


_PEFT_DEFAULT_ALPHA = 8
"""PEFT's ``lora_alpha`` when a config gives none."""


def _check_ia3(name: str, spec: AdapterSpec, tensors: dict, base_model) -> None:
    """Only ``ia3_l`` vectors of declared linear targets: [1, in] for a feed-forward module (its input is
    scaled), [out, 1] for the others (their output is), within the bound."""
    if not spec.targets:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} names no target_modules; name them", status=422)
    for key, t in tensors.items():
        module, _ = _split(name, key, ("ia3_l",))
        if not declared(module, spec.targets):
            raise _refuse(name, key, f"scales {module!r}, which target_modules in {ADAPTER_CONFIG} does not name")
        layer = _linear(name, base_model, module, key)
        feedforward = declared(module, spec.feedforward_modules) if spec.feedforward_modules else False
        want = (1, layer.in_features) if feedforward else (layer.out_features, 1)
        if tuple(t.shape) != want:
            raise _refuse(name, key, f"has shape {tuple(t.shape)}; {module} scales its "
                                     f"{'input' if feedforward else 'output'}, so it must be {want}")
        _bounded(name, key, t)


def _check_prompt(name: str, spec: AdapterSpec, tensors: dict, base_model, context_length: int | None) -> None:
    """One ``prompt_embeddings`` table of [virtual tokens, hidden] (prompt, P-tuning) or, for a prefix,
    [virtual tokens, layers * 2 * kv_heads * head_dim] (a key and a value per layer), within the bound, its
    virtual tokens leaving room in the context for a prompt token and an answer token."""
    cfg = base_model.config
    context = context_length or getattr(cfg, "max_position_embeddings", None) or 2048
    virtual = spec.num_virtual_tokens
    if virtual + 2 > context:
        raise AdapterError(f"adapter {name!r}: {virtual} virtual tokens leave no room in the context of "
                           f"{context} tokens for a prompt and an answer; retrain with fewer", status=422)
    unexpected = [k for k in tensors if k != "prompt_embeddings"]
    if unexpected:
        raise _refuse(name, unexpected[0], "is not one this adapter declares (a prompt-learning adapter holds only "
                                           "prompt_embeddings)")
    table = tensors.get("prompt_embeddings")
    if table is None or table.dim() != 2:
        raise AdapterError(f"adapter {name!r}: no prompt_embeddings table in {ADAPTER_WEIGHTS}", status=422)
    width = cfg.hidden_size
    if spec.kind == "prefix":
        layers, kv_heads, head_dim = kv_layout(cfg)
        width = layers * 2 * kv_heads * head_dim
    if tuple(table.shape) != (virtual, width):
        raise AdapterError(f"adapter {name!r}: its virtual-token table has shape {tuple(table.shape)}, not "
                           f"({virtual}, {width}) as its config and this base need; it was trained on another "
                           "model", status=422)
    _bounded(name, "prompt_embeddings", table)


def _inspect_pir(name: str, folder: Path, base_model, spec: AdapterSpec) -> AdapterInfo:
    """Per module of its config: ``<module>.indices`` (integers inside the weight) and ``<module>.values`` (as
    many, within the bound); nothing else."""
    if not (folder / SPARSE_DELTA_WEIGHTS).is_file():
        raise AdapterError(f"adapter {name!r}: sparse delta without {SPARSE_DELTA_WEIGHTS}", status=422)
    tensors = _read_tensors(name, folder / SPARSE_DELTA_WEIGHTS)
    modules: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, t in tensors.items():
        module, part = _split(name, key, ("indices", "values"), prefix="")
        if module not in spec.targets:
            raise _refuse(name, key, f"changes {module!r}, which {SPARSE_DELTA_CONFIG} does not list")
        modules.setdefault(module, {})[part] = (key, t)
    for module, found in modules.items():
        if len(found) != 2:
            key = next(iter(found.values()))[0]
            raise _refuse(name, key, f"has no {'values' if 'indices' in found else 'indices'} beside it")
        (i_key, indices), (v_key, values) = found["indices"], found["values"]
        layer = _linear(name, base_model, module, i_key)
        numel = layer.in_features * layer.out_features
        if indices.is_floating_point() or indices.is_complex() or indices.dim() != 1:
            raise _refuse(name, i_key, "must be a 1-D tensor of integers")
        if tuple(values.shape) != tuple(indices.shape):
            raise _refuse(name, v_key, f"has shape {tuple(values.shape)}, not {tuple(indices.shape)} like its indices")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise _refuse(name, i_key, f"falls outside the weight of {module} ({numel} entries); it was trained "
                                       "on another model")
        _bounded(name, v_key, values)
    return AdapterInfo(name, folder, "pir", None, spec=spec, tensors=tensors)
