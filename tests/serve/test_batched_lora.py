"""The two-product mixed-adapter LoRA forward equals PEFT's per-adapter loop."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models import load_model
from serve.batched_lora import BatchedLora
from tests.serve.adapter_kinds import build_adapter


def _adapters(base: Path, root: Path) -> None:
    from peft import LoraConfig, get_peft_model

    # different ranks and different target modules: the concatenation must line each one up
    for i, (name, targets) in enumerate([("a", "all-linear"), ("b", "all-linear"), ("c", ["q_proj"])]):
        torch.manual_seed(i + 1)
        model = get_peft_model(load_model(base), LoraConfig(r=4 + i, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.save_pretrained(root / name)


def _load(base: Path, root: Path, names: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), root / names[0], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(str(root / n), adapter_name=n)
    return model


def test_matches_peft_for_mixed_rows_and_follows_loads_and_deletes(tiny_model_dir: Path, tmp_path: Path) -> None:
    _adapters(tiny_model_dir, tmp_path)
    reference, fast = _load(tiny_model_dir, tmp_path, "abc"), _load(tiny_model_dir, tmp_path, "abc")
    batched = BatchedLora(fast, torch.device("cpu"))
    x = torch.randint(0, 200, (5, 7))
    rows = ["a", "__base__", "b", "c", "a"]
    with torch.no_grad():
        expected = reference(input_ids=x, adapter_names=rows).logits
        assert (fast(input_ids=x, adapter_names=rows).logits - expected).abs().max() < 1e-5
        assert (expected[0] - expected[1]).abs().max() > 1e-2  # the adapters do change the output

        for model in (reference, fast):
            model.delete_adapter("b")
        batched.refresh()
        rows = ["a", "c", "__base__"]
        assert torch.allclose(fast(input_ids=x[:3], adapter_names=rows).logits,
                              reference(input_ids=x[:3], adapter_names=rows).logits, atol=1e-5)


def test_dora_rows_mix_with_lora_and_base_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PEFT cannot put a DoRA adapter in a mixed batch; here each row equals PEFT's DoRA model run alone."""
    from peft import PeftModel

    _adapters(tiny_model_dir, tmp_path)
    build_adapter("dora", tiny_model_dir, tmp_path / "d")  # a magnitude that differs from the base weight's norm

    fast = _load(tiny_model_dir, tmp_path, "ad")
    BatchedLora(fast, torch.device("cpu"))
    x = torch.randint(0, 200, (3, 7))
    rows = ["d", "a", "__base__"]
    with torch.no_grad():
        got = fast(input_ids=x, adapter_names=rows).logits
        alone_d = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "d").eval()(input_ids=x[:1]).logits
        alone_a = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "a").eval()(input_ids=x[1:2]).logits
        base = load_model(tiny_model_dir)(input_ids=x[2:]).logits
    assert (got[0] - alone_d[0]).abs().max() < 1e-4 and (alone_d[0] - alone_a[0]).abs().max() > 1e-2
    assert (got[1] - alone_a[0]).abs().max() < 1e-4 and (got[2] - base[0]).abs().max() < 1e-4


def test_rows_of_held_adapters_mix_with_peft_s_own_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A layer whose PEFT adapter the two-product path cannot take (a LoRA bias) runs PEFT's own loop, and the
    rows of adapters held by ``BatchedLora.add`` still get their update there (``BatchedLora.rows``)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    _adapters(tiny_model_dir, tmp_path)
    torch.manual_seed(9)
    biased = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", lora_bias=True,
                                                                   init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in biased.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    biased.save_pretrained(tmp_path / "p")
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "p", adapter_name="p").eval()
    batched = BatchedLora(model, torch.device("cpu"))
    held = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "a").eval()
    factors = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            source = held.base_model.model.get_submodule(name)
            factors[layer] = (source.lora_A["default"].weight.detach(),
                              source.lora_B["default"].weight.detach() * source.scaling["default"])
    batched.add("held", factors)
    batched.refresh()
    x = torch.randint(0, 200, (3, 7))
    with torch.no_grad():
        batched.rows = ("p", "held", "__base__")
        try:
            got = model(input_ids=x).logits
        finally:
            batched.rows = None
        alone_p = model(input_ids=x[:1], adapter_names=["p"]).logits
        alone_held = held(input_ids=x[1:2]).logits
        base = load_model(tiny_model_dir)(input_ids=x[2:]).logits
    assert (alone_held[0] - base[0]).abs().max() > 1e-2  # the held adapter changes the output
    assert (got[0] - alone_p[0]).abs().max() < 1e-4
    assert (got[1] - alone_held[0]).abs().max() < 1e-4 and (got[2] - base[0]).abs().max() < 1e-4
