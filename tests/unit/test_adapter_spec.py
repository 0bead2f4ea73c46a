"""AdapterSpec: every method's tune output described once, the same from the manifest as from its files,
and malformed configs refused with the file and the problem named."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.adapter_spec import (
    ADAPTER_CONFIG,
    MANIFEST_KEY,
    SPARSE_DELTA_CONFIG,
    AdapterSpec,
    AdapterSpecError,
    kv_layout,
    read_spec,
    spec_from_files,
)
from pipeline.artifacts import write_manifest
from pipeline.errors import EdgetuneError
from pipeline.methods import METHODS, get_method

EXPECTED_KIND = {"lora": "lora", "qlora": "lora", "dora": "dora", "ia3": "ia3", "prefix": "prefix",
                 "prompt": "prompt", "ptuning": "ptuning", "pir": "pir", "full": "full", "ulmfit": "full"}


def test_every_registered_method_has_an_expected_kind() -> None:
    assert set(EXPECTED_KIND) == set(METHODS)  # a new method needs its row here (and a kind in AdapterSpec)


@pytest.fixture(scope="module")
def tuned(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> folder holding what tune saves for that method (untrained: the shape is what matters)."""
    import torch

    from pipeline.config import load_config
    from pipeline.tune import load_base_for_training

    root = tmp_path_factory.mktemp("tuned")
    out = {}
    for name in sorted(METHODS):
        torch.manual_seed(0)
        method = get_method(name)
        cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"method={name}"])
        model = method.apply(load_base_for_training(method, tiny_model_dir, "cpu"), cfg, data=None)
        folder = root / name
        folder.mkdir()
        method.save(model, folder) if method.save else model.save_pretrained(folder, safe_serialization=True)
        out[name] = folder
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_tune_output_round_trips_through_the_manifest_and_matches_its_files(name: str, tuned, tiny_model_dir) -> None:
    from pipeline.tune import describe

    folder = tuned[name]
    method = get_method(name)
    spec = describe(method, folder)  # what tune writes into its manifest
    assert spec.kind == EXPECTED_KIND[name]
    assert (spec.mergeable, spec.prompt_learning, spec.full_model) == \
        (method.mergeable, method.prompt_learning, method.full_model)
    assert all((folder / f).is_file() for f in spec.files) and spec.files
    assert AdapterSpec.from_manifest(json.loads(json.dumps(spec.to_manifest()))) == spec

    assert read_spec(folder) == spec  # no manifest yet: from the files
    write_manifest(folder, stage="tune", fp="x", inputs={}, config_hash="", extra={MANIFEST_KEY: spec.to_manifest()})
    assert read_spec(folder) == spec == read_spec(folder, trust_manifest=False)

    if spec.kind in ("lora", "dora"):
        assert spec.peft_type == "LORA" and spec.rank == 4 and spec.alpha == 8 and len(spec.targets) == 14
    elif spec.kind == "ia3":
        assert spec.feedforward_modules and set(spec.feedforward_modules) <= set(spec.targets)
    elif spec.prompt_learning:
        assert spec.num_virtual_tokens == 20 and spec.peft
        from transformers import AutoConfig

        expected = kv_layout(AutoConfig.from_pretrained(tiny_model_dir)) if spec.kind == "prefix" else None
        assert spec.kv_layout == expected
    elif spec.kind == "pir":
        assert spec.targets and not spec.peft and spec.rank is None
    else:
        assert spec.full_model and "config.json" in spec.files and not spec.peft


def test_the_manifest_entry_is_what_is_read(tmp_path: Path) -> None:
    """Stages trust tune's manifest: its entry wins over the folder's files; the server can opt out."""
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    written = AdapterSpec(kind="prompt", peft_type="PROMPT_TUNING", num_virtual_tokens=3)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "tune", MANIFEST_KEY: written.to_manifest()}))
    assert read_spec(tmp_path) == written
    assert read_spec(tmp_path, trust_manifest=False).rank == 8


def test_kv_layout_of_a_model_config() -> None:
    gqa = SimpleNamespace(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert kv_layout(gqa) == (3, 2, 16)
    assert kv_layout(SimpleNamespace(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, head_dim=6)) == (1, 2, 6)


@pytest.mark.parametrize("content, problem", [
    (b"[1, 2]", "must hold a JSON object, got list"),
    (b"{not json", "is not valid JSON"),
    (b'{"peft_type": "LORA", "r": "\xff\xfe"}', "is not UTF-8 text"),
    (b'{"peft_type": "LORA", "r": "abc"}', "r must be a positive integer, got 'abc'"),
    (b'{"peft_type": "LORA", "r": [4]}', "r must be a positive integer, got [4]"),
    (b'{"peft_type": "LORA", "r": true}', "r must be a positive integer, got True"),
    (b'{"peft_type": "LORA"}', "r is missing"),
    (b'{"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": -1}}', "rank_pattern['q_proj'] must be a positive"),
    (b'{"peft_type": "LORA", "r": 4, "lora_alpha": "8"}', "lora_alpha must be a finite number"),
    (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "lora_alpha must be a finite number, got nan"),
    (b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}', "lora_alpha must be a finite number, got inf"),
    (b'{"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj": "x"}}', "alpha_pattern must be an object of"),
    (b'{"peft_type": "LORA", "r": 4, "rank_pattern": [4]}', "rank_pattern must be an object, got [4]"),
    (b'{"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": "4"}}', "rank_pattern['q_proj'] must be a positive"),
    (b'"LORA"', "must hold a JSON object, got str"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"peft_type": "LORA", "r": 4, "target_modules": [1]}', "target_modules must be a string or a list of strings"),
    (b'{"peft_type": "LORA", "r": 4, "use_dora": "yes"}', "use_dora must be true or false"),
    (b'{"peft_type": 3}', "peft_type must be a string"),
    (b'{"r": 4}', "peft_type is missing"),
    (b'{"peft_type": "LOHA"}', "PEFT type LOHA is not supported"),
    (b'{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}', "num_virtual_tokens must be a positive integer"),
])
def test_a_malformed_adapter_config_names_the_file_and_the_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / ADAPTER_CONFIG).write_bytes(content)
    with pytest.raises(AdapterSpecError) as err:
        read_spec(tmp_path)
    assert problem in err.value.problem and err.value.path == tmp_path / ADAPTER_CONFIG
    assert str(err.value).startswith(f"{tmp_path / ADAPTER_CONFIG}: ") and isinstance(err.value, EdgetuneError)


def test_options_that_change_the_base_are_named(tmp_path: Path) -> None:
    """The server refuses them (an adapter may only add its own weights): the spec names every one it finds."""
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"],
              "layer_replication": [[0, 1]], "bias": "all", "lora_bias": False, "trainable_token_indices": None}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    spec = read_spec(tmp_path)
    assert spec.base_changes == ("bias", "layer_replication", "modules_to_save")
    assert AdapterSpec.from_manifest(spec.to_manifest()) == spec
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": None, "layer_replication": None,
                                                       "bias": "none"}))
    assert read_spec(tmp_path).base_changes == ()


def test_other_folders_that_are_not_adapters(tmp_path: Path) -> None:
    with pytest.raises(AdapterSpecError, match="it is not an adapter"):
        spec_from_files(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterSpecError, match="no safetensors weights"):
        spec_from_files(tmp_path)
    (tmp_path / SPARSE_DELTA_CONFIG).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdapterSpecError, match="is not 'edgetune-sparse-delta'"):
        spec_from_files(tmp_path)


@pytest.mark.parametrize("entry, problem", [
    ("lora", "adapter must be a JSON object, got str"),
    ({"kind": "loha"}, "adapter.kind 'loha' is not one of"),
    ({"rank": 4}, "adapter.kind is missing"),
    ({"kind": "prefix", "kv_layout": [2, 2]}, "adapter.kv_layout must be 3 positive integers"),
    ({"kind": "lora", "rank": "4"}, "adapter.rank must be a positive integer"),
])
def test_a_malformed_manifest_entry_is_refused(tmp_path: Path, entry, problem: str) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({MANIFEST_KEY: entry}))
    with pytest.raises(AdapterSpecError) as err:
        read_spec(tmp_path)
    assert problem in err.value.problem and err.value.path == tmp_path / "manifest.json"
