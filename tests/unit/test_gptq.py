"""Calibrated 4-bit weights: the packing is ONNX Runtime's own, GPTQ moves a layer's outputs less than
round-to-nearest on the calibration inputs, and the values land in ONNX and bitsandbytes unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters import gptq as G


def _correlated_inputs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs with strongly correlated channels (a few directions carry most of the signal) of very different
    scales, as transformer activations have."""
    mix = rng.standard_normal((k // 4, k))
    x = rng.standard_normal((rows, k // 4)) @ mix + 0.1 * rng.standard_normal((rows, k))
    return (x * np.linspace(0.2, 4.0, k)).astype(np.float32)


@pytest.mark.parametrize(("n", "k", "block"), [(48, 96, 32), (64, 576, 32), (10, 256, 16), (7, 512, 128)])
def test_round_to_nearest_packs_byte_identical_to_onnxruntime(n: int, k: int, block: int) -> None:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, :block] = 0  # an all-zero block: scale 0, zero point 0
    w[2, block:2 * block] = np.abs(w[2, block:2 * block])  # a block with no negative weight
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zero_points, block, n, k, False)
    b, s, z = G.pack(G.round_to_nearest(w, block))
    assert np.array_equal(b, packed) and np.array_equal(s, scales) and np.array_equal(z, zero_points)


def test_gptq_moves_the_layer_outputs_less_than_round_to_nearest() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x, held_out = np.split(_correlated_inputs(rng, 6000, 256), [4000])  # calibration rows, then unseen ones
    h = x.T @ x / len(x)
    q = G.gptq(w, h, 32)
    assert q.codes.max() <= 15 and q.zeros.max() <= 15
    ordered = G.gptq(w, h, 32, act_order=True)  # static groups: the grid is RTN's, the codes are not
    assert np.array_equal(ordered.scales, G.round_to_nearest(w, 32).scales)
    error = {name: float(np.mean((held_out @ w.T - held_out @ v.dequantize().T) ** 2))
             for name, v in (("rtn", G.round_to_nearest(w, 32)), ("gptq", q), ("act_order", ordered))}
    assert error["gptq"] < 0.7 * error["rtn"] and error["act_order"] < error["gptq"], error


def test_gptq_with_a_codebook_keeps_the_given_scales() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    x = _correlated_inputs(rng, 3000, 128)
    levels = np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)
    levels[0], levels[-1] = -1.0, 1.0
    scales = np.abs(w).reshape(32, -1, 64).max(axis=2)
    q = G.gptq(w, x.T @ x / len(x), 64, codebook=levels, scales=scales)
    assert np.array_equal(q.scales, scales)
    rebuilt = levels[q.codes] * np.repeat(scales, 64, axis=1)
    nearest = levels[np.abs(w.reshape(32, -1, 64)[..., None] / scales[..., None, None] - levels).argmin(-1)]
    rtn = nearest.reshape(32, 128) * np.repeat(scales, 64, axis=1)
    err = lambda v: float(np.mean((x @ w.T - x @ v.T) ** 2))  # noqa: E731
    assert err(rebuilt) < 0.8 * err(rtn)


def test_calibration_hessians_share_one_matrix_per_input_and_skip_padding() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask):
            x = torch.nn.functional.one_hot(input_ids, 8).float() * 3 - 1
            return self.o(self.q(x) + torch.cat([self.k(x), self.k(x)], -1))

    model = Block()
    batches = [{"input_ids": torch.tensor([[1, 2, 3], [0, 4, 5]]), "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}]
    h = G.calibration_hessians(model, batches, ["q", "k", "o"])
    x = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4, 5]), 8).float() * 3 - 1  # the five unpadded tokens
    assert np.allclose(h["q"], (x.T @ x / 5).numpy()) and np.array_equal(h["q"], h["k"])
    with torch.no_grad():
        mid = model.q(x) + torch.cat([model.k(x), model.k(x)], -1)
    assert np.allclose(h["o"], (mid.T @ mid / 5).numpy(), atol=1e-5)


def test_the_output_head_is_measured_without_computing_logits(tiny_model_dir, monkeypatch) -> None:
    """A causal LM's output projection is measured from its decoder's last hidden state: the same matrices,
    bit for bit, as hooking the projection inside a full forward, and no full-vocabulary logits computed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in names
    batches = [{"input_ids": torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}]
    heads = []
    hook = model.lm_head.register_forward_hook(lambda _m, _a, out: heads.append(out.shape))
    fast = G.calibration_hessians(model, batches, names)
    hook.remove()
    assert heads == []  # the projection itself never ran
    monkeypatch.setattr(G, "_output_head", lambda *a: None)  # every layer hooked inside a full forward
    full = G.calibration_hessians(model, batches, names)
    assert fast.keys() == full.keys() == set(names)
    assert all(np.array_equal(fast[n], full[n]) for n in names)


def test_a_shared_opening_is_measured_once_and_counted_per_row(tiny_model_dir) -> None:
    """Rows that start alike (chat template, instruction): the opening runs once, its inputs count once per row,
    the rows continue from its cache; the matrices are those of whole rows, up to float rounding."""
    from transformers import AutoModelForCausalLM

    from pipeline.calibration import _batches

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    opening = [5, 6, 7, 8, 9]
    rows = [opening + [10, 11, 12], opening + [13], opening + [14, 15, 16, 17, 18], opening + [19, 20]]
    whole = G.calibration_hessians(model, _batches(rows, 0, 3), names)
    seen = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        shared = G.calibration_hessians(model, _batches(rows, len(opening), 3), names,
                                        opening=torch.tensor([opening]), opening_rows=len(rows))
    finally:
        hook.remove()
    # measured once; then, per batch of 3 rows, the opening's cache (not measured) and the rows' rests
    assert seen == [(1, 5), (1, 5), (3, 5), (1, 5), (1, 2)]
    assert shared.keys() == whole.keys() == set(names)
    assert all(np.allclose(shared[n], whole[n], rtol=1e-4, atol=1e-6) for n in names)
    assert not np.allclose(shared["lm_head"], G.calibration_hessians(model, _batches(rows[:1], 0, 3), names)["lm_head"])


def test_calibrated_blocks_replace_the_onnx_weights_and_compute_what_they_say(tmp_path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_quant import _quantize_matmuls

    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 64)).astype(np.float32)  # nn.Linear layout [out, in]; ONNX MatMul takes w.T
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])], [numpy_helper.from_array(w.T.copy(), "w")])
    model = _quantize_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=4,
                              block_size=32, accuracy_level=0, op_types=("MatMul",), symmetric=False)
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    assert G.apply_to_onnx(model, {"model.layers.0.mlp.up_proj": G.round_to_nearest(w, 32)}) == [
        "model.layers.0.mlp.up_proj"]
    assert all(np.array_equal(before[i.name], numpy_helper.to_array(i)) for i in model.graph.initializer)

    x = _correlated_inputs(rng, 500, 64)
    q = G.gptq(w, x.T @ x / len(x), 32)
    G.apply_to_onnx(model, {"model.layers.0.mlp.up_proj": q})
    onnx.save(model, str(tmp_path / "m.onnx"))
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(y, x @ q.dequantize().T, atol=1e-3)
    with pytest.raises(ValueError, match="block size"):
        G.apply_to_onnx(model, {"model.layers.0.mlp.up_proj": G.round_to_nearest(w, 16)})


def test_gptq_codes_land_in_bitsandbytes_nf4_unchanged() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    quantized = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True,
                                                      compute_dtype=torch.float32))
    quantized[0].weight = bnb.nn.Params4bit(reference[0].weight.data.clone(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=True)
    quantized[0].weight = quantized[0].weight._quantize("cpu") if hasattr(quantized[0].weight, "_quantize") \
        else quantized[0].weight.to("cpu")
    x = torch.from_numpy(_correlated_inputs(np.random.default_rng(4), 3000, 128))
    state = quantized[0].weight.quant_state
    rtn = bnbf.dequantize_4bit(quantized[0].weight.data, state).clone()
    assert G.gptq_bnb_4bit(quantized, reference, {"0": (x.T @ x / len(x)).numpy()}, progress=False) == ["0"]
    refined = bnbf.dequantize_4bit(quantized[0].weight.data, state)
    # bitsandbytes' own block scales are kept: every weight is one of the 16 NF4 levels times its block's absmax
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ratio = refined.reshape(-1, 64) / absmax[:, None]
    assert (ratio.reshape(-1, 1) - state.code.reshape(1, -1)).abs().min(1).values.max() < 1e-5
    assert not torch.equal(refined, rtn)  # the codes did change
    w = reference[0].weight.detach()
    err = lambda v: float(((x @ w.T - x @ v.T) ** 2).mean())  # noqa: E731
    assert err(refined) < 0.8 * err(rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_layers_rounded_together_get_the_codes_each_gets_alone(act_order: bool) -> None:
    """gptq_batch stacks layers of one shape into one pass over the columns: each layer's codes, scales and zero
    points are bit for bit those of its own pass (uniform grid and a codebook; an input the text never uses)."""
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((24, 128)).astype(np.float32) for _ in range(3)]
    hessians = []
    for _ in weights:
        x = _correlated_inputs(rng, 1500, 128)
        hessians.append(x.T @ x / len(x))
    hessians[1][7, :] = hessians[1][:, 7] = 0  # a dead input in one layer only
    together = G.gptq_batch(weights, hessians, 32, act_order=act_order)
    for w, h, q in zip(weights, hessians, together):
        alone = G.gptq(w, h, 32, act_order=act_order)
        assert all(np.array_equal(getattr(q, f), getattr(alone, f)) for f in ("codes", "scales", "zeros"))
    levels = np.linspace(-1, 1, 16, dtype=np.float32)
    scales = [np.abs(w).reshape(24, -1, 32).max(axis=2) for w in weights]
    together = G.gptq_batch(weights, hessians, 32, codebook=levels, scales=scales, act_order=act_order)
    for w, h, s, q in zip(weights, hessians, scales, together):
        assert np.array_equal(q.codes, G.gptq(w, h, 32, codebook=levels, scales=s, act_order=act_order).codes)
