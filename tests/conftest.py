"""Shared fixtures: the tiny random model every stage test runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip, saying why, when no CUDA device is visible (``make gpu-check`` on a CPU machine)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        reason = (f"no CUDA device visible (torch {torch.__version__}, built with CUDA "
                  f"{torch.version.cuda or 'none'}); run `make gpu-check` on a machine with an NVIDIA GPU")
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=reason))


_GPU_LINES: list[str] = []


@pytest.fixture
def gpu_line():
    """``gpu_line(text)`` records one line of the GPU check's summary, printed at the end of the session."""
    return _GPU_LINES.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _GPU_LINES:
        terminalreporter.section("GPU check: one line per method and adapter kind")
        for line in _GPU_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF directory (config, safetensors weights, tokenizer with chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
