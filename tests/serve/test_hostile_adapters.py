"""Hostile adapter folders and names POSTed to a running app (in-process, tiny model): each is a 4xx with its
reason, the server keeps answering, and the base's and a resident good adapter's greedy answers stay the same.
Also: a load that fails inside PEFT leaves nothing behind, a bad folder at start-up is one failed entry, an
evicted adapter whose files went bad answers 422 at once, and requests admitted just after DELETE get 404."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.serve.adapter_kinds import build_adapter, worker_held
from tests.serve.test_server import _in_process, _until

PROMPTS = ("Review: great mug",)
LORA_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def greedy(client, model: str, prompt: str, max_tokens: int = 8) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def cards(client) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def kinds(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good adapters of the kinds the hostile ones are made from (built once)."""
    out = tmp_path_factory.mktemp("kinds")
    for kind in ("lora", "ia3", "prompt", "prefix", "pir"):
        build_adapter(kind, tiny_model_dir, out / kind)
    return out


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, kinds: Path, tmp_path_factory: pytest.TempPathFactory):
    """(client, engine, root, answers): the app with resident adapter ``good``, and the greedy answers of the
    base and ``good`` on every prompt before anything hostile came."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(kinds / "lora", root / "good")
    with _in_process(tiny_model_dir, root) as (client, engine):
        models = (tiny_model_dir.name, "good")
        answers = {(m, p): greedy(client, m, p) for m in models for p in PROMPTS}
        assert answers[models[0], PROMPTS[0]] != answers["good", PROMPTS[0]]  # the adapter really changes answers
        yield client, engine, root, answers


def _copy(kinds: Path, kind: str, folder: Path) -> Path:
    shutil.copytree(kinds / kind, folder)
    return folder


def _tensors(folder: Path, edit: Callable[[dict], None], file: str = "adapter_model.safetensors") -> None:
    tensors = load_file(folder / file)
    edit(tensors)
    save_file(tensors, folder / file)


def _config(folder: Path, content: bytes | dict) -> None:
    config = folder / "adapter_config.json"
    if isinstance(content, dict):
        content = json.dumps({**json.loads(config.read_text()), **content}).encode()
    config.write_bytes(content)


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def _scaled(key: str, value: float) -> Callable[[dict], None]:
    return lambda tensors: tensors[key].fill_(value)


# case -> (kind to start from, how to spoil it, a fragment of the refusal)
CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "base-embedding-key": ("lora", lambda f: _tensors(f, _set("base_model.model.model.embed_tokens.weight",
                                                              torch.full((484, 64), 3.0))), "embed_tokens.weight"),
    "base-layer-key": ("lora", lambda f: _tensors(f, _set(
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", torch.zeros(64, 64))), "base_layer"),
    "unexpected-key": ("lora", lambda f: _tensors(f, _set("something.else", torch.zeros(2))), "something.else"),
    "untargeted-module": ("lora", lambda f: _config(f, {"target_modules": ["v_proj"]}), "does not name"),
    "wrong-shape": ("lora", lambda f: _tensors(f, _set(LORA_B, torch.zeros(67, 4))), "does not fit"),
    "huge-values": ("lora", lambda f: _tensors(f, _scaled(LORA_B, 3e38)), "beyond the server's bound"),
    "nan": ("lora", lambda f: _tensors(f, _scaled(LORA_B, float("nan"))), "non-finite"),
    "inf": ("lora", lambda f: _tensors(f, _scaled(LORA_B, float("inf"))), "non-finite"),
    "integer-weights": ("lora", lambda f: _tensors(f, lambda t: t.__setitem__(LORA_B, t[LORA_B].to(torch.int32))),
                        "floating point"),
    "huge-alpha": ("lora", lambda f: _config(f, {"lora_alpha": 1e300}), "beyond the server's bound"),
    "ia3-wrong-role": ("ia3", lambda f: _tensors(f, _set("base_model.model.model.layers.0.mlp.down_proj.ia3_l",
                                                         torch.ones(64, 1))), "scales its input"),
    "ia3-wrong-length": ("ia3", lambda f: _tensors(f, _set("base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
                                                           torch.ones(64, 1))), "must be (32, 1)"),
    "too-many-virtual-tokens": ("prompt", lambda f: (_config(f, {"num_virtual_tokens": 300}), _tensors(
        f, _set("prompt_embeddings", torch.zeros(300, 64)))), "leave no room in the context"),
    "virtual-table-mismatch": ("prompt", lambda f: _tensors(f, _set("prompt_embeddings", torch.zeros(9, 64))),
                               "(6, 64)"),
    "prefix-wrong-width": ("prefix", lambda f: _tensors(f, _set("prompt_embeddings", torch.zeros(6, 64))), "(6, 128)"),
    "huge-virtual-tokens": ("prompt", lambda f: _tensors(f, _scaled("prompt_embeddings", 3e38)), "bound"),
    "pir-outside-weight": ("pir", lambda f: _tensors(f, lambda t: t["model.layers.0.self_attn.q_proj.indices"].fill_(
        64 * 64), "sparse_delta.safetensors"), "falls outside"),
    "pir-unlisted-module": ("pir", lambda f: _tensors(f, lambda t: t.update({"model.embed_tokens.values": torch.ones(1),
                                                                            "model.embed_tokens.indices": torch.zeros(
                                                                                1, dtype=torch.long)}),
                                                      "sparse_delta.safetensors"), "does not list"),
    "config-list": ("lora", lambda f: _config(f, b"[1, 2]"), "must hold a JSON object, got list"),
    "config-string": ("lora", lambda f: _config(f, b'"LORA"'), "must hold a JSON object, got str"),
    "config-not-utf8": ("lora", lambda f: _config(f, b'{"peft_type": "LORA", "r": "\xff"}'), "not UTF-8"),
    "config-deep": ("lora", lambda f: _config(f, b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    "config-r-text": ("lora", lambda f: _config(f, {"r": "abc"}), "r must be a positive integer"),
    "config-r-list": ("lora", lambda f: _config(f, {"r": [4]}), "r must be a positive integer"),
    "config-rank-pattern": ("lora", lambda f: _config(f, {"rank_pattern": ["q_proj"]}), "rank_pattern must be"),
    "config-alpha-text": ("lora", lambda f: _config(f, {"lora_alpha": "x"}), "lora_alpha must be a finite number"),
    "config-modules-to-save": ("lora", lambda f: _config(f, {"modules_to_save": ["embed_tokens"]}),
                               "modules_to_save"),
    "config-layer-replication": ("lora", lambda f: _config(f, {"layer_replication": [[0, 2], [0, 2]]}),
                                 "layer_replication"),
    "file-link-out-of-root": ("lora", lambda f: _link_out(f), "leaves the adapter root"),
    "file-link-loop": ("lora", lambda f: (os.remove(f / "adapter_config.json"),
                                          os.symlink(f / "adapter_config.json", f / "adapter_config.json")),
                       "symlink loop"),
}


def _link_out(folder: Path) -> None:
    outside = folder.parent.parent / f"outside-{folder.name}.safetensors"
    shutil.move(folder / "adapter_model.safetensors", outside)
    os.symlink(outside, folder / "adapter_model.safetensors")


def _still_the_same(client, answers: dict) -> None:
    for (model, prompt), text in answers.items():
        assert greedy(client, model, prompt) == text, f"{model!r} answers differently on {prompt!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_adapter_is_a_4xx_and_changes_nobodys_answers(case: str, served, kinds: Path) -> None:
    client, engine, root, answers = served
    kind, spoil, reason = CASES[case]
    spoil(_copy(kinds, kind, root / case))
    r = client.post("/v1/adapters", json={"name": case, "source": case})
    assert 400 <= r.status_code < 500, r.text
    message = r.json()["error"]["message"]
    assert reason in message and str(root) not in message
    assert cards(client)[case]["state"] == "failed" and cards(client)[case]["reason"] == message
    _still_the_same(client, answers)
    assert client.post("/v1/completions", json={"model": case, "prompt": "hi"}).status_code == 404


@pytest.mark.parametrize("name, source, status", [
    ("nul", "bad\x00name", 400), ("long-source", "x" * 5000, 400), ("x" * 5000, "good", 400),
    ("loop", "loop", 422), ("missing", "not-there", 404),
])
def test_hostile_names_and_sources_are_a_4xx(name: str, source: str, status: int, served) -> None:
    client, engine, root, answers = served
    if source == "loop" and not (root / "loop").is_symlink():
        os.symlink(root / "loop", root / "loop")  # the folder itself is a link to itself
    r = client.post("/v1/adapters", json={"name": name, "source": source})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    _still_the_same(client, answers)


def test_a_load_that_fails_inside_peft_leaves_nothing_behind(served, kinds: Path) -> None:
    """Intake passes (rank 4 <= max_rank), PEFT builds q_proj at rank 2 and then cannot place rank-4 weights."""
    client, engine, root, answers = served
    _config(_copy(kinds, "lora", root / "halfway"), {"rank_pattern": {"q_proj": 2}})
    before = set(engine.model.peft_config)
    r = client.post("/v1/adapters", json={"name": "halfway"})
    assert r.status_code == 422 and "failed to load" in r.json()["error"]["message"], r.text
    assert set(engine.model.peft_config) == before
    leftovers = [n for n, _ in engine.model.named_parameters() if "lora_" in n
                 and not any(f".{name}." in n or n.endswith(f".{name}") for name in before)]
    assert leftovers == []
    shutil.copytree(kinds / "lora", root / "after")  # the next load and every completion still work
    assert client.post("/v1/adapters", json={"name": "after"}).status_code == 200
    assert greedy(client, "after", PROMPTS[0]) == answers["good", PROMPTS[0]]  # the same weights as good
    _still_the_same(client, answers)
    assert client.delete("/v1/adapters/after").json()["deleted"] is True


def test_a_bad_folder_at_start_up_is_one_failed_entry(tiny_model_dir: Path, kinds: Path, tmp_path: Path) -> None:
    _config(_copy(kinds, "lora", tmp_path / "broken"), b"[1, 2]")
    _copy(kinds, "lora", tmp_path / "fine")
    with _in_process(tiny_model_dir, tmp_path) as (client, _):
        listed = cards(client)
        assert listed["fine"]["state"] == "ready"
        assert listed["broken"]["state"] == "failed" and "must hold a JSON object" in listed["broken"]["reason"]
        assert greedy(client, "fine", "hi")


def test_an_evicted_adapter_whose_files_went_bad_answers_422_at_once(tiny_model_dir: Path, kinds: Path,
                                                                      tmp_path: Path) -> None:
    for name in ("first", "second"):
        _copy(kinds, "lora", tmp_path / name)
    with _in_process(tiny_model_dir, tmp_path, max_loaded_adapters=1, preload=False) as (client, _):
        for name in ("first", "second"):  # room for one: first is evicted
            assert client.post("/v1/adapters", json={"name": name}).status_code == 200
        assert cards(client)["first"]["state"] == "evicted"
        _config(tmp_path / "first", b'"not a config"')
        started = time.monotonic()
        r = client.post("/v1/completions", json={"model": "first", "prompt": "hi", "max_tokens": 2})
        assert time.monotonic() - started < 30
        assert r.status_code == 422 and "first" in r.json()["error"]["message"], r.text
        assert cards(client)["first"]["state"] == "failed"
        assert greedy(client, "second", "hi")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_admitted_just_after_delete_is_a_404(stream: bool, served, kinds: Path) -> None:
    client, engine, root, answers = served
    if not (root / "doomed").exists():
        _copy(kinds, "lora", root / "doomed")
    assert client.post("/v1/adapters", json={"name": "doomed"}).status_code == 200
    body = {"model": "doomed", "prompt": "hi", "max_tokens": 4, "stream": stream}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with worker_held(engine):  # accepted (queued), then the unload is queued before it is admitted
            sent = pool.submit(client.post, "/v1/completions", json=body)
            _until(lambda: engine.queue_depth() == 1)
            deleted = pool.submit(client.delete, "/v1/adapters/doomed")
            _until(lambda: engine.commands.qsize() == 1)
        assert deleted.result(timeout=60).json()["deleted"] is True
        r = sent.result(timeout=60)
    assert r.status_code == 404, r.text
    assert "doomed" in r.json()["error"]["message"] and r.json()["error"]["code"] == "model_not_found"
    _still_the_same(client, answers)

