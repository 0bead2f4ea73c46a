"""What the app needs from a generation engine: the contract the torch and ONNX engines both satisfy.

The app only ever talks to an engine through this (routes, readiness, metrics, adapter loads), so a new
backend is a class with these members; :class:`serve.worker.Worker` provides the queue plumbing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from serve.adapters import AdapterInfo
from serve.registry import AdapterRegistry


class ServeTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the app uses (the ONNX backend's ``BundleTokenizer`` too)."""

    chat_template: str | None
    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        """``{"input_ids": [...]}`` for ``text``."""

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str: ...


@runtime_checkable
class GenerationEngine(Protocol):
    """A running engine: thread-safe ``submit``/``run_command``; adapters in ``registry``.

    ``submit`` takes a :class:`serve.engine.GenRequest` and reports through its callbacks, from the
    engine's worker thread: ``on_text(piece)`` for each new piece of text, then ``on_done(reason,
    completion_tokens, error)`` exactly once (reason: ``stop``, ``length``, ``timeout``, ``cancelled``
    or ``error``). ``load``/``unload`` run on the worker, through ``run_command``.
    """

    tokenizer: ServeTokenizer
    context_length: int
    """Prompt plus generated tokens may not exceed this."""
    registry: AdapterRegistry
    resolver: Callable[[str, str], AdapterInfo] | None
    """(name, source) -> validated AdapterInfo (AdapterError when unfit); any thread."""
    on_step: Callable[[int], None]
    """Called after every decode step with the number of requests it advanced (metrics)."""

    def submit(self, request: Any) -> None:
        """Queue a request; ``queue.Full`` when the bounded queue is full."""

    def queue_depth(self) -> int: ...

    def run_command(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the worker between steps; its result, or its exception re-raised."""

    def load(self, info: AdapterInfo, source: str, pinned: bool = False) -> Any:
        """(Worker thread) load or replace adapter ``info.name``: READY in ``registry``; AdapterError if it fails."""

    def unload(self, name: str) -> bool:
        """(Worker thread) forget adapter ``name`` (unknown afterwards); True when a loaded version was dropped."""

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Let running requests finish (up to ``drain_seconds``), then stop the worker."""
