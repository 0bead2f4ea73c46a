"""The engine on the tiny model: prompt-learning adapters served as base rows with virtual tokens
give PEFT's greedy tokens, alone and mixed with LoRA rows."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pipeline.models import load_model, load_tokenizer
from serve.adapters import inspect_adapter
from serve.engine import Engine, GenRequest


def _prompt_adapter(base: Path, out: Path, kind: str) -> None:
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(5)
    config = (PrefixTuningConfig if kind == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=6)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():  # strong enough to steer a random tiny model
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 20.0)
    model.save_pretrained(out)


def _generate(engine: Engine, tokenizer, adapter: str | None, prompt: str, n: int = 8) -> GenRequest:
    done = threading.Event()
    request = GenRequest(prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"], max_tokens=n,
                         adapter=adapter, on_done=lambda *_: done.set())
    engine.submit(request)
    return request, done


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_rows_match_peft(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    _prompt_adapter(tiny_model_dir, tmp_path / kind, kind)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = "Review: great mug"
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    peft = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / kind).eval()
    with torch.no_grad():
        expected = peft.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        first_logits = peft(**ids).logits[0, -1]
        plain_logits = load_model(tiny_model_dir)(**ids).logits[0, -1]
    assert (first_logits - plain_logits).abs().max() > 1e-2  # the adapter changes the model's prediction

    base = load_model(tiny_model_dir)
    engine = Engine(base, tokenizer, max_batch_size=4)
    engine.tokenizer = type("NoEos", (), {"eos_token_id": -1, "decode": tokenizer.decode})()  # always 8 tokens
    seen, sample = [], engine._sample
    engine._sample = lambda request, logits: seen.append(logits.clone()) or sample(request, logits)
    try:
        info = inspect_adapter(kind, tmp_path / kind, base, max_rank=8)
        engine.run_command(lambda: engine.load(info, kind))
        alone, done = _generate(engine, tokenizer, kind, prompt)
        assert done.wait(30) and alone.tokens == expected
        assert torch.allclose(seen[0], first_logits, atol=1e-4)  # the prefill sees what PEFT's model sees
        mixed = [_generate(engine, tokenizer, a, p) for a, p in [(None, "x y"), (kind, prompt), (None, prompt)]]
        assert all(d.wait(30) for _, d in mixed) and mixed[1][0].tokens == expected
    finally:
        engine.shutdown(1)
