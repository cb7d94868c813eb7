"""Generation: greedy == the argmax loop, batched left padding == each prompt alone, sampling's support
and distribution, reproducibility, argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import gen, left_pad, make_model, seeds, small_configs
from minijamba import JambaConfig, generate
from minijamba.inference.generation import generate_stream, sample


def argmax_loop(model, ids, n):
    """Greedy decoding the slow way: the whole sequence through the model, no cache, every step."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@settings(max_examples=30, deadline=None)
@given(small_configs(), st.integers(1, 3), st.integers(1, 6), st.integers(0, 8), st.sampled_from([None, 1, 2, 4]), seeds)
def test_greedy_equals_argmax_loop_without_cache(config, b, l, new, chunk, seed):
    model = make_model(config, seed)  # float64: no near-ties decided by rounding
    ids = torch.randint(0, config.vocab_size, (b, l), generator=gen(seed))
    with torch.no_grad():
        expected = argmax_loop(model, ids, new)
    out = generate(model, ids, new, prefill_chunk=chunk)
    assert out.shape == (b, l + new) and out.dtype == ids.dtype
    assert torch.equal(out, expected)
    streamed = list(generate_stream(model, ids, new))
    assert len(streamed) == new and all(t.shape == (b,) for t in streamed)
    if new:
        assert torch.equal(torch.stack(streamed, 1), expected[:, l:])


@settings(max_examples=30, deadline=None)
@given(small_configs(), st.lists(st.integers(1, 6), min_size=2, max_size=3), st.integers(1, 6), st.sampled_from([None, 1, 3]), seeds)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(config, lengths, new, chunk, seed):
    model = make_model(config, seed)
    g = gen(seed)
    rows = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in lengths]
    junk = torch.randint(0, config.vocab_size, (len(rows), max(lengths)), generator=g)
    ids, mask = left_pad(rows, fill=junk)
    out = generate(model, ids, new, attention_mask=mask, prefill_chunk=chunk)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], new)
        assert torch.equal(out[i, ids.shape[1] :], alone[0, len(row) :]), f"row {i}"


# --- sampling ----------------------------------------------------------------------------------


def distinct_logits(b, V, seed, scale=2.0):
    """Random logits with no ties, so that the top-k set and the nucleus are unambiguous."""
    g = gen(seed)
    return torch.stack([torch.randperm(V, generator=g).double() for _ in range(b)]) * scale / V + torch.randn(b, V, generator=g, dtype=torch.float64) * 1e-3


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(b, V) bool: the smallest set of most probable tokens whose probability reaches top_p."""
    p, order = probs.sort(-1, descending=True)
    before = p.cumsum(-1) - p  # probability of the tokens ranked above each one
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3), st.integers(2, 30), seeds, st.floats(0.3, 3.0),
    st.one_of(st.none(), st.integers(1, 30)), st.one_of(st.none(), st.floats(0.05, 1.0)),
)  # fmt: skip
def test_sampling_stays_in_the_top_k_and_the_nucleus(b, V, seed, temperature, top_k, top_p):
    logits = distinct_logits(b, V, seed)
    reps = 200
    draws = sample(logits.repeat(reps, 1), temperature, top_k, top_p, gen(seed)).view(reps, b)  # (reps, b)
    allowed = torch.ones(b, V, dtype=torch.bool)
    scaled = logits / temperature
    if top_k is not None:
        allowed &= scaled >= scaled.topk(min(top_k, V), -1).values[:, -1:]
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    if top_p is not None:  # (sample works in fp32: a hair of slack at the boundary of the nucleus)
        allowed &= nucleus(scaled.softmax(-1), top_p + 1e-6)
    assert allowed.sum(-1).ge(1).all()
    assert allowed.gather(1, draws.T).all(), "sampled a token outside the top-k / nucleus"
    if top_k is not None:
        assert (allowed.sum(-1) <= top_k).all()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.0, None, 0.7),
        (1.0, None, 0.55),  # the top token has 0.538: the nucleus needs the second one too
        (0.8, 4, 0.9),
    ],  # fmt: skip
)
def test_sampling_follows_the_softmax(temperature, top_k, top_p):
    """Frequencies over 40000 draws match softmax(logits / T) renormalised on the allowed tokens
    (5 standard deviations of a frequency are below 0.013)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]])
    n = 40000
    draws = sample(logits.expand(n, -1), temperature, top_k, top_p, gen(1))
    freq = torch.bincount(draws, minlength=6).double() / n
    scaled = logits[0].double() / temperature
    if top_k is not None:
        scaled[top_k:] = float("-inf")  # the logits are sorted
    if top_p is not None:
        scaled = scaled.masked_fill(~nucleus(scaled.softmax(-1)[None], top_p)[0], float("-inf"))
    expected = scaled.softmax(-1)
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.013, (freq, expected)


def test_degenerate_sampling_is_greedy():
    logits = distinct_logits(4, 50, 0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits), greedy)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=gen(0)), greedy)
    assert torch.equal(sample(logits, 1.0, top_p=1e-9, generator=gen(0)), greedy)


def tiny_model(seed=0):
    config = JambaConfig.from_preset("tiny", vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=4,
                                     num_attention_heads=2, num_key_value_heads=1, mamba_dt_rank=2,
                                     attn_layer_period=2, attn_layer_offset=1, initializer_range=0.3)  # fmt: skip
    return make_model(config, seed, torch.float32)


@settings(max_examples=10, deadline=None)
@given(seeds, st.floats(0.5, 2.0), st.one_of(st.none(), st.integers(2, 20)), st.one_of(st.none(), st.floats(0.5, 1.0)))
def test_sampling_is_reproducible_with_a_seeded_generator(seed, temperature, top_k, top_p):
    model = tiny_model()
    ids = torch.randint(0, 32, (3, 4), generator=gen(seed))
    a = generate(model, ids, 12, temperature, top_k, top_p, generator=gen(seed))
    b = generate(model, ids, 12, temperature, top_k, top_p, generator=gen(seed))
    assert torch.equal(a, b)


def test_different_seeds_sample_differently():
    """At temperature 5 over 32 tokens, 3 x 30 draws coincide by chance with probability ~ 32^-90."""
    model = tiny_model()
    ids = torch.randint(0, 32, (3, 4), generator=gen(0))
    a = generate(model, ids, 30, temperature=5.0, generator=gen(1))
    b = generate(model, ids, 30, temperature=5.0, generator=gen(2))
    assert not torch.equal(a, b)


# --- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
    ],
)
def test_bad_sampling_arguments_raise(kwargs, word, temperature):
    """A bad top_k / top_p is an error whatever the temperature, not silently ignored at 0."""
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 3))
    with pytest.raises(ValueError, match=word):
        generate(model, ids, 2, temperature=temperature, **kwargs)
    with pytest.raises(ValueError, match=word):
        sample(torch.randn(2, 32), temperature, **kwargs)


def test_bad_generation_arguments_raise():
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 3))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, ids[:, :0], 2)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, ids, 2, prefill_chunk=0)
    with pytest.raises(ValueError, match="attention_mask"):  # not the shape of the prompt
        generate(model, ids, 2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="left"):  # right padding would decay the SSM state
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="left"):  # a row with no real token
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    assert torch.equal(generate(model, ids, 0), ids)
