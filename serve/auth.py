"""The API key check, made from the request's headers alone: before the body is read, parsed or validated.

With ``settings.api_key`` set, every HTTP request except to :data:`OPEN_PATHS` must send
``Authorization: Bearer <key>``; anything else is a 401 with OpenAI's error body, whatever its body
(never read) or path (an unknown path is a 401 too: nothing is learnt without the key). The key is
compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_response
from serve.schemas import ErrorDetail

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Open without the key: what a load balancer and a Prometheus scraper need, and nothing else."""


class ApiKeyMiddleware:
    """Pure ASGI middleware: lets a request through only with the key (or to an open path), else answers 401."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode("ascii")  # settings refuse anything but visible ASCII

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope["headers"]):
            await self.app(scope, receive, send)
            return
        detail = ErrorDetail(message="missing or wrong API key: send the header Authorization: Bearer <key>",
                             type="authentication_error", code="invalid_api_key")
        await error_response(401, detail, {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """One ``Authorization: Bearer <key>`` header (the scheme in any case) carrying exactly the key."""
        sent = [value for name, value in headers if name == b"authorization"]
        if len(sent) != 1:
            return False
        scheme, _, token = sent[0].strip().partition(b" ")
        # compare_digest takes as long whatever the token's content: a wrong key leaks no matching prefix
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
