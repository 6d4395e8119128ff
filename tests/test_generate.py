"""Generation: greedy tokens equal transformers' generate (KV cache, tight expert budgets), batches with left
padding, stop tokens, the vocabulary limit, sampling options."""

from __future__ import annotations

import pytest
import torch

from omnilab.model.decoder import SelectiveMoE
from omnilab.reference.whole import Reference

PROMPT = [3, 17, 42, 99, 5, 250, 7, 61]
N = 32


@pytest.fixture(scope="module", params=["omni", "moe"])
def setup(request, make_checkpoint):
    path = make_checkpoint(request.param)
    ref = Reference.from_checkpoint(path, attn_implementation="sdpa")
    expected = ref.generate(torch.tensor([PROMPT]), N)[0].tolist()
    return path, ref, expected


def test_greedy_equals_transformers_generate(setup):
    path, _, expected = setup
    sel = SelectiveMoE.from_checkpoint(path)
    out = sel.generate(PROMPT, N, vocab_limit=None)
    assert len(expected) == N and out.new_token_ids[0] == expected
    no_cache = sel.generate(PROMPT, N, vocab_limit=None, use_kv_cache=False)
    assert no_cache.new_token_ids == out.new_token_ids


def test_greedy_equals_reference_under_evicting_budget(setup):
    path, _, expected = setup
    sel = SelectiveMoE.from_checkpoint(path)
    budget = 3 * sel.cache.store.expert_bytes  # fewer than one token's experts over all layers
    sel = SelectiveMoE.from_checkpoint(path, expert_budget=budget, policy="lfu")
    out = sel.generate(PROMPT, N, vocab_limit=None)
    assert out.new_token_ids[0] == expected
    stats = sel.cache.stats
    assert stats.evictions > 0 and stats.misses > stats.evictions
    assert stats.peak_resident_bytes <= budget


def test_left_padded_batch_equals_transformers(setup):
    path, ref, expected = setup
    short = PROMPT[3:]
    sel = SelectiveMoE.from_checkpoint(path)
    out = sel.generate([PROMPT, short], 12, vocab_limit=None)
    assert out.new_token_ids[0] == expected[:12]
    ids = torch.tensor([PROMPT, [0] * 3 + short])
    mask = torch.tensor([[1] * len(PROMPT), [0] * 3 + [1] * len(short)])
    assert out.new_token_ids[1] == ref.generate(ids, 12, attention_mask=mask)[1].tolist()


def test_stop_token_ends_generation(setup):
    path, _, expected = setup
    sel = SelectiveMoE.from_checkpoint(path)
    stop = expected[5]
    first = expected.index(stop)
    out = sel.generate(PROMPT, N, vocab_limit=None, stop_tokens=[stop])
    assert out.new_token_ids[0] == expected[:first + 1] and out.stopped == [True]


def test_never_emits_rows_past_the_tokenizer(make_checkpoint):
    sel = SelectiveMoE.from_checkpoint(make_checkpoint("moe"))
    limit = len(sel.tokenizer)
    assert limit < sel.config.vocab_size  # the fixture's embedding has padding rows
    prompts = [[i, i + 1, i + 2] for i in range(0, 250, 25)]
    free = sel.generate(prompts, 16, vocab_limit=None)
    assert any(t >= limit for seq in free.new_token_ids for t in seq)  # the limit has something to stop
    limited = sel.generate(prompts, 16)  # "auto": the tokenizer's length
    assert all(t < limit for seq in limited.new_token_ids for t in seq)
    sampled = sel.generate(prompts, 16, greedy=False, temperature=2.0)
    assert all(t < limit for seq in sampled.new_token_ids for t in seq)


def test_sampling_options(make_checkpoint):
    sel = SelectiveMoE.from_checkpoint(make_checkpoint("moe"))
    greedy = sel.generate(PROMPT, 16, vocab_limit=None).new_token_ids
    assert sel.generate(PROMPT, 16, greedy=False, top_k=1, temperature=3.0, vocab_limit=None).new_token_ids == greedy
    assert sel.generate(PROMPT, 16, greedy=False, top_p=1e-6, vocab_limit=None).new_token_ids == greedy
    a = sel.generate(PROMPT, 16, greedy=False, temperature=1.5, seed=1, vocab_limit=None).new_token_ids
    b = sel.generate(PROMPT, 16, greedy=False, temperature=1.5, seed=1, vocab_limit=None).new_token_ids
    c = sel.generate(PROMPT, 16, greedy=False, temperature=1.5, seed=2, vocab_limit=None).new_token_ids
    assert a == b and a != c and a != greedy


def test_bf16_generation_runs(make_checkpoint):
    """bf16 under a budget of a quarter of the experts: experts are evicted and reloaded, the budget is never
    exceeded, and the tokens are those of the same bf16 model with every expert resident (a cache changes
    where weights come from, not what is computed)."""
    path = make_checkpoint("moe")
    full = SelectiveMoE.from_checkpoint(path, dtype="bfloat16")
    store = full.cache.store
    small = SelectiveMoE.from_checkpoint(path, dtype="bfloat16", expert_budget=store.total_bytes // 4)
    want, out = full.generate(PROMPT, 8), small.generate(PROMPT, 8)
    assert len(out.new_token_ids[0]) == 8 and out.tokens_per_s > 0
    assert out.new_token_ids == want.new_token_ids
    stats = small.cache.stats
    assert stats.evictions > 0 and stats.peak_resident_bytes <= store.total_bytes // 4 < stats.loaded_bytes
    assert store.expert_bytes == 3 * store.config.moe_intermediate_size * store.config.hidden_size * 2  # bf16


def test_token_ids_past_the_embedding_are_one_line_errors(make_checkpoint, capsys):
    """A token id outside the embedding is a ValueError naming it, and exit 2 with one line from the CLI."""
    from omnilab.cli import main
    from omnilab.model.decoder import SelectiveMoE

    path = make_checkpoint("moe")
    model = SelectiveMoE.from_checkpoint(path)
    rows = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {rows} is outside"):
        model(torch.tensor([[1, rows]]))
    for verb in ("generate", "compare"):
        assert main([verb, str(path), "--input-ids", f"1,2,{rows + 5}"]) == 2
        err = capsys.readouterr().err
        assert f"token id {rows + 5}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
