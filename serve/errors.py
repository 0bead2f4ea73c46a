"""Errors the API answers with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.schemas import ErrorBody, ErrorDetail


class ApiError(Exception):
    """Raised anywhere in a route: answered with ``status``, OpenAI's error body and ``headers``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Invalid request (a body that is not JSON, or does not fit the schema "
                                             "or the server's limits): ``error.param`` names the first bad field"},
    "4XX": {"model": ErrorBody, "description": "401: missing or wrong API key; 404: unknown model or adapter; "
                                               "422: an adapter whose files are unfit; 429: at capacity "
                                               "(Retry-After)"},
    "5XX": {"model": ErrorBody, "description": "503: the base is still loading (Retry-After); 504: past "
                                               "request_timeout_s"},
}
"""The error answers of every route that takes a body or parameters, for the OpenAPI schema (given to
``include_router``; declaring "4XX" also keeps FastAPI from advertising its own 422 validation body: an
invalid request is a 400 with OpenAI's error body here)."""


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)


def validation_detail(errors: list[dict[str, Any]]) -> ErrorDetail:
    """The 400 for an invalid body: the first problem, with the field it is in as ``param``.

    A check of ours (a ``ValueError`` in a validator: a sampling bound, text that is not Unicode) beats a
    type mismatch pydantic reports for another member of a union (``prompt``: a string *or* a list).
    """
    if not errors:
        return ErrorDetail(message="invalid request: malformed body", param=None)
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    cause = (first.get("ctx") or {}).get("error")
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        where = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
        return ErrorDetail(message=f"invalid request: the body is not valid JSON ({cause or 'malformed'} at "
                                   f"character {where}): send one JSON object", param=None)
    # union members appear in loc as type names ("list[str]", "function-after[...]"): not fields
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p))
    message = str(cause) if isinstance(cause, ValueError) else first.get("msg", "malformed")
    return ErrorDetail(message=f"invalid request: {where or 'body'}: {message}", param=where or None)


def install_error_handlers(app: FastAPI) -> None:
    """ApiError as its body; a malformed or invalid request body as a 400 naming the first bad field."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_detail(list(exc.errors())))
