"""GGUF export on tiny models: every file read back matches PyTorch, adapters keep PEFT's scaling, the
4-bit blocks are GPTQ's codes bit for bit, unsupported families fail with a clear error, and the ``gguf``
target of the pipeline publishes only files that pass their gate."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from exporters.gguf import (
    GGUFExportError,
    load_gguf_model,
    modelfile,
    read_gguf,
    read_lora_gguf,
    write_lora_gguf,
    write_model_gguf,
)
from exporters.gptq import round_to_nearest
from pipeline.cli import main
from pipeline.errors import EXIT_FAILED_GATES
from tests.tiny_model import build_tiny_tokenizer

MESSAGES = [{"role": "user", "content": "the review was great"}]


def _family(kind: str, out: Path) -> Path:
    """A tiny random model of ``kind`` (hidden 64, 2 layers) with the tests' tokenizer, saved to ``out``."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = build_tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
        "mistral": (MistralConfig, MistralForCausalLM, {"tie_word_embeddings": False, "sliding_window": None}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True, "head_dim": 32}),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16}),
        "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common, **extra))
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_type_reads_back_as_the_pytorch_model(kind: str, tmp_path: Path) -> None:
    src = _family(kind, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        # the tolerances: f16 weights (the 1e-2), then 8-bit and 4-bit blocks of a random model
        for gguf_type, tolerance in (("f16", 1e-2), ("q8_0", 0.05), ("q4_1", 0.5)):
            path = write_model_gguf(model, tokenizer, tmp_path / f"{gguf_type}.gguf", gguf_type, name="tiny")
            back = load_gguf_model(path)
            got = back(ids).logits
            diff = float((got - ref).abs().max())
            # edgetune's one-parse reader is transformers' GGUF loader, weight for weight (the independent reading
            # of llama.cpp's layout the gates rely on)
            theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=back.config,
                                                          dtype=torch.float32)  # Qwen3: head_dim from the file
            ours = back.state_dict()
            assert ours.keys() == theirs.state_dict().keys()
            assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items()), f"{kind} {gguf_type}"
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
            if kind == "qwen3":  # transformers drops the file's key_length; the read-back keeps it (head_dim 16)
                config["head_dim"] = back.config.head_dim
            assert {k: v for k, v in back.config.to_dict().items() if k != "_name_or_path"} == \
                {k: v for k, v in config.items() if k != "_name_or_path"}
            # the one-parse reader sees what gguf-py's reader sees: every scalar and string, every tensor's bytes
            metadata, tensors = read_gguf(path)
            reader = gguf.GGUFReader(path)
            assert metadata == {k: f.contents() for k, f in reader.fields.items()
                                if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
            assert {t.name: (t.tensor_type, t.data.tobytes()) for t in reader.tensors} == \
                {name: (kind_, raw.tobytes()) for name, (kind_, raw) in tensors.items()}
            assert diff < tolerance, f"{kind} {gguf_type}: max |Δlogit| {diff:.3g}"
            assert diff > 0 or gguf_type == "f16"  # a quantized file that reads back bit-identical was not quantized
            assert not list(tmp_path.glob("*.partial"))

            # the tokenizer travels in the file: same ids for the chat prompt, the end-of-turn token, the template
            read = gguf.GGUFReader(path)
            fields = {k: f.contents() for k, f in read.fields.items() if not k.startswith("tokenizer.ggml.token")
                      and k != "tokenizer.ggml.merges"}
            assert fields["general.architecture"] == ("llama" if kind == "mistral" else kind)
            assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] \
                == tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert fields["tokenizer.chat_template"] == tokenizer.chat_template
            assert fields["tokenizer.ggml.pre"] == ("qwen2" if kind.startswith("qwen") else "gpt-2")
            back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            assert back(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"] == ids[0].tolist()
            types = {t.name: t.tensor_type.name for t in read.tensors}
            expected = {"f16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1"}[gguf_type]
            assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == expected
            assert types["blk.0.attn_norm.weight"] == "F32"
            assert types["token_embd.weight"] == ("F16" if gguf_type == "f16" else "Q8_0")


def test_q4_1_holds_the_given_4bit_blocks_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GPTQ's codes, scales and zero points go into Q4_1 unchanged (scales and minimums at f16), q/k rows in
    llama.cpp's rotary order: reading the file back gives the blocks' own dequantized weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            # shifted codes: not what round-to-nearest would pick, so a file that ignored them would differ
            q = round_to_nearest(module.weight.detach(), 32)
            blocks[name] = type(q)(np.clip(q.codes.astype(int) + 1, 0, 15).astype(np.uint8), q.scales, q.zeros)
    path = write_model_gguf(model, tokenizer, tmp_path / "q4.gguf", "q4_1", name="tiny", int4=blocks)
    back = dict(load_gguf_model(path).named_parameters())
    for name, q in blocks.items():
        want = q.dequantize()
        got = back[name + ".weight"].detach().numpy()
        # f16 scale and minimum: a few parts in 1e4 of the block's range
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max() + 1e-6, name


def test_lora_adapter_keeps_peft_s_scaling_and_runs_on_the_gguf_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Per-module ranks and alphas and rsLoRA are folded into lora_b: the file's B·A is PEFT's update exactly,
    and the f16 base + adapter gives the PEFT model's logits."""
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_rslora=True,
                   rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3}))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_lora_gguf(tmp_path / "adapter", base.config, tmp_path / "adapter.gguf", name="a")
    read = gguf.GGUFReader(path)
    assert read.fields["general.type"].contents() == "adapter" and read.fields["adapter.type"].contents() == "lora"

    updates = read_lora_gguf(path, base.config)
    modules = dict(peft_model.named_modules())
    assert len(updates) == 14  # 7 projections x 2 layers
    for name, (a, b) in updates.items():
        layer = modules[f"base_model.model.{name}"]
        want = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"])
        np.testing.assert_allclose(b @ a, want.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert updates["model.layers.0.self_attn.q_proj"][0].shape[0] == 4  # the rank pattern

    write_model_gguf(base, tokenizer, tmp_path / "base.gguf", "f16", name="base")
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref, plain = peft_model(input_ids=ids).logits, base(ids).logits
        got = load_gguf_model(tmp_path / "base.gguf", lora=path)(ids).logits
    assert float((got - ref).abs().max()) < 1e-2 < float((plain - ref).abs().max())


def test_adapters_without_a_gguf_form_and_other_families_fail_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(GGUFExportError, match="DoRA.*merged"):
        write_lora_gguf(tmp_path / "dora", base.config, tmp_path / "dora.gguf", name="d")
    assert not list(tmp_path.glob("*.gguf*"))
    for kind in ("gemma2", "phi3"):
        src = _family(kind, tmp_path / kind)
        model = AutoModelForCausalLM.from_pretrained(src)
        with pytest.raises(GGUFExportError, match=f"supports Llama.*Qwen3.*this model is {kind}.*convert_hf_to_gguf"):
            write_model_gguf(model, AutoTokenizer.from_pretrained(src), tmp_path / f"{kind}.gguf", "f16", name=kind)
        assert not list(tmp_path.glob(f"{kind}.gguf*"))
    # reading back something that is not a GGUF model file names the file
    (tmp_path / "model.safetensors.gguf").write_bytes(b"\x00" * 64)
    with pytest.raises(GGUFExportError, match="model.safetensors.gguf is not a little-endian GGUF"):
        load_gguf_model(tmp_path / "model.safetensors.gguf")
    whole = write_model_gguf(base, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "whole.gguf", "q8_0",
                             name="tiny").read_bytes()
    for cut in (len(whole) // 2, 300):  # in the weights, in the metadata
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(GGUFExportError, match="cut.gguf is truncated or damaged.*export it again"):
            load_gguf_model(tmp_path / "cut.gguf")


def test_modelfile_runs_the_chat_format_and_stops_at_end_of_turn(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = modelfile("../base.gguf", tokenizer, adapter_file="./adapter.gguf", max_tokens=16)
    lines = text.splitlines()
    assert lines[:2] == ["FROM ../base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0" in lines
    assert "PARAMETER num_predict 16" in lines
    assert 'SYSTEM """You are a helpful AI assistant."""' in lines  # the template's own default system turn
    assert "{{ range .Messages }}" in text.replace("{{- ", "{{ ") and "<|im_start|>assistant\n" in text


def _pipeline(base: Path, out: Path, *extra: str) -> int:
    sets = [f"base={base}", f"out_dir={out}", "quantize.formats=[]", "export.targets=[gguf]",
            "evaluate.artifacts=[adapter]", "tune.max_steps=2", *extra]
    return main(["pipeline", "--config", "configs/tiny.yaml", "--task", "sentiment",
                 *[x for s in sets for x in ("--set", s)]])


def test_gguf_target_publishes_only_files_that_pass_their_gate(tmp_path: Path, tiny_model_dir: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert _pipeline(tiny_model_dir, tmp_path) == 0
    run = tmp_path / "tiny" / "export"
    task = run / "gguf" / "sentiment"
    names = {p.name for p in task.iterdir()}
    assert names == {"model-f16.gguf", "model-q8_0.gguf", "model-q4_1.gguf", "adapter.gguf", "Modelfile",
                     "Modelfile.adapter", "manifest.json"}
    manifest = json.loads((task / "manifest.json").read_text())["metrics"]
    assert set(manifest["files"]) == {"model-f16.gguf", "model-q8_0.gguf", "model-q4_1.gguf", "adapter.gguf"}
    assert manifest["files"]["model-f16.gguf"]["max_abs_logit_diff"] < 1e-2
    assert (run / "gguf-base" / "model-q8_0.gguf").is_file()
    assert (task / "Modelfile.adapter").read_text().startswith("FROM ../../gguf-base/model-q8_0.gguf\n"
                                                               "ADAPTER ./adapter.gguf\n")
    assert (task / "Modelfile").read_text().startswith("FROM ./model-q4_1.gguf\n")
    # the shared base is the adapter's: an up-to-date re-run puts it back when it is gone
    import shutil

    shutil.rmtree(run / "gguf-base")
    assert _pipeline(tiny_model_dir, tmp_path) == 0
    assert (run / "gguf-base" / "model-q8_0.gguf").is_file()
    capsys.readouterr()

    # a gate f16 cannot pass: that file is not published, the others are, the run says "failed gates"
    assert _pipeline(tiny_model_dir, tmp_path, "export.gates.f16.max_abs_logit_diff=1e-12") == EXIT_FAILED_GATES
    assert "f16 fidelity gate failed" in capsys.readouterr().err
    assert not (task / "model-f16.gguf").exists() and (task / "model-q8_0.gguf").is_file()
    record = json.loads((run / "records" / "sentiment.json").read_text())
    assert set(record["failed"]) == {"gguf:model-f16.gguf"} and "gguf" in record["exported"]
    assert record["failed"]["gguf:model-f16.gguf"]["metrics"]["max_abs_logit_diff"] > 1e-12
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    # an up-to-date re-run reports the same failure
    assert _pipeline(tiny_model_dir, tmp_path, "export.gates.f16.max_abs_logit_diff=1e-12") == EXIT_FAILED_GATES

    # a family GGUF export does not write (Gemma2, Phi3): the target is skipped with the reason, the run goes on
    import exporters.gguf

    def unsupported(config):
        raise GGUFExportError("GGUF export supports Llama, SmolLM, Mistral, Qwen2 and Qwen3 ...; this model is gemma2")

    monkeypatch.setattr(exporters.gguf, "gguf_arch", unsupported)
    assert _pipeline(tiny_model_dir, tmp_path, "export.gguf_types=[q8_0]") == 0
    record = json.loads((run / "records" / "sentiment.json").read_text())
    assert "this model is gemma2" in record["skipped"]["gguf"] and not task.exists()

