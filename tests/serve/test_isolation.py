"""Adapter isolation as a property: for every adapter kind the torch engine serves, loading it, serving it in a
mixed batch with every other kind and the base, and unloading it leave everyone else's greedy tokens
bit-identical (alone and in mixed batches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.models import load_model, load_tokenizer
from serve.adapters import inspect_adapter
from serve.engine import Engine
from tests.serve.adapter_kinds import KINDS, build_adapter, load_every_kind, serve_alone_and_mixed


@pytest.fixture(scope="module")
def resident(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(engine, tokenizer, root): every kind loaded into one engine."""
    root = tmp_path_factory.mktemp("kinds")
    for kind in KINDS:
        build_adapter(kind, tiny_model_dir, root / kind)
    engine = Engine(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), max_loaded_adapters=len(KINDS))
    load_every_kind(engine, root)
    yield engine, engine.tokenizer, root
    engine.shutdown(0)


ROWS = [None, *KINDS]
"""The base and every kind: row ``i`` of a batch is ``ROWS[i]`` (the runner gives each row its own prompt)."""


def _answers(engine: Engine, tokenizer, adapters: list[str | None]) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of every row: each alone, then all in one mixed batch."""
    alone, mixed, size = serve_alone_and_mixed(engine, tokenizer, adapters, max_tokens=4)
    assert size == len(adapters)  # every row really decoded in one batch
    return [r.tokens for r in alone], [r.tokens for r in mixed]


def test_an_adapter_changes_only_its_own_rows(resident) -> None:
    """With everything resident as the reference: unloading any one kind (its row then runs on the base) changes
    no other row, alone or mixed, and loading it again brings back exactly the reference."""
    engine, tokenizer, root = resident
    reference = _answers(engine, tokenizer, ROWS)
    for kind in KINDS:
        slot = ROWS.index(kind)
        others = [i for i in range(len(ROWS)) if i != slot]
        assert engine.run_command(lambda kind=kind: engine.unload(kind)) is True
        without = _answers(engine, tokenizer, [None if a == kind else a for a in ROWS])
        for answers, expected in zip(without, reference):
            assert [answers[i] for i in others] == [expected[i] for i in others], f"unloading {kind} changed others"
        info = inspect_adapter(kind, root / kind, engine.model.get_base_model(), max_rank=8)
        engine.run_command(lambda info=info: engine.load(info, info.name))
        assert _answers(engine, tokenizer, ROWS) == reference, f"loading {kind} again changed an answer"
