"""The pipeline on a CUDA GPU: every registered method through every stage, placed on the GPU.

Run by ``make gpu-check`` (``pytest -m gpu``); without a CUDA device these tests are skipped with the
reason. Each method prints one summary line: where it trained, in which precision, with which optimizer,
and what each artifact scored where.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.methods import METHODS

pytestmark = pytest.mark.gpu


def _onnx_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_every_stage_on_cuda(method: str, tiny_model_dir: Path, tmp_path: Path, gpu_line) -> None:
    providers = "[cuda, cpu]" if _onnx_cuda() else "[cpu]"
    sets = [f"base={tiny_model_dir}", f"out_dir={tmp_path}", f"method={method}", "device=cuda",
            "tune.precision=auto", "export.edge_precision=fp32", f"providers={providers}", "tune.max_steps=3",
            "evaluate.max_rows=4", "evaluate.batch_size=4"]
    assert main(["pipeline", "--config", "configs/tiny.yaml", "--task", "sentiment",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "tiny"
    tuned = json.loads((run / "adapters" / "sentiment" / "manifest.json").read_text())
    expected_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert tuned["device"] == "cuda" and tuned["precision"] == expected_precision
    if METHODS[method].paged_optimizer:  # QLoRA: the paged optimizer really stepped
        assert tuned["optimizer"] == "paged_adamw_32bit" and tuned["optimizer_class"].startswith("PagedAdamW")
    entry = json.loads((run / "report.json").read_text())["tasks"]["sentiment"]
    scored = entry["artifacts"]
    for name in ("base", "adapter", "merged", "int8", "nf4"):
        if name in scored:
            assert scored[name]["device"] == "cuda", name
    adapter = scored["adapter"]
    if METHODS[method].mergeable:
        assert json.loads((run / "merged" / "sentiment" / "manifest.json").read_text())["device"].startswith("cuda")
        assert scored["merged"]["exact_match"] == adapter["exact_match"]
        assert scored["onnx"]["perplexity"] == pytest.approx(adapter["perplexity"], rel=1e-3)
    assert scored["edge"]["perplexity"] == pytest.approx(adapter["perplexity"], rel=1e-3)
    cells = ", ".join(f"{n} {r['exact_match']:.2f}@{r['device']}" for n, r in scored.items())
    gpu_line(f"gpu pipeline {method:<8} tune cuda/{tuned['precision']} {tuned['optimizer_class']}; {cells}; "
             f"skipped: {', '.join(entry['skipped']) or 'none'}")
