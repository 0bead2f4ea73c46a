"""The shared generation tail (edge.generation): finish reasons, the context budget, the numpy and torch
samplers against one contract and each other, and incremental text against whole-text decoding."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from edge.generation import (
    SEED_MAX,
    SMALLEST,
    ContextOverflow,
    FinishReason,
    Sampling,
    TextStream,
    token_budget,
)
from serve.sampling import TorchSampling
from tests.tiny_model import build_tiny_tokenizer

SAMPLERS = {"numpy": (Sampling, np.asarray), "torch": (TorchSampling, torch.tensor)}
"""Each sampler with the array type its logits come in."""


def _sampler(kind: str, temperature: float, top_p: float = 1.0, seed: int | None = 0):
    cls, array = SAMPLERS[kind]
    sampler = cls(temperature, top_p, seed)
    return lambda logits: sampler.pick(array(logits, dtype=np.float32 if kind == "numpy" else torch.float32))


# ---- finish reasons and the context budget ----------------------------------------------------------
def test_finish_reasons_are_the_strings_the_api_returns() -> None:
    assert [r.value for r in FinishReason] == ["stop", "length", "timeout", "cancelled", "error"]
    assert FinishReason.STOP == "stop" and f"{FinishReason.LENGTH}" == "length" and str(FinishReason.ERROR) == "error"
    assert json.dumps({"finish_reason": FinishReason.CANCELLED}) == '{"finish_reason": "cancelled"}'


def test_token_budget_clips_to_the_room_left_and_refuses_a_full_context() -> None:
    assert token_budget(10, 0, 5, 100) == 5  # room enough: max_tokens
    assert token_budget(90, 0, 50, 100) == 10  # clipped to the context
    assert token_budget(90, 6, 50, 100) == 4  # virtual tokens take room too
    assert token_budget(99, 0, 50, 100) == 1
    with pytest.raises(ContextOverflow, match="the prompt has 100 tokens; the context holds 100"):
        token_budget(100, 0, 1, 100)
    with pytest.raises(ContextOverflow, match="96 tokens after 4 virtual tokens"):
        token_budget(96, 4, 1, 100)


# ---- samplers ---------------------------------------------------------------------------------------
LOGITS = [2.0, 1.5, 1.1, 0.4, 0.0, -1.0, -3.0, -3.5]


def _expected(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The contract written out plainly: softmax(logits / T), the nucleus reaching top_p, renormalised."""
    weights = [math.exp(v / temperature) for v in logits]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep, total = [], 0.0
    for i in order:
        keep.append(i)
        total += probs[i]
        if total >= top_p:
            break
    mass = sum(probs[i] for i in keep)
    return [probs[i] / mass if i in keep else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.6)])
def test_sampler_draws_follow_the_renormalised_nucleus(kind: str, temperature: float, top_p: float) -> None:
    expected = _expected(LOGITS, temperature, top_p)
    assert 0 < sum(p > 0 for p in expected) < len(LOGITS) or top_p == 1.0  # the cases cut a real nucleus
    pick, n = _sampler(kind, temperature, top_p, seed=1234), 6000
    counts = np.bincount([pick(LOGITS) for _ in range(n)], minlength=len(LOGITS))
    outside = [i for i, p in enumerate(expected) if p == 0]
    assert counts[outside].sum() == 0, counts  # never a token outside the nucleus
    inside = [i for i, p in enumerate(expected) if p > 0]
    chi2 = sum((counts[i] - n * expected[i]) ** 2 / (n * expected[i]) for i in inside)
    assert chi2 < 25, (chi2, counts, [round(n * p) for p in expected])  # df <= 7: p < 0.001 by chance


def test_numpy_and_torch_samplers_agree() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):  # greedy: the same argmax (the lowest id on ties)
        logits = rng.normal(size=50).round(1).tolist()
        assert _sampler("numpy", 0.0)(logits) == _sampler("torch", 0.0)(logits) == int(np.argmax(logits))
    # a tiny nucleus is the top token alone, whatever the temperature
    for kind in SAMPLERS:
        pick = _sampler(kind, 1.5, top_p=1e-9)
        assert {pick(LOGITS) for _ in range(50)} == {0}


@pytest.mark.parametrize("kind", SAMPLERS)
def test_a_seed_repeats_its_sequence(kind: str) -> None:
    logits = np.random.default_rng(1).normal(size=64).tolist()
    first, again, other = (_sampler(kind, 1.0, 0.95, seed) for seed in (7, 7, 8))
    sequence = [first(logits) for _ in range(40)]
    assert [again(logits) for _ in range(40)] == sequence
    assert [other(logits) for _ in range(40)] != sequence


@pytest.mark.parametrize("kind", SAMPLERS)
def test_extreme_settings_do_not_break_the_sampler(kind: str) -> None:
    big = [3e4, -2e4, 2.9e4, float("-inf"), 0.0]  # large logits and a masked token
    for temperature in (SMALLEST, 1e-30, 1e-8):  # logits / T overflows unless the max goes first
        assert _sampler(kind, temperature, 0.5)(big) == 0
    assert _sampler(kind, 100.0, SMALLEST)(big) == 0
    assert _sampler(kind, 1.0)([0.0] * 4) in range(4)  # all tied: any, no division by zero
    assert _sampler(kind, 1.0, 1.0, SEED_MAX)(LOGITS) in range(len(LOGITS))  # the largest seed both generators take
    cls, _ = SAMPLERS[kind]
    # below SMALLEST a float32 sampler rounds the value to 0 (NaN probabilities, an empty nucleus): refused
    for bad in ({"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": 1e-300},
                {"temperature": 5e-324}, {"top_p": 0.0}, {"top_p": 1e-320}, {"top_p": 1.5}, {"seed": -1},
                {"seed": SEED_MAX + 1}, {"seed": 2**64}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cls(**bad)


# ---- incremental text -------------------------------------------------------------------------------
TEXTS = ["héllo wörld 😀 and 日本語のテキスト", "🎉🎊 emoji 👩‍👩‍👧 ok ✓", "Review: great kettle! 中文, ça va?",
         " leading space\n\ntabs\t and  double  spaces"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return build_tiny_tokenizer()


def _decode_only(hf_tokenizer):
    """Something with only ``decode``: TextStream decodes the whole text each token (the fallback)."""
    return type("DecodeOnly", (), {"decode": staticmethod(hf_tokenizer.decode)})()


def _reference(decode, ids: list[int]) -> list[str]:
    """Each token's text delta as the engines computed it before: decode everything, wait on a trailing \\ufffd."""
    out, sent = [], ""
    for i in range(len(ids)):
        text = decode(ids[: i + 1], skip_special_tokens=True)
        piece = ""
        if not text.endswith("\ufffd") and len(text) > len(sent):
            piece, sent = text[len(sent):], text
        out.append(piece)
    return out


def _sequences(tokenizer: Tokenizer) -> list[list[int]]:
    """Real text (multi-byte characters split across tokens) and random ids (broken UTF-8, special tokens)."""
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    seqs = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS]
    seqs += [[rng.randrange(vocab) for _ in range(24)] for _ in range(150)]
    seqs += [[rng.choice([0, 1, 2]) if rng.random() < 0.2 else rng.randrange(vocab) for _ in range(24)]
             for _ in range(150)]
    return seqs


@pytest.mark.parametrize("face", ["tokenizers", "transformers", "decode-only"])
def test_text_pieces_equal_whole_text_decoding(face: str, hf_tokenizer) -> None:
    tokenizer = {"tokenizers": hf_tokenizer.backend_tokenizer, "transformers": hf_tokenizer,
                 "decode-only": _decode_only(hf_tokenizer)}[face]
    assert (TextStream(tokenizer, max_tokens=1)._stream is None) == (face == "decode-only")  # DecodeStream used
    for ids in _sequences(hf_tokenizer.backend_tokenizer):
        stream = TextStream(tokenizer, max_tokens=len(ids))
        pieces = [stream.push(t) for t in ids]
        assert pieces == _reference(hf_tokenizer.decode, ids), ids
        assert stream.finish_reason == FinishReason.LENGTH and stream.tokens == ids


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole() -> None:
    """transformers' clean-up pass (" ," -> ",") runs on the whole text: such a tokenizer gets the whole-text
    deltas it always had (a streamed decode would send " ," where they send nothing)."""
    hf_tokenizer = build_tiny_tokenizer()
    hf_tokenizer.clean_up_tokenization_spaces = True
    ids = hf_tokenizer("the review , great . item 's", add_special_tokens=False)["input_ids"]
    assert hf_tokenizer.decode(ids) == "the review, great. item's"
    stream = TextStream(hf_tokenizer, max_tokens=len(ids))
    assert [stream.push(t) for t in ids] == _reference(hf_tokenizer.decode, ids) and stream._stream is None


def test_a_failing_stream_goes_on_by_whole_text_decoding(hf_tokenizer, monkeypatch) -> None:
    """DecodeStream can refuse its own window (InvalidPrefix); the text then goes on, decoded whole."""
    import edge.generation

    real = edge.generation.DecodeStream

    class Failing:
        def __init__(self, **kwargs) -> None:
            self.inner, self.steps = real(**kwargs), 0

        def step(self, tokenizer, token):
            self.steps += 1
            if self.steps == 4:
                raise Exception("Invalid prefix encountered")  # what tokenizers raises
            return self.inner.step(tokenizer, token)

    monkeypatch.setattr(edge.generation, "DecodeStream", Failing)
    for text in TEXTS:
        ids = hf_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        stream = TextStream(hf_tokenizer, max_tokens=len(ids))
        assert [stream.push(t) for t in ids] == _reference(hf_tokenizer.decode, ids) and stream._stream is None


def _run(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.finish_reason is not None:
            break
    return pieces


def test_stop_strings_cut_the_text_before_them_and_never_leak(hf_tokenizer) -> None:
    tok = hf_tokenizer.backend_tokenizer
    text = "the review was great; the order shipped to Oslo in may 😀 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    full = tok.decode(ids)
    for stop in ["great;", "view was", "Oslo in", "😀", "e", " done", "order shipped to Oslo in may"]:
        stream = TextStream(tok, max_tokens=100, stop=[stop])
        pieces = _run(stream, ids)
        cut = full.index(stop)
        assert "".join(pieces) == full[:cut] == stream.text, stop
        assert stream.finish_reason == FinishReason.STOP and stream.flush() == ""
        sent = 0
        for piece in pieces:  # nothing past the cut ever went out, even while the stop string was incomplete
            sent += len(piece)
            assert sent <= cut, (stop, pieces)
    # several stop strings: the earliest in the text wins, whatever their order
    stream = TextStream(tok, max_tokens=100, stop=["Oslo", "order"])
    assert "".join(_run(stream, ids)) == full[:full.index("order")]
    # held-back text (a stop string's start) goes out when the budget ends the request instead
    n = len(tok.encode("the review was gr", add_special_tokens=False).ids)
    stream = TextStream(tok, max_tokens=n, stop=["great!"])
    assert "".join(_run(stream, ids)) == tok.decode(ids[:n]) and stream.finish_reason == FinishReason.LENGTH


def test_stop_ids_end_without_text_or_count(hf_tokenizer) -> None:
    tok = hf_tokenizer.backend_tokenizer
    eos = hf_tokenizer.eos_token_id
    ids = tok.encode("great item", add_special_tokens=False).ids
    stream = TextStream(tok, max_tokens=10, stop=["xyz"], stop_ids=[eos])
    pieces = [stream.push(t) for t in ids] + [stream.push(eos)]
    assert "".join(pieces) == "great item" and stream.tokens == ids
    assert stream.finish_reason == FinishReason.STOP
    with pytest.raises(RuntimeError, match="already finished"):
        stream.push(ids[0])
