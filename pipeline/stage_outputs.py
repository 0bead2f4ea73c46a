"""What a stage reads from the stages before it: their finished outputs, the tune result's
:class:`~pipeline.adapter_spec.AdapterSpec`, and the export stage's record of what it skipped.

A stage reads these, never re-derives them (see DESIGN.md, "One source of truth").
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.adapter_spec import ADAPTER_FILES, AdapterSpec, read_spec
from pipeline.artifacts import read_manifest, write_json_atomic
from pipeline.config import Config, TaskConfig
from pipeline.errors import EdgetuneError
from pipeline.paths import adapter_dir, export_record

log = logging.getLogger(__name__)

RECORD_VERSION = 1


def require_stage_output(folder: Path, stage: str, task: TaskConfig) -> dict:
    """The manifest of a finished earlier stage, or an error saying which command makes it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise EdgetuneError(f"{folder} does not exist or is incomplete; run `edgetune {stage}` for task "
                            f"{task.name!r} first (or `edgetune pipeline`)")
    return manifest


def tuned_spec(cfg: Config, task: TaskConfig) -> AdapterSpec:
    """The spec of ``task``'s finished tune result, as its manifest records it."""
    folder = adapter_dir(cfg, task)
    require_stage_output(folder, "tune", task)
    return read_spec(folder)


def training_record(cfg: Config, task: TaskConfig) -> dict[str, Any] | None:
    """How ``task``'s tune went, for the report: steps trained, the step kept, why it stopped, the
    validation rows and the curves (None when there is no finished tune, e.g. evaluating the base only)."""
    manifest = read_manifest(adapter_dir(cfg, task))
    if manifest is None:
        return None
    m = manifest.get("metrics", {})
    return {"steps": m.get("steps"), "kept_step": m.get("kept_step", m.get("steps")),
            "stop_reason": m.get("stop_reason"), "best_metric": m.get("best_metric"),
            "train_seconds": m.get("train_seconds"), "validation": manifest.get("validation"),
            "curves": m.get("curves", {})}


def copy_adapter(src: Path, dst: Path) -> None:
    """Copy the PEFT adapter files of ``src`` into ``dst`` (created if missing)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def remove_stale(folder: Path, what: str, why: str = "left by an earlier run with another method") -> None:
    """Delete an artifact an earlier run left where this run publishes none (another method's, or one
    that fails this config's gate), so nothing later picks up a result that does not belong to it."""
    if folder.exists():
        log.info("%s: removing %s, %s", what, folder, why)
        shutil.rmtree(folder)


def quantized_base_of(folder: Path) -> Path | None:
    """For an unmerged quantized artifact, the quantized base folder it runs on (else None)."""
    manifest = read_manifest(folder) or {}
    return Path(manifest["quantized_base"]) if manifest.get("kind") == "unmerged" else None


def write_export_record(cfg: Config, task: TaskConfig, exported: dict[str, str], skipped: dict[str, str],
                        failed: dict[str, dict[str, Any]] | None = None) -> Path:
    """Record (atomically) which export targets of ``task`` were written where, which were skipped and why,
    and which failed their fidelity gate (``{"reason": ..., "metrics": {...}}``: not published).

    The record names the tune result it was made from (its fingerprint), so a reader can tell a
    record that no longer describes the current adapter.
    """
    path = export_record(cfg, task)
    tune = require_stage_output(adapter_dir(cfg, task), "tune", task)
    record = {"version": RECORD_VERSION, "task": task.name, "tune_fingerprint": tune.get("fingerprint"),
              "adapter_kind": tuned_spec(cfg, task).kind, "exported": dict(sorted(exported.items())),
              "skipped": dict(sorted(skipped.items())), "failed": dict(sorted((failed or {}).items()))}
    if _read_json(path) != record:  # an up-to-date re-run changes nothing on disk
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    return path


def export_skips(cfg: Config, task: TaskConfig) -> dict[str, str]:
    """Export targets the export stage skipped for ``task`` -> why ({} when export has not run yet: a
    missing artifact is then reported by whoever needs it). Raises if the record describes an
    earlier tune result."""
    path = export_record(cfg, task)
    if not path.is_file():
        return {}
    record = _read_json(path)
    if not isinstance(record, dict):
        raise EdgetuneError(f"{path} cannot be read; run `edgetune export --task {task.name}` again")
    tune = require_stage_output(adapter_dir(cfg, task), "tune", task)
    if record.get("tune_fingerprint") != tune.get("fingerprint"):
        raise EdgetuneError(f"{path} describes an earlier tune result of {task.name!r}; run `edgetune export "
                            f"--task {task.name}` (or `edgetune pipeline`) first")
    return dict(record.get("skipped", {}))


def export_failures(cfg: Config, task: TaskConfig) -> dict[str, dict[str, Any]]:
    """Export targets of ``task`` that failed their fidelity gate -> ``{"reason", "metrics"}`` ({} when
    export has not run, or its record describes an earlier tune result: those say nothing now)."""
    path = export_record(cfg, task)
    record = _read_json(path) if path.is_file() else None
    if not isinstance(record, dict):
        return {}
    tune = read_manifest(adapter_dir(cfg, task)) or {}
    if record.get("tune_fingerprint") != tune.get("fingerprint"):
        return {}
    return dict(record.get("failed", {}))


def failed_gates(cfg: Config, tasks: list[TaskConfig]) -> dict[str, str]:
    """``"<task>/<target>" -> reason`` for every export of ``tasks`` that failed its gate (the run's exit status)."""
    return {f"{task.name}/{target}": entry.get("reason", "") for task in tasks
            for target, entry in sorted(export_failures(cfg, task).items())}


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
