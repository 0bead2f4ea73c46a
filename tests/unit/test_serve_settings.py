"""Serve settings: flags over environment over defaults, checks next to the fields, flags generated from them."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from pipeline import cli
from pipeline.errors import ConfigError
from serve.settings import ServeSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EDGETUNE_SERVE_"):
            monkeypatch.delenv(name)


def test_flag_beats_environment_beats_default() -> None:
    env = {"EDGETUNE_SERVE_PORT": "9002", "EDGETUNE_SERVE_API_KEY": "k", "edgetune_serve_max_rank": "8",
           "EDGETUNE_SERVE_PRELOAD": "false", "EDGETUNE_SERVE_REQUEST_TIMEOUT_S": "2.5"}
    s = ServeSettings.from_sources({"port": 9001, "api_key": None, "max_queue": "5"}, env=env)
    assert (s.port, s.api_key, s.max_rank, s.max_queue) == (9001, "k", 8, 5)
    assert s.preload is False and s.request_timeout_s == 2.5 and s.max_batch_size == 16


def test_environment_argument_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETUNE_SERVE_PORT", "9003")
    assert ServeSettings.from_sources({}).port == 9003
    assert ServeSettings.from_sources({}, env={}).port == 8000
    assert ServeSettings().port == 9003  # constructed directly, pydantic-settings reads os.environ


@pytest.mark.parametrize("source", ["flag", "env"])
def test_pinned_is_a_comma_separated_tuple(source: str) -> None:
    raw = " a, b ,,c"
    s = (ServeSettings.from_sources({"pinned": raw}, env={}) if source == "flag"
         else ServeSettings.from_sources({}, env={"EDGETUNE_SERVE_PINNED": raw}))
    assert s.pinned == ("a", "b", "c")
    assert ServeSettings(pinned=["x"]).pinned == ("x",) and ServeSettings().pinned == ()


def test_every_bad_value_is_reported_with_its_field() -> None:
    with pytest.raises(ConfigError) as info:
        ServeSettings.from_sources({"port": "0", "quantize": "fp8", "request_timeout_s": "0", "backend": "foo"},
                                   env={"EDGETUNE_SERVE_MAX_QUEUE": "0", "EDGETUNE_SERVE_PRELOAD": "maybe"})
    lines = str(info.value).splitlines()
    assert lines[0] == "serve settings:"
    fields = sorted(line.split(":")[0].strip(" -") for line in lines[1:])
    assert fields == ["backend", "max_queue", "port", "preload", "quantize", "request_timeout_s"]
    assert "  - port: Input should be greater than or equal to 1 (got '0')" in lines


@pytest.mark.parametrize(("flags", "field"), [({"port": 65536}, "port"), ({"max_loaded_adapters": 0}, "max_loaded_adapters"),
                                               ({"max_rank": 0}, "max_rank"), ({"max_batch_size": 0}, "max_batch_size"),
                                               ({"max_tokens": 0}, "max_tokens"), ({"num_threads": -1}, "num_threads"),
                                               ({"port": "x"}, "port"), ({"nope": 1}, "nope")])
def test_ranges_and_unknown_names(flags: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"serve settings:\n  - {field}: "):
        ServeSettings.from_sources(flags, env={})


def test_onnx_backend_refuses_a_torch_quantization() -> None:
    with pytest.raises(ConfigError, match="quantize: applies to the torch backend"):
        ServeSettings.from_sources({"backend": "onnx", "quantize": "nf4"}, env={})
    assert ServeSettings.from_sources({"backend": "onnx"}, env={}).quantize == "none"


def test_settings_are_frozen() -> None:
    s = ServeSettings()
    with pytest.raises(ValidationError, match="frozen"):
        s.port = 1  # type: ignore[misc]


def _expected_default(default: object) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return "unset" if default is None else str(default)


def test_serve_help_lists_every_field_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    options = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for name, field in ServeSettings.model_fields.items():
        flag = ("--no-" if field.default is True else "--") + name.replace("_", "-")
        start = options.index(f" {flag} ")
        shown = options[options.index("(default: ", start):]
        assert shown.startswith(f"(default: {_expected_default(field.default)})"), (flag, shown[:40])
        first_words = " ".join(field.description.replace("``", "").split()[:3])
        assert first_words in options[start:start + 300], flag  # the docstring is the help


@pytest.mark.parametrize(("argv", "field"), [(["--port", "0"], "port"), (["--backend", "foo"], "backend"),
                                             (["--port", "abc"], "port"), (["--max-queue", "0"], "max_queue"),
                                             (["--backend", "onnx", "--quantize", "int8"], "quantize")])
def test_bad_flag_is_one_error_line_and_status_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                 field: str) -> None:
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == ["edgetune: error: serve settings:"]
    assert f"  - {field}: " in err


def test_flags_reach_the_server_as_typed_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import serve.app

    seen: list[ServeSettings] = []
    monkeypatch.setattr(serve.app, "serve", lambda settings: seen.append(settings) or 0)
    monkeypatch.setenv("EDGETUNE_SERVE_MAX_TOKENS", "99")
    argv = ["serve", "--backend", "onnx", "--port", "8123", "--pinned", "a,b", "--no-preload",
            "--request-timeout-s", "1.5", "--api-key", "s3"]
    assert cli.main(argv) == 0
    (s,) = seen
    assert (s.backend, s.port, s.pinned, s.preload, s.request_timeout_s, s.api_key, s.max_tokens) == \
        ("onnx", 8123, ("a", "b"), False, 1.5, "s3", 99)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_device_dtype_and_providers_from_flags_or_environment(source: str) -> None:
    torch_side = {"device": "cuda", "dtype": "bfloat16"}
    onnx_side = {"backend": "onnx", "providers": "cuda, cpu"}
    if source == "flag":
        s, o = ServeSettings.from_sources(torch_side, env={}), ServeSettings.from_sources(onnx_side, env={})
    else:
        env = lambda d: {f"EDGETUNE_SERVE_{k.upper()}": v for k, v in d.items()}  # noqa: E731
        s, o = ServeSettings.from_sources({}, env=env(torch_side)), ServeSettings.from_sources({}, env=env(onnx_side))
    assert (s.device, s.dtype, s.providers) == ("cuda", "bfloat16", ("cpu",))
    assert (o.backend, o.providers) == ("onnx", ("cuda", "cpu"))
    default = ServeSettings.from_sources({}, env={})
    assert (default.device, default.dtype, default.providers) == ("auto", "auto", ("cpu",))


@pytest.mark.parametrize(("flags", "message"), [
    ({"device": "gpu"}, "device: Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')"),
    ({"dtype": "fp16"}, "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp16')"),
    ({"backend": "onnx", "providers": "cpu,tpu"}, "providers: Input should be 'cpu' or 'cuda' (got 'tpu')"),
])
def test_bad_device_dtype_or_provider_names_the_field(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeSettings.from_sources(flags, env={})
    assert f"  - {message}" in str(info.value).splitlines()


@pytest.mark.parametrize(("flags", "message"), [
    ({"backend": "onnx", "dtype": "bfloat16"}, "dtype: applies to the torch backend"),
    ({"backend": "onnx", "device": "cuda"}, "device: applies to the torch backend; the ONNX backend runs on --providers"),
    ({"providers": "cuda"}, "providers: apply to the ONNX backend"),
    ({"quantize": "nf4", "dtype": "float16"}, "dtype: a bitsandbytes base (quantize int8/nf4) keeps its unquantized"),
])
def test_options_the_backend_or_the_quantization_would_ignore_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServeSettings.from_sources(flags, env={})
    assert message in str(info.value)
    # what each option is for is accepted
    ServeSettings.from_sources({"backend": "onnx", "dtype": "float32", "device": "cpu", "providers": "cuda"}, env={})
    ServeSettings.from_sources({"quantize": "int8", "dtype": "float32", "device": "cuda"}, env={})


def test_device_and_dtype_flags_reach_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import serve.app

    seen: list[ServeSettings] = []
    monkeypatch.setattr(serve.app, "serve", lambda settings: seen.append(settings) or 0)
    assert cli.main(["serve", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert cli.main(["serve", "--backend", "onnx", "--providers", "cuda,cpu"]) == 0
    assert [(s.device, s.dtype, s.providers) for s in seen] == [("cpu", "bfloat16", ("cpu",)),
                                                               ("auto", "auto", ("cuda", "cpu"))]
    assert cli.main(["serve", "--dtype", "half"]) == 2
