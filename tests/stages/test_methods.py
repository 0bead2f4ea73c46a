"""Every registered method on the tiny model: trains only what it says, reloads exactly, merges faithfully."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import collate_for_training, encode_all, load_examples
from pipeline.methods import METHODS, get_method
from pipeline.models import load_model, load_tokenizer


def _train_two_steps(model, tokenizer, out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    rows = load_examples("data/tasks/sentiment/train.jsonl")[:8]
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=encode_all(tokenizer, rows, 192, "train"),
            data_collator=partial(collate_for_training, pad_id=tokenizer.pad_token_id)).train()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_only_its_parameters_reloads_and_merges(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"method={name}"])
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = get_method(name).apply(load_model(tiny_model_dir), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(before)

    _train_two_steps(model, tokenizer, tmp_path / "ckpt")
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    trained_unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert frozen_changed == [] and trained_unchanged == []

    model.eval()
    batch = tokenizer(["Review: great mug.\nLabel the sentiment.", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        if METHODS[name].mergeable:
            merged = copy.deepcopy(reloaded).merge_and_unload()
            assert (merged(**batch).logits - expected).abs().max().item() < 1e-4
