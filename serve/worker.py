"""The plumbing both generation engines share: a bounded request queue, a command queue, one worker thread,
and the adapter registry's on-demand reload.

Requests wait in ``pending`` (bounded: a full queue is the server's 429). Commands (adapter loads,
unloads) are functions the worker runs between steps, so the model never changes under a running
forward. An engine mixes :class:`Worker` in, starts it with its own loop (which calls
:meth:`Worker._run_commands` between steps) and provides ``load`` (see :mod:`serve.protocol`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from serve.adapters import AdapterError, AdapterInfo, public_reason
from serve.registry import AdapterRegistry

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512
"""Prompt tokens an engine prefills together at most between decode steps (the first request always runs):
bounds how long running requests wait for new ones, and spreads a burst's first tokens over steps."""


class Worker:
    """Thread-safe front of an engine: queues, the worker thread, and the adapter lookup for admission."""

    active: list
    """The engine's running requests (the drain waits for them)."""
    registry: AdapterRegistry
    resolver: Callable[[str, str], AdapterInfo] | None
    """(name, source) -> validated AdapterInfo: lets the worker reload an evicted adapter on demand."""
    load: Callable[..., Any]
    """The engine's ``load(info, source, pinned)`` (worker thread): the loaded version, registered READY."""

    def _start_worker(self, max_queue: int, name: str, loop: Callable[[], None]) -> None:
        """Start the worker thread running ``loop`` (the engine's; it returns once ``_stop`` is set)."""
        self.pending: queue.Queue = queue.Queue(maxsize=max_queue)
        self.commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, request) -> None:
        """Queue ``request``; raises ``queue.Full`` when the bounded queue is full (answer 429)."""
        self.pending.put_nowait(request)
        self._wake.set()

    def queue_depth(self) -> int:
        return self.pending.qsize()

    def run_command(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the worker between steps and return its result (re-raising its error)."""
        future: Future = Future()
        self.commands.put((fn, future))
        self._wake.set()
        return future.result(timeout=timeout)

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop admitting, let running requests finish (up to ``drain_seconds``), stop the worker."""
        deadline = time.monotonic() + drain_seconds
        while (self.active or not self.pending.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=5)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as exc:  # delivered to the caller
                future.set_exception(exc)

    def _checkout(self, name: str) -> Any:
        """The loaded version of adapter ``name`` for a request being admitted (worker thread), marked most
        recently used. An evicted (or failed) adapter with a known source is reloaded from it first.

        Raises AdapterError when ``name`` is not servable or its reload fails (then it is failed(reason))."""
        handle = self.registry.handle(name)
        if handle is None:
            entry = self.registry.get(name)
            if entry is None or entry.source is None or self.resolver is None:
                raise AdapterError(f"adapter {name!r} is not loaded", status=404)
            self.registry.loading(name)
            try:  # evicted earlier: reload it from its source, transparently
                handle = self.load(self.resolver(name, entry.source), entry.source, entry.pinned)
            except Exception as exc:  # noqa: BLE001 - the request fails, the worker goes on
                self.registry.fail(name, public_reason(exc))
                if isinstance(exc, AdapterError):
                    raise
                log.exception("reloading adapter %s failed", name)
                raise AdapterError(f"adapter {name!r} failed to reload: {exc}", status=500) from exc
        self.registry.touch(name)
        return handle
