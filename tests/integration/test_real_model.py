"""A short run of the whole pipeline on the real embedded model (SmolLM2-135M-Instruct).

Converts the GGUF once (cached in $EDGETUNE_CACHE), trains a few steps, and checks that the
training loss falls and that every artifact loads and generates. A few minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.evaluate import load_artifact

pytestmark = pytest.mark.slow

# GGUF at q4_1 only here (it reuses onnx-int4's GPTQ blocks); every type is checked on the tiny models
SETS = ["tune.max_steps=12", "tune.batch_size=4", "tune.logging_steps=1", "tune.learning_rate=1e-3",
        "evaluate.max_rows=4", "evaluate.batch_size=4", "evaluate.speed_new_tokens=4", "evaluate.speed_repeats=1",
        "export.gguf_types=[q4_1]"]


def test_real_model_pipeline(tmp_path: Path) -> None:
    sets = [*SETS, f"out_dir={tmp_path}", "run=real"]
    argv = ["pipeline", "--config", "configs/default.yaml", "--task", "sentiment"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    run = tmp_path / "real"

    tune = json.loads((run / "adapters" / "sentiment" / "manifest.json").read_text())["metrics"]
    first = [loss for _, loss in tune["curves"]["train_loss"][:3]]
    last = [loss for _, loss in tune["curves"]["train_loss"][-3:]]
    assert sum(last) / 3 < 0.5 * sum(first) / 3, tune["curves"]["train_loss"]

    report = json.loads((run / "report.json").read_text())
    artifacts = report["tasks"]["sentiment"]["artifacts"]
    assert list(artifacts) == ["base", "adapter", "merged", "int8", "nf4", "onnx", "onnx-int8", "onnx-int4",
                               "onnx-int4@rtn-b32", "gguf", "edge"]  # the round-to-nearest int4, scored beside the GPTQ one
    for name, r in artifacts.items():
        assert r["decode_tokens_per_s"] > 0 and r["size_bytes"] > 0, name
    # Quantized artifacts are smaller on disk than the fp32 merged model.
    assert artifacts["nf4"]["size_bytes"] < artifacts["int8"]["size_bytes"] < artifacts["merged"]["size_bytes"]
    # int4 stores the tied embedding/head once, in 4 bits: under a fifth of fp32 ONNX
    assert artifacts["onnx-int4"]["size_bytes"] < 0.2 * artifacts["onnx"]["size_bytes"]
    assert artifacts["onnx-int4"]["size_bytes"] < artifacts["onnx-int8"]["size_bytes"] < artifacts["onnx"]["size_bytes"]
    edge = json.loads((run / "export" / "edge" / "manifest.json").read_text())
    assert edge["adapters"]["sentiment"]["kind"] == "lora" and edge["base_fidelity"]["precision"] == "int4"
    assert json.loads((run / "export" / "onnx" / "sentiment" / "manifest.json").read_text())[
        "metrics"]["max_abs_logit_diff"] < 1e-3
    # the 4-bit forms are calibrated on the task's training rows, and their manifests say how
    int4 = json.loads((run / "export" / "onnx-int4" / "sentiment" / "manifest.json").read_text())["metrics"]
    assert int4["recipe"].startswith("gptq:rows=128") and "calibration:sentiment" in json.loads(
        (run / "export" / "onnx-int4" / "sentiment" / "manifest.json").read_text())["inputs"]
    assert edge["recipe"].endswith(":block=32") and "gptq" in edge["recipe"]
    assert json.loads((run / "quantized" / "base-nf4" / "manifest.json").read_text())["recipe"].startswith("gptq")
    # GGUF for llama.cpp/Ollama: the merged q4_1 model and the adapter over the shared q8_0 base, both gated
    gguf = json.loads((run / "export" / "gguf" / "sentiment" / "manifest.json").read_text())["metrics"]
    assert set(gguf["files"]) == {"model-q4_1.gguf", "adapter.gguf"} and gguf["failed"] == {}
    assert gguf["files"]["adapter.gguf"]["top1_agreement"] >= 0.98
    assert (run / "export" / "gguf-base" / "model-q8_0.gguf").is_file()
    assert artifacts["gguf"]["size_bytes"] < 0.2 * artifacts["onnx"]["size_bytes"]

    cfg = load_config("configs/default.yaml", sets)
    task = cfg.task("sentiment")
    for name in artifacts:
        if "@" in name:  # a measured variant, not a published artifact
            continue
        model, tokenizer = load_artifact(cfg, task, name)
        batch = tokenizer(["<|im_start|>user\nReview: Great kettle, works well.\nLabel the sentiment.<|im_end|>\n"
                           "<|im_start|>assistant\n"], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] > batch["input_ids"].shape[1], name
        assert tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip(), name
