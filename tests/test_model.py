"""The whole model: layout, decoding == full forward, causality, left padding, logits_to_keep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, assert_close, float_dtypes, gen, left_pad, make_model, seeds, small_configs
from minijamba import InferenceState, Jamba, JambaConfig
from minijamba.model.attention import Attention
from minijamba.model.mamba import MambaMixer
from minijamba.model.moe import MLP, SparseMoE
from minijamba.model.state import KVCache, MambaState, plan_nbytes


def ids_for(config, b, l, seed):
    return torch.randint(0, config.vocab_size, (b, l), generator=gen(seed))


@settings(max_examples=30, deadline=None)
@given(small_configs())
def test_layers_follow_the_layout(config):
    with torch.device("meta"):
        model = Jamba(config)
    assert len(model.layers) == config.num_hidden_layers
    for i, (layer, kind, moe) in enumerate(zip(model.layers, config.layer_types, config.moe_layers)):
        mixer = layer.self_attn if kind == "attention" else layer.mamba
        assert isinstance(mixer, Attention if kind == "attention" else MambaMixer), i
        assert not hasattr(layer, "mamba" if kind == "attention" else "self_attn"), i
        assert isinstance(layer.feed_forward, SparseMoE if moe else MLP), i
    assert (model.lm_head.weight is model.embed_tokens.weight) == config.tie_word_embeddings
    keys = set(model.state_dict())
    assert "embed_tokens.weight" in keys and "final_layernorm.weight" in keys and "lm_head.weight" in keys
    # Active parameters: the total minus the n - K experts a token does not use, in each MoE layer.
    f, h, n, K = config.intermediate_size, config.hidden_size, config.num_experts, config.num_experts_per_tok
    skipped = sum(config.moe_layers) * (n - K) * 3 * f * h
    assert model.num_parameters(active=True) == model.num_parameters() - skipped


@settings(max_examples=40, deadline=None)
@given(small_configs(), float_dtypes, st.integers(1, 3), st.integers(1, 9), st.lists(st.integers(1, 4), min_size=1, max_size=5), seeds)
def test_chunked_prefill_and_decoding_equal_full_forward(config, dtype, b, l, sizes, seed):
    """Feeding the sequence through an InferenceState in arbitrary chunks (size 1 = decoding with
    the KV cache and the single-step recurrence) gives the full forward's logits."""
    model = make_model(config, seed, dtype)
    ids = ids_for(config, b, l, seed)
    with torch.no_grad():
        full = model(ids)
        state = model.new_state(b, l)
        outs, s, i = [], 0, 0
        while s < l:
            e = min(l, s + sizes[i % len(sizes)])
            outs.append(model(ids[:, s:e], state=state))
            s, i = e, i + 1
    assert full.shape == (b, l, config.vocab_size) and full.dtype == dtype
    assert state.length == l
    assert_close(torch.cat(outs, 1), full, MODEL_RTOL[dtype], "chunked vs full")


@settings(max_examples=40, deadline=None)
@given(small_configs(moe=True), st.integers(1, 2), st.integers(1, 8), st.data())
def test_causality(config, b, l, data):
    """Changing token t changes no logit before t (MoE layers included), and does change logit t."""
    seed, t = data.draw(seeds), data.draw(st.integers(0, l - 1))
    model = make_model(config, seed)
    ids = ids_for(config, b, l, seed)
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + data.draw(st.integers(1, config.vocab_size - 1))) % config.vocab_size
    with torch.no_grad():
        y, y2 = model(ids), model(ids2)
    assert_close(y2[:, :t], y[:, :t], MODEL_RTOL[torch.float64], "logits before t")
    assert (y2[:, t] - y[:, t]).abs().max() > 1e-6


@settings(max_examples=40, deadline=None)
@given(small_configs(), float_dtypes, st.lists(st.integers(1, 6), min_size=2, max_size=3), st.sampled_from([None, 1, 2, 3]), seeds)
def test_left_padded_batch_equals_each_row_alone(config, dtype, lengths, chunk, seed):
    """Logits at the real positions of a left-padded batch (junk tokens in the padding) are those of
    each row run alone, without a state and through a state filled in chunks; the next decoding
    step matches too, so padding left nothing in the KV cache, conv or SSM state."""
    model = make_model(config, seed, dtype)
    g = gen(seed)
    rows = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in lengths]
    junk = torch.randint(0, config.vocab_size, (len(rows), max(lengths)), generator=g)
    ids, mask = left_pad(rows, fill=junk)
    b, L = ids.shape
    nxt = torch.randint(0, config.vocab_size, (b, 1), generator=g)
    tol = MODEL_RTOL[dtype]
    with torch.no_grad():
        y = model(ids, attention_mask=mask)
        state = model.new_state(b, L + 1)
        step = chunk or L
        y_chunks = torch.cat(
            [model(ids[:, s : s + step], state=state, attention_mask=mask[:, s : s + step]) for s in range(0, L, step)], 1
        )
        y_next = model(nxt, state=state)
        for i, row in enumerate(rows):
            n = len(row)
            alone = model(torch.cat([row, nxt[i]])[None])  # (1, n + 1, V)
            assert_close(y[i, L - n :], alone[0, :n], tol, f"row {i}")
            assert_close(y_chunks[i, L - n :], alone[0, :n], tol, f"row {i}, chunked prefill")
            assert_close(y_next[i], alone[0, n:], tol, f"row {i}, next token")


@settings(max_examples=25, deadline=None)
@given(small_configs(), st.integers(1, 2), st.integers(1, 7), st.integers(1, 9), seeds)
def test_logits_to_keep(config, b, l, k, seed):
    model = make_model(config, seed)
    ids = ids_for(config, b, l, seed)
    with torch.no_grad():
        full = model(ids)
        kept = model(ids, logits_to_keep=k)
        state = model.new_state(b, l)
        last = model(ids, state=state, logits_to_keep=1)
    assert kept.shape == (b, min(k, l), config.vocab_size)
    assert_close(kept, full[:, -min(k, l) :], 1e-12, "kept logits")
    assert_close(last, full[:, -1:], 1e-10, "last logit with a state")


@settings(max_examples=15, deadline=None)
@given(small_configs(), seeds)
def test_every_parameter_gets_a_gradient(config, seed):
    model = make_model(config, seed, torch.float32).train()
    ids = ids_for(config, 2, 6, seed)
    _, loss = model(ids, targets=ids)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert torch.isfinite(loss) and loss.item() > 0


@settings(max_examples=20, deadline=None)
@given(small_configs(), st.integers(1, 3), st.integers(1, 20), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_inference_state_layout_and_nbytes(config, b, capacity, dtype):
    with torch.device("meta"):
        model = Jamba(config).to(dtype)
    state = model.new_state(b, capacity)
    g, e = config.num_key_value_heads, config.head_dim
    d, n, k = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv
    for kind, layer in zip(config.layer_types, state.layers):
        if kind == "attention":
            assert isinstance(layer, KVCache) and layer.k.shape == layer.v.shape == (b, g, capacity, e)
            assert layer.k.dtype == dtype
        else:
            assert isinstance(layer, MambaState)
            assert layer.conv.shape == (b, d, k - 1) and layer.conv.dtype == dtype
            assert layer.ssm.shape == (b, d, n)
            assert layer.ssm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # never 16 bits
    nbytes = state.nbytes()
    assert nbytes == plan_nbytes(config, b, capacity, dtype)
    assert nbytes["total"] == nbytes["kv_cache"] + nbytes["conv_state"] + nbytes["ssm_state"]
    ssm_size = 8 if dtype == torch.float64 else 4
    assert nbytes["ssm_state"] == config.layer_types.count("mamba") * b * d * n * ssm_size


@settings(max_examples=10, deadline=None)
@given(small_configs(), seeds)
def test_autocast_bf16_forward_and_decoding(config, seed):
    """Under bf16 autocast, prefill + decoding through a (fp32) InferenceState gives the autocast full
    forward's logits, the SSM state stays fp32, and the logits stay near the fp32 ones."""
    model = make_model(config, seed, torch.float32)
    ids = ids_for(config, 2, 6, seed)
    with torch.no_grad():
        ref = model(ids)
        state = model.new_state(2, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(ids)
            y = torch.cat([model(ids[:, :5], state=state), model(ids[:, 5:], state=state)], 1)
    assert all(layer.ssm.dtype == torch.float32 for layer in state.layers if isinstance(layer, MambaState))
    assert_close(y, full, 2**-7, "decoding vs full forward, both under autocast")
    # Several layers of bf16 matmuls with large random weights: a loose bound (p99 seen ~0.02).
    assert_close(y.float(), ref, 0.25, "logits under autocast vs fp32")


def test_bad_inputs_raise():
    config = JambaConfig.from_preset("tiny", vocab_size=16, hidden_size=8, intermediate_size=8,
                                     num_attention_heads=2, num_key_value_heads=1, mamba_dt_rank=2)  # fmt: skip
    model = make_model(config, 0, torch.float32)
    ids = torch.randint(0, 16, (2, 4))
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="batch"):
        model(ids, state=model.new_state(3, 8))
    state = model.new_state(2, 5)
    model(ids, state=state)
    with pytest.raises(ValueError, match="capacity"):
        model(ids[:, :2], state=state)
    with pytest.raises(ValueError):
        InferenceState(config, 0, 4)
