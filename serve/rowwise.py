"""Adapters applied per batch row through hooks on the base's linear layers: IA3 and PIR.

IA3 rescales a layer's output (or, for feed-forward layers, its input) by a learned vector; a PIR
sparse delta adds ``x @ ΔWᵀ`` with ``ΔW`` sparse. Neither is a LoRA, so the LoRA path cannot mix
them into a batch; here each hooked linear layer looks at which row uses which adapter in the
current forward (:attr:`RowAdapters.rows`, set by the engine around every forward) and applies
only those rows' adapters. Hooks sit on the innermost base linear layer, so a module that PEFT
wraps for a LoRA adapter later keeps them. Adapter tensors live on the model's device: IA3 vectors in
the model's dtype, PIR deltas in float32 (a sparse product is computed in float32, then cast).
"""

from __future__ import annotations

from typing import Any


class RowAdapters:
    """Per-row IA3 vectors and PIR deltas, keyed by an internal adapter name."""

    def __init__(self, model, device, dtype) -> None:
        """Hooks for ``model``, whose layers run on ``device`` in ``dtype`` (``torch.device``, ``torch.dtype``)."""
        self.model = model
        self.device, self.dtype = device, dtype
        self.rows: list[str | None] | None = None
        """Per row of the running forward: the row-wise adapter it uses (None: none)."""
        self.adapters: dict[str, dict[int, tuple[str, Any]]] = {}  # internal -> id(linear layer) -> (kind, tensor)
        self._hooked: set[int] = set()
        self._groups: tuple[Any, dict[str, Any]] = (None, {})  # rows -> {internal: row indices}, per forward

    def add(self, internal: str, kind: str, tensors: dict[str, Any], feedforward: set[str] | None = None) -> None:
        """Register adapter ``internal``: ``kind`` ``ia3`` ({module: vector}) or ``pir`` ({module: (indices, values)}).

        ``feedforward``: the IA3 modules (full paths, as in ``tensors``) whose input, not output, is scaled."""
        import torch

        per_module = {}
        for module_name, value in tensors.items():
            layer = self._linear(module_name)
            if kind == "ia3":
                role = "ia3_in" if module_name in (feedforward or set()) else "ia3_out"
                per_module[id(layer)] = (role, value.flatten().to(self.device, self.dtype))
            else:  # sizes from the layer, not its weight: a 4-bit weight is stored packed
                indices, values = value
                out_features, in_features = layer.out_features, layer.in_features
                coords = torch.stack([indices // in_features, indices % in_features])
                delta = torch.sparse_coo_tensor(coords, values.float(), (out_features, in_features))
                per_module[id(layer)] = ("pir", delta.coalesce().to(self.device))
            self._hook(layer)
        self.adapters[internal] = per_module

    def remove(self, internal: str) -> None:
        self.adapters.pop(internal, None)

    def _linear(self, module_name: str):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        module = base.get_submodule(module_name)
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def _hook(self, layer) -> None:
        if id(layer) in self._hooked:
            return
        layer.register_forward_pre_hook(self._pre)
        layer.register_forward_hook(self._post)
        self._hooked.add(id(layer))

    def _row_groups(self, layer, role: str):
        """(adapter tensor, row indices) for each adapter of ``role`` used by some row at ``layer``."""
        import torch

        rows = self.rows
        if not rows:
            return []
        if self._groups[0] is not rows:  # row indices per adapter: once per forward, not once per layer
            by_adapter = {a: torch.tensor([i for i, r in enumerate(rows) if r == a], device=self.device)
                          for a in set(rows) if a}
            self._groups = (rows, by_adapter)
        groups = []
        for internal, index in self._groups[1].items():
            entry = self.adapters.get(internal, {}).get(id(layer))
            if entry is not None and (entry[0] == role or (role == "out" and entry[0] in ("ia3_out", "pir"))):
                groups.append((entry, index))
        return groups

    def _pre(self, layer, args):
        groups = self._row_groups(layer, "ia3_in")
        if not groups:
            return None
        x = args[0].clone()
        for (_, vector), index in groups:
            x[index] = x[index] * vector.to(x.dtype)
        return (x, *args[1:])

    def _post(self, layer, args, output):
        import torch

        groups = self._row_groups(layer, "out")
        if not groups:
            return None
        output = output.clone()
        for (role, tensor), index in groups:
            if role == "ia3_out":
                output[index] = output[index] * tensor.to(output.dtype)
            else:  # pir: x @ ΔWᵀ for these rows
                x = args[0][index]
                flat = x.reshape(-1, x.shape[-1]).float()
                delta = torch.sparse.mm(tensor, flat.T).T.reshape(*x.shape[:-1], tensor.shape[0])
                output[index] = output[index] + delta.to(output.dtype)
        return output
