"""Task data: formats, loss only on completion tokens, truncation, malformed rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.data import IGNORE_INDEX, encode, encode_all, load_examples, render_prompt
from pipeline.errors import DataError
from pipeline.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_formats_and_csv(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"text": "plain text"},
    ]
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.reference for e in ex] == ["4", "hello", None]
    assert ex[1].prompt_messages[0] == {"role": "system", "content": "be brief"}
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, b",c\n')
    (csv_row,) = load_examples(tmp_path / "d.csv")
    assert csv_row.prompt_messages[0]["content"] == "a, b" and csv_row.reference == "c"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"', "not valid JSON"),
    ('["x"]', "expected a JSON object"),
    ('{"input": "x", "output": "y"}', "unrecognised row"),
    ('{"prompt": "x", "completion": ""}', "non-empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0]"),
])
def test_malformed_row_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "x.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_examples(tmp_path / "e.jsonl")


def test_loss_only_on_completion_and_stop_token(tmp_path: Path, tokenizer) -> None:
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is it?", "completion": "a cat"}]))
    enc, truncated = encode(tokenizer, ex, 256)
    assert not truncated
    target = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target) == "a cat<|im_end|>"
    # The unlabeled prefix is exactly the chat-templated generation prompt used at evaluation time.
    prompt_ids = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE_INDEX]
    assert tokenizer.decode(prompt_ids) == render_prompt(tokenizer, ex)
    assert render_prompt(tokenizer, ex).startswith("<|im_start|>system")


def test_every_assistant_turn_is_a_target(tmp_path: Path, tokenizer) -> None:
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    enc, _ = encode(tokenizer, ex, 256)
    target = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target) == "b<|im_end|>d<|im_end|>"


def test_truncation_is_counted_in_a_warning(tmp_path: Path, tokenizer, caplog) -> None:
    rows = [{"prompt": "word " * 50, "completion": "x"}, {"prompt": "short", "completion": "y"}]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    with caplog.at_level(logging.WARNING):
        encoded = encode_all(tokenizer, examples, 40, "d.jsonl")
    assert max(len(e["input_ids"]) for e in encoded) == 40
    assert "1 of 2 examples are longer than max_seq_len=40" in caplog.text


def test_training_batch_loss_equals_full_logits_loss(tmp_path: Path, tokenizer, tiny_model_dir: Path) -> None:
    """Keeping only the target positions' logits gives the same loss as computing all of them."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data import collate, collate_for_training

    rows = [{"prompt": "a longer prompt here " * 3, "completion": "yes"}, {"prompt": "hi", "completion": "a long answer"}]
    encoded = encode_all(tokenizer, load_examples(write_jsonl(tmp_path / "d.jsonl", rows)), 256, "d")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    train_batch = collate_for_training(encoded, tokenizer.pad_token_id)
    assert train_batch["logits_to_keep"] < train_batch["input_ids"].shape[1]
    full = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        kept = model(**train_batch).loss
        reference = model(**full).loss
    assert kept.item() == pytest.approx(reference.item(), rel=1e-5)


def test_a_shared_opening_trains_as_whole_rows(tmp_path: Path, tokenizer, tiny_model_dir: Path) -> None:
    """Rows that open alike train from one forward of their opening (its cache repeated for every row): the
    same loss and the same gradients as the rows run whole, through a LoRA adapter; a row's targets are never
    part of the opening, and an opening the rows do not share is refused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.data import collate_for_training, shared_prefix
    from pipeline.opening import with_opening

    rows = [{"messages": [{"role": "system", "content": "Label the review."}, {"role": "user", "content": u},
                          {"role": "assistant", "content": a}]}
            for u, a in [("great mug, would buy again", "positive"), ("broke", "negative"), ("fine", "neutral")]]
    encoded = encode_all(tokenizer, load_examples(write_jsonl(tmp_path / "d.jsonl", rows)), 256, "d")
    opening = shared_prefix(encoded)
    shared = collate_for_training(encoded, tokenizer.pad_token_id, opening=opening)
    whole = collate_for_training(encoded, tokenizer.pad_token_id)
    assert opening > 5 and shared["opening_ids"].tolist() == [encoded[0]["input_ids"][:opening]]
    assert shared["input_ids"].shape[1] == whole["input_ids"].shape[1] - opening
    assert torch.equal(shared["labels"], whole["labels"])  # every target stays with its row
    assert shared_prefix(encoded[:1]) == 0
    for wrong in (opening + 1, len(encoded[1]["input_ids"]) - 1):  # rows that differ there; a target inside
        with pytest.raises(ValueError, match="do not share their first"):
            collate_for_training(encoded, tokenizer.pad_token_id, opening=wrong)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    losses, grads = [], []
    for inputs in (with_opening(model, shared), whole):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     ":2: not valid UTF-8 (byte 0xe9 at column 16)"),
    ("bad.csv", b"prompt,completion\na,b\n\xff,b\n", ":3: not valid UTF-8 (byte 0xff at column 1)"),
    ("deep.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     ":2: not valid JSON (nested too deeply to read)"),
    ("deep.csv", b'messages\n"' + b"[" * 60_000 + b"]" * 60_000 + b'"\n', ":2: not valid JSON (nested too deeply"),
    ("huge.csv", b'messages\n"' + b"[" * 100_000 + b"]" * 100_000 + b'"\n', ":2: not valid CSV (field larger"),
    ("surrogate.jsonl", b'{"prompt": "a\\ud800", "completion": "b"}\n', ":1: text holds a lone surrogate"),
], ids=["jsonl-latin1", "csv-latin1", "jsonl-deep", "csv-deep", "csv-huge", "surrogate"])
def test_undecodable_or_too_deep_rows_name_file_and_line(tmp_path: Path, name: str, content: bytes,
                                                         message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}{message}")
