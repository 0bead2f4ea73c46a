"""What routes depend on: the app's state, the API key check, a running engine."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.errors import ApiError
from serve.protocol import GenerationEngine
from serve.state import AppState


def app_state(request: Request) -> AppState:
    return request.app.state.edgetune


State = Annotated[AppState, Depends(app_state)]


def require_api_key(request: Request, state: State) -> None:
    """With ``settings.api_key`` set, the request must send ``Authorization: Bearer <key>`` (else 401)."""
    key = state.settings.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", "authentication_error",
                       code="invalid_api_key")


def ready_engine(state: State) -> GenerationEngine:
    """The running engine; 503 with Retry-After while the base is still loading."""
    return state.require_engine()


RunningEngine = Annotated[GenerationEngine, Depends(ready_engine)]
