"""The server's adapter intake: names, sources under the root, safetensors only, validation against the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models import load_model
from serve.adapters import AdapterError, check_name, inspect_adapter, resolve_source


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def _save_lora(tiny_model_dir: Path, out: Path, r: int = 4, safe: bool = True) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=safe)
    return out


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "a\\b", "", ".hidden", "x" * 65, None, 3])
def test_unsafe_names_are_refused(name) -> None:
    with pytest.raises(AdapterError, match="not allowed"):
        check_name(name)
    assert check_name("sentiment-v2.1") == "sentiment-v2.1"


@pytest.mark.parametrize("source", ["../outside", "/etc", "a/../../outside", "~/x", ""])
def test_sources_must_stay_under_the_root(source: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    with pytest.raises(AdapterError):
        resolve_source(root, source)
    assert resolve_source(root, "ok") == (root / "ok").resolve()


def test_a_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "sneaky").symlink_to(tmp_path / "secret")
    with pytest.raises(AdapterError, match="leaves the adapter root"):
        resolve_source(root, "sneaky")


def test_a_valid_lora_adapter_is_accepted(tiny_model_dir: Path, tmp_path: Path, base) -> None:
    info = inspect_adapter("ok", _save_lora(tiny_model_dir, tmp_path / "ok"), base, max_rank=8)
    assert info.kind == "lora" and info.rank == 4


def test_pickle_weights_are_refused_with_the_fix(tiny_model_dir: Path, tmp_path: Path, base) -> None:
    folder = _save_lora(tiny_model_dir, tmp_path / "pickled", safe=False)
    assert (folder / "adapter_model.bin").is_file()
    with pytest.raises(AdapterError, match="pickle files can run code") as err:
        inspect_adapter("pickled", folder, base, max_rank=8)
    assert err.value.status == 422 and "safe_serialization=True" in str(err.value)


def test_rank_above_max_rank_is_refused(tiny_model_dir: Path, tmp_path: Path, base) -> None:
    folder = _save_lora(tiny_model_dir, tmp_path / "big", r=16)
    with pytest.raises(AdapterError, match="rank 16 exceeds the server's max_rank 8"):
        inspect_adapter("big", folder, base, max_rank=8)


def test_wrong_shapes_and_non_finite_values_are_refused(tiny_model_dir: Path, tmp_path: Path, base) -> None:
    from safetensors.torch import load_file, save_file

    folder = _save_lora(tiny_model_dir, tmp_path / "shape")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    original = tensors[key]
    tensors[key] = torch.zeros(original.shape[0], original.shape[1] * 2)  # a base with twice the hidden size
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match="does not fit"):
        inspect_adapter("shape", folder, base, max_rank=8)

    tensors[key] = torch.full_like(original, float("nan"))
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match="non-finite"):
        inspect_adapter("shape", folder, base, max_rank=8)


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path: Path, base) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not an adapter"):
        inspect_adapter("empty", tmp_path / "empty", base, max_rank=8)


def test_a_malformed_config_is_a_422_naming_the_file_not_the_server_path(tiny_model_dir: Path, tmp_path: Path,
                                                                        base) -> None:
    import json

    folder = _save_lora(tiny_model_dir, tmp_path / "bad")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": "abc"}))
    with pytest.raises(AdapterError, match="bad/adapter_config.json: r must be a positive integer") as err:
        inspect_adapter("bad", folder, base, max_rank=8)
    assert err.value.status == 422 and str(tmp_path) not in str(err.value)


def test_a_manifest_in_an_uploaded_folder_is_not_trusted(tiny_model_dir: Path, tmp_path: Path, base) -> None:
    """The server describes what PEFT will load (the folder's files), not what a manifest claims."""
    import json

    folder = _save_lora(tiny_model_dir, tmp_path / "liar", r=16)
    (folder / "manifest.json").write_text(json.dumps({"adapter": {"kind": "lora", "peft_type": "LORA", "rank": 4}}))
    with pytest.raises(AdapterError, match="rank 16 exceeds the server's max_rank 8"):
        inspect_adapter("liar", folder, base, max_rank=8)
