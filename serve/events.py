"""One request's output as a stream of events, for both the streamed and the whole response.

The engine reports through a request's callbacks on its worker thread; :class:`EventQueue` turns them
into events on the event loop, read with ``async for``: text pieces, then exactly one :class:`Done`.
A streamed response serialises each event as it comes; a whole response is :func:`collect` of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    """New text of the answer (already cut at a stop string)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The end: finish reason (``stop``, ``length``, ``timeout``, ``cancelled``, ``error``), tokens generated."""

    reason: str
    completion_tokens: int
    error: str | None = None


Event = Text | Done


class EventQueue:
    """A request's ``on_text``/``on_done`` callbacks (any thread) feeding events to the loop that made it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_text(self, text: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, Text(text))

    def on_done(self, reason: str, completion_tokens: int, error: str | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, Done(reason, completion_tokens, error))

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Every event, up to and including the :class:`Done`."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Done):
                return


@dataclass(frozen=True)
class Generation:
    """A whole answer: its text and how it ended."""

    text: str
    done: Done


async def collect(events: AsyncIterable[Event]) -> Generation:
    """Gather ``events`` into the whole answer (the text before the :class:`Done`, and the Done)."""
    pieces = []
    async for event in events:
        if isinstance(event, Done):
            return Generation("".join(pieces), event)
        pieces.append(event.text)
    raise RuntimeError("the event stream ended without its Done event")
