"""`make bench-soak`: the server under sustained load and adapter churn; nothing may fail, leak or leak across.

An ``edgetune serve`` child process on the default base (``--tiny``: the tests' tiny random model, for a
quick run) with the 8 random LoRA adapters of ``make bench-serve`` (task0..task7):
  - untouched: task0..task3 and the base. Before the soak each answers fixed prompts alone (greedy); every
    answer they give during the soak must be identical (another tenant's churn must not change them).
  - churned, one action every ``--churn-every`` seconds, in turn: a hot swap of task4 (re-POST the same
    name, alternately from task5's folder and its own), a hot swap of task5 from its own folder, an unload
    of task6 and its reload, an unload of task7 and its reload.
``--clients`` threads send requests for ``--seconds``: completions and chat, streamed and not, to every
model in turn (churned ones may answer 404 while unloaded). Reported: requests, status codes, requests
that never returned (client-side timeout: the server's request timeout plus a margin), 200 streams that
ended with an error event, churn actions and their statuses, the server's RSS (psutil) at the first
request, after ``--warm-up`` seconds of the same load (the baseline of the growth check: reaching the
allocator's working set is not a leak), at its peak, at the end and every 10 s, and untouched answers
that changed. Writes ``benchmarks/results/soak.{json,md}``.

    python benchmarks/soak.py [--clients 48] [--seconds 60] [--warm-up 20] [--tiny] [--device auto] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measure import write_results  # noqa: E402
from benchmarks.serve import PROMPTS, make_adapters, start_server  # noqa: E402

UNTOUCHED = ["task0", "task1", "task2", "task3"]
CHURNED = ["task4", "task5", "task6", "task7"]
MAX_TOKENS = 12
REQUEST_TIMEOUT_S = 120.0
"""The server's request timeout; a client gives up (a never-returned request) 60 s after it."""
CHURN = [("swap", "task4", "task5"), ("swap", "task5", "task5"), ("unload", "task6", None), ("load", "task6", "task6"),
         ("swap", "task4", "task4"), ("unload", "task7", None), ("load", "task7", "task7")]
"""The churn cycle: (action, adapter, source folder)."""


def ask(client: httpx.Client, model: str, prompt: str, chat: bool, stream: bool) -> tuple[int, str | None, bool]:
    """One greedy request: (status, its text when 200, whether a 200 stream ended with an error event)."""
    body: dict = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    if not stream:
        r = client.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, None, False
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if chat else choice["text"], False
    pieces, errored, done = [], False, False
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errored = True
            elif event["choices"]:
                c = event["choices"][0]
                pieces.append((c["delta"].get("content") or "") if chat else c["text"])
    return 200, "".join(pieces), errored or not done


class Soak:
    """The shared tallies of the clients and the churn thread."""

    def __init__(self, url: str, reference: dict[tuple, str]) -> None:
        self.url, self.reference = url, reference
        self.lock = threading.Lock()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.never_returned = self.stream_errors = self.changed = self.checked = 0
        self.churn: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []

    def client(self, seed: int, until: float, models: list[str]) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S + 60) as http:
            while time.monotonic() < until:
                model, prompt = rng.choice(models), rng.choice(PROMPTS)
                chat, stream = rng.random() < 0.5, rng.random() < 0.5
                try:
                    status, text, errored = ask(http, model, prompt, chat, stream)
                except httpx.TimeoutException:
                    with self.lock:
                        self.never_returned += 1
                    continue
                key = (model, prompt, chat)
                with self.lock:
                    self.statuses[str(status)] += 1
                    self.stream_errors += errored
                    if text is not None and key in self.reference:
                        self.checked += 1
                        if text != self.reference[key]:
                            self.changed += 1
                            if len(self.examples) < 5:
                                self.examples.append(f"{key}: {self.reference[key]!r} -> {text!r}")

    def churner(self, until: float, every: float) -> None:
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S + 60) as http:
            step = 0
            while time.monotonic() < until:
                action, name, source = CHURN[step % len(CHURN)]
                step += 1
                try:
                    if action == "unload":
                        r = http.delete(f"/v1/adapters/{name}")
                    else:
                        r = http.post("/v1/adapters", json={"name": name, "source": source})
                    outcome = str(r.status_code)
                except httpx.TimeoutException:
                    outcome = "never returned"
                with self.lock:
                    self.churn[f"{action} {outcome}"] += 1
                time.sleep(every)


def reference_answers(url: str, models: list[str]) -> dict[tuple, str]:
    """Each untouched model's greedy answer to every prompt, chat and not, asked alone before the soak."""
    out = {}
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        for model in models:
            for prompt in PROMPTS:
                for chat in (False, True):
                    status, text, _ = ask(http, model, prompt, chat, stream=False)
                    if status != 200:
                        raise SystemExit(f"reference answer of {model}: status {status}")
                    out[model, prompt, chat] = text
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=48, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the measured soak lasts")
    parser.add_argument("--warm-up", type=float, default=20.0,
                        help="seconds of the same load and churn before RSS growth is measured from (the allocator "
                             "reaching its working set is not a leak); their requests are checked like the rest")
    parser.add_argument("--churn-every", type=float, default=1.0, help="seconds between churn actions")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random model instead of the default "
                                                            "base (a quick run)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the server runs (auto: CUDA when visible)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import psutil

    from pipeline.device import resolve_device
    from pipeline.models import resolve_base
    from pipeline.report import machine

    device = resolve_device(args.device)
    command = "make bench-soak" if sys.argv[1:] == [] else shlex.join(["python", "benchmarks/soak.py", *sys.argv[1:]])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from tests.tiny_model import build_tiny_model

            base, base_name = build_tiny_model(Path(tmp) / "tiny"), "tiny random model (tests)"
        else:
            base, base_name = resolve_base("smollm2-135m-instruct"), "smollm2-135m-instruct"
        root = Path(tmp) / "adapters"
        names = make_adapters(base, root)
        url, server = start_server(root, Path(tmp) / "server.log", "--base", str(base), "--max-batch-size", "16",
                                   "--max-queue", "256", "--max-rank", "16", "--device", device,
                                   "--request-timeout-s", str(REQUEST_TIMEOUT_S))
        process = psutil.Process(server.pid)
        try:
            base_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            untouched = [base_id, *UNTOUCHED]
            reference = reference_answers(url, untouched)
            soak = Soak(url, reference)
            models = untouched + CHURNED
            rss_first = rss_start = rss_peak = process.memory_info().rss
            timeline = [(0, rss_first)]  # every 10 s: growth that levels off is allocator reuse, a climb a leak
            began = time.monotonic()
            measured = began + args.warm_up
            until = measured + args.seconds
            with concurrent.futures.ThreadPoolExecutor(args.clients + 1) as pool:
                futures = [pool.submit(soak.client, i + 1, until, models) for i in range(args.clients)]
                futures.append(pool.submit(soak.churner, until, args.churn_every))
                while not all(f.done() for f in futures):
                    rss = process.memory_info().rss
                    if time.monotonic() < measured:
                        rss_start = rss  # the last sample of the warm-up is the baseline
                    else:
                        rss_peak = max(rss_peak, rss)
                    if time.monotonic() - began >= 10 * len(timeline):
                        timeline.append((round(time.monotonic() - began), rss))
                    time.sleep(0.5)
                for f in futures:
                    f.result()
            rss_end = process.memory_info().rss
            alive = httpx.get(f"{url}/health").status_code == 200 and server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=120)
        log_tail = (Path(tmp) / "server.log").read_text()[-2000:]

    statuses = dict(sorted(soak.statuses.items()))
    server_errors = sum(n for code, n in statuses.items() if code.startswith("5"))
    growth = 100.0 * (rss_end - rss_start) / rss_start
    growth_from_first = 100.0 * (rss_end - rss_first) / rss_first
    result = {
        "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "device": device, "base": base_name, "adapters": len(names), "untouched": untouched, "churned": CHURNED,
        "clients": args.clients, "seconds": args.seconds, "warm_up_seconds": args.warm_up, "max_tokens": MAX_TOKENS,
        "requests": sum(statuses.values()) + soak.never_returned, "status_codes": statuses,
        "server_errors_5xx": server_errors, "never_returned": soak.never_returned,
        "streams_ended_with_error": soak.stream_errors, "churn_actions": dict(sorted(soak.churn.items())),
        "untouched_answers_checked": soak.checked, "untouched_answers_changed": soak.changed,
        "changed_examples": soak.examples, "rss_mb": {"first_request": round(rss_first / 2**20, 1),
                                                      "after_warm_up": round(rss_start / 2**20, 1),
                                                      "peak": round(rss_peak / 2**20, 1),
                                                      "end": round(rss_end / 2**20, 1),
                                                      "every_10_s": [[t, round(r / 2**20)] for t, r in timeline]},
        "rss_growth_percent": round(growth, 2), "rss_growth_from_first_request_percent": round(growth_from_first, 2),
        "server_alive_after": alive,
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    result["checks"] = {
        "0 x 5xx": server_errors == 0, "0 requests without an answer": soak.never_returned == 0,
        "0 streams that started 200 and ended with an error": soak.stream_errors == 0,
        "RSS growth < 10 %": growth < 10.0, "untouched answers unchanged": soak.changed == 0 and soak.checked > 0,
        "every churn action answered 200": all(k.endswith(" 200") for k in soak.churn),
        "the server answers afterwards": alive,
    }
    if not all(result["checks"].values()):
        result["server_log_tail"] = log_tail
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = ["# Soak: sustained load with adapter churn", "",
             f"Base {base_name}, {len(names)} LoRA adapters (r=16); {args.clients} clients for {args.seconds:g} s "
             f"after {args.warm_up:g} s of the same load (every request of both checked), "
             f"greedy, max_tokens {MAX_TOKENS}, completions and chat, streamed and not. Churn every "
             f"{args.churn_every:g} s: hot swaps of task4/task5, unloads and reloads of task6/task7.  ",
             f"Machine: {m['cpu']}, {m['cores']} cores{gpu}; measured on **{device}**. Command: `{command}`, "
             f"{result['created']}.", "",
             "| requests | status codes | never returned | 200 streams ending in an error | churn actions |",
             "|---:|---|---:|---:|---|",
             f"| {result['requests']} | {', '.join(f'{k}: {v}' for k, v in statuses.items())} | "
             f"{soak.never_returned} | {soak.stream_errors} | "
             f"{', '.join(f'{k}: {v}' for k, v in result['churn_actions'].items())} |", "",
             f"Server RSS: {result['rss_mb']['first_request']} MB at the first request, "
             f"{result['rss_mb']['after_warm_up']} MB after the warm-up, peak {result['rss_mb']['peak']} MB, "
             f"{result['rss_mb']['end']} MB at the end (**{growth:+.1f} %** over the measured "
             f"{args.seconds:g} s; {growth_from_first:+.1f} % from the first request); every 10 s: "
             f"{', '.join(f'{t} s {mb}' for t, mb in result['rss_mb']['every_10_s'])} MB.  ",
             f"Untouched answers (base, {', '.join(UNTOUCHED)}; fixed prompts, greedy): "
             f"**{soak.changed} changed** of {soak.checked} checked."]
    return write_results(ROOT / args.out, "soak", result, lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
