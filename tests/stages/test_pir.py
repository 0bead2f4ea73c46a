"""PIR on the tiny model: global top-k selection, every scorer, the saved sparse delta, exact merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.config import load_config
from pipeline.data import encode_all, load_examples
from pipeline.errors import EdgetuneError
from pipeline.methods.pir import (
    apply_pir,
    delta_layers,
    load_sparse_delta,
    merge_sparse_delta,
    save_sparse_delta,
    select_top_k,
    target_linears,
)
from pipeline.models import load_model, load_tokenizer


def _rows(tokenizer) -> list[dict]:
    return encode_all(tokenizer, load_examples("data/tasks/sentiment/train.jsonl")[:40], 192, "train")


def test_top_k_is_global_across_modules_not_per_layer() -> None:
    scores = {"a": torch.rand(10, 10), "b": torch.rand(10, 10) + 10.0}  # every weight of b outranks a
    chosen = select_top_k(scores, k=0.25, budget_of=200)
    assert chosen["a"].numel() == 0 and chosen["b"].numel() == 50  # all 50 from the module that matters
    mixed = {"a": torch.arange(100.0).view(10, 10), "b": torch.arange(100.0, 200.0).view(10, 10) - 50}
    chosen = select_top_k(mixed, k=0.3, budget_of=200)
    picked = torch.cat([mixed[n].reshape(-1)[i] for n, i in chosen.items()])
    rest = torch.cat([mixed[n].reshape(-1)[[j for j in range(100) if j not in set(i.tolist())]] for n, i in chosen.items()])
    assert picked.numel() == 60 and picked.min() >= rest.max()  # exactly the 60 best, from both modules


@pytest.mark.parametrize("scorer", ["taylor", "fisher", "forest"])
def test_each_scorer_trains_at_most_k_of_the_chosen_weights(scorer: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", "method=pir", f"pir.scorer={scorer}",
                                            "pir.k=0.01", "pir.calibration_batches=2", "pir.forest_keep=0.5"])
    tokenizer = load_tokenizer(tiny_model_dir)
    model = apply_pir(load_model(tiny_model_dir), cfg, data=_rows(tokenizer))
    assert model.pir_info["scorer"] == scorer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)

    save_sparse_delta(model, tmp_path)
    config = json.loads((tmp_path / "sparse_delta_config.json").read_text())
    eligible = sum(m["shape"][0] * m["shape"][1] for m in config["modules"].values())
    assert eligible == sum(m.weight.numel() for m in target_linears(load_model(tiny_model_dir), "all-linear").values())
    with safe_open(str(tmp_path / "sparse_delta.safetensors"), framework="pt") as f:
        indices = {k.rsplit(".", 1)[0]: f.get_tensor(k) for k in f.keys() if k.endswith(".indices")}
    stored = sum(i.numel() for i in indices.values())
    assert stored == int(0.01 * eligible) and stored <= 0.01 * eligible  # the saved delta itself is ≤ 1%
    for name, idx in indices.items():
        assert idx.unique().numel() == idx.numel() and 0 <= idx.min() and idx.max() < torch.Size(
            config["modules"][name]["shape"]).numel()
    if scorer == "forest":  # only the modules the forest kept may hold weights
        assert len(indices) <= round(0.5 * len(config["modules"]))


def test_merge_adds_exactly_the_delta_and_foreign_deltas_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", "method=pir", "pir.calibration_batches=1"])
    model = apply_pir(load_model(tiny_model_dir), cfg, data=_rows(load_tokenizer(tiny_model_dir)))
    with torch.no_grad():
        for layer in delta_layers(model).values():
            layer.values.normal_()
    save_sparse_delta(model, tmp_path)

    reloaded = load_sparse_delta(load_model(tiny_model_dir), tmp_path)
    expected = {}
    base = load_model(tiny_model_dir)
    for name, layer in delta_layers(reloaded).items():
        w = base.get_submodule(name).weight.detach().clone().reshape(-1)
        w[layer.indices] += layer.values.detach()
        expected[name] = w.view_as(layer.base_layer.weight)
    merged = merge_sparse_delta(reloaded)
    assert not delta_layers(merged)
    for name, w in expected.items():
        assert torch.equal(merged.get_submodule(name).weight, w)

    with safe_open(str(tmp_path / "sparse_delta.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith(".indices"))
    tensors[name] = tensors[name] + 10**7  # points outside the weight: trained on another model
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "sparse_delta.safetensors"))
    with pytest.raises(EdgetuneError, match="does not fit its weight"):
        load_sparse_delta(load_model(tiny_model_dir), tmp_path)


def test_unknown_target_modules_are_a_config_error(tiny_model_dir: Path) -> None:
    from pipeline.errors import ConfigError

    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", "method=pir", "pir.target_modules=[nope_proj]"])
    with pytest.raises(ConfigError, match="matches no linear layer"):
        apply_pir(load_model(tiny_model_dir), cfg)
