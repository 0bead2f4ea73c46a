"""Every adapter kind the torch engine serves, built on a base with weights strong enough to change its
greedy answer, and a runner that serves them alone and all in one mixed batch (engine tests, CPU and GPU)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.models import load_model
from serve.adapters import inspect_adapter
from serve.engine import Engine, GenRequest

KINDS = ("lora", "dora", "ia3", "pir", "prompt", "ptuning", "prefix")
"""Every adapter kind the torch engine serves (LoRA and DoRA in the batched LoRA layer, IA3 and PIR through
row-wise hooks, prompt tuning, P-tuning and prefix tuning as virtual tokens at prefill)."""


def build_adapter(kind: str, base: Path, out: Path) -> Path:
    """Save a random adapter of ``kind`` for ``base`` in ``out`` (fixed seeds: the same weights every time)."""
    if kind in ("prompt", "ptuning", "prefix"):
        _prompt_learning(kind, base, out)
    elif kind in ("lora", "dora"):
        _lora(base, out, dora=kind == "dora")
    elif kind == "ia3":
        _ia3(base, out)
    elif kind == "pir":
        _pir(base, out)
    else:
        raise ValueError(f"no builder for adapter kind {kind!r}")
    return out


def _prompt_learning(kind: str, base: Path, out: Path) -> None:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(5)
    config = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "ptuning": PromptEncoderConfig}[kind](
        task_type="CAUSAL_LM", num_virtual_tokens=6)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():  # strong enough to steer a random tiny model
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 20.0 if kind != "ptuning" else 1.0)  # P-tuning's MLP multiplies its scale
    model.save_pretrained(out)


def _lora(base: Path, out: Path, dora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2 if dora else 1)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora,
                                                        init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
            if "magnitude" in n:
                p.mul_(1.5)  # a magnitude that differs from the base weight's norm
    model.save_pretrained(out)


def _ia3(base: Path, out: Path) -> None:
    from peft import IA3Config, get_peft_model

    torch.manual_seed(6)
    model = get_peft_model(load_model(base), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(1.0, 2.0)
    model.save_pretrained(out)


def _pir(base: Path, out: Path) -> None:
    from pipeline.config import load_config
    from pipeline.methods.pir import apply_pir, delta_layers, save_sparse_delta

    torch.manual_seed(6)
    model = apply_pir(load_model(base), load_config("configs/tiny.yaml", [f"base={base}", "pir.k=0.05"]))
    with torch.no_grad():
        for layer in delta_layers(model).values():
            layer.values.normal_(0, 3.0)
    out.mkdir(parents=True)
    save_sparse_delta(model, out)


@dataclass
class Row:
    """One request's greedy answer: its tokens and the logits (float32, on the CPU) each was picked from."""

    adapter: str | None
    prompt: str
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def load_every_kind(engine: Engine, root: Path, kinds: Sequence[str] = KINDS) -> None:
    """Load the adapters under ``root`` (one folder per kind, named after it) into ``engine``."""
    base = engine.model.get_base_model()
    for kind in kinds:
        info = inspect_adapter(kind, root / kind, base, max_rank=8)
        engine.run_command(lambda info=info: engine.load(info, info.name))


PROMPTS = ("Review: great mug", "the order shipped to Oslo in may", "x y", "a review of the product")
"""Prompts of different lengths: rows of a mixed batch are left-padded to each other."""
SERVED = (*[None] * len(PROMPTS), *KINDS)
"""The base on every prompt, then every adapter kind: what :func:`serve_alone_and_mixed` serves by default."""


def adapter_effects(rows: Sequence[Row]) -> dict[str, float]:
    """Per adapter row: the largest change its adapter makes to the logits of the base's row on the same prompt
    (over every step). A soft prompt on a random tiny model moves the logits without changing the argmax."""
    base = {r.prompt: r for r in rows if r.adapter is None}
    return {r.adapter: deviation(r, base[r.prompt]) for r in rows if r.adapter is not None}


def deviation(row: Row, other: Row) -> float:
    """The largest difference between two rows' logits, over every step."""
    return max(float((a - b).abs().max()) for a, b in zip(row.logits, other.logits, strict=True))


def serve_alone_and_mixed(engine: Engine, tokenizer, adapters: Sequence[str | None] = SERVED,
                          max_tokens: int = 8) -> tuple[list[Row], list[Row], int]:
    """Greedy answers of every adapter in ``adapters`` (None: the base), row ``i`` on ``PROMPTS[i % 4]``:
    each request alone, then all of them admitted together into one batch. Returns (alone, mixed, the
    largest number of rows one decode step ran). Every answer has exactly ``max_tokens`` tokens (no EOS)."""
    sample, real_tokenizer = engine._sample, engine.tokenizer
    engine.tokenizer = type("NoEos", (), {"eos_token_id": -1, "decode": tokenizer.decode})()
    rows: dict[int, Row] = {}

    def recording(request: GenRequest, logits: torch.Tensor) -> int:
        token = sample(request, logits)
        rows[id(request)].logits.append(logits.float().cpu())
        rows[id(request)].tokens.append(token)
        return token

    sizes: list[int] = []
    errors: list[str] = []
    engine._sample, engine.on_step = recording, sizes.append
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(adapters))]

    def submit(i: int, into: list[Row]) -> threading.Event:
        done = threading.Event()
        request = GenRequest(prompt_ids=tokenizer(prompts[i], add_special_tokens=False)["input_ids"],
                             max_tokens=max_tokens, adapter=adapters[i],
                             on_done=lambda reason, n, error: (error and errors.append(error), done.set()))
        rows[id(request)] = Row(adapters[i], prompts[i])
        into.append(rows[id(request)])
        engine.submit(request)
        return done

    try:
        alone: list[Row] = []
        for i in range(len(adapters)):  # one at a time: each request decodes alone
            assert submit(i, alone).wait(120), f"the request for {adapters[i]} never finished"
        sizes.clear()
        mixed: list[Row] = []
        with worker_held(engine):  # nothing is admitted until every request waits: one batch
            events = [submit(i, mixed) for i in range(len(adapters))]
        assert all(e.wait(120) for e in events), "a mixed-batch request never finished"
        assert not errors, errors
        return alone, mixed, max(sizes, default=0)
    finally:
        engine._sample, engine.on_step, engine.tokenizer = sample, lambda batch_size: None, real_tokenizer


@contextlib.contextmanager
def worker_held(engine: Engine) -> Iterator[None]:
    """Hold the engine's worker in a command: nothing is admitted, loaded or decoded until the block ends."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(60)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(engine.run_command, hold)
        assert inside.wait(30), "the engine's worker never ran the hold command"
        try:
            yield
        finally:
            release.set()
            held.result(timeout=30)
