"""`make bench-serve`: the multi-adapter server under load, against a single adapter and a naive server.

On the default base, with 8 LoRA adapters (rank 16, all linear layers, random weights: speed does
not depend on what they learned) in a temporary adapter root:
  1. ``edgetune serve`` in a child process; each adapter is (re)loaded through POST /v1/adapters
     to time adapter loads.
  2. Throughput at concurrency 16: the same requests spread over 8 adapters, then all on one,
     interleaved ``--repeats`` times; the median run of each is reported.
  3. Latency p50/p95 and time to first token (streaming) at concurrency 1, 4 and 16.
  4. The naive baseline, after the server has stopped: one PEFT model holding the same 8 adapters,
     ``set_adapter`` per request and ``generate`` one request at a time, in this process (no HTTP
     cost, so the comparison flatters the baseline).
Every request generates exactly ``--tokens`` tokens (``ignore_eos``-style: stop sequences none, the
random adapters rarely emit EOS; throughput counts the tokens actually generated).
Server and baseline run on ``--device`` in ``--dtype`` (default auto: CUDA in bfloat16 when a GPU is
visible, else the CPU in float32); the results say which.
Writes ``benchmarks/results/serve.{json,md}``.

    python benchmarks/serve.py [--requests 48] [--tokens 32] [--repeats 3] [--device auto] [--dtype auto]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import write_results  # noqa: E402
from serve.app import wait_ready  # noqa: E402

N_ADAPTERS = 8
PROMPTS = ["Review: the kettle stopped working after a week.\nLabel the sentiment.",
           "Order from Ana Ruiz: 3 x blue mug, ship to Porto.", "Convert 3 March 2024 to ISO 8601.",
           "Write one sentence about the sea."]


def make_adapters(base: Path, root: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_model

    names = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(load_model(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                            task_type="CAUSAL_LM", init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
        name = f"task{i}"
        model.save_pretrained(root / name)
        names.append(name)
    return names


def start_server(root: Path, log: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    """``edgetune serve --adapters root *flags`` in a child process on a free port, its output in ``log``:
    (its URL, the process) once it answers /ready. The process is killed if it never gets ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--adapters", str(root), "--port",
                               str(port), *flags], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(url, server, timeout=300)
    except BaseException:
        server.kill()
        raise
    return url, server


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with every run's tokens/s attached."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def one(url: str, model: str, prompt: str, tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0}
    started = time.perf_counter()
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return {"latency": time.perf_counter() - started, "tokens": r.json()["usage"]["completion_tokens"]}
    first, n = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - started, "ttft": first, "tokens": n}


def load(url: str, models: list[str], requests: int, concurrency: int, tokens: int, stream: bool = False) -> dict:
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda j: one(url, j[0], j[1], tokens, stream), jobs))
    wall = time.perf_counter() - started
    out = {"requests": requests, "concurrency": concurrency, "adapters": len(models), "seconds": round(wall, 2),
           "tokens": sum(r["tokens"] for r in results),
           "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
           "latency_p50_s": round(percentile([r["latency"] for r in results], 0.5), 3),
           "latency_p95_s": round(percentile([r["latency"] for r in results], 0.95), 3)}
    if stream:
        ttft = [r["ttft"] for r in results if r["ttft"] is not None]
        out |= {"ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3)}
    return out


def naive(base: Path, root: Path, names: list[str], requests: int, tokens: int, device: str, dtype: str) -> dict:
    """One request at a time, switching the active adapter per request (what a simple server does), on the
    server's device and dtype."""
    import torch
    from peft import PeftModel

    from pipeline.device import set_threads, to_model
    from pipeline.models import load_tokenizer
    from serve.engine import load_base

    set_threads(0)
    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_base(base, "none", device=device, dtype=dtype), root / names[0],
                                      adapter_name=names[0], autocast_adapter_dtype=False).eval()
    for name in names[1:]:
        model.load_adapter(str(root / name), adapter_name=name, autocast_adapter_dtype=False)
    produced, started = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(requests):
            model.set_adapter(names[i % len(names)])
            text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                           add_generation_prompt=True)
            batch = to_model(tok([text], return_tensors="pt", add_special_tokens=False), model)
            out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            produced += out.shape[1] - batch["input_ids"].shape[1]
    wall = time.perf_counter() - started
    return {"requests": requests, "seconds": round(wall, 2), "tokens": produced,
            "tokens_per_s": round(produced / wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput measurement")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per load; the median is reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the server and the baseline run (auto: CUDA when visible)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from pipeline.device import resolve_device, resolve_dtype
    from pipeline.models import resolve_base
    from pipeline.report import machine

    # resolved here, and passed to the server, so the results name what was measured
    device = resolve_device(args.device)
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    base = resolve_base("smollm2-135m-instruct")
    total_started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        names = make_adapters(base, root)
        url, server = start_server(root, Path(tmp) / "server.log", "--max-batch-size", "16", "--max-queue", "256",
                                   "--max-rank", "16", "--device", device, "--dtype", dtype)
        try:
            loads = []
            for name in names:  # a hot swap of each: validation + load + registration
                started = time.perf_counter()
                httpx.post(f"{url}/v1/adapters", json={"name": name, "source": name}, timeout=120).raise_for_status()
                loads.append(time.perf_counter() - started)
            load(url, names, 16, 16, 4)  # warm-up
            runs = {"spread": [], "single": []}
            for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
                runs["spread"].append(load(url, names, args.requests, 16, args.tokens))
                runs["single"].append(load(url, names[:1], args.requests, 16, args.tokens))
            spread, single = (median_run(runs[k]) for k in ("spread", "single"))
            latency = [load(url, names, max(c * 2, 8), c, args.tokens, stream=True) for c in (1, 4, 16)]
        finally:
            server.terminate()
            server.wait(timeout=60)
        baseline = naive(base, root, names, max(args.requests // 3, 8), args.tokens, device, dtype)

    result = {
        "command": "make bench-serve", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "device": device, "dtype": dtype,
        "base": "smollm2-135m-instruct", "adapters": N_ADAPTERS, "max_tokens": args.tokens,
        "adapter_load_p50_s": round(statistics.median(loads), 3), "spread_8_adapters": spread,
        "single_adapter": single, "naive_switching": baseline, "latency": latency,
        "ratio_spread_vs_single": round(spread["tokens_per_s"] / single["tokens_per_s"], 3),
        "ratio_spread_vs_naive": round(spread["tokens_per_s"] / baseline["tokens_per_s"], 3),
        "total_minutes": round((time.perf_counter() - total_started) / 60, 1),
    }
    result["checks"] = {"8 adapters >= 0.8x single adapter": result["ratio_spread_vs_single"] >= 0.8,
                        "8 adapters >= 2x naive switching server": result["ratio_spread_vs_naive"] >= 2.0}
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = ["# Multi-adapter serving", "",
             f"Base `smollm2-135m-instruct`, {N_ADAPTERS} LoRA adapters (r=16, all linear layers), "
             f"max_tokens {args.tokens}, greedy.  ",
             f"Machine: {m['cpu']}, {m['cores']} cores{gpu}. "
             f"Measured on **{device}** in {dtype} (server and baseline). Command: `make bench-serve`, "
             f"{result['created']}.", "",
             f"| load | requests | tokens/s (median of {args.repeats}) | p50 latency | p95 latency |",
             "|---|---:|---:|---:|---:|",
             f"| 8 adapters, concurrency 16 | {spread['requests']} | {spread['tokens_per_s']:.1f} | "
             f"{spread['latency_p50_s']:.2f} s | {spread['latency_p95_s']:.2f} s |",
             f"| 1 adapter, concurrency 16 | {single['requests']} | {single['tokens_per_s']:.1f} | "
             f"{single['latency_p50_s']:.2f} s | {single['latency_p95_s']:.2f} s |",
             f"| naive: switch adapter per request, one at a time | {baseline['requests']} | "
             f"{baseline['tokens_per_s']:.1f} | | |", "",
             f"8 adapters vs 1: **{result['ratio_spread_vs_single']:.2f}×**; vs naive: "
             f"**{result['ratio_spread_vs_naive']:.2f}×**. Adapter load (hot swap) p50 "
             f"{result['adapter_load_p50_s'] * 1000:.0f} ms.", "",
             "| concurrency (8 adapters, streaming) | p50 latency | p95 latency | p50 time to first token | p95 TTFT |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s | "
              f"{r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s |" for r in latency]
    return write_results(ROOT / args.out, "serve", result, lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
