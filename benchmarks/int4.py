"""`make bench-int4`: what 4 bits cost on every task, and what calibration buys.

For each task of each run (``--runs``, default the bundled three tasks of ``runs/default`` from
``configs/default.yaml`` and the user task of ``runs/user-dates`` from ``configs/user-dates.yaml``,
a date task in phrasings the bundled generator never uses; the stages they need are run first, a
no-op when ``make pipeline`` made them), on the task's full test set:

  - exact match of torch fp32 (the merged model: the reference), ONNX int4 (merged, GPTQ-calibrated:
    the default), the same rounded to nearest (``rtn-b32``: the recipe before calibration), the edge
    bundle (the shared int4 base + the task's adapter) and torch NF4 (NF4 base + the adapter);
  - sizes, as a share of the ONNX fp32 export;

and per run, the shared int4 base against the fp32 base on every task's fidelity rows (the answer
positions): top-1 agreement and KL, for the bundle's GPTQ base and a round-to-nearest one built here.
Writes ``benchmarks/results/int4.{json,md}`` with the command that made them and checks issue 13's
goals (every 4-bit form within 0.03 of fp32, ≤ 0.22× the fp32 ONNX size, base top-1 ≥ 0.9).

    python benchmarks/int4.py [--runs configs/default.yaml:default,configs/user-dates.yaml:user-dates]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402

FORMS = [("torch fp32", "merged"), ("ONNX int4 (GPTQ)", "onnx-int4"), ("ONNX int4 (round-to-nearest)", "onnx-int4@rtn-b32"),
         ("edge bundle (int4 base + adapter)", "edge"), ("torch NF4 (base + adapter)", "nf4")]
GOALS = {"max_score_drop": 0.03, "max_size_ratio": 0.22, "min_base_top1": 0.9}
CHECKED = ("onnx-int4", "edge", "nf4")
"""The forms the goals hold for (the round-to-nearest row is the comparison, not a product)."""
SIZED = ("onnx-int4", "edge")
"""The forms the size goal is for: the ONNX int4 artifacts, against the ONNX fp32 export."""


def _score(cfg, task, artifact: str, examples) -> tuple[float, int]:
    """(exact match on ``examples``, bytes on disk) of one form."""
    from pipeline.evaluate import artifact_size, int4_variant, load_artifact
    from pipeline.scoring import exact_match

    if "@" in artifact:
        with int4_variant(cfg, task, artifact.partition("@")[2]) as (model, tokenizer, size):
            return exact_match(model, tokenizer, examples, task.max_new_tokens, 20, desc=artifact)[0], size
    model, tokenizer = load_artifact(cfg, task, artifact)
    return exact_match(model, tokenizer, examples, task.max_new_tokens, 20, desc=artifact)[0], \
        artifact_size(cfg, task, artifact)


def _bases(cfg) -> dict[str, dict[str, dict]]:
    """Answer-position agreement of the shared int4 base (GPTQ, as bundled; and round-to-nearest) with fp32."""
    import onnx

    from edge.runtime import Decoder
    from exporters.onnx import OnnxCausalLM, export_onnx_fp32
    from exporters.onnx_lora import add_lora_inputs
    from pipeline.evaluate import variant_config
    from pipeline.fidelity import measure
    from pipeline.models import load_model, load_tokenizer, resolve_base
    from pipeline.onnx_build import quantize_onnx
    from pipeline.paths import bundle_dir

    base = resolve_base(cfg.base)
    torch_base, tokenizer = load_model(base, "cpu"), load_tokenizer(base)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx_fp32(base, Path(tmp) / "fp32")
        model = onnx.load(str(fp32 / "model.onnx"))
        add_lora_inputs(model)
        onnx.save_model(model, str(Path(tmp) / "lora.onnx"))
        quantize_onnx(variant_config(cfg, "rtn-b32"), "int4", Path(tmp) / "lora.onnx", Path(tmp) / "rtn.onnx")
        for name, path in (("gptq", bundle_dir(cfg) / "model.onnx"), ("rtn", Path(tmp) / "rtn.onnx")):
            decoder = OnnxCausalLM(Decoder(path, threads=cfg.num_threads or None))
            out[name] = {t.name: {k: m[k] for k in ("top1_agreement", "kl", "rows")}
                         for t in cfg.tasks for m in [measure(cfg, t, torch_base, decoder, tokenizer)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="configs/default.yaml:default,configs/user-dates.yaml:user-dates",
                        help="config:run pairs, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.data import load_examples
    from pipeline.device import set_threads
    from pipeline.evaluate import artifact_size

    set_threads(args.threads)
    tasks, bases = {}, {}
    for pair in args.runs.split(","):
        config, run = pair.split(":")
        run_measured([sys.executable, "-m", "pipeline.cli", "pipeline", "--config", config, "--set", f"run={run}",
                      "--stages", "tune,merge,quantize,export"], f"pipeline {run}")
        cfg = load_config(config, [f"run={run}", f"num_threads={args.threads}"])
        for task in cfg.tasks:
            examples = [e for e in load_examples(task.test) if e.reference is not None]
            fp32_size = artifact_size(cfg, task, "onnx")
            rows = {}
            for label, artifact in FORMS:
                score, size = _score(cfg, task, artifact, examples)
                rows[artifact] = {"label": label, "exact_match": round(score, 4), "size_bytes": size,
                                  "size_ratio": round(size / fp32_size, 3)}
                print(f"{run}/{task.name} {label}: {rows[artifact]}", flush=True)
            tasks[f"{run}/{task.name}"] = {"rows": len(examples), "onnx_fp32_bytes": fp32_size, "forms": rows}
        bases[run] = _bases(cfg)
        print(f"{run} shared base: {bases[run]}", flush=True)
    write_results(args, tasks, bases)


def write_results(args, tasks: dict, bases: dict) -> None:
    from pipeline.report import machine

    met = {}
    for name, t in tasks.items():
        fp32 = t["forms"]["merged"]["exact_match"]
        for artifact in CHECKED:
            form = t["forms"][artifact]
            form["drop"] = round(fp32 - form["exact_match"], 4)
            met[f"{name} {artifact} score"] = form["drop"] <= GOALS["max_score_drop"] + 1e-9
            if artifact in SIZED:
                met[f"{name} {artifact} size"] = form["size_ratio"] <= GOALS["max_size_ratio"]
    for run, kinds in bases.items():
        for task, m in kinds["gptq"].items():
            met[f"{run} base top-1 on {task}"] = m["top1_agreement"] >= GOALS["min_base_top1"]
    command = "make bench-int4  # python benchmarks/int4.py " + shlex.join(sys.argv[1:])
    result = {"command": command.strip(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "threads": args.threads, "tasks": tasks, "shared_base": bases, "goals": GOALS,
              "met": met, "all_met": all(met.values())}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "int4.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# bench-int4: what 4 bits cost on each task, and what calibration buys", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores), {args.threads} threads, {result['created']}.",
             "Exact match on each task's full test set; Δ = torch fp32 minus the form (goal ≤ "
             f"{GOALS['max_score_drop']}); size as a share of the ONNX fp32 export (goal ≤ {GOALS['max_size_ratio']} "
             "for the ONNX int4 forms; NF4 keeps bitsandbytes' full-precision embedding and is shown for reference).",
             "", "| task (rows) | " + " | ".join(label for label, _ in FORMS) + " |",
             "|---|" + "---:|" * len(FORMS)]
    for name, t in tasks.items():
        cells = []
        for _, artifact in FORMS:
            f = t["forms"][artifact]
            delta = "" if artifact == "merged" else f" (Δ {t['forms']['merged']['exact_match'] - f['exact_match']:+.2f})"
            cells.append(f"{f['exact_match']:.3f}{delta}, {f['size_ratio']:.3f}×")
        lines.append(f"| {name} ({t['rows']}) | " + " | ".join(cells) + " |")
    lines += ["", "Shared int4 base of the edge bundle against the fp32 base, answer positions of each task's fidelity "
              f"rows (goal: top-1 ≥ {GOALS['min_base_top1']}):", "",
              "| run | task | top-1 GPTQ (bundled) | KL GPTQ | top-1 round-to-nearest | KL round-to-nearest |",
              "|---|---|---:|---:|---:|---:|"]
    for run, kinds in bases.items():
        for task in kinds["gptq"]:
            g, r = kinds["gptq"][task], kinds["rtn"][task]
            lines.append(f"| {run} | {task} | {g['top1_agreement']:.3f} | {g['kl']:.3f} | {r['top1_agreement']:.3f} | "
                         f"{r['kl']:.3f} |")
    failed = [k for k, ok in met.items() if not ok]
    lines += ["", f"Goals met: {sum(met.values())} of {len(met)}" + (f"; not met: {', '.join(failed)}" if failed else "."),
              ""]
    (results / "int4.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
