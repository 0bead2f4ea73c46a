"""The edge bundle's runner and the server's ONNX engine: verification, per-request adapters, interleaving."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import onnx
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge.bundle import FORMAT, BundleError, EdgeRunner, load_bundle
from exporters.kv_prefix import adapter_prefix, save_prefix
from exporters.onnx import export_onnx_fp32
from exporters.onnx_lora import add_lora_inputs, write_onnx_adapter
from pipeline.artifacts import write_manifest
from serve.engine import GenRequest
from serve.onnx_engine import OnnxEngine


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
        assert set(engine.known_sources) == {"alpha", "beta", "gamma"}
        engine.run_command(lambda: engine.load(engine.inspect("alpha", "alpha"), "alpha"))
        assert len(engine.adapters) == 2 and list(engine.adapters)[-1] == "alpha"
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
