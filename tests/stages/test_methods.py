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
from pipeline.methods.pir import delta_layers, target_linears
from pipeline.models import load_model, load_tokenizer
from pipeline.tune import load_base_for_training
from pipeline.tuned import load_tuned, merge_tuned


def _train_two_steps(model, tokenizer, out: Path, prompt_learning: bool) -> None:
    from transformers import Trainer, TrainingArguments

    rows = load_examples("data/tasks/sentiment/train.jsonl")[:8]
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=encode_all(tokenizer, rows, 192, "train"),
            data_collator=partial(collate_for_training, pad_id=tokenizer.pad_token_id,
                                  slice_logits=not prompt_learning)).train()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_only_its_parameters_reloads_and_merges(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"method={name}"])
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    method = get_method(name)
    rows = encode_all(tokenizer, load_examples("data/tasks/sentiment/train.jsonl")[:16], 192, "train")
    model = method.apply(load_base_for_training(method, tiny_model_dir, "cpu"), cfg, data=rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (method.full_model or len(trainable) < len(before))  # adapters freeze the base

    _train_two_steps(model, tokenizer, tmp_path / "ckpt", prompt_learning=method.prompt_learning)
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    trained_unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert frozen_changed == [] and trained_unchanged == []

    model.eval()
    batch = tokenizer(["Review: great mug.\nLabel the sentiment.", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    saved = tmp_path / "adapter"
    saved.mkdir()
    method.save(model, saved) if method.save else model.save_pretrained(saved)
    if method.full_model:
        reloaded = load_model(saved)
    elif method.save:  # its own format (PIR's sparse delta) on the full-precision base
        reloaded = load_tuned(saved, tiny_model_dir)
    else:
        reloaded = PeftModel.from_pretrained(load_base_for_training(method, tiny_model_dir, "cpu"), saved).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(reloaded.generate(**batch, **generate), model.generate(**batch, **generate))
        if method.mergeable and not method.full_model:  # merge folds the delta into the full-precision base
            unmerged = load_tuned(saved, tiny_model_dir)
            reference = unmerged(**batch).logits
            merged = merge_tuned(copy.deepcopy(unmerged))
            assert not isinstance(merged, PeftModel) and not delta_layers(merged)
            assert (merged(**batch).logits - reference).abs().max().item() < 1e-4


def test_qlora_uses_paged_adamw_on_cuda_and_says_when_it_falls_back() -> None:
    from pipeline.tune import choose_optimizer

    qlora = get_method("qlora")
    assert qlora.base_quantization == "nf4"
    assert choose_optimizer(qlora, "cuda") == ("paged_adamw_32bit", None)
    optim, note = choose_optimizer(qlora, "cpu")
    assert optim == "adamw_torch" and "no paged optimizer on cpu" in note
    assert choose_optimizer(get_method("lora"), "cpu") == ("adamw_torch", None)


def test_methods_listing_counts_trainable_parameters(tiny_model_dir: Path, capsys) -> None:
    from pipeline.cli import main

    assert main(["methods", "--config", "configs/tiny.yaml", "--set", f"base={tiny_model_dir}"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(METHODS) <= set(lines)
    assert "(100.000%)" in lines["full"]
    share = {name: float(lines[name].split("(")[1].split("%")[0]) for name in METHODS}
    assert share["ia3"] < share["lora"] < share["full"] and share["qlora"] == share["lora"]  # all-linear either way
    assert share["prompt"] < share["ptuning"] and share["prompt"] < share["prefix"] < share["lora"]
    linear = sum(m.weight.numel() for m in target_linears(load_model(tiny_model_dir), "all-linear").values())
    assert int(lines["pir"].split()[2].replace(",", "")) == int(0.01 * linear)  # the top 1% of the linear weights


def test_prefix_from_text_equals_running_the_text_first(tiny_model_dir: Path) -> None:
    """prompt.init_text starts a prefix from the base's own keys/values: before training, the prefixed model
    gives the logits the base gives after reading that text."""
    text = "Label the sentiment of the review."
    cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", "method=prefix", f"prompt.init_text={text}",
                                            "prompt.num_virtual_tokens=7"])
    tokenizer = load_tokenizer(tiny_model_dir)
    model = get_method("prefix").apply(load_model(tiny_model_dir), cfg).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (7 // len(ids) + 1))[:7]
    x = tokenizer(["Review: great mug."], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        prefixed = model(**x).logits
        reference = model.get_base_model()(input_ids=torch.tensor([ids + x["input_ids"][0].tolist()])).logits[:, 7:]
        random_start = get_method("prefix").apply(load_model(tiny_model_dir), load_config(
            "configs/tiny.yaml", [f"base={tiny_model_dir}", "method=prefix", "prompt.num_virtual_tokens=7"]))(**x).logits
    assert (prefixed - reference).abs().max().item() < 1e-4
    assert (random_start - reference).abs().max().item() > 1e-2  # the check can tell the two apart
