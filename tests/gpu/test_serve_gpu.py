"""The server on a CUDA GPU: every adapter kind in one mixed batch gives each adapter's own greedy tokens
(float32 and bfloat16 bases, and bitsandbytes int8/NF4 bases served without error), the HTTP app answers on
the GPU, and the edge runtime runs on ONNX Runtime's CUDA provider.

Run by ``make gpu-check`` (``pytest -m gpu``); without a CUDA device these tests are skipped with the reason.
Each test prints one summary line per adapter kind (``gpu_line``, shown at the end of the session).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models import load_tokenizer
from serve.engine import Engine, load_base
from tests.serve.adapter_kinds import (
    KINDS,
    SERVED,
    Row,
    adapter_effects,
    build_adapter,
    load_every_kind,
    serve_alone_and_mixed,
)
from tests.serve.requests import run_request

pytestmark = pytest.mark.gpu

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.05, "int8": 0.05, "nf4": 0.05}
"""Largest logit difference between a row in a mixed batch and the same request alone: float32 differs only
in summation order between batch shapes; bfloat16 and the bitsandbytes kernels round more coarsely."""


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter of every kind for the tiny base, one folder each (named after its kind)."""
    root = tmp_path_factory.mktemp("gpu-adapters")
    for kind in KINDS:
        build_adapter(kind, tiny_model_dir, root / kind)
    return root


def _agreement(alone: Row, mixed: Row, tolerance: float, exact: bool) -> str:
    """Check that ``mixed`` is ``alone`` served in a batch; say how. Up to where their tokens part (if they do),
    their logits stay within ``tolerance``. ``exact``: they must not part; else they may only at a near tie
    (the two tokens' logits closer than twice the tolerance), the rounding of a coarser dtype."""
    n = len(alone.tokens)
    agree = next((i for i, (a, m) in enumerate(zip(alone.tokens, mixed.tokens)) if a != m), n)
    worst = max(float((alone.logits[i] - mixed.logits[i]).abs().max()) for i in range(min(agree + 1, n)))
    assert worst < tolerance, f"{alone.adapter}: logits differ by {worst:.2e} mixed vs alone (> {tolerance})"
    if agree == n:
        return f"mixed == alone ({n} tokens, max logit diff {worst:.1e})"
    assert not exact, f"{alone.adapter}: mixed {mixed.tokens} != alone {alone.tokens}"
    logits = alone.logits[agree]
    margin = float(logits[alone.tokens[agree]] - logits[mixed.tokens[agree]])
    assert margin < 2 * tolerance, f"{alone.adapter}: tokens part at step {agree} on a clear choice ({margin:.2e})"
    return f"mixed == alone on the first {agree} of {n} tokens, then a near tie (margin {margin:.1e})"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_adapter_kind_in_one_mixed_batch_on_cuda(dtype: str, tiny_model_dir: Path, adapter_root: Path,
                                                       gpu_line) -> None:
    """float32: each row's greedy tokens equal its adapter's alone. bfloat16: equal too, except that a row may
    part from its alone run at a near tie (different batch shapes round differently), never on a clear choice."""
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_base(tiny_model_dir, "none", device="cuda", dtype=dtype), tokenizer,
                    max_batch_size=len(SERVED))
    try:
        load_every_kind(engine, adapter_root)
        assert engine.device.type == "cuda" and engine.dtype == getattr(torch, dtype)
        alone, mixed, batch = serve_alone_and_mixed(engine, tokenizer)
    finally:
        engine.shutdown(1)
    assert batch == len(SERVED)  # one decode step ran every kind (and the base on every prompt)
    effects = adapter_effects(alone)
    assert min(effects.values()) > 2 * TOLERANCE[dtype], effects  # each row is its own adapter's
    for a, m in zip(alone, mixed):
        verdict = _agreement(a, m, TOLERANCE[dtype], exact=dtype == "float32")
        if a.adapter is not None:
            gpu_line(f"gpu serve cuda/{dtype} {a.adapter}: {verdict}")


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_bitsandbytes_base_serves_every_adapter_kind_on_cuda(quantize: str, tiny_model_dir: Path,
                                                               adapter_root: Path, gpu_line) -> None:
    """Every kind decodes in one batch on a quantized base on the GPU. The first token (each prefill runs alone)
    is the alone run's; after it, LLM.int8 picks outlier columns from the whole batch, so later tokens may part."""
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_base(tiny_model_dir, quantize, device="cuda"), tokenizer, max_batch_size=len(SERVED))
    try:
        load_every_kind(engine, adapter_root)
        assert engine.device.type == "cuda"
        alone, mixed, batch = serve_alone_and_mixed(engine, tokenizer)
    finally:
        engine.shutdown(1)
    assert batch == len(SERVED)
    for a, m in zip(alone, mixed):
        assert m.tokens[0] == a.tokens[0], (a.adapter, a.tokens, m.tokens)
        same = next((i for i, (x, y) in enumerate(zip(a.tokens, m.tokens)) if x != y), len(a.tokens))
        if a.adapter is not None:
            gpu_line(f"gpu serve cuda/{quantize} {a.adapter}: served; mixed == alone on {same} of {len(a.tokens)} "
                     "tokens")


def test_the_http_app_answers_on_cuda(tiny_model_dir: Path, adapter_root: Path, gpu_line) -> None:
    """``edgetune serve --device cuda`` (the app loading its own base): a completion for every adapter kind is
    the engine's own greedy answer for it."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import ServeSettings

    settings = ServeSettings.from_sources({"base": str(tiny_model_dir), "adapters": str(adapter_root),
                                           "device": "cuda", "dtype": "auto", "max_rank": 8}, env={})
    app = create_app(settings)
    prompt = "Review: great mug"
    with TestClient(app) as client:
        engine = app.state.edgetune.engine
        assert engine.device.type == "cuda"
        dtype = str(engine.dtype).removeprefix("torch.")
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for kind in KINDS:
            got = client.post("/v1/completions", json={"model": kind, "prompt": prompt, "max_tokens": 6,
                                                       "temperature": 0})
            assert got.status_code == 200, got.text
            body = got.json()
            expected = run_request(engine, ids, 6, adapter=kind)
            assert body["choices"][0]["text"] == expected["text"], kind
            assert body["usage"]["completion_tokens"] == expected["n"] >= 1
            gpu_line(f"gpu serve http cuda/{dtype} {kind}: 200, {expected['n']} tokens, "
                     f"finish {body['choices'][0]['finish_reason']}")


def test_the_edge_runtime_on_onnx_runtimes_cuda_provider(tiny_model_dir: Path, tmp_path: Path, gpu_line) -> None:
    """The edge decoder on CUDAExecutionProvider gives the CPU provider's logits and greedy tokens, bare, with a
    LoRA ``.onnx_adapter`` and with a key/value prefix."""
    import onnx
    import onnxruntime as ort
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from edge.runtime import Decoder
    from exporters.kv_prefix import adapter_prefix
    from exporters.onnx import export_onnx_fp32
    from exporters.onnx_lora import add_lora_inputs, write_onnx_adapter
    from pipeline.models import load_model

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                    f"{', '.join(ort.get_available_providers())}): pip install 'edgetune[gpu]' (onnxruntime-gpu)")
    model = onnx.load(str(export_onnx_fp32(tiny_model_dir, tmp_path / "fp32") / "model.onnx"))
    add_lora_inputs(model)
    onnx.save(model, str(tmp_path / "model.onnx"))
    torch.manual_seed(1)
    lora = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    write_onnx_adapter(tmp_path / "lora", tmp_path / "lora.onnx_adapter")
    torch.manual_seed(3)
    prefix_model = get_peft_model(load_model(tiny_model_dir), PrefixTuningConfig(num_virtual_tokens=4,
                                                                                 task_type="CAUSAL_LM"))
    prefix_model.save_pretrained(tmp_path / "prefix")
    prefix = adapter_prefix(tmp_path / "prefix", tiny_model_dir)

    decoders = {name: Decoder(tmp_path / "model.onnx", providers=[name]) for name in ("cpu", "cuda")}
    assert decoders["cuda"].providers[0] == "CUDAExecutionProvider"
    for decoder in decoders.values():
        decoder.load_adapter("lora", tmp_path / "lora.onnx_adapter")
    ids = load_tokenizer(tiny_model_dir)(["Review: great mug"], add_special_tokens=False)["input_ids"]
    for name, kwargs in (("base", {}), ("lora", {"adapter": "lora"}), ("prefix", {"prefix": prefix})):
        logits = {p: d.logits(ids, **kwargs) for p, d in decoders.items()}
        diff = float(abs(logits["cuda"] - logits["cpu"]).max())
        assert diff < 1e-3, (name, diff)
        tokens = {p: list(d.stream(ids[0], 8, **kwargs)) for p, d in decoders.items()}
        assert tokens["cuda"] == tokens["cpu"], (name, tokens)
        gpu_line(f"gpu edge CUDAExecutionProvider {name}: greedy == CPU provider (8 tokens, max logit diff "
                 f"{diff:.1e})")
