"""Task data: read JSONL/CSV rows in TRL's conventions and turn them into training tensors.

Row formats (one per row, as TRL names them):
  - prompt/completion: ``{"prompt": "...", "completion": "..."}``
  - conversational:    ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
  - language modeling: ``{"text": "..."}``

When the tokenizer has a chat template, prompt/completion rows are rendered as one user turn and
one assistant turn. Loss is computed only on completion tokens (assistant turns, including the
end-of-turn token so the model learns to stop); ``text`` rows are trained on every token.
A malformed row raises DataError naming file and line, before any training starts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, read_utf8

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One validated row. Exactly one of ``messages`` and ``text`` is set."""

    messages: tuple[dict[str, str], ...] | None
    """The conversation; prompt/completion rows become one user and one assistant turn."""
    text: str | None
    """Plain text for language-modeling rows."""
    source: str
    """``file:line`` for error messages."""

    @property
    def reference(self) -> str | None:
        """The expected answer: the last assistant turn (None for text rows)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant turn."""
        assert self.messages is not None
        return list(self.messages[:-1] if self.reference is not None else self.messages)


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate every row of a ``.jsonl``/``.json`` or ``.csv`` file.

    Raises DataError for a missing/empty file or the first malformed row (with its line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the task's train/test paths in the config")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")
    examples = [_encodable(_to_example(row, f"{path}:{line}")) for line, row in rows]
    if not examples:
        raise DataError(f"{path}: no rows; a task needs at least one example")
    return examples


def split_validation(examples: list[Example], share: float, seed: int, what: str) -> tuple[list[Example], list[Example]]:
    """(train, validation): ``share`` of ``examples`` held out, chosen with ``seed`` (at least one row), each
    part in file order. Raises DataError when too few rows are left to train on."""
    import random

    count = max(1, round(share * len(examples)))
    if len(examples) - count < 1:
        raise DataError(f"{what}: {len(examples)} row(s) cannot spare tune.validation_share={share} for validation "
                        "and still train; add rows, lower the share, or name a tasks[].validation file")
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _parse_json(text: str, where: str, fix: str) -> Any:
    """``json.loads`` with its failures (nesting too deep to parse included) as DataError at ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        reason = exc.msg
    except RecursionError:
        reason = "nested too deeply to read"
    raise DataError(f"{where}: not valid JSON ({reason}); {fix}")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for line_no, line in enumerate(io.StringIO(read_utf8(path, DataError, "the file"), newline=None), start=1):
        if line.strip():
            rows.append((line_no, _parse_json(line, f"{path}:{line_no}", "each line must be one JSON object")))
    return rows


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    rows = []
    reader = csv.DictReader(io.StringIO(read_utf8(path, DataError, "the file"), newline=""))
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more fields than the header has columns")
            row = {k: v for k, v in row.items() if k is not None}
            if "messages" in row:
                row["messages"] = _parse_json(row["messages"], f"{path}:{reader.line_num}",
                                              "the messages column must hold a JSON list")
            rows.append((reader.line_num, row))
    except csv.Error as exc:  # e.g. a field over the csv module's size limit; line_num counts whole lines read
        raise DataError(f"{path}:{reader.line_num + 1}: not valid CSV ({exc})") from None
    return rows


def _to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    if {"prompt", "completion"} <= keys:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{where}: 'prompt' must be a string and 'completion' a non-empty string")
        return Example(({"role": "user", "content": prompt}, {"role": "assistant", "content": completion}), None, where)
    if "messages" in keys:
        return Example(_check_messages(row["messages"], where), None, where)
    if "text" in keys:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example(None, row["text"], where)
    raise DataError(
        f"{where}: unrecognised row with keys {sorted(keys)}; use prompt+completion, messages, or text"
    )


def _encodable(example: Example) -> Example:
    """``example`` if all its text is UTF-8-encodable (JSON can spell a lone surrogate, ``"\\ud800"``, that no
    tokenizer accepts), else DataError at its row."""
    texts = [example.text] if example.text is not None else [m["content"] for m in example.messages or ()]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{example.source}: text holds a lone surrogate ({text[exc.start]!a} at character "
                            f"{exc.start}), which is not Unicode text; fix the \\u escape") from None
    return example


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {list(_ROLES)}, \"content\": a string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
    return tuple(out)


def render_prompt(tokenizer, example: Example) -> str:
    """The text a model is given to produce ``example.reference`` (generation prompt included)."""
    messages = example.prompt_messages
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _segments(tokenizer, example: Example) -> list[tuple[str, bool]]:
    """Split an example into (text, is_target) pieces whose concatenation is the full sequence."""
    eos = tokenizer.eos_token or ""
    if example.text is not None:
        return [(example.text + eos, True)]
    messages = list(example.messages or ())
    if not tokenizer.chat_template:
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            target = m["role"] == "assistant"
            pieces.append((m["content"] + (eos if target else "\n"), target))
        return pieces
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{example.source}: the chat template does not render turns incrementally")
        answer = full[len(prefix):]
        if eos and eos in answer:  # learn the stop token, not the template's trailing newline
            answer = answer[: answer.rindex(eos) + len(eos)]
        pieces += [(prefix[len(done):], False), (answer, True)]
        done = prefix + answer
    return pieces


def encode(tokenizer, example: Example, max_len: int) -> tuple[dict[str, list[int]], bool]:
    """Token ids and labels (IGNORE_INDEX on non-target tokens), cut to ``max_len``.

    Returns the encoding and whether it was truncated.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, target) in enumerate(_segments(tokenizer, example)):
        # Chat templates carry their own special tokens; plain text gets the tokenizer's (e.g. BOS).
        piece = tokenizer(text, add_special_tokens=(i == 0 and not tokenizer.chat_template))["input_ids"]
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}, truncated


def encode_all(tokenizer, examples: list[Example], max_len: int, what: str) -> list[dict[str, list[int]]]:
    """Encode every example; warn once with the count of truncated ones."""
    encoded, cut = [], 0
    for ex in examples:
        enc, truncated = encode(tokenizer, ex, max_len)
        cut += truncated
        encoded.append(enc)
    if cut:
        log.warning("%s: %d of %d examples are longer than max_seq_len=%d and were truncated "
                    "(raise tune.max_seq_len to keep them whole)", what, cut, len(examples), max_len)
    empty = sum(all(label == IGNORE_INDEX for label in e["labels"]) for e in encoded)
    if empty:
        log.warning("%s: %d examples have no target tokens left after truncation", what, empty)
    return encoded


def shared_prefix(encoded: list[dict]) -> int:
    """How many leading tokens every encoded row has in common, short of each row's first target (the logit
    before a target must be computed with the row): a chat template's system prompt and a task's instruction.
    0 for fewer than two rows."""
    if len(encoded) < 2:
        return 0
    first = encoded[0]["input_ids"]
    limit = min(min((i for i, label in enumerate(e["labels"]) if label != IGNORE_INDEX), default=len(e["labels"]))
                for e in encoded) - 1
    length = 0
    while length < limit and all(e["input_ids"][length] == first[length] for e in encoded):
        length += 1
    return length


def left_padded(rows: list[list[int]] | list[Any], pad_id: int = 0) -> dict[str, Any]:
    """``rows`` (token ids, no padding) as one left-padded batch: ``input_ids``, ``attention_mask`` and
    ``position_ids`` counted from each row's first real token (a row computes as it would alone)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def collate_for_training(batch: list[dict[str, list[int]]], pad_id: int, slice_logits: bool = True,
                         opening: int = 0) -> dict[str, Any]:
    """Left-pad a training batch so every target token sits in the last ``logits_to_keep`` positions.

    The output head (vocab x hidden, a fifth of a small model's compute) then runs only where a
    loss is taken, not over the prompt: same loss, about a quarter less work per step. Position
    ids count from each row's first real token, as at generation time.

    ``opening`` > 0: the first ``opening`` tokens, which every row of the data set starts with
    (:func:`shared_prefix` over all of them: the chat template's system turn, the task's instruction), are
    returned once, as ``opening_ids`` (1 x ``opening``), and the rows without them;
    :func:`pipeline.opening.with_opening` turns that into model inputs that run the opening once per batch (a
    third to a half of each row on the bundled tasks). One opening for the whole data set, not each batch's own:
    a row is then computed the same way whichever rows share its batch (or its rank, under a launcher).

    ``slice_logits=False`` returns full-width labels and leaves logits and positions to the model:
    PEFT's prompt-learning models prepend virtual tokens (and their ignored labels) themselves.
    """
    import torch

    if opening and slice_logits:
        first = batch[0]["input_ids"][:opening]
        # the logit before a row's first target is computed with the row: no target within opening + 1
        if any(e["input_ids"][:opening] != first or any(t != IGNORE_INDEX for t in e["labels"][:opening + 1])
               for e in batch):
            raise ValueError(f"collate_for_training: the rows do not share their first {opening} tokens (or a target "
                             "lies among them); pass the shared_prefix of the data set they come from")
        rows = [{"input_ids": e["input_ids"][opening:], "labels": e["labels"][opening:]} for e in batch]
        return {**collate_for_training(rows, pad_id), "opening_ids": torch.tensor([first])}
    width = max(len(e["input_ids"]) for e in batch)
    keep = 1
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[row, width - n:] = torch.tensor(e["input_ids"])
        labels[row, width - n:] = torch.tensor(e["labels"])
        mask[row, width - n:] = 1
        first = next((i for i, label in enumerate(e["labels"]) if label != IGNORE_INDEX), n)
        keep = max(keep, n - first + 1)  # the logit before the first target predicts it
    keep = min(keep, width)
    if not slice_logits:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "labels": labels[:, width - keep:], "logits_to_keep": keep}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch with full-width labels (perplexity scoring): pad ids, IGNORE_INDEX labels, mask."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
