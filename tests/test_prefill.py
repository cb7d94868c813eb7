"""Chunked prefill (minijamba.inference.generation.prefill): any chunk size gives the logits and the inference
state that one-piece prefill gives, and the attention fast path (no padding: a bottom-right causal
bias instead of a mask) equals the masked path.

Models run in float32 (F.grouped_mm has no float64 kernel on CPU): chunks change only the order of
float32 sums (the parallel scan's tree), so the tolerance is the float32 model tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minijamba import JambaConfig, generate
from minijamba.inference.generation import prefill
from minijamba.inference.materialize import build
from minijamba.model.state import KVCache

from helpers import MODEL_RTOL, assert_close, gen, left_pad, make_model, seeds, small_configs

RTOL = MODEL_RTOL[torch.float32]


def assert_states_equal(a, b, rtol=RTOL):
    assert a.length == b.length and a.padded == b.padded
    assert torch.equal(a.valid, b.valid)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        names = ("k", "v") if isinstance(la, KVCache) else ("conv", "ssm")
        for name in names:
            assert_close(getattr(la, name), getattr(lb, name), rtol, f"layer {i} {name}")


@settings(max_examples=40, deadline=None)
@given(small_configs(), seeds, st.integers(1, 13), st.integers(1, 14), st.booleans())
def test_chunked_prefill_equals_one_piece(config, seed, length, chunk, padded):
    """Logits of every position and every state tensor, for chunks of 1, chunks that do not divide
    the prompt and chunks longer than it; with and without left padding."""
    model = make_model(config, seed, torch.float32)
    if padded:
        rows = [
            torch.randint(0, config.vocab_size, (n,), generator=gen(seed + n))
            for n in (length, max(1, length // 2))
        ]
        ids, mask = left_pad(rows)
    else:
        ids, mask = torch.randint(0, config.vocab_size, (2, length), generator=gen(seed)), None
    whole = model.new_state(2, length + 3)
    pieces = model.new_state(2, length + 3)
    with torch.no_grad():
        expected = model(ids, state=whole, attention_mask=mask)  # (b, l, V)
        got = torch.cat([
            model(ids[:, s : s + chunk], state=pieces, attention_mask=None if mask is None else mask[:, s : s + chunk])
            for s in range(0, length, chunk)
        ], dim=1)  # fmt: skip
    assert_close(got, expected, RTOL, f"logits, chunk {chunk} of {length}")
    assert_states_equal(pieces, whole)
    # and the next decoding step agrees from either state
    nxt = torch.randint(0, config.vocab_size, (2, 1), generator=gen(seed + 1))
    with torch.no_grad():
        assert_close(model(nxt, state=pieces), model(nxt, state=whole), RTOL, "first decoding step")


@settings(max_examples=10, deadline=None)
@given(small_configs(), seeds, st.integers(1, 10), st.sampled_from([None, 1, 2, 3, 7]))
def test_prefill_returns_the_last_logits_of_one_piece(config, seed, length, chunk):
    model = make_model(config, seed, torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=gen(seed))
    with torch.no_grad():
        expected = model(ids)[:, -1]
    state = model.new_state(1, length)
    assert_close(prefill(model, ids, state, chunk=chunk), expected, RTOL, "last logits")
    assert state.length == length


def test_generate_with_prefill_chunk_gives_the_same_tokens():
    model = build("tiny", dtype=torch.float32, seed=0)
    rows = [torch.randint(0, 4096, (n,), generator=gen(n)) for n in (11, 5, 8)]
    ids, mask = left_pad(rows)
    expected = generate(model, ids, 8, attention_mask=mask)
    for chunk in (1, 3, 4, 100):
        assert torch.equal(generate(model, ids, 8, attention_mask=mask, prefill_chunk=chunk), expected)


@settings(max_examples=10, deadline=None)
@given(small_configs(layout="hybrid"), seeds, st.integers(1, 9), st.integers(1, 5))
def test_attention_without_padding_equals_the_masked_path(config, seed, length, chunk):
    """The causal-bias path (no padding seen) against the explicit-mask path on the same tokens."""
    model = make_model(config, seed, torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=gen(seed))
    fast, masked = model.new_state(2, length + 1), model.new_state(2, length + 1)
    masked.padded = True  # forces the explicit (b, l, s) mask although every position is real
    with torch.no_grad():
        for s in range(0, length, chunk):
            a = model(ids[:, s : s + chunk], state=fast)
            b = model(ids[:, s : s + chunk], state=masked)
            assert_close(a, b, RTOL, "fast vs masked attention")
    assert not fast.padded


def test_padding_is_remembered_by_the_state():
    config = JambaConfig.from_preset("tiny")
    state = build(config, dtype=torch.float32).new_state(2, 8)
    state.advance(torch.ones(2, 3, dtype=torch.bool))
    assert not state.padded
    state.advance(torch.tensor([[True, False], [True, True]]))
    assert state.padded
    state.advance(torch.ones(2, 1, dtype=torch.bool))
    assert state.padded


@pytest.mark.parametrize("chunk", [0, -2, 1.5, "4"])
def test_bad_prefill_chunk_is_a_value_error(chunk):
    model = build("tiny", dtype=torch.float32)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, torch.ones(1, 4, dtype=torch.long), 2, prefill_chunk=chunk)
