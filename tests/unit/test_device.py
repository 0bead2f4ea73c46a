"""Placement decided in one place: device, precision, dtype, threads, and inputs that follow the model."""

from __future__ import annotations

import pytest
import torch

from pipeline import device
from pipeline.errors import ModelError


def test_forced_cuda_without_gpu_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == "cpu"
    with pytest.raises(ModelError, match="no CUDA GPU"):
        device.resolve_device("cuda")


def test_auto_picks_cuda_when_visible(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve_device("auto") == "cuda" and device.resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("setting, on, bf16_ok, expected", [
    ("auto", "cpu", True, "fp32"),
    ("auto", "cuda", True, "bf16"),
    ("auto", "cuda", False, "fp32"),  # fp16 is never chosen for the user
    ("bf16", "cpu", False, "bf16"),
    ("fp16", "cuda", False, "fp16"),
    ("fp32", "cuda", True, "fp32"),
])
def test_precision(monkeypatch, setting: str, on: str, bf16_ok: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert device.resolve_precision(setting, on) == expected


def test_fp16_on_the_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(ModelError, match="fp16 mixed precision needs a CUDA GPU; on the CPU use bf16 or fp32"):
        device.resolve_precision("fp16", "cpu")


def test_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.resolve_dtype("auto", "cpu") == torch.float32
    assert device.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert device.resolve_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        device.resolve_dtype("fp8", "cpu")


def test_threads_are_shared_among_local_ranks(monkeypatch) -> None:
    monkeypatch.setattr(device.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device.thread_count(0) == 16 and device.thread_count(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.thread_count(0) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert device.thread_count(0) == 1  # never zero


def test_inputs_follow_the_model() -> None:
    class OnMeta(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, device="meta"))

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "note": "kept"}
    moved = device.to_model(batch, OnMeta())
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"
    assert device.model_device(object()) == torch.device("cpu")  # no parameters: an ONNX model's face


def test_onnx_providers_name_the_missing_extra(monkeypatch) -> None:
    import onnxruntime

    assert device.onnx_providers(["cpu"]) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelError, match=r"providers: .*gpu"):
        device.onnx_providers(["cuda"])
