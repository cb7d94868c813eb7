"""The memory plan (minijamba.inference.memory_plan): exact for weights and state, Table 1 of the paper, the
refusal and its largest context, activations that follow the chunk and not the context."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minijamba import InferenceState, JambaConfig
from minijamba.inference.materialize import build
from minijamba.inference.memory_plan import GiB, DoesNotFit, check, largest_context, plan, with_context
from minijamba.model.state import plan_nbytes

from helpers import small_configs

JAMBA = JambaConfig.from_preset("jamba-v0.1")


@settings(max_examples=25, deadline=None)
@given(
    small_configs(), st.integers(1, 3), st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16])
)
def test_state_plan_equals_what_the_state_allocates(config, batch, capacity, dtype):
    expected = InferenceState(config, batch, capacity, dtype=dtype).nbytes()
    assert plan_nbytes(config, batch, capacity, dtype) == expected
    assert plan(config, capacity, batch, dtype=dtype).state == expected


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_plan_equals_the_built_model(quantize, dtype):
    model = build("tiny", dtype=dtype, quantize=quantize)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()  # tied once
    assert plan(model.config, 16, dtype=dtype, quantize=quantize).weights_total == sum(
        t.nbytes for t in tensors
    )


def test_table_1_kv_cache_at_256k_tokens():
    """Paper, Table 1: KV cache at 256K tokens, batch 1, 16-bit. Jamba: 4GB (4 attention layers x
    k and v x 8 kv heads x 128 x 262144 x 2 bytes). An all-attention model of the same dimensions has
    32 attention layers: 32GB, Mixtral's row (same layers, kv heads and head size)."""
    assert plan(JAMBA, 262144, chunk=4096).state["kv_cache"] == 4 * GiB
    assert plan(JAMBA.with_layout("attention"), 262144, chunk=4096).state["kv_cache"] == 32 * GiB
    # Mamba states do not grow with the context: 28 layers x (conv (8192, 3) bf16 + ssm (8192, 16) fp32)
    s = plan(JAMBA, 262144, chunk=4096).state
    assert s["conv_state"] == 28 * 8192 * 3 * 2 and s["ssm_state"] == 28 * 8192 * 16 * 4


def test_jamba_int8_weights():
    weights = plan(JAMBA, 1024, chunk=1024, quantize="int8").weights
    assert weights["experts (int8)"] == 16 * 16 * 3 * 4096 * 14336  # 16 MoE layers x 16 experts x 3 matrices
    assert weights["expert scales (float32)"] == 16 * 16 * (2 * 14336 + 4096) * 4
    assert 54 * GiB < sum(weights.values()) < 55 * GiB
    assert 96 * GiB < plan(JAMBA, 1024).weights_total < 97 * GiB  # bf16: does not fit 80GB at all


def test_activations_follow_the_chunk_not_the_context():
    short, long = (
        plan(JAMBA, 32768, chunk=2048, quantize="int8"),
        plan(JAMBA, 1 << 20, chunk=2048, quantize="int8"),
    )
    assert short.activations == long.activations
    assert plan(JAMBA, 1 << 20, chunk=1024, quantize="int8").activations_peak < long.activations_peak
    # with padding the masked attention path needs the (b, l, s) mask and scores: grows with the context
    assert plan(JAMBA, 1 << 20, chunk=2048, padding=True).activations["attention"] > 10 * GiB
    # one piece: the chunk is the whole context
    assert plan(JAMBA, 5000).chunk == 5000 and plan(JAMBA, 5000, chunk=8192).chunk == 5000
    # the longest call is the prompt: new tokens are decoded one at a time
    assert plan(JAMBA, 5000, new_tokens=1000).chunk == 4000
    assert plan(JAMBA, 5000, chunk=512, new_tokens=1000).chunk == 512


def test_the_reference_scan_dominates_jamba_activations():
    a = plan(JAMBA, 65536, chunk=1024, quantize="int8").activations
    assert max(a, key=a.get) == "mamba"
    assert a["mamba"] >= 4 * 1024 * 8192 * 16 * 4  # four (b, c, d, n) float32 tensors
    fused = plan(JAMBA, 65536, chunk=1024, quantize="int8", scan_backend="triton").activations
    assert fused["mamba"] < a["mamba"] / 10


def test_check_refuses_with_the_largest_context_that_fits():
    p = plan(JAMBA, 1 << 22, chunk=2048, quantize="int8")
    available = 78 * GiB
    with pytest.raises(DoesNotFit, match="largest context that fits is") as info:
        check(p, available)
    best = info.value.largest_context
    assert with_context(p, best).total <= available < with_context(p, best + 1).total
    assert best == largest_context(p, available)
    check(with_context(p, best), available)  # fits: no error
    assert isinstance(info.value, ValueError)


def test_check_says_when_even_the_weights_do_not_fit():
    with pytest.raises(DoesNotFit, match="int8") as info:
        check(plan(JAMBA, 4096, chunk=1024), 78 * GiB)  # bf16 experts: 96 GiB of weights
    assert info.value.largest_context == 0


def test_plan_prints_every_part():
    text = str(plan(JAMBA, 262144, chunk=2048, quantize="int8"))
    for word in ("weights", "kv_cache", "ssm_state", "activations", "mamba", "total", "262,144", "int8"):
        assert word in text


@pytest.mark.parametrize(
    "bad", [dict(context=0), dict(context=10, batch=0), dict(context=10, chunk=0), dict(context=1.5)]
)
def test_bad_plan_arguments(bad):
    with pytest.raises(ValueError, match="memory plan"):
        plan(JAMBA, **bad)


def test_largest_context_keeps_the_new_tokens_and_the_chunk():
    p = plan(JAMBA, 300_000, chunk=2048, quantize="int8", new_tokens=100)
    best = largest_context(p, 70 * GiB)
    q = with_context(p, best)
    assert q.context == best and q.context - q.new_tokens == best - 100 and q.chunk == 2048
    assert q.total <= 70 * GiB < with_context(p, best + 1).total


def test_new_tokens_must_leave_a_prompt():
    with pytest.raises(ValueError, match="new_tokens"):
        plan(JAMBA, 10, new_tokens=10)


def test_serving_plan_counts_every_slot_and_largest_batch_is_the_largest_that_fits():
    """The serving plan's state is what an InferenceState of that many slots holds; its activations
    are the larger of one prompt's prefill and one step of every slot; largest_batch fits and one
    more slot does not."""
    from minijamba.inference.memory_plan import largest_batch, plan, serving_plan

    config = JambaConfig.from_preset("tiny")
    for slots in (1, 3, 17):
        p = serving_plan(config, 40, slots, dtype=torch.float32)
        assert p.state == InferenceState(config, slots, 40, dtype=torch.float32).nbytes()
        prefill = plan(config, 40, 1, dtype=torch.float32, new_tokens=1).activations_peak
        assert p.activations_peak >= prefill
    room = serving_plan(config, 40, 50, dtype=torch.float32).total + 1
    best = largest_batch(config, 40, room, dtype=torch.float32)
    assert best >= 50
    assert serving_plan(config, 40, best, dtype=torch.float32).total <= room
    assert serving_plan(config, 40, best + 1, dtype=torch.float32).total > room
    assert largest_batch(config, 40, 1, dtype=torch.float32) == 0
