"""The run report: ``report.json`` (machine-readable, schema in README.md), ``report.md``, and for
people choosing a trade-off, ``report.html`` with one plot per task (``plots/<task>.png``): held-out
score against size on disk and against decode speed, one labelled point per artifact; beside it the
task's training curves (``plots/<task>-training.png``): training and validation loss and validation
exact match against steps, with the step that was kept."""

from __future__ import annotations

import html
import io
import os
import platform
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import library_versions, write_bytes_atomic, write_json_atomic, write_text_atomic
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
    plots = write_plots(report, cfg.run_dir / "plots")
    curves = write_training_plots(report, cfg.run_dir / "plots")
    write_text_atomic(cfg.run_dir / "report.html", render_html(report, plots, cfg.run_dir, curves))
    return path


def _score(r: dict[str, Any]) -> tuple[float, str]:
    """The plotted quality of an artifact: exact match, else (text-only test sets) 1 / perplexity."""
    if r.get("exact_match") is not None:
        return r["exact_match"], "held-out exact match"
    return 1.0 / r["perplexity"], "1 / perplexity (held-out)"


def failed_lines(task: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(artifact, why, what its gate measured) for each artifact of ``task`` left unpublished by its gate."""
    out = []
    for artifact, entry in task.get("failed", {}).items():
        m = entry.get("metrics", {})
        measured = ""
        if "score_export" in m:
            measured = (f"on {m.get('rows', '?')} held-out rows: exact match {m['score_export']:.3f} against "
                        f"{m['score_torch']:.3f} for its PyTorch source, top-1 agreement {m['top1_agreement']:.3f}, "
                        f"KL {m['kl']:.3g}")
        out.append((artifact, entry.get("reason", ""), measured))
    return out


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """One PNG per task: score vs size on disk (left) and score vs decode tokens/s (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, task in report["tasks"].items():
        rows = task["artifacts"]
        if not rows:
            continue
        fig, (by_size, by_speed) = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
        label = "score"
        markers = "osD^vP*Xh<>"
        for i, (artifact, r) in enumerate(rows.items()):
            score, label = _score(r)
            style = dict(s=48, marker=markers[i % len(markers)], color=f"C{i % 10}", label=artifact, alpha=0.85)
            by_size.scatter([r["size_bytes"] / 1e6], [score], **style)
            by_speed.scatter([r["decode_tokens_per_s"]], [score], **{**style, "label": None})
        by_size.set_xscale("log")
        by_size.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        by_size.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        by_size.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        by_size.set_xlabel("size on disk, MB (log scale): smaller is better")
        by_speed.set_xlabel("decode tokens/s at batch 1: larger is better")
        by_size.set_ylabel(label)
        for ax in (by_size, by_speed):
            ax.grid(True, alpha=0.3)
        fig.legend(loc="lower center", ncol=min(len(rows), 9), fontsize=8, frameon=False)
        fig.suptitle(f"{name}: quality vs size and speed ({task['test_rows']} held-out rows, "
                     f"{report['machine']['cpu']}, {report['machine']['threads']} threads)", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        out[name] = _save_png(fig, folder / f"{name}.png")
    return out


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())  # a kill leaves a temporary the next run cleans
    return path


def training_line(training: dict[str, Any] | None) -> str | None:
    """One sentence on how a task's tune ended: steps, the step kept, why, and the best validation score."""
    if not training or training.get("steps") is None:
        return None
    best = training.get("best_metric") or {}
    score = "" if not best else f"; best validation evaluation at step {best['step']} (by {best['name'].replace('_', ' ')}): " + \
        ("" if best.get("exact_match") is None else f"exact match {best['exact_match']:.3f}, ") + f"loss {best['loss']:.4g}"
    seconds = "" if training.get("train_seconds") is None else f" in {training['train_seconds']:.0f} s"
    return (f"Training: {training['steps']} steps{seconds}, kept step {training['kept_step']} "
            f"({training.get('stop_reason') or 'no reason recorded'}){score}")


def speed_line(task_name: str, task: dict[str, Any]) -> str | None:
    """Which artifacts' decode speed was measured on another task's artifact of the same form and shapes
    (:func:`pipeline.evaluate.speed_key`); None when every one was measured on this task."""
    borrowed: dict[str, list[str]] = {}
    for artifact, r in task["artifacts"].items():
        source = r.get("speed_measured_on")
        if source and source != task_name:
            borrowed.setdefault(source, []).append(artifact)
    if not borrowed:
        return None
    return "Decode speed measured once per form and shapes: " + "; ".join(
        f"{', '.join(artifacts)} on {source}'s (the same files, so the same computation)"
        for source, artifacts in borrowed.items())


def write_training_plots(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """One PNG per tuned task: training and validation loss (left) and validation exact match (right)
    against optimizer steps, the kept step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for name, task in report["tasks"].items():
        training = task.get("training") or {}
        curves = training.get("curves") or {}
        if not curves.get("train_loss"):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        fig, (loss_ax, em_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, label, style in (("train_loss", "training loss", "-"), ("eval_loss", "validation loss", "o-")):
            if curves.get(key):
                steps, values = zip(*curves[key])
                loss_ax.plot(steps, values, style, label=label, markersize=4)
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("loss (log scale)")
        if curves.get("eval_exact_match"):
            steps, values = zip(*curves["eval_exact_match"])
            em_ax.plot(steps, values, "o-", color="C2", label="validation exact match", markersize=4)
            em_ax.set_ylim(-0.02, 1.02)
        else:
            em_ax.text(0.5, 0.5, "no validation exact match\n(no validation rows with answers)",
                       ha="center", va="center", transform=em_ax.transAxes)
        em_ax.set_ylabel("exact match")
        for ax in (loss_ax, em_ax):
            if training.get("kept_step") is not None:
                ax.axvline(training["kept_step"], color="gray", linestyle="--", label=f"kept: step {training['kept_step']}")
            ax.set_xlabel("optimizer step")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{name}: training ({training.get('stop_reason') or ''})", fontsize=10)
        fig.tight_layout()
        out[name] = _save_png(fig, folder / f"{name}-training.png")
    return out


def render_html(report: dict[str, Any], plots: dict[str, Path], run_dir: Path,
                curves: dict[str, Path] | None = None) -> str:
    """A self-explaining page: per task the plot and the table it was drawn from."""
    e = html.escape
    m = report["machine"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edgetune report: {e(report['run'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
             f"</head><body><h1>edgetune report: run <code>{e(report['run'])}</code></h1>",
             f"<p>Base <code>{e(report['base'])}</code>, method <code>{e(report['method'])}</code>, "
             f"{e(report['created'])}. Machine: {e(m['cpu'])}, {m['cores']} cores, {m['threads']} threads.</p>"]
    for name, task in report["tasks"].items():
        parts.append(f"<h2>{e(name)} ({task['test_rows']} held-out rows)</h2>")
        if name in plots:
            parts.append(f"<img src='{e(str(plots[name].relative_to(run_dir)))}' alt='{e(name)} trade-offs' width='100%'>")
        if name in (curves or {}):
            parts.append(f"<img src='{e(str(curves[name].relative_to(run_dir)))}' alt='{e(name)} training curves' "
                         "width='100%'>")
        if training_line(task.get("training")):
            parts.append(f"<p>{e(training_line(task['training']))}.</p>")
        parts.append("<table><tr><th>artifact</th><th>exact match</th><th>perplexity</th><th>size on disk (MB)</th>"
                     "<th>decode tok/s</th></tr>")
        for artifact, r in task["artifacts"].items():
            em = "n/a" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
            parts.append(f"<tr><td>{e(artifact)}</td><td>{em}</td><td>{r['perplexity']:.3f}</td>"
                         f"<td>{r['size_bytes'] / 1e6:.1f}</td><td>{r['decode_tokens_per_s']:.1f}</td></tr>")
        parts.append("</table>")
        for artifact, r in task["artifacts"].items():
            if r.get("note"):
                parts.append(f"<p><code>{e(artifact)}</code>: {e(r['note'])}.</p>")
        if speed_line(name, task):
            parts.append(f"<p>{e(speed_line(name, task))}.</p>")
        for artifact, reason in task.get("skipped", {}).items():
            parts.append(f"<p>Not produced: <code>{e(artifact)}</code>: {e(reason)}.</p>")
        for artifact, reason, measured in failed_lines(task):
            parts.append(f"<p><b>Failed its fidelity gate, not published</b>: <code>{e(artifact)}</code>, measured "
                         f"{e(measured)}. {e(reason)}</p>")
    parts.append("<p><code>report.json</code> is the machine-readable source of these numbers.</p></body></html>")
    return "\n".join(parts) + "\n"


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
        lines += [f"## {name} ({task['test_rows']} held-out rows)", ""]
        if training_line(task.get("training")):
            lines += [training_line(task["training"]) + ".", ""]
        lines += [
                  "| artifact | exact match | perplexity | size on disk | decode tok/s (batch 1) |",
                  "|---|---:|---:|---:|---:|"]
        for artifact, r in task["artifacts"].items():
            em = "n/a" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
            lines.append(f"| {artifact} | {em} | {r['perplexity']:.3f} | "
                         f"{r['size_bytes'] / 1e6:.1f} MB | {r['decode_tokens_per_s']:.1f} |")
        lines += [f"\n`{artifact}`: {r['note']}." for artifact, r in task["artifacts"].items() if r.get("note")]
        lines += [f"\n{speed_line(name, task)}."] if speed_line(name, task) else []
        lines += [f"\nNot produced: `{artifact}`: {reason}." for artifact, reason in task.get("skipped", {}).items()]
        lines += [f"\n**Failed its fidelity gate, not published**: `{artifact}`, measured {measured}. {reason}"
                  for artifact, reason, measured in failed_lines(task)]
        lines.append("")
    lines.append("Size of `adapter` is the adapter alone (it runs on the shared base); `base` is the base snapshot; "
                 "`edge` is the bundle's shared base plus this task's adapter file. Plots: `report.html`.")
    return "\n".join(lines) + "\n"
