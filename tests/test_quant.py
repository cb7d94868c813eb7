"""int8 weight-only experts (minijamba.inference.quant): the rounding bound, the experts against their
dequantized float twin, whole models against float32, and quantized checkpoints.

Bounds measured when these tests were written (float32, CPU):
  * small random configs (tests.helpers.small_configs, init std 0.3), 300 examples: per position,
    max |logits error| / max |logits| had a median of at most 0.37% (99th percentile of the
    maximum: 1.5%, worst 24%); argmax agreed at >= 91.7% of positions. Random nets at large init are
    chaotic: uniform noise of the size of the rounding moves the logits as much, and a position
    whose router flips its top-K moves a lot. Asserted: median <= 1%, agreement >= 80%.
  * the 'tiny' preset at its own init, 8 seeds of 4 x 8 tokens: at 255 of 256 positions the error
    was <= 0.041% of max |logits|; at the one position where the router's top-K flipped, 1.05%.
    Asserted: <= 0.5% at >= 90% of positions and <= 3% everywhere. Greedy decoding of 24 tokens
    from 4 prompts gave the same tokens as float32 for 4 of 4 seeds; asserted >= 90%.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minijamba import JambaConfig, generate
from minijamba.inference.materialize import build, meta_model
from minijamba.model.moe import Experts, SparseMoE, experts_loop
from minijamba.inference.quant import (
    KERNEL_ENV, Int8Experts, check_quantize, grouped_int8_linear_reference, quantize_model_, quantize_rows,
)
from minijamba.kernels import int8_dequant

from helpers import assert_close, gen, make_model, seeds, small_configs


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 17), seeds, st.floats(1e-3, 1e3))
def test_quantize_rows_error_is_at_most_half_a_step(n, o, i, seed, scale):
    w = torch.randn(n, o, i, generator=gen(seed), dtype=torch.float64) * scale
    w[0, 0] = 0  # a zero row must not divide by zero
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (n, o)
    assert q.abs().max() <= 127
    step = s.double()[..., None]
    assert ((q.double() * step - w).abs() <= step / 2 * (1 + 1e-6)).all()
    # the largest entry of each nonzero row is exactly +-127
    nz = w.abs().amax(-1) > 0
    assert (q.abs().amax(-1)[nz] == 127).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 12), seeds)
def test_int8_experts_equal_their_dequantized_float_twin(n, h4, f4, t, seed):
    config = JambaConfig(num_experts=n, hidden_size=4 * h4, intermediate_size=4 * f4, num_attention_heads=1,
                         num_key_value_heads=1, num_experts_per_tok=1)  # fmt: skip
    torch.manual_seed(seed)
    experts = Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    q = Int8Experts.from_experts(experts)
    twin = q.dequantize()
    K = min(2, n)
    x = torch.randn(t, config.hidden_size, generator=gen(seed))
    idx = (
        torch.stack([torch.randperm(n, generator=gen(seed + j))[:K] for j in range(t)])
        if t
        else torch.zeros(0, K, dtype=torch.long)
    )
    weights = torch.rand(t, K, generator=gen(seed))
    expected = experts_loop(twin, x, weights, idx)
    assert_close(q(x, weights, idx), expected, 1e-5, "Int8Experts vs dequantized float experts")
    assert_close(experts_loop(q, x, weights, idx), expected, 1e-5, "experts_loop on Int8Experts")


@settings(max_examples=12, deadline=None)
@given(small_configs(moe=True), seeds)
def test_int8_model_logits_close_to_float32(config, seed):
    model = make_model(config, seed, torch.float32)
    quant = quantize_model_(copy.deepcopy(model))
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen(seed))
    with torch.no_grad():
        a, b = model(ids), quant(ids)
    per_position = (b - a).abs().amax(-1) / a.abs().max().clamp(min=1e-3)  # (b, l)
    assert per_position.median() <= 0.01, f"median error {per_position.median():.2%} of max |logits|"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_only_experts_are_quantized_and_parameter_counts_stay():
    model = build("tiny", dtype=torch.float32, seed=0)
    quant = quantize_model_(copy.deepcopy(model))
    assert quant.num_parameters() == model.num_parameters()
    assert quant.num_parameters(active=True) == model.num_parameters(active=True)
    for name, p in quant.named_parameters():
        if ".experts." in name:
            assert p.dtype == torch.int8 and not p.requires_grad, name
        else:
            assert p.dtype == torch.float32, name  # Mamba, attention, router, norms, embeddings untouched
    n_moe = sum(isinstance(m, SparseMoE) for m in quant.modules())
    assert n_moe == sum(quant.config.moe_layers) > 0
    assert all(isinstance(m.experts, Int8Experts) for m in quant.modules() if isinstance(m, SparseMoE))


def test_tiny_preset_logits_and_greedy_tokens():
    config = JambaConfig.from_preset("tiny")
    for seed in range(2):
        model = build(config, dtype=torch.float32, seed=seed)
        quant = build(config, dtype=torch.float32, seed=seed, quantize="int8")
        ids = torch.randint(0, config.vocab_size, (4, 8), generator=gen(seed))
        with torch.no_grad():
            a, b = model(ids), quant(ids)
        assert_close(b, a, 0.03, "tiny preset, int8 experts")
        per_position = (a - b).abs().amax(-1) / a.abs().max()  # (b, l)
        assert (per_position <= 0.005).float().mean() >= 0.9
        same = (generate(model, ids, 24) == generate(quant, ids, 24))[:, 8:].float().mean()
        assert same >= 0.9, f"greedy tokens equal at only {same:.0%} of steps"


def test_quantized_checkpoint_round_trips_through_safetensors(tmp_path):
    quant = build("tiny", dtype=torch.bfloat16, seed=1, quantize="int8")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in quant.state_dict().items() if k != "lm_head.weight"}, str(path))
    fresh = meta_model(quant.config, torch.bfloat16, "int8").to_empty(device="cpu")
    fresh.load_state_dict(load_file(str(path)), strict=False)
    fresh.lm_head.weight = fresh.embed_tokens.weight  # tied in the tiny preset
    ids = torch.randint(0, quant.config.vocab_size, (2, 10), generator=gen(0))
    assert torch.equal(generate(fresh.eval(), ids, 6), generate(quant, ids, 6))


def test_float_checkpoint_loads_into_int8_experts_by_quantizing():
    model = build("tiny", dtype=torch.float32, seed=2)
    quant = meta_model(model.config, torch.float32, "int8").to_empty(device="cpu")
    quant.load_state_dict(model.state_dict())  # float experts, no scales: quantized on the way in
    expected = quantize_model_(copy.deepcopy(model))
    for name, t in expected.state_dict().items():
        assert torch.equal(quant.state_dict()[name], t), name


def test_bad_quantize_mode_is_a_value_error():
    with pytest.raises(ValueError, match="int8"):
        check_quantize("int4")
    with pytest.raises(ValueError, match="quantize"):
        build("tiny", quantize="fp8")
    assert (
        quantize_model_(build("tiny", dtype=torch.float32), None)
        .layers[1]
        .feed_forward.experts.gate_up_proj.dtype
        == torch.float32
    )


def test_set_expert_rejects_wrong_shapes():
    q = Int8Experts(JambaConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="gate_up_proj"):
        q.set_expert(0, torch.zeros(3, 3), torch.zeros(128, 256))


def test_jamba_v01_int8_weights_fit_one_80gb_gpu():
    """45.1B expert parameters in int8 plus 6.5B others in bf16: about 58 GB (54 GiB)."""
    model = meta_model(JambaConfig.from_preset("jamba-v0.1"), torch.bfloat16, "int8")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    other = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    assert round(experts / 1e9, 1) == 45.1 and round(other / 1e9, 1) == 6.5
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert 57e9 < nbytes < 59e9


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.sampled_from([8, 24]), st.sampled_from([16, 40]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(1, 3), seeds)
def test_dequantized_twin_equals_the_reference(counts, o, i, dtype, experts_per_group, seed):
    """The prefill twin (dequantize a group of experts, one grouped GEMM) computes the reference's
    function for any rows per expert (none included), any grouping of the experts, in float32 and bf16."""
    E = len(counts)
    q, scale = quantize_rows(torch.randn(E * o, i, generator=gen(seed)))
    q, scale = q.view(E, o, i), scale.view(E, o)  # (E, o, i) int8, (E, o)
    ends = torch.tensor(counts).cumsum(0)  # (E,)
    x = torch.randn(int(ends[-1]), i, generator=gen(seed + 1)).to(dtype)  # (t*K, i)
    expected = grouped_int8_linear_reference(x, q, scale, ends)
    group_bytes = experts_per_group * o * i * x.element_size()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8_dequant, "DEQUANT_BYTES", group_bytes)
        got = int8_dequant.grouped_int8_linear_dequantized(x, q, scale, ends)
    assert got.shape == expected.shape and got.dtype == dtype
    if len(got):
        assert_close(got, expected, 1e-5 if dtype == torch.float32 else 2e-2, "dequantized twin vs reference")


def test_model_runs_the_same_with_the_dequantized_twin(monkeypatch):
    """Chosen through the one dispatch point ($MINIJAMBA_INT8_KERNEL=dequant), the whole model's logits."""
    model = build(JambaConfig.from_preset("tiny", hidden_size=64, intermediate_size=64), dtype=torch.float32,
                  quantize="int8")  # fmt: skip
    ids = torch.randint(0, 4096, (2, 9), generator=gen(0))
    monkeypatch.setenv(KERNEL_ENV, "reference")
    with torch.no_grad():
        expected = model(ids)
    monkeypatch.setenv(KERNEL_ENV, "dequant")
    with torch.no_grad():
        got = model(ids)
    assert_close(got, expected, 1e-5, "model logits, dequantized twin vs reference int8 kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's bf16 grouped GEMM")
def test_dequantized_twin_on_cuda_equals_the_reference():
    """On the GPU in bf16 (the dtype it is chosen for), at a prefill's row counts and widths that are
    multiples of 16 bytes, in one group and in several."""
    E, o, i = 4, 256, 128
    q, scale = quantize_rows(torch.randn(E * o, i, generator=gen(0)))
    q, scale = q.view(E, o, i).cuda(), scale.view(E, o).cuda()
    ends = torch.tensor([300, 300, 900, 1024]).cuda()  # expert 1 has no rows
    x = torch.randn(1024, i, generator=gen(1)).to("cuda", torch.bfloat16)
    expected = grouped_int8_linear_reference(x, q, scale, ends)
    for group_bytes in (int8_dequant.DEQUANT_BYTES, o * i * 2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(int8_dequant, "DEQUANT_BYTES", group_bytes)
            got = int8_dequant.grouped_int8_linear_dequantized(x, q, scale, ends)
        assert_close(got, expected, 2e-2, f"dequantized twin vs reference, groups of {group_bytes} bytes")
