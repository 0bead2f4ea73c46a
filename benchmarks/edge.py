"""`make bench-edge`: every deployable form of one tuned task, side by side, on this CPU.

For the default base merged with a bundled task's adapter (``--task``, default sentiment, from the
``make pipeline`` run ``runs/<run>``; the stages it needs are run first and are a no-op when up to
date), each artifact is measured in a child process of its own (so its peak RSS is its own):

  - batch-1 greedy decode tokens/s: exactly ``--new-tokens`` (128) new tokens, median of ``--repeats`` (5)
  - prompt processing tokens/s: one forward over a ``--prompt-tokens`` (256) token prompt, median of repeats
  - held-out exact match on the task's test rows, and size on disk (what the artifact needs to run)

Artifacts: torch fp32 (merged), torch int8 (bitsandbytes, merged), torch NF4 (4-bit base + adapter),
ONNX fp32, ONNX int8, ONNX int4 (merged, GPTQ-calibrated: the pipeline's default), the same rounded to
nearest (``onnx-int4@rtn-b32``, the recipe before calibration: its decode speed is the reference the
calibrated one must keep within 10 %), and ONNX int4 with the task's ``.onnx_adapter`` active on the
edge bundle's shared base. With llama-cpp-python installed (the ``bench`` extra, which ``make bench-edge``
installs: it compiles llama.cpp, ~10 min once), the ``gguf`` export of the same task run by llama.cpp:
the merged model at f16, q8_0 and q4_1, and the q8_0 shared base with the task's GGUF LoRA adapter; and
ONNX int4 against llama.cpp q4_1 and torch fp32 decode in interleaved rounds in one process (the edge
runtime on the export's fused sidecar, as a device runs it, and on the exported graph alone, what it ran
before the sidecar). Threads: ``--threads`` (2) for torch, ONNX Runtime and llama.cpp alike.
Writes ``benchmarks/results/edge.{json,md}`` and checks the goals of issues 5 and 15.

    python benchmarks/edge.py [--task sentiment] [--run default] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402

# (row label, evaluate artifact name)
ARTIFACTS = [("torch fp32", "merged"), ("torch int8", "int8"), ("torch NF4", "nf4"), ("ONNX fp32", "onnx"),
             ("ONNX int8", "onnx-int8"), ("ONNX int4", "onnx-int4"), ("ONNX int4, round-to-nearest", "onnx-int4@rtn-b32"),
             ("ONNX int4 + .onnx_adapter", "edge")]
# (row label, GGUF file of the task's gguf export, run by llama.cpp): measured when llama-cpp-python is installed
GGUF_ROWS = [("GGUF q4_1, llama.cpp", "model-q4_1.gguf"), ("GGUF q8_0, llama.cpp", "model-q8_0.gguf"),
             ("GGUF f16, llama.cpp", "model-f16.gguf"), ("GGUF q8_0 base + LoRA adapter, llama.cpp", "adapter.gguf")]
GOALS = {"int4_decode_speedup": 4.0, "int4_size_ratio": 0.2, "int4_score_drop": 0.05, "calibrated_vs_rtn_decode": 0.9,
         "int4_vs_llama_cpp_q4_decode": 1.0, "int4_vs_torch_fp32_decode": 5.0, "int4_vs_fp32_score_drop": 0.03,
         "gguf_vs_int4_score_gap": 0.03}


def _gguf_paths(cfg, task, file: str) -> tuple[Path, Path | None]:
    """(model file, LoRA adapter file or None) of one GGUF row."""
    from pipeline.gguf_build import BASE_DIR
    from pipeline.paths import export_dir

    folder = export_dir(cfg, task, "gguf")
    if file == "adapter.gguf":
        return cfg.run_dir / "export" / BASE_DIR / f"model-{cfg.export.gguf_base_type}.gguf", folder / file
    return folder / file, None


def _llama(path: Path, lora: Path | None, threads: int, n_ctx: int = 1024):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=512,
                 n_threads=threads, n_threads_batch=threads, verbose=False)


def _llama_child(args, cfg, task) -> None:
    """Measure one GGUF file in llama.cpp: held-out exact match (greedy, its own end-of-turn stop), decode and
    prompt tokens/s, size."""
    from exporters.gguf import llama_cpp_rate
    from pipeline.data import load_examples, render_prompt
    from pipeline.models import load_tokenizer
    from pipeline.paths import merged_dir

    path, lora = _gguf_paths(cfg, task, args.child.partition(":")[2])
    llama = _llama(path, lora, args.threads)
    tokenizer = load_tokenizer(merged_dir(cfg, task))
    eos = llama.token_eos()
    examples = [e for e in load_examples(task.test) if e.reference is not None]
    hits = 0
    for e in examples:
        got = []
        for token in llama.generate(tokenizer(render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"],
                                    top_k=1, temp=0.0, reset=True):
            if token == eos or len(got) == task.max_new_tokens:
                break
            got.append(token)
        hits += tokenizer.decode(got, skip_special_tokens=True).strip() == e.reference.strip()
    ids = tokenizer(render_prompt(tokenizer, examples[0]), add_special_tokens=False)["input_ids"]
    llama_cpp_rate(llama, ids, 2)  # warm-up
    decode = statistics.median(llama_cpp_rate(llama, ids, args.new_tokens) for _ in range(args.repeats))
    text = " ".join(render_prompt(tokenizer, e) for e in examples[:40])
    long_ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    rates = []
    for _ in range(args.repeats + 1):
        llama.reset()
        started = time.perf_counter()
        llama.eval(long_ids)
        rates.append(args.prompt_tokens / (time.perf_counter() - started))
    size = path.stat().st_size + (lora.stat().st_size if lora else 0)
    Path(args.out).write_text(json.dumps({
        "decode_tokens_per_s": round(decode, 2), "prompt_tokens_per_s": round(statistics.median(rates[1:]), 1),
        "exact_match": round(hits / len(examples), 4), "rows": len(examples), "size_bytes": size}))


def _paired_llama(args, cfg, task) -> None:
    """ONNX int4 (the runtime's streaming loop: on the fused sidecar, and on the exported graph alone) against
    llama.cpp on the q4_1 GGUF of the same merged model and against torch fp32 (the merged model): decode
    rounds interleaved in one process, so the machine's drift is in all four. Also counts the nodes each
    ONNX graph has."""
    import onnx

    from edge.runtime import Decoder
    from edge.slots import fused_path
    from exporters.gguf import llama_cpp_rate
    from pipeline.data import load_examples, render_prompt
    from pipeline.evaluate import load_artifact
    from pipeline.scoring import decode_speed

    model, tokenizer = load_artifact(cfg, task, "onnx-int4")
    fused = model.decoder
    if fused.fused is None:
        raise SystemExit(f"bench-edge: {fused.path} has no fused sidecar: re-run the export stage")
    plain = Decoder(fused.path, threads=args.threads, fused=False)
    llama = _llama(*_gguf_paths(cfg, task, "model-q4_1.gguf"), args.threads)
    example = next(e for e in load_examples(task.test) if e.reference is not None)
    ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    torch_model, _ = load_artifact(cfg, task, "merged")
    prompt = render_prompt(tokenizer, example)
    runs = {"onnx_int4": lambda: fused.decode_speed(ids, args.new_tokens, 1),
            "onnx_int4_exported_graph": lambda: plain.decode_speed(ids, args.new_tokens, 1),
            "llama_cpp_q4_1": lambda: llama_cpp_rate(llama, ids, args.new_tokens),
            "torch_fp32": lambda: decode_speed(torch_model, tokenizer, prompt, args.new_tokens, 1)}
    for measure in runs.values():  # warm-up
        measure()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(2 * args.repeats):
        for name, measure in runs.items():
            rates[name].append(measure())
    nodes = {name: len(onnx.load(str(path), load_external_data=False).graph.node)
             for name, path in (("exported_graph", fused.path), ("fused_sidecar", fused_path(fused.path)))}
    Path(args.out).write_text(json.dumps({**{k: round(statistics.median(v), 2) for k, v in rates.items()},
                                          "graph_nodes": nodes}))


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _config(args):
    from pipeline.config import load_config

    return load_config(args.config, [f"run={args.run}", f"num_threads={args.threads}"])


def child(args) -> None:
    """Measure one artifact; write its numbers as JSON to ``args.out``."""

    from pipeline.device import set_threads
    from pipeline.evaluate import artifact_size, load_artifact

    cfg = _config(args)
    task = cfg.task(args.task)
    set_threads(args.threads)
    if args.child == "pair":
        _paired_int4(args, cfg, task)
        return
    if args.child == "pair-llama":
        _paired_llama(args, cfg, task)
        return
    if args.child.startswith("gguf:"):
        _llama_child(args, cfg, task)
        return
    if "@" in args.child:  # an int4 variant: built in a scratch folder for the measurement
        from pipeline.evaluate import int4_variant

        with int4_variant(cfg, task, args.child.partition("@")[2]) as (model, tokenizer, size):
            _measure_child(args, task, model, tokenizer, size)
        return
    model, tokenizer = load_artifact(cfg, task, args.child)
    _measure_child(args, task, model, tokenizer, artifact_size(cfg, task, args.child))


def _paired_int4(args, cfg, task) -> None:
    """Decode speed of the calibrated int4 export and its round-to-nearest twin, rounds interleaved in one
    process (same graph: any gap is noise or a real cost of the calibrated values, and interleaving keeps
    the machine's drift out of the ratio)."""
    from pipeline.data import load_examples, render_prompt
    from pipeline.evaluate import int4_variant, load_artifact

    gptq, tokenizer = load_artifact(cfg, task, "onnx-int4")
    example = next(e for e in load_examples(task.test) if e.reference is not None)
    ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    rates: dict[str, list[float]] = {"gptq": [], "rtn": []}
    with int4_variant(cfg, task, "rtn-b32") as (rtn, _, _):
        for _ in range(2 * args.repeats):
            for name, model in (("gptq", gptq), ("rtn", rtn)):
                rates[name].append(model.decoder.decode_speed(ids, args.new_tokens, 1))
    Path(args.out).write_text(json.dumps({k: round(statistics.median(v), 2) for k, v in rates.items()}))


def _measure_child(args, task, model, tokenizer, size: int) -> None:
    import torch

    from exporters.onnx import OnnxCausalLM
    from pipeline.data import load_examples, render_prompt
    from pipeline.scoring import decode_speed, exact_match
    examples = [e for e in load_examples(task.test) if e.reference is not None]
    score, _ = exact_match(model, tokenizer, examples, task.max_new_tokens, 20, desc=args.child)
    prompt = render_prompt(tokenizer, examples[0])
    if isinstance(model, OnnxCausalLM):  # the runtime's own streaming loop, as a device runs it
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        decode = model.decoder.decode_speed(ids, args.new_tokens, args.repeats, adapter=model.adapter,
                                            prefix=model.prefix)
    else:
        decode = decode_speed(model, tokenizer, prompt, args.new_tokens, args.repeats)
    text = " ".join(render_prompt(tokenizer, e) for e in examples[:40])
    long_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    assert long_ids.shape[1] == args.prompt_tokens, "the test prompts are too short for --prompt-tokens"
    rates = []
    with torch.no_grad():
        model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))  # warm-up
        for _ in range(args.repeats):
            started = time.perf_counter()
            model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))
            rates.append(args.prompt_tokens / (time.perf_counter() - started))
    Path(args.out).write_text(json.dumps({
        "decode_tokens_per_s": round(decode, 2), "prompt_tokens_per_s": round(statistics.median(rates), 1),
        "exact_match": round(score, 4), "rows": len(examples), "size_bytes": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--run", default="default", help="pipeline run whose artifacts are measured")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    common = ["--config", args.config, "--run", args.run, "--task", args.task, "--threads", str(args.threads),
              "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
              "--prompt-tokens", str(args.prompt_tokens)]
    # The artifacts: a no-op when `make pipeline` made them with this config.
    run_measured([sys.executable, "-m", "pipeline.cli", "pipeline", "--config", args.config, "--set",
                  f"run={args.run}", "--task", args.task, "--stages", "tune,merge,quantize,export"], "pipeline")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, artifact in ARTIFACTS:
            out = Path(tmp) / f"{artifact}.json"
            _, rss = run_measured([sys.executable, __file__, *common, "--child", artifact, "--out", str(out)], label)
            rows[label] = {"artifact": artifact, **json.loads(out.read_text()), "peak_rss_mb": round(rss)}
            print(f"{label}: {rows[label]}", flush=True)
        out = Path(tmp) / "pair.json"
        run_measured([sys.executable, __file__, *common, "--child", "pair", "--out", str(out)], "int4 pair")
        pair = json.loads(out.read_text())
        print(f"interleaved int4 decode: {pair}", flush=True)
        llama_pair = None
        if llama_cpp_installed():
            for label, file in GGUF_ROWS:
                out = Path(tmp) / f"{file}.json"
                _, rss = run_measured([sys.executable, __file__, *common, "--child", f"gguf:{file}", "--out",
                                       str(out)], label)
                rows[label] = {"artifact": f"gguf:{file}", **json.loads(out.read_text()), "peak_rss_mb": round(rss)}
                print(f"{label}: {rows[label]}", flush=True)
            out = Path(tmp) / "pair-llama.json"
            run_measured([sys.executable, __file__, *common, "--child", "pair-llama", "--out", str(out)],
                         "ONNX int4 vs llama.cpp")
            llama_pair = json.loads(out.read_text())
            print(f"interleaved ONNX int4 vs llama.cpp q4_1 decode: {llama_pair}", flush=True)
        else:
            print("bench-edge: llama-cpp-python is not installed (pip install -e .[bench]): no GGUF rows", flush=True)
    write_results(args, rows, pair, llama_pair)


def write_results(args, rows: dict, pair: dict, llama_pair: dict | None = None) -> None:
    from pipeline.report import machine

    fp32, onnx_fp32, int4 = rows["torch fp32"], rows["ONNX fp32"], rows["ONNX int4"]
    checks = {
        "int4_decode_speedup": round(int4["decode_tokens_per_s"] / fp32["decode_tokens_per_s"], 2),
        "int4_size_ratio": round(int4["size_bytes"] / onnx_fp32["size_bytes"], 3),
        "int4_score_drop": round(fp32["exact_match"] - int4["exact_match"], 4),
        "calibrated_vs_rtn_decode": round(pair["gptq"] / pair["rtn"], 3),
    }
    met = {"int4_decode_speedup": checks["int4_decode_speedup"] >= GOALS["int4_decode_speedup"],
           "int4_size_ratio": checks["int4_size_ratio"] <= GOALS["int4_size_ratio"],
           "int4_score_drop": checks["int4_score_drop"] <= GOALS["int4_score_drop"],
           "calibrated_vs_rtn_decode": checks["calibrated_vs_rtn_decode"] >= GOALS["calibrated_vs_rtn_decode"]}
    goal_lines = []
    if llama_pair is not None:
        q4 = rows["GGUF q4_1, llama.cpp"]
        checks.update(
            int4_vs_llama_cpp_q4_decode=round(llama_pair["onnx_int4"] / llama_pair["llama_cpp_q4_1"], 3),
            int4_vs_fp32_score_drop=checks["int4_score_drop"],
            gguf_vs_int4_score_gap=round(abs(q4["exact_match"] - int4["exact_match"]), 4))
        checks["int4_vs_torch_fp32_decode"] = round(llama_pair["onnx_int4"] / llama_pair["torch_fp32"], 2)
        met.update(int4_vs_llama_cpp_q4_decode=checks["int4_vs_llama_cpp_q4_decode"] >= 1.0,
                   int4_vs_torch_fp32_decode=checks["int4_vs_torch_fp32_decode"] >= GOALS["int4_vs_torch_fp32_decode"],
                   int4_vs_fp32_score_drop=checks["int4_vs_fp32_score_drop"] <= GOALS["int4_vs_fp32_score_drop"],
                   gguf_vs_int4_score_gap=checks["gguf_vs_int4_score_gap"] <= GOALS["gguf_vs_int4_score_gap"])
        goal_lines = [
            f"| ONNX int4 decode ÷ llama.cpp q4_1 decode of the same merged model, {2 * args.repeats} interleaved "
            f"rounds each ({llama_pair['onnx_int4']:.1f} vs {llama_pair['llama_cpp_q4_1']:.1f} tok/s) | "
            f"{checks['int4_vs_llama_cpp_q4_decode']:.3f}× | ≥ 1.0× | {'yes' if met['int4_vs_llama_cpp_q4_decode'] else 'no'} |",
            f"| ONNX int4 decode ÷ torch fp32 decode, the same interleaved rounds ({llama_pair['onnx_int4']:.1f} vs "
            f"{llama_pair['torch_fp32']:.1f} tok/s) | {checks['int4_vs_torch_fp32_decode']:.2f}× | ≥ 5× | "
            f"{'yes' if met['int4_vs_torch_fp32_decode'] else 'no'} |",
            f"| exact match drop, ONNX int4 vs torch fp32 | {checks['int4_vs_fp32_score_drop']:.3f} | ≤ 0.03 | "
            f"{'yes' if met['int4_vs_fp32_score_drop'] else 'no'} |",
            f"| exact match gap, GGUF q4_1 in llama.cpp vs ONNX int4 | {checks['gguf_vs_int4_score_gap']:.3f} | ≤ 0.03 | "
            f"{'yes' if met['gguf_vs_int4_score_gap'] else 'no'} |",
        ]
    command = "make bench-edge  # python benchmarks/edge.py " + shlex.join(sys.argv[1:])
    result = {"command": command.strip(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "task": args.task, "run": args.run, "threads": args.threads,
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
              "artifacts": rows, "int4_interleaved_decode": pair, "onnx_vs_llama_cpp_interleaved_decode": llama_pair,
              "checks": checks, "goals": GOALS, "met": met}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "edge.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# bench-edge: `{args.task}` adapter merged into the default base, every deployable form",
        "",
        f"`{result['command']}` on {m['cpu']} ({m['cores']} cores), {args.threads} threads, {result['created']}.",
        f"Decode: batch 1, greedy, exactly {args.new_tokens} new tokens, median of {args.repeats}. Prompt: one "
        f"forward over {args.prompt_tokens} tokens, median of {args.repeats}. Score: held-out exact match "
        f"({fp32['rows']} rows). Peak RSS: the measuring child process (load, score, time).",
        "",
        "| artifact | decode tok/s | prompt tok/s | exact match | size on disk | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['decode_tokens_per_s']:.1f} | {r['prompt_tokens_per_s']:.0f} | "
                     f"{r['exact_match']:.3f} | {r['size_bytes'] / 1e6:.1f} MB | {r['peak_rss_mb']:,} MB |")
    lines += [
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|---|",
        f"| ONNX int4 decode ÷ torch fp32 decode | {checks['int4_decode_speedup']:.2f}× | ≥ 4× | "
        f"{'yes' if met['int4_decode_speedup'] else 'no'} |",
        f"| ONNX int4 size ÷ ONNX fp32 size | {checks['int4_size_ratio']:.3f} | ≤ 0.2 | "
        f"{'yes' if met['int4_size_ratio'] else 'no'} |",
        f"| exact match drop, ONNX int4 vs torch fp32 | {checks['int4_score_drop']:.3f} | ≤ 0.05 | "
        f"{'yes' if met['int4_score_drop'] else 'no'} |",
        f"| ONNX int4 (GPTQ) decode ÷ round-to-nearest int4 decode, {2 * args.repeats} interleaved rounds each "
        f"({pair['gptq']:.1f} vs {pair['rtn']:.1f} tok/s) | {checks['calibrated_vs_rtn_decode']:.3f}× | ≥ 0.9× | "
        f"{'yes' if met['calibrated_vs_rtn_decode'] else 'no'} |",
        *goal_lines,
        "",
    ]
    if llama_pair is None:
        lines.append("No GGUF rows: llama-cpp-python was not installed (`pip install -e .[bench]`).\n")
    else:
        nodes = llama_pair["graph_nodes"]
        lines.append(
            f"The ONNX int4 rows run the export's fused sidecar (`model.fused.onnx`: {nodes['fused_sidecar']:,} nodes, "
            f"GroupQueryAttention over an in-place key/value cache, the same weights). The exported graph alone "
            f"({nodes['exported_graph']:,} nodes) decoded {llama_pair['onnx_int4_exported_graph']:.1f} tok/s in the same "
            f"interleaved rounds ({llama_pair['onnx_int4_exported_graph'] / llama_pair['llama_cpp_q4_1']:.3f}× "
            "llama.cpp).\n")
    (results / "edge.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
