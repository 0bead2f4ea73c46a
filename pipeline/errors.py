"""The one exception type users see: a clear message that names the problem and the fix."""


class EdgetuneError(Exception):
    """A user-facing error. The CLI prints its message (no traceback) and exits non-zero."""


class ConfigError(EdgetuneError):
    """The configuration is invalid; the message lists every problem found."""


class DataError(EdgetuneError):
    """A task data file is missing or malformed; the message names file and line."""


class ModelError(EdgetuneError):
    """A base model or artifact cannot be found or loaded."""
