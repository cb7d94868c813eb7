"""The selective scan: the sequential recurrence, the parallel scan and the decoding step agree.

Shapes (mamba-ssm's layout): u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
initial_state and the last state (b, d, n).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import RTOL, assert_close, gen, seeds
from minijamba.model.ssm import selective_scan, selective_scan_sequential, selective_state_update

OPTIONAL = ("D", "z", "delta_bias", "initial_state")


@st.composite
def scan_cases(draw, min_len=0, max_len=24, dtype=None):
    """Random sizes, a random subset of the optional arguments, random values."""
    return dict(
        b=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 5)),
        n=draw(st.integers(1, 5)),
        l=draw(st.integers(min_len, max_len)),
        use={k: draw(st.booleans()) for k in OPTIONAL},
        softplus=draw(st.booleans()),
        seed=draw(seeds),
        dtype=dtype or draw(st.sampled_from([torch.float64, torch.float32])),
    )


def make_inputs(case, dtype=None, requires_grad=False):
    """The scan's arguments as a dict of tensors (None for the optional ones not in use)."""
    g = gen(case["seed"])
    b, d, n, l = case["b"], case["d"], case["n"], case["l"]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if case["softplus"]:
        delta, bias = r(b, d, l), 0.5 * r(d)  # softplus makes any value a positive step
    else:  # Δ is used as given: keep it positive, as a step size is
        delta = 0.05 + torch.rand(b, d, l, generator=g, dtype=torch.float64)
        bias = 0.1 * torch.rand(d, generator=g, dtype=torch.float64)
    args = dict(
        u=r(b, d, l),
        delta=delta,
        A=-torch.exp(0.5 * r(d, n)),  # negative real, as -exp(A_log)
        B=r(b, n, l),
        C=r(b, n, l),
        D=r(d),
        z=r(b, d, l),
        delta_bias=bias,
        initial_state=r(b, d, n),
    )
    for k in OPTIONAL:
        if not case["use"][k]:
            args[k] = None
    dtype = dtype or case["dtype"]
    return {
        k: None if v is None else v.to(dtype).requires_grad_(requires_grad) for k, v in args.items()
    }


def run(fn, args, case, return_last_state=True):
    return fn(**args, delta_softplus=case["softplus"], return_last_state=return_last_state)


# --- the reference against the paper's formula -------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(scan_cases(max_len=10, dtype=torch.float64))
def test_sequential_matches_the_closed_form(case):
    """h_t = sum_{s<=t} exp(A * sum_{s<r<=t} Δ_r) Δ_s B_s u_s  (+ exp(A * sum_{r<=t} Δ_r) h_{-1}),
    y_t = (C_t · h_t + D u_t) * SiLU(z_t): the recurrence unrolled, computed independently."""
    a = make_inputs(case)
    delta = a["delta"] + (0 if a["delta_bias"] is None else a["delta_bias"][None, :, None])
    if case["softplus"]:
        delta = F.softplus(delta)
    cum = torch.cumsum(delta, -1)  # (b, d, l): sum_{r<=t} Δ_r
    decay = torch.exp((cum[..., :, None] - cum[..., None, :])[..., None] * a["A"][None, :, None, None])  # (b, d, t, s, n)
    causal = torch.ones(case["l"], case["l"], dtype=torch.bool).tril()[..., None]  # (t, s, 1)
    x = (delta * a["u"])[:, :, None, :, None] * a["B"].transpose(1, 2)[:, None, None]  # (b, d, 1, s, n)
    h = (decay * x * causal).sum(3)  # (b, d, t, n)
    if a["initial_state"] is not None:
        h = h + torch.exp(cum[..., None] * a["A"][None, :, None]) * a["initial_state"][:, :, None]
    y = torch.einsum("bdtn,bnt->bdt", h, a["C"])
    if a["D"] is not None:
        y = y + a["D"][None, :, None] * a["u"]
    if a["z"] is not None:
        y = y * F.silu(a["z"])
    out, last = run(selective_scan_sequential, a, case)
    assert_close(out, y, 1e-10, "y")
    if case["l"]:
        assert_close(last, h[:, :, -1], 1e-10, "last state")


# --- sequential == parallel, values and gradients ----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(scan_cases(), st.booleans())
def test_parallel_equals_sequential(case, return_last_state):
    tol = RTOL[case["dtype"]]
    a = make_inputs(case, requires_grad=True)
    seq = run(selective_scan_sequential, a, case, return_last_state)
    par = run(selective_scan, a, case, return_last_state)
    if return_last_state:
        assert isinstance(par, tuple) and len(par) == 2
        (ys, hs), (yp, hp) = seq, par
        assert hp.dtype == hs.dtype == torch.promote_types(case["dtype"], torch.float32)
        assert_close(hp, hs, tol, "last state")
    else:
        assert isinstance(par, torch.Tensor)
        ys, yp = seq, par
    assert yp.dtype == case["dtype"] and yp.shape == (case["b"], case["d"], case["l"])
    assert_close(yp, ys, tol, "y")

    if case["l"] == 0:
        return  # nothing to differentiate (zero-length sequences: see test_zero_length_sequence)
    # Gradients of a random linear function of the outputs, with respect to every input.
    g = gen(case["seed"] + 1)
    names = [k for k, v in a.items() if v is not None]
    outs_s = seq if return_last_state else (seq,)
    outs_p = par if return_last_state else (par,)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs_s]
    loss_s = sum((o * c).sum() for o, c in zip(outs_s, cot))
    loss_p = sum((o * c).sum() for o, c in zip(outs_p, cot))
    grads_s = torch.autograd.grad(loss_s, [a[k] for k in names], allow_unused=True)
    grads_p = torch.autograd.grad(loss_p, [a[k] for k in names], allow_unused=True)
    for k, gs, gp in zip(names, grads_s, grads_p):
        assert gs is not None and gp is not None, f"no gradient for {k}"
        assert_close(gp, gs, 10 * tol, f"d/d{k}")


@settings(max_examples=20, deadline=None)
@given(scan_cases(min_len=1, max_len=12, dtype=torch.float64))
def test_parallel_gradcheck(case):
    """The parallel scan's hand-written backward against finite differences."""
    a = make_inputs(case, requires_grad=True)
    names = [k for k, v in a.items() if v is not None]

    def f(*xs):
        out, last = selective_scan(**dict(zip(names, xs)), delta_softplus=case["softplus"], return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(a[k] for k in names), eps=1e-6, atol=1e-6)


# --- chunks and decoding steps -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(scan_cases(max_len=20), st.lists(st.integers(0, 20), max_size=4), st.booleans())
def test_chunked_with_initial_state_equals_whole(case, cuts, parallel):
    """A long prompt in chunks, each starting from the last state of the one before: same y, same state."""
    fn = selective_scan if parallel else selective_scan_sequential
    a = make_inputs(case)
    y_whole, h_whole = run(fn, a, case)
    bounds = sorted({0, case["l"], *[min(c, case["l"]) for c in cuts]})
    ys, h = [], a["initial_state"]
    for s, e in zip(bounds[:-1], bounds[1:]):
        chunk = dict(a, initial_state=h)
        for k in ("u", "delta", "z", "B", "C"):
            if a[k] is not None:
                chunk[k] = a[k][..., s:e]
        y, h = run(fn, chunk, case)
        ys.append(y)
    tol = RTOL[case["dtype"]]
    y_chunks = torch.cat(ys, -1) if ys else y_whole[..., :0]
    assert_close(y_chunks, y_whole, tol, "y")
    if h is not None:
        assert_close(h, h_whole, tol, "last state")


@settings(max_examples=40, deadline=None)
@given(scan_cases(max_len=16))
def test_state_update_steps_equal_scan(case):
    """Decoding one token at a time with selective_state_update == the full scan."""
    a = make_inputs(case)
    y_full, h_full = run(selective_scan_sequential, a, case)
    state = torch.zeros(case["b"], case["d"], case["n"], dtype=torch.float32 if case["dtype"] != torch.float64 else torch.float64)
    if a["initial_state"] is not None:
        state.copy_(a["initial_state"])
    ys = []
    for t in range(case["l"]):
        y = selective_state_update(
            state, a["u"][..., t], a["delta"][..., t], a["A"], a["B"][..., t], a["C"][..., t], a["D"],
            z=None if a["z"] is None else a["z"][..., t], dt_bias=a["delta_bias"], dt_softplus=case["softplus"],
        )  # fmt: skip
        assert y.shape == (case["b"], case["d"]) and y.dtype == case["dtype"]
        ys.append(y)
    tol = RTOL[case["dtype"]]
    assert_close(torch.stack(ys, -1) if ys else y_full, y_full, tol, "y")
    assert_close(state, h_full, tol, "state")


# --- precision: bf16 inputs, autocast ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(scan_cases(min_len=1, max_len=16, dtype=torch.bfloat16), st.booleans())
def test_bf16_inputs_keep_fp32_state(case, parallel):
    fn = selective_scan if parallel else selective_scan_sequential
    a16 = make_inputs(case)
    y16, h16 = run(fn, a16, case)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    # The same (bf16-rounded) numbers in fp32: the state is computed in fp32, so it matches to fp32
    # precision; only the output's final rounding to bf16 differs.
    a32 = {k: None if v is None else v.float() for k, v in a16.items()}
    y32, h32 = run(fn, a32, case)
    assert_close(h16, h32, RTOL[torch.float32], "state vs fp32 on the same values")
    assert_close(y16, y32, 2**-8, "y vs fp32 on the same values (one bf16 rounding)")
    # And against the unrounded fp32 inputs: rounding each input to bf16 perturbs every term of the
    # sums y_t = sum_s C_t exp(..) Δ_s B_s u_s by a few bf16 ulps; where the terms cancel, that is
    # large next to y itself, so the bound is relative to the sum of the terms' magnitudes (the
    # same scan on |u|, |B|, |C|, |D|, |h_0|: every term positive, nothing cancels).
    af = make_inputs(case, dtype=torch.float32)
    yf, hf = run(fn, af, case)
    mag = {k: None if af[k] is None else af[k].abs() for k in ("u", "B", "C", "D", "initial_state")}
    y_mag, h_mag = run(fn, {**af, **mag, "z": None}, case)
    gate = 1.0 if af["z"] is None else F.silu(af["z"]).abs().max().item()
    for name, got, want, bound in (("y", y16, yf, y_mag.max().item() * gate), ("state", h16, hf, h_mag.max().item())):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 16 * 2**-8 * bound + 1e-6, f"{name} vs fp32 inputs: {err:.3g} > 16 bf16 ulps of {bound:.3g}"

    # The decoding step keeps the fp32 state too.
    state = torch.zeros(case["b"], case["d"], case["n"])
    if a16["initial_state"] is not None:
        state.copy_(a16["initial_state"])
    y = selective_state_update(
        state, a16["u"][..., 0], a16["delta"][..., 0], a16["A"], a16["B"][..., 0], a16["C"][..., 0], a16["D"],
        z=None if a16["z"] is None else a16["z"][..., 0], dt_bias=a16["delta_bias"], dt_softplus=case["softplus"],
    )  # fmt: skip
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    _, h1 = run(fn, {**a32, **{k: a32[k][..., :1] for k in ("u", "delta", "B", "C")},
                     "z": None if a32["z"] is None else a32["z"][..., :1]}, case)  # fmt: skip
    assert_close(state, h1, RTOL[torch.float32], "one decoding step")


@settings(max_examples=20, deadline=None)
@given(scan_cases(max_len=12, dtype=torch.float32), st.booleans(), st.booleans())
def test_autocast_bf16_keeps_fp32_math(case, parallel, bf16_inputs):
    """Under torch.autocast(cpu, bf16) the scan still runs in fp32: fp32 state, same result."""
    fn = selective_scan if parallel else selective_scan_sequential
    a = make_inputs(case, dtype=torch.bfloat16 if bf16_inputs else torch.float32)
    y_ref, h_ref = run(fn, a, case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = run(fn, a, case)
        state = torch.zeros(case["b"], case["d"], case["n"])
        if case["l"]:
            selective_state_update(
                state, a["u"][..., 0], a["delta"][..., 0], a["A"], a["B"][..., 0], a["C"][..., 0], a["D"],
                dt_bias=a["delta_bias"], dt_softplus=case["softplus"],
            )  # fmt: skip
    assert h.dtype == torch.float32 and state.dtype == torch.float32
    assert y.dtype == a["u"].dtype
    assert_close(h, h_ref, 1e-6, "state under autocast")
    assert_close(y, y_ref, 1e-6, "y under autocast")


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_sequential])
@pytest.mark.parametrize("with_initial", [False, True])
def test_zero_length_sequence(fn, with_initial):
    b, d, n = 2, 3, 4
    u = torch.zeros(b, d, 0)
    B = torch.zeros(b, n, 0)
    h0 = torch.randn(b, d, n, requires_grad=True) if with_initial else None
    y, h = fn(u, u, -torch.ones(d, n), B, B, torch.ones(d), z=u, delta_bias=torch.zeros(d),
              delta_softplus=True, return_last_state=True, initial_state=h0)  # fmt: skip
    assert y.shape == (b, d, 0) and h.shape == (b, d, n) and h.dtype == torch.float32
    if with_initial:
        assert torch.equal(h, h0)  # nothing happened: the state is the one given
        (grad,) = torch.autograd.grad((h * 2).sum(), h0)
        assert torch.equal(grad, torch.full_like(h0, 2.0))
    else:
        assert not h.any()
    assert fn(u, u, -torch.ones(d, n), B, B).shape == (b, d, 0)


def test_state_update_is_in_place_and_fp64_stays_fp64():
    g = gen(0)
    b, d, n = 2, 3, 4
    state = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    ptr = state.data_ptr()
    x, dt = torch.randn(b, d, generator=g, dtype=torch.float64), torch.rand(b, d, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.1
    Bm, Cm = torch.randn(b, n, generator=g, dtype=torch.float64), torch.randn(b, n, generator=g, dtype=torch.float64)
    expected = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * Bm[:, None]  # h <- Āh + ΔBx
    y = selective_state_update(state, x, dt, A, Bm, Cm)
    assert state.data_ptr() == ptr and state.dtype == torch.float64
    assert_close(state, expected, 1e-12, "state")
    assert_close(y, torch.einsum("bdn,bn->bd", expected, Cm), 1e-12, "y")
