"""PIR, parameter-importance ranking: train only the top-k most important individual weights.

1. Score every weight of the chosen modules (``pir.target_modules``) by a gradient-based importance
   accumulated over ``pir.calibration_batches`` training batches:
     - ``taylor`` (default): first-order Taylor estimate of the loss change if the weight moved,
       ``sum_batches |g * w|``. Cost: one forward + backward per calibration batch.
     - ``fisher``: diagonal empirical Fisher information ``sum_batches g**2``. Same cost as taylor.
     - ``forest``: a scikit-learn random forest ranks *modules*, then taylor picks weights inside
       the modules it keeps. Features per module: gradient and weight statistics, depth, module
       type. Target: the measured loss drop of a small gradient step on that module alone, probed
       on a sample of modules (``pir.forest_probes``); the forest predicts it for the rest and the
       top ``pir.forest_keep`` share of modules stay eligible. Cost: taylor's, plus one forward per
       probed module and a forest fit (well under a second).
2. Keep the top ``pir.k`` share of all the chosen modules' weights, globally across layers (a layer
   that matters more gets more of the budget), and train only those: each chosen linear layer is
   wrapped so its effective weight is ``W + scatter(indices, values)`` with ``values`` trainable
   and ``W`` frozen.
3. Save the sparse delta in safetensors: ``<module>.indices`` (flat positions in the weight,
   int32 or int64) and ``<module>.values`` (fp32) in ``sparse_delta.safetensors``, described by
   ``sparse_delta_config.json``. Merging adds the values into the weights in place, exactly.

PEFT's SHiRA stores sparse deltas too, but fixes the count per layer at ``r * (in + out)``; a
global top-k gives each layer a different count, so edgetune keeps its own (simple) format.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import distributed
from pipeline.adapter_spec import (
    SPARSE_DELTA_CONFIG,
    SPARSE_DELTA_FORMAT,
    SPARSE_DELTA_WEIGHTS,
    spec_from_files,
)
from pipeline.device import to_model
from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from pipeline.config import Config

log = logging.getLogger(__name__)


def _delta_linear_class():
    import torch
    import torch.nn.functional as F

    class SparseDeltaLinear(torch.nn.Module):
        """A frozen linear layer plus trainable values at fixed flat positions of its weight."""

        def __init__(self, base_layer: torch.nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None):
            super().__init__()
            self.base_layer = base_layer
            self.register_buffer("indices", indices.to(torch.int64).to(base_layer.weight.device))
            init = torch.zeros(indices.numel(), dtype=base_layer.weight.dtype) if values is None else values
            self.values = torch.nn.Parameter(init.to(base_layer.weight.dtype).to(base_layer.weight.device).clone())

        def effective_weight(self) -> torch.Tensor:
            w = self.base_layer.weight
            return w.reshape(-1).index_add(0, self.indices, self.values).view_as(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.effective_weight(), self.base_layer.bias)

    return SparseDeltaLinear


_CLASS: Any = None


def delta_class() -> type:
    """The ``SparseDeltaLinear`` module class, built on first use so importing the registry stays torch-free."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _delta_linear_class()
    return _CLASS


def target_linears(model: PreTrainedModel, target: str | list[str]) -> dict[str, torch.nn.Linear]:
    """The linear layers PIR may choose weights from: ``all-linear`` (every ``nn.Linear`` except the
    output head) or those whose name ends with one of ``target``'s suffixes. Ordered as in the model."""
    import torch

    head = model.get_output_embeddings()
    found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    if target != "all-linear":
        suffixes = [target] if isinstance(target, str) else list(target)
        found = {n: m for n, m in found.items() if any(n == s or n.endswith("." + s) for s in suffixes)}
    if not found:
        from pipeline.errors import ConfigError

        raise ConfigError(f"pir.target_modules {target!r} matches no linear layer of the base; use all-linear or "
                          "suffixes such as [q_proj, v_proj]")
    return found


def _calibration_batches(data: list[dict], cfg: Config, pad_id: int) -> list[dict]:
    """``pir.calibration_batches`` training batches in a seeded random order (one more for forest probes)."""
    import torch

    from pipeline.data import collate_for_training

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    size = cfg.tune.batch_size
    n = cfg.pir.calibration_batches + (1 if cfg.pir.scorer == "forest" else 0)
    batches = [[data[i] for i in order[s:s + size]] for s in range(0, len(order), size)][:n]
    return [collate_for_training(b, pad_id=pad_id) for b in batches if b]


def score_weights(model: PreTrainedModel, modules: dict[str, torch.nn.Linear], batches: list[dict],
                  kind: str, keep_grads: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-weight importance (``taylor`` or ``fisher``) summed over ``batches``, and (``keep_grads``:
    the forest needs them) the summed gradients, else an empty dict: they cost another copy of the weights."""
    import torch
    from tqdm.auto import tqdm

    model.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    scores = {n: torch.zeros_like(m.weight) for n, m in modules.items()}
    grads = {n: torch.zeros_like(m.weight) for n, m in modules.items()} if keep_grads else {}
    for batch in tqdm(batches, desc=f"pir: {kind} scores", unit="batch", leave=False):
        model(**to_model(batch, model)).loss.backward()  # on the device it trains on
        for n, m in modules.items():
            g = m.weight.grad
            scores[n] += (g * m.weight.detach()).abs() if kind == "taylor" else g.square()
            if keep_grads:
                grads[n] += g
            m.weight.grad = None
    for m in modules.values():
        m.weight.requires_grad_(False)
    return scores, grads


def forest_module_ranking(model: PreTrainedModel, modules: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor],
                          grads: dict[str, torch.Tensor], probe_batch: dict, cfg: Config) -> list[str]:
    """Module names, most promising first, as a random forest predicts from probes on a sample of modules.

    Probe: move one module's weight a small normalised step down its gradient and measure how much
    the loss on a held-out calibration batch drops; the forest learns that drop from the module's
    features and predicts it for the modules that were not probed.
    """
    import numpy as np
    import torch
    from sklearn.ensemble import RandomForestRegressor
    from tqdm.auto import tqdm

    names = list(modules)
    n_layers = max(1, len(getattr(getattr(model, "model", model), "layers", [])) or 1)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})

    def depth(name: str) -> float:
        parts = [p for p in name.split(".") if p.isdigit()]
        return int(parts[0]) / n_layers if parts else 0.0

    features = []
    for n in names:
        w, g, s = modules[n].weight.detach(), grads[n], scores[n]
        onehot = [float(n.rsplit(".", 1)[-1] == k) for k in kinds]
        features.append([g.abs().mean().item(), g.std().item(), w.abs().mean().item(), w.std().item(),
                         s.mean().item(), s.max().item(), float(np.log(w.numel())), depth(n), *onehot])
    x = np.array(features)
    rng = np.random.default_rng(cfg.seed)
    n_probe = min(len(names), max(4, round(cfg.pir.forest_probes * len(names))))
    probe_batch = to_model(probe_batch, model)
    probed = sorted(rng.choice(len(names), size=n_probe, replace=False).tolist())
    with torch.no_grad():
        reference = model(**probe_batch).loss.item()
        drops = []
        for i in tqdm(probed, desc="pir: forest probes", unit="module", leave=False):
            w, g = modules[names[i]].weight, grads[names[i]]
            step = 0.01 * w.norm() / g.norm().clamp(min=1e-12) * g  # a 1% move down the gradient
            w -= step
            drops.append(reference - model(**probe_batch).loss.item())
            w += step
    forest = RandomForestRegressor(n_estimators=200, random_state=cfg.seed).fit(x[probed], np.array(drops))
    predicted = forest.predict(x)
    predicted[probed] = drops  # measured beats predicted where we have it
    return [names[i] for i in np.argsort(-predicted, kind="stable")]


def select_top_k(scores: dict[str, torch.Tensor], k: float, budget_of: int) -> dict[str, torch.Tensor]:
    """Flat indices of the globally highest-scoring weights: ``floor(k * budget_of)`` of them (at least 1),
    chosen across all of ``scores``' modules together. Returns sorted int64 indices per module (possibly empty)."""
    import torch

    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    n = max(1, min(int(k * budget_of), flat.numel()))
    top = torch.topk(flat, n, sorted=False).indices.sort().values
    bounds = torch.tensor([0, *torch.tensor([s.numel() for s in scores.values()]).cumsum(0).tolist()],
                          device=top.device)
    out = {}
    for i, name in enumerate(scores):
        lo, hi = torch.searchsorted(top, bounds[i]), torch.searchsorted(top, bounds[i + 1])
        out[name] = top[lo:hi] - bounds[i]
    return out


def selection_sha256(selection: dict[str, torch.Tensor]) -> str:
    """A short digest (16 hex digits) of a selection: module names and their indices, in order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, indices in selection.items():
        h.update(name.encode())
        h.update(indices.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def attach(model: PreTrainedModel, selection: dict[str, torch.Tensor],
           values: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """Wrap each selected linear layer with a sparse delta; only the delta values are trainable."""
    model.requires_grad_(False)
    cls = delta_class()
    for name, indices in selection.items():
        if indices.numel() == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(getattr(parent, child), indices, None if values is None else values[name]))
    return model


def delta_layers(model: PreTrainedModel) -> dict[str, Any]:
    """The sparse-delta wrappers in ``model`` by module name (empty: not a PIR model)."""
    cls = _CLASS
    return {} if cls is None else {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def apply_pir(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Score, select the global top-k weights of the chosen modules, and make only those trainable.

    Without ``data`` (``edgetune methods`` counting parameters) weights are ranked by magnitude |w|:
    the count and layout are the same, only the choice differs.
    """
    from pipeline.models import load_tokenizer

    p = cfg.pir
    modules = target_linears(model, p.target_modules)
    eligible = sum(m.weight.numel() for m in modules.values())
    started = time.perf_counter()
    if data is None:
        scores = {n: m.weight.detach().abs() for n, m in modules.items()}
        scorer, candidates = "magnitude", scores
    else:
        pad_id = load_tokenizer(model.name_or_path).pad_token_id
        batches = _calibration_batches(data, cfg, pad_id)
        calib = batches[:p.calibration_batches]
        kind = "fisher" if p.scorer == "fisher" else "taylor"
        scores, grads = score_weights(model, modules, calib, kind, keep_grads=p.scorer == "forest")
        scorer, candidates = p.scorer, scores
        if p.scorer == "forest":
            probe = batches[-1] if len(batches) > len(calib) else calib[-1]
            ranked = forest_module_ranking(model, modules, scores, grads, probe, cfg)
            keep = max(1, round(p.forest_keep * len(ranked)))
            # the kept modules must hold at least the budget, or top-k could not be filled from them
            while sum(modules[n].weight.numel() for n in ranked[:keep]) < p.k * eligible:
                keep += 1
            candidates = {n: scores[n] for n in modules if n in set(ranked[:keep])}
            log.info("pir: the forest keeps %d of %d modules eligible; top: %s", keep, len(ranked), ranked[:3])
        del grads
    selection = select_top_k(candidates, p.k, eligible)
    # Every rank scored its own copy, but they train one model: all take rank 0's choice (moved to the
    # CPU first, or a receiving rank would unpickle it onto the sender's GPU).
    own = selection_sha256(selection)
    selection = distributed.broadcast_object({n: i.cpu() for n, i in selection.items()})
    log.info("pir: selection sha256 %s on rank %d of %d (own choice %s)", selection_sha256(selection),
             distributed.rank(), distributed.world_size(), own)
    seconds = time.perf_counter() - started
    selected = sum(int(i.numel()) for i in selection.values())
    log.info("pir: %s scorer chose %d of %d weights (%.3f%%) in %d of %d modules, %.1f s", scorer, selected,
             eligible, 100 * selected / eligible, sum(1 for i in selection.values() if i.numel()), len(modules), seconds)
    model = attach(model, selection)
    model.pir_info = {"scorer": scorer, "k": p.k, "target_modules": p.target_modules, "eligible": eligible,
                      "selected": selected, "scoring_seconds": round(seconds, 2),
                      "calibration_batches": p.calibration_batches if data is not None else 0,
                      "shapes": {n: list(m.weight.shape) for n, m in modules.items()}}
    return model


def save_sparse_delta(model: PreTrainedModel, out: Path) -> None:
    """Write ``model``'s sparse delta (indices + values per module, safetensors) and its config."""
    import torch
    from safetensors.torch import save_file

    layers = delta_layers(model)
    tensors = {}
    for name, layer in layers.items():
        numel = layer.base_layer.weight.numel()
        tensors[f"{name}.indices"] = layer.indices.to(torch.int32 if numel < 2**31 else torch.int64).cpu().contiguous()
        tensors[f"{name}.values"] = layer.values.detach().float().cpu().contiguous()
    save_file(tensors, str(out / SPARSE_DELTA_WEIGHTS), metadata={"format": SPARSE_DELTA_FORMAT, "version": "1"})
    info = dict(getattr(model, "pir_info", {}))
    shapes = info.pop("shapes", {n: list(m.base_layer.weight.shape) for n, m in layers.items()})
    config = {"format": SPARSE_DELTA_FORMAT, "version": 1, "method": "pir", "base_model_name_or_path": model.name_or_path,
              **info, "selected_share": info.get("selected", 0) / max(info.get("eligible", 1), 1),
              "modules": {n: {"shape": shapes[n], "selected": int(layers[n].indices.numel()) if n in layers else 0}
                          for n in shapes}}
    (out / SPARSE_DELTA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_sparse_delta(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """Attach the sparse delta saved in ``folder`` to ``model`` (unmerged), checking it fits the model."""
    from safetensors import safe_open

    from pipeline.errors import EdgetuneError

    if spec_from_files(folder).kind != "pir":  # raises AdapterSpecError for a malformed sparse-delta config
        raise EdgetuneError(f"{folder}: no {SPARSE_DELTA_CONFIG}; it is not a sparse delta")
    selection, values = {}, {}
    with safe_open(str(Path(folder) / SPARSE_DELTA_WEIGHTS), framework="pt") as f:
        for name in {k.rsplit(".", 1)[0] for k in f.keys()}:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise EdgetuneError(f"{folder}: the sparse delta targets {name!r}, which this base does not have; "
                                    "it was trained on another model") from None
            idx, val = f.get_tensor(f"{name}.indices").long(), f.get_tensor(f"{name}.values")
            if idx.shape != val.shape or (idx.numel() and (idx.min() < 0 or idx.max() >= layer.weight.numel())):
                raise EdgetuneError(f"{folder}: the sparse delta of {name!r} does not fit its weight "
                                    f"{tuple(layer.weight.shape)}; it was trained on another model")
            selection[name], values[name] = idx, val
    return attach(model, selection, values)


def merge_sparse_delta(model: PreTrainedModel) -> PreTrainedModel:
    """Add every sparse delta into its weight in place and unwrap the layers; returns the plain model."""
    import torch

    with torch.no_grad():
        for name, layer in delta_layers(model).items():
            base = layer.base_layer
            base.weight.reshape(-1).index_add_(0, layer.indices, layer.values.to(base.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model


register(Method(
    name="pir",
    description="Parameter-importance ranking: trains only the top-k (1%) weights by gradient importance; "
                "sparse delta, mergeable.",
    mergeable=True,
    apply=apply_pir,
    learning_rate=1e-3,
    save=save_sparse_delta,
))
