"""`make bench-methods`: every fine-tuning method on the same task, step budget and seed.

For each method (``edgetune methods`` order) this runs, each in its own process:
  1. ``edgetune pipeline --config benchmarks/methods.yaml --set method=NAME --stages tune --force``
     (its peak RSS is the method's training memory: measured by ``wait4`` on that process alone)
  2. ``edgetune pipeline ... --stages merge,evaluate`` (merge is fidelity-checked on the real
     model for mergeable methods; evaluate scores the adapter on the held-out rows)
and scores the base model once. It reads the numbers back from the run folders (tune manifest,
report.json), checks the issue's acceptance points, and writes ``benchmarks/results/methods.json``
and ``methods.md`` with the command and the machine.

    python benchmarks/methods.py [--config benchmarks/methods.yaml] [--methods lora,pir] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402
from pipeline.adapter_spec import SPARSE_DELTA_CONFIG, SPARSE_DELTA_WEIGHTS  # noqa: E402
from pipeline.artifacts import write_json_atomic, write_text_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.methods import METHODS, get_method  # noqa: E402

STRONG = ("lora", "dora", "qlora", "pir", "ulmfit", "full")
"""Methods that must reach STRONG_EM (the issue's bar); every method must beat the base."""
STRONG_EM = 0.80


def edgetune(config: str, *args: str) -> tuple[float, float]:
    """Run ``edgetune ARGS`` in a child process; return (wall seconds, its peak RSS in MB). Fails loudly."""
    cmd = [str(Path(sys.executable).parent / "edgetune"), *args[:1], "--config", config, *args[1:]]
    return run_measured(cmd, "bench-methods")


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) the method saved: what a user ships per task."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def pir_share(folder: Path) -> tuple[int, int]:
    """(weights in the saved delta, weights of the chosen modules), read from the saved files themselves."""
    from safetensors import safe_open

    config = json.loads((folder / SPARSE_DELTA_CONFIG).read_text())
    eligible = sum(m["shape"][0] * m["shape"][1] for m in config["modules"].values())
    with safe_open(str(folder / SPARSE_DELTA_WEIGHTS), framework="pt") as f:
        stored = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".indices"))
    return stored, eligible


def run_method(config: str, name: str, run_root: Path, task: str) -> dict:
    sets = ["--set", f"method={name}", "--set", f"run=methods-{name}"]
    tune_s, tune_rss = edgetune(config, "pipeline", "--stages", "tune", "--force", *sets)
    edgetune(config, "pipeline", "--stages", "merge,evaluate", *sets)
    folder = run_root / f"methods-{name}"
    adapter = folder / "adapters" / task
    manifest = json.loads((adapter / "manifest.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    scored = report["tasks"][task]["artifacts"]["adapter"]
    m = manifest["metrics"]
    row = {
        "method": name,
        "trainable_params": m["trainable_params"],
        "trainable_share": m["trainable_params"] / m["total_params"],
        "adapter_bytes": weights_bytes(adapter),
        "step_seconds_median": m["step_seconds_median"],
        "steps": m["steps"],
        "train_seconds": m["train_seconds"],
        "tune_process_seconds": round(tune_s, 1),
        "peak_rss_mb": round(tune_rss),
        "exact_match": scored["exact_match"],
        "perplexity": scored["perplexity"],
        "learning_rate": manifest["learning_rate"],
        "optimizer": manifest["optimizer"],
        "optimizer_note": manifest.get("optimizer_note"),
        "train_loss_first": m["train_loss_first"],
        "train_loss_last": m["train_loss_last"],
    }
    if name == "pir":
        stored, eligible = pir_share(adapter)
        row["pir"] = {"stored_weights": stored, "eligible_weights": eligible, "share": stored / eligible,
                      **{k: v for k, v in json.loads((adapter / SPARSE_DELTA_CONFIG).read_text()).items()
                         if k in ("scorer", "k", "scoring_seconds", "calibration_batches")}}
    return row


def checks(rows: list[dict], base_em: float, k: float) -> dict[str, bool]:
    by = {r["method"]: r for r in rows}
    out = {f"{r['method']} beats the base ({base_em:.2f})": r["exact_match"] > base_em for r in rows}
    out.update({f"{n} >= {STRONG_EM}": by[n]["exact_match"] >= STRONG_EM for n in STRONG if n in by})
    if "qlora" in by and "lora" in by:
        out["qlora peak RSS < lora peak RSS"] = by["qlora"]["peak_rss_mb"] < by["lora"]["peak_rss_mb"]
    if "pir" in by:
        out[f"pir trains <= {k:.0%} of the chosen modules' weights (from the saved delta)"] = by["pir"]["pir"]["share"] <= k
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Fine-tuning methods compared",
        "",
        f"Task `{result['task']}` ({result['test_rows']} held-out rows, exact match), {result['steps']} steps of "
        f"batch {result['batch_size']}, seed {result['seed']}, base `{result['base']}`.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
        + f". Total {result['total_minutes']:.1f} min, {result['created']}.  ",
        f"Command: `{result['command']}` (commit {result['commit']}).",
        "",
        f"Base model, no tuning: exact match **{result['base_exact_match']:.3f}**.",
        "",
        "| method | trainable | % of base | weights on disk | median step | peak RSS (tune) | exact match |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_share']:.3f}% | "
                     f"{_size(r['adapter_bytes'])} | {r['step_seconds_median']:.2f} s | {r['peak_rss_mb']:,} MB | "
                     f"{r['exact_match']:.3f} |")
    lines += ["", "Checks:", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in result["checks"].items()]
    notes = [f"- {r['optimizer_note']}" for r in result["rows"] if r.get("optimizer_note")]
    if any(r["method"] == "ptuning" for r in result["rows"]):
        notes.append("- ptuning trains a prompt encoder but PEFT saves only the virtual tokens it produces: "
                     "its adapter is as small as prompt tuning's.")
    pir = next((r for r in result["rows"] if r["method"] == "pir"), None)
    if pir:
        p = pir["pir"]
        notes.append(f"- pir: {p['stored_weights']:,} of {p['eligible_weights']:,} weights of the chosen modules "
                     f"({100 * p['share']:.3f}%), {p['scorer']} scores from {p['calibration_batches']} batches in "
                     f"{p['scoring_seconds']:.1f} s (part of its tune time, not of its step time).")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/methods.yaml")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all registered)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for methods.json and methods.md")
    args = parser.parse_args()
    cfg = load_config(ROOT / args.config)
    names = [get_method(n.strip()).name for n in args.methods.split(",") if n.strip()]
    task = cfg.tasks[0]
    run_root = ROOT / cfg.out_dir
    started = time.perf_counter()

    edgetune(args.config, "evaluate", "--set", "run=methods-base", "--set", "evaluate.artifacts=[base]")
    base_report = json.loads((run_root / "methods-base" / "report.json").read_text())
    base_em = base_report["tasks"][task.name]["artifacts"]["base"]["exact_match"]
    rows = []
    for name in names:
        rows.append(run_method(args.config, name, run_root, task.name))
        print(f"bench-methods: {name}: exact match {rows[-1]['exact_match']:.3f}, median step "
              f"{rows[-1]['step_seconds_median']:.2f} s, peak RSS {rows[-1]['peak_rss_mb']} MB", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "command": "make bench-methods" if args.methods == ",".join(METHODS) else shlex.join(["python", *sys.argv]),
        "commit": commit.stdout.strip() or None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": base_report["machine"],
        "base": cfg.base, "task": task.name, "test_rows": base_report["tasks"][task.name]["test_rows"],
        "steps": task.max_steps or cfg.tune.max_steps, "batch_size": cfg.tune.batch_size, "seed": cfg.seed,
        "base_exact_match": base_em,
        "rows": rows,
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    result["checks"] = checks(rows, base_em, cfg.pir.k)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "methods.json", result)
    write_text_atomic(out / "methods.md", markdown(result))
    print(markdown(result))
    failed = [what for what, ok in result["checks"].items() if not ok]
    if failed:
        print("bench-methods: FAILED checks:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
