"""End to end on the tiny model: every stage's files, the report, no-op re-runs, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import sha256_file
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import load_examples
from pipeline.errors import EdgetuneError

ARTIFACTS = ["base", "adapter", "merged", "int8", "nf4", "onnx", "onnx-int8", "onnx-int4", "edge"]


def cli(*args: str, sets: list[str] = ()) -> int:
    argv = list(args)
    for s in sets:
        argv += ["--set", s]
    return main(argv)


@pytest.fixture(scope="module")
def user_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A user's own task: JSONL train and CSV test, named only in the config.

    Its one-token answer is one the random tiny model learns within the run's 4 steps, so the
    scores the report compares are real answers, not every artifact's 0.0."""
    folder = tmp_path_factory.mktemp("user-task")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Describe {w}", "completion": "great"}) + "\n"
                             for w in ["red", "green", "blue", "cyan"] * 4))
    test = folder / "test.csv"
    test.write_text("prompt,completion\nDescribe red,great\nDescribe blue,great\n")
    return train, test


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, user_task) -> tuple[list[str], Path]:
    out = tmp_path_factory.mktemp("runs")
    train, test = user_task
    sets = [f"base={tiny_model_dir}", f"out_dir={out}",
            f"tasks=[{{name: sentiment, train: data/tasks/sentiment/train.jsonl, test: data/tasks/sentiment/test.jsonl,"
            f" max_new_tokens: 4}}, {{name: praise, train: '{train}', test: '{test}', max_new_tokens: 1}}]"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", sets=sets) == 0
    return sets, out / "tiny"


def test_every_stage_writes_its_artifact_with_a_manifest(tiny_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = tiny_run
    for task in ("sentiment", "praise"):
        adapter = run / "adapters" / task
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        manifest = json.loads((adapter / "manifest.json").read_text())
        assert manifest["metrics"]["steps"] == 4 and manifest["method"] == "lora"
        spec = manifest["adapter"]  # the AdapterSpec every later stage reads
        assert spec["kind"] == "lora" and spec["rank"] == 4 and spec["alpha"] == 8 and len(spec["targets"]) == 14
        record = json.loads((run / "export" / "records" / f"{task}.json").read_text())
        assert record["skipped"] == {} and record["tune_fingerprint"] == manifest["fingerprint"]
        assert set(record["exported"]) == {"safetensors", "onnx", "onnx-int8", "onnx-int4", "edge"}
        train_file = Path(manifest["inputs"]["train"]["path"])
        assert manifest["inputs"]["train"]["sha256"] == sha256_file(train_file)
        assert manifest["versions"]["torch"] and manifest["config_hash"]
        merged = json.loads((run / "merged" / task / "manifest.json").read_text())
        assert merged["metrics"]["max_abs_logit_diff_vs_adapter"] < 1e-4
        int8 = json.loads((run / "quantized" / f"{task}-int8" / "config.json").read_text())
        assert int8["quantization_config"]["load_in_8bit"]  # merged, then quantized
        nf4 = json.loads((run / "quantized" / f"{task}-nf4" / "manifest.json").read_text())
        assert nf4["kind"] == "unmerged" and (run / "quantized" / f"{task}-nf4" / "adapter_model.safetensors").is_file()
    base_nf4 = json.loads((run / "quantized" / "base-nf4" / "config.json").read_text())
    assert base_nf4["quantization_config"]["load_in_4bit"]  # one quantized base shared by every task
    for task in ("sentiment", "praise"):
        assert (run / "export" / "onnx" / task / "model.onnx").is_file()
        onnx_manifest = json.loads((run / "export" / "onnx" / task / "manifest.json").read_text())
        fidelity = onnx_manifest["metrics"]
        assert fidelity["precision"] == "fp32" and fidelity["max_abs_logit_diff"] < 1e-3
        assert fidelity["top1_agreement"] == 1.0 and fidelity["kl"] < 1e-4 and fidelity["score_drop"] == 0
        for target in ("onnx-int8", "onnx-int4"):
            quantized = json.loads((run / "export" / target / task / "manifest.json").read_text())
            assert quantized["metrics"]["precision"] == target[-4:] and quantized["metrics"]["rows"] >= 1
            assert (run / "export" / target / task / "tokenizer.json").is_file()
        for target in ("onnx", "onnx-int8", "onnx-int4"):  # each with its fused sidecar, gated and hashed
            manifest = json.loads((run / "export" / target / task / "manifest.json").read_text())
            fused = manifest["metrics"]["fused"]
            assert fused["file"] == "model.fused.onnx" and "model.fused.onnx" in manifest["files"]
            assert fused["precision"] == manifest["metrics"]["precision"] and fused["rows"] == manifest["metrics"]["rows"]
            if target == "onnx":  # fp32: the same model as PyTorch, in either graph
                assert fused["max_abs_logit_diff"] < 1e-3 and fused["score_drop"] == 0
        fp16 = AutoModelForCausalLM.from_pretrained(run / "export" / "safetensors" / task, dtype="auto")
        assert fp16.dtype == torch.float16
    base_dir = Path(json.loads((run / "report.json").read_text())["tasks"]["praise"]["artifacts"]["base"]["path"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "adapters" / "praise")
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [] and not (run / "checkpoints" / "praise").exists()


def test_report_scores_every_artifact_and_equivalent_artifacts_agree(tiny_run) -> None:
    _, run = tiny_run
    report = json.loads((run / "report.json").read_text())
    assert report["schema_version"] == 1 and report["machine"]["cores"] >= 1
    for task, rows in (("sentiment", 6), ("praise", 2)):
        entry = report["tasks"][task]
        # the round-to-nearest int4 variant is scored beside the (GPTQ) onnx-int4 export: what calibration buys
        with_variant = [x for a in ARTIFACTS for x in ([a, "onnx-int4@rtn-b32"] if a == "onnx-int4" else [a])]
        assert entry["test_rows"] == rows and list(entry["artifacts"]) == with_variant
        for name, r in entry["artifacts"].items():
            assert 0.0 <= r["exact_match"] <= 1.0, name
            assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0, name
            assert r["size_bytes"] > 0 and r["decode_tokens_per_s"] > 0, name
        a = entry["artifacts"]
        # The merged model and the ONNX export are the adapter, so their scores must agree.
        assert a["merged"]["exact_match"] == a["adapter"]["exact_match"] == a["onnx"]["exact_match"]
        assert a["merged"]["perplexity"] == pytest.approx(a["adapter"]["perplexity"], rel=1e-4)
        assert a["onnx"]["perplexity"] == pytest.approx(a["merged"]["perplexity"], rel=1e-4)
        assert a["adapter"]["size_bytes"] < a["merged"]["size_bytes"]
        assert a["merged"]["perplexity"] != a["base"]["perplexity"]  # the adapter changed the model
        edge = run / "export" / "edge"  # what a device needs for the task: the base, its fused sidecar, the adapter
        assert a["edge"]["size_bytes"] == sum((edge / f).stat().st_size for f in (
            "model.onnx", "model.fused.onnx", f"adapters/{task}.onnx_adapter"))
    # ... and on praise it learned the task, so the agreement above is over answers that are right
    praise = report["tasks"]["praise"]["artifacts"]
    assert praise["adapter"]["exact_match"] == 1.0 > praise["base"]["exact_match"]
    assert (run / "plots" / "sentiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report.html").read_text()
    assert "<img src='plots/praise.png'" in page and "onnx-int4" in page
    # each task's training: the curves the report draws, the step kept and why training stopped
    for task in ("sentiment", "praise"):
        training = report["tasks"][task]["training"]
        tune = json.loads((run / "adapters" / task / "manifest.json").read_text())
        assert training["curves"] == tune["metrics"]["curves"] and training["steps"] == 4
        assert [s for s, _ in training["curves"]["eval_loss"]] == [2, 4]  # tiny.yaml: every 2 steps and the last
        assert len(training["curves"]["train_loss"]) == 4 and training["kept_step"] in (2, 4)
        assert training["validation"]["rows"] == (30 if task == "sentiment" else 1)  # 5 % of 600 and of 16 rows
        assert (run / "plots" / f"{task}-training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"<img src='plots/{task}-training.png'" in page
        assert f"kept step {training['kept_step']} ({training['stop_reason']})" in page
    md = (run / "report.md").read_text()
    assert "| artifact | exact match | perplexity | size on disk | decode tok/s (batch 1) |" in md
    assert "## praise (2 held-out rows)" in md


def test_decode_speed_is_measured_once_per_form_and_shapes(tiny_run, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    import pipeline.evaluate as evaluate

    sets, run = tiny_run
    report = json.loads((run / "report.json").read_text())
    first, second = report["tasks"]["sentiment"]["artifacts"], report["tasks"]["praise"]["artifacts"]
    # the two tasks' artifacts are the same forms with the same shapes: praise reuses sentiment's measurement
    for name, r in second.items():
        assert first[name]["speed_measured_on"] == "sentiment" and r["speed_measured_on"] == "sentiment", name
        assert r["decode_tokens_per_s"] == first[name]["decode_tokens_per_s"] and r["speed_key"] == first[name]["speed_key"]
    assert "Decode speed measured once per form and shapes: base, adapter" in (run / "report.md").read_text()
    assert len({r["speed_key"] for r in first.values()}) == len(first)  # every form measured on its own
    # an adapter of another rank is another computation: its own key (file sizes follow the shapes)
    cfg = load_config("configs/tiny.yaml", sets)
    wider = tmp_path / "praise"
    wider.mkdir()
    tensors = load_file(run / "adapters" / "praise" / "adapter_model.safetensors")
    save_file({k: torch.cat([v, torch.zeros_like(v)], 0 if "lora_A" in k else 1) for k, v in tensors.items()},
              wider / "adapter_model.safetensors")
    original = evaluate.adapter_dir
    monkeypatch.setattr(evaluate, "adapter_dir", lambda c, t: wider if t.name == "praise" else original(c, t))
    assert evaluate.speed_key(cfg, cfg.task("praise"), "adapter") != first["adapter"]["speed_key"]
    assert evaluate.speed_key(cfg, cfg.task("sentiment"), "adapter") == first["adapter"]["speed_key"]
    # a known key is reused, not measured again
    def no_timing(*args, **kwargs):
        raise AssertionError("decode speed measured again")

    monkeypatch.setattr(evaluate, "decode_speed", no_timing)
    examples = load_examples(cfg.task("praise").test)
    again = evaluate.evaluate_artifact(cfg, cfg.task("praise"), "merged", examples,
                                       {first["merged"]["speed_key"]: evaluate.speed_record(first["merged"])})
    assert again["decode_tokens_per_s"] == first["merged"]["decode_tokens_per_s"]
    assert again["speed_measured_on"] == "sentiment"
    # an artifact that is not there still fails with the loader's message, before any key is looked for
    other = cfg.task("praise").model_copy(update={"name": "other"})
    with pytest.raises(EdgetuneError, match="the edge bundle .* has no adapter 'other'"):
        evaluate.evaluate_artifact(cfg, other, "edge", [], {})


def test_rerun_is_a_noop_and_force_redoes(tiny_run, caplog) -> None:
    sets, run = tiny_run
    manifests = {p: p.read_text() for p in run.rglob("manifest.json")}
    tasks = json.loads((run / "report.json").read_text())["tasks"]
    with caplog.at_level("INFO"):  # every task: a --task run would leave a report of that task alone
        assert cli("pipeline", "--config", "configs/tiny.yaml", sets=sets) == 0
    assert {p: p.read_text() for p in run.rglob("manifest.json")} == manifests
    assert json.loads((run / "report.json").read_text())["tasks"] == tasks  # the cached scores, unchanged
    assert "tune praise: up to date" in caplog.text and "evaluate praise/onnx: up to date" in caplog.text
    assert "tune sentiment: up to date" in caplog.text
    merged = run / "merged" / "praise" / "manifest.json"
    before = json.loads(merged.read_text())
    before_inode = merged.stat().st_ino
    assert cli("merge", "--config", "configs/tiny.yaml", "--task", "praise", "--force", sets=sets) == 0
    after = json.loads(merged.read_text())
    assert merged.stat().st_ino != before_inode  # rewritten through a new folder
    assert after["fingerprint"] == before["fingerprint"] and after["outputs_sha256"] == before["outputs_sha256"]


def test_interrupted_training_resumes_from_checkpoint(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from transformers import Trainer

    from pipeline import tune

    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"out_dir={tmp_path}", "tune.max_steps=4",
                                            "tune.save_steps=2"])
    task = cfg.task("sentiment")
    original = Trainer.training_step
    calls = {"n": 0}

    def crash_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during step 3
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        tune.run(cfg, task)
    assert not (tmp_path / "tiny" / "adapters" / "sentiment").exists()  # nothing that looks complete
    assert (tmp_path / "tiny" / "checkpoints" / "sentiment" / "checkpoint-2").is_dir()
    resumed = {"n": 0}

    def count(self, *args, **kwargs):
        resumed["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", count)
    out = tune.run(cfg, task, resume=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4
    assert resumed["n"] == 2  # steps 3-4 only: steps 1-2 came from checkpoint-2


@pytest.mark.parametrize("sets, message", [
    (["tasks=[{name: t, train: missing.jsonl, test: missing.jsonl}]"], "missing.jsonl not found"),
    (["method=lorra"], "unknown method 'lorra'"),
    (["base=nonexistent-model"], "unknown base model 'nonexistent-model'"),
    (["tune.max_stpes=3"], "did you mean 'tune.max_steps'"),
    (["device=cpu", "tune.precision=fp16"], "fp16 mixed precision needs a CUDA GPU; on the CPU use bf16 or fp32"),
])
def test_bad_input_fails_cleanly(tmp_path: Path, tiny_model_dir: Path, capsys, sets, message) -> None:
    base = [] if any(s.startswith("base=") for s in sets) else [f"base={tiny_model_dir}"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", sets=base + [f"out_dir={tmp_path}", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgetune: error:") and message in err
    assert not any((tmp_path / "tiny").glob("adapters/*"))


def test_onnx_on_cuda_without_the_gpu_extra_fails_before_training(tmp_path: Path, tiny_model_dir: Path, capsys,
                                                                   monkeypatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert cli("pipeline", "--config", "configs/tiny.yaml",
               sets=[f"base={tiny_model_dir}", f"out_dir={tmp_path}", "providers=[cuda]"]) == 2
    err = capsys.readouterr().err
    assert "providers: execution provider 'cuda'" in err and "pip install 'edgetune[gpu]'" in err
    assert not (tmp_path / "tiny" / "adapters").exists()


def test_malformed_row_and_unwritable_output(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path / 'runs'}", f"tasks=[{{name: t, train: '{bad}', test: '{bad}'}}]"]
    assert cli("tune", "--config", "configs/tiny.yaml", sets=sets) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "adapters" / "t").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli("tune", "--config", "configs/tiny.yaml", sets=[f"base={tiny_model_dir}", f"out_dir={blocker}"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_text_only_test_set_reports_perplexity_without_exact_match(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pipeline.data import load_examples
    from pipeline.evaluate import evaluate_artifact

    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "the review was great"}\n{"text": "ship to Oslo"}\n')
    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"out_dir={tmp_path}",
                                            f"tasks=[{{name: notes, train: '{notes}', test: '{notes}'}}]"])
    result = evaluate_artifact(cfg, cfg.task("notes"), "base", load_examples(notes))
    assert result["exact_match"] is None and result["mistakes"] == []
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1.0


def test_a_too_strict_merge_gate_fails_the_merge_and_publishes_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                                       capsys) -> None:
    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path}", "tune.max_steps=1"]
    assert cli("tune", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 0
    merged = tmp_path / "tiny" / "merged" / "sentiment"
    assert cli("merge", "--config", "configs/tiny.yaml", "--task", "sentiment",
               sets=[*sets, "merge.max_abs_logit_diff=1e-12", "merge.fidelity_prompts=2"]) == 2
    err = capsys.readouterr().err
    assert "merged logits differ from the adapter's" in err and "merge.max_abs_logit_diff=1e-12" in err
    assert "not publishing" in err and not merged.exists()
    assert cli("merge", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 0  # the default gate
    manifest = json.loads((merged / "manifest.json").read_text())
    assert 1e-12 < manifest["metrics"]["max_abs_logit_diff_vs_adapter"] < 1e-3
    assert manifest["metrics"]["fidelity_prompts"] == 4  # merge.fidelity_prompts' default


def test_merge_rejects_non_finite_adapter_weights(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path}", "tune.max_steps=1"]
    assert cli("tune", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 0
    weights = tmp_path / "tiny" / "adapters" / "sentiment" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights)
    assert cli("merge", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "merged" / "sentiment").exists()


@pytest.mark.parametrize("method", ["prompt", "pir"])
def test_unmergeable_and_sparse_methods_flow_through_every_stage(method: str, tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    """A prompt-learning adapter is kept unmerged everywhere (and ONNX says why not); a PIR delta merges."""
    from peft import PeftModel

    from pipeline.evaluate import load_artifact

    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path}", f"method={method}", "tune.learning_rate=0.05"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 0
    run = tmp_path / "tiny"
    report = json.loads((run / "report.json").read_text())["tasks"]["sentiment"]
    cfg = load_config("configs/tiny.yaml", sets)
    task = cfg.task("sentiment")
    if method == "prompt":
        assert not (run / "merged" / "sentiment").exists() and not (run / "export" / "onnx" / "sentiment").exists()
        assert set(report["skipped"]) == {"merged", "onnx", "onnx-int8", "onnx-int4", "gguf"}
        assert report["skipped"]["gguf"] == "not in export.targets"  # configs/tiny.yaml; test_gguf_export has it
        assert "cannot be merged" in report["skipped"]["onnx"] and "key/value prefix" in report["skipped"]["onnx"]
        record = json.loads((run / "export" / "records" / "sentiment.json").read_text())
        assert record["adapter_kind"] == "prompt" and record["skipped"]["onnx-int4"] == report["skipped"]["onnx-int4"]
        assert set(record["exported"]) == {"safetensors", "edge"}
        spec = json.loads((run / "adapters" / "sentiment" / "manifest.json").read_text())["adapter"]
        assert spec["kind"] == "prompt" and spec["num_virtual_tokens"] == cfg.prompt.num_virtual_tokens
        assert set(report["artifacts"]) == {"base", "adapter", "int8", "nf4", "edge"}
        edge = json.loads((run / "export" / "edge" / "manifest.json").read_text())["adapters"]["sentiment"]
        assert edge["kind"] == "prefix" and (run / "export" / "edge" / edge["file"]).is_file()
        bundle = run / "export" / "safetensors" / "sentiment"
        assert (bundle / "model.safetensors").is_file() and (bundle / "adapter" / "adapter_config.json").is_file()
        for fmt in ("int8", "nf4"):  # the quantized base plus the soft prompt
            model, _ = load_artifact(cfg, task, fmt)
            assert isinstance(model, PeftModel)
    else:
        assert (run / "adapters" / "sentiment" / "sparse_delta.safetensors").is_file()
        assert set(report["artifacts"]) == {*ARTIFACTS, "onnx-int4@rtn-b32"} - {"gguf"}
        assert report["skipped"] == {"gguf": "not in export.targets"}
        merge = json.loads((run / "merged" / "sentiment" / "manifest.json").read_text())
        assert merge["metrics"]["max_abs_logit_diff_vs_adapter"] < 1e-4
        arts = report["artifacts"]
        assert arts["merged"]["perplexity"] == pytest.approx(arts["adapter"]["perplexity"], rel=1e-4)
        assert arts["onnx"]["perplexity"] == pytest.approx(arts["merged"]["perplexity"], rel=1e-3)
        edge = json.loads((run / "export" / "edge" / "manifest.json").read_text())["adapters"]["sentiment"]
        assert edge["kind"] == "merged" and edge["file"] == "merged/sentiment.onnx"  # a sparse delta ships merged
    # the adapter learned something: its perplexity on the held-out completions beats the base's
    assert report["artifacts"]["adapter"]["perplexity"] < report["artifacts"]["base"]["perplexity"]


# Everything a device lacks: the edge runtime and the ONNX server backend must not import any of it.
_BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "transformers", "peft", "optimum", "accelerate", "bitsandbytes", "yaml", "onnx"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, _Block())
"""


def _torch_free(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BLOCKER + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_edge_bundle_runs_without_torch(tiny_run) -> None:
    from edge.bundle import EdgeRunner, load_bundle

    _, run = tiny_run
    bundle = run / "export" / "edge"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["adapters"]) == {"sentiment", "praise"}
    assert all(a["kind"] == "lora" and a["fidelity"]["rows"] >= 1 for a in manifest["adapters"].values())
    assert {"model.onnx", "model.fused.onnx", "tokenizer.json", "adapters/sentiment.onnx_adapter"} \
        <= set(manifest["files"])
    # the shared base's sidecar was gated alone and with each adapter on it
    assert manifest["base_fidelity"]["fused"]["file"] == "model.fused.onnx"
    assert all(a["fidelity"]["fused"]["rows"] == a["fidelity"]["rows"] for a in manifest["adapters"].values())
    prompt = "Review: the kettle is great. Label the sentiment."
    expected = EdgeRunner(load_bundle(bundle)).generate(prompt, adapter="sentiment", max_tokens=4)
    out = _torch_free(f"""
BLOCKED.update({{"pydantic", "pydantic_settings", "fastapi"}})  # a device that only runs bundles lacks the server's too
from pipeline.cli import main
rc = main(["run-edge", {str(bundle)!r}, {prompt!r}, "--adapter", "sentiment", "--max-tokens", "4"])
assert rc == 0
assert not BLOCKED & set(m.split(".")[0] for m in sys.modules), sorted(BLOCKED & set(sys.modules))
""")
    assert out.rstrip("\n") == expected


def test_onnx_server_backend_runs_without_torch(tiny_run) -> None:
    _, run = tiny_run
    out = _torch_free(f"""
import json
from fastapi.testclient import TestClient
from serve.app import create_app
from serve.settings import ServeSettings
app = create_app(ServeSettings(backend="onnx", bundle={str(run / "export" / "edge")!r}))
with TestClient(app) as client:
    mode = app.state.edgetune.engine.mode
    models = {{m["id"]: m for m in client.get("/v1/models").json()["data"]}}
    chat = client.post("/v1/chat/completions", json={{"model": "praise", "max_tokens": 3, "temperature": 0,
                       "messages": [{{"role": "user", "content": "Describe red"}}]}})
    missing = client.post("/v1/completions", json={{"model": "nope", "prompt": "hi"}})
    unload = client.delete("/v1/adapters/praise")
    again = client.post("/v1/chat/completions", json={{"model": "praise", "max_tokens": 3, "temperature": 0,
                        "messages": [{{"role": "user", "content": "Describe red"}}]}})
print(json.dumps({{"models": sorted(models), "kinds": sorted(m.get("kind", "") for m in models.values()),
                  "chat": chat.json(), "missing": missing.status_code, "unload": unload.json(),
                  "again": again.status_code, "mode": mode,
                  "torch": bool(BLOCKED & set(m.split(".")[0] for m in sys.modules))}}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    base_name = json.loads((run / "export" / "edge" / "manifest.json").read_text())["base_name"]
    assert set(result["models"]) == {"praise", "sentiment", base_name}
    assert result["chat"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert result["chat"]["usage"]["completion_tokens"] >= 1
    assert result["missing"] == 404 and result["unload"]["deleted"] is True
    assert result["again"] == 404  # unloaded is gone: the bundle adapter must be loaded again by name
    assert result["torch"] is False
    assert result["mode"] == "batched"  # on the bundle's fused sidecar: no onnx package needed to fuse at start


def test_bf16_mixed_precision_trains_and_keeps_an_fp32_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    """tune.precision reaches the Trainer (bf16 autocast works on the CPU too) and the manifest says what ran;
    the saved adapter stays fp32, like the weights mixed precision keeps."""
    from safetensors.torch import load_file

    from pipeline import tune

    def train(precision: str) -> dict:
        cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"out_dir={tmp_path / precision}",
                                                f"tune.precision={precision}", "tune.max_steps=2"])
        return json.loads((tune.run(cfg, cfg.task("sentiment")) / "manifest.json").read_text())

    bf16, fp32 = train("bf16"), train("auto")
    assert (bf16["precision"], fp32["precision"]) == ("bf16", "fp32") and bf16["device"] == "cpu"
    weights = {p: load_file(tmp_path / p / "tiny" / "adapters" / "sentiment" / "adapter_model.safetensors")
               for p in ("bf16", "auto")}
    assert weights["bf16"] and {t.dtype for t in weights["bf16"].values()} == {torch.float32}
    # the same seed and rows: only the arithmetic differed, so the trained weights differ a little
    diff = max((weights["bf16"][k] - weights["auto"][k]).abs().max().item() for k in weights["bf16"])
    assert 0 < diff < 0.05


def _adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def _count_steps(monkeypatch) -> dict[str, int]:
    """Count the Trainer's training steps from now on."""
    from transformers import Trainer

    original, steps = Trainer.training_step, {"n": 0}

    def count(self, *args, **kwargs):
        steps["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", count)
    return steps


def test_resume_from_the_final_checkpoint_takes_no_extra_step(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                              caplog) -> None:
    """Killed after the last step's checkpoint, before the adapter was in place: --resume publishes exactly the
    adapter an uninterrupted run makes (the Trainer resumed from it would have run step 5 of 4), and a
    half-written later checkpoint beside it is ignored."""
    from pipeline import tune

    sets = [f"base={tiny_model_dir}", "tune.max_steps=4", "tune.save_steps=2", "tune.lr_scheduler=constant"]
    cfg, ref_cfg = (load_config("configs/tiny.yaml", [*sets, f"out_dir={tmp_path / d}"]) for d in ("run", "ref"))
    task = cfg.task("sentiment")
    reference = _adapter_bytes(tune.run(ref_cfg, task))

    def killed(final: Path):
        raise KeyboardInterrupt  # as a kill between the last checkpoint and the adapter's publication

    with monkeypatch.context() as m:
        m.setattr(tune, "atomic_dir", killed)
        with pytest.raises(KeyboardInterrupt):
            tune.run(cfg, task)
    checkpoints = tmp_path / "run" / "tiny" / "checkpoints" / "sentiment"
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()
    (checkpoints / "checkpoint-6").mkdir()  # a kill just as a checkpoint folder appeared
    steps = _count_steps(monkeypatch)
    with caplog.at_level("INFO"):
        out = tune.run(cfg, task, resume=True)
    assert steps["n"] == 0 and "restored, not trained further" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 4
    assert _adapter_bytes(out) == reference
    assert not checkpoints.exists()


def test_resume_with_only_incomplete_checkpoints_trains_from_scratch(tmp_path: Path, tiny_model_dir: Path,
                                                                     monkeypatch, caplog) -> None:
    from transformers import Trainer

    from pipeline import tune

    sets = [f"base={tiny_model_dir}", "tune.max_steps=4", "tune.save_steps=2"]
    cfg, ref_cfg = (load_config("configs/tiny.yaml", [*sets, f"out_dir={tmp_path / d}"]) for d in ("run", "ref"))
    task = cfg.task("sentiment")
    reference = _adapter_bytes(tune.run(ref_cfg, task))
    original, calls = Trainer.training_step, {"n": 0}

    def crash_in_step_three(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", crash_in_step_three)
        with pytest.raises(KeyboardInterrupt):
            tune.run(cfg, task)
    checkpoint = tmp_path / "run" / "tiny" / "checkpoints" / "sentiment" / "checkpoint-2"
    (checkpoint / "trainer_state.json").unlink()  # killed before the Trainer wrote its last file
    steps = _count_steps(monkeypatch)
    with caplog.at_level("INFO"):
        out = tune.run(cfg, task, resume=True)
    assert "checkpoint-2 is incomplete" in caplog.text and "no complete checkpoint" in caplog.text
    assert steps["n"] == 4 and _adapter_bytes(out) == reference


@pytest.mark.parametrize("what, content, where", [
    ("config", b"run: tiny\nbase: caf\xe9\n", ":2: not valid UTF-8"),
    ("data", b'{"prompt": "a", "completion": "b"}\n\xff\n', ":2: not valid UTF-8"),
    ("data", b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not valid JSON (nested too deeply"),
], ids=["config-latin1", "jsonl-latin1", "jsonl-deep"])
def test_unreadable_config_or_data_is_one_error_line_and_exit_2(tmp_path: Path, tiny_model_dir: Path, capsys,
                                                                what: str, content: bytes, where: str) -> None:
    bad = tmp_path / ("bad.yaml" if what == "config" else "bad.jsonl")
    bad.write_bytes(content)
    config = str(bad) if what == "config" else "configs/tiny.yaml"
    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path / 'runs'}",
            *([f"tasks=[{{name: t, train: '{bad}', test: '{bad}'}}]"] if what == "data" else [])]
    assert cli("tune", "--config", config, sets=sets) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgetune: error: {bad}{where}") and err.count("\n") == 1
