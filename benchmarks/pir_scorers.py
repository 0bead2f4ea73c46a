"""`make bench-pir`: what each PIR importance scorer costs on the default base, and what it picks.

For every scorer (taylor, fisher, forest) a child process loads the base, scores and selects the
top-k weights exactly as ``edgetune tune --set method=pir`` does (no training), and reports the
scoring time, the process's peak RSS, how many modules got weights, and how much of the selection
it shares with taylor's. Writes ``benchmarks/results/pir_scorers.{json,md}``.

    python benchmarks/pir_scorers.py [--config benchmarks/methods.yaml] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402

SCORERS = ("taylor", "fisher", "forest")


def child(config: str, scorer: str, out: Path) -> None:
    """In the child process: score and select with ``scorer``; save the selection's indices."""
    import torch

    from pipeline.config import load_config
    from pipeline.data import encode_all, load_examples
    from pipeline.device import set_threads
    from pipeline.methods.pir import apply_pir, delta_layers
    from pipeline.models import load_model, load_tokenizer, resolve_base

    cfg = load_config(ROOT / config, [f"pir.scorer={scorer}"])
    set_threads(cfg.num_threads)
    base = resolve_base(cfg.base)
    task = cfg.tasks[0]
    data = encode_all(load_tokenizer(base), load_examples(ROOT / task.train), cfg.tune.max_seq_len, task.train)
    model = apply_pir(load_model(base), cfg, data=data)
    torch.save({n: m.indices for n, m in delta_layers(model).items()}, out / f"{scorer}.pt")
    (out / f"{scorer}.json").write_text(json.dumps(model.pir_info | {"shapes": None}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/methods.yaml")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.child, Path(args.tmp))
        return 0

    import torch

    from pipeline.artifacts import write_json_atomic, write_text_atomic
    from pipeline.config import load_config
    from pipeline.report import machine

    cfg = load_config(ROOT / args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scorer in SCORERS:
            cmd = [sys.executable, __file__, "--config", args.config, "--child", scorer, "--tmp", tmp]
            seconds, rss_mb = run_measured(cmd, f"bench-pir ({scorer})")
            info = json.loads((Path(tmp) / f"{scorer}.json").read_text())
            rows.append({"scorer": scorer, "scoring_seconds": info["scoring_seconds"],
                         "process_seconds": round(seconds, 1), "peak_rss_mb": round(rss_mb),
                         "selected": info["selected"], "eligible": info["eligible"]})
        chosen = {s: torch.load(Path(tmp) / f"{s}.pt") for s in SCORERS}
    for row in rows:
        picks = chosen[row["scorer"]]
        row["modules_with_weights"] = sum(1 for i in picks.values() if i.numel())
        shared = sum(len(set(picks[n].tolist()) & set(chosen["taylor"].get(n, torch.empty(0)).tolist()))
                     for n in picks)
        row["overlap_with_taylor"] = round(shared / max(row["selected"], 1), 4)

    result = {"command": "make bench-pir", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "base": cfg.base, "task": cfg.tasks[0].name, "k": cfg.pir.k,
              "calibration_batches": cfg.pir.calibration_batches, "batch_size": cfg.tune.batch_size,
              "forest_keep": cfg.pir.forest_keep, "forest_probes": cfg.pir.forest_probes, "rows": rows}
    m = result["machine"]
    lines = ["# PIR scorers: cost and choice", "",
             f"Base `{cfg.base}`, task `{result['task']}`, k = {cfg.pir.k}, {cfg.pir.calibration_batches} calibration "
             f"batches of {cfg.tune.batch_size}; forest keeps {cfg.pir.forest_keep:.0%} of modules from probes on "
             f"{cfg.pir.forest_probes:.0%}.  ",
             f"Machine: {m['cpu']}, {m['cores']} cores. Command: `make bench-pir`, {result['created']}.", "",
             "| scorer | scoring time | peak RSS (process) | weights chosen | modules holding them | shared with taylor |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['scorer']} | {r['scoring_seconds']:.1f} s | {r['peak_rss_mb']:,} MB | {r['selected']:,} of "
              f"{r['eligible']:,} | {r['modules_with_weights']} | {100 * r['overlap_with_taylor']:.1f}% |" for r in rows]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "pir_scorers.json", result)
    write_text_atomic(out / "pir_scorers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
