"""The run report: ``report.json`` (machine-readable, schema in README.md) and ``report.md``."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import library_versions, write_json_atomic, write_text_atomic
from pipeline.config import Config

SCHEMA_VERSION = 1
METRICS = ("exact_match", "perplexity", "size_bytes", "decode_tokens_per_s")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "os": platform.platform(), "versions": library_versions()}


def write_report(cfg: Config, tasks: dict[str, dict[str, Any]]) -> Path:
    """Write ``report.json`` and ``report.md`` under the run folder; return the JSON path."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": cfg.run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": cfg.base,
        "method": cfg.method,
        "machine": machine(),
        "tasks": tasks,
    }
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "report.json"
    write_json_atomic(path, report)
    write_text_atomic(cfg.run_dir / "report.md", render_markdown(report))
    return path


def render_markdown(report: dict[str, Any]) -> str:
    """A table per task: one row per artifact with quality, size and speed."""
    m = report["machine"]
    lines = [
        f"# edgetune report: run `{report['run']}`",
        "",
        f"Base `{report['base']}`, method `{report['method']}`, {report['created']}.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads" + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + ".",
        "",
    ]
    for name, task in report["tasks"].items():
        lines += [f"## {name} ({task['test_rows']} held-out rows)", "",
                  "| artifact | exact match | perplexity | size on disk | decode tok/s (batch 1) |",
                  "|---|---:|---:|---:|---:|"]
        for artifact, r in task["artifacts"].items():
            em = "n/a" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
            lines.append(f"| {artifact} | {em} | {r['perplexity']:.3f} | "
                         f"{r['size_bytes'] / 1e6:.1f} MB | {r['decode_tokens_per_s']:.1f} |")
        lines += [f"\nNot produced: `{artifact}`: {reason}." for artifact, reason in task.get("skipped", {}).items()]
        lines.append("")
    lines.append("Size of `adapter` is the adapter alone (it runs on the shared base); `base` is the base snapshot.")
    return "\n".join(lines) + "\n"
