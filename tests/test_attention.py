"""Attention: grouped-query causal attention without positional encoding, with a KV cache."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, assert_close, float_dtypes, gen, seeds
from minijamba import InferenceState, JambaConfig
from minijamba.model.attention import Attention


@st.composite
def attentions(draw, dtype=None):
    """A randomly sized Attention layer (any GQA ratio), its one-layer config and dtype."""
    g = draw(st.integers(1, 3))
    q = g * draw(st.integers(1, 3))
    config = JambaConfig.from_preset(
        "tiny", hidden_size=q * draw(st.integers(1, 4)), num_attention_heads=q, num_key_value_heads=g,
        num_hidden_layers=1, attn_layer_period=1, attn_layer_offset=0,
    )  # fmt: skip
    dtype = dtype or draw(float_dtypes)
    torch.manual_seed(draw(seeds))
    attn = Attention(config)
    attn.reset_parameters(std=0.5, out_std=0.5)  # large enough for sharp, position-dependent scores
    return attn.to(dtype), config, dtype


def reference(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Written out: softmax(q kᵀ / sqrt(e)) v with query head j reading key/value head j // (q/g),
    each position attending to itself and the real positions before it."""
    b, l, _ = x.shape
    q = attn.q_proj(x).view(b, l, attn.q, attn.e).transpose(1, 2)  # (b, q, l, e)
    k = attn.k_proj(x).view(b, l, attn.g, attn.e).transpose(1, 2)  # (b, g, l, e)
    v = attn.v_proj(x).view(b, l, attn.g, attn.e).transpose(1, 2)
    k = k.repeat_interleave(attn.q // attn.g, dim=1)  # (b, q, l, e)
    v = v.repeat_interleave(attn.q // attn.g, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.e)  # (b, q, l, l)
    allowed = torch.ones(l, l, dtype=torch.bool).tril()[None]  # (1, l, l)
    if mask is not None:
        allowed = allowed & mask[:, None, :] | torch.eye(l, dtype=torch.bool)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(-1) @ v  # (b, q, l, e)
    return attn.o_proj(out.transpose(1, 2).reshape(b, l, attn.q * attn.e))


def rand_x(b, l, h, seed, dtype):
    return torch.randn(b, l, h, generator=gen(seed), dtype=torch.float64).to(dtype)


def run_chunks(attn, config, x, sizes, mask=None):
    """Feed x through a fresh InferenceState in chunks of the given sizes (cycled)."""
    b, l, _ = x.shape
    state = InferenceState(config, b, l, dtype=x.dtype)
    outs, s, i = [], 0, 0
    while s < l:
        e = min(l, s + sizes[i % len(sizes)])
        m = torch.ones(b, e - s, dtype=torch.bool) if mask is None else mask[:, s:e]
        state.advance(m)
        outs.append(attn(x[:, s:e], state, None if mask is None else m, cache=state.layers[0]))
        s, i = e, i + 1
    return torch.cat(outs, 1), state


@settings(max_examples=30, deadline=None)
@given(attentions(), st.integers(1, 3), st.integers(1, 10), seeds)
def test_matches_written_out_attention(att, b, l, seed):
    attn, config, dtype = att
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    with torch.no_grad():
        assert_close(attn(x), reference(attn, x), MODEL_RTOL[dtype], "attention")


@settings(max_examples=40, deadline=None)
@given(attentions(), st.integers(1, 3), st.integers(1, 10), st.lists(st.integers(1, 4), min_size=1, max_size=6), seeds)
def test_cache_chunks_and_steps_equal_full(att, b, l, sizes, seed):
    """Prefill in arbitrary chunks then one token at a time through the KV cache == full attention;
    the cache holds exactly the keys and values of the whole sequence."""
    attn, config, dtype = att
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    with torch.no_grad():
        full = attn(x)
        out, state = run_chunks(attn, config, x, sizes)
        k = attn.k_proj(x).view(b, l, attn.g, attn.e).transpose(1, 2)
    assert state.length == l
    assert_close(out, full, MODEL_RTOL[dtype], "chunked vs full")
    assert_close(state.layers[0].k, k, MODEL_RTOL[dtype], "cached keys")


@settings(max_examples=30, deadline=None)
@given(attentions(), st.integers(1, 2), st.integers(1, 10), st.data())
def test_causality(att, b, l, data):
    attn, config, dtype = att
    seed, t = data.draw(seeds), data.draw(st.integers(0, l - 1))
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    x2 = x.clone()
    x2[:, t] = rand_x(b, 1, config.hidden_size, seed + 1, dtype)[:, 0] * 2
    with torch.no_grad():
        y, y2 = attn(x), attn(x2)
        ys, _ = run_chunks(attn, config, x, [1])
        ys2, _ = run_chunks(attn, config, x2, [1])
    tol = MODEL_RTOL[dtype]
    assert_close(y2[:, :t], y[:, :t], tol, "full: outputs before t")
    assert_close(ys2[:, :t], ys[:, :t], tol, "decoding: outputs before t")
    assert (y2[:, t] - y[:, t]).abs().max() > 1e-6


@settings(max_examples=40, deadline=None)
@given(attentions(), st.lists(st.integers(1, 7), min_size=1, max_size=3), st.lists(st.integers(1, 4), min_size=1, max_size=4), seeds)
def test_left_padding_equals_each_row_alone(att, lengths, sizes, seed):
    """Left padding (holding junk) is invisible to real positions: without a state, with a state
    filled in chunks, and for the tokens decoded after it."""
    attn, config, dtype = att
    b, L, h = len(lengths), max(lengths) + 2, config.hidden_size
    x = rand_x(b, L + 1, h, seed, dtype) * 3
    mask = torch.zeros(b, L + 1, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, L - n :] = True
    with torch.no_grad():
        y = attn(x[:, :L], None, mask[:, :L])
        y_chunked, _ = run_chunks(attn, config, x, sizes, mask)  # prompt, then one more real token
        assert torch.isfinite(y).all() and torch.isfinite(y_chunked).all()  # padding rows too
        for i, n in enumerate(lengths):
            alone = reference(attn, x[i : i + 1, L - n :])  # (1, n + 1, h)
            tol = MODEL_RTOL[dtype]
            assert_close(y[i : i + 1, L - n :], alone[:, :n], tol, f"row {i}, no state")
            assert_close(y_chunked[i : i + 1, L - n :], alone, tol, f"row {i}, chunked with a cache")
            assert_close(y[i : i + 1, L - n :], reference(attn, x[i : i + 1, :L], mask[i : i + 1, :L])[:, L - n :], tol, f"row {i}, reference mask")


def test_no_positional_encoding():
    """Attention alone is permutation-equivariant in the keys: the last query's output does not
    depend on the order of the tokens before it (the position signal comes from the Mamba layers)."""
    config = JambaConfig.from_preset("tiny", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                     num_hidden_layers=1, attn_layer_period=1, attn_layer_offset=0)  # fmt: skip
    torch.manual_seed(0)
    attn = Attention(config).double()
    attn.reset_parameters(std=0.5, out_std=0.5)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    perm = torch.cat([torch.randperm(5), torch.tensor([5])])
    with torch.no_grad():
        assert_close(attn(x[:, perm])[:, -1], attn(x)[:, -1], 1e-12, "last output")
