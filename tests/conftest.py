"""Shared fixtures: the tiny random model every stage test runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF directory (config, safetensors weights, tokenizer with chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
