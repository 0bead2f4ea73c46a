"""ONNX fp32 export (with KV cache): loadable by optimum and by our runtime, numerically faithful, same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exporters.onnx import export_onnx_fp32, load_onnx_model, logit_parity

# Two prompts of different length so the batch really is left-padded.
PROMPTS = [
    "the review was great",
    'order ship to city Oslo {"name": "Ada", "qty": 3} positive negative',
]


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # out_dir does not exist yet: the exporter must create it.
    return export_onnx_fp32(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"][0] == 0).any(), "test batch must contain left padding"
    assert (enc["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_export_layout_and_load(onnx_dir: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    assert (onnx_dir / "model.onnx").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (onnx_dir / name).is_file(), name
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    assert model.can_use_cache  # exported "with-past": generate reuses the KV cache
    assert "position_ids" in model.input_names
    # The ONNX folder is self-contained: its tokenizer still applies the chat template.
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_logit_parity_left_padded(onnx_dir: Path, torch_model, batch) -> None:
    onnx_model = load_onnx_model(onnx_dir, num_threads=1)
    parity = logit_parity(torch_model, onnx_model, batch["input_ids"], batch["attention_mask"])
    assert set(parity) == {"max_abs_logit_diff", "top1_agreement", "kl"}
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["kl"] < 1e-6, parity
    assert parity["top1_agreement"] == 1.0, parity


def test_greedy_generate_matches_torch(onnx_dir: Path, torch_model, batch) -> None:
    onnx_model = load_onnx_model(onnx_dir, num_threads=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=torch_model.config.pad_token_id)
    with torch.no_grad():
        expected = torch_model.generate(**batch, **kwargs)
    got = onnx_model.generate(**batch, **kwargs)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"torch {expected.tolist()} vs onnx {got.tolist()}"


def test_missing_model_dir_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        export_onnx_fp32(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_dir_without_config_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*save_pretrained"):
        export_onnx_fp32(empty, tmp_path / "out")


def test_load_missing_onnx_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export_onnx_fp32"):
        load_onnx_model(tmp_path)


def test_logit_parity_runs_the_shared_opening_once_with_the_same_result(
        onnx_dir: Path, tiny_model_dir: Path, torch_model, batch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gates give an ONNX model the opening every row shares (chat template, instruction) apart: the fused
    sidecar runs it once for all rows, and the comparison (metrics, the export's logits) is what whole rows give."""
    import shutil

    from edge.slots import SlotDecoder
    from exporters.fused_graph import write_fused

    shutil.copytree(onnx_dir, tmp_path / "fused")
    write_fused(tmp_path / "fused" / "model.onnx", max_length=128)
    onnx_model = load_onnx_model(tmp_path / "fused", num_threads=1)
    assert onnx_model.decoder.fused is not None
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    opening = next(i for i in range(min(map(len, rows))) if rows[0][i] != rows[1][i])
    assert opening >= 3
    scored = torch.zeros_like(mask)
    scored[:, -3:] = 1  # the answer's positions, as a gate scores them
    whole, shared, runs = [], [], []
    want = logit_parity(torch_model, onnx_model, ids, mask, scored, predictions=whole)
    prefill = SlotDecoder.prefill
    monkeypatch.setattr(SlotDecoder, "prefill", lambda self, start, prompts, *a, **k:
                        runs.append([list(p) for p in prompts]) or prefill(self, start, prompts, *a, **k))
    fed = []
    hook = torch_model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = logit_parity(torch_model, onnx_model, ids, mask, scored, predictions=shared, opening=opening)
    finally:
        hook.remove()
    # the opening once, then the rows' rests: in the export and in the PyTorch reference (one left-padded batch)
    assert runs == [[rows[0][:opening]]] + [[row[opening:]] for row in rows]
    assert fed == [(1, opening), (2, max(len(row) for row in rows) - opening)]
    assert got["top1_agreement"] == want["top1_agreement"] == 1.0
    assert got["max_abs_logit_diff"] == pytest.approx(want["max_abs_logit_diff"], abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(whole, shared)) and len(shared) == 2
    # a row's logits do not depend on the rows batched with it (each has its own positions and mask)
    fed.clear()
    hook = torch_model.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        alone = []
        logit_parity(torch_model, onnx_model, ids, mask, scored, predictions=alone, opening=opening, batch_size=1)
    finally:
        hook.remove()
    assert fed == [(1, opening), (1, len(rows[0]) - opening), (1, opening), (1, len(rows[1]) - opening)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(alone, shared))

    # a PyTorch export (a GGUF file read back) continues from the opening's cache too, cut back after each row
    export = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    whole, shared = [], []
    want = logit_parity(torch_model, export, ids, mask, scored, predictions=whole)
    got = logit_parity(torch_model, export, ids, mask, scored, predictions=shared, opening=opening)
    assert want["max_abs_logit_diff"] < 1e-5 and got["max_abs_logit_diff"] < 1e-4 and got["top1_agreement"] == 1.0
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(whole, shared)) and len(shared) == 2


def test_a_second_model_of_the_same_configuration_gets_the_file_optimum_would_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The export stage traces once per configuration: the next model's graph is the first one's with its own
    weights, file for file what optimum writes for it (a stale weight, a missing file would show here)."""
    import logging

    from exporters import onnx as exporter
    from tests.tiny_model import build_tiny_model

    monkeypatch.setattr(exporter, "_TEMPLATES", {})
    first, second = (_trained_norms(build_tiny_model(tmp_path / name, seed=seed), seed) for name, seed in
                     (("a", 1), ("b", 2)))
    export_onnx_fp32(first, tmp_path / "first")
    with caplog.at_level(logging.INFO, logger="exporters.onnx"):
        reused = export_onnx_fp32(second, tmp_path / "reused")
    assert "traced for the same configuration earlier" in caplog.text
    monkeypatch.setattr(exporter, "_TEMPLATES", {})  # the same model, traced by optimum
    _same_files(reused, export_onnx_fp32(second, tmp_path / "traced"))
    assert (reused / "model.onnx").read_bytes() != (tmp_path / "first" / "model.onnx").read_bytes()


def test_a_graph_whose_equal_weights_optimum_stored_once_is_not_reused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh model's norms are all ones: optimum stores one initializer for all of them, which would give a
    tuned model (norms apart) one norm everywhere. Such a graph is traced again for the next model."""
    from exporters import onnx as exporter
    from tests.tiny_model import build_tiny_model

    monkeypatch.setattr(exporter, "_TEMPLATES", {})
    export_onnx_fp32(build_tiny_model(tmp_path / "fresh", seed=1), tmp_path / "first")
    assert list(exporter._TEMPLATES.values()) == [None]
    tuned = _trained_norms(build_tiny_model(tmp_path / "tuned", seed=1), 3)
    written = export_onnx_fp32(tuned, tmp_path / "second")
    monkeypatch.setattr(exporter, "_TEMPLATES", {})
    _same_files(written, export_onnx_fp32(tuned, tmp_path / "traced"))


def _trained_norms(model_dir: Path, seed: int) -> Path:
    """``model_dir``'s model with norms apart from 1 (as training leaves them), saved in place."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(model_dir)
    return model_dir


def _same_files(got: Path, expected: Path) -> None:
    files = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == files and "model.onnx" in files
    for name in files:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name


def test_a_graph_whose_weights_cannot_all_be_placed_is_not_reused(tmp_path: Path) -> None:
    """A float constant that matches no weight could be computed from them: such a graph is traced every time."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "c"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight.T.copy(), "w"),
         numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "c")])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    from exporters.onnx_template import record

    assert record(tmp_path / "m.onnx", {"proj.weight": weight}, {}) is None
    small = helper.make_graph(graph.node[:1], "g", graph.input, [helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(weight.T.copy(), "w")])
    onnx.save(helper.make_model(small), str(tmp_path / "s.onnx"))
    assert record(tmp_path / "s.onnx", {"proj.weight": weight}, {}).weights == {"w": ("proj.weight", True)}
