"""The plumbing both generation engines share: a bounded request queue, a command queue, one worker thread.

Requests wait in ``pending`` (bounded: a full queue is the server's 429). Commands (adapter loads,
unloads) are functions the worker runs between steps, so the model never changes under a running
forward. A subclass implements ``_run``, calling :meth:`_run_commands` between its steps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Worker:
    """Thread-safe front of an engine; the subclass owns the model and implements ``_run`` and ``_evict``.

    It also keeps the adapter registry both engines expose to the app: ``adapters`` (name -> loaded
    entry, least recently used first), ``known_sources`` (name -> (source, pinned): what may be
    loaded on demand) and ``failed`` (name -> why its last load failed).
    """

    active: list
    adapters: OrderedDict
    known_sources: dict[str, tuple[str, bool]]
    failed: dict[str, str]

    def _evict(self, keep: str | None = None) -> None:  # pragma: no cover - every engine overrides it
        raise NotImplementedError

    def _register(self, name: str, entry: Any, source: str, pinned: bool) -> Any:
        """Make ``entry`` adapter ``name``'s current version (most recently used), then evict beyond capacity.

        Returns the entry it replaced, if any (the caller retires it)."""
        old = self.adapters.pop(name, None)
        self.adapters[name] = entry
        self.known_sources[name] = (source, pinned)
        self.failed.pop(name, None)
        self._evict(keep=name)
        return old

    def _forget(self, name: str) -> Any:
        """Drop ``name`` from the registry (it is unknown until loaded again); return its entry or None."""
        self.known_sources.pop(name, None)
        self.failed.pop(name, None)
        return self.adapters.pop(name, None)

    def _start_worker(self, max_queue: int, name: str) -> None:
        self.pending: queue.Queue = queue.Queue(maxsize=max_queue)
        self.commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:  # pragma: no cover - every engine overrides it
        raise NotImplementedError

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
