"""The Mamba mixer: its data flow, decoding == full forward, causality, padding, precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, assert_close, float_dtypes, gen, mamba_sizes, seeds
from minijamba import JambaConfig
from minijamba.model.mamba import MambaMixer
from minijamba.model.ssm import selective_scan_sequential
from minijamba.model.state import MambaState


@st.composite
def mixers(draw, dtype=None):
    """A randomly sized and randomly initialised MambaMixer, its config and dtype."""
    config = JambaConfig.from_preset(
        "tiny",
        hidden_size=draw(st.integers(1, 6)),
        num_attention_heads=1,
        num_key_value_heads=1,
        **mamba_sizes(draw),
    )
    dtype = dtype or draw(float_dtypes)
    torch.manual_seed(draw(seeds))
    mixer = MambaMixer(config)
    mixer.reset_parameters(std=0.5, out_std=0.5)
    with torch.no_grad():  # move everything off its special initial value
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer.to(dtype), config, dtype


def new_state(mixer: MambaMixer, b: int, dtype) -> MambaState:
    """Zero state, laid out as InferenceState lays it out (ssm in fp32, fp64 for fp64 models)."""
    ssm_dtype = torch.promote_types(dtype, torch.float32)
    return MambaState(torch.zeros(b, mixer.d, mixer.k - 1, dtype=dtype), torch.zeros(b, mixer.d, mixer.n, dtype=ssm_dtype))


def rand_x(b, l, h, seed, dtype):
    return torch.randn(b, l, h, generator=gen(seed), dtype=torch.float64).to(dtype)


@settings(max_examples=25, deadline=None)
@given(mixers(dtype=torch.float64), st.integers(1, 3), st.integers(1, 12), seeds)
def test_forward_matches_the_data_flow(mm, b, l, seed):
    """The mixer == its data flow written out with plain ops: F.linear with each projection's
    weights in the time-first layout (no minijamba.kernels.time_last), nn.Conv1d over the input with k-1 zeros
    before it (Mamba's causal conv), the Δ/B/C norms, softplus(Δ + bias), the sequential scan."""
    mixer, config, dtype = mm
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    lin = lambda t, m, bias=True: F.linear(t, m.weight, m.bias if bias else None)  # noqa: E731
    xs, z = lin(x, mixer.in_proj).chunk(2, dim=-1)  # (b, l, d) each
    u = F.silu(mixer.conv1d(F.pad(xs.transpose(1, 2), (mixer.k - 1, 0))))  # (b, d, l), causal: k-1 zeros before
    dt, B, C = lin(u.transpose(1, 2), mixer.x_proj).split([mixer.r, mixer.n, mixer.n], dim=-1)
    dt = lin(mixer.dt_layernorm(dt), mixer.dt_proj)  # (b, l, d), bias included
    y = selective_scan_sequential(
        u, F.softplus(dt).transpose(1, 2), -torch.exp(mixer.A_log), mixer.b_layernorm(B).transpose(1, 2),
        mixer.c_layernorm(C).transpose(1, 2), mixer.D, z=z.transpose(1, 2),
    )  # fmt: skip
    expected = lin(y.transpose(1, 2), mixer.out_proj)
    with torch.no_grad():
        assert_close(mixer(x), expected, 1e-10, "mixer output")


@settings(max_examples=40, deadline=None)
@given(mixers(), st.integers(1, 3), st.integers(1, 12), st.lists(st.integers(1, 5), min_size=1, max_size=12), seeds)
def test_chunked_and_step_by_step_equal_full(mm, b, l, chunk_sizes, seed):
    """Running a sequence in arbitrary chunks (size 1 = the decoding step) through a MambaState
    gives the full-sequence output, and leaves the state the full sequence leaves."""
    mixer, config, dtype = mm
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    with torch.no_grad():
        full = mixer(x)
        state = new_state(mixer, b, dtype)
        outs, s = [], 0
        for size in chunk_sizes * l:  # cycle through the chunk sizes until the sequence is used up
            if s >= l:
                break
            outs.append(mixer(x[:, s : s + size], state))
            s += size
        # One more step after all of it: the state must continue exactly like a longer sequence.
        x_next = rand_x(b, 1, config.hidden_size, seed + 1, dtype)
        outs.append(mixer(x_next, state))
        longer = mixer(torch.cat([x, x_next], 1))
    assert_close(torch.cat(outs, 1)[:, :l], full, MODEL_RTOL[dtype], "chunked vs full")
    assert_close(outs[-1], longer[:, -1:], MODEL_RTOL[dtype], "next step")


@settings(max_examples=30, deadline=None)
@given(mixers(), st.integers(1, 2), st.integers(1, 10), st.data())
def test_causality(mm, b, l, data):
    mixer, config, dtype = mm
    seed = data.draw(seeds)
    t = data.draw(st.integers(0, l - 1))
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    x2 = x.clone()
    x2[:, t] += 1.0 + rand_x(b, 1, config.hidden_size, seed + 1, dtype)[:, 0].abs()
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    assert_close(y2[:, :t], y[:, :t], MODEL_RTOL[dtype], "outputs before t")
    assert (y2[:, t] - y[:, t]).abs().max() > 1e-6, "changing token t must change output t"


@settings(max_examples=40, deadline=None)
@given(mixers(), st.lists(st.integers(1, 7), min_size=1, max_size=3), seeds)
def test_left_padding_equals_each_row_alone(mm, lengths, seed):
    """A left-padded batch (junk in the padding) gives each row's outputs at its real positions,
    leaves each row's conv and SSM state as the row alone leaves them, and decodes on identically."""
    mixer, config, dtype = mm
    b, L, h = len(lengths), max(lengths) + 2, config.hidden_size  # at least 2 padding positions
    x = rand_x(b, L, h, seed, dtype) * 3  # the padding holds large junk
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, L - n :] = True
    x_next = rand_x(b, 1, h, seed + 1, dtype)
    with torch.no_grad():
        state = new_state(mixer, b, dtype)
        y = mixer(x, state, mask)
        conv, ssm = state.conv.clone(), state.ssm.clone()  # the state the prompt left
        y_full = mixer(x, None, mask)  # the same without a state
        y_next = mixer(x_next, state)
        for i, n in enumerate(lengths):
            alone_state = new_state(mixer, 1, dtype)
            alone = mixer(x[i : i + 1, L - n :], alone_state)
            tol = MODEL_RTOL[dtype]
            assert_close(y[i : i + 1, L - n :], alone, tol, f"row {i} outputs")
            assert_close(y_full[i : i + 1, L - n :], alone, tol, f"row {i} outputs, no state")
            assert_close(conv[i : i + 1], alone_state.conv, tol, f"row {i} conv state")
            assert_close(ssm[i : i + 1], alone_state.ssm, tol, f"row {i} ssm state")
            assert_close(y_next[i : i + 1], mixer(x_next[i : i + 1], alone_state), tol, f"row {i} next step")


@settings(max_examples=15, deadline=None)
@given(mixers(dtype=torch.float32), st.integers(1, 2), st.integers(2, 10), seeds)
def test_autocast_bf16_keeps_fp32_state_and_parameters(mm, b, l, seed):
    """Under bf16 autocast the SSM state, A_log, D and the Δ bias stay fp32, prefill + a decoding
    step give the autocast full forward, and the output stays near the fp32 output."""
    mixer, config, dtype = mm
    x = rand_x(b, l, config.hidden_size, seed, dtype)
    with torch.no_grad():
        ref = mixer(x)
        state = new_state(mixer, b, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = mixer(x)
            y = torch.cat([mixer(x[:, :-1], state), mixer(x[:, -1:], state)], 1)
    assert state.ssm.dtype == torch.float32
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_proj.bias.dtype} == {torch.float32}
    assert_close(y, full, 2**-7, "decoding vs full forward, both under autocast")
    assert_close(y.float(), ref, 0.15, "autocast vs fp32")  # bf16 matmuls: p99 ~0.02, worst seen 0.06
