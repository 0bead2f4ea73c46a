"""How a model is scored on a task: held-out exact match, perplexity, decode speed, and the fixed
prompt batch gates compare logits on. Shared by evaluate, the fidelity gates and merge.

Every model here has ``__call__`` -> logits and ``generate`` (PyTorch, bitsandbytes, or ONNX behind
:class:`exporters.onnx.OnnxCausalLM`), on whatever device it was loaded on: inputs follow the model
(:func:`pipeline.device.to_model`).
"""

from __future__ import annotations

import math
import statistics
import time

from tqdm.auto import tqdm

from pipeline.config import TaskConfig
from pipeline.data import IGNORE_INDEX, Example, encode, load_examples, render_prompt
from pipeline.device import model_device, to_model


def prompt_batch(tokenizer, task: TaskConfig, n: int):
    """A left-padded batch of the first ``n`` test prompts of ``task`` (fixed evaluation prompts)."""
    examples = [e for e in load_examples(task.test) if e.messages][:n]
    texts = [render_prompt(tokenizer, e) for e in examples]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
                desc: str) -> tuple[float, list[dict[str, str]]]:
    """Share of examples whose greedy answer equals the reference (whitespace-stripped).

    Also returns every (prompt, expected, got) triple so a report can show mistakes.
    """
    import torch

    outputs = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        chunk = examples[start:start + batch_size]
        batch = to_model(tokenizer([render_prompt(tokenizer, e) for e in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=False), model)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]
        for e, ids in zip(chunk, new):
            outputs.append({"prompt": e.prompt_messages[-1]["content"], "expected": e.reference,
                            "got": tokenizer.decode(ids, skip_special_tokens=True).strip()})
    hits = sum(o["got"] == (o["expected"] or "").strip() for o in outputs)
    return hits / max(len(outputs), 1), outputs


def _answer_logits_only(model) -> bool:
    """Whether ``model`` computes logits at the last k positions only when asked (``logits_to_keep``): a PyTorch
    transformers model, not a prompt-learning PEFT model (those prepend virtual tokens inside) and not ONNX."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return False
    configs = getattr(model, "peft_config", None) or {}
    return not any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def perplexity(model, tokenizer, examples: list[Example], max_len: int, batch_size: int) -> float:
    """exp(mean negative log-likelihood) of the reference completion tokens given their prompts.

    PyTorch models get the rows left-padded and compute the output head at the answer positions only (as in
    training): over a long prompt, full-vocabulary logits at every position were most of the time."""
    import torch
    import torch.nn.functional as F

    from pipeline.data import collate, collate_for_training

    encoded = [encode(tokenizer, e, max_len)[0] for e in examples]
    sliced = _answer_logits_only(model)
    nll, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        batch = to_model(collate_for_training(rows, tokenizer.pad_token_id) if sliced
                         else collate(rows, tokenizer.pad_token_id), model)
        with torch.no_grad():
            if sliced:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"]).logits.float()
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                # prompt tuning and P-tuning return logits for their virtual tokens too, in front: drop them
                logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        nll += losses.item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / count) if count else float("nan")


def decode_speed(model, tokenizer, prompt: str, new_tokens: int, repeats: int) -> float:
    """Median greedy decode tokens/s at batch 1, generating exactly ``new_tokens`` (after a warm-up)."""
    import torch

    batch = to_model(tokenizer([prompt], return_tensors="pt", add_special_tokens=False), model)
    cuda = model_device(model).type == "cuda"
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rates = []
    with torch.no_grad():
        model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            if cuda:  # kernels run asynchronously: time the work, not its launch
                torch.cuda.synchronize()
            rates.append((out.shape[1] - batch["input_ids"].shape[1]) / (time.perf_counter() - started))
    return statistics.median(rates)
