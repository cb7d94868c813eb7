"""The CPU's selective scan: the reference's chunked odd/even scan with a hand-written backward.

Glossary (as in minijamba.model.ssm): b batch, d channels (D), l sequence length, n state size (N),
T time steps per chunk.

The reference (`minijamba.model.ssm.selective_scan`) lets autograd differentiate its scan, which
keeps every level's (b, T, d, n) tensors for the backward. Here the forward keeps only each chunk's
starting state, and the backward recomputes the chunk's states from it and runs the gradient
recurrence backwards in time, as mamba-ssm's kernel does: memory O(l/T) states instead of O(l), and
in place, in the CPU's caches (tutorial 2). The same numbers as the reference up to rounding
(tests/test_scan_chunks.py, for every chunk length).
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

from minijamba.model.ssm import _finish, _fp32_math, _prepare, chunk_len, continues


def _scan_(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place, along dim 1 (time) of (b, l, ...): x_t <- a_t x_{t-1} + x_t. `a` is overwritten too."""
    l = x.shape[1]
    if l < 2:
        return
    a_even, a_odd = a[:, 0::2], a[:, 1::2]  # (b, ceil(l/2), ...), (b, floor(l/2), ...)
    x_even, x_odd = x[:, 0::2], x[:, 1::2]
    m = x_odd.shape[1]
    x_odd.addcmul_(a_odd, x_even[:, :m])  # 1. pair (2i, 2i+1) -> element 2i+1
    a_odd.mul_(a_even[:, :m])
    _scan_(a_odd, x_odd)  # 2. odd elements now hold the prefixes ending at 2i+1
    x_even[:, 1:].addcmul_(a_even[:, 1:], x_odd[:, : x_even.shape[1] - 1])  # 3. element 2i from 2i-1


def _scan_reverse_(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place, along dim 1, from the end: x_t <- a_t x_{t+1} + x_t (a_{l-1} is unused); `a` is
    overwritten too. `_scan_` in a mirror, without flipping (copying) the tensors: read t from the
    end, the "even" elements are those with t = l-1, l-3, ... and the "odd" ones the others."""
    l = x.shape[1]
    if l < 2:
        return
    p = l % 2  # the mirror's odd elements are t = p, p+2, ..., l-2; each pairs with t+1
    a_odd, a_even = a[:, p::2], a[:, 1 - p :: 2]
    x_odd, x_even = x[:, p::2], x[:, 1 - p :: 2]
    m = x_odd.shape[1]
    x_odd.addcmul_(a_odd, x_even[:, p : p + m])  # 1. pair (t, t+1) -> element t
    a_odd.mul_(a_even[:, p : p + m])
    _scan_reverse_(a_odd, x_odd)  # 2. odd elements now hold the suffixes starting at t
    x_even[:, :-1].addcmul_(a_even[:, :-1], x_odd[:, 1 - p :])  # 3. element t from t+1 (not the last)


def _discretize(u, delta, At, B, keep):
    """Ā = exp(ΔA) and B̄u = ΔBu for a stretch of T steps. u, delta (b, T, d); At = Aᵀ (n, d);
    B (b, T, n); keep (b, T), 0 where a packed document starts, or None -> a, x, each (b, T, n, d),
    fresh and contiguous (the scans work on them in place)."""
    a = (delta[:, :, None, :] * At).exp_()  # Ā_t = exp(Δ_t A)
    if keep is not None:
        a.mul_(keep[:, :, None, None])  # a new document forgets the state
    x = (delta * u)[:, :, None, :] * B[..., None]  # Δ_t B_t u_t
    return a, x


def _sum_n(x, v):
    """sum over n of x v: x (b, T, n, d), v (b, T, n) -> (b, T, d), as T*b small (1, n) @ (n, d) matmuls."""
    b, T, n, d = x.shape
    return torch.bmm(v.reshape(b * T, 1, n), x.reshape(b * T, n, d)).view(b, T, d)


def _sum_d(x, v):
    """sum over d of x v: x (b, T, n, d), v (b, T, d) -> (b, T, n)."""
    return (x * v[:, :, None, :]).sum(-1)


class _ChunkedScan(torch.autograd.Function):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t and y_t = C_t · h_t, one chunk of `chunk` steps at a
    time. Time-major, and the state stored as (n, d) so that d, the long axis, is the contiguous one
    (the sums over n then become matmuls): u, delta (b, l, d); At = Aᵀ (n, d); B, C (b, l, n);
    h0 (b, n, d); keep (b, l), 0 where a packed document starts (Ā = 0 there), or None; l >= 1.
    Returns y (b, l, d) and the last state (b, n, d). No (b, l, n, d) tensor is ever formed.

    Backward: the gradient of a linear recurrence is the same recurrence run backwards in time,
        g_t = dL/dh_t = C_t dL/dy_t + a_{t+1} g_{t+1}
    and then, from x_t = Δ_t B_t u_t and a_t = exp(Δ_t A),
        dL/dx_t = g_t,     dL/d(Δ_t A) = g_t h_{t-1} a_t,     dL/dh_{-1} = a_0 g_0.
    It runs chunk by chunk from the end, recomputing each chunk's states from its saved start.
    """

    @staticmethod
    def forward(ctx, u, delta, At, B, C, h0, keep, chunk):
        b, l, d = u.shape
        y = torch.empty_like(u)  # (b, l, d)
        starts = []  # the state before each chunk, (b, n, d) each
        h = h0
        for s in range(0, l, chunk):
            e = min(s + chunk, l)
            starts.append(h)
            a, x = _discretize(u[:, s:e], delta[:, s:e], At, B[:, s:e], _part(keep, s, e))  # (b, T, n, d) each
            x[:, 0].addcmul_(a[:, 0], h)  # fold the state so far into the first step: a_s h + x_s
            _scan_(a, x)  # x now holds the states h_s .. h_{e-1}
            y[:, s:e] = _sum_n(x, C[:, s:e])  # y_t = C_t · h_t   (b, T, d)
            h = x[:, -1].clone()  # a copy, so that the chunk's memory is free for the next one
        ctx.chunk, ctx.keep = chunk, keep
        ctx.save_for_backward(u, delta, At, B, C, torch.stack(starts, 1))  # starts (b, l/T, n, d)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):  # dy (b, l, d); dh_last (b, n, d)
        u, delta, At, B, C, starts = ctx.saved_tensors
        l, chunk = u.shape[1], ctx.chunk
        dy = dy.contiguous()  # time-major like everything else here
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, delta, B, C))
        dAt = torch.zeros_like(At)
        dh = dh_last.clone()  # dL/dh at the end of the current chunk, from everything after it
        for c in reversed(range(starts.shape[1])):
            s, e = c * chunk, min(c * chunk + chunk, l)
            u_c, delta_c, h_start = u[:, s:e], delta[:, s:e], starts[:, c]
            # 1. The chunk's states again, from its start: h (b, T, n, d).
            a, h = _discretize(u_c, delta_c, At, B[:, s:e], _part(ctx.keep, s, e))
            h[:, 0].addcmul_(a[:, 0], h_start)
            _scan_(a.clone(), h)
            # 2. g_t = C_t dL/dy_t + a_{t+1} g_{t+1}, from the end of the chunk backwards.
            g = C[:, s:e, :, None] * dy[:, s:e, None, :]  # (b, T, n, d)
            g[:, -1] += dh
            a_next = torch.empty_like(a)  # a_next[t] = a_{t+1} links g_{t+1} to g_t
            a_next[:, :-1], a_next[:, -1] = a[:, 1:], 0
            _scan_reverse_(a_next, g)
            dh = a[:, 0] * g[:, 0]  # dL/dh_{s-1}: handed to the chunk before
            # 3. q_t = dL/d(Δ_t A) = g_t h_{t-1} a_t, built in place of a.
            a[:, 1:].mul_(h[:, :-1])
            a[:, 0].mul_(h_start)
            q = a.mul_(g)  # (b, T, n, d)
            gB = _sum_n(g, B[:, s:e])  # dL/d(Δ_t u_t) = sum_n g_t B_t   (b, T, d)
            du[:, s:e] = gB * delta_c
            ddelta[:, s:e] = gB * u_c + (q * At).sum(-2)
            dAt += q.mul_(delta_c[:, :, None, :]).sum((0, 1))  # sum over b and t of q_t Δ_t
            dB[:, s:e] = _sum_d(g, delta_c * u_c)  # sum_d g_t Δ_t u_t   (b, T, n)
            dC[:, s:e] = _sum_d(h, dy[:, s:e])  # sum_d dL/dy_t h_t   (b, T, n)
        return du, ddelta, dAt, dB, dC, dh, None, None


def _part(keep, s, e):
    return None if keep is None else keep[:, s:e]


@_fp32_math
def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, seq_idx=None,
):  # fmt: skip
    """`minijamba.model.ssm.selective_scan` with the hand-written backward of `_ChunkedScan`.

    Same arguments, shapes and result as `selective_scan_sequential` (and mamba-ssm's
    `selective_scan_fn`): u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
    initial_state (b, d, n); seq_idx (b, l) or None (packed documents, see minijamba.model.ssm).
    Returns y (b, d, l), and the last state (b, d, n) when asked.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    f = functools.reduce(torch.promote_types, [t.dtype for t in (u, delta, A, B, C)])  # float32 or float64
    b, d, l = u.shape
    n = A.shape[1]
    h0 = u.new_zeros(b, d, n, dtype=f) if initial_state is None else initial_state.to(f)  # (b, d, n)
    if l == 0:
        y, last = u.new_zeros(b, d, 0, dtype=f), h0
    else:
        layout = lambda t, s: rearrange(t, s).to(f).contiguous()  # noqa: E731
        y, last = _ChunkedScan.apply(
            layout(u, "b d l -> b l d"), layout(delta, "b d l -> b l d"), layout(A, "d n -> n d"),
            layout(B, "b n l -> b l n"), layout(C, "b n l -> b l n"), layout(h0, "b d n -> b n d"),
            None if seq_idx is None else continues(seq_idx).to(f), chunk_len(b, d, n, l, u.device, torch.finfo(f).bits // 8),
        )  # (b, l, d), (b, n, d)  # fmt: skip
        y, last = rearrange(y, "b l d -> b d l"), rearrange(last, "b n d -> b d n")
    out = _finish(y, u, D, z, dtype)
    return (out, last) if return_last_state else out
