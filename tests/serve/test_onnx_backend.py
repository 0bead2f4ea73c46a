"""The edge bundle's runner and the server's ONNX engine: verification, per-request adapters, interleaving,
stop strings, finish reasons, the context budget, sampling and multi-message chat over HTTP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge.bundle import FORMAT, BundleError, EdgeRunner, load_bundle
from edge.generation import FinishReason, Sampling
from edge.runtime import Decoder, resolve_providers
from exporters.kv_prefix import adapter_prefix, save_prefix
from exporters.onnx import export_onnx_fp32
from exporters.onnx_lora import add_lora_inputs, write_onnx_adapter
from pipeline.artifacts import write_manifest
from serve.engine import GenRequest
from serve.onnx_engine import OnnxEngine
from serve.protocol import GenerationEngine
from tests.serve.requests import run_request
from tests.tiny_model import CHAT_TEMPLATE


def _peft(tiny: Path, config, out: Path, seed: int, std: float = 0.5) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=std)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bundle(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A hand-made fp32 bundle: two LoRA adapters and a prefix adapter over one base."""
    work = tmp_path_factory.mktemp("bundle-src")
    root = tmp_path_factory.mktemp("bundle")
    model = onnx.load(str(export_onnx_fp32(tiny_model_dir, work / "fp32") / "model.onnx"))
    add_lora_inputs(model)
    onnx.save(model, str(root / "model.onnx"))
    (root / "adapters").mkdir()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_onnx_adapter(_peft(tiny_model_dir, lora, work / name, seed), root / f"adapters/{name}.onnx_adapter")
    prefix = _peft(tiny_model_dir, PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM),
                   work / "gamma", 3, std=4.0)  # large keys/values: enough to move a random model's greedy text
    save_prefix(adapter_prefix(prefix, tiny_model_dir), root / "adapters/gamma.prefix.npz")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (root / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (root / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # what pipeline/bundle.py ships: several messages
    write_manifest(root, stage="export", fp="test", inputs={}, config_hash="test", extra={
        "format": FORMAT, "base_name": "tiny", "model": "model.onnx", "tokenizer": "tokenizer.json",
        "chat": {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n<|im_start|>assistant\n"},
        "stop_token_ids": [tok.eos_token_id], "pad_token_id": tok.pad_token_id, "context_length": 256,
        "adapters": {"alpha": {"kind": "lora", "file": "adapters/alpha.onnx_adapter"},
                     "beta": {"kind": "lora", "file": "adapters/beta.onnx_adapter"},
                     "gamma": {"kind": "prefix", "file": "adapters/gamma.prefix.npz"}}})
    return root


def test_each_adapter_changes_the_answer_and_a_request_names_its_own(bundle: Path) -> None:
    runner = EdgeRunner(load_bundle(bundle), threads=1)
    answers = {name: runner.generate("the review was great", adapter=name, max_tokens=8)
               for name in (None, "alpha", "beta", "gamma")}
    assert len(set(answers.values())) == 4, answers  # base and three adapters: four different models
    with pytest.raises(BundleError, match="not in the bundle.*alpha, beta, gamma"):
        runner.generate("hi", adapter="delta")


def test_concurrent_requests_for_different_adapters_get_their_sequential_answers(bundle: Path) -> None:
    runner = EdgeRunner(load_bundle(bundle), threads=1)
    engine = OnnxEngine(runner, max_batch_size=4, max_queue=8, max_loaded_adapters=2)
    assert isinstance(engine, GenerationEngine)  # the contract the app serves through
    try:
        names = [None, "alpha", "beta", "gamma", "alpha", None]
        prompts = [runner.encode_chat(f"order {i} ship to city") for i in range(len(names))]
        expected = ["".join(runner.stream_text(p, 6, adapter=n)) for p, n in zip(prompts, names)]
        results: dict[int, list] = {i: [] for i in range(len(names))}
        done = threading.Semaphore(0)
        reasons: dict[int, str] = {}

        def request(i: int) -> GenRequest:
            def finished(reason: str, n: int, error: str | None) -> None:
                reasons[i] = reason
                done.release()

            return GenRequest(prompt_ids=prompts[i], max_tokens=6, adapter=names[i],
                              on_text=results[i].append, on_done=finished)

        for i in range(len(names)):
            engine.submit(request(i))
        for _ in names:
            assert done.acquire(timeout=120)
        assert set(reasons.values()) <= {"stop", "length"}, reasons
        assert ["".join(results[i]) for i in range(len(names))] == expected
        # three adapters ran at once, so none could be evicted mid-request; the next load (idle) trims to 2
        assert {e.name for e in engine.registry.snapshot()} == {"alpha", "beta", "gamma"}
        engine.run_command(lambda: engine.load(engine.inspect("alpha", "alpha"), "alpha"))
        assert len(engine.registry.loaded()) == 2 and engine.registry.loaded()[-1] == "alpha"
    finally:
        engine.shutdown(5)


def test_a_changed_file_fails_verification(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "adapters" / "beta.onnx_adapter", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match=r"adapters/beta\.onnx_adapter does not match its sha256"):
        load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = "something-else/9"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format"):
        load_bundle(copy, verify=False)


# ---- the generation tail on the ONNX engine (shared with the edge runtime) -------------------------------
@pytest.fixture()
def endless(bundle: Path) -> EdgeRunner:
    """A runner with no stop token: every answer runs to its token budget (the random model's EOS is luck)."""
    runner = EdgeRunner(load_bundle(bundle, verify=False), threads=1)
    runner.stop_ids = []
    return runner


def test_stop_strings_end_the_text_before_them(endless: EdgeRunner) -> None:
    prompt = endless.encode_chat("the review was great")
    full = "".join(endless.stream_text(prompt, 24, adapter="alpha"))  # the bare base answers only newlines
    stop = full[8:11]  # somewhere in the middle of the answer
    assert len(stop) == 3 and full.find(stop) > 0, full
    engine = OnnxEngine(endless, max_batch_size=2)
    try:
        cut = run_request(engine, prompt, 24, adapter="alpha", stop=["zzzz", stop])
        assert cut["reason"] == FinishReason.STOP == "stop" and cut["text"] == full[:full.find(stop)]
        assert cut["n"] < 24 and cut["error"] is None
        assert "".join(endless.stream_text(prompt, 24, adapter="alpha", stop=[stop])) == cut["text"]  # the edge runtime agrees
        whole = run_request(engine, prompt, 24, adapter="alpha", stop=["zzzz"])  # no stop string in the text: the budget ends it
        assert (whole["reason"], whole["n"], whole["text"]) == ("length", 24, full)
    finally:
        engine.shutdown(5)


def test_timeout_and_cancellation_have_their_own_finish_reasons(endless: EdgeRunner) -> None:
    prompt = endless.encode_chat("ship to city")
    engine = OnnxEngine(endless, max_batch_size=2)
    try:
        late = run_request(engine, prompt, 20, deadline=time.monotonic() - 1)  # already past: ends before a token
        assert (late["reason"], late["n"], late["text"]) == (FinishReason.TIMEOUT, 0, "")
        gone = run_request(engine, prompt, 20, cancel_on_text=True)
        assert gone["reason"] == FinishReason.CANCELLED == "cancelled"  # it was "stop" here; "cancelled" on torch
        assert len(gone["pieces"]) == 1 and gone["error"] is None and 1 <= gone["n"] < 20
    finally:
        engine.shutdown(5)


def test_the_context_budget_clips_max_tokens_and_refuses_a_full_context(endless: EdgeRunner) -> None:
    endless.context_length = 32
    engine = OnnxEngine(endless, max_batch_size=2)
    ids = endless.encode_chat("the order shipped to Oslo in may and the review was great")
    prompt = (ids * 4)[:24]
    try:
        base = run_request(engine, prompt, 20)
        assert (base["reason"], base["n"]) == ("length", 8)  # 32 - 24 left, not the 20 asked for
        prefixed = run_request(engine, prompt, 20, adapter="gamma")
        assert (prefixed["reason"], prefixed["n"]) == ("length", 4)  # gamma's 4 virtual tokens take room too
        full = run_request(engine, (ids * 4)[:32], 5)
        assert full["reason"] == "error" and "the context holds 32" in full["error"] and full["n"] == 0
        with pytest.raises(ValueError, match="the context holds 32"):
            list(endless.stream_text((ids * 4)[:32], 5))  # the edge runtime: the same rule
    finally:
        engine.shutdown(5)


def test_sampling_on_the_engine_is_the_edge_runtimes(endless: EdgeRunner) -> None:
    """A seed repeats on both; a tiny top_p leaves only the most probable token: the greedy answer."""
    prompt = endless.encode_chat("great item")
    engine = OnnxEngine(endless, max_batch_size=2)
    try:
        seeded = [run_request(engine, prompt, 12, temperature=1.0, top_p=0.9, seed=seed)["text"] for seed in (3, 3)]
        assert seeded[0] == seeded[1] == "".join(endless.stream_text(prompt, 12, sampling=Sampling(1.0, 0.9, 3)))
        greedy = "".join(endless.stream_text(prompt, 12))
        assert seeded[0] != greedy
        assert run_request(engine, prompt, 12, temperature=1.0, top_p=1e-6, seed=5)["text"] == greedy
    finally:
        engine.shutdown(5)


def test_a_multi_message_chat_over_http_uses_the_bundles_template(bundle: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import ServeSettings

    messages = [{"role": "system", "content": "You label reviews."},
                {"role": "user", "content": "Review: great kettle."},
                {"role": "assistant", "content": "positive"},
                {"role": "user", "content": "Review: terrible order."}]
    rendered = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    runner = EdgeRunner(load_bundle(bundle), threads=1)
    ids = runner.tokenizer.encode(rendered, add_special_tokens=False).ids
    with TestClient(create_app(ServeSettings(backend="onnx", bundle=str(bundle), preload=False))) as client:
        got = client.post("/v1/chat/completions", json={"model": "alpha", "messages": messages, "max_tokens": 10,
                                                        "temperature": 0})
        assert got.status_code == 200, got.text
        body = got.json()
    assert body["usage"]["prompt_tokens"] == len(ids)  # the prompt is what transformers renders from the template
    assert body["choices"][0]["message"]["content"] == "".join(runner.stream_text(ids, 10, adapter="alpha"))
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


# ---- execution providers (the CUDA one runs in tests/gpu) -------------------------------------------------
def _available(monkeypatch: pytest.MonkeyPatch, *providers: str) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))


def test_provider_names_map_to_onnx_runtimes_with_the_cpu_last(monkeypatch: pytest.MonkeyPatch) -> None:
    _available(monkeypatch, "CUDAExecutionProvider", "CPUExecutionProvider")
    assert resolve_providers(None) == resolve_providers([]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cuda"]) == resolve_providers(["CUDAExecutionProvider", "cpu", "cuda"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'; use cpu, cuda"):
        resolve_providers(["tpu"])


def test_cuda_without_onnxruntime_gpu_is_refused_with_the_install_hint(
        bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from edge import cli as edge_cli
    from serve.adapters import AdapterError
    from serve.onnx_engine import start_onnx_engine
    from serve.settings import ServeSettings

    _available(monkeypatch, "CPUExecutionProvider")
    hint = r"'cuda' \(CUDAExecutionProvider\) is not in this onnxruntime .* pip install 'edgetune\[gpu\]'"
    with pytest.raises(ValueError, match=hint):
        resolve_providers(["cuda"])
    assert edge_cli.main([str(bundle), "--providers", "cuda,cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgetune: error: execution provider 'cuda'") and "edgetune[gpu]" in err
    with pytest.raises(AdapterError, match=hint):
        start_onnx_engine(bundle, ServeSettings(backend="onnx", bundle=str(bundle), providers=("cuda",)))


def test_a_provider_onnx_runtime_cannot_start_is_an_error_not_a_silent_cpu_run(
        bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that lists CUDA but cannot start it (no GPU, missing CUDA libraries) would fall back to the CPU."""
    _available(monkeypatch, "CUDAExecutionProvider", "CPUExecutionProvider")
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",  # what ORT does then: the session runs on the CPU alone
                        lambda path, options, providers: real(path, options, providers=["CPUExecutionProvider"]))
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider for model.onnx"):
        Decoder(bundle / "model.onnx", threads=1, providers=["cuda"])


def test_run_edge_takes_the_cpu_provider(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge import cli as edge_cli

    prompt = "the review was great"
    assert edge_cli.main([str(bundle), prompt, "--raw", "--max-tokens", "4", "--threads", "1", "--providers", "cpu"]) == 0
    runner = EdgeRunner(load_bundle(bundle), threads=1, providers=["cpu"])
    assert runner.base.providers == ["CPUExecutionProvider"]
    ids = runner.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert capsys.readouterr().out == "".join(runner.stream_text(ids, 4)) + "\n"
