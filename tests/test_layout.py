"""The time-moving Linears: F.linear's values and gradients, with each tensor in the layout promised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import RTOL, assert_close, gen, seeds
from minijamba.kernels import time_last
from minijamba.kernels.time_last import linear_from_time_last, linear_to_time_last
from minijamba.model import mamba


@st.composite
def linear_case(draw):
    return dict(
        b=draw(st.integers(1, 3)), l=draw(st.integers(1, 9)), i=draw(st.integers(1, 7)),
        o=draw(st.integers(1, 7)), bias=draw(st.booleans()), seed=draw(seeds),
    )  # fmt: skip


def _tensors(c, dtype):
    g = gen(c["seed"])
    x = torch.randn(c["b"], c["l"], c["i"], generator=g, dtype=torch.float64)  # (b, l, i), time-first
    w = torch.randn(c["o"], c["i"], generator=g, dtype=torch.float64)
    bias = torch.randn(c["o"], generator=g, dtype=torch.float64) if c["bias"] else None
    dy = torch.randn(c["b"], c["l"], c["o"], generator=g, dtype=torch.float64)  # (b, l, o)
    return [None if t is None else t.to(dtype) for t in (x, w, bias, dy)]


def _grads(out, dy, *ts):
    leaves = [t for t in ts if t is not None]
    grads = torch.autograd.grad(out, leaves, dy)
    return grads


@settings(max_examples=40, deadline=None)
@given(linear_case(), st.sampled_from([torch.float64, torch.float32]), st.booleans())
def test_equals_f_linear_with_outputs_and_gradients_in_the_promised_layouts(c, dtype, to_time_last):
    x, w, bias, dy = _tensors(c, dtype)
    for t in (x, w, bias):
        if t is not None:
            t.requires_grad_(True)
    expected = F.linear(x, w, bias)  # (b, l, o)
    e_grads = _grads(expected, dy, x, w, bias)
    if to_time_last:
        out = linear_to_time_last(x, w, bias)  # (b, o, l)
        assert out.shape == (c["b"], c["o"], c["l"]) and out.is_contiguous()
        got = rearrange(out, "b o l -> b l o")
        g_grads = _grads(out, rearrange(dy, "b l o -> b o l").contiguous(), x, w, bias)
        assert g_grads[0].is_contiguous()  # dx (b, l, i), time-first like x
    else:
        xt = rearrange(x.detach(), "b l i -> b i l").contiguous().requires_grad_(True)  # (b, i, l)
        got = linear_from_time_last(xt, w, bias)  # (b, l, o)
        assert got.shape == (c["b"], c["l"], c["o"]) and got.is_contiguous()
        g_grads = _grads(got, dy, xt, w, bias)
        assert g_grads[0].shape == xt.shape and g_grads[0].is_contiguous()  # dx (b, i, l), time-last
        g_grads = (rearrange(g_grads[0], "b i l -> b l i"),) + tuple(g_grads[1:])
    assert_close(got, expected, RTOL[dtype], "y")
    for name, a, e in zip(("dx", "dw", "dbias"), g_grads, e_grads):
        assert a.dtype == e.dtype, name
        assert_close(a, e, RTOL[dtype], name)


@settings(max_examples=10, deadline=None)
@given(linear_case(), st.booleans())
def test_under_autocast_it_computes_in_bf16_with_float32_weight_gradients(c, to_time_last):
    """As F.linear under autocast: a bf16 product of float32 inputs, float32 gradients of them."""
    x, w, bias, dy = _tensors(c, torch.float32)
    xs = x if to_time_last else rearrange(x, "b l i -> b i l").contiguous()
    fn = linear_to_time_last if to_time_last else linear_from_time_last
    for t in (xs, w, bias):
        if t is not None:
            t.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(xs, w, bias)
        expected = F.linear(x.detach(), w.detach(), None if bias is None else bias.detach())
    assert out.dtype == torch.bfloat16
    got = rearrange(out, "b o l -> b l o") if to_time_last else out
    assert_close(got, expected, RTOL[torch.bfloat16], "y")
    out.backward(torch.ones_like(out))
    for t in (xs, w, bias):
        if t is not None:
            assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    # With an all-ones output gradient dw[o] = Σ over (b, l) of x, to bf16 roundings of the terms
    err = (w.grad - x.sum((0, 1))).abs().max()
    assert err <= RTOL[torch.bfloat16] * max(x.abs().sum((0, 1)).max().item(), 1e-3)


def test_a_mismatched_input_is_a_clear_error():
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"linear_to_time_last: x must be \(b, l, i\) with i = 3"):
        linear_to_time_last(torch.zeros(2, 5, 4), w)
    with pytest.raises(ValueError, match=r"linear_from_time_last: x must be \(b, i, l\) with i = 3"):
        linear_from_time_last(torch.zeros(2, 5, 3), w)
    with pytest.raises(ValueError, match="got shape"):
        linear_to_time_last(torch.zeros(5, 3), w)


def test_compiles_without_a_graph_break():
    """torch.compile's whole-graph capture traces through both, forward and backward."""
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 5, 3, requires_grad=True)

    def f(x, w):
        return linear_from_time_last(linear_to_time_last(x, w).tanh(), w.t().contiguous()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w)
    dx, dw = torch.autograd.grad(got, (x, w))
    expected = f(x, w)
    ex, ew = torch.autograd.grad(expected, (x, w))
    assert_close(got, expected, 1e-6, "y")
    assert_close(dx, ex, 1e-6, "dx")
    assert_close(dw, ew, 1e-6, "dw")


@settings(max_examples=30, deadline=None)
@given(linear_case(), st.booleans())
def test_the_twins_equal_the_dispatch_references(c, bias):
    """The fast side's to_time_last / from_time_last equal the reference primitives in values and
    gradients, for a sequence and for one token per row (where they take the plain matmul)."""
    x, _, _, _ = _tensors(c, torch.float64)
    lin = torch.nn.Linear(c["i"], c["o"], bias=c["bias"]).double()
    for fast, ref, inp in (
        (lambda l, v: time_last.to_time_last(l, v, bias), lambda l, v: mamba.to_time_last(l, v, bias), x),
        (time_last.from_time_last, mamba.from_time_last, rearrange(x, "b l i -> b i l").contiguous()),
    ):
        a = inp.clone().requires_grad_()
        b = inp.clone().requires_grad_()
        got, expected = fast(lin, a), ref(lin, b)
        assert got.shape == expected.shape
        assert_close(got, expected, RTOL[torch.float64], "y")
        dy = torch.randn_like(got)
        ga = torch.autograd.grad(got, [a, lin.weight], dy)
        gb = torch.autograd.grad(expected, [b, lin.weight], dy)
        for u, v in zip(ga, gb):
            assert_close(u, v, RTOL[torch.float64], "grad")


def test_a_decoding_step_uses_the_plain_matmul(monkeypatch):
    """One token per row never takes the batched matmul over a broadcast weight (it would read the
    weight once per row): the twin then calls the Linear itself."""
    calls = []
    monkeypatch.setattr(time_last._Linear, "apply", lambda *a: calls.append(a))
    lin = torch.nn.Linear(3, 4)
    assert time_last.to_time_last(lin, torch.zeros(5, 1, 3)).shape == (5, 4, 1)
    assert time_last.from_time_last(lin, torch.zeros(5, 3, 1)).shape == (5, 1, 4)
    assert calls == []
