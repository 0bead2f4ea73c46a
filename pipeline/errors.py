"""The one exception type users see: a clear message that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class EdgetuneError(Exception):
    """A user-facing error. The CLI prints its message (no traceback) and exits non-zero."""


class ConfigError(EdgetuneError):
    """The configuration is invalid; the message lists every problem found."""


class DataError(EdgetuneError):
    """A task data file is missing or malformed; the message names file and line."""


class ModelError(EdgetuneError):
    """A base model or artifact cannot be found or loaded."""


EXIT_FAILED_GATES = 3
"""Exit status of a run that finished every stage but left artifacts unpublished because they failed
their fidelity gates ("completed with failed gates"); report.json lists them with their numbers."""


class GateFailed(EdgetuneError):
    """An artifact measured worse than its fidelity gate allows: it is not published, and the run goes on.

    ``metrics`` are the gate's measurements (recorded in the export record and the report)."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


def read_utf8(path: Path, error: type[EdgetuneError], what: str) -> str:
    """The text of ``path``; ``error`` naming ``path:line`` and the offending byte and column when it is not
    UTF-8 (``what`` is the file's role in the fix: "the file", "the config")."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                    f"save {what} as UTF-8") from None
