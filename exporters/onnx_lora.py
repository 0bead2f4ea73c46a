"""Multi-LoRA on ONNX Runtime: a base decoder whose projections take LoRA factors as inputs, and
each task adapter as an ``.onnx_adapter`` file that sets those inputs.

Every decoder-layer projection ``y = x @ W`` becomes ``y = x @ W + (x @ A) @ B`` with ``A``
([in, rank]) and ``B`` ([rank, out], LoRA scaling folded in) as graph inputs named
``lora.<module>.A`` / ``lora.<module>.B``, rank symbolic. ONNX Runtime binds an adapter's tensors to
those inputs when ``RunOptions.add_active_adapter`` names it; without an adapter the inputs keep
their rank-0 default initializers and the branch adds exactly zero. One base file then serves every LoRA adapter
trained on that base, each a few MB. Quantizing the base afterwards leaves the LoRA branch in
fp32, because its weights are inputs, not constants.

DoRA cannot be written this way (its magnitude rescales the whole merged weight), nor IA3 (a
scaling, not an additive update): those are exported merged.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edge.session import LORA_PREFIX
from pipeline.adapter_spec import ADAPTER_WEIGHTS, read_spec

__all__ = ["LoraExportError", "add_lora_inputs", "expose_lora_inputs", "lora_factors", "lora_input_names",
           "write_onnx_adapter"]

_NODE = re.compile(r"^/(?P<module>model/layers\.\d+/(?:self_attn|mlp)/[A-Za-z0-9_]+)/MatMul$")
_MODULE = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.[A-Za-z0-9_]+$")


class LoraExportError(ValueError):
    """The adapter cannot be expressed as ONNX Runtime LoRA inputs (the message says why and what to do)."""


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of ``module``'s (A, B) factors, e.g. ``lora.model.layers.0.self_attn.q_proj.A``."""
    return f"{LORA_PREFIX}{module}.A", f"{LORA_PREFIX}{module}.B"


def add_lora_inputs(model) -> list[str]:
    """Add a LoRA branch with input factors to every decoder-layer projection of ``model`` (in place).

    Projections are found by the exporter's node names (``/model/layers.N/self_attn/q_proj/MatMul``).
    Returns the adapted module names (``model.layers.N.self_attn.q_proj``, ...).
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, modules = [], []
    for node in model.graph.node:
        match = _NODE.match(node.name)
        if node.op_type != "MatMul" or not match or node.input[1] not in inits:
            nodes.append(node)
            continue
        module = match["module"].replace("/", ".")
        in_dim, out_dim = inits[node.input[1]].dims
        a_name, b_name = lora_input_names(module)
        rank = f"lora_rank_{len(modules)}"
        model.graph.input.extend([
            helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [in_dim, rank]),
            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, out_dim]),
        ])
        # Rank-0 defaults: an input with an initializer of the same name is optional, so a run with
        # no adapter (or one that leaves this module alone) needs no feeds and adds exactly zero.
        model.graph.initializer.extend([numpy_helper.from_array(np.zeros((in_dim, 0), np.float32), a_name),
                                        numpy_helper.from_array(np.zeros((0, out_dim), np.float32), b_name)])
        out = node.output[0]
        base_out, down, delta = f"{out}/base", f"{out}/lora_down", f"{out}/lora_delta"
        node.output[0] = base_out
        nodes += [node,
                  helper.make_node("MatMul", [node.input[0], a_name], [down], name=f"{node.name}/lora_A"),
                  helper.make_node("MatMul", [down, b_name], [delta], name=f"{node.name}/lora_B"),
                  helper.make_node("Add", [base_out, delta], [out], name=f"{node.name}/lora_add")]
        modules.append(module)
    if not modules:
        raise LoraExportError("no decoder-layer projections found to attach LoRA inputs to; the graph's node names "
                              "do not follow the optimum export (/model/layers.N/self_attn/q_proj/MatMul)")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return modules


def expose_lora_inputs(model) -> int:
    """Make every ``lora.*`` initializer a graph input again (quantizers drop such inputs); returns how many."""
    from onnx import TensorProto, helper

    listed = {i.name for i in model.graph.input}
    added = 0
    for init in model.graph.initializer:
        if init.name.startswith(LORA_PREFIX) and init.name not in listed:
            dims = [d if d else f"rank_{init.name}" for d in init.dims]
            model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, dims))
            added += 1
    return added


def lora_factors(adapter_dir: Path) -> dict[str, np.ndarray]:
    """The PEFT LoRA adapter in ``adapter_dir`` as ONNX inputs: {``lora.<module>.A``: A^T, ``.B``: s * B^T}.

    Raises :class:`LoraExportError` for adapters that are not plain LoRA on decoder-layer linears
    (DoRA, fan-in-fan-out, per-module rank/alpha patterns are handled; embeddings are not).
    """
    from safetensors.numpy import load_file

    spec = read_spec(adapter_dir)
    if spec.kind not in ("lora", "dora"):
        raise LoraExportError(f"{adapter_dir} is a {spec.peft_type or spec.kind} adapter, not LoRA")
    if spec.kind == "dora":
        raise LoraExportError("DoRA rescales the merged weight, which an additive ONNX LoRA input cannot express; "
                              "export the merged model instead")
    if spec.fan_in_fan_out:
        raise LoraExportError("fan_in_fan_out (Conv1D) LoRA is not supported for ONNX adapters; export merged")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    out: dict[str, np.ndarray] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise LoraExportError(f"adapter tensor {key} is not a LoRA factor (trainable extras such as "
                                      "modules_to_save cannot be an ONNX adapter); export merged")
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        if not _MODULE.match(module):
            raise LoraExportError(f"LoRA on {module} is outside the decoder-layer projections; export merged")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]  # the trained rank (rank_pattern already shaped the tensors)
        default = r if spec.alpha is None else spec.alpha
        alpha = next((v for k, v in spec.alpha_pattern if module.endswith(k)), default)
        scaling = alpha / (r ** 0.5 if spec.rslora else r)
        a_name, b_name = lora_input_names(module)
        out[a_name] = np.ascontiguousarray(a.T, dtype=np.float32)
        out[b_name] = np.ascontiguousarray(b.T * scaling, dtype=np.float32)
    if not out:
        raise LoraExportError(f"{adapter_dir} holds no LoRA factors")
    return out


def write_onnx_adapter(adapter_dir: Path, path: Path) -> list[str]:
    """Write the LoRA adapter in ``adapter_dir`` as an ONNX Runtime ``.onnx_adapter``; return the inputs it sets."""
    import onnxruntime as ort

    factors = lora_factors(adapter_dir)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in factors.items()})
    fmt.export_adapter(str(path))
    return sorted(factors)
