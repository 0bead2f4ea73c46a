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
