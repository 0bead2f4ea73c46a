"""Where each stage puts its outputs under ``runs/<run>/`` (the layout, in one place).

Pure path arithmetic: no stage imports another stage to find its folder.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, TaskConfig


def adapter_dir(cfg: Config, task: TaskConfig) -> Path:
    """Tune's output for ``task``: a PEFT adapter, a PIR sparse delta or a whole model, with its manifest."""
    return cfg.run_dir / "adapters" / task.name


def checkpoints_dir(cfg: Config, task: TaskConfig) -> Path:
    """Tune's resumable checkpoints of ``task`` (removed when training finishes)."""
    return cfg.run_dir / "checkpoints" / task.name


def merged_dir(cfg: Config, task: TaskConfig) -> Path:
    """Merge's output: the adapter folded into the base, a plain HF model folder."""
    return cfg.run_dir / "merged" / task.name


def quantized_dir(cfg: Config, task: TaskConfig, fmt: str) -> Path:
    """Quantize's output for one bitsandbytes format (merged, or the adapter over a shared quantized base)."""
    return cfg.run_dir / "quantized" / f"{task.name}-{fmt}"


def quantized_base_dir(cfg: Config, fmt: str) -> Path:
    """The base quantized once per run and format, shared by every task's unmerged artifact."""
    return cfg.run_dir / "quantized" / f"base-{fmt}"


def bundle_dir(cfg: Config) -> Path:
    """The run's edge bundle: one shared base and every task's adapter."""
    return cfg.run_dir / "export" / "edge"


def export_dir(cfg: Config, task: TaskConfig, target: str) -> Path:
    """Export's output for one target (``edge``: the run's bundle, shared by every task)."""
    if target == "edge":
        return bundle_dir(cfg)
    return cfg.run_dir / "export" / target / task.name


def export_record(cfg: Config, task: TaskConfig) -> Path:
    """Export's record of ``task``: which targets it wrote and which it skipped, and why."""
    return cfg.run_dir / "export" / "records" / f"{task.name}.json"


def eval_file(cfg: Config, task: TaskConfig, artifact: str) -> Path:
    """Evaluate's cached metrics of one artifact of ``task``."""
    return cfg.run_dir / "eval" / task.name / f"{artifact}.json"
