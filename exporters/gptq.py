"""Calibrated 4-bit weights: GPTQ on the PyTorch model, written into ONNX ``MatMulNBits`` blocks.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al., 2022) rounds the input
columns of a weight matrix one at a time and moves each column's rounding error onto the columns
not yet rounded, weighted by the inverse Hessian ``H = Σ x xᵀ`` of the layer's inputs on
calibration text, so the layer's *outputs* on that text move as little as possible. The
calibration text is the task's own training rows (never its test rows); the edge bundle's shared
base is calibrated on every task's.

The result has exactly RTN's layout: per block of ``block_size`` input weights one fp32 scale and
one 4-bit zero point, codes 0..15 (``w ≈ (q - zero) · scale``). So the ONNX graph, its size and
its speed are those of the round-to-nearest export; only the initializers' values differ.
:func:`apply_to_onnx` overwrites them in a model that ONNX Runtime's ``MatMulNBitsQuantizer`` has
quantized, matching each ``MatMulNBits`` node to its PyTorch ``nn.Linear`` by name
(``/model/layers.0/self_attn/q_proj/MatMul_Q4`` ↔ ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["BlockQuantized", "apply_to_onnx", "calibration_hessians", "gptq", "gptq_batch", "gptq_bnb_4bit", "gptq_layers", "node_module", "pack",
           "round_to_nearest"]


@dataclass(frozen=True)
class BlockQuantized:
    """A ``[N, K]`` weight (PyTorch ``nn.Linear`` layout: outputs × inputs) in 4-bit blocks along K.

    ``codes`` uint8 ``[N, K]`` in 0..15; ``scales`` float32 and ``zeros`` uint8 ``[N, K // block]``.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    @property
    def block_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        b = self.block_size
        expand = lambda a: np.repeat(a.astype(np.float32), b, axis=1)  # noqa: E731
        return (self.codes.astype(np.float32) - expand(self.zeros)) * expand(self.scales)


def _grid(w, maxq: int = 15):
    """Asymmetric scale and zero point per row of ``w`` ([N, block]), the range widened to hold 0
    (as ONNX Runtime's and GPTQ's reference quantizers do, so an all-zero block stays exact: scale 0,
    zero point 0, as ONNX Runtime writes it)."""
    import torch

    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    scale = (hi - lo) / maxq
    zero = torch.clamp(torch.round(-lo / _safe(scale)), 0, maxq)
    return scale, zero


def _safe(scale):
    """The divisor for ``scale``: 1 where a block is all zeros (its codes are then its zero point)."""
    import torch

    return torch.where(scale == 0, torch.ones_like(scale), scale)


def round_to_nearest(weight, block_size: int) -> BlockQuantized:
    """Plain round-to-nearest in the same layout (the baseline, and the reference the packing is tested on)."""
    import torch

    w = torch.as_tensor(weight, dtype=torch.float32)
    n, k = w.shape
    blocks = w.reshape(n * (k // block_size), block_size)
    scale, zero = _grid(blocks)
    codes = torch.clamp(torch.round(blocks / _safe(scale)[:, None]) + zero[:, None], 0, 15)
    return BlockQuantized(codes.reshape(n, k).to(torch.uint8).numpy(), scale.reshape(n, -1).numpy(),
                          zero.reshape(n, -1).to(torch.uint8).numpy())


def gptq(weight, hessian, block_size: int, *, damp: float = 0.01, step: int = 128, codebook=None,
         scales=None, act_order: bool = False) -> BlockQuantized:
    """GPTQ of ``weight`` ([N, K]) given its inputs' ``hessian`` ([K, K]), 4-bit blocks of ``block_size``.

    Uniform asymmetric grid (ONNX ``MatMulNBits``): each block's scale and zero point are chosen
    from the block's weights as GPTQ has updated them when the block is reached, so later blocks
    absorb the earlier ones' error. With ``codebook`` (16 levels, e.g. NF4's) and fixed per-block
    ``scales`` ([N, K // block_size], e.g. bitsandbytes' absmax), a weight is ``codebook[q] · scale``
    and only the codes are chosen (``zeros`` are then 0). ``damp`` adds that share of the mean
    diagonal to H (numerical stability); ``step`` columns are updated lazily together (speed only).
    ``act_order`` rounds the columns with the largest inputs first (GPTQ's activation order), with each
    block's grid fixed up front from the original weights ("static groups"), so the layout stays RTN's.
    """
    return gptq_batch([weight], [hessian], block_size, damp=damp, step=step, codebook=codebook,
                      scales=None if scales is None else [scales], act_order=act_order)[0]


def gptq_batch(weights, hessians, block_size: int, *, damp: float = 0.01, step: int = 128, codebook=None,
               scales=None, act_order: bool = False) -> list[BlockQuantized]:
    """:func:`gptq` of several layers of one shape at once (``weights`` [N, K] each, ``hessians`` [K, K] each,
    ``scales`` one per layer with ``codebook``): the same arithmetic on stacked tensors, so the Python loop over
    the K columns runs once for all of them instead of once per layer (most of GPTQ's time on a small model,
    whose per-column work is a few microseconds of arithmetic)."""
    import torch

    w = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in weights]).clone()
    h = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in hessians]).clone()
    layers, n, k = w.shape
    if k % block_size or step % block_size:
        raise ValueError(f"K={k} and step={step} must be multiples of block_size={block_size}")
    levels = None if codebook is None else torch.as_tensor(codebook, dtype=torch.float32)
    fixed = None if scales is None else torch.stack(
        [torch.as_tensor(x, dtype=torch.float32).reshape(n, k // block_size) for x in scales])
    if (levels is None) != (fixed is None):
        raise ValueError("codebook and scales go together")
    diagonal = h.diagonal(dim1=1, dim2=2)  # a view: writing it writes h
    diagonal[diagonal == 0] = 1  # inputs never active in the calibration text: their weights do not matter to it
    h += damp * diagonal.mean(dim=1)[:, None, None] * torch.eye(k, dtype=h.dtype)
    each = torch.arange(layers)[:, None]
    perm = torch.arange(k).expand(layers, k)
    fixed_zero = None
    if act_order:
        if fixed is None:  # static groups: every block's grid from the weights before any update
            scale, zero = _grid(w.reshape(-1, block_size))
            fixed, fixed_zero = scale.reshape(layers, n, -1), zero.reshape(layers, n, -1)
        perm = torch.argsort(h.diagonal(dim1=1, dim2=2), dim=1, descending=True)
        w = w.gather(2, perm[:, None, :].expand(layers, n, k))
        h = h[each[:, :, None], perm[:, :, None], perm[:, None, :]]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    # columns are GPTQ's unit: held as rows ([layers, K, N]), each column's reads and updates are contiguous
    wt = w.transpose(1, 2).contiguous()
    codes = torch.zeros(layers, k, n, dtype=torch.uint8)
    out_scales = torch.zeros(layers, n, k // block_size) if fixed is None else fixed.clone()
    zeros = fixed_zero.clone() if fixed_zero is not None else torch.zeros(layers, n, k // block_size)
    groups = perm // block_size  # [layers, K]: the block each (permuted) column belongs to
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1, err1, h1 = wt[:, i1:i2].clone(), torch.zeros(layers, i2 - i1, n), hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:  # the grid of the column's own (original) block
                group = groups[:, col][:, None, None].expand(layers, n, 1)
                scale = fixed.gather(2, group)[..., 0]
                if levels is None:
                    zero = zeros.gather(2, group)[..., 0]
            elif col % block_size == 0:
                if fixed is None:
                    scale, zero = _grid(w1[:, i:i + block_size].transpose(1, 2).reshape(-1, block_size))
                    scale, zero = scale.reshape(layers, n), zero.reshape(layers, n)
                    out_scales[:, :, col // block_size], zeros[:, :, col // block_size] = scale, zero
                else:
                    scale = fixed[:, :, col // block_size]
            if levels is None:
                q = torch.clamp(torch.round(w1[:, i] / _safe(scale)) + zero, 0, 15)
                wq = (q - zero) * scale
            else:
                q = torch.argmin((w1[:, i, :, None] / _safe(scale)[..., None] - levels).abs(), dim=2)
                wq = levels[q] * scale
            codes[:, col] = q.to(torch.uint8)
            err = (w1[:, i] - wq) / h1[:, i, i][:, None]
            w1[:, i + 1:] -= h1[:, i, i + 1:, None] * err[:, None, :]
            err1[:, i] = err
        wt[:, i2:] -= hinv[:, i1:i2, i2:].transpose(1, 2) @ err1
    codes = codes.transpose(1, 2).contiguous()
    if act_order:
        codes = torch.zeros_like(codes).scatter_(2, perm[:, None, :].expand(layers, n, k), codes)
    return [BlockQuantized(codes[i].numpy(), out_scales[i].numpy(), zeros[i].to(torch.uint8).numpy())
            for i in range(layers)]


def calibration_hessians(model, batches: Iterable[Mapping], names: Iterable[str], *, opening=None,
                         opening_rows: int = 0) -> dict[str, np.ndarray]:
    """``H = Σ x xᵀ / tokens`` of the inputs of each ``nn.Linear`` in ``names``, over ``batches``
    (tokenizer outputs with ``input_ids`` and ``attention_mask``, optionally ``position_ids``; padded positions
    are left out).

    ``opening`` (1 x P token ids, a causal LM only): tokens that each of ``opening_rows`` rows starts with, left
    out of ``batches`` (whose ``position_ids`` count on after it). Their inputs are measured once and count
    ``opening_rows`` times (a causal model computes the same there in every row), and each batch continues from
    their key/value cache (:func:`pipeline.opening.with_opening`): the same matrices as whole rows, up to float
    rounding, for a third to a half less work on the bundled tasks.

    Layers that read the same tensor (q/k/v, gate/up) share one matrix (the same array object).
    """
    import torch

    from pipeline.opening import with_opening

    names = list(names)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}  # module -> the module whose sum it shares
    # this pass's recorded positions, their weight, whether to record at all, and the last input seen (q/k/v and
    # gate/up read one tensor in turn)
    state: dict = {}

    def hook(name):
        def fn(_module, args):
            if not state["record"]:
                return
            x = args[0]
            last = state.get("last")
            if last is not None and last[0] is x:  # the same tensor as the module hooked just before
                owner.setdefault(name, last[1])
                return
            owner.setdefault(name, name)
            key = owner[name]
            rows = x.reshape(-1, x.shape[-1])[state["mask"]].float()
            product = (rows.T @ rows).double()  # fp32 product (fast), fp64 running sum
            sums[key] = sums.get(key, 0) + state["weight"] * product
            counts[key] = counts.get(key, 0) + state["weight"] * rows.shape[0]
            state["last"] = (x, key)  # holding x keeps its memory from being reused by a later tensor
        return fn

    # The output projection reads the decoder's last hidden state: measured from the decoder's output, its
    # full-vocabulary logits (as much work as a sixth of the model, at every position) are never computed.
    head = _output_head(model, modules, names)
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names if n != head]
    device = next(model.parameters()).device

    def measure(inputs: dict, recorded, weight: int = 1) -> None:
        """One forward of ``inputs``, recording the positions where ``recorded`` (same shape as the ids) is set."""
        state.clear()
        state.update(mask=recorded.reshape(-1).bool(), weight=weight, record=True)
        if head is None:
            model(**inputs)
        else:
            hidden = model.get_decoder()(**inputs)
            hook(head)(None, (hidden.last_hidden_state,))

    try:
        with torch.inference_mode():
            if opening is not None:
                opening = opening.to(device)
                measure({"input_ids": opening, "attention_mask": torch.ones_like(opening)}, torch.ones_like(opening),
                        weight=opening_rows)
            for batch in batches:
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                recorded = inputs["attention_mask"]
                if opening is not None:
                    state.update(record=False)  # the opening's own forward, already measured above
                    inputs = with_opening(model, {**inputs, "opening_ids": opening})
                    if "past_key_values" not in inputs:  # whole rows came back: the opening is not measured again
                        recorded = torch.cat([torch.zeros_like(opening).expand(recorded.shape[0], -1), recorded], 1)
                measure(inputs, recorded)
    finally:
        for handle in handles:
            handle.remove()
    means = {key: (total / max(1, counts[key])).float().cpu().numpy() for key, total in sums.items()}
    return {n: means[owner[n]] for n in names if n in owner}  # shared inputs: the same array object


def _output_head(model, modules: Mapping, names: Iterable[str]) -> str | None:
    """The name of ``model``'s output projection among ``names`` when its input is the decoder's last hidden
    state (a transformers causal LM: ``get_decoder()`` then ``get_output_embeddings()``), else None."""
    getters = (getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None))
    if not all(callable(g) for g in getters):
        return None
    try:
        decoder, head = getters[0](), getters[1]()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or head is None:
        return None
    return next((n for n in names if modules.get(n) is head), None)


def node_module(node_name: str) -> str:
    """The PyTorch module a quantized ONNX node computes: ``/model/layers.0/mlp/up_proj/MatMul_Q4`` ->
    ``model.layers.0.mlp.up_proj``."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def pack(q: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulNBits`` initializers (bits=4): B ``[N, blocks, block/2]`` (two codes per byte, low nibble
    first), scales ``[N, blocks]``, zero points ``[N, ceil(blocks/2)]`` (packed the same way)."""
    n, k = q.codes.shape
    blocks = q.scales.shape[1]
    pairs = q.codes.reshape(n, k // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(n, blocks, -1)
    z = q.zeros if blocks % 2 == 0 else np.pad(q.zeros, ((0, 0), (0, 1)), constant_values=8)  # ORT pads with 8
    z = z.reshape(n, -1, 2)
    return b, q.scales.astype(np.float32), (z[..., 0] | (z[..., 1] << 4)).astype(np.uint8)


def apply_to_onnx(model, quantized: Mapping[str, BlockQuantized]) -> list[str]:
    """Overwrite the 4-bit initializers of every ``MatMulNBits`` node whose module is in ``quantized``
    (and of a ``GatherBlockQuantized`` embedding that reads the same weight); returns the modules done.

    Shapes must match the node's (same N, K and block size); a mismatch raises ``ValueError``.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = []

    def put(name: str, array: np.ndarray) -> None:
        old = inits[name]
        if tuple(old.dims) != array.shape:
            raise ValueError(f"{name}: shape {array.shape} does not match the node's {tuple(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(array, name))

    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node_module(node.name) not in quantized:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q = quantized[node_module(node.name)]
        if attrs.get("bits", 4) != 4 or attrs["block_size"] != q.block_size:
            raise ValueError(f"{node.name}: block size {attrs['block_size']} (bits {attrs.get('bits', 4)}) "
                             f"is not the calibrated one ({q.block_size}, 4)")
        b, scales, zp = pack(q)
        put(node.input[1], b)
        put(node.input[2], scales.reshape(inits[node.input[2]].dims))
        if len(node.input) > 3 and node.input[3]:
            put(node.input[3], zp)
        for suffix, array in (("scales", scales), ("zero_points", q.zeros)):  # the shared embedding's copies
            copy = f"{node.input[2 if suffix == 'scales' else 3]}_gather"
            if copy in inits:
                put(copy, np.ascontiguousarray(array.reshape(*array.shape, 1)))
        done.append(node_module(node.name))
    return done


def gptq_bnb_4bit(model, reference, hessians: Mapping[str, np.ndarray], *, progress: bool = True) -> list[str]:
    """Re-choose the codes of every bitsandbytes ``Linear4bit`` of ``model`` that ``hessians`` covers by GPTQ
    against the full-precision weights of the same-named layer of ``reference``; returns the layers done.

    bitsandbytes' own block scales (absmax, dequantized from double quantization when nested) and
    code table (NF4 or FP4) are kept, so the checkpoint stays bitsandbytes' format and size: only
    which of the 16 levels each weight takes changes. Call before the first forward pass (on CPUs
    with AVX512-BF16 that pass repacks the weights into another layout). A layer whose blocks span
    rows (``in_features`` not a multiple of the block size) keeps its round-to-nearest codes.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from tqdm.auto import tqdm

    ref = dict(reference.named_modules())
    groups: dict[tuple, list] = {}  # layers sharing a Hessian and a block size: one stacked GPTQ pass
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and name in hessians and name in ref:
            state = module.weight.quant_state
            if state.shape[1] % state.blocksize == 0:  # blocks that span rows keep their round-to-nearest codes
                groups.setdefault((id(hessians[name]), state.blocksize), []).append((name, module))
    jobs = []  # (members, stacked full-precision weights, bitsandbytes' block scales, code table, block)
    for (_, block), members in groups.items():
        scales, codebooks = [], set()
        for _, module in members:
            state = module.weight.quant_state
            absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested
                      else state.absmax)
            scales.append(absmax.float().cpu().reshape(state.shape[0], -1))
            codebooks.add(tuple(state.code.float().cpu().tolist()))
        if len(codebooks) != 1:  # NF4 beside FP4 in one group: not a case a checkpoint has; keep RTN
            continue
        jobs.append((members, torch.cat([ref[name].weight.detach().float().cpu() for name, _ in members]),
                     torch.cat(scales), codebooks.pop(), block))
    done = []
    with tqdm(total=len(jobs), desc="GPTQ 4-bit codes", unit="group", disable=not progress, leave=False) as bar:
        for chunk in _same_shape(jobs, lambda job: (*job[1].shape, job[3], job[4])):
            results = gptq_batch([job[1] for job in chunk], [hessians[job[0][0][0]] for job in chunk], chunk[0][4],
                                 codebook=list(chunk[0][3]), scales=[job[2] for job in chunk], act_order=True)
            for (members, *_), q in zip(chunk, results):
                start = 0
                for name, module in members:
                    rows = module.weight.quant_state.shape[0]
                    codes = torch.from_numpy(q.codes[start:start + rows]).reshape(-1)
                    start += rows
                    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # bitsandbytes: first weight high nibble
                    module.weight.data.copy_(packed.reshape(module.weight.data.shape).to(module.weight.data.device))
                    done.append(name)
            bar.update(len(chunk))
    return done


def gptq_layers(model, hessians: Mapping[str, np.ndarray], block_size: int, *,
                progress: bool = True) -> dict[str, BlockQuantized]:
    """GPTQ (uniform asymmetric 4-bit blocks) of every ``nn.Linear`` of ``model`` that ``hessians`` covers.

    Layers sharing one Hessian (q/k/v, gate/up) are rounded as one stacked matrix: GPTQ treats output
    rows independently, so the result is the same, in one pass over the columns instead of three; and the
    stacked matrices of one shape (every decoder layer's q/k/v, ...) go through :func:`gptq_batch` together.
    Activation order with static groups: on SmolLM2-135M's shared base it halved the answer-position KL
    against fp32 and raised top-1 agreement from 0.85-0.92 to 0.91-0.94 on the three bundled tasks.
    """
    import torch
    from tqdm.auto import tqdm

    groups: dict[int, list[tuple[str, torch.nn.Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in hessians and module.in_features % block_size == 0:
            groups.setdefault(id(hessians[name]), []).append((name, module))
    out = {}
    with tqdm(total=len(groups), desc="GPTQ int4", unit="group", disable=not progress, leave=False) as bar:
        for chunk in _same_shape(list(groups.values()), lambda members: (
                sum(m.out_features for _, m in members), members[0][1].in_features)):
            stacked = [torch.cat([m.weight.detach().float().cpu() for _, m in members]) for members in chunk]
            done = gptq_batch(stacked, [hessians[members[0][0]] for members in chunk], block_size, act_order=True)
            for members, q in zip(chunk, done):
                start = 0
                for name, module in members:
                    rows = slice(start, start + module.out_features)
                    out[name] = BlockQuantized(q.codes[rows], q.scales[rows], q.zeros[rows])
                    start += module.out_features
            bar.update(len(chunk))
    return out


_BATCH_BYTES = 1 << 28
"""Most float64 Hessian bytes GPTQ stacks into one pass (256 MB: 14 of a 1536-input layer, 100 of a 576-input one)."""


def _same_shape(groups: list, shape) -> list[list]:
    """``groups`` in chunks of one ``shape(group)`` ((rows, inputs, ...): only what is equal may stack), each within
    :data:`_BATCH_BYTES` of Hessians."""
    by_shape: dict[tuple, list] = {}
    for group in groups:
        by_shape.setdefault(shape(group), []).append(group)
    chunks = []
    for key, same in by_shape.items():
        k = key[1]
        size = max(1, _BATCH_BYTES // (k * k * 8))
        chunks += [same[i:i + size] for i in range(0, len(same), size)]
    return chunks
