"""ULMFiT (Howard & Ruder, 2018) applied to a decoder LLM: the whole model trains, carefully.

- Layer groups: the transformer blocks are split into ``ulmfit.phases`` groups of consecutive
  layers. Group 0, the top, also holds the final norm and the output head (and so the token
  embedding when the two are tied, as in SmolLM2); the bottom group holds the embedding otherwise.
- Gradual unfreezing: training steps are split evenly into phases; phase ``p`` trains groups
  ``0..p`` (top group first, one more group per phase). Every parameter stays ``requires_grad``
  throughout, because DDP syncs only the parameters that were trainable when it wrapped the model
  (unfreezing by ``requires_grad`` later would let each rank train those groups on its own data).
  A group not yet unfrozen instead has its gradient zeroed as it is computed (so gradient clipping
  sees none) and dropped before each optimizer step (so AdamW leaves it and its state alone):
  the same updates as freezing, on one process or many, at the cost of a full backward pass.
- Discriminative learning rates: group ``g`` learns at ``lr / lr_decay**g`` (2.6 by default),
  one optimizer parameter group each.
- Slanted triangular learning rates: a short linear rise (``cut_frac`` of the steps) to the peak,
  then a long linear decay to ``1/ratio`` of it. This replaces ``tune.lr_scheduler`` and
  ``tune.warmup_steps``, which do not apply to this method.

The result is a whole model, so merge passes it through like full fine-tuning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, TrainingPlan, register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from pipeline.config import Config


def layer_groups(model: PreTrainedModel, n_groups: int) -> list[list[torch.nn.Parameter]]:
    """Parameters split into ``n_groups`` groups, top (output side) first; every parameter once."""
    layers = list(model.model.layers)
    n_groups = max(1, min(n_groups, len(layers)))
    bounds = [round(i * len(layers) / n_groups) for i in range(n_groups + 1)]
    # bounds count from the bottom; group 0 is the top chunk
    chunks = [layers[bounds[i]:bounds[i + 1]] for i in range(n_groups)][::-1]
    groups: list[list] = [[p for layer in chunk for p in layer.parameters()] for chunk in chunks]
    seen = {id(p) for g in groups for p in g}
    top_extra = [p for p in [*model.model.norm.parameters(), *model.get_output_embeddings().parameters()]
                 if id(p) not in seen]
    groups[0] = top_extra + groups[0]
    seen |= {id(p) for p in top_extra}
    groups[-1] += [p for p in model.parameters() if id(p) not in seen]  # embeddings (when untied) and the rest
    return groups


def stlr(step: int, total: int, cut_frac: float, ratio: float) -> float:
    """Slanted triangular multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    cut = max(1, int(total * cut_frac))
    p = step / cut if step < cut else 1 - (step - cut) / max(1, total - cut)
    return (1 + max(0.0, p) * (ratio - 1)) / ratio


def phase_of(step: int, total: int, phases: int) -> int:
    """Which unfreezing phase (0-based) a 0-based ``step`` belongs to."""
    return min(phases - 1, step * phases // max(1, total))


def apply_ulmfit(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Make every parameter trainable: the whole model trains (which groups learn in which phase is the
    training plan's job, see the module docstring)."""
    return model.requires_grad_(True)


def plan_ulmfit(model: PreTrainedModel, cfg: Config, learning_rate: float, steps: int) -> TrainingPlan:
    """AdamW with one parameter group per layer group (discriminative rates), STLR, unfreezing callback."""
    import torch
    from transformers import TrainerCallback

    u = cfg.ulmfit
    groups = layer_groups(model, u.phases)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": learning_rate / u.lr_decay**g} for g, params in enumerate(groups)],
        weight_decay=cfg.tune.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: stlr(step, steps, u.cut_frac, u.ratio))
    phase = [0]  # the current phase, read by the gradient hooks

    def hook(group: int):
        return lambda grad: torch.zeros_like(grad) if group > phase[0] else None  # None: keep the gradient

    for g, params in enumerate(groups[1:], start=1):  # group 0 trains from the first step
        for p in params:
            p.register_hook(hook(g))

    class GradualUnfreezing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            phase[0] = phase_of(state.global_step, steps, len(groups))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # No gradient (not a zero one): AdamW skips the parameter, its moments, step count and decay.
            for params in groups[phase[0] + 1:]:
                for p in params:
                    p.grad = None

    return TrainingPlan(optimizer=optimizer, scheduler=scheduler, callbacks=[GradualUnfreezing()])


register(Method(
    name="ulmfit",
    description="ULMFiT: gradual unfreezing top-down, discriminative rates (/2.6 per group), slanted triangular LR.",
    mergeable=True,
    apply=apply_ulmfit,
    learning_rate=1e-4,
    full_model=True,
    training_plan=plan_ulmfit,
))
