"""Edge export on the tiny model: quantized ONNX, multi-LoRA adapters, KV prefixes, the runtime's contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from edge.runtime import Decoder, Prefix
from exporters.kv_prefix import adapter_prefix
from exporters.onnx import export_onnx_fp32
from exporters.onnx_lora import LoraExportError, add_lora_inputs, lora_factors, write_onnx_adapter
from exporters.onnx_quant import quantize_int4, quantize_int8

IDS = np.array([[3, 70, 140, 210, 280, 350, 420, 17]])


def _base(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return export_onnx_fp32(tiny_model_dir, tmp_path_factory.mktemp("edge") / "fp32")


@pytest.fixture(scope="module")
def lora_base(onnx_dir: Path) -> Path:
    model = onnx.load(str(onnx_dir / "model.onnx"))
    modules = add_lora_inputs(model)
    assert len(modules) == 7 * 2  # q k v o gate up down, in each of the tiny model's two layers
    path = onnx_dir.parent / "lora_base.onnx"
    onnx.save(model, str(path))
    return path


def _lora_adapter(tiny_model_dir: Path, out: Path, *, dora: bool = False, targets="all-linear") -> Path:
    torch.manual_seed(1)
    model = get_peft_model(_base(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             use_dora=dora, task_type=TaskType.CAUSAL_LM))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # a fresh LoRA adds zero; make it change the model
    model.save_pretrained(out)
    return out


def test_quantized_exports_load_generate_and_shrink(onnx_dir: Path, tmp_path: Path) -> None:
    fp32 = onnx_dir / "model.onnx"
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx")
    int4 = quantize_int4(fp32, tmp_path / "int4.onnx", block_size=16)
    ops = {n.op_type for n in onnx.load(str(int4), load_external_data=False).graph.node}
    # every projection, the tied head and the embedding are 4-bit; the embedding reads the head's weight
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    graph = onnx.load(str(int4)).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert gather.input[0] == head.input[1]
    assert int4.stat().st_size < int8.stat().st_size < fp32.stat().st_size
    reference = Decoder(fp32, threads=1).logits(IDS)
    for path in (int8, int4):
        decoder = Decoder(path, threads=1)
        tokens = list(decoder.stream(IDS[0].tolist(), 6))
        assert len(tokens) == 6 and all(0 <= t < 512 for t in tokens)
        logits = decoder.logits(IDS)
        assert logits.shape == reference.shape and np.isfinite(logits).all()
        assert np.abs(logits - reference).max() < 1.0  # quantized, not broken


def test_onnx_adapter_gives_the_merged_models_logits(tiny_model_dir: Path, lora_base: Path, tmp_path: Path) -> None:
    adapter = _lora_adapter(tiny_model_dir, tmp_path / "lora")
    file = tmp_path / "task.onnx_adapter"
    params = write_onnx_adapter(adapter, file)
    assert params and all(p.startswith("lora.model.layers.") for p in params)
    merged = PeftModel.from_pretrained(_base(tiny_model_dir), adapter).merge_and_unload().eval()
    with torch.no_grad():
        expected = merged(torch.from_numpy(IDS)).logits.numpy()
        base_expected = _base(tiny_model_dir)(torch.from_numpy(IDS)).logits.numpy()
    decoder = Decoder(lora_base, threads=1)
    decoder.load_adapter("task", file)
    assert np.abs(decoder.logits(IDS, adapter="task") - expected).max() < 1e-3
    # no adapter active: exactly the base, from the same file
    assert np.abs(decoder.logits(IDS) - base_expected).max() < 1e-3
    assert np.abs(expected - base_expected).max() > 0.1  # the adapter really changes the model
    # the quantized multi-LoRA base keeps its LoRA inputs in fp32 and still applies the adapter
    int4 = quantize_int4(lora_base, tmp_path / "lora_int4.onnx", block_size=16)
    q = Decoder(int4, threads=1)
    assert set(q.lora_inputs) == set(decoder.lora_inputs)
    q.load_adapter("task", file)
    assert np.abs(q.logits(IDS, adapter="task") - q.logits(IDS)).max() > 0.1


def test_adapter_for_a_subset_of_modules_and_bad_adapters(tiny_model_dir: Path, lora_base: Path,
                                                          tmp_path: Path) -> None:
    subset = _lora_adapter(tiny_model_dir, tmp_path / "qv", targets=["q_proj", "v_proj"])
    write_onnx_adapter(subset, tmp_path / "qv.onnx_adapter")
    decoder = Decoder(lora_base, threads=1)
    decoder.load_adapter("qv", tmp_path / "qv.onnx_adapter")
    merged = PeftModel.from_pretrained(_base(tiny_model_dir), subset).merge_and_unload().eval()
    with torch.no_grad():
        expected = merged(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(decoder.logits(IDS, adapter="qv") - expected).max() < 1e-3
    with pytest.raises(LoraExportError, match="DoRA"):
        lora_factors(_lora_adapter(tiny_model_dir, tmp_path / "dora", dora=True))
    with pytest.raises(KeyError, match="not loaded"):
        decoder.logits(IDS, adapter="missing")
    plain = Decoder(Path(str(lora_base).replace("lora_base", "fp32/model")), threads=1)
    with pytest.raises(ValueError, match="multi-LoRA base"):
        plain.load_adapter("qv", tmp_path / "qv.onnx_adapter")


@pytest.mark.parametrize("kind", ["prefix", "prompt", "ptuning"])
def test_kv_prefix_gives_the_peft_models_greedy_tokens(kind: str, tiny_model_dir: Path, onnx_dir: Path,
                                                       tmp_path: Path) -> None:
    config = {"prefix": PrefixTuningConfig(num_virtual_tokens=5, task_type=TaskType.CAUSAL_LM),
              "prompt": PromptTuningConfig(num_virtual_tokens=5, task_type=TaskType.CAUSAL_LM),
              "ptuning": PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16,
                                             task_type=TaskType.CAUSAL_LM)}[kind]
    torch.manual_seed(2)
    model = get_peft_model(_base(tiny_model_dir), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=1.0)
    model.save_pretrained(tmp_path / kind)
    peft_model = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / kind).eval()
    prompt = torch.from_numpy(IDS)
    with torch.no_grad():
        expected = peft_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                       min_new_tokens=8, do_sample=False, pad_token_id=0)[0, -8:].tolist()
        expected_logits = peft_model(input_ids=prompt).logits[0, -IDS.shape[1]:].numpy()
        plain_logits = _base(tiny_model_dir)(input_ids=prompt).logits[0].numpy()
    prefix = adapter_prefix(tmp_path / kind, tiny_model_dir)
    assert prefix.length == 5
    prefix.save(tmp_path / f"{kind}.npz")
    decoder = Decoder(onnx_dir / "model.onnx", threads=1)
    loaded = Prefix.load(tmp_path / f"{kind}.npz")
    assert list(decoder.stream(IDS[0].tolist(), 8, prefix=loaded)) == expected
    got_logits = decoder.logits(IDS, prefix=loaded)[0]
    assert np.abs(got_logits - expected_logits).max() < 1e-3
    assert np.abs(expected_logits - plain_logits).max() > 0.05  # the virtual tokens matter, so the test can tell


def test_batched_generation_matches_one_at_a_time(onnx_dir: Path) -> None:
    decoder = Decoder(onnx_dir / "model.onnx", threads=1)
    prompts = [[3, 70, 140], [5, 9, 200, 300, 17, 44]]
    batch = decoder.generate_batch(prompts, 6, pad_id=0)
    assert batch == [list(decoder.stream(p, 6)) for p in prompts]


def test_a_prefix_of_the_wrong_shape_is_refused(onnx_dir: Path) -> None:
    decoder = Decoder(onnx_dir / "model.onnx", threads=1)
    wrong = Prefix([np.zeros((decoder.kv_heads, 3, decoder.head_dim + 1), np.float32)] * decoder.layers,
                   [np.zeros((decoder.kv_heads, 3, decoder.head_dim + 1), np.float32)] * decoder.layers)
    with pytest.raises(ValueError, match="does not fit"):
        list(decoder.stream([1, 2, 3], 2, prefix=wrong))


def test_lora_factors_are_transposed_with_the_scaling_folded_into_b(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    adapter = _lora_adapter(tiny_model_dir, tmp_path / "lora")
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    factors = lora_factors(adapter)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(factors["lora.model.layers.0.self_attn.q_proj.A"], raw[f"{prefix}.lora_A.weight"].T)
    np.testing.assert_allclose(factors["lora.model.layers.0.self_attn.q_proj.B"],
                               raw[f"{prefix}.lora_B.weight"].T * (8 / 4))  # alpha / r
