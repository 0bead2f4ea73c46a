"""The fused sidecar (``model.fused.onnx``): written next to an exported decoder, it reads that file's weights,
and the edge runtime decodes on it exactly what the exported graph decodes, with every adapter kind.

The exported graph alone (``Decoder(..., fused=False)``) is the reference throughout: the sidecar is a faster
form of the same model, so greedy tokens must be equal and logits within float rounding at fp32.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from edge.runtime import Decoder
from edge.slots import SlotDecoder, fused_path
from exporters.fused_graph import SHARED_MIN_BYTES, write_fused
from exporters.kv_prefix import adapter_prefix
from exporters.onnx import export_onnx_fp32
from exporters.onnx_lora import add_lora_inputs, write_onnx_adapter
from exporters.onnx_quant import quantize_int4, quantize_int8

PROMPTS = [[3, 70, 140, 210, 280, 350, 420, 17], [5, 9, 200], [11]]


def _base(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as fp32, int8 and int4 decoders and as a multi-LoRA base, each in its own folder."""
    root = tmp_path_factory.mktemp("fused")
    fp32 = export_onnx_fp32(tiny_model_dir, root / "fp32") / "model.onnx"
    out = {"fp32": fp32}
    for name, quantize in (("int8", quantize_int8), ("int4", lambda s, d: quantize_int4(s, d, block_size=16))):
        (root / name).mkdir()
        out[name] = quantize(fp32, root / name / "model.onnx")
    model = onnx.load(str(fp32))
    add_lora_inputs(model)
    (root / "lora").mkdir()
    onnx.save(model, str(root / "lora" / "model.onnx"))
    out["lora"] = root / "lora" / "model.onnx"
    return out


def _greedy(decoder: Decoder, prompt: list[int], n: int, **kwargs) -> list[int]:
    return list(decoder.stream(prompt, n, **kwargs))


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids, mask = np.zeros((len(prompts), width), np.int64), np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return ids, mask


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_the_sidecar_shares_the_weights_and_decodes_the_exported_graphs_tokens(precision: str,
                                                                                exported: dict[str, Path]) -> None:
    path = exported[precision]
    sidecar = write_fused(path, max_length=64)
    assert sidecar == fused_path(path) == path.with_name("model.fused.onnx")
    # every weight is a byte range of the exported file: the sidecar is the graph and the rotary tables only
    graph = onnx.load(str(sidecar), load_external_data=False).graph
    external = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for i in external for e in i.external_data if e.key == "location"} == {"model.onnx"}
    inline = {i.name for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL
              and len(i.raw_data) >= SHARED_MIN_BYTES}
    assert inline <= {"gqa.cos_cache", "gqa.sin_cache"}  # the rewrite's own rotary tables
    assert sidecar.stat().st_size < path.stat().st_size / 2  # (the tiny model's file is mostly graph, not weights)
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2  # one per layer of the tiny model

    fused, plain = Decoder(path, threads=1), Decoder(path, threads=1, fused=False)
    assert fused.fused is not None and plain.fused is None
    for prompt in PROMPTS:
        assert _greedy(fused, prompt, 12) == _greedy(plain, prompt, 12)
    assert fused.decode_speed(PROMPTS[0], 4, 1) > 0
    # a left-padded batch: logits at every real position, and greedy answers with a stop token
    ids, mask = _left_padded(PROMPTS)
    got, want = fused.logits(ids, mask), plain.logits(ids, mask)
    bound = 1e-4 if precision == "fp32" else 0.05 * float(np.ptp(want[mask.astype(bool)]))
    assert np.abs(got - want)[mask.astype(bool)].max() <= bound
    assert (got.argmax(-1) == want.argmax(-1))[mask.astype(bool)].mean() >= (1.0 if precision == "fp32" else 0.9)
    stop = _greedy(plain, PROMPTS[1], 1)[0]
    assert stop not in _greedy(plain, PROMPTS[0], 8)
    batch = fused.generate_batch(PROMPTS, 8, pad_id=0, stop_ids=[stop])
    assert batch == plain.generate_batch(PROMPTS, 8, pad_id=0, stop_ids=[stop])
    assert batch[1] == [] and batch[0] == _greedy(plain, PROMPTS[0], 8)  # row 1 ended at its stop, row 0 ran on
    assert fused._session is None  # none of this opened the exported graph: one copy of the weights in memory


def test_lora_and_prefix_adapters_decode_on_the_sidecar_as_on_the_exported_graph(
        tiny_model_dir: Path, exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    lora = get_peft_model(_base(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            task_type=TaskType.CAUSAL_LM))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    lora.save_pretrained(tmp_path / "lora")
    write_onnx_adapter(tmp_path / "lora", tmp_path / "task.onnx_adapter")
    prefix_model = get_peft_model(_base(tiny_model_dir), PrefixTuningConfig(num_virtual_tokens=5,
                                                                            task_type=TaskType.CAUSAL_LM))
    with torch.no_grad():
        for p in prefix_model.parameters():
            if p.requires_grad:
                p.normal_(std=1.0)
    prefix_model.save_pretrained(tmp_path / "prefix")
    prefix = adapter_prefix(tmp_path / "prefix", tiny_model_dir)

    path = exported["lora"]
    write_fused(path, max_length=64)
    fused, plain = Decoder(path, threads=1), Decoder(path, threads=1, fused=False)
    for decoder in (fused, plain):
        decoder.load_adapter("task", tmp_path / "task.onnx_adapter")
    for prompt in PROMPTS:
        with_lora = _greedy(fused, prompt, 10, adapter="task")
        assert with_lora == _greedy(plain, prompt, 10, adapter="task")
        assert _greedy(fused, prompt, 10, prefix=prefix) == _greedy(plain, prompt, 10, prefix=prefix)
        assert _greedy(fused, prompt, 10) == _greedy(plain, prompt, 10)
    assert _greedy(fused, PROMPTS[0], 10, adapter="task") != _greedy(fused, PROMPTS[0], 10)  # the adapter matters
    ids, mask = _left_padded(PROMPTS)
    real = mask.astype(bool)
    for kwargs in ({"adapter": "task"}, {"prefix": prefix}):
        full = fused.logits(ids, mask, **kwargs)
        assert np.abs(full - plain.logits(ids, mask, **kwargs))[real].max() < 1e-4
        # the last k positions only (transformers' logits_to_keep), the output head run there alone: the same
        # logits, padding zero; rows shorter than k (PROMPTS[1] has 3 tokens, PROMPTS[2] one) included
        for keep in (1, 4, ids.shape[1]):
            tail = fused.logits(ids, mask, keep=keep, **kwargs)
            assert tail.shape == (len(PROMPTS), keep, full.shape[-1])
            assert np.abs(tail - full[:, -keep:]).max() < 1e-5
            assert not tail[~real[:, -keep:]].any()
            assert np.abs(plain.logits(ids, mask, keep=keep, **kwargs) - full[:, -keep:])[real[:, -keep:]].max() < 1e-4
        assert fused.generate_batch(PROMPTS, 6, pad_id=0, **kwargs) == plain.generate_batch(PROMPTS, 6, pad_id=0,
                                                                                          **kwargs)
    # rows that share an opening (a system turn, an instruction), given once: on the sidecar the opening runs
    # once and every row continues from a copy of its cache; the logits are those of the rows run whole
    opening = [40, 41, 42, 43, 44]
    whole_ids, whole_mask = _left_padded([opening + p for p in PROMPTS])
    runs = []
    prefill = SlotDecoder.prefill
    monkeypatch.setattr(SlotDecoder, "prefill", lambda self, start, prompts, *a, **k:
                        runs.append([list(p) for p in prompts]) or prefill(self, start, prompts, *a, **k))
    fed = []
    forward = plain.forward
    monkeypatch.setattr(plain, "forward", lambda ids_, *a, **k: fed.append(ids_.shape) or forward(ids_, *a, **k))
    for kwargs in ({"adapter": "task"}, {"prefix": prefix}, {}):
        want = plain.logits(whole_ids, whole_mask, keep=4, **kwargs)
        runs.clear()
        got = fused.logits(ids, mask, keep=4, opening=opening, **kwargs)
        assert runs == [[opening]] + [[p] for p in PROMPTS]
        assert np.abs(got - want)[real[:, -4:]].max() < 1e-4 and not got[~real[:, -4:]].any()
        runs.clear()  # the opening's cache is kept for the next call with the same opening, adapter and prefix
        assert np.abs(fused.logits(ids[1:], mask[1:], keep=4, opening=opening, **kwargs) - got[1:]).max() < 1e-6
        assert runs == [[p] for p in PROMPTS[1:]]
        # the exported graph too runs the opening once, then the rows after it (as after a prefix): the same
        # logits; and every position, without keep
        fed.clear()
        on_graph = plain.logits(ids, mask, keep=4, opening=opening, **kwargs)
        assert fed == [(1, len(opening)), ids.shape]
        assert np.abs(on_graph - got)[real[:, -4:]].max() < 1e-4
        assert np.abs(fused.logits(ids, mask, opening=opening, **kwargs)[:, -4:] - got).max() < 1e-4
    # an adapter loaded again under its name (another file, maybe) is not answered from the old cache
    fused.load_adapter("task", tmp_path / "task.onnx_adapter")
    runs.clear()
    fused.logits(ids, mask, keep=4, opening=opening, adapter="task")
    assert runs[0] == [opening]
    monkeypatch.undo()
    assert fused._session is None
    # streams interleaved over one decoder keep their own caches
    a, b = fused.stream(PROMPTS[0], 6, adapter="task"), fused.stream(PROMPTS[1], 6, prefix=prefix)
    mixed = [(next(a), next(b)) for _ in range(6)]
    assert [x for x, _ in mixed] == _greedy(plain, PROMPTS[0], 6, adapter="task")
    assert [y for _, y in mixed] == _greedy(plain, PROMPTS[1], 6, prefix=prefix)
    # past the sidecar's context the exported graph runs (opened on first use), with the adapter loaded before
    long = (PROMPTS[0] * 10)[:70]
    assert np.abs(fused.logits(np.asarray([long]), adapter="task")
                  - plain.logits(np.asarray([long]), adapter="task")).max() < 1e-6
    assert fused._session is not None
    fused.unload_adapter("task")
    with pytest.raises(KeyError, match="not loaded"):
        list(fused.stream(PROMPTS[0], 2, adapter="task"))


def test_past_the_sidecars_context_and_with_a_stale_or_damaged_sidecar_the_exported_graph_decodes(
        exported: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exported["fp32"].parent, folder)
    path = folder / "model.onnx"
    sidecar = write_fused(path, max_length=16)
    plain = Decoder(path, threads=1, fused=False)
    fused = Decoder(path, threads=1)
    # 8 prompt tokens + 12 new ones do not fit 16 rotary positions: the stream runs on the exported graph
    assert _greedy(fused, PROMPTS[0], 12) == _greedy(plain, PROMPTS[0], 12) and fused._session is not None

    shutil.copy2(exported["int8"], path)
    sidecar = write_fused(path, max_length=64)
    original = sidecar.read_bytes()
    # the exported file replaced by another export (a larger one: the sidecar's byte ranges still lie inside it,
    # so only the recorded size tells); a truncated sidecar
    for damage, why in ((lambda: shutil.copy2(exported["fp32"], path), "was written for a"),
                        (lambda: sidecar.write_bytes(original[: len(original) // 2]), "not using the fused sidecar")):
        shutil.copy2(exported["int8"], path)
        sidecar.write_bytes(original)
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge.runtime"):
            decoder = Decoder(path, threads=1)
        assert decoder.fused is None and why in caplog.text
        reference = Decoder(path, threads=1, fused=False)
        assert _greedy(decoder, PROMPTS[1], 6) == _greedy(reference, PROMPTS[1], 6)
    assert not list(folder.glob("*.partial"))


def test_slots_whose_cache_grows_between_steps_keep_computing_the_exported_graphs_logits(
        exported: dict[str, Path]) -> None:
    """The key/value rows stay bound between steps; when a row outgrows the buffers they are reallocated and
    must be bound anew (a stale binding would read and write freed memory)."""
    from edge.slots import FusedModel, SlotDecoder

    path = exported["fp32"]
    write_fused(path, max_length=64)
    slots = SlotDecoder(FusedModel(fused_path(path), threads=1), slots=1, capacity=4)
    prompt = PROMPTS[1]  # 3 tokens: the first run fits the 4 positions allocated
    got = [slots.prefill(0, [prompt])[0]]
    sequence = list(prompt)
    for _ in range(10):  # grows to 8, then 16 positions, between decode steps
        sequence.append(int(got[-1].argmax()))
        got.append(slots.decode([sequence[-1]])[0])
    assert slots.capacity == 16
    want = Decoder(path, threads=1, fused=False).logits(np.asarray([sequence]))[0, len(prompt) - 1:]
    assert np.abs(np.stack(got) - want).max() < 1e-4


def test_a_model_with_its_weights_in_an_external_data_file_gets_no_sidecar(exported: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """Over 2 GB a model's weights live in a separate file; a sidecar pointing into ``model.onnx`` would read
    the wrong bytes, so none is written and the reason says why (the export records it and goes on)."""
    from exporters.fused_graph import FuseError

    model = onnx.load(str(exported["fp32"]))
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    with pytest.raises(FuseError, match="external data file"):
        write_fused(tmp_path / "model.onnx", max_length=64)
    assert not fused_path(tmp_path / "model.onnx").exists() and not list(tmp_path.glob("*.partial"))
    assert _greedy(Decoder(tmp_path / "model.onnx", threads=1), PROMPTS[1], 4) == \
        _greedy(Decoder(exported["fp32"], threads=1, fused=False), PROMPTS[1], 4)
