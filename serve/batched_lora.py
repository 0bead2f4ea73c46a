"""Mixed-adapter LoRA in two matrix products per layer, whatever the number of adapters in the batch.

PEFT's mixed-batch forward loops over the adapters present, slicing and copying each one's rows
and running its A and B separately: with 8 adapters that is 8x the small-op count of one, and at
decode time (one token per row) small-op overhead is most of a LoRA layer's cost. Here each LoRA
layer keeps its loaded adapters concatenated, ``A_cat`` (sum of ranks x in) and ``B_cat`` (out x
sum of ranks, each adapter's scaling folded in), and computes for the whole batch

    result = base(x) + ((x @ A_cat.T) * row_mask) @ B_cat.T

where ``row_mask`` keeps, for each row, only its own adapter's rank slice (none for ``__base__``).
The concatenation is rebuilt after an adapter is loaded or deleted (:meth:`BatchedLora.refresh`);
masks are built once per step and shared by every layer with the same adapters. Layers whose
adapters use a PEFT variant (DoRA) or a LoRA bias keep PEFT's own path.
"""

from __future__ import annotations

import types
from functools import partial
from typing import Any


class BatchedLora:
    """Installs the two-product mixed-batch forward on every LoRA layer of a PEFT model."""

    def __init__(self, model) -> None:
        self.model = model
        self.version = 0
        self._masks: dict[tuple, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        """Call after loading or deleting an adapter: new layers get the fast path, concatenations rebuild."""
        from peft.tuners.lora import LoraLayer

        self.version += 1
        self._masks.clear()
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_edgetune_batched", False):
                module._edgetune_original = module._mixed_batch_forward
                module._mixed_batch_forward = types.MethodType(partial(_forward, self), module)
                module._edgetune_batched = True

    def mask(self, layout: tuple, adapter_names: tuple[str, ...]):
        """(rows x sum of ranks) 0/1 mask selecting each row's own adapter slice; None if no row uses one."""
        import torch

        key = (layout, adapter_names)
        if key not in self._masks:
            if len(self._masks) > 256:
                self._masks.clear()
            offsets, start = {}, 0
            for name, rank in layout:
                offsets[name] = (start, start + rank)
                start += rank
            mask = torch.zeros(len(adapter_names), start)
            for row, name in enumerate(adapter_names):
                if name in offsets:
                    mask[row, offsets[name][0]:offsets[name][1]] = 1.0
            self._masks[key] = mask if bool(mask.any()) else None
        return self._masks[key]


def _concatenated(batched: BatchedLora, layer):
    """(layout, A_cat, B_cat) of ``layer``'s serving adapters, rebuilt when the adapter set changed."""
    import torch

    cached = layer.__dict__.get("_edgetune_cat")
    if cached is not None and cached[0] == batched.version:
        return cached[1:]
    names = [n for n in layer.lora_A.keys() if not n.startswith("_")]  # "_shell" is never used by a request
    if any(n in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(n) for n in names):
        result = (None, None, None)
    elif not names:
        result = ((), None, None)
    else:
        a = torch.cat([layer.lora_A[n].weight for n in names], dim=0)
        b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in names], dim=1)
        result = (tuple((n, layer.lora_A[n].weight.shape[0]) for n in names), a.detach(), b.detach())
    layer.__dict__["_edgetune_cat"] = (batched.version, *result)
    return result


def _forward(batched: BatchedLora, layer, x, *args: Any, adapter_names: list[str], **kwargs: Any):
    layout, a, b = _concatenated(batched, layer)
    if layout is None:  # DoRA or LoRA bias: PEFT's per-adapter path
        return layer._edgetune_original(x, *args, adapter_names=adapter_names, **kwargs)
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    for key in VARIANT_KWARG_KEYS:
        kwargs.pop(key, None)
    result = layer.base_layer(x, *args, **kwargs)
    if not layout:
        return result
    mask = batched.mask(layout, tuple(adapter_names))
    if mask is None:
        return result
    h = x.to(a.dtype) @ a.T
    h = h * (mask[:, None, :] if h.dim() == 3 else mask)
    return result + (h @ b.T).to(result.dtype)
