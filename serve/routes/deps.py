"""What routes depend on: the app's state and a running engine (the API key is checked earlier, in
:mod:`serve.auth`, before a body is read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.protocol import GenerationEngine
from serve.state import AppState


def app_state(request: Request) -> AppState:
    return request.app.state.edgetune


State = Annotated[AppState, Depends(app_state)]


def ready_engine(state: State) -> GenerationEngine:
    """The running engine; 503 with Retry-After while the base is still loading."""
    return state.require_engine()


RunningEngine = Annotated[GenerationEngine, Depends(ready_engine)]
