"""The engine on the tiny model: every adapter kind served in mixed batches behaves like its own model,
on fp32 and bitsandbytes bases, through eviction and hot swaps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from edge.generation import FinishReason
from pipeline.models import load_model, load_tokenizer
from serve.adapters import inspect_adapter
from serve.engine import Engine, GenRequest, load_base
from tests.serve.adapter_kinds import (
    KINDS,
    SERVED,
    adapter_effects,
    build_adapter,
    deviation,
    load_every_kind,
    serve_alone_and_mixed,
)
from tests.serve.requests import run_request


def _generate(engine: Engine, tokenizer, adapter: str | None, prompt: str, n: int = 8) -> GenRequest:
    done = threading.Event()
    request = GenRequest(prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"], max_tokens=n,
                         adapter=adapter)
    request.on_done = lambda reason, count, error: (setattr(request, "reason", (reason, error)), done.set())
    engine.submit(request)
    return request, done


@pytest.mark.parametrize("kind", ["lora", "lora-patterns", "dora", "prompt", "ptuning", "prefix", "ia3", "pir"])
def test_every_adapter_kind_matches_its_model_alone(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoRA (factors held by the batched layers; with per-module ranks and alphas and rsLoRA too), DoRA (PEFT's
    layers), soft prompts, P-tuning and prefixes (virtual tokens at prefill) and IA3/PIR (per-row hooks) give the
    first logits and greedy tokens of the adapter's own model run alone, also beside a base row in one batch."""
    from pipeline.tuned import load_tuned

    if kind == "lora-patterns":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(5)
        model = get_peft_model(load_model(tiny_model_dir), LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2, "down_proj": 6},
            alpha_pattern={"v_proj": 32}, use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.save_pretrained(tmp_path / kind)
    else:
        build_adapter(kind, tiny_model_dir, tmp_path / kind)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = "Review: great mug"
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    reference = load_tuned(tmp_path / kind, tiny_model_dir)  # PEFT's model, or PIR's delta on the base
    with torch.no_grad():
        expected = reference.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                      pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        first_logits = reference(**ids).logits[0, -1]
        plain_logits = load_model(tiny_model_dir)(**ids).logits[0, -1]
    assert (first_logits - plain_logits).abs().max() > 1e-2  # the adapter changes the model's prediction

    base = load_model(tiny_model_dir)
    engine = Engine(base, tokenizer, max_batch_size=4)
    engine.tokenizer = type("NoEos", (), {"eos_token_id": -1, "decode": tokenizer.decode})()  # always 8 tokens
    seen, sample = [], engine._sample
    engine._sample = lambda request, logits: seen.append(logits.clone()) or sample(request, logits)
    try:
        info = inspect_adapter(kind, tmp_path / kind, base, max_rank=8)
        engine.run_command(lambda: engine.load(info, kind))
        alone, done = _generate(engine, tokenizer, kind, prompt)
        assert done.wait(30) and alone.tokens == expected
        assert torch.allclose(seen[0], first_logits, atol=1e-4)  # the prefill sees what the adapter's model sees
        mixed = [_generate(engine, tokenizer, a, p) for a, p in [(None, "x y"), (kind, prompt), (None, prompt)]]
        assert all(d.wait(30) for _, d in mixed) and mixed[1][0].tokens == expected
        plain, plain_done = _generate(engine, tokenizer, None, prompt)
        assert plain_done.wait(30) and plain.tokens == mixed[2][0].tokens  # base rows untouched by the adapter
        assert engine.run_command(lambda: engine.unload(kind)) and not engine.rowwise.adapters
    finally:
        engine.shutdown(1)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_base_serves_every_adapter_kind_and_evicts_lru(quantize: str, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """On a bitsandbytes base, LoRA, prefix, IA3 and PIR rows decode together; with room for two adapters the
    least recently used is evicted and comes back transparently on its next request."""
    from peft import LoraConfig, get_peft_model

    from serve.adapters import AdapterInfo

    torch.manual_seed(1)
    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM",
                                                          init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    for kind in ("prefix", "ia3", "pir"):
        build_adapter(kind, tiny_model_dir, tmp_path / kind)
    tokenizer = load_tokenizer(tiny_model_dir)
    base = load_base(tiny_model_dir, quantize)
    engine = Engine(base, tokenizer, max_batch_size=8, max_loaded_adapters=2)
    engine.resolver = lambda name, source: inspect_adapter(name, tmp_path / source, base, max_rank=8)
    try:
        for kind in ("lora", "prefix", "ia3", "pir"):
            info: AdapterInfo = engine.resolver(kind, kind)
            engine.run_command(lambda info=info: engine.load(info, info.name))
        assert engine.registry.loaded() == ["ia3", "pir"]  # lora, prefix evicted (least recently used)
        assert {e.name: e.state for e in engine.registry.snapshot()} == {
            "lora": "evicted", "prefix": "evicted", "ia3": "ready", "pir": "ready"}
        jobs = [_generate(engine, tokenizer, a, "Review: great mug", 4) for a in ("lora", "prefix", "ia3", "pir", None)]
        assert all(done.wait(60) for _, done in jobs)
        assert [r.reason[1] for r, _ in jobs] == [None] * 5  # every kind decoded, none failed
        assert engine.registry.servable("lora") and len(engine.registry.loaded()) >= 2
    finally:
        engine.shutdown(1)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_dora_on_a_bitsandbytes_base_is_dora_and_leaves_the_base_working(quantize: str, tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """PEFT's DoRA forward on an int8 base rewrote the layer's state on the CPU, after which every request
    failed; on NF4 the mixed-batch path served DoRA rows as plain LoRA. Now a DoRA row's first logits are
    the float32 DoRA model's within the base's own quantization error, and other rows keep working."""
    from peft import PeftModel

    build_adapter("dora", tiny_model_dir, tmp_path / "dora")
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("Review: great mug", add_special_tokens=False)["input_ids"]
    base = load_base(tiny_model_dir, quantize)
    with torch.no_grad():
        x = torch.tensor([ids])
        quantization_error = float((base(input_ids=x).logits - load_model(tiny_model_dir)(input_ids=x).logits).abs().max())
        reference = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "dora").eval()(input_ids=x).logits
    engine = Engine(base, tokenizer, max_batch_size=4)
    seen, sample = [], engine._sample
    engine._sample = lambda request, logits: seen.append(logits.clone()) or sample(request, logits)
    try:
        engine.run_command(lambda: engine.load(inspect_adapter("dora", tmp_path / "dora", base, 8), "dora"))
        dora = run_request(engine, ids, 4, adapter="dora")
        after = run_request(engine, ids, 4)
        assert dora["error"] is None and after["error"] is None and dora["n"] == after["n"] == 4
        assert float((seen[0] - reference[0, -1]).abs().max()) < 1.5 * quantization_error
        assert float((seen[0] - seen[4]).abs().max()) > 5 * quantization_error  # DoRA moved this row
    finally:
        engine.shutdown(1)


def test_a_replaced_adapter_finishes_running_requests_on_the_old_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    for seed, name in ((1, "v1"), (2, "v2")):
        torch.manual_seed(seed)
        model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear",
                                                                      task_type="CAUSAL_LM", init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.save_pretrained(tmp_path / name)
    tokenizer = load_tokenizer(tiny_model_dir)
    base = load_model(tiny_model_dir)
    engine = Engine(base, tokenizer, max_batch_size=4)
    engine.tokenizer = type("NoEos", (), {"eos_token_id": -1, "decode": tokenizer.decode})()
    load = lambda source: engine.run_command(  # noqa: E731
        lambda: engine.load(inspect_adapter("task", tmp_path / source, base, max_rank=8), source))
    try:
        expected = {}
        for source in ("v1", "v2"):
            load(source)
            request, done = _generate(engine, tokenizer, "task", "Review: great mug", 40)
            assert done.wait(30)
            expected[source] = request.tokens
        assert expected["v1"] != expected["v2"]
        load("v1")
        running, done = _generate(engine, tokenizer, "task", "Review: great mug", 40)
        while len(running.tokens) < 5:  # decoding on v1
            time.sleep(0.001)
        load("v2")  # hot swap mid-request
        after, after_done = _generate(engine, tokenizer, "task", "Review: great mug", 40)
        assert done.wait(30) and after_done.wait(30)
        assert running.tokens == expected["v1"] and after.tokens == expected["v2"]
        assert len(engine.retired) == 0  # the old version was freed when its last request ended
    finally:
        engine.shutdown(1)


# ---- the generation tail on the torch engine (shared with the ONNX engine and the edge runtime) ---------
@pytest.fixture(scope="module")
def plain_engine(tiny_model_dir: Path):
    """The bare tiny base (its greedy answers never reach EOS within these budgets) and its tokenizer."""
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_model(tiny_model_dir), tokenizer, max_batch_size=4)
    yield engine, tokenizer
    engine.shutdown(1)


def _run(engine: Engine, tokenizer, prompt: str, max_tokens: int, **kwargs) -> dict:
    """One request for ``prompt`` (plain text) on ``engine``; see :func:`tests.serve.requests.run_request`."""
    return run_request(engine, tokenizer(prompt, add_special_tokens=False)["input_ids"], max_tokens, wait_s=60,
                       **kwargs)


def test_stop_strings_and_finish_reasons(plain_engine) -> None:
    engine, tokenizer = plain_engine
    full = _run(engine, tokenizer, "the order shipped", 24)
    assert (full["reason"], full["n"]) == ("length", 24)
    assert full["text"] == tokenizer.decode(full["tokens"], skip_special_tokens=True)
    stop = "dU"  # spans two tokens ("d" then "U"): the "d" waits, and never goes out
    assert stop in full["text"] and not any(stop in tokenizer.decode([t]) for t in full["tokens"]), full["text"]
    cut = _run(engine, tokenizer, "the order shipped", 24, stop=["never", stop])
    assert cut["reason"] == FinishReason.STOP and cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["tokens"] == full["tokens"][:cut["n"]] and cut["n"] < 24
    late = _run(engine, tokenizer, "the order shipped", 24, deadline=time.monotonic() - 1)
    assert late["reason"] == FinishReason.TIMEOUT and late["n"] <= 1  # its prefill token, then the deadline
    gone = _run(engine, tokenizer, "the order shipped", 24, cancel_on_text=True)
    assert gone["reason"] == FinishReason.CANCELLED and len(gone["pieces"]) == 1 and gone["n"] < 24


def test_sampling_seeds_and_nucleus(plain_engine) -> None:
    engine, tokenizer = plain_engine
    greedy = _run(engine, tokenizer, "Review: great mug", 12)["tokens"]
    seeded = [_run(engine, tokenizer, "Review: great mug", 12, temperature=1.0, top_p=0.95, seed=seed)["tokens"]
              for seed in (4, 4, 9)]
    assert seeded[0] == seeded[1] != greedy and seeded[2] != seeded[0]
    # a tiny nucleus holds the most probable token alone: sampling then gives the greedy answer
    assert _run(engine, tokenizer, "Review: great mug", 12, temperature=1.5, top_p=1e-6, seed=1)["tokens"] == greedy


def test_the_context_budget_ends_generation(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_model(tiny_model_dir), tokenizer, max_batch_size=2, context_length=20)
    prompt = "the order shipped to Oslo in may"
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    try:
        assert n_prompt < 20
        clipped = _run(engine, tokenizer, prompt, 30)
        assert (clipped["reason"], clipped["n"]) == ("length", 20 - n_prompt)
        too_long = _run(engine, tokenizer, prompt + " and the review was great today", 5)
        assert too_long["reason"] == FinishReason.ERROR and "the context holds 20" in too_long["error"]
    finally:
        engine.shutdown(1)


def test_a_request_ended_by_its_first_token_leaves_the_batch_running(tiny_model_dir: Path) -> None:
    """A row that ends at its prefill (its first token is the end token) never joins the batch: the rows
    already decoding go on untouched (it used to stay in the batch and fail every row's next step)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_model(tiny_model_dir), tokenizer, max_batch_size=4)
    try:
        long_ids = tokenizer("the order shipped to Oslo", add_special_tokens=False)["input_ids"]
        short_ids = tokenizer("Review: great mug", add_special_tokens=False)["input_ids"]
        alone = run_request(engine, long_ids, 12)
        first = run_request(engine, short_ids, 1)["tokens"][0]
        assert first != alone["tokens"][0], "the two prompts must start differently for this test"
        tokenizer.eos_token_id = first  # now the short prompt's first token ends it
        assert tokenizer.eos_token_id == first
        results: dict = {}
        runner = threading.Thread(target=lambda: results.update(long=run_request(engine, long_ids, 12)))
        runner.start()
        while not engine.active:  # the long request is decoding
            time.sleep(0.001)
        ended = run_request(engine, short_ids, 12)
        runner.join(60)
        assert (ended["reason"], ended["n"], ended["text"], ended["error"]) == ("stop", 0, "", None)
        assert results["long"]["error"] is None and results["long"]["tokens"] == alone["tokens"]
    finally:
        engine.shutdown(1)


def test_replacing_an_adapter_with_another_kind_frees_the_old_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A name reloaded as another kind (LoRA -> soft prompt -> IA3) keeps only its current version in the model."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear",
                                                          task_type="CAUSAL_LM")).save_pretrained(tmp_path / "lora")
    build_adapter("prompt", tiny_model_dir, tmp_path / "prompt")
    build_adapter("ia3", tiny_model_dir, tmp_path / "ia3")
    tokenizer = load_tokenizer(tiny_model_dir)
    base = load_model(tiny_model_dir)
    engine = Engine(base, tokenizer, max_batch_size=2)
    load = lambda source: engine.run_command(  # noqa: E731
        lambda: engine.load(inspect_adapter("task", tmp_path / source, base, max_rank=8), source))
    try:
        shell = set(engine.model.peft_config)
        lora = load("lora")
        assert lora.internal in engine.batched.fast  # a plain LoRA: factors on the shell's layers, no PEFT module
        load("prompt")
        assert set(engine.model.peft_config) == shell and not engine.retired  # the LoRA weights are gone
        load("ia3")
        assert engine.registry.handle("task").row_adapter in engine.rowwise.adapters
        load("lora")
        assert not engine.rowwise.adapters and not engine.retired  # the IA3 vectors are gone too
        engine.run_command(lambda: engine.unload("task"))
        assert not engine.batched.fast and set(engine.model.peft_config) == shell
        assert not any(getattr(m, "_edgetune_fast", None) for m in engine.model.modules())  # no factor left
    finally:
        engine.shutdown(1)


def test_a_bfloat16_base_serves_every_adapter_kind_in_one_mixed_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The dtype plumbing, without a GPU: on a bfloat16 base every adapter (read from float32 files) is held in
    bfloat16, and each row of one mixed batch of every kind gives the greedy tokens that adapter gives alone."""
    for kind in KINDS:
        build_adapter(kind, tiny_model_dir, tmp_path / kind)
    tokenizer = load_tokenizer(tiny_model_dir)
    engine = Engine(load_base(tiny_model_dir, "none", device="cpu", dtype="bfloat16"), tokenizer,
                    max_batch_size=len(SERVED))
    try:
        load_every_kind(engine, tmp_path)
        assert engine.dtype == torch.bfloat16 and engine.device == torch.device("cpu")
        lora = {p.dtype for n, p in engine.model.named_parameters() if "lora_" in n and "_shell" not in n}
        rowwise = {t.dtype for adapter in engine.rowwise.adapters.values() for role, t in adapter.values()
                   if role != "pir"}  # PIR deltas stay float32 sparse tensors; their product is cast
        virtual = {engine.registry.handle(k).virtual.dtype for k in ("prompt", "ptuning", "prefix")}
        assert lora == rowwise == virtual == {torch.bfloat16}
        alone, mixed, batch = serve_alone_and_mixed(engine, tokenizer)
        assert batch == len(SERVED)  # one decode step ran every kind (and the base on 4 prompts) together
        effects = adapter_effects(alone)
        assert set(effects) == set(KINDS) and min(effects.values()) > 0.1, effects  # every row is its adapter's
        for a, m in zip(alone, mixed):
            assert m.tokens == a.tokens, (a.adapter, a.prompt, a.tokens, m.tokens)
            assert deviation(m, a) < 0.03, (a.adapter, deviation(m, a))  # bf16 rounding, far below any effect
    finally:
        engine.shutdown(1)


def test_load_base_places_the_base_and_refuses_what_cannot_be_served(tiny_model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU, auto is the CPU in float32; a dtype is honoured; what cannot be served is a clear error."""
    from pipeline.device import model_device
    from pipeline.errors import ModelError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    model = load_base(tiny_model_dir, "none", device="auto", dtype="auto")
    assert model_device(model) == torch.device("cpu") and {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in load_base(tiny_model_dir, "none", dtype="float16").parameters()} == {torch.float16}
    with pytest.raises(ModelError, match="keeps its unquantized layers in float32"):
        load_base(tiny_model_dir, "int8", dtype="bfloat16")
    with pytest.raises(ModelError, match="device: cuda was requested but no CUDA GPU is visible"):
        load_base(tiny_model_dir, "none", device="cuda")
