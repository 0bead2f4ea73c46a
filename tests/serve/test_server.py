"""A real uvicorn process on the tiny model, driven over HTTP and with the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from pipeline.models import load_model
from serve.app import wait_ready

ADAPTERS = ("alpha", "beta")


def _save_lora(base: Path, out: Path, seed: int, r: int = 4, safe: bool = True) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                        init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # strong enough to change greedy tokens of a random tiny model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=safe)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, root: Path, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--base", str(base), "--adapters", str(root),
               "--port", str(self.port), "--num-threads", "1", *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            wait_ready(self.url, self.proc, timeout=120)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n" + self.log.read_text()[-3000:]) from None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "adapters"
    for i, name in enumerate(ADAPTERS):
        _save_lora(tiny_model_dir, root / name, seed=i + 1)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, root: Path):
    srv = Server(tiny_model_dir, root, "--max-rank", "8")
    yield srv
    srv.stop()


def _complete(url: str, model: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, **extra}, timeout=60)


def _base_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def test_openai_client_completions_and_chat_streaming_and_not(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert set(ADAPTERS) <= set(models)
    done = client.completions.create(model="alpha", prompt="Review: great mug", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt="Review: great mug", max_tokens=6, temperature=0, stream=True))
    assert streamed == done.choices[0].text

    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    parts = list(client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_a_mixed_batch_gives_each_request_its_own_greedy_tokens(server: Server) -> None:
    jobs = [(_base_id(server.url), "hello there"), ("alpha", "Review: great mug"), ("beta", "Review: great mug"),
            ("alpha", "a b c d e f")]
    alone = [_complete(server.url, m, p, 12).json()["choices"][0]["text"] for m, p in jobs]
    assert len({alone[1], alone[2]}) == 2  # the two adapters really differ on the same prompt
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _complete(server.url, job[0], job[1], 12).json(), jobs * 2))
    assert [r["choices"][0]["text"] for r in together] == alone * 2
    steps = _histogram(server.url, "edgetune_decode_batch_size")
    assert steps["+Inf"] > steps["1.0"]  # some decode steps really ran several requests together


def _histogram(url: str, name: str) -> dict[str, float]:
    """Cumulative bucket counts of Prometheus histogram ``name`` by ``le``."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def test_swapping_and_unloading_under_load_loses_no_request(server: Server, root: Path, tiny_model_dir: Path) -> None:
    _save_lora(tiny_model_dir, root / "gamma", seed=7)
    _save_lora(tiny_model_dir, root / "gamma2", seed=8)
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "gamma", "source": "gamma"}).status_code == 200
    statuses: list[int] = []

    def client(i: int) -> None:
        for _ in range(3):
            r = _complete(server.url, ["gamma", "alpha", "beta"][i % 3], f"request {i}", 6)
            statuses.append(r.status_code)
            assert r.status_code in (200, 404, 429), r.text
            if r.status_code == 200:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, i) for i in range(16)]
        for source in ("gamma2", "gamma", "gamma2"):  # hot swaps while requests run
            time.sleep(0.2)
            assert httpx.post(f"{server.url}/v1/adapters", json={"name": "gamma", "source": source},
                              timeout=60).status_code == 200
        time.sleep(0.2)
        assert httpx.delete(f"{server.url}/v1/adapters/gamma", timeout=60).json()["deleted"] is True
        for f in futures:
            f.result()
    assert len(statuses) == 48 and statuses.count(200) >= 32  # alpha/beta never fail; gamma 404s after unload
    assert httpx.delete(f"{server.url}/v1/adapters/gamma").json()["deleted"] is False  # idempotent
    assert "gamma" not in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]


@pytest.mark.parametrize("case", ["pickle", "traversal", "rank", "shape"])
def test_bad_adapters_are_refused_while_serving_continues(case: str, server: Server, root: Path,
                                                          tiny_model_dir: Path) -> None:
    name, source = f"bad-{case}", f"bad-{case}"
    if case == "pickle":
        _save_lora(tiny_model_dir, root / source, seed=3, safe=False)
    elif case == "traversal":
        source = "../outside"
    elif case == "rank":
        _save_lora(tiny_model_dir, root / source, seed=3, r=16)
    else:
        from safetensors.torch import load_file, save_file

        _save_lora(tiny_model_dir, root / source, seed=3)
        weights = root / source / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])
        save_file(tensors, weights)
    r = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "source": source}, timeout=60)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    expected = {"pickle": "pickle", "traversal": "adapter root", "rank": "max_rank", "shape": "does not fit"}[case]
    assert expected in r.json()["error"]["message"]
    assert _complete(server.url, "alpha", "still serving", 4).status_code == 200
    states = {m["id"]: m["state"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert states[name] == "failed"  # the refusal and its reason are visible to operators
    shutil.rmtree(root / source, ignore_errors=True)


def test_bad_requests_get_openai_style_4xx(server: Server) -> None:
    url = server.url
    cases = [
        (httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (_complete(url, "alpha", "x", max_tokens=0), 400),
        (_complete(url, "alpha", "x", max_tokens=10**6), 400),
        (_complete(url, "nope", "x"), 404),
        (_complete(url, "alpha", "word " * 400, max_tokens=8), 400),
        (httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": 3}), 400),
        (httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": []}), 400),
        (_complete(url, "alpha", "x", n=2), 400),
        (httpx.post(f"{url}/v1/adapters", json={"name": "../etc", "source": "alpha"}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) >= {"message", "type"}
    assert "context length" in cases[4][0].json()["error"]["message"]
    assert _complete(url, "alpha", "fine", 3).status_code == 200


def test_metrics_health_and_ready(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("edgetune_requests_total", "edgetune_request_latency_seconds_bucket",
                 "edgetune_time_to_first_token_seconds_bucket", "edgetune_generated_tokens_total",
                 "edgetune_queue_depth", "edgetune_loaded_adapters", "edgetune_adapter_load_seconds_bucket"):
        assert name in text
    assert 'adapter="alpha"' in text and 'status="200"' in text


def test_api_key_and_back_pressure(tiny_model_dir: Path, root: Path) -> None:
    srv = Server(tiny_model_dir, root, "--api-key", "sekret", "--max-batch-size", "1", "--max-queue", "1",
                 "--max-rank", "8")
    try:
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        assert httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "source": "alpha"}).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{srv.url}/v1/models", headers=auth).status_code == 200

        def one(_):
            return httpx.post(f"{srv.url}/v1/completions", headers=auth, timeout=120,
                              json={"model": "alpha", "prompt": "go", "max_tokens": 48, "temperature": 0})

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


def test_settings_come_from_flags_or_environment() -> None:
    from pipeline.errors import ConfigError
    from serve.settings import ServeSettings

    s = ServeSettings.from_sources({"port": 9001, "api_key": None},
                                   env={"EDGETUNE_SERVE_API_KEY": "k", "EDGETUNE_SERVE_PORT": "7000",
                                        "EDGETUNE_SERVE_PINNED": "a,b"})
    assert (s.port, s.api_key, s.pinned) == (9001, "k", ("a", "b"))
    with pytest.raises(ConfigError, match="quantize"):
        ServeSettings.from_sources({"quantize": "fp8"}, env={})
    with pytest.raises(ConfigError, match="max_queue"):
        ServeSettings.from_sources({}, env={"EDGETUNE_SERVE_MAX_QUEUE": "0"})
    assert json.dumps(ServeSettings().__dict__, default=str)


def test_timeout_is_a_504_and_sigterm_drains_running_requests(tiny_model_dir: Path, root: Path) -> None:
    srv = Server(tiny_model_dir, root, "--request-timeout-s", "0.3", "--max-rank", "8")
    try:
        slow = _complete(srv.url, "alpha", "go", max_tokens=200)
        assert slow.status_code == 504 and "timed out" in slow.json()["error"]["message"]
    finally:
        srv.stop()
    srv = Server(tiny_model_dir, root, "--max-rank", "8")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(_complete, srv.url, "alpha", "go", 150)
        time.sleep(0.3)  # the request is decoding now
        srv.proc.terminate()  # SIGTERM: stop accepting, finish what runs, then exit
        response = running.result(timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 0
    assert srv.proc.wait(timeout=60) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down cleanly
    assert "Traceback" not in srv.log.read_text()


def test_stop_and_seed(server: Server) -> None:
    greedy = _complete(server.url, "alpha", "Review: great mug", 12).json()["choices"][0]["text"]
    assert len(greedy) > 4
    cut = _complete(server.url, "alpha", "Review: great mug", 12, stop=[greedy[3:5]]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and greedy.startswith(cut["text"]) and greedy[3:5] not in cut["text"]
    sampled = [_complete(server.url, "alpha", "Review: great mug", 12, temperature=1.0, top_p=0.9,
                         seed=seed).json()["choices"][0]["text"] for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]  # the same seed gives the same sample
