"""ULMFiT's three ingredients on the tiny model: layer groups, unfreezing order, rates and schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import tune
from pipeline.config import load_config
from pipeline.methods.ulmfit import layer_groups, phase_of, stlr
from pipeline.models import load_model


def test_groups_cover_every_parameter_once_top_first(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    groups = layer_groups(model, 2)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    top = {id(p) for p in groups[0]}
    assert id(model.lm_head.weight) in top and id(model.model.layers[1].mlp.down_proj.weight) in top
    assert id(model.model.layers[0].mlp.down_proj.weight) in {id(p) for p in groups[1]}


def test_slanted_triangular_schedule_and_phases() -> None:
    rates = [stlr(s, 100, 0.1, 32) for s in range(100)]
    assert rates[0] == pytest.approx(1 / 32) and max(rates) == pytest.approx(1.0) and rates.index(1.0) == 10
    assert all(a < b for a, b in zip(rates[:10], rates[1:11])) and all(a > b for a, b in zip(rates[10:-1], rates[11:]))
    assert [phase_of(s, 8, 4) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_training_unfreezes_top_down_with_discriminative_rates(tmp_path: Path, tiny_model_dir: Path,
                                                               monkeypatch) -> None:
    from transformers import Trainer

    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"out_dir={tmp_path}", "method=ulmfit",
                                            "ulmfit.phases=2", "tune.max_steps=4", "tune.learning_rate=1e-2"])
    # Per optimizer step, as it begins: the top and bottom weights, whether AdamW holds state for the
    # bottom one, and the groups' rates. (Every group is requires_grad throughout, for DDP's sake: a
    # group not yet unfrozen is recognised by not moving and having no optimizer state.)
    seen: list[tuple[torch.Tensor, torch.Tensor, bool, list[float]]] = []
    original = Trainer.training_step

    def record(self, model, *args, **kwargs):
        layers = self.model.model.layers
        top, bottom = layers[1].mlp.up_proj.weight, layers[0].mlp.up_proj.weight
        seen.append((top.detach().clone(), bottom.detach().clone(), bool(self.optimizer.state.get(bottom)),
                     [g["lr"] for g in self.optimizer.param_groups]))
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", record)
    out = tune.run(cfg, cfg.task("sentiment"))
    tops, bottoms, bottom_state, _ = zip(*seen)
    assert len(seen) == 4 and all(not torch.equal(a, b) for a, b in zip(tops, tops[1:]))  # top: every step
    # phase 0 (steps 0, 1): the bottom group is frozen (unchanged, no AdamW state); phase 1 (steps 2, 3) trains it
    assert torch.equal(bottoms[0], bottoms[1]) and torch.equal(bottoms[1], bottoms[2])
    assert not torch.equal(bottoms[2], bottoms[3]) and bottom_state == (False, False, False, True)
    for _, _, _, (top_lr, bottom_lr) in seen:
        assert bottom_lr == pytest.approx(top_lr / 2.6)
    base, tuned = load_model(tiny_model_dir), load_model(out)  # a whole model: both groups moved
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(base.model.layers[1].mlp.up_proj.weight, tuned.model.layers[1].mlp.up_proj.weight)
