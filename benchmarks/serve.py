"""`make bench-serve`: the multi-adapter server under load, on both backends, against a naive server.

On the default base, with 8 LoRA adapters (rank 16, all linear layers, random weights: speed does
not depend on what they learned), for each backend:

- ``torch``: ``edgetune serve`` over the adapters in a temporary adapter root (full precision, ``--device``
  and ``--dtype``);
- ``onnx``: ``edgetune serve --backend onnx`` over an edge bundle made of the ``make pipeline`` run's
  shared int4 base (``runs/<run>/export/edge/model.onnx``) and the same 8 adapters as ``.onnx_adapter``
  files.

Both servers run at once, each in a child process, and are measured through HTTP:

  1. Adapter load: each adapter unloaded and loaded again through ``POST /v1/adapters`` (validation, load,
     registration), p50 over the 8.
  2. Throughput at concurrency 16: the same requests spread over 8 adapters, then all on one, in
     ``--repeats`` rounds that alternate between the backends (the idle server uses no CPU), so both
     meet the same drift of a noisy machine; the median run of each is reported, and the ONNX/torch
     ratio of every round.
  3. Latency p50/p95 and time to first token (streaming) at concurrency 1, 4 and 16; the concurrency-1 run
     also gives the backend's single-stream decode speed (tokens after the first / time after the first).
  4. The naive baseline, after the server has stopped, in this process (no HTTP cost, so the comparison
     flatters it): one request at a time, switching the adapter per request (torch: one PEFT model holding
     the 8 adapters, ``set_adapter`` + ``generate``; onnx: the edge runtime's ``EdgeRunner.generate`` with
     the adapter named per call).

Every request asks for ``--tokens`` tokens, greedy; the random adapters leave the base's answers, so some
end early at the end-of-sequence token: throughput counts the tokens actually generated, alike for every
row. The prompts are 4 short chat prompts in turn (the server's prefix cache sees them repeat, as it would
a shared system prompt; its hit rate is reported).
Writes ``benchmarks/results/serve.{json,md}``.

    python benchmarks/serve.py [--backends torch,onnx] [--requests 48] [--tokens 32] [--repeats 5]
                               [--device auto] [--dtype auto] [--run default]
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


def start_server(log: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    """``edgetune serve *flags`` in a child process on a free port, its output in ``log``: (its URL, the
    process) once it answers /ready. The process is killed if it never gets ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port), *flags],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(url, server, timeout=300)
    except BaseException:
        server.kill()
        raise
    return url, server


def make_bundle(edge: Path, adapters: Path, names: list[str], out: Path) -> Path:
    """An edge bundle at ``out``: the pipeline bundle's base, tokenizer and chat format, and ``names`` (PEFT
    folders under ``adapters``) as ``.onnx_adapter`` files."""
    from edge.bundle import MANIFEST, load_bundle, sha256
    from exporters.onnx_lora import write_onnx_adapter

    load_bundle(edge)  # verified: the base is the one the pipeline gated
    manifest = json.loads((edge / MANIFEST).read_text())
    (out / "adapters").mkdir(parents=True)
    files = {}
    for rel in (manifest["model"], manifest["tokenizer"], "chat_template.jinja"):
        if (edge / rel).is_file():
            try:  # a hard link: the 90 MB base is not copied
                os.link(edge / rel, out / rel)
            except OSError:
                (out / rel).write_bytes((edge / rel).read_bytes())
            files[rel] = manifest["files"][rel]
    manifest["adapters"] = {}
    for name in names:
        rel = f"adapters/{name}.onnx_adapter"
        write_onnx_adapter(adapters / name, out / rel)
        files[rel] = {"bytes": (out / rel).stat().st_size, "sha256": sha256(out / rel)}
        manifest["adapters"][name] = {"kind": "lora", "file": rel}
    manifest["files"] = files
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(out)  # every file as listed
    return out


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
        decode = [(r["tokens"] - 1) / (r["latency"] - r["ttft"]) for r in results
                  if r["ttft"] is not None and r["tokens"] > 1 and r["latency"] > r["ttft"]]
        out["decode_tokens_per_s_p50"] = round(percentile(decode, 0.5), 2) if decode else None
    return out


def naive_torch(base: Path, root: Path, names: list[str], requests: int, tokens: int, device: str,
                dtype: str) -> dict:
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


def naive_onnx(bundle: Path, names: list[str], requests: int, tokens: int) -> dict:
    """One request at a time on the edge runtime, the adapter named per request (ONNX Runtime activates one
    ``.onnx_adapter`` per run)."""
    from edge.bundle import EdgeRunner, load_bundle

    runner = EdgeRunner(load_bundle(bundle))
    for name in names:
        runner.resolve(name)  # loaded up front, as a server would hold them
    produced, started = 0, time.perf_counter()
    for i in range(requests):
        ids = runner.encode_chat(PROMPTS[i % len(PROMPTS)])
        generated, text = runner.start(ids, tokens, adapter=names[i % len(names)])
        for token in generated:
            text.push(token)
            if text.finish_reason is not None:
                break
        produced += len(text.tokens)
    wall = time.perf_counter() - started
    return {"requests": requests, "seconds": round(wall, 2), "tokens": produced,
            "tokens_per_s": round(produced / wall, 2)}


def adapter_loads(url: str, names: list[str]) -> list[float]:
    """Each adapter unloaded, then a real load timed: validation + load + registration (seconds)."""
    loads = []
    for name in names:
        httpx.delete(f"{url}/v1/adapters/{name}", timeout=120).raise_for_status()
        started = time.perf_counter()
        httpx.post(f"{url}/v1/adapters", json={"name": name, "source": name}, timeout=120).raise_for_status()
        loads.append(time.perf_counter() - started)
    return loads


def measure(urls: dict[str, str], names: list[str], args) -> dict[str, dict]:
    """Adapter loads, throughput (8 vs 1 adapter), latency and TTFT of every running server. The throughput
    rounds alternate between the servers (the idle one waits without using the CPU), so drift in the machine
    hits every backend and load alike: the ratios between them are measured in the same minutes."""
    out: dict[str, dict] = {}
    for backend, url in urls.items():
        out[backend] = {"loads": adapter_loads(url, names), "spread": [], "single": []}
        load(url, names, 16, 16, 4)  # warm-up
    for _ in range(args.repeats):
        for backend, url in urls.items():
            out[backend]["spread"].append(load(url, names, args.requests, 16, args.tokens))
            out[backend]["single"].append(load(url, names[:1], args.requests, 16, args.tokens))
    results = {}
    for backend, url in urls.items():
        latency = [load(url, names, max(c * 2, 8), c, args.tokens, stream=True) for c in (1, 4, 16)]
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        hit = [line for line in metrics.splitlines() if line.startswith("edgetune_prefix_cache_hit_ratio ")]
        loads = out[backend]["loads"]
        results[backend] = {
            "adapter_load_p50_s": round(statistics.median(loads), 4), "adapter_loads_s": [round(x, 4) for x in loads],
            "spread_8_adapters": median_run(out[backend]["spread"]), "single_adapter": median_run(out[backend]["single"]),
            "latency": latency, "single_stream_decode_tokens_per_s": latency[0]["decode_tokens_per_s_p50"],
            "prefix_cache_hit_ratio": float(hit[0].split()[1]) if hit else None}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput measurement")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds per load; the median is reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the torch server and its baseline run (auto: CUDA when visible)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="torch weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--run", default="default", help="the make pipeline run whose edge bundle's base the onnx "
                                                         "backend serves (runs/<run>/export/edge)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"torch", "onnx"} or not backends:
        parser.error(f"--backends: torch and/or onnx, got {args.backends!r}")
    edge = ROOT / "runs" / args.run / "export" / "edge"
    if "onnx" in backends and not (edge / "manifest.json").is_file():
        parser.error(f"the onnx backend serves {edge}'s int4 base: run `make pipeline` first (or --backends torch)")

    from pipeline.device import resolve_device, resolve_dtype
    from pipeline.models import resolve_base
    from pipeline.report import machine

    # resolved here, and passed to the server, so the results name what was measured
    device = resolve_device(args.device)
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    base = resolve_base("smollm2-135m-instruct")
    total_started = time.perf_counter()
    result: dict = {"command": "make bench-serve", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": machine(), "base": "smollm2-135m-instruct", "adapters": N_ADAPTERS,
                    "max_tokens": args.tokens, "backends": {}}
    common = ["--max-batch-size", "16", "--max-queue", "256", "--max-rank", "16"]
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        root = Path(tmp) / "adapters"
        names = make_adapters(base, root)
        bundle = make_bundle(edge, root, names, Path(tmp) / "bundle") if "onnx" in backends else None
        flags = {"torch": ["--adapters", str(root), "--device", device, "--dtype", dtype, *common],
                 "onnx": ["--backend", "onnx", "--bundle", str(bundle), *common]}
        servers: dict[str, tuple[str, subprocess.Popen]] = {}
        try:
            for backend in backends:
                print(f"bench-serve: starting the {backend} backend", flush=True)
                servers[backend] = start_server(Path(tmp) / f"{backend}.log", *flags[backend])
            measured = measure({b: url for b, (url, _) in servers.items()}, names, args)
        finally:
            for _, server in servers.values():
                server.terminate()
                server.wait(timeout=60)
        requests = max(args.requests // 3, 8)
        for backend, m in measured.items():
            m["naive_switching"] = naive_torch(base, root, names, requests, args.tokens, device, dtype) \
                if backend == "torch" else naive_onnx(bundle, names, requests, args.tokens)
            spread = m["spread_8_adapters"]["tokens_per_s"]
            m["ratio_spread_vs_single"] = round(spread / m["single_adapter"]["tokens_per_s"], 3)
            m["ratio_spread_vs_naive"] = round(spread / m["naive_switching"]["tokens_per_s"], 3)
            if m["single_stream_decode_tokens_per_s"]:
                m["ratio_spread_vs_single_stream"] = round(spread / m["single_stream_decode_tokens_per_s"], 3)
            m["settings"] = {"device": device, "dtype": dtype} if backend == "torch" else \
                {"bundle_base": str(edge.relative_to(ROOT) / "model.onnx"), "precision": "int4 (MatMulNBits)"}
            result["backends"][backend] = m
    result["total_minutes"] = round((time.perf_counter() - total_started) / 60, 1)
    result["checks"] = checks = {}
    for backend, m in result["backends"].items():
        checks[f"{backend}: 8 adapters >= 0.8x single adapter"] = m["ratio_spread_vs_single"] >= 0.8
        checks[f"{backend}: 8 adapters >= 2x naive switching server"] = m["ratio_spread_vs_naive"] >= 2.0
    if {"torch", "onnx"} <= set(result["backends"]):
        t, o = result["backends"]["torch"], result["backends"]["onnx"]
        result["ratio_onnx_vs_torch"] = round(o["spread_8_adapters"]["tokens_per_s"]
                                              / t["spread_8_adapters"]["tokens_per_s"], 3)
        # per round (the two ran minutes apart at most): how steady the ratio is
        result["ratio_onnx_vs_torch_rounds"] = [round(a / b, 2) for a, b in zip(
            o["spread_8_adapters"]["tokens_per_s_runs"], t["spread_8_adapters"]["tokens_per_s_runs"])]
        checks["onnx 8 adapters at concurrency 16 >= 5x torch's"] = result["ratio_onnx_vs_torch"] >= 5.0
    if "onnx" in result["backends"]:
        o = result["backends"]["onnx"]
        checks["onnx 8 adapters at concurrency 16 >= 200 tokens/s"] = o["spread_8_adapters"]["tokens_per_s"] >= 200
        checks["onnx 8 adapters >= 4x its single-stream decode"] = o.get("ratio_spread_vs_single_stream", 0) >= 4.0
        checks["onnx p50 time to first token at concurrency 16 <= 1.0 s"] = o["latency"][2]["ttft_p50_s"] <= 1.0
        checks["onnx adapter load p50 <= 100 ms"] = o["adapter_load_p50_s"] <= 0.1
    return write_results(ROOT / args.out, "serve", result, _markdown(result, args))


def _markdown(result: dict, args) -> list[str]:
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = ["# Multi-adapter serving", "",
             f"Base `smollm2-135m-instruct`, {N_ADAPTERS} LoRA adapters (r=16, all linear layers), "
             f"max_tokens {args.tokens}, greedy, {args.requests} requests per throughput run.  ",
             f"Machine: {m['cpu']}, {m['cores']} cores{gpu}. Command: `make bench-serve`, {result['created']} "
             f"({result['total_minutes']} min).", ""]
    for backend, b in result["backends"].items():
        spread, single, naive = b["spread_8_adapters"], b["single_adapter"], b["naive_switching"]
        where = (f"torch on {b['settings']['device']} in {b['settings']['dtype']}" if backend == "torch" else
                 f"ONNX Runtime, the edge bundle's shared int4 base ({b['settings']['bundle_base']}) + .onnx_adapter files")
        lines += [f"## {backend} backend: {where}", "",
                  f"| load | requests | tokens/s (median of {args.repeats}) | p50 latency | p95 latency |",
                  "|---|---:|---:|---:|---:|",
                  f"| 8 adapters, concurrency 16 | {spread['requests']} | {spread['tokens_per_s']:.1f} | "
                  f"{spread['latency_p50_s']:.2f} s | {spread['latency_p95_s']:.2f} s |",
                  f"| 1 adapter, concurrency 16 | {single['requests']} | {single['tokens_per_s']:.1f} | "
                  f"{single['latency_p50_s']:.2f} s | {single['latency_p95_s']:.2f} s |",
                  f"| naive: switch adapter per request, one at a time | {naive['requests']} | "
                  f"{naive['tokens_per_s']:.1f} | | |", "",
                  f"8 adapters vs 1: **{b['ratio_spread_vs_single']:.2f}×**; vs naive: "
                  f"**{b['ratio_spread_vs_naive']:.2f}×**; vs its single-stream decode "
                  f"({b['single_stream_decode_tokens_per_s']} tokens/s): "
                  f"**{b.get('ratio_spread_vs_single_stream', 0):.2f}×**. Adapter load p50 "
                  f"{b['adapter_load_p50_s'] * 1000:.0f} ms."
                  + (f" Prefix cache hit ratio {b['prefix_cache_hit_ratio']:.2f}." if b.get("prefix_cache_hit_ratio")
                     is not None else ""), "",
                  "| concurrency (8 adapters, streaming) | p50 latency | p95 latency | p50 time to first token | "
                  "p95 TTFT |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['concurrency']} | {r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s | "
                  f"{r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s |" for r in b["latency"]]
        lines.append("")
    if "ratio_onnx_vs_torch" in result:
        lines += [f"ONNX int4 vs torch fp32, 8 adapters at concurrency 16: **{result['ratio_onnx_vs_torch']:.2f}×** "
                  f"(medians; round by round: {', '.join(f'{r:.2f}' for r in result['ratio_onnx_vs_torch_rounds'])})."]
    return lines


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
