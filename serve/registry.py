"""The server's adapters: one entry per public name, in an explicit state (LoRAX's names).

States and their moves::

    (new) --loading--> LOADING --ready--> READY --evict--> EVICTED --loading--> ...
                          |                 ^                 |
                          +------fail-------+-----> FAILED <--+     forget: the name is unknown again

An entry keeps ``handle`` (the engine's loaded version, what new requests run) while it is READY,
and also while a replacement is LOADING: a hot swap never interrupts the version that serves.
``source`` is where the last good version came from; an EVICTED or FAILED entry with a source is
reloaded from it on its next request. A failed replacement leaves the old version READY, with the
failure in ``reason``. Entries are kept least recently used first: eviction takes the oldest.

Thread-safe: the engine's worker moves entries; the app reads snapshots from the event loop and marks
loads it starts from its own threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Generic, TypeVar

H = TypeVar("H")
"""The engine's loaded adapter (what a request runs)."""


class AdapterState(str, Enum):
    """Where an adapter name stands; the values are what ``GET /v1/models`` reports."""

    LOADING = "loading"
    READY = "ready"
    EVICTED = "evicted"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass
class AdapterEntry(Generic[H]):
    """One public adapter name."""

    name: str
    state: AdapterState
    source: str | None = None
    """Where its last good version came from (None: never loaded); it reloads from here."""
    pinned: bool = False
    """Never evicted."""
    kind: str | None = None
    reason: str | None = None
    """Why the last load failed (FAILED, or READY after a failed replacement)."""
    handle: H | None = None
    """The engine's loaded version; None unless READY (or LOADING a replacement)."""
    created: int = 0
    """Unix time its current version became ready."""


class AdapterRegistry(Generic[H]):
    """All adapter names the server knows, least recently used first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, AdapterEntry[H]] = OrderedDict()
        self._lock = threading.RLock()

    # ---- reading ------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterEntry[H] | None:
        """A copy of ``name``'s entry (None: unknown)."""
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else replace(entry)

    def snapshot(self) -> list[AdapterEntry[H]]:
        """Copies of every entry, least recently used first."""
        with self._lock:
            return [replace(e) for e in self._entries.values()]

    def loaded(self) -> list[str]:
        """Names whose weights are in memory, least recently used first."""
        with self._lock:
            return [n for n, e in self._entries.items() if e.handle is not None]

    def handles(self) -> list[H]:
        with self._lock:
            return [e.handle for e in self._entries.values() if e.handle is not None]

    def handle(self, name: str) -> H | None:
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else entry.handle

    def servable(self, name: str) -> bool:
        """Whether a request may name ``name``: loaded, or reloadable from a known source."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and (entry.handle is not None or entry.source is not None)

    # ---- moves ---------------------------------------------------------------------------------
    def known(self, name: str, source: str, kind: str | None = None) -> None:
        """Record ``name`` as loadable from ``source`` without loading it (EVICTED: loads on demand)."""
        with self._lock:
            self._entries[name] = AdapterEntry(name, AdapterState.EVICTED, source, kind=kind)

    def loading(self, name: str) -> None:
        """A load of ``name`` started (a new name is created; a loaded one keeps serving meanwhile)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._entries[name] = AdapterEntry(name, AdapterState.LOADING)
            else:
                entry.state = AdapterState.LOADING

    def ready(self, name: str, handle: H, source: str, pinned: bool, kind: str | None) -> H | None:
        """``handle`` is ``name``'s current version (most recently used); returns the version it replaced."""
        with self._lock:
            old = self._entries.pop(name, None)
            self._entries[name] = AdapterEntry(name, AdapterState.READY, source, pinned, kind, None, handle,
                                               int(time.time()))
            return None if old is None else old.handle

    def fail(self, name: str, reason: str) -> None:
        """A load of ``name`` failed: FAILED(reason), unless an older version still serves (then READY)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = AdapterEntry(name, AdapterState.FAILED)
            entry.state = AdapterState.READY if entry.handle is not None else AdapterState.FAILED
            entry.reason = reason

    def touch(self, name: str) -> None:
        """Mark ``name`` most recently used."""
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)

    def evict_beyond(self, capacity: int, keep: str | None, idle: Callable[[H], bool]) -> list[tuple[str, H]]:
        """Evict least recently used, unpinned, ``idle`` versions until at most ``capacity`` are loaded
        (never ``keep``); returns what was evicted, for the engine to free. Everything pinned or busy:
        stays over capacity rather than break a running request."""
        out = []
        with self._lock:
            while len(self.loaded()) > capacity:
                victim = next((e for e in self._entries.values() if e.handle is not None and not e.pinned
                               and e.name != keep and idle(e.handle)), None)
                if victim is None:
                    break
                out.append((victim.name, victim.handle))
                victim.state, victim.handle = AdapterState.EVICTED, None
        return out

    def forget(self, name: str) -> H | None:
        """Drop ``name`` (unknown until loaded again); returns its loaded version, if any."""
        with self._lock:
            entry = self._entries.pop(name, None)
            return None if entry is None else entry.handle
