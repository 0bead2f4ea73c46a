"""One generation request run to its end on an engine (torch or ONNX), for the engine tests."""

from __future__ import annotations

import threading

from serve.engine import GenRequest


def run_request(engine, prompt_ids: list[int], max_tokens: int, *, cancel_on_text: bool = False,
                wait_s: float = 120.0, **kwargs) -> dict:
    """Submit one request and wait for it: its text pieces, joined text, tokens, finish reason, token
    count and error. ``cancel_on_text`` marks it cancelled after its first piece (a client that left)."""
    out: dict = {"pieces": []}
    done = threading.Event()

    def on_text(piece: str) -> None:
        out["pieces"].append(piece)
        if cancel_on_text:
            request.cancelled = True

    def finished(reason, n: int, error: str | None) -> None:
        out.update(reason=reason, n=n, error=error, text="".join(out["pieces"]), tokens=list(request.tokens))
        done.set()

    request = GenRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, on_text=on_text, on_done=finished, **kwargs)
    engine.submit(request)
    assert done.wait(wait_s), "the engine never finished the request"
    return out
