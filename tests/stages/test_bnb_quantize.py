"""bitsandbytes int8 / NF4 on the CPU: quantize, save, reload, generate, stay close to fp32, save memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exporters.bnb import FORMATS, bnb_config, load_quantized, quantize_to_dir, quantized_footprint_bytes

PROMPTS = [
    "the review was great",
    'order ship to city Oslo {"name": "Ada", "qty": 3} positive negative',
]

# Relative L2 error of the logits, ||q - ref|| / ||ref|| over the real (non-pad) positions.
# Top-1 agreement is useless on the tiny *random* model: with tied embeddings its argmax is
# essentially the input token, so even an unrelated random model agrees on ~95% of positions.
# The relative error does discriminate: an unrelated random model scores ~1.4, while int8 scores
# ~0.009 and NF4 ~0.10 (4-bit NormalFloat, error ~10% of the weight spread per layer, expected).
# The bounds leave 2.5-3.5x headroom and stay an order of magnitude below "unrelated".
MAX_REL_LOGIT_ERROR = {"int8": 0.03, "nf4": 0.25}
# Quantized Linear bytes / fp32 Linear bytes: int8 is 1 byte + a per-row fp32 scale (~0.25),
# NF4 is half a byte + double-quantized block scales (~0.14).
MAX_LINEAR_BYTES_RATIO = {"int8": 0.30, "nf4": 0.20}


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


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
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    fmt = request.param
    # A nested path that does not exist yet: quantize_to_dir must create it.
    out_dir = quantize_to_dir(tiny_model_dir, tmp_path_factory.mktemp("bnb") / "run" / fmt, fmt)
    return fmt, out_dir, load_quantized(out_dir)


def _linear_bytes(model: torch.nn.Module) -> int:
    # The transformer blocks' projections: what bitsandbytes quantizes (lm_head stays fp32, tied).
    layers = [
        m
        for name, m in model.named_modules()
        if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    ]
    assert layers
    return quantized_footprint_bytes(torch.nn.ModuleList(layers))


def test_checkpoint_layout(quantized, tiny_model_dir: Path):
    fmt, out_dir, _ = quantized
    assert (out_dir / "model.safetensors").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file()  # the fixture has them, so the copy must too
        assert (out_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    quant = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    if fmt == "int8":
        assert quant["load_in_8bit"] and not quant["load_in_4bit"]
    else:
        assert quant["load_in_4bit"] and not quant["load_in_8bit"]
        assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    # The tokenizer really loads from the quantized folder alone.
    assert AutoTokenizer.from_pretrained(out_dir).chat_template


def test_reload_is_quantized_and_generates(quantized, batch):
    import bitsandbytes as bnb

    fmt, _, model = quantized
    assert not model.training
    expected = bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].mlp.down_proj, expected)
    # Tied embeddings survive: lm_head stays the (unquantized, fp32) embedding matrix.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 5)
    assert (out[:, -5:] < model.config.vocab_size).all()


def test_logits_close_to_fp32(quantized, fp32_model, batch):
    fmt, _, model = quantized
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        ref = fp32_model(**batch).logits[real]
        got = model(**batch).logits[real].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < MAX_REL_LOGIT_ERROR[fmt], f"{fmt}: relative logit error {rel:.4f}"


def test_footprint_smaller_than_fp32(quantized, fp32_model):
    fmt, _, model = quantized
    ratio = _linear_bytes(model) / _linear_bytes(fp32_model)
    assert ratio < MAX_LINEAR_BYTES_RATIO[fmt], f"{fmt}: Linear bytes ratio {ratio:.3f}"
    assert quantized_footprint_bytes(model) < quantized_footprint_bytes(fp32_model)


def test_unknown_format_rejected(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="int8, nf4"):
        bnb_config("fp4")
    with pytest.raises(ValueError, match="int8, nf4"):
        quantize_to_dir(tiny_model_dir, tmp_path / "out", "int4")
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_load_rejects_unquantized_checkpoint(tiny_model_dir: Path):
    with pytest.raises(ValueError, match="not a bitsandbytes-quantized checkpoint"):
        load_quantized(tiny_model_dir)


def test_nf4_layers_the_cpu_kernel_cannot_pack_still_run(tmp_path: Path):
    # bitsandbytes' AVX512-BF16 CPU path repacks NF4 layers on the first no-grad forward and fails
    # on out_features % 32 != 0 (here k/v_proj: 1 kv head x 16) and in_features % 64 != 0 (here
    # down_proj: 96). load_quantized routes such layers to the generic path instead.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    model = load_quantized(quantize_to_dir(tmp_path / "src", tmp_path / "nf4", "nf4"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=0)
    assert out.shape == (1, 7)
