"""Server settings: one typed object, from command-line flags or ``EDGETUNE_SERVE_*`` environment variables.

Precedence: a flag given on the command line, else the environment variable, else the default. Each
field's type, default, allowed values and docstring are declared here once; ``edgetune serve``'s
flags and their help are generated from these fields (``pipeline/cli.py``). Imports neither torch nor
yaml: the ONNX backend serves where neither is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

ENV_PREFIX = "EDGETUNE_SERVE_"


def _comma_list(value: Any) -> Any:
    """``"a, b"`` (a flag or an environment variable) -> ``("a", "b")``; sequences pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class ServeSettings(BaseSettings):
    """Everything ``edgetune serve`` needs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid",
                                      use_attribute_docstrings=True)

    base: str = "smollm2-135m-instruct"
    """Base model: the embedded name, a local HF folder, or a hub id."""
    adapters: str = "runs/default/adapters"
    """Adapter root: the only place adapters load from (each adapter is a folder under it)."""
    quantize: Literal["none", "int8", "nf4"] = "none"
    """Precision of the shared frozen base: full (``dtype``), or bitsandbytes int8/NF4 (torch backend)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the torch backend runs the base and every adapter: ``auto`` is CUDA when a GPU is visible, else
    the CPU (the ONNX backend's device is ``providers``)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the torch backend's base and adapters: ``auto`` is bfloat16 on a GPU (float16 where
    bf16 is unsupported) and float32 on the CPU. A bitsandbytes base keeps its other layers in float32."""
    backend: Literal["torch", "onnx"] = "torch"
    """``torch``: PyTorch base + PEFT adapters from ``adapters``; ``onnx``: the edge bundle at ``bundle`` on
    ONNX Runtime (no PyTorch needed), serving the bundle's adapters."""
    bundle: str = "runs/default/export/edge"
    """Edge bundle served by the ONNX backend."""
    providers: Annotated[tuple[Literal["cpu", "cuda"], ...], NoDecode, BeforeValidator(_comma_list)] = ("cpu",)
    """ONNX Runtime execution providers of the ONNX backend in order of preference (comma-separated); ``cuda``
    needs the gpu extra (onnxruntime-gpu). The CPU is always the last fallback."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port to listen on."""
    api_key: str | None = None
    """When set, every route needs ``Authorization: Bearer <key>`` (checked before the body is read), except
    health, ready and metrics; /openapi.json too, and /docs and /redoc are off. Visible ASCII; an empty key
    is refused (unset it to serve without one)."""
    max_loaded_adapters: int = Field(8, ge=1)
    """Adapters held in memory at once; the least recently used unpinned one is evicted beyond this."""
    pinned: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = ()
    """Adapters never evicted (comma-separated)."""
    max_rank: int = Field(64, ge=1)
    """Largest LoRA rank accepted."""
    max_batch_size: int = Field(16, ge=1)
    """Requests decoded together."""
    max_queue: int = Field(64, ge=1)
    """Requests waiting beyond the running batch; more get 429 with Retry-After."""
    max_tokens: int = Field(512, ge=1)
    """Upper bound of a request's ``max_tokens``."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request running longer is ended (504 or a final stream error)."""
    preload: bool = True
    """Load every adapter folder under the root at start-up (up to ``max_loaded_adapters``); without it,
    adapters load on ``POST /v1/adapters``."""
    prefix_cache_mb: int = Field(64, ge=0)
    """ONNX backend: memory for the keys and values of prompt blocks already computed, per adapter (a later
    prompt that begins with the same blocks copies them instead of recomputing them); 0 turns it off."""
    num_threads: int = Field(0, ge=0)
    """CPU threads for torch (0: all cores)."""

    @field_validator("api_key")
    @classmethod
    def _a_real_key(cls, key: str | None) -> str | None:
        """An empty key would silently turn authentication off; a key with spaces or non-ASCII characters
        could never be sent in a header (or matched)."""
        if key is None:
            return None
        if not key:
            raise PydanticCustomError(
                "empty_api_key", "an empty key would turn authentication off: set a key, or leave --api-key "
                                 "and EDGETUNE_SERVE_API_KEY unset to serve without one")
        if not all("!" <= c <= "~" for c in key):
            raise PydanticCustomError(
                "api_key_chars", "use visible ASCII characters only (no spaces, control or non-ASCII "
                                 "characters): clients send the key in the Authorization header")
        return key

    @model_validator(mode="after")
    def _options_fit_the_backend(self) -> ServeSettings:
        """Refuse an option the chosen backend would ignore: a setting that does nothing is a silent surprise."""
        if self.backend == "onnx":
            if self.quantize != "none":
                raise PydanticCustomError(
                    "torch_only", "quantize: applies to the torch backend; the ONNX backend runs the bundle's own "
                                  "precision (export.edge_precision)")
            if self.dtype not in ("auto", "float32"):
                raise PydanticCustomError(
                    "torch_only", "dtype: applies to the torch backend; the ONNX backend runs the bundle's own "
                                  "precision (export.edge_precision)")
            if self.device == "cuda":
                raise PydanticCustomError(
                    "torch_only", "device: applies to the torch backend; the ONNX backend runs on --providers "
                                  "(cuda: with the gpu extra, onnxruntime-gpu)")
        elif self.prefix_cache_mb != 64:
            raise PydanticCustomError(
                "onnx_only", "prefix_cache_mb: applies to the ONNX backend (--backend onnx), whose batched decoder "
                             "keeps prompt blocks; the torch backend has no prefix cache")
        elif self.providers != ("cpu",):
            raise PydanticCustomError(
                "onnx_only", "providers: apply to the ONNX backend (--backend onnx); the torch backend runs on "
                             "--device")
        if self.quantize != "none" and self.dtype not in ("auto", "float32"):
            raise PydanticCustomError(
                "quantize_dtype", "dtype: a bitsandbytes base (quantize int8/nf4) keeps its unquantized layers in "
                                  "float32; use dtype auto or float32 with it, or quantize none for a "
                                  f"{self.dtype} base")
        return self

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> ServeSettings:
        """Build from ``flags`` (None values mean "not given") over ``env`` (default ``os.environ``).

        Raises :class:`ConfigError` naming every bad field, one ``field: message`` line each.
        """
        given = {name: value for name, value in (flags or {}).items() if value is not None}
        if env is not None:
            # Only ``env``, never os.environ: every field is passed in (values given to the constructor
            # beat the environment it reads), from the flag, else ``env``, else the field's default.
            defaults = {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()}
            given = {**defaults, **_EnvironmentSource(cls, env)(), **given}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError("serve settings:\n  - " + "\n  - ".join(_lines(exc))) from None


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, case, parsing) reading ``env`` instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        # Variable names match case-insensitively, as the source does with os.environ.
        self.env_vars = {name.lower(): value for name, value in env.items()}


SECRETS = frozenset({"api_key"})
"""Fields whose value an error message never repeats (it would land in a terminal or a log)."""


def _lines(exc: ValidationError) -> list[str]:
    """``field: message (got value)`` per problem; a cross-field message names its field itself."""
    out = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""  # pinned's item errors: the field is enough
        got = "" if field in SECRETS else f" (got {err['input']!r})"
        out.append(f"{field}: {err['msg']}{got}" if field else err["msg"])
    return out
