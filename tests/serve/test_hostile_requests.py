"""Hostile requests get OpenAI-shaped 4xx, streamed or not, before anything starts; the API key is checked
before a body is read; the OpenAPI schema advertises the statuses the app really answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edge.generation import SEED_MAX
from tests.serve.adapter_kinds import build_adapter
from tests.serve.test_server import _in_process

KEY = "sekret-Key_1"


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app in-process on the tiny model with one LoRA adapter ``alpha``: (TestClient, engine)."""
    root = tmp_path_factory.mktemp("hostile") / "adapters"
    build_adapter("lora", tiny_model_dir, root / "alpha")
    with _in_process(tiny_model_dir, root, max_tokens=16) as (client, engine):
        yield client, engine


def _post(client, route: str, body: dict, headers: dict | None = None):
    """POST ``body`` as JSON with \\u escapes, so a lone surrogate travels as a client would send it."""
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    return client.post(path, content=json.dumps(body).encode("ascii"),
                       headers={"content-type": "application/json", **(headers or {})})


def _body(route: str, **fields) -> dict:
    base = {"model": "alpha", "max_tokens": 4, "temperature": 0}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hello"})
    return {**base, **fields}


HOSTILE = [  # (route, fields, the param the error names, what its message says)
    ("completions", {"seed": 2**64}, "seed", str(SEED_MAX)),
    ("completions", {"seed": 10**30}, "seed", str(SEED_MAX)),
    ("completions", {"seed": -1}, "seed", "greater than or equal to 0"),
    ("chat", {"seed": 2**63}, "seed", str(SEED_MAX)),
    ("completions", {"temperature": 1e-300}, "temperature", "0 (greedy) or a finite number >= 1.18e-38"),
    ("completions", {"temperature": 5e-324}, "temperature", ">= 1.18e-38"),
    ("chat", {"temperature": 1e-300}, "temperature", ">= 1.18e-38"),
    ("completions", {"temperature": float("nan")}, "temperature", "Input should be"),
    ("completions", {"temperature": float("inf")}, "temperature", "less than or equal to 2"),
    ("completions", {"top_p": 1e-320}, "top_p", "top_p must be in [1.18e-38, 1]"),
    ("chat", {"top_p": 5e-324}, "top_p", "top_p must be in [1.18e-38, 1]"),
    ("completions", {"prompt": ""}, "prompt", "the prompt is empty"),
    ("completions", {"prompt": [""]}, "prompt", "the prompt is empty"),
    ("completions", {"prompt": "a\ud800b"}, "prompt", "lone surrogate ('\\ud800') at character 1"),
    ("completions", {"prompt": ["\udfff"]}, "prompt.0", "lone surrogate"),
    ("completions", {"stop": ["\ud800"]}, "stop.0", "lone surrogate"),
    ("completions", {"model": "al\udc00pha"}, "model", "lone surrogate"),
    ("chat", {"messages": [{"role": "user", "content": "hi \udc00"}]}, "messages.0.content", "lone surrogate"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "exactly one prompt"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("route", "fields", "param", "says"), HOSTILE,
                         ids=[f"{r}-{next(iter(f))}-{i}" for i, (r, f, _, _) in enumerate(HOSTILE)])
def test_hostile_values_are_a_400_naming_the_field_streamed_or_not(served, route: str, fields: dict, param: str,
                                                                   says: str, stream: bool) -> None:
    client, _ = served
    response = _post(client, route, _body(route, stream=stream, **fields))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"  # an error body, never a started stream
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert says in error["message"], error["message"]


def test_the_server_still_answers_after_hostile_requests(served) -> None:
    client, _ = served
    for fields in ({"temperature": 1e-300}, {"seed": 2**64}, {"prompt": ""}, {"prompt": "\ud800"}):
        assert _post(client, "completions", _body("completions", stream=True, **fields)).status_code == 400
    assert client.get("/health").json() == {"status": "ok"}
    # the bounds themselves are served: the smallest temperature and top_p, the largest seed
    edge = _post(client, "completions", _body("completions", temperature=1.2e-38, top_p=1.2e-38, seed=SEED_MAX))
    greedy = _post(client, "completions", _body("completions"))
    assert edge.status_code == greedy.status_code == 200, edge.text
    assert edge.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]  # the nucleus is the top token


def test_a_stream_the_engine_refuses_before_its_first_token_is_a_400_not_a_200(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Only the engine knows a prompt adapter's virtual tokens: the stream waits for its first event, so the
    client gets the 400 the whole response gets, not a 200 stream carrying the error."""
    build_adapter("prompt", tiny_model_dir, tmp_path / "soft")  # 6 virtual tokens
    with _in_process(tiny_model_dir, tmp_path) as (client, engine):
        n_prompt = len(engine.tokenizer("go west", add_special_tokens=False)["input_ids"])
        engine.context_length = n_prompt + 4  # room for the prompt and 4 tokens: not for 6 virtual ones too
        body = {"model": "soft", "prompt": "go west", "max_tokens": 4, "temperature": 0, "stream": True}
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        fine = client.post("/v1/completions", json={**body, "model": tiny_model_dir.name})
        assert fine.status_code == 200 and fine.text.rstrip().endswith("data: [DONE]")
        assert 'status="400"' in client.get("/metrics").text  # the refusal is counted once, as a 400


# ---- auth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "env"), [({"api_key": ""}, {}), ({}, {"EDGETUNE_SERVE_API_KEY": ""}),
                                            ({"api_key": "two words"}, {}), ({"api_key": "clé"}, {})])
def test_an_empty_or_unsendable_key_is_refused_at_start_up(flags: dict, env: dict) -> None:
    from pipeline.errors import ConfigError
    from serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="api_key: (an empty key would turn authentication off|use visible ASCII)"
                       ) as refused:
        ServeSettings.from_sources(flags, env=env)
    assert "clé" not in str(refused.value) and "two words" not in str(refused.value)  # a key is never echoed


def _keyed_app(tiny_model_dir: Path, tmp_path: Path):
    from serve.app import create_app
    from serve.settings import ServeSettings

    return create_app(ServeSettings.from_sources({"base": str(tiny_model_dir), "adapters": str(tmp_path),
                                                  "api_key": KEY}, env={}))


def test_the_key_is_checked_before_the_body_is_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    """At the ASGI level: an unauthenticated request is answered 401 without the app ever asking for its body
    (no 1 MB read, no parse, no field-level 400 telling a stranger what the API wants)."""
    app = _keyed_app(tiny_model_dir, tmp_path)  # no lifespan: nothing behind the check needs the engine

    def call(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bool]:
        sent: list[dict] = []
        read = False

        async def receive() -> dict:
            nonlocal read
            read = True
            return {"type": "http.request", "body": b"x" * 2**20, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
                 "root_path": "", "scheme": "http", "query_string": b"", "server": ("test", 80),
                 "client": ("test", 1), "headers": [(b"content-type", b"application/json"), *headers]}
        asyncio.run(app(scope, receive, send))
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        return sent[0]["status"], body, read

    for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", f"Bearer {KEY}x".encode())],
                    [(b"authorization", KEY.encode())], [(b"authorization", f"Basic {KEY}".encode())],
                    [(b"authorization", f"Bearer {KEY}".encode()), (b"authorization", b"Bearer other")]):
        for path in ("/v1/completions", "/v1/adapters", "/v1/nowhere"):
            status, body, read = call(path, headers)
            assert (status, read) == (401, False), (path, headers)
            assert body["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in body["error"]["message"]


def test_the_key_guards_everything_but_health_ready_and_metrics(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    import serve.auth

    compared: list[bytes] = []
    constant_time = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return constant_time(a, b)

    monkeypatch.setattr(serve.auth.hmac, "compare_digest", spy)
    with _in_process(tiny_model_dir, tmp_path, api_key=KEY, preload=False) as (client, _):
        good = {"Authorization": f"Bearer {KEY}"}
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200, path
        for path in ("/v1/models", "/openapi.json", "/docs", "/redoc"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
        bad_body = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_body.status_code == 401  # not the field-level 400 a key holder would get
        assert client.post("/v1/completions", content=b"{not json", headers={
            "content-type": "application/json", **good}).status_code == 400
        assert client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert client.get("/openapi.json", headers=good).status_code == 200  # tools send the key
        for path in ("/docs", "/redoc"):  # a browser page cannot send the key: off while one is set
            assert client.get(path, headers=good).status_code == 404, path
        done = client.post("/v1/completions", headers=good, json={"model": tiny_model_dir.name, "prompt": "hi",
                                                                   "max_tokens": 2, "temperature": 0})
        assert done.status_code == 200, done.text
    assert KEY.encode() in compared  # the key was compared in constant time


# ---- the schema ---------------------------------------------------------------------------------------
def test_the_openapi_schema_advertises_400_with_the_error_body_never_422(served) -> None:
    client, _ = served
    schema = client.get("/openapi.json").json()
    assert '"422"' not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    operations = [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]
    with_input = [(p, m, op) for p, m, op in operations if op.get("requestBody") or op.get("parameters")]
    assert {(p, m) for p, m, _ in with_input} == {("/v1/completions", "post"), ("/v1/chat/completions", "post"),
                                                  ("/v1/adapters", "post"), ("/v1/adapters/{name}", "delete"),
                                                  ("/v1/load_lora_adapter", "post"), ("/v1/unload_lora_adapter", "post")}
    for path, method, op in with_input:
        error = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)
    assert client.get("/docs").status_code == 200  # without a key the docs stay open
