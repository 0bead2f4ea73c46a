"""A real uvicorn process on the tiny model, driven over HTTP and with the official ``openai`` client; the
app in-process (``TestClient``) where a test must hold the engine's worker to make timing deterministic."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from pipeline.models import load_model
from serve.app import wait_ready
from tests.serve.adapter_kinds import worker_held

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


@contextlib.contextmanager
def _in_process(base: Path, root: Path, **settings) -> Iterator[tuple]:
    """The app in this process on the tiny model: (TestClient, its engine)."""
    from fastapi.testclient import TestClient

    from pipeline.models import load_tokenizer
    from serve.app import create_app
    from serve.settings import ServeSettings

    config = ServeSettings.from_sources({"base": str(base), "adapters": str(root), "max_rank": 8, **settings}, env={})
    app = create_app(config, model=load_model(base), tokenizer=load_tokenizer(base))
    with TestClient(app) as client:
        yield client, app.state.edgetune.engine


def _until(condition, timeout: float = 30.0) -> None:
    """Wait for ``condition()`` to hold (polling); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


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
    cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    # the refusal and its reason are visible to operators
    assert cards[name]["state"] == "failed" and cards[name]["reason"] == r.json()["error"]["message"]
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
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready", "base": _base_id(server.url)}
    assert _complete(server.url, "alpha", "Review: great mug", 8).json()["choices"][0]["text"]  # timed and counted
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
    typed = ServeSettings.from_sources({}, env={"EDGETUNE_SERVE_REQUEST_TIMEOUT_S": "2.5",
                                                "EDGETUNE_SERVE_PRELOAD": "false"})
    assert (typed.request_timeout_s, typed.preload) == (2.5, False)  # text from the environment, typed
    with pytest.raises(ConfigError, match="preload"):
        ServeSettings.from_sources({}, env={"EDGETUNE_SERVE_PRELOAD": "perhaps"})


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_a_504_or_a_final_stream_error(stream: bool, tiny_model_dir: Path,
                                                                      root: Path) -> None:
    timeout = 0.05
    with _in_process(tiny_model_dir, root, request_timeout_s=timeout, preload=False) as (client, engine):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with worker_held(engine):  # the request waits in the queue while its deadline passes
                sent = pool.submit(client.post, "/v1/completions", json={
                    "model": tiny_model_dir.name, "prompt": "go", "max_tokens": 50, "temperature": 0, "stream": stream})
                _until(lambda: engine.queue_depth() == 1)  # queued: its deadline was set before now
                time.sleep(timeout)  # so it has passed now, whatever the machine's speed
            response = sent.result(timeout=60)
    if not stream:
        assert response.status_code == 504, response.text
        assert response.json()["error"] == {"message": f"request timed out after {timeout:g} s",
                                            "type": "server_error", "param": None, "code": None}
        return
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert "timed out" in json.loads(events[-2])["error"]["message"]
    assert all(json.loads(event)["choices"][0]["finish_reason"] is None for event in events[:-2])


def test_sigterm_drains_a_running_request(tiny_model_dir: Path, root: Path) -> None:
    srv = Server(tiny_model_dir, root, "--max-rank", "8")
    try:
        body = {"model": "alpha", "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            first = json.loads(next(lines).removeprefix("data: "))
            assert first["choices"][0]["finish_reason"] is None  # decoding has begun and has not ended
            srv.proc.terminate()  # SIGTERM: stop accepting, let running responses finish, drain, exit
            rest = list(lines)
        assert srv.proc.wait(timeout=60) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down cleanly
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.log.read_text()
    # uvicorn found this response still open when the drain began (it logs this only for open connections)...
    assert log.index("Shutting down") < log.index("Waiting for connections to close")
    # ...and it then ran to its end: all 200 tokens, the usage chunk, [DONE]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 200
    assert "Traceback" not in log


def test_stop_seed_and_top_p(server: Server) -> None:
    prompt = "Review: great mug"
    greedy = _complete(server.url, "alpha", prompt, 12).json()["choices"][0]["text"]
    assert len(greedy) > 4
    cut = _complete(server.url, "alpha", prompt, 12, stop=[greedy[3:5]]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and greedy.startswith(cut["text"]) and greedy[3:5] not in cut["text"]

    def sample(seed: int, top_p: float = 1.0) -> str:
        return _complete(server.url, "alpha", prompt, 12, temperature=1.0, top_p=top_p,
                         seed=seed).json()["choices"][0]["text"]

    assert sample(7) == sample(7)  # the same seed gives the same sample
    assert sample(7) != sample(8)  # the seed is used
    assert sample(7) != greedy  # temperature 1 really samples...
    assert sample(7, top_p=1e-6) == sample(8, top_p=1e-6) == greedy  # ...and top_p keeps only the likeliest token


def test_adapter_states_in_models(tiny_model_dir: Path, root: Path) -> None:
    """The registry's states as operators see them: loading, ready, evicted (and back), failed with its reason."""
    from serve.protocol import GenerationEngine

    with _in_process(tiny_model_dir, root, max_loaded_adapters=1, preload=False) as (client, engine):
        def cards() -> dict[str, dict]:
            return {m["id"]: m for m in client.get("/v1/models").json()["data"]}

        assert isinstance(engine, GenerationEngine)  # what the app relies on, as the ONNX engine does too
        assert list(cards()) == [tiny_model_dir.name]  # nothing preloaded
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with worker_held(engine):  # validated, the load waits for the worker: visible as loading
                loading = pool.submit(client.post, "/v1/adapters", json={"name": "alpha"})
                _until(lambda: cards().get("alpha", {}).get("state") == "loading")
            assert loading.result(timeout=60).json() == {"id": "alpha", "object": "model", "state": "ready",
                                                         "kind": "lora", "pinned": False}
        alpha = cards()["alpha"]
        assert (alpha["state"], alpha["kind"], alpha["source"], alpha["pinned"]) == ("ready", "lora", "alpha", False)

        assert client.post("/v1/adapters", json={"name": "beta"}).status_code == 200  # room for one: alpha goes
        assert {n: c["state"] for n, c in cards().items() if n != tiny_model_dir.name} == {
            "alpha": "evicted", "beta": "ready"}
        ok = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200  # an evicted adapter reloads on its next request
        assert (cards()["alpha"]["state"], cards()["beta"]["state"]) == ("ready", "evicted")

        missing = client.post("/v1/adapters", json={"name": "ghost", "source": "not-there"})
        assert missing.status_code == 404 and cards()["ghost"]["state"] == "failed"
        assert cards()["ghost"]["reason"] == missing.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "ghost", "prompt": "hi"}).status_code == 404

        # a failed replacement leaves the version that serves ready, with the failure in its reason
        assert client.post("/v1/adapters", json={"name": "alpha", "source": "not-there"}).status_code == 404
        assert cards()["alpha"]["state"] == "ready" and "not-there" in cards()["alpha"]["reason"]
        assert client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code == 200

        assert client.delete("/v1/adapters/alpha").json()["deleted"] is True
        assert "alpha" not in cards()


def test_a_prompt_that_leaves_the_adapters_virtual_tokens_no_room_is_a_400(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The route counts the prompt and max_tokens; the engine also counts a prompt adapter's virtual tokens.
    A request that only the second check refuses is still the client's fault: 400, never 500."""
    from tests.serve.adapter_kinds import build_adapter

    build_adapter("prompt", tiny_model_dir, tmp_path / "soft")  # 6 virtual tokens
    with _in_process(tiny_model_dir, tmp_path) as (client, engine):
        n_prompt = len(engine.tokenizer("go west", add_special_tokens=False)["input_ids"])
        engine.context_length = n_prompt + 4  # room for the prompt and 4 tokens: not for 6 virtual ones too
        body = {"prompt": "go west", "max_tokens": 4, "temperature": 0}
        assert client.post("/v1/completions", json={"model": tiny_model_dir.name, **body}).status_code == 200
        refused = client.post("/v1/completions", json={"model": "soft", **body})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        assert "after 6 virtual tokens" in refused.json()["error"]["message"]


def test_a_vllm_style_load_and_unload_sequence(tiny_model_dir: Path, root: Path, tmp_path: Path) -> None:
    """vLLM's routes and answers, as an orchestrator or an RL trainer drives them, with the same safety as ours."""
    from openai import OpenAI

    with _in_process(tiny_model_dir, root, preload=False) as (client, engine):
        openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        added = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "alpha"})
        assert added.status_code == 200 and added.text == "Success: LoRA adapter 'policy' added successfully."
        by_path = client.post("/v1/load_lora_adapter", json={"lora_name": "ref", "lora_path": str(root / "beta")})
        assert by_path.status_code == 200  # an absolute path inside the adapter root
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "beta"})
        assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]

        def answer(model: str) -> str:
            return openai.completions.create(model=model, prompt="Review: great mug", max_tokens=6,
                                             temperature=0).choices[0].text

        before, ref = answer("policy"), answer("ref")
        assert before != ref
        # an RL step: the trainer writes new weights and swaps them in under the same name
        swapped = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "beta",
                                                             "load_inplace": True})
        assert swapped.status_code == 200 and answer("policy") == ref
        outside = tmp_path / "elsewhere"
        shutil.copytree(root / "alpha", outside)
        refused = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)})
        assert refused.status_code == 400 and "outside the adapter root" in refused.json()["error"]["message"]
        missing = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nope"})
        assert missing.status_code == 404
        for body in ({"lora_name": "x"}, {"lora_path": "alpha"}, {"lora_name": "../x", "lora_path": "alpha"}):
            assert client.post("/v1/load_lora_adapter", json=body).status_code == 400
        removed = client.post("/v1/unload_lora_adapter", json={"lora_name": "policy"})
        assert removed.status_code == 200 and removed.text == "Success: LoRA adapter 'policy' removed successfully."
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "policy"}).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={}).status_code == 400
        assert _complete_in(client, "policy").status_code == 404 and answer("ref") == ref


def _complete_in(client, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0})
