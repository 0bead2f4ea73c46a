"""Exact match read from one teacher-forced pass equals exact match by greedy decoding, row for row.

``scoring.exact_match`` decodes only the rows whose argmax chain over prompt + reference is not the
reference followed by the end token; these tests hold it to full greedy decoding on a tiny model taught a
few answers (so some rows are answered exactly, with the end token, and some are not).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data import Example, encode
from pipeline.models import load_tokenizer
from pipeline.scoring import SHOWN_MISTAKES, answer_pass, exact_match


def _row(question: str, answer: str) -> Example:
    return Example(messages=({"role": "user", "content": question}, {"role": "assistant", "content": answer}),
                   text=None, source="test")


TAUGHT = [_row("label: great product", "positive"), _row("label: terrible order", "negative"),
          _row("date: may 3", "2021-05-03"), _row("json: Ada", '{"name": "Ada"}')]


@pytest.fixture(scope="module")
def taught(tiny_model_dir):
    """The tiny model trained until it answers the TAUGHT rows exactly (then its end token)."""
    tokenizer = load_tokenizer(tiny_model_dir)  # left padding, as every stage loads it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = [encode(tokenizer, e, 256)[0] for e in TAUGHT]
    for _ in range(300):
        loss = sum(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
                   for r in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return model.eval(), tokenizer


def _examples() -> list[Example]:
    """Taught rows (answered exactly), taught prompts with another reference (a miss), and unseen prompts."""
    return [*TAUGHT, _row("label: great product", "negative"), _row("date: may 3", "2021-05-04"),
            _row("unseen question", "anything"), _row("json: Ada", '{"name": "Ada"}'), _row("label: x", "y")]


class _CountingGenerate:
    """Wraps ``model.generate`` and counts the rows it decodes."""

    def __init__(self, model) -> None:
        self.model, self.rows = model, 0
        self.inner = model.generate

    def __call__(self, **kwargs):
        self.rows += kwargs["input_ids"].shape[0]
        return self.inner(**kwargs)


@pytest.mark.parametrize("max_new_tokens", [3, 8, 16])
def test_verified_exact_match_equals_greedy_decoding(taught, monkeypatch, max_new_tokens):
    model, tokenizer = taught
    examples = _examples()
    decoded_em, decoded = exact_match(model, tokenizer, examples, max_new_tokens, 4, "decode", verify=False)
    counter = _CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    verified_em, verified = exact_match(model, tokenizer, examples, max_new_tokens, 4, "verify")
    assert verified_em == decoded_em
    # every row's answer, not only the score; a miss after the first SHOWN_MISTAKES whose text left the
    # reference (known, or cut short there) keeps no text
    misses = [i for i, o in enumerate(decoded) if o["got"] != o["expected"].strip()]
    blank = [i for i, o in enumerate(verified) if o["got"] is None]
    assert set(blank) <= set(misses[SHOWN_MISTAKES:])
    assert all(verified[i] == decoded[i] for i in range(len(examples)) if i not in blank)
    checked = answer_pass(model, tokenizer, examples, 256, 4, max_new_tokens)
    # the rows the pass vouches for are never decoded, nor the misses it knows after the first shown ones
    known = [i for i, miss in enumerate(checked.misses) if miss]
    assert counter.rows >= len(examples) - sum(hit is True for hit in checked.greedy_hit) - len(known[SHOWN_MISTAKES:])
    if max_new_tokens == 16:  # long enough for every taught answer and its end token: all five are read, not decoded
        assert decoded_em == pytest.approx(5 / 9)
        assert checked.greedy_hit == [True] * 4 + [False, False, False, True, False]
    for hit, e in zip(checked.greedy_hit, examples):  # an answer longer than max_new_tokens cannot be vouched for
        body = len(tokenizer(e.reference, add_special_tokens=False)["input_ids"])
        assert (hit is None) == (body > max_new_tokens)

def test_a_row_whose_greedy_text_leaves_the_reference_is_a_known_miss(taught, monkeypatch):
    """A row whose greedy answer surely leaves the reference text misses whatever follows: it is not decoded,
    except the first SHOWN_MISTAKES misses, whose answers the report shows. Score and shown mistakes unchanged."""
    import pipeline.scoring as scoring

    model, tokenizer = taught
    examples = _examples()
    decoded_em, decoded = exact_match(model, tokenizer, examples, 16, 4, "decode", verify=False)
    misses = [i for i, o in enumerate(decoded) if o["got"] != o["expected"].strip()]
    monkeypatch.setattr(scoring, "SHOWN_MISTAKES", 1)
    counter = _CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    em, outputs = exact_match(model, tokenizer, examples, 16, 4, "verify")
    assert em == decoded_em and len(misses) == 4
    skipped = [i for i, o in enumerate(outputs) if o["got"] is None]
    assert skipped and set(skipped) <= set(misses[1:])  # only misses, never the first one
    assert outputs[misses[0]] == decoded[misses[0]]  # the shown mistake, decoded
    assert all(outputs[i] == decoded[i] for i in range(len(examples)) if i not in skipped)
    assert counter.rows == len(misses) - len(skipped)  # the five hits are read, the known misses not decoded
    assert answer_pass(model, tokenizer, examples, 256, 4, 16).misses == [i in misses for i in range(len(examples))]
    for i in skipped:  # the decoded answer leaves the reference: it is not how the reference starts
        assert not examples[i].reference.startswith(decoded[i]["got"][:len(examples[i].reference)])


def test_a_decoded_row_stops_once_its_text_leaves_the_reference(taught, monkeypatch):
    """Misses the pass cannot tell are decoded, and each stops at the token where its text leaves the reference:
    the batch ends before max_new_tokens; the first SHOWN_MISTAKES are decoded again to their end."""
    import dataclasses

    import pipeline.scoring as scoring

    model, tokenizer = taught
    examples = _examples()
    _, decoded = exact_match(model, tokenizer, examples, 16, 9, "decode", verify=False)
    checked = answer_pass(model, tokenizer, examples, 256, 9, 16)
    checked = dataclasses.replace(checked, misses=[False] * len(examples))  # nothing known from the pass
    monkeypatch.setattr(scoring, "SHOWN_MISTAKES", 1)
    widths, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: widths.append(
        (kw["input_ids"].shape, (out := generate(**kw)).shape[1])) or out)
    _, outputs = exact_match(model, tokenizer, examples, 16, 9, "cut", checked=checked)
    misses = [i for i, o in enumerate(decoded) if o["got"] != o["expected"].strip()]
    scoring._greedy_answers(model, tokenizer, examples, misses, 16, 9, "uncut")  # the same rows, not cut
    (first_shape, first_width), (again_shape, again_width), (_, uncut_width) = widths
    assert first_shape[0] == len(misses) and first_width < uncut_width  # the batch stopped sooner
    assert again_shape[0] == 1 and outputs[misses[0]] == decoded[misses[0]]  # the shown miss, to its end
    assert [i for i, o in enumerate(outputs) if o["got"] is None] == misses[1:]


def test_a_miss_is_known_only_when_every_candidate_token_leaves_the_reference(taught):
    from pipeline.scoring import _surely_misses

    _, tokenizer = taught
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    ref = "2021-05-03"
    body = ids(ref)
    assert _surely_misses(tokenizer, body[:2], [ids("x")[0]], ref, 16)  # "20" + "x": not how the reference goes on
    assert not _surely_misses(tokenizer, body[:2], [body[2]], ref, 16)  # the reference's own next token
    assert not _surely_misses(tokenizer, body[:2], [ids("x")[0], body[2]], ref, 16)  # a near-tie with it
    assert _surely_misses(tokenizer, body[:2], [eos], ref, 16)  # ends early
    assert not _surely_misses(tokenizer, body, [eos], ref, 16)  # ends exactly there: the reference
    assert _surely_misses(tokenizer, body, [ids("x")[0]], ref, 16)  # goes on past it
    assert not _surely_misses(tokenizer, body[:2], [ids("x")[0]], ref, 2)  # decoding stops before that token


def test_a_row_cut_at_max_len_is_decoded(taught):
    model, tokenizer = taught
    checked = answer_pass(model, tokenizer, TAUGHT, 12, 4, 16)  # every row is longer than 12 tokens
    assert checked.greedy_hit == [None] * len(TAUGHT)


def test_perplexity_is_the_pass_over_every_target_token(taught):
    model, tokenizer = taught
    import math

    import torch.nn.functional as F

    nll, count = 0.0, 0
    for e in _examples():  # one row at a time, no padding: the definition
        enc = encode(tokenizer, e, 256)[0]
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(enc["labels"][1:])
        nll += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert answer_pass(model, tokenizer, _examples(), 256, 4).perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_a_repetition_penalty_turns_verification_off(taught, monkeypatch):
    """Greedy decoding under logits processors is not the argmax chain: every row is decoded."""
    model, tokenizer = taught
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    counter = _CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    exact_match(model, tokenizer, _examples(), 16, 4, "penalised")
    assert counter.rows == len(_examples())


def test_a_near_tie_is_decoded_not_read(taught, monkeypatch):
    """A position whose argmax leads the runner-up by less than scoring.MARGIN is not vouched for: a cached
    decode can round the other way there (measured on an int4 export), so the row is decoded."""
    import pipeline.scoring as scoring

    model, tokenizer = taught
    logits = torch.tensor([[2.0, 1.5, 0.0], [3.0, 0.0, 1.0]])
    assert scoring.confident_argmax(logits).tolist() == [-1, 0]  # 0.5 < MARGIN (1.0); 2.0 >= MARGIN
    monkeypatch.setattr(scoring, "MARGIN", 1e9)  # no position is confident enough: every row is decoded
    counter = _CountingGenerate(model)
    monkeypatch.setattr(model, "generate", counter)
    em, outputs = exact_match(model, tokenizer, _examples(), 16, 4, "near ties")
    assert counter.rows >= len(_examples())  # every row (a shown miss cut short: once more, to its end)
    assert em == pytest.approx(5 / 9)


def test_an_onnx_model_reads_the_same_answers_from_logits_at_the_answer_positions(taught, tmp_path):
    """ONNX models get the output head at the answer positions only (``logits_to_keep``, on the fused sidecar)
    as PyTorch ones do: the pass vouches for the same rows with the same perplexity, and exact match read from
    it equals exact match by decoding the export."""
    from exporters.fused_graph import write_fused
    from exporters.onnx import export_onnx_fp32, load_onnx_model

    model, tokenizer = taught
    model.save_pretrained(tmp_path / "taught")
    tokenizer.save_pretrained(tmp_path / "taught")
    export_onnx_fp32(tmp_path / "taught", tmp_path / "onnx")
    write_fused(tmp_path / "onnx" / "model.onnx", max_length=128)
    onnx_model = load_onnx_model(tmp_path / "onnx", 1)
    assert onnx_model.decoder.fused is not None
    examples = _examples()
    want = answer_pass(model, tokenizer, examples, 256, 4, 16)
    kept, logits = [], onnx_model.decoder.logits
    onnx_model.decoder.logits = lambda *a, keep=None, **k: kept.append(keep) or logits(*a, keep=keep, **k)
    got = answer_pass(onnx_model, tokenizer, examples, 256, 4, 16)
    assert kept and all(k is not None and k < 16 for k in kept)  # never the full width
    assert got.greedy_hit == want.greedy_hit and got.answer == want.answer
    assert got.tokens == want.tokens and got.perplexity == pytest.approx(want.perplexity, rel=1e-4)
    assert exact_match(onnx_model, tokenizer, examples, 16, 4, "read", checked=got) == \
        exact_match(onnx_model, tokenizer, examples, 16, 4, "decode", verify=False)


def test_the_shared_opening_runs_once_and_changes_nothing(taught, monkeypatch):
    """Rows that open alike (the chat template's system turn, a task's instruction) continue from one key/value
    cache of that opening: the same perplexity and the same rows vouched for as running every row whole, on
    a plain model and through a LoRA adapter; a row's own tokens are never shared."""
    from peft import LoraConfig, get_peft_model

    import pipeline.data as data
    import pipeline.scoring as scoring

    model, tokenizer = taught
    examples = _examples()
    encoded, _ = scoring.reference_rows(tokenizer, examples, 256)
    opening = data.shared_prefix(encoded)
    prompts = [tokenizer(scoring.render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"] for e in examples]
    assert 0 < opening < min(len(p) for p in prompts)  # the system turn at least, and never a whole prompt
    assert all(p[:opening] == prompts[0][:opening] for p in prompts)
    assert data.shared_prefix(encoded[:1]) == 0
    torch.manual_seed(3)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batches = [encoded[i:i + 4] for i in range(0, len(encoded), 4)]
    for subject in (model, lora):
        fed = []
        hook = subject.register_forward_pre_hook(
            lambda _m, args, kwargs, fed=fed: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        shared = answer_pass(subject, tokenizer, examples, 256, 4, 16)
        hook.remove()
        # per batch: the opening (1 x P), then the batch's rows without it
        assert fed == [shape for rows in batches for shape in
                       ((1, opening), (len(rows), max(len(r["input_ids"]) for r in rows) - opening))]
        monkeypatch.setattr(data, "shared_prefix", lambda rows: 0)
        whole = answer_pass(subject, tokenizer, examples, 256, 4, 16)
        monkeypatch.undo()
        assert shared.greedy_hit == whole.greedy_hit and shared.answer == whole.answer
        assert shared.tokens == whole.tokens and shared.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    lora.unload()

    class NoCache(torch.nn.Module):  # a model that returns no key/value cache: every row runs whole
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner, self.generation_config = inner, inner.generation_config

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.past_key_values = None
            return out

    monkeypatch.setattr(data, "shared_prefix", lambda rows: 0)
    whole = answer_pass(model, tokenizer, examples, 256, 4, 16)
    monkeypatch.undo()
    uncached = answer_pass(NoCache(model), tokenizer, examples, 256, 4, 16)
    assert uncached.greedy_hit == whole.greedy_hit and uncached.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
