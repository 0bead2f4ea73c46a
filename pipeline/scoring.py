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
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.config import TaskConfig
from pipeline.data import IGNORE_INDEX, Example, encode, load_examples, render_prompt
from pipeline.device import model_device, to_model
from pipeline.opening import prompt_learning, with_opening


def prompt_batch(tokenizer, task: TaskConfig, n: int):
    """A left-padded batch of the first ``n`` test prompts of ``task`` (fixed evaluation prompts)."""
    examples = [e for e in load_examples(task.test) if e.messages][:n]
    texts = [render_prompt(tokenizer, e) for e in examples]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


MARGIN = 1.0
"""Logits by which a position's argmax must lead the runner-up for the teacher-forced pass to vouch for it.
A cached decode and one forward over the whole row round differently (int4 and int8 kernels most): on a
near-tie they can pick different tokens, so such a row is decoded rather than read."""


def confident_argmax(logits):
    """Argmax token ids over the last dimension, -1 where the top token leads the next by less than
    :data:`MARGIN` (a position no reference token can match)."""
    top = logits.float().topk(2, dim=-1)
    ids = top.indices[..., 0].clone()
    ids[(top.values[..., 0] - top.values[..., 1]) < MARGIN] = -1
    return ids


@dataclass
class AnswerPass:
    """What one teacher-forced forward over prompt + reference answer says, per example.

    ``greedy_hit[i]``: True when greedy decoding (``max_new_tokens``, stopping at the end token) reproduces
    the reference tokens: the argmax at every answer position is the reference's next token, by a margin of
    :data:`MARGIN` logits, and then the end token (or the answer fills ``max_new_tokens`` exactly); then the
    greedy answer *is* the reference's tokens, decoded in ``answer[i]``. False: the argmax leaves the
    reference somewhere, or leads by less than the margin (decoded, to be sure). None:
    it cannot be told from the pass (the row was cut at ``max_len``, the answer is longer than
    ``max_new_tokens``, or the prompt's tokens are not a prefix of the encoded row).
    """

    nll: float
    tokens: int
    greedy_hit: list[bool | None]
    answer: list[str | None]
    misses: list[bool] = field(default_factory=list)
    """Per example (when given): True when greedy decoding surely does not give the reference: it follows the
    reference up to a position whose every candidate token (within :data:`MARGIN` of the top) turns the answer's
    text into one the reference does not start with (:func:`_surely_misses`). False: not known."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def answer_pass(model, tokenizer, examples: list[Example], max_len: int, batch_size: int,
                max_new_tokens: int | None = None) -> AnswerPass:
    """One forward over each example's prompt + reference: the completion's negative log-likelihood (summed
    over every target token, for perplexity) and, with ``max_new_tokens``, whether greedy decoding would
    reproduce the reference (:class:`AnswerPass`).

    The rows are left-padded and the output head runs at the answer positions only (as in training; PyTorch
    and ONNX models alike, PEFT prompt learning excepted): over a long prompt, full-vocabulary logits at every
    position were most of the time. The opening every row shares (:func:`pipeline.data.shared_prefix`) runs
    once and the rows continue from its key/value cache (PyTorch: once per batch, :func:`with_opening`; ONNX:
    once for all batches, :meth:`edge.runtime.Decoder.logits`): a third to a half of each row on the bundled
    tasks."""
    import torch
    import torch.nn.functional as F

    from pipeline.data import collate, collate_for_training, shared_prefix

    encoded, answers = reference_rows(tokenizer, examples, max_len)
    sliced = _answer_logits_only(model)
    opening = shared_prefix(encoded) if sliced else 0  # the opening every row shares
    nll, count, hits, texts, misses = 0.0, 0, [], [], []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        batch = to_model(collate_for_training(rows, tokenizer.pad_token_id, opening=opening) if sliced
                         else collate(rows, tokenizer.pad_token_id), model)
        with torch.no_grad():
            if "opening_ids" in batch and not isinstance(model, torch.nn.Module):  # ONNX: the decoder takes it
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=batch["logits_to_keep"], opening_ids=batch["opening_ids"]).logits
            elif "opening_ids" in batch:  # the rows' common opening (system prompt, instruction) runs once
                inputs = with_opening(model, batch)
                logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            elif sliced:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"]).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # prompt tuning and P-tuning return logits for their virtual tokens too, in front: drop them
                logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]
        labels = batch["labels"][:, 1:]
        targets = labels != IGNORE_INDEX
        # the target positions only: a full-width ONNX output is rows x positions x vocabulary floats
        picked = logits[:, :-1][targets].float()
        nll += F.cross_entropy(picked, labels[targets], reduction="sum").item()
        count += int(targets.sum())
        if max_new_tokens is None:
            continue
        predicted = torch.full_like(labels, -1)
        predicted[targets] = confident_argmax(picked)
        for row, answer in enumerate(answers[start:start + batch_size]):
            hit, text, miss = None, None, False
            if answer is not None:
                target = (labels[row] != IGNORE_INDEX).nonzero().flatten()[-len(answer):]  # the answer's positions
                agree = (predicted[row, target] == labels[row, target]).tolist()
                hit, text = greedy_reproduces(tokenizer, answer, agree, max_new_tokens)
                if hit is False and not all(agree):
                    j = agree.index(False)  # greedy decoding surely follows the reference up to here
                    top = logits[row, target[j]].float()
                    candidates = (top >= top.max() - MARGIN).nonzero().flatten().tolist()
                    miss = _surely_misses(tokenizer, answer[:j], candidates, examples[start + row].reference or "",
                                          max_new_tokens)
            hits.append(hit)
            texts.append(text)
            misses.append(miss)
    return AnswerPass(nll, count, hits, texts, misses)


def _surely_misses(tokenizer, followed: list[int], candidates: list[int], reference: str,
                   max_new_tokens: int) -> bool:
    """Whether a greedy answer that starts with the tokens ``followed`` (the reference's own) and then one of
    ``candidates`` cannot equal ``reference`` (whitespace-stripped), whatever follows: for every candidate, the
    end token ends the answer on another text, and any other token gives a text the reference does not start
    with. Never for a decode that stops before the candidate, for many candidates (a flat distribution), or for
    a text that ends inside a character."""
    expected = reference.strip()
    if len(followed) >= max_new_tokens or len(candidates) > 16:
        return False
    for token in candidates:
        if token == tokenizer.eos_token_id:
            if tokenizer.decode(followed, skip_special_tokens=True).strip() == expected:
                return False
            continue
        if not _leaves(tokenizer.decode(followed + [token], skip_special_tokens=True), expected):
            return False
    return True


def reference_rows(tokenizer, examples: list[Example], max_len: int) -> tuple[list[dict], list[list[int] | None]]:
    """Each example encoded as training encodes it (cut at ``max_len``), and its reference answer's token ids at
    the end of the row (end token included; None for a text row, a cut row, or one whose rendered prompt's
    tokens are not a prefix of the encoded row, as with a template that does not render turns incrementally)."""
    encoded, answers = [], []
    for e in examples:
        enc, truncated = encode(tokenizer, e, max_len)
        encoded.append(enc)
        answers.append(None if truncated or e.reference is None else _answer_ids(tokenizer, e, enc["input_ids"]))
    return encoded, answers


def _answer_ids(tokenizer, example: Example, ids: list[int]) -> list[int] | None:
    """The reference answer's token ids (end token included) at the end of ``ids``, or None when the rendered
    prompt's tokens are not a prefix of the encoded row (a template that does not render turns incrementally)."""
    prompt = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    if len(prompt) >= len(ids) or ids[:len(prompt)] != prompt:
        return None
    return ids[len(prompt):]


def greedy_reproduces(tokenizer, answer: list[int], agree: list[bool],
                       max_new_tokens: int) -> tuple[bool | None, str | None]:
    """(greedy reproduces the reference?, the reference's decoded text) from the per-position argmax agreement
    over ``answer`` (its ids, end token last when it has one); see :class:`AnswerPass`."""
    body = answer[:-1] if answer[-1] == tokenizer.eos_token_id else answer
    if len(body) > max_new_tokens or (len(body) < max_new_tokens and len(body) == len(answer)):
        return None, None  # greedy stops before the answer ends, or the row has no end token to stop at
    hit = all(agree[:len(body)]) if len(body) == max_new_tokens else all(agree)
    return hit, tokenizer.decode(body, skip_special_tokens=True).strip()


def plain_greedy(model) -> bool:
    """Whether ``model.generate(do_sample=False)`` is the plain argmax chain (no logits processors from its
    generation config, which a teacher-forced pass would not apply)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return (getattr(config, "repetition_penalty", None) in (None, 1.0)
            and not getattr(config, "no_repeat_ngram_size", None)
            and not getattr(config, "bad_words_ids", None)
            and not getattr(config, "suppress_tokens", None)
            and not getattr(config, "begin_suppress_tokens", None)
            and not getattr(config, "sequence_bias", None)
            and getattr(config, "forced_bos_token_id", None) is None
            and getattr(config, "forced_eos_token_id", None) is None)


SHOWN_MISTAKES = 5
"""Rows whose greedy answer misses that :func:`exact_match` decodes even when it knows they miss (the first ones,
in order): the report shows their answers."""


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
                desc: str, *, max_len: int = 4096, checked: AnswerPass | None = None,
                verify: bool = True) -> tuple[float, list[dict[str, str | None]]]:
    """Share of examples whose greedy answer equals the reference (whitespace-stripped).

    Also returns every (prompt, expected, got) triple so a report can show mistakes: ``got`` is the greedy
    answer, or None for a row known to miss after the first :data:`SHOWN_MISTAKES` misses (see below).

    Greedy decoding is one token per forward; most rows of a tuned model are answered exactly, and that
    can be read from a single teacher-forced forward over prompt + reference (:func:`answer_pass`, or
    ``checked``, one already run with ``max_new_tokens``): a row whose argmax chain is the reference and
    then the end token decodes to the reference, so only the other rows are decoded. The same pass tells where
    greedy decoding leaves the reference: where the text it takes there is not how the reference goes on (an
    untuned model's rows, mostly), the row misses whatever follows (``AnswerPass.misses``), and it is decoded
    only to show it (the first :data:`SHOWN_MISTAKES` misses).
    ``verify=False`` decodes every row. Both give the same answers, up to the float noise between a cached
    decode and one forward on a near-tie (tested against each other).
    """
    import torch

    if not verify or not plain_greedy(model):  # the pass says nothing about processed or sampled decoding
        checked = None
    elif checked is None:
        checked = answer_pass(model, tokenizer, examples, max_len, batch_size, max_new_tokens)
    known = {i: checked.answer[i] for i, hit in enumerate(checked.greedy_hit) if hit} if checked else {}
    missed = {i for i, miss in enumerate(checked.misses) if miss} if checked else set()
    shown = set(sorted(missed)[:SHOWN_MISTAKES])  # every miss before them is decoded: they are the first misses
    decode = [i for i in range(len(examples)) if i not in known and (i not in missed or i in shown)]
    got: dict[int, str | None] = {**known, **{i: None for i in missed - shown}}
    # verified: a PyTorch row stops decoding once its text leaves the reference (it misses whatever follows);
    # the known misses shown are decoded to the end
    cut = checked is not None and isinstance(model, torch.nn.Module)
    rest = [i for i in decode if i not in shown]
    # one pass in row order (bitsandbytes int8's answers depend on which rows share a batch)
    got.update(_greedy_answers(model, tokenizer, examples, decode, max_new_tokens, batch_size, desc,
                               cut=set(rest) if cut else set()))
    expected = [(e.reference or "").strip() for e in examples]
    if cut:  # the first misses are shown: those cut short are decoded to the end; the others cut short keep no text
        first = [i for i in range(len(examples)) if got[i] != expected[i]][:SHOWN_MISTAKES]
        again = [i for i in first if i in rest and _leaves(got[i], expected[i])]
        got.update({i: None for i in rest if i not in first and _leaves(got[i], expected[i])})
        got.update(_greedy_answers(model, tokenizer, examples, again, max_new_tokens, batch_size, desc))
    outputs = [{"prompt": e.prompt_messages[-1]["content"], "expected": e.reference, "got": got[i]}
               for i, e in enumerate(examples)]
    hits = sum(o["got"] == expected[i] for i, o in enumerate(outputs))
    return hits / max(len(outputs), 1), outputs


def _greedy_answers(model, tokenizer, examples: list[Example], rows: list[int], max_new_tokens: int,
                    batch_size: int, desc: str, *, cut: set[int] = frozenset()) -> dict[int, str]:
    """Row index -> greedy answer (decoded, stripped) of ``rows`` of ``examples``, ``batch_size`` per generate call.
    A row in ``cut`` stops once its text leaves its reference (:func:`_leaves`; PyTorch models): its answer is
    then cut short, and misses all the same."""
    import torch

    got = {}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        chunk = rows[start:start + batch_size]
        batch = to_model(tokenizer([render_prompt(tokenizer, examples[i]) for i in chunk], return_tensors="pt",
                                   padding=True, add_special_tokens=False), model)
        width = batch["input_ids"].shape[1]
        extra = {"stopping_criteria": _leaving_stops(tokenizer, width, [examples[i].reference if i in cut else None
                                                                         for i in chunk])} if cut & set(chunk) else {}
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                       **extra)
        for i, ids in zip(chunk, generated[:, width:]):
            got[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return got


def _leaves(text: str, expected: str) -> bool:
    """Whether an answer whose text so far is ``text`` cannot end as ``expected`` (both stripped), whatever tokens
    follow: ``expected`` does not start with it. A text that ends inside a character is never taken to leave."""
    text = text.strip()
    return "\ufffd" not in text and not expected.startswith(text)


def _leaving_stops(tokenizer, width: int, references: list[str | None]):
    """A transformers stopping criterion that ends each row of a batch (prompts ``width`` tokens wide) once its
    new tokens' text leaves its reference (:func:`_leaves`); a row whose reference is None runs to its end."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    expected = [None if r is None else r.strip() for r in references]

    class LeavesReference(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [e is not None and _leaves(tokenizer.decode(row[width:], skip_special_tokens=True), e)
                    for row, e in zip(input_ids, expected)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([LeavesReference()])


def _answer_logits_only(model) -> bool:
    """Whether ``model`` computes logits at the last k positions only when asked (``logits_to_keep``): a PyTorch
    transformers model that is not a prompt-learning PEFT model (those prepend virtual tokens inside), or an
    ONNX model (:class:`exporters.onnx.OnnxCausalLM`: a key/value prefix is not among its positions)."""
    import torch

    from exporters.onnx import OnnxCausalLM

    if isinstance(model, OnnxCausalLM):
        return True
    return isinstance(model, torch.nn.Module) and not prompt_learning(model)


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
