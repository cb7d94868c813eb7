"""The chunked parallel scans: every chunk length gives the sequential reference's result.

The reference `selective_scan` (minijamba.model.ssm) and its CPU twin with a hand-written backward
(minijamba.kernels.chunked_scan) cut time into chunks whose length they pick from the tensor sizes
(CHUNK_BYTES), so the small tensors of the other tests all fit in one chunk. Here the chunk length is
forced to every value from 1 to l, so the hand-off of the state from chunk to chunk (forward) and of
the gradient from chunk to chunk (backward) is exercised too. Plus the scans on their own.
"""

from __future__ import annotations

import contextlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import RTOL, assert_close, gen, seeds
from minijamba.kernels import chunked_scan
from minijamba.model import ssm

SCANS = {"reference": ssm, "cpu": chunked_scan}  # module -> its selective_scan, which calls chunk_len


@contextlib.contextmanager
def chunk_length(module, T: int):
    """Make module.selective_scan use chunks of T steps."""
    saved = module.chunk_len
    module.chunk_len = lambda *args: T
    try:
        yield
    finally:
        module.chunk_len = saved


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), d=st.integers(1, 4), n=st.integers(1, 4), l=st.integers(1, 13),
    chunk=st.integers(1, 14), with_h0=st.booleans(), with_dz=st.booleans(), seed=seeds,
    dtype=st.sampled_from([torch.float64, torch.float32]), scan=st.sampled_from(sorted(SCANS)),
)  # fmt: skip
def test_every_chunk_length_equals_sequential(b, d, n, l, chunk, with_h0, with_dz, seed, dtype, scan):
    module = SCANS[scan]
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    args = dict(
        u=r(b, d, l), delta=r(b, d, l), A=(-torch.exp(0.5 * r(d, n))).detach().requires_grad_(),
        B=r(b, n, l), C=r(b, n, l), D=r(d) if with_dz else None, z=r(b, d, l) if with_dz else None,
        delta_bias=r(d), initial_state=r(b, d, n) if with_h0 else None,
    )  # fmt: skip
    y_seq, h_seq = ssm.selective_scan_sequential(**args, delta_softplus=True, return_last_state=True)
    with chunk_length(module, chunk):
        y_par, h_par = module.selective_scan(**args, delta_softplus=True, return_last_state=True)
    tol = RTOL[dtype]
    assert_close(y_par, y_seq, tol, "y")
    assert_close(h_par, h_seq, tol, "last state")
    # Gradients of a random linear function of both outputs, for every input.
    cy = torch.randn(y_seq.shape, generator=g, dtype=torch.float64).to(dtype)
    ch = torch.randn(h_seq.shape, generator=g, dtype=torch.float64).to(h_seq.dtype)
    names = [k for k, v in args.items() if v is not None]
    grads_seq = torch.autograd.grad((y_seq * cy).sum() + (h_seq * ch).sum(), [args[k] for k in names])
    with chunk_length(module, chunk):
        y_par, h_par = module.selective_scan(**args, delta_softplus=True, return_last_state=True)
    grads_par = torch.autograd.grad((y_par * cy).sum() + (h_par * ch).sum(), [args[k] for k in names])
    for k, gs, gp in zip(names, grads_seq, grads_par):
        assert_close(gp, gs, 10 * tol, f"d/d{k}")


def _loop(a, x, reverse):
    """The two recurrences written as loops over time (dim 1)."""
    if x.shape[1] == 0:
        return x.clone()
    h, out = torch.zeros_like(x[:, 0]), [None] * x.shape[1]
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in steps:
        if reverse:  # x_t + a_t x_{t+1}: a_t links the later element to this one
            h = x[:, t] + (a[:, t] * h if t + 1 < x.shape[1] else 0)
        else:  # a_t x_{t-1} + x_t
            h = a[:, t] * h + x[:, t]
        out[t] = h
    return torch.stack(out, 1)


@settings(max_examples=30, deadline=None)
@given(l=st.integers(0, 40), reverse=st.booleans(), seed=seeds)
def test_in_place_scans_equal_loops(l, reverse, seed):
    g = gen(seed)
    a = torch.rand(2, l, 3, 2, generator=g, dtype=torch.float64)
    x = torch.randn(2, l, 3, 2, generator=g, dtype=torch.float64)
    h = x.clone()
    (chunked_scan._scan_reverse_ if reverse else chunked_scan._scan_)(a.clone(), h)
    assert_close(h, _loop(a, x, reverse), 1e-12, "scan")
    if not reverse and l:  # the reference's out-of-place scan
        assert_close(ssm._scan(a, x), _loop(a, x, False), 1e-12, "out-of-place scan")


def test_chunk_length_fits_the_cache_on_cpu():
    """Chunks of (b, T, d, n) are about CHUNK_BYTES on a CPU, at least one step, at most the sequence."""
    cpu = torch.device("cpu")
    T = ssm.chunk_len(8, 512, 16, 256, cpu, 4)
    assert 1 <= T <= 256 and T * 8 * 512 * 16 * 4 <= ssm.CHUNK_BYTES
    assert ssm.chunk_len(1, 8, 4, 5, cpu, 4) == 5  # tiny: the whole sequence is one chunk
    assert ssm.chunk_len(64, 8192, 16, 100, cpu, 4) == 1  # huge: one step per chunk
    assert ssm.chunk_len(8, 512, 16, 256, torch.device("meta"), 4) == 256  # off the CPU: one chunk
