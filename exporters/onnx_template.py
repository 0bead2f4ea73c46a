"""The fp32 ONNX graph of one model configuration, traced once and filled with each model's weights.

optimum's export traces the model's forward (about 25 s for SmolLM2-135M, on one core), yet the graph it
writes depends only on the configuration: the weights enter it as initializers, either under their own
names (``model.embed_tokens.weight``, the norms) or transposed, as ``onnx::MatMul_*`` constants. Every task's
merged model and the bare base share one configuration, so the export stage traces once per process and
writes the others' graphs from that one (:func:`record` after an optimum export, :func:`write` instead of
the next): the same nodes, every initializer the new model's value where the first export had its model's.

Only what is certain is reused. :func:`record` maps each initializer to the weight it holds by name and
value; a graph is not recorded (each export of it goes through optimum) when its model has two weights of
equal value (optimum then stores one initializer for both, a sharing that holds for that model only), a
weight is no initializer of its own, an initializer matches no weight or more than one, a large constant
sits inside a node, or the weights are in external data files. The
tests hold a written graph equal, initializer for initializer, to optimum's own export of the same model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Template", "load_weights", "record", "write"]

LARGE = 1024
"""Elements from which a float constant that matches no weight makes a graph unsafe to reuse (it could be
computed from the weights; the rotary frequencies and shape constants are far smaller)."""


@dataclass(frozen=True)
class Template:
    """An exported graph without its weights, and where each model's weights go."""

    model: object
    """The ``onnx.ModelProto``, the mapped initializers' data cleared."""
    weights: dict[str, tuple[str, bool]]
    """Initializer name -> (the weight's state-dict name, stored transposed)."""
    files: dict[str, bytes]
    """What the export wrote beside ``model.onnx`` (``config.json``...), besides the copied tokenizer files."""


def load_weights(model_dir: Path) -> dict[str, np.ndarray] | None:
    """Every weight of the saved model in ``model_dir`` as float32 arrays, from its safetensors files (None
    when it has none: a ``pytorch_model.bin`` checkpoint is not read here)."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        return None
    weights: dict[str, np.ndarray] = {}
    for f in files:
        try:
            weights.update({k: v.astype(np.float32, copy=False) for k, v in load_file(f).items()})
        except TypeError:  # bfloat16 has no numpy type: through torch
            weights.update({k: v.float().numpy() for k, v in load_torch(f).items()})
    return weights


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).digest() + repr(array.shape).encode()


def _large_constant_in_nodes(graph) -> bool:
    from onnx import AttributeProto, numpy_helper

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and numpy_helper.to_array(attr.t).size >= LARGE:
                return True
            if attr.type == AttributeProto.GRAPH and _large_constant_in_nodes(attr.g):
                return True
    return False


def record(onnx_path: Path, weights: dict[str, np.ndarray], files: dict[str, bytes]) -> Template | None:
    """The template of the graph at ``onnx_path``, exported from the model whose ``weights`` are given, or
    None when it cannot be reused with certainty (see the module's docstring)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    if any(init.data_location == TensorProto.EXTERNAL for init in graph.initializer) or \
            _large_constant_in_nodes(graph):
        return None
    by_value: dict[bytes, set[tuple[str, bool]]] = {}
    for name, w in weights.items():
        by_value.setdefault(_digest(w), set()).add((name, False))
        if w.ndim == 2:
            by_value.setdefault(_digest(w.T), set()).add((name, True))
    # optimum keeps one initializer for weights of equal value (freshly initialised norms, all ones): the
    # graph's sharing then holds for this model only
    if any(len({name for name, _ in found}) > 1 for found in by_value.values()):
        log.debug("onnx template: %s has weights of equal value; not reused", onnx_path)
        return None
    mapped: dict[str, tuple[str, bool]] = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if init.name in weights and value.shape == weights[init.name].shape and \
                np.array_equal(value, weights[init.name]):
            mapped[init.name] = (init.name, False)
            continue
        if init.data_type != TensorProto.FLOAT:
            if value.size >= LARGE:
                return None
            continue  # an integer shape or index constant
        found = by_value.get(_digest(value))  # one weight (no two are equal, above), maybe both ways round
        if found:
            mapped[init.name] = min(found)
        elif value.size >= LARGE:
            log.debug("onnx template: %s (%s) matches no weight; not reused", init.name, value.shape)
            return None
    if {name for name, _ in mapped.values()} != set(weights):  # a weight folded into something else
        log.debug("onnx template: not every weight of %s is an initializer; not reused", onnx_path)
        return None
    for init in graph.initializer:
        if init.name in mapped:
            init.ClearField("raw_data")
            init.ClearField("float_data")
    return Template(model, mapped, dict(files))


def write(template: Template, weights: dict[str, np.ndarray], onnx_path: Path) -> bool:
    """Write the template's graph holding ``weights`` to ``onnx_path``; False (nothing written) when a weight
    it needs is missing or of another shape."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(template.model)
    for init in model.graph.initializer:
        if init.name not in template.weights:
            continue
        name, transposed = template.weights[init.name]
        if name not in weights:
            return False
        value = weights[name].T if transposed else weights[name]
        if list(value.shape) != list(init.dims):
            return False
        init.raw_data = np.ascontiguousarray(value, dtype=np.float32).tobytes()
    onnx.save(model, str(onnx_path))
    return True
