"""Quantize an exported fp32 ONNX decoder: int8 and int4 weights (``MatMulNBits``), embedding included.

Small models spend a large share of their bytes on the token embedding and the output projection,
which are often tied (SmolLM2: 28M of 135M parameters). The optimum export expresses a tied head as
a ``MatMul`` over a ``Transpose`` of the embedding, which the quantizers skip because its weight is
not a constant. :func:`fold_constant_transposes` turns that transpose into a plain initializer so the
head is quantized like every other projection, and for int4 :func:`share_int4_embedding` then reads
the embedding rows straight out of the head's 4-bit weight (``GatherBlockQuantized``), so the
vocabulary matrix is stored once, in 4 bits: int4 ends up near an eighth of fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporters.onnx_lora import expose_lora_inputs

if TYPE_CHECKING:
    from exporters.gptq import BlockQuantized

log = logging.getLogger(__name__)

RECIPE = "mnb-int8-sym/int4-asym-shared-embedding/2"
"""Version of the quantization recipe: part of every quantized export's fingerprint, so changing it
here re-quantizes existing runs instead of keeping files made the old way."""

__all__ = ["RECIPE", "fold_constant_transposes", "quantize_int4", "quantize_int8", "share_int4_embedding"]


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _save(model, path: Path) -> None:
    import onnx

    # One file: protobuf's 2 GB limit is far off for the small models this is for; beyond it, external data.
    large = model.ByteSize() > 1_900_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def fold_constant_transposes(model) -> int:
    """Replace every ``Transpose`` of an initializer by the transposed initializer; returns how many.

    The graph computes the same values; only the tied weight is now stored twice (until quantized).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    kept, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            model.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array.transpose(perm) if perm else array.T), node.output[0]))
            folded += 1
            continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return folded


def quantize_int8(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = 4) -> Path:
    """int8 weights: every constant-weight ``MatMul`` as 8-bit ``MatMulNBits`` (per block of
    ``block_size`` weights), the embedding as an int8 ``Gather`` (dynamic-quantization style).

    Weight-only 8-bit rather than ONNX Runtime's classic dynamic quantization (``MatMulInteger``
    with one activation scale per tensor): on SmolLM2-135M the classic form moved the logits about
    a hundred times more (mean KL 1.4 against 0.013 nats per position) and ran slower (48 against
    72 tokens/s) on this CPU.
    """
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _quantize_matmuls(_load(src), bits=8, block_size=block_size, accuracy_level=accuracy_level,
                              op_types=("MatMul",))
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "matmul8.onnx"
        _save(model, staged)
        _quiet_quantizer(lambda: quantize_dynamic(
            str(staged), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"]))
    quantized = _load(dst)
    if expose_lora_inputs(quantized):
        _save(quantized, dst)
    return dst


def _quantize_matmuls(model, *, bits: int, block_size: int, accuracy_level: int, op_types: tuple[str, ...],
                      symmetric: bool = True):
    """Fold constant transposes, then block-quantize ``op_types`` weights to ``bits`` (LoRA branches excluded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    fold_constant_transposes(model)
    axes = tuple((op, 0 if op == "MatMul" else 1) for op in op_types)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=op_types, quant_axes=axes)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=_lora_nodes(model))
    _quiet_quantizer(quantizer.process)
    return quantizer.model.model


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = 4,
                  calibrated: Mapping[str, BlockQuantized] | None = None) -> Path:
    """4-bit block quantization of every constant-weight ``MatMul`` (``MatMulNBits``) and the embedding.

    ``accuracy_level`` 4 computes in int8 (what makes MatMulNBits fast on x86 CPUs; 0 keeps fp32
    activations and was slower than fp32 here). ``block_size`` (16-256, a power of two) trades size
    for accuracy: each block of weights shares one fp32 scale and a 4-bit zero point. Asymmetric
    (with zero points) because on SmolLM2-135M symmetric blocks lost answers: exact match on the
    first 48 extract rows 0.854 symmetric against 0.958 asymmetric (fp32: 1.000), dates 0.958 / 1.000.

    ``calibrated`` (module name -> GPTQ blocks, :mod:`exporters.gptq`) replaces the round-to-nearest
    values of those layers (the shared embedding follows the head); the graph stays the same.
    """
    quantized = _quantize_matmuls(_load(src), bits=4, block_size=block_size, accuracy_level=accuracy_level,
                                  op_types=("MatMul", "Gather"), symmetric=False)
    if share_int4_embedding(quantized):
        log.info("int4: the embedding reads the output projection's 4-bit weight (stored once)")
    if calibrated:
        from exporters.gptq import apply_to_onnx

        done = apply_to_onnx(quantized, calibrated)
        log.info("int4: %d of %d layers carry GPTQ-calibrated weights", len(done), len(calibrated))
    expose_lora_inputs(quantized)
    _save(quantized, dst)
    return dst


def share_int4_embedding(model) -> bool:
    """Point the embedding's ``GatherBlockQuantized`` at the tied head's ``MatMulNBits`` weight.

    Only when the two hold the same matrix (tied embeddings: same quantized blocks, scales and zero
    points); returns whether it did. The head stores ``W[vocab, hidden]`` as uint4 blocks, shape
    [vocab, blocks, block/2], zero points packed two blocks per byte; gathering rows of that with
    ``quantize_axis=2`` gives the same values as the separately quantized embedding, which is then
    dropped.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    if len(gathers) != 1 or len(heads) != 1:
        return False
    gather, head = gathers[0], heads[0]
    get = lambda node, i: inits.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    h_data, h_scales, h_zero = get(head, 1), get(head, 2), get(head, 3)
    g_data, g_scales, g_zero = get(gather, 0), get(gather, 2), get(gather, 3)
    if None in (h_data, h_scales, g_data, g_scales) or (h_zero is None) != (g_zero is None):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, blocks, half = h_data.dims
    block = attrs["block_size"]
    if half * 2 != block or attrs.get("bits", 4) != 4:
        return False
    scales = numpy_helper.to_array(h_scales).reshape(vocab, blocks)
    if tuple(g_scales.dims) != (vocab, blocks) or not np.allclose(numpy_helper.to_array(g_scales), scales):
        return False  # not the same matrix: an untied head
    name = gather.output[0]
    new_inits = [numpy_helper.from_array(scales.reshape(vocab, blocks, 1), f"{h_scales.name}_gather")]
    inputs = [h_data.name, gather.input[1], new_inits[0].name]
    if h_zero is not None:  # unpack two 4-bit zero points per byte (low nibble first) to one per block
        packed = numpy_helper.to_array(h_zero).reshape(vocab, -1)
        zero = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(vocab, -1)[:, :blocks]
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(zero.reshape(vocab, blocks, 1), np.uint8),
                                                 f"{h_zero.name}_gather"))
        inputs.append(new_inits[-1].name)
    shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{name}_shape")
    gathered = f"{name}_blocks"
    new_gather = helper.make_node("GatherBlockQuantized", inputs, [gathered], name=gather.name, domain="com.microsoft",
                                  gather_axis=0, quantize_axis=2, block_size=block, bits=4)
    reshape = helper.make_node("Reshape", [gathered, shape.name], [name], name=f"{gather.name}_reshape")
    nodes = list(model.graph.node)
    at = nodes.index(gather)
    nodes[at:at + 1] = [new_gather, reshape]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    dropped = {t.name for t in (g_data, g_scales, g_zero) if t is not None}
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *new_inits, shape])
    return True


def _lora_nodes(model) -> list[str]:
    """The LoRA branch's MatMuls: their weights are (overridable) adapter inputs and stay fp32."""
    return [n.name for n in model.graph.node if n.name.endswith(("/lora_A", "/lora_B"))]


def _quiet_quantizer(fn) -> None:
    """The quantizers log one INFO line per node on the root logger, and divide by all-zero blocks'
    zero scales (handled: those blocks quantize to 0); keep both out of the user's console."""
    import warnings

    # ... and the int4 pass warns that it raises the opset to 21 for int4 types "but the generated model
    # may not be a valid model": it is (every export is loaded and gated right after).
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(max(levels[0], logging.WARNING))
    loggers[1].setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            fn()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
