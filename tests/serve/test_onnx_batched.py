"""The ONNX backend's batched path: the fused graph, slots written in place, stacked LoRA rows, the prefix
cache, and the vLLM adapter routes and the official ``openai`` client on it.

Every check compares with the bundle's own graph run alone (the edge runtime, batch 1): a row in a mixed
batch must get exactly the greedy tokens it gets alone, whatever its neighbours are and whenever they join
or leave."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, TaskType

from edge.bundle import EdgeRunner, load_bundle, sha256
from edge.session import Prefix
from edge.slots import SlotDecoder
from exporters.fused_graph import fuse_decoder
from serve.engine import GenRequest
from serve.onnx_engine import OnnxEngine
from tests.serve.requests import run_request
from tests.serve.test_onnx_backend import _peft, bundle  # noqa: F401 - the hand-made bundle fixture

KINDS = [None, "alpha", "beta", "gamma", "delta"]
"""The bare base, two LoRA adapters, a prefix adapter and a merged model: every kind a bundle holds."""


@pytest.fixture(scope="module")
def mixed(bundle: Path, tiny_model_dir: Path, tmp_path_factory) -> Path:  # noqa: F811
    """The hand-made bundle plus ``delta``, a merged model (a LoRA merged into the tiny base, exported)."""
    import json

    from transformers import AutoModelForCausalLM

    from exporters.onnx import export_onnx_fp32

    root = tmp_path_factory.mktemp("mixed") / "bundle"
    shutil.copytree(bundle, root)
    work = tmp_path_factory.mktemp("delta")
    lora = _peft(tiny_model_dir, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            task_type=TaskType.CAUSAL_LM), work / "lora", 7)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       lora).merge_and_unload()
    merged.save_pretrained(work / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, work / "merged" / name)
    (root / "merged").mkdir()
    shutil.copy(export_onnx_fp32(work / "merged", work / "onnx") / "model.onnx", root / "merged/delta.onnx")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["adapters"]["delta"] = {"kind": "merged", "file": "merged/delta.onnx"}
    manifest["files"]["merged/delta.onnx"] = {"bytes": (root / "merged/delta.onnx").stat().st_size,
                                              "sha256": sha256(root / "merged/delta.onnx")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def runner(mixed: Path) -> EdgeRunner:
    """The bundle's own graphs, batch 1: the reference. No stop token, so every answer runs its full budget."""
    runner = EdgeRunner(load_bundle(mixed), threads=1)
    runner.stop_ids = []
    return runner


def _alone(runner: EdgeRunner, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    decoder, lora, prefix = runner.resolve(adapter)
    return list(decoder.stream(prompt, n, adapter=lora, prefix=prefix))


def test_the_fused_graph_computes_the_bundle_graphs_logits(runner: EdgeRunner) -> None:
    """In one run: a base row, two LoRA rows on stacked factors and a prefix row, prompts of unequal length
    (the shorter ones padded); then decode steps where every row sits at its own length."""
    fused = SlotDecoder(fuse_decoder(runner.bundle.model_path, max_length=64), slots=4, threads=1, capacity=8)
    for name in ("alpha", "beta"):
        fused.load_lora(name, runner.bundle.root / runner.bundle.adapters[name].file)
    prefix = Prefix.load(runner.bundle.root / runner.bundle.adapters["gamma"].file)
    prompts = [runner.encode_chat(text) for text in ("hi", "ship the order to city", "great", "the review was ok")]
    rows = [(None, None), ("alpha", None), ("beta", None), (None, prefix)]
    for slot, (lora, _) in enumerate(rows):
        fused.set_adapter(slot, lora)
    fused.write_prefix(3, prefix)
    # rows 0-2 start empty and prefill together; row 3 holds its prefix and prefills alone
    logits = list(fused.prefill(0, prompts[:3])) + list(fused.prefill(3, prompts[3:], [prefix.length]))
    tokens = [[int(np.argmax(x))] for x in logits]
    for _ in range(5):  # past the initial capacity of 8 positions: the buffers grow, rows keep their cache
        logits = fused.decode([t[-1] for t in tokens])
        for row, x in zip(tokens, logits):
            row.append(int(np.argmax(x)))
    runner.resolve("alpha"), runner.resolve("beta")  # the reference graph's .onnx_adapter copies
    for (lora, pre), prompt, got, row_logits in zip(rows, prompts, tokens, logits):
        ids = np.asarray([prompt + got[:-1]])
        want = runner.base.logits(ids, adapter=lora, prefix=pre)[0, -1]
        assert np.abs(want - row_logits).max() < 1e-4
        assert got == list(runner.base.stream(prompt, 6, adapter=lora, prefix=pre))
    assert fused.capacity > 8 and fused.lora.ranges.keys() == {"alpha", "beta"}


def test_a_lora_stack_reuses_freed_rows_and_grows_when_full(runner: EdgeRunner, tmp_path: Path) -> None:
    fused = SlotDecoder(fuse_decoder(runner.bundle.model_path, max_length=32), slots=2, threads=1)
    path = runner.bundle.root / runner.bundle.adapters["alpha"].file
    for name in ("a", "b", "c"):
        fused.load_lora(name, path)
    assert [fused.lora.ranges[n].start for n in "abc"] == [0, 4, 8] and fused.lora.capacity >= 12
    fused.unload_lora("b")
    assert all(not a[4:8].any() for a in fused.lora.a.values())  # zeroed
    fused.load_lora("d", path)
    assert fused.lora.ranges["d"].start == 4  # the freed rows, no growth
    with pytest.raises(ValueError, match="is not an ONNX Runtime adapter file"):
        fused.load_lora("bad", runner.bundle.root / "model.onnx")
    import onnxruntime as ort

    key = next(iter(fused.lora.a))
    foreign = ort.AdapterFormat()  # the A factor of a base with another hidden size
    foreign.set_parameters({key: ort.OrtValue.ortvalue_from_numpy(np.zeros((7, 4), np.float32))})
    foreign.export_adapter(str(tmp_path / "foreign.onnx_adapter"))
    with pytest.raises(ValueError, match="was exported for another base"):
        fused.load_lora("foreign", tmp_path / "foreign.onnx_adapter")
    assert "foreign" not in fused.lora.ranges


def test_every_row_of_a_mixed_batch_gets_its_tokens_alone_while_rows_join_and_leave(
        mixed: Path, runner: EdgeRunner) -> None:
    """Eleven requests over every kind on 4 slots with unequal budgets: requests wait, start while others run,
    finish at different steps (the last slot moves into the hole), and each gets its batch-1 tokens."""
    engine = OnnxEngine(runner, max_batch_size=4, max_queue=16, max_loaded_adapters=8)
    assert engine.mode == "batched"
    sizes: list[int] = []
    engine.on_step = sizes.append  # rows per decode run
    try:
        jobs = [(KINDS[i % len(KINDS)], f"order {i} for city {i * 7}", 3 + (i * 5) % 9) for i in range(11)]
        prompts = [runner.encode_chat(text) for _, text, _ in jobs]
        out: dict[int, dict] = {}
        done = threading.Semaphore(0)

        def request(i: int) -> GenRequest:
            def finished(reason: str, n: int, error: str | None) -> None:
                out[i] = {"reason": reason, "n": n, "error": error, "tokens": list(req.tokens)}
                done.release()

            req = GenRequest(prompt_ids=prompts[i], max_tokens=jobs[i][2], adapter=jobs[i][0], on_done=finished)
            return req

        for i in range(len(jobs)):
            engine.submit(request(i))
        for _ in jobs:
            assert done.acquire(timeout=120)
        for i, (adapter, _, budget) in enumerate(jobs):
            assert out[i]["error"] is None and out[i]["reason"] == "length", out[i]
            assert out[i]["tokens"] == _alone(runner, prompts[i], budget, adapter), (i, adapter)
        assert not engine.active and all(not g.rows for g in engine.groups.values())
        assert max(sizes) >= 3  # base, LoRA and prefix rows shared decode runs (the merged model runs its own)
    finally:
        engine.shutdown(5)


def test_the_prefix_cache_serves_repeated_prompts_with_the_same_tokens(mixed: Path, runner: EdgeRunner) -> None:
    """A repeated prompt copies its cached blocks and runs only its last token (in a decode step); a prompt that
    shares only its beginning copies those blocks and prefills the rest; answers never change."""
    engine = OnnxEngine(runner, max_batch_size=2, prefix_cache_mb=8)
    try:
        shared = runner.encode_chat("the same long instruction about the order, then: ship it to the city")
        other = shared[:-6] + runner.encode_chat("no")[-6:]
        for adapter in ("alpha", "gamma", None, "delta"):
            first = run_request(engine, shared, 6, adapter=adapter)["tokens"]
            hits = engine.cache.hits
            again = run_request(engine, shared, 6, adapter=adapter)["tokens"]
            assert engine.cache.hits - hits == len(shared) - 1  # all but the last token came from the cache
            assert first == again == _alone(runner, shared, 6, adapter)
            hits = engine.cache.hits
            assert run_request(engine, other, 6, adapter=adapter)["tokens"] == _alone(runner, other, 6, adapter)
            assert 0 < engine.cache.hits - hits < len(other) - 1
        # an adapter's blocks are its own: the base's cache does not answer for alpha
        engine.cache.clear()
        run_request(engine, shared, 2)
        hits = engine.cache.hits
        assert run_request(engine, shared, 6, adapter="beta")["tokens"] == _alone(runner, shared, 6, "beta")
        assert engine.cache.hits == hits
    finally:
        engine.shutdown(5)


def test_unloading_an_adapter_frees_its_stack_rows_and_cached_blocks(mixed: Path, runner: EdgeRunner) -> None:
    engine = OnnxEngine(runner, max_batch_size=2)
    try:
        prompt = runner.encode_chat("ship it")
        want = run_request(engine, prompt, 4, adapter="alpha")["tokens"]
        base = engine.groups[None].decoder
        assert "alpha" in base.lora.ranges and engine.cache.stats()["blocks"] > 0
        assert engine.run_command(lambda: engine.unload("alpha"))
        assert "alpha" not in base.lora.ranges and engine.cache.stats()["blocks"] == 0
        assert run_request(engine, prompt, 4, adapter="alpha")["error"]  # unknown until loaded again
        engine.run_command(lambda: engine.load(engine.inspect("alpha", "alpha"), "alpha"))
        assert run_request(engine, prompt, 4, adapter="alpha")["tokens"] == want
    finally:
        engine.shutdown(5)


def test_a_graph_that_cannot_be_fused_is_served_interleaved(runner: EdgeRunner,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import exporters.fused_graph

    def refuse(*args, **kwargs):
        raise exporters.fused_graph.FuseError("no q_proj under /model/layers.0/self_attn/")

    monkeypatch.setattr(exporters.fused_graph, "fuse_decoder", refuse)
    _serves_interleaved(runner)


def _serves_interleaved(runner: EdgeRunner) -> None:
    """A new engine over ``runner`` fell back to interleaved serving, and answers as the bundle's graph alone."""
    engine = OnnxEngine(runner, max_batch_size=2)
    try:
        assert engine.mode == "interleaved" and not engine.groups
        prompt = runner.encode_chat("great")
        assert run_request(engine, prompt, 4, adapter="beta")["tokens"] == _alone(runner, prompt, 4, "beta")
    finally:
        engine.shutdown(5)


def test_a_fused_graph_that_disagrees_with_the_bundle_is_not_served(runner: EdgeRunner,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up probe compares the fused graph with the bundle's own: a wrong rewrite falls back."""
    original = SlotDecoder.prefill

    def off(self, *args, **kwargs):
        return original(self, *args, **kwargs) + 3.0 * np.arange(self.vocab, dtype=np.float32) / self.vocab

    monkeypatch.setattr(SlotDecoder, "prefill", off)
    _serves_interleaved(runner)

    def rejected(self, *args, **kwargs):
        raise RuntimeError("Non-zero status code returned while running GroupQueryAttention node")

    monkeypatch.setattr(SlotDecoder, "prefill", rejected)  # a graph ONNX Runtime refuses to run: the same
    _serves_interleaved(runner)


def test_a_gpu_provider_serves_interleaved(runner: EdgeRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots are host memory bound by address: on a GPU provider the engine interleaves instead."""
    monkeypatch.setattr(runner, "providers", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _serves_interleaved(runner)


# ---- over HTTP: vLLM's adapter routes and the official openai client, ONNX backend -------------------------
def test_openai_client_and_a_vllm_load_unload_sequence_on_the_onnx_backend(mixed: Path, runner: EdgeRunner) -> None:
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from serve.app import create_app
    from serve.settings import ServeSettings

    with TestClient(create_app(ServeSettings(backend="onnx", bundle=str(mixed), preload=False))) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        ask = dict(model="alpha", messages=[{"role": "user", "content": "ship it"}], max_tokens=5, temperature=0)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 404  # not loaded
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "alpha"})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'alpha' added successfully."
        chat = client.chat.completions.create(**ask)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                           if c.choices)
        assert streamed == chat.choices[0].message.content and chat.usage.completion_tokens <= 5
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "alpha"})
        assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
        # by the path of its file, in place: a hot swap to the other adapter under the same name
        path = str(mixed / "adapters/beta.onnx_adapter")
        swapped = http.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": path,
                                                           "load_inplace": True})
        assert swapped.status_code == 200
        ids = runner.encode_chat("ship it")
        as_beta = runner.tokenizer.decode(_alone(runner, ids, 5, "beta"), skip_special_tokens=True)
        assert client.chat.completions.create(**ask).choices[0].message.content == as_beta
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nope"})
        assert missing.status_code == 404 and "No adapter found" in missing.json()["error"]["message"]
        for body in ({"lora_name": "x"}, {"lora_path": "alpha"}):
            assert http.post("/v1/load_lora_adapter", json=body).status_code == 400
        assert http.post("/v1/unload_lora_adapter", json={}).status_code == 400
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
        assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'alpha' removed successfully."
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 404
        assert http.post("/v1/chat/completions", json=ask).status_code == 404  # unknown until loaded again


def test_the_metrics_report_the_prefix_cache(mixed: Path) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import ServeSettings

    with TestClient(create_app(ServeSettings(backend="onnx", bundle=str(mixed)))) as http:
        body = {"model": "alpha", "prompt": "a prompt long enough to fill some blocks of the cache", "max_tokens": 2,
                "temperature": 0}
        for _ in range(2):
            assert http.post("/v1/completions", json=body).status_code == 200
        metrics = {line.split()[0]: float(line.split()[1]) for line in http.get("/metrics").text.splitlines()
                   if line.startswith("edgetune_prefix_cache")}
    assert 0.3 < metrics["edgetune_prefix_cache_hit_ratio"] < 0.5  # the second of two equal prompts: ~all cached
    assert metrics["edgetune_prefix_cache_bytes"] > 0


def test_decoder_refuses_a_cache_beyond_its_context(runner: EdgeRunner) -> None:
    fused = SlotDecoder(fuse_decoder(runner.bundle.model_path, max_length=16), slots=1, threads=1)
    with pytest.raises(ValueError, match="exceed the context"):
        fused.prefill(0, [list(range(20))])
