"""The fused graph: an exported decoder rewritten for fast decoding and for batches of independent requests.

The exported decoder (optimum's layout) takes a dense key/value cache, concatenates each step's keys
onto it (a copy of the whole cache per layer per step), expands it from the key/value heads to the
query heads (another copy), and masks padding from an ``attention_mask``; every adapter row of a
batch must use the same ``.onnx_adapter``. This module rewrites that graph into the form
:class:`edge.slots.SlotDecoder` runs, either in memory (:func:`fuse_decoder`, the server's fallback for
bundles exported without one) or as a **sidecar** file next to the exported one (:func:`write_fused`,
at export): ``model.fused.onnx`` holds the rewritten graph and reads every weight from ``model.onnx``'s
own bytes (ONNX external data with ``location: model.onnx``), so it adds about 1 MB, not a second copy
of the model, and the exported file stays the portable optimum-layout decoder other tools load.

- **Attention** of every layer becomes ONNX Runtime's ``GroupQueryAttention`` (com.microsoft), with
  rotary embedding inside it and a key/value buffer shared between ``past_key_values.<i>.*`` and
  ``present.<i>.*``: the new keys and values are written in place at each row's own length
  (``seqlens_k``), so rows of different lengths share a step and nothing else of the cache is copied.
  The rotary tables are the exported graph's own, evaluated once for every position of the context.
- **LoRA rows**: each projection's LoRA down-projection is multiplied by ``lora_rows`` ([batch, 1,
  rank]), so with the adapters' factors stacked along the rank axis every row keeps only its own
  adapter's slice (the algebra of :mod:`serve.batched_lora`). The down factor ``lora.<m>.A`` is taken
  transposed, ``[rank, in]``, so any run of stacked adapters is a contiguous block of both factors:
  a run binds only the block its rows use (see :class:`edge.slots.LoraStack`).
- **Logits** are computed only at the positions ``last_index`` ([batch, k]) names: decoding needs each
  row's last token's (k = 1), which saves the vocabulary projection of every other prompt token; scoring
  a prompt asks for all of them.

Supported: decoders whose attention projections are ``q_proj``/``k_proj``/``v_proj``/``o_proj`` under
``/model/layers.N/self_attn/`` with the rotary subgraph under ``/model/rotary_emb/`` (Llama, SmolLM,
Qwen2, Mistral). A graph without that structure (a fused ``qkv_proj``) raises :class:`FuseError`; one
whose attention does more (Qwen3's query/key norms, Gemma2's soft-capping) fuses but fails the engine's
start-up probe: both are served unfused (see :mod:`serve.onnx_engine`). Known gap: a sliding-window
model (Mistral v0.1) attends to the whole context here, which differs only past its window (4,096
tokens). Needs the ``onnx`` package (not the device runtime).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.slots import FUSED_FORMAT, LAST, ROWS, SEQLENS, TOTAL, fused_path

__all__ = ["FUSED_TOLERANCE", "FuseError", "fuse_decoder", "write_fused"]

FUSED_TOLERANCE = 0.05
"""The server's start-up probe of a graph it fused in memory: its logits may differ from the exported graph's
by this share of their range (int4 and int8 kernels quantize activations, so the two graphs round
differently; a broken rewrite is off by far more). A sidecar was held to the export's fidelity gate instead."""

SHARED_MIN_BYTES = 256
"""Initializers of at least this many bytes are read from the exported file; smaller ones stay in the sidecar."""


class FuseError(ValueError):
    """The decoder cannot be rewritten for batched serving (the message says what was not found)."""


def _scope_outputs(graph, prefix: str, consumers: dict[str, list]) -> list[str]:
    """Tensors produced by nodes named ``prefix*`` and consumed (or output) outside that scope."""
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if not node.name.startswith(prefix):
            continue
        for out in node.output:
            if out in outputs or any(not c.name.startswith(prefix) for c in consumers.get(out, [])):
                found.append(out)
    return found


def _scope_inputs(graph, prefix: str, producers: dict[str, object], skip: set[str]) -> list[str]:
    """Tensors consumed by nodes named ``prefix*`` that come from a node outside the scope."""
    found = []
    for node in graph.node:
        if node.name.startswith(prefix):
            for name in node.input:
                src = producers.get(name)
                if name and name not in skip and src is not None and not src.name.startswith(prefix) \
                        and name not in found:
                    found.append(name)
    return found


def _rotary_tables(model, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [max_length, head_dim / 2], from the graph's own rotary subgraph at positions
    0 .. max_length - 1 (whatever scaling the export baked in)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph = model.graph
    prefix = "/model/rotary_emb/"
    nodes = [n for n in graph.node if n.name.startswith(prefix)]
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outs = _scope_outputs(graph, prefix, consumers)
    if not nodes or len(outs) != 2:
        raise FuseError(f"no rotary subgraph with two outputs under {prefix} (found {len(outs)})")
    # every node the two tables depend on (the scope, plus any constants it reads from outside)
    producers = {o: n for n in graph.node for o in n.output}
    nodes, todo, seen = [], list(outs), set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        todo.extend(node.input)
    nodes = _toposort(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer})
    used = {i for n in nodes for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    if used & ({i.name for i in graph.input} - {"position_ids"}):
        raise FuseError("the rotary tables depend on inputs other than position_ids")
    position = next(i for i in graph.input if i.name == "position_ids")
    sub = helper.make_graph(nodes, "rotary", [position],
                            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs], inits)
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    session = ort.InferenceSession(sub_model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = session.run(outs, {"position_ids": np.arange(max_length, dtype=np.int64)[None]})
    a, b = a.reshape(max_length, -1), b.reshape(max_length, -1)
    cos, sin = (a, b) if np.abs(b[0]).max() < np.abs(a[0]).max() else (b, a)  # sin(0) = 0
    half = cos.shape[1] // 2
    if not (np.allclose(cos[:, :half], cos[:, half:]) and np.allclose(sin[:, :half], sin[:, half:])):
        raise FuseError("the rotary tables are not in the rotate-half layout GroupQueryAttention takes")
    return np.ascontiguousarray(cos[:, :half], np.float32), np.ascontiguousarray(sin[:, :half], np.float32)


def fuse_decoder(path: Path, *, max_length: int) -> bytes:
    """Rewrite the decoder at ``path`` (see the module docstring); ``max_length``: the longest sequence the
    rotary tables cover (the context length). Returns the serialized graph, weights included (what
    :class:`edge.slots.FusedModel` opens).

    Raises :class:`FuseError` when the graph does not have the expected structure."""
    import onnx

    return _fuse(onnx.load(str(path)), max_length).SerializeToString()


def write_fused(path: Path, *, max_length: int) -> Path:
    """Write the fused sidecar of the decoder at ``path`` (:func:`edge.slots.fused_path`) and return its path.

    Every initializer of at least :data:`SHARED_MIN_BYTES` is stored as external data pointing into
    ``path`` itself (same directory, its byte offset in the file), so the two files must travel together:
    the bundle's manifest hashes both. Written to a temporary name and renamed: an interrupted write
    leaves no sidecar. Raises :class:`FuseError` when the graph does not have the expected structure, or
    keeps its weights in a separate external-data file (a model over 2 GB: not supported yet).
    """
    import mmap

    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # a single-file model: every weight is in it anyway
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        raise FuseError(f"{path.name} keeps its weights in an external data file (a model over 2 GB); fused "
                        "sidecars are written only for single-file models")
    model = _fuse(model, max_length)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _share_weights(model, data, path.name)
        size = len(data)
    entry = model.metadata_props.add()  # the runtime refuses a sidecar whose exported file has changed since
    entry.key, entry.value = "edgetune.source_bytes", str(size)
    out = fused_path(path)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)
    return out


def _share_weights(model, data, location: str) -> None:
    """Point every initializer of ``model`` (of at least :data:`SHARED_MIN_BYTES`) found verbatim in ``data``
    (the exported file's bytes) at its byte range there instead of holding it."""
    import onnx

    cursor = 0
    for init in model.graph.initializer:
        raw = init.raw_data
        if len(raw) < SHARED_MIN_BYTES:
            continue
        # The initializers keep the exported file's order, so the next one is almost always further on.
        offset = data.find(raw, cursor)
        if offset < 0:
            offset = data.find(raw)
        if offset < 0:
            # the rewrite's own tables (rotary cos/sin) are not in the exported file: they stay inline
            continue
        cursor = offset + len(raw)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value


def _fuse(model, max_length: int):
    """``model`` (a decoder's ModelProto, weights loaded) rewritten in place into the fused graph; returns it."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    pasts = sorted((n for n in inputs if n.startswith("past_key_values.")), key=lambda n: (int(n.split(".")[1]), n))
    if "position_ids" not in inputs or not pasts:
        raise FuseError("not an optimum decoder with position_ids and past_key_values inputs")
    layers = len(pasts) // 2
    shape = inputs[pasts[0]].type.tensor_type.shape.dim
    kv_heads, head_dim = int(shape[1].dim_value), int(shape[3].dim_value)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    cos, sin = _rotary_tables(model, max_length)
    graph.initializer.extend([numpy_helper.from_array(cos, "gqa.cos_cache"),
                              numpy_helper.from_array(sin, "gqa.sin_cache")])

    new_nodes = []
    for i in range(layers):
        scope = f"/model/layers.{i}/self_attn/"
        qkv = []
        for proj in ("q_proj", "k_proj", "v_proj"):
            outs = _scope_outputs(graph, f"{scope}{proj}/", consumers)
            if len(outs) != 1:
                raise FuseError(f"layer {i}: {proj} has {len(outs)} outputs used outside it, expected 1")
            qkv.append(outs[0])
        attn = _scope_inputs(graph, f"{scope}o_proj/", producers, skip=set())
        attn = [a for a in attn if not a.startswith("lora.")]
        if len(attn) != 1:
            raise FuseError(f"layer {i}: o_proj takes {len(attn)} inputs from outside it, expected 1")
        key_out, value_out = f"present.{i}.key", f"present.{i}.value"
        for out in (key_out, value_out):
            if out not in producers:
                raise FuseError(f"no {out} output")
        for out in (key_out, value_out, attn[0]):  # their old producers go; what only they used is pruned
            producers[out].output[list(producers[out].output).index(out)] = f"{out}/unfused"
        new_nodes.append((i, qkv, attn[0], key_out, value_out))

    q_width = _width(graph, new_nodes[0][1][0], producers)
    num_heads = q_width // head_dim if q_width else None
    if not num_heads or num_heads % kv_heads:
        raise FuseError(f"could not read the number of query heads (q width {q_width}, head_dim {head_dim})")
    for i, (q, k, v), attn, key_out, value_out in new_nodes:
        graph.node.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", SEQLENS, TOTAL,
             "gqa.cos_cache", "gqa.sin_cache"],
            [attn, key_out, value_out], name=f"/model/layers.{i}/self_attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(head_dim ** -0.5)))
    graph.input.extend([helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]),
                        helper.make_tensor_value_info(TOTAL, TensorProto.INT32, [])])

    _stacked_lora(graph)
    _last_position_logits(graph)
    _prune(graph)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.input if i.name in used]
    del graph.input[:]
    graph.input.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del model.metadata_props[:]
    for key, value in (("edgetune.fused", FUSED_FORMAT), ("edgetune.max_length", str(max_length))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _width(graph, tensor: str, producers) -> int | None:
    """The last dimension of ``tensor`` (a projection's output), read off the projection's weights."""
    node = producers.get(tensor)
    seen = 0
    inits = {i.name: i for i in graph.initializer}
    while node is not None and seen < 8:
        seen += 1
        if node.op_type == "MatMulNBits":
            return next(a.i for a in node.attribute if a.name == "N")
        if node.op_type == "MatMul" and node.input[1] in inits:
            return int(inits[node.input[1]].dims[-1])
        # walk back through the LoRA add, a bias add, a dequantize chain: first input that has a producer
        node = next((producers[i] for i in node.input if i in producers), None)
    return None


def _stacked_lora(graph) -> None:
    """Rewrite every LoRA branch for stacked adapters with a per-row mask (see the module docstring).

    ``lora.<m>.A`` becomes ``[rank, in]`` (the transpose of the ``.onnx_adapter`` factor), so that any run of
    adapters in the stack is a contiguous block of rows of both factors (``.B`` stays ``[rank, out]``):
    ``down = Reshape(Gemm(Reshape(x, [-1, in]), A, transB=1), [batch, seq, -1]) * lora_rows``.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    del graph.node[:]
    shapes: set[int] = set()
    stacked = 0
    for node in nodes:  # (appending copies a node: edit it first)
        if not (node.op_type == "MatMul" and node.name.endswith("/lora_A") and node.input[1] in inits):
            graph.node.append(node)
            continue
        x, a, out = node.input[0], node.input[1], node.output[0]
        width = int(inits[a].dims[0])
        shapes.add(width)
        inits[a].CopyFrom(numpy_helper.from_array(np.zeros((0, width), np.float32), a))
        graph.node.extend([
            helper.make_node("Reshape", [x, f"lora_shape.{width}"], [f"{out}/x2d"], name=f"{node.name}/x2d"),
            helper.make_node("Gemm", [f"{out}/x2d", a], [f"{out}/h2d"], name=f"{node.name}/gemm", transB=1),
            helper.make_node("Reshape", [f"{out}/h2d", "lora_shape.rows"], [f"{out}/h"], name=f"{node.name}/h"),
            helper.make_node("Mul", [f"{out}/h", ROWS], [out], name=f"{node.name}/rows")])
        for item in graph.input:
            if item.name == a:
                item.CopyFrom(helper.make_tensor_value_info(a, TensorProto.FLOAT, [f"rank_{stacked}", width]))
        stacked += 1
    if not stacked:
        return
    graph.node.extend([
        helper.make_node("Shape", ["input_ids"], ["lora_shape.batch_seq"], name="/lora/shape"),
        helper.make_node("Concat", ["lora_shape.batch_seq", "lora_shape.minus1"], ["lora_shape.rows"],
                         name="/lora/shape_rows", axis=0)])
    graph.initializer.extend([numpy_helper.from_array(np.asarray([-1], np.int64), "lora_shape.minus1"),
                              numpy_helper.from_array(np.ones((1, 1, 1), np.float32), ROWS)]
                             + [numpy_helper.from_array(np.asarray([-1, w], np.int64), f"lora_shape.{w}")
                                for w in sorted(shapes)])
    graph.input.append(helper.make_tensor_value_info(ROWS, TensorProto.FLOAT, ["rows", 1, "stacked_rank"]))


def _last_position_logits(graph) -> None:
    """Logits of the positions ``last_index`` [batch, k] names in each row (k = 1 when decoding: the row's last
    token; every position when scoring a prompt): only their hidden states go to the head."""
    from onnx import TensorProto, helper, numpy_helper

    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None:
        raise FuseError("no logits output")
    hidden = head.input[0]
    picked = f"{hidden}/picked"
    head.input[0] = picked
    graph.node.extend([
        helper.make_node("Unsqueeze", [LAST, "/model/picked_positions/axis"], ["/model/picked_positions/index"],
                         name="/model/picked_positions/unsqueeze"),
        helper.make_node("GatherND", [hidden, "/model/picked_positions/index"], [picked],
                         name="/model/picked_positions", batch_dims=1)])
    graph.initializer.append(numpy_helper.from_array(np.asarray([2], np.int64), "/model/picked_positions/axis"))
    graph.input.append(helper.make_tensor_value_info(LAST, TensorProto.INT64, ["batch", "picked"]))


def _prune(graph) -> None:
    """Drop nodes whose outputs nothing uses, and initializers no node uses; then sort topologically."""
    producers = {o: n for n in graph.node for o in n.output}
    keep, todo, seen = [], [o.name for o in graph.output], set()
    while todo:  # everything the outputs depend on
        node = producers.get(todo.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            keep.append(node)
            todo.extend(i for i in node.input if i)
    position = {id(n): k for k, n in enumerate(graph.node)}
    keep.sort(key=lambda n: position[id(n)])
    order = _toposort(keep, {i.name for i in graph.input} | {i.name for i in graph.initializer})
    del graph.node[:]
    graph.node.extend(order)
    used = {i for n in order for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _toposort(nodes: list, available: set[str]) -> list:
    ready = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = [i for i in rest[0].input if i not in ready]
            raise FuseError(f"the rewritten graph has a cycle or a missing input at {rest[0].name} ({missing})")
        pending = rest
    return out
