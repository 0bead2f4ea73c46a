"""A failed fidelity gate fails one artifact, not the run: the others are published, the report lists the
failure with its numbers, the exit status says "completed with failed gates"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import EXIT_FAILED_GATES


def cli(*args: str, sets: list[str] = ()) -> int:
    return main([*args, *[x for s in sets for x in ("--set", s)]])


def _sets(tiny_model_dir: Path, out: Path) -> list[str]:
    # the edge bundle at int8: its adapters are then held to the int8 gate the test tightens
    return [f"base={tiny_model_dir}", f"out_dir={out}", "quantize.formats=[]", "export.targets=[onnx, onnx-int8, edge]",
            "export.edge_precision=int8", "evaluate.artifacts=[adapter, onnx, onnx-int8, edge]"]


def test_a_failed_gate_fails_one_artifact_and_the_run_goes_on(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    sets = _sets(tiny_model_dir, tmp_path)
    assert cli("pipeline", "--config", "configs/tiny.yaml", sets=sets) == 0
    run = tmp_path / "tiny"
    assert (run / "export" / "onnx-int8" / "sentiment" / "model.onnx").is_file()
    capsys.readouterr()

    # the same run with an int8 gate nothing quantized can pass: int8 exports and the int8 bundle's adapters fail
    strict = [*sets, "export.gates.int8.max_abs_logit_diff=1e-9"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", "--stages", "export,evaluate", sets=strict) == EXIT_FAILED_GATES
    err = capsys.readouterr().err
    assert "completed with failed gates: 4 artifact(s) not published" in err
    for what in ("sentiment/onnx-int8", "sentiment/edge", "extract/onnx-int8", "extract/edge"):
        assert f"  {what}: export " in err and "int8 fidelity gate failed" in err

    # nothing of the failed artifacts is published: the earlier int8 exports are gone, the bundle has no adapter
    for task in ("sentiment", "extract"):
        assert not (run / "export" / "onnx-int8" / task).exists()
        assert (run / "export" / "onnx" / task / "model.onnx").is_file()  # the fp32 export passed: published
        record = json.loads((run / "export" / "records" / f"{task}.json").read_text())
        assert set(record["failed"]) == {"onnx-int8", "edge"} and set(record["exported"]) == {"onnx"}
        assert record["failed"]["edge"]["metrics"]["max_abs_logit_diff"] > 1e-9
    from edge.bundle import load_bundle

    bundle = load_bundle(run / "export" / "edge")  # the base passed (its gate checks the score only): verified
    assert bundle.adapters == {} and not list((run / "export" / "edge").glob("adapters/*"))
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]

    # the report was written and lists each failure with its reason and what its gate measured
    report = json.loads((run / "report.json").read_text())
    for task in ("sentiment", "extract"):
        entry = report["tasks"][task]
        assert set(entry["artifacts"]) == {"adapter", "onnx"}
        assert set(entry["failed"]) == {"onnx-int8", "edge"}
        failed = entry["failed"]["onnx-int8"]
        assert "max_abs_logit_diff" in failed["reason"] and failed["metrics"]["rows"] == 4
        assert 0 <= failed["metrics"]["score_export"] <= 1
    markdown = (run / "report.md").read_text()
    assert markdown.count("**Failed its fidelity gate, not published**") == 4
    assert "Failed its fidelity gate" in (run / "report.html").read_text()

    # loosening the gate again publishes them again and the run ends with 0
    assert cli("pipeline", "--config", "configs/tiny.yaml", "--stages", "export,evaluate", sets=sets) == 0
    assert (run / "export" / "onnx-int8" / "extract" / "model.onnx").is_file()
    assert json.loads((run / "report.json").read_text())["tasks"]["extract"]["failed"] == {}


def test_a_failed_edge_base_publishes_no_bundle_and_is_built_once(tmp_path: Path, tiny_model_dir: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import bundle, fidelity

    sets = [*_sets(tiny_model_dir, tmp_path), "export.targets=[edge]"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", "--stages", "tune,merge,export", sets=sets) == 0
    assert (tmp_path / "tiny" / "export" / "edge" / "manifest.json").is_file()
    capsys.readouterr()

    real_check, builds = fidelity.check, []
    real_build = bundle._build_base

    def check(cfg, precision, metrics, what, *, logits=True):
        if what.startswith("edge base"):  # the shared base measures worse than its gate allows
            metrics = {**metrics, "score_export": metrics["score_torch"] - 1.0, "score_drop": 1.0}
        return real_check(cfg, precision, metrics, what, logits=logits)

    def build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(fidelity, "check", check)
    monkeypatch.setattr(bundle, "_build_base", build)
    monkeypatch.setattr(bundle, "_FAILED_BASES", {})
    # another compute type: a new shared base, built (and gated) again
    assert cli("export", "--config", "configs/tiny.yaml",
               sets=[*sets, "export.accuracy_level=0", "export.gates.int8.max_score_drop=0.5"]) == EXIT_FAILED_GATES
    assert "sentiment/edge" in capsys.readouterr().err
    assert len(builds) == 1  # the second task does not rebuild a base already seen failing
    assert not (tmp_path / "tiny" / "export" / "edge").exists()  # the earlier bundle no longer matches: removed
    for task in ("sentiment", "extract"):
        record = json.loads((tmp_path / "tiny" / "export" / "records" / f"{task}.json").read_text())
        assert "edge base" in record["failed"]["edge"]["reason"]


def test_edge_fallback_ships_a_task_that_fails_on_the_shared_base_at_the_next_precision(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from edge.bundle import EdgeRunner, load_bundle

    sets = [*_sets(tiny_model_dir, tmp_path), "export.targets=[edge]", "evaluate.artifacts=[edge]",
            "export.gates.int8.max_abs_logit_diff=1e-9", "export.edge_fallback=fp32"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", sets=sets) == 0  # nothing left unpublished
    run = tmp_path / "tiny"
    manifest = json.loads((run / "export" / "edge" / "manifest.json").read_text())
    for task in ("sentiment", "extract"):
        entry = manifest["adapters"][task]
        assert entry["kind"] == "merged" and entry["precision"] == "fp32" and entry["fidelity"]["precision"] == "fp32"
        assert entry["fallback"]["from"] == "int8" and "int8 fidelity gate failed" in entry["fallback"]["reason"]
        note = json.loads((run / "report.json").read_text())["tasks"][task]["artifacts"]["edge"]["note"]
        assert "merged model at fp32" in note
    runner = EdgeRunner(load_bundle(run / "export" / "edge"))  # verified, and it runs the merged model
    decoder, lora, prefix = runner.resolve("extract")
    assert lora is None and prefix is None and decoder is not None
    assert "(export.edge_fallback)" in (run / "report.md").read_text()


@pytest.mark.parametrize("failure", ["gate", "fuse"])
def test_a_fused_sidecar_that_fails_is_not_kept_and_the_exported_graph_is_published(
        failure: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar is a faster form of an export that passed its gate: when it fails its own gate (or the graph
    cannot be fused) it is removed and the record says why; the export, its gate passed, is published."""
    import exporters.fused_graph
    import pipeline.fidelity
    from edge.runtime import Decoder
    from pipeline.errors import GateFailed

    original = pipeline.fidelity.gate

    def gate(cfg, task, precision, torch_model, export_model, tokenizer, what, **kwargs):
        if what.endswith(" fused"):
            raise GateFailed(f"export {what}: the {precision} fidelity gate failed (test)", {"rows": 4})
        return original(cfg, task, precision, torch_model, export_model, tokenizer, what, **kwargs)

    def refuse(*args, **kwargs):
        raise exporters.fused_graph.FuseError("no q_proj under /model/layers.0/self_attn/ (test)")

    if failure == "gate":
        monkeypatch.setattr(pipeline.fidelity, "gate", gate)
    else:
        monkeypatch.setattr(exporters.fused_graph, "write_fused", refuse)
    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path}", "quantize.formats=[]", "export.targets=[onnx]",
            "evaluate.artifacts=[onnx]"]
    assert cli("pipeline", "--config", "configs/tiny.yaml", "--task", "sentiment", sets=sets) == 0
    out = tmp_path / "tiny" / "export" / "onnx" / "sentiment"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.onnx").is_file() and not (out / "model.fused.onnx").exists()
    assert "model.fused.onnx" not in manifest["files"] and manifest["metrics"]["fused"]["file"] is None
    assert ("fidelity gate failed" if failure == "gate" else "no q_proj") in manifest["metrics"]["fused"]["reason"]
    assert manifest["metrics"]["score_drop"] == 0  # the exported graph's own gate passed
    assert Decoder(out / "model.onnx", threads=1).fused is None
    record = json.loads((tmp_path / "tiny" / "export" / "records" / "sentiment.json").read_text())
    assert record["exported"].keys() >= {"onnx"} and record["failed"] == {}
