"""Mixed-adapter LoRA in two matrix products per layer, whatever the number of adapters in the batch.

PEFT's mixed-batch forward loops over the adapters present, slicing and copying each one's rows
and running its A and B separately: with 8 adapters that is 8x the small-op count of one, and at
decode time (one token per row) small-op overhead is most of a LoRA layer's cost. Here each LoRA
layer keeps its loaded adapters concatenated, ``A_cat`` (sum of ranks x in) and ``B_cat`` (out x
sum of ranks, each adapter's scaling folded in), and computes for the whole batch

    result = base(x) + where(row_mask, x @ A_cat.T, 0) @ B_cat.T

where ``row_mask`` keeps, for each row, only its own adapter's rank slice (none for ``__base__``). It
selects rather than multiplies by 0, so another adapter's values can never reach a row (0 * inf is NaN);
its B must be finite, which intake guarantees (:data:`serve.adapters.VALUE_BOUND`).
Plain LoRA adapters need no PEFT modules at all: :meth:`BatchedLora.add` keeps their factors on the
layers PEFT already wraps (the engine's shell wraps every linear layer), which makes a load a few tensor
copies instead of PEFT's injection (hundreds of module constructions and model walks). Their rows reach
the layers through :attr:`BatchedLora.rows`, which the engine sets around each forward instead of passing
PEFT's ``adapter_names`` (whose hooks cost two walks over every module per call). The concatenation is rebuilt after an adapter is loaded or deleted (:meth:`BatchedLora.refresh`);
masks are built once per step and shared by every layer with the same adapters. DoRA rows (which
PEFT cannot mix into a batch at all) get their per-output magnitude factor on top. Layers with
another PEFT variant or a LoRA bias keep PEFT's own path. Masks are boolean, made on the model's device.
"""

from __future__ import annotations

import types
from functools import partial
from typing import Any


class BatchedLora:
    """Installs the two-product mixed-batch forward on every LoRA layer of a PEFT model."""

    def __init__(self, model, device) -> None:
        """Install on ``model`` (a PeftModel) whose LoRA layers run on ``device`` (a ``torch.device``)."""
        self.model = model
        self.device = device
        self.version = 0
        self.fast: set[str] = set()
        """Adapters held by :meth:`add` (not PEFT's): the engine shows their rows to PEFT as ``__base__``."""
        self.rows: tuple[str, ...] | None = None
        """Per row of the running forward, the adapter it uses (PEFT's or :meth:`add`'s; set by the engine)."""
        self._masks: dict[tuple, Any] = {}
        self.refresh()

    def add(self, name: str, factors: dict[Any, tuple[Any, Any]]) -> None:
        """Hold plain LoRA adapter ``name``: {PEFT LoRA layer: (A [r, in], B [out, r] with its scaling folded
        in)}, already in the layers' dtype and device. Call :meth:`refresh` after."""
        for layer, pair in factors.items():
            layer.__dict__.setdefault("_edgetune_fast", {})[name] = pair
        self.fast.add(name)

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` held by :meth:`add` (a no-op for others). Call :meth:`refresh` after."""
        from peft.tuners.lora import LoraLayer

        if name not in self.fast:
            return
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.__dict__.get("_edgetune_fast", {}).pop(name, None)
        self.fast.discard(name)

    def refresh(self) -> None:
        """Call after loading or deleting an adapter: new layers get the fast path, concatenations rebuild."""
        from peft.tuners.lora import LoraLayer

        self.version += 1
        self._masks.clear()
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_edgetune_batched", False):
                module._edgetune_original = module._mixed_batch_forward
                module._mixed_batch_forward = types.MethodType(partial(_forward, self), module)
                module._edgetune_forward = module.forward
                module.forward = types.MethodType(partial(_layer_forward, self), module)
                module._check_forward_args = types.MethodType(partial(_check_args, module._check_forward_args),
                                                              module)
                module._edgetune_batched = True

    def row_factors(self, layout: tuple, adapter_names: tuple[str, ...], scales):
        """(rows x out) DoRA factors per row: its adapter's row of ``scales``, ones for base rows."""
        import torch

        key = ("slots", layout, adapter_names)
        if key not in self._masks:
            self._masks[key] = _row_slots(layout, adapter_names).to(self.device)
        table = torch.cat([scales, scales.new_ones(1, scales.shape[1])])
        return table[self._masks[key]]

    def mask(self, layout: tuple, adapter_names: tuple[str, ...]):
        """(mask, lo, hi): the concatenated ranks ``lo .. hi - 1`` the batch's adapters span (the others are not
        computed: the cost follows the adapters in the batch, not those loaded) and the (rows x (hi - lo))
        boolean mask selecting each row's own slice of them; None if no row uses one."""
        import torch

        key = (layout, adapter_names)
        if key not in self._masks:
            if len(self._masks) > 256:
                self._masks.clear()
            offsets, start = {}, 0
            for name, rank in layout:
                offsets[name] = (start, start + rank)
                start += rank
            used = [offsets[n] for n in set(adapter_names) if n in offsets]
            if not used:
                self._masks[key] = None
            else:
                lo, hi = min(u[0] for u in used), max(u[1] for u in used)
                mask = torch.zeros(len(adapter_names), hi - lo, dtype=torch.bool)
                for row, name in enumerate(adapter_names):
                    if name in offsets:
                        mask[row, offsets[name][0] - lo:offsets[name][1] - lo] = True
                # built on the CPU (row by row), moved once: one copy per new batch layout, not per layer
                self._masks[key] = (mask.to(self.device), lo, hi)
        return self._masks[key]


def _check_args(original, layer, x, *args: Any, **kwargs: Any) -> None:
    """PEFT's argument checks, except its refusal of DoRA in mixed batches (handled here): DoRA
    adapters are shown to it as ``__base__`` rows, so its other checks (row count, merged) still run."""
    names = kwargs.get("adapter_names")
    if names is not None:
        dora = getattr(layer, "lora_variant", {})
        kwargs = {**kwargs, "adapter_names": ["__base__" if n in dora else n for n in names]}
    return original(x, *args, **kwargs)


def _row_slots(layout: tuple, adapter_names: tuple[str, ...]):
    """Index of each row's adapter in ``layout`` (len(layout) for base rows and absent adapters)."""
    import torch

    where = {name: i for i, (name, _) in enumerate(layout)}
    return torch.tensor([where.get(n, len(layout)) for n in adapter_names])


def _concatenated(batched: BatchedLora, layer):
    """(layout, A_cat, B_cat, dora_scales) of ``layer``'s serving adapters, rebuilt when the adapter set changed.

    ``dora_scales`` (adapters x out, or None when no adapter is DoRA) holds DoRA's per-output factor
    ``magnitude / ||W + s·B·A||`` for DoRA adapters and 1 for plain LoRA ones: a DoRA row's output is
    that factor times (W x + s·B·A x), plus the bias, exactly PEFT's DoRA forward.
    """
    import torch

    cached = layer.__dict__.get("_edgetune_cat")
    if cached is not None and cached[0] == batched.version:
        return cached[1:]
    names = [n for n in layer.lora_A.keys() if not n.startswith("_")]  # "_shell" is never used by a request
    fast = layer.__dict__.get("_edgetune_fast", {})
    variants = getattr(layer, "lora_variant", {})
    dora = [n for n in names if n in variants]
    weight = _dense_weight(layer.get_base_layer()) if dora else None
    unsupported = any(type(variants[n]).__name__ != "DoraLinearVariant" for n in dora) or (
        dora and (weight is None or weight.dim() != 2))
    if unsupported or any(getattr(layer, "lora_bias", {}).get(n) for n in names):
        result = (None, None, None, None)
    elif not names and not fast:
        result = ((), None, None, None)
    else:
        with torch.no_grad():
            a = torch.cat([layer.lora_A[n].weight for n in names] + [f[0] for f in fast.values()], dim=0)
            b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in names] + [f[1] for f in fast.values()],
                          dim=1)
            scales = None
            if dora:
                rows = []
                for n in names:
                    if n in dora:
                        full = weight + layer.scaling[n] * (layer.lora_B[n].weight @ layer.lora_A[n].weight)
                        rows.append(layer.lora_magnitude_vector[n].weight / full.norm(p=2, dim=1))
                    else:
                        rows.append(weight.new_ones(weight.shape[0]))
                rows += [weight.new_ones(weight.shape[0]) for _ in fast]
                scales = torch.stack(rows)
        result = (tuple((n, layer.lora_A[n].weight.shape[0]) for n in names)
                  + tuple((n, f[0].shape[0]) for n, f in fast.items()), a, b, scales)
    layer.__dict__["_edgetune_cat"] = (batched.version, *result)
    return result


def _dense_weight(base_layer):
    """``base_layer``'s weight as a floating matrix for DoRA's norms: a bitsandbytes int8 or NF4 weight is
    dequantized into a new tensor, its layer's state untouched (PEFT's own dequantization rewrites an int8
    layer's state on the CPU, and the layer's next matmul then fails). None for a weight of another kind."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or weight.is_floating_point():
        return weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":  # row-wise absmax scales: on the weight until its first matmul, then on the state
        scale = getattr(weight, "SCB", None)
        if scale is None:
            scale = getattr(getattr(base_layer, "state", None), "SCB", None)
        return None if scale is None else weight.data.float() * (scale.float().view(-1, 1) / 127.0)
    return None


def _layer_forward(batched: BatchedLora, layer, x, *args: Any, **kwargs: Any):
    """A LoRA layer's forward: with :attr:`BatchedLora.rows` set (the engine's forwards), the mixed-batch forward
    for those rows directly. PEFT would reach it through forward hooks it registers on every call, after two
    walks over all of the model's modules: a third of a 135M model's batch-1 decode step on a CPU."""
    if batched.rows is None or "adapter_names" in kwargs:  # anyone else: PEFT's own forward
        return layer._edgetune_forward(x, *args, **kwargs)
    names = ["__base__" if n in batched.fast else n for n in batched.rows]
    return _forward(batched, layer, x, *args, adapter_names=names, **kwargs)


def _forward(batched: BatchedLora, layer, x, *args: Any, adapter_names: list[str], **kwargs: Any):
    layout, a, b, scales = _concatenated(batched, layer)
    rows = batched.rows if batched.rows is not None and len(batched.rows) == len(adapter_names) else adapter_names
    if layout is None:  # a LoRA bias or another variant: PEFT's per-adapter path, plus the rows of add()'s adapters
        return layer._edgetune_original(x, *args, adapter_names=adapter_names, **kwargs) + _fast_delta(layer, x, rows)
    adapter_names = rows
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    for key in VARIANT_KWARG_KEYS:
        kwargs.pop(key, None)
    result = layer.base_layer(x, *args, **kwargs)
    if not layout:
        return result
    selected = batched.mask(layout, tuple(adapter_names))
    if selected is None:
        return result
    import torch

    mask, lo, hi = selected
    h = x.to(a.dtype) @ a[lo:hi].T
    h = torch.where(mask[:, None, :] if h.dim() == 3 else mask, h, h.new_zeros(()))
    delta = (h @ b[:, lo:hi].T).to(result.dtype)
    if scales is None:
        return result + delta
    factor = batched.row_factors(layout, tuple(adapter_names), scales)  # rows x out; 1 for base/LoRA rows
    if result.dim() == 3:
        factor = factor[:, None, :]
    bias = getattr(layer.get_base_layer(), "bias", None)
    if bias is None:
        return (result + delta) * factor
    return (result - bias + delta) * factor + bias


def _fast_delta(layer, x, rows):
    """The LoRA update of the rows whose adapter :meth:`BatchedLora.add` holds, 0 for the others (rows x ... x out)."""
    import torch

    fast = layer.__dict__.get("_edgetune_fast", {})
    delta = None
    for name, (a, b) in fast.items():
        picked = torch.tensor([r == name for r in rows], device=x.device)
        if not bool(picked.any()):
            continue
        part = (x.to(a.dtype) @ a.T) @ b.T
        part = torch.where(picked.view(-1, *([1] * (part.dim() - 1))), part, part.new_zeros(()))
        delta = part if delta is None else delta + part
    return 0 if delta is None else delta
