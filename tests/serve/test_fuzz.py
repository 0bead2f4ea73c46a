"""Fuzz: schemathesis reads the app's own /openapi.json and sends generated requests, valid and not, to every
operation (the tiny model, in-process over ASGI); no answer may be a 5xx, and the server must still answer
afterwards. Derandomized (the same requests every run) and bounded: MAX_EXAMPLES per operation, a hard
pytest timeout. The hand-made hostile values (tests/serve/test_hostile_requests.py) go through the same
checks as explicit cases."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.serve import test_hostile_requests as hostile
from tests.serve.test_hostile_requests import HOSTILE, _body

MAX_EXAMPLES = 150
"""Generated requests per operation (and phase): about a minute in all on two busy cores."""

served = hostile.served
"""The app in-process on the tiny model with adapter ``alpha`` (this module gets its own, module-scoped)."""


@pytest.fixture(scope="module")
def api_schema(served):
    """The schema the app serves, bound to the app. Its lifespan (the engine) is the module's TestClient's:
    schemathesis would start a second one and end it after each test, so it sees an app without one."""
    client, _ = served
    app = client.app

    async def without_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":  # refused before any message: "no lifespan support" to the caller
            raise RuntimeError("the test's TestClient runs this app's lifespan")
        await app(scope, receive, send)

    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)


def _steered(case, model: str, max_tokens: int) -> None:
    """Point a generated completion at a real model with a short answer, and a load at a real folder (a
    hot swap, or a new name for alpha's weights): a random name is only ever a 404 and a random max_tokens
    a 400, so without this the engine, the sampler's bounds and adapter loads would go unfuzzed."""
    if not isinstance(case.body, dict):
        return
    if "model" in case.body:
        case.body.update(model=model, max_tokens=max_tokens)
    elif "name" in case.body:
        case.body["source"] = "alpha"


@pytest.mark.timeout(600)  # a hard bound: a hang fails the test instead of stalling the whole run
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_5xx(api_schema, served, mode: GenerationMode) -> None:
    """Requests that fit the schema (positive) and that break it (negative), for every operation; half the
    completions go to the base or ``alpha`` with a short answer."""
    client, _ = served
    models = st.sampled_from(["alpha", client.get("/v1/models").json()["data"][0]["id"]])  # an adapter, the base
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8  # health, ready, metrics, models, completions, chat, load and unload adapters
    answered: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        @given(case=operation.as_strategy(mode), steer=st.booleans(), model=models,
               max_tokens=st.integers(1, 8))
        @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case, steer: bool, model: str, max_tokens: int) -> None:
            if steer:
                _steered(case, model, max_tokens)
            response = case.call_and_validate(checks=[not_a_server_error])
            answered[case.operation.label, response.status_code] += 1

        try:
            fuzz()
        except Unsatisfiable:
            # only where every input is valid (no body, a free-text path name): nothing to break
            assert not mode.is_positive and not operation.body, operation.label
    print(sorted(answered.items()))
    if mode.is_positive:  # the steered half really reached the engine and the sampler
        assert answered["POST /v1/completions", 200] and answered["POST /v1/chat/completions", 200], answered


@pytest.mark.parametrize(("route", "fields"), [(r, f) for r, f, _, _ in HOSTILE if "nan" not in repr(f)
                                               and "inf" not in repr(f)])  # JSON has no NaN/Infinity
@pytest.mark.parametrize("stream", [False, True])
def test_the_hostile_values_as_explicit_cases(api_schema, served, route: str, fields: dict, stream: bool) -> None:
    """To the base (the fuzz may have unloaded ``alpha``): each is a 400 whatever else the fuzz left behind."""
    base = served[0].get("/v1/models").json()["data"][0]["id"]
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    case = api_schema[path]["POST"].Case(body=_body(route, stream=stream, **{"model": base, **fields}),
                                         media_type="application/json")
    response = case.call_and_validate(checks=[not_a_server_error])
    assert response.status_code == 400, response.text


def test_the_server_still_answers_after_the_fuzz(served, tiny_model_dir: Path) -> None:
    client, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    done = client.post("/v1/completions", json={"model": tiny_model_dir.name, "prompt": "still there?",
                                                "max_tokens": 4, "temperature": 0})
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("stop", "length")
