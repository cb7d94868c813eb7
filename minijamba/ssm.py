"""The selective scan: the recurrence at the heart of a Mamba layer, in plain PyTorch.

Glossary (the Mamba paper's symbols; mamba-ssm's argument layout):

    b   batch
    d   channels (the Mamba layer's inner width, D in the paper)
    l   sequence length (L)
    n   state size per channel (N)
    u   the input sequence x, (b, d, l)
    Δ   `delta`, the input-dependent step size, (b, d, l); softplus(Δ + bias) when asked
    A   the (diagonal) state matrix, (d, n), negative real: A = -exp(A_log)
    B   the input matrix, (b, n, l), input-dependent ("selective")
    C   the output matrix, (b, n, l), input-dependent
    D   the skip connection, (d,)
    z   the gate, (b, d, l): the output is multiplied by SiLU(z)
    h   the state, (b, d, n), always float32

For each channel and state index the scan runs the zero-order-hold discretised recurrence

    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t          (Ā = exp(ΔA), B̄u ≈ ΔBu, as in the paper)
    y_t = C_t · h_t + D u_t

Three entry points, all with mamba-ssm's signatures so that faster backends can replace them:

    selective_scan_sequential   the recurrence exactly as written above, one step at a time
    selective_scan              the same result by a parallel (associative) scan; the default reference
    selective_state_update      one decoding step: advance a cached state by one token, in place

State accumulates in float32 whatever the input dtype; the output has the dtype of u.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange


def _fp32_math(fn):
    """Run fn with autocast off: under bf16 autocast the einsums would otherwise drop to 16 bits."""

    @functools.wraps(fn)
    def wrapper(u, *args, **kwargs):
        with torch.autocast(u.device.type, enabled=False):
            return fn(u, *args, **kwargs)

    return wrapper


def _up(t: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (float64 stays float64): the state never accumulates in 16 bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Upcast and apply the Δ bias and softplus. Returns u, Δ, A, B, C in float32 (or float64)."""
    delta = _up(delta)
    if delta_bias is not None:
        delta = delta + _up(delta_bias)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return _up(u), delta, _up(A), _up(B), _up(C)


def _finish(y, u, D, z, dtype):
    """y + D u, then the SiLU(z) gate, then back to the input dtype. y, u, z: (b, d, l)."""
    if D is not None:
        y = y + _up(D)[None, :, None] * u
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype)


@_fp32_math
def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):  # fmt: skip
    """The recurrence one time step at a time: O(l) work and O(l) depth. The readable reference.

    Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
    initial_state (b, d, n). Returns y (b, d, l), and the last state (b, d, n) when asked.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, l = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else _up(initial_state)  # (b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # Ā_t = exp(Δ_t A)        (b, d, n)
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # Δ_t B_t u_t   (b, d, n)
        h = dA * h + dBu  # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))  # y_t = C_t · h_t   (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)  # (b, d, l)
    out = _finish(y, u, D, z, dtype)
    return (out, h) if return_last_state else out


# --- the parallel scan ---------------------------------------------------------------------------
#
# Write one step as the affine map h -> a h + x, with a = exp(ΔA) and x = ΔBu. Composing two steps
# gives another affine map:  (a1, x1) then (a2, x2)  =  (a2 a1, a2 x1 + x2).  Composition of functions
# is associative, so the prefix compositions h_1..h_l can be computed by any parallel prefix-sum
# algorithm. We use the recursive odd/even scan (Ladner-Fischer / Blelloch's work-efficient shape):
#
#   1. combine each pair (2i, 2i+1) into the odd element        l/2 combines, all in parallel
#   2. scan the l/2 odd elements recursively                     they now hold prefixes 0..2i+1
#   3. fix each even element 2i from the odd prefix 2i-1 before it    l/2 combines, in parallel
#
# Work: l/2 + l/4 + ... twice, so O(l) (about 2l combines, like the sequential loop).
# Depth: two parallel steps per level, log2(l) levels, so O(log l) instead of O(l).
# Every step below is an in-place elementwise op on a strided view, so PyTorch runs each level as
# a handful of large vectorised kernels. We scan over the time axis of (b, l, d, n) tensors so that
# every time slice is one contiguous block of d*n numbers.


def _scan_(a: torch.Tensor, x: torch.Tensor) -> None:
    """In place, along dim 1 of (b, l, d, n): x_t <- a_t x_{t-1} + x_t. `a` is overwritten too."""
    l = x.shape[1]
    if l < 2:
        return
    a_even, a_odd = a[:, 0::2], a[:, 1::2]  # (b, ceil(l/2), d, n), (b, floor(l/2), d, n)
    x_even, x_odd = x[:, 0::2], x[:, 1::2]
    m = x_odd.shape[1]
    x_odd.addcmul_(a_odd, x_even[:, :m])  # 1. pair (2i, 2i+1) -> element 2i+1
    a_odd.mul_(a_even[:, :m])
    _scan_(a_odd, x_odd)  # 2. odd elements now hold the prefixes ending at 2i+1
    x_even[:, 1:].addcmul_(a_even[:, 1:], x_odd[:, : x_even.shape[1] - 1])  # 3. element 2i from 2i-1


class _LinearScan(torch.autograd.Function):
    """h_t = a_t h_{t-1} + x_t along dim 1 (h_{-1} = 0), with an O(l) memory backward.

    The gradient of a linear recurrence is the same recurrence run backwards in time:
    g_t = dL/dh_t + a_{t+1} g_{t+1};  then dL/dx_t = g_t and dL/da_t = g_t h_{t-1}.
    """

    @staticmethod
    def forward(ctx, a, x):  # a, x: (b, l, d, n) float32
        h = x.clone()
        _scan_(a.clone(), h)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):  # (b, l, d, n)
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)  # a_{t+1}, 0 past the end
        g = grad_h.flip(1).contiguous()  # run time backwards
        _scan_(a_next.flip(1).contiguous(), g)
        g = g.flip(1)  # (b, l, d, n)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # h_{t-1}
        return g * h_prev, g


@_fp32_math
def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):  # fmt: skip
    """The selective scan by a parallel prefix scan: O(l) work, O(log l) depth, O(l) memory.

    Same arguments, shapes and result as `selective_scan_sequential` (and mamba-ssm's
    `selective_scan_fn`): u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
    initial_state (b, d, n). Returns y (b, d, l), and the last state (b, d, n) when asked.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    delta_t = rearrange(delta, "b d l -> b l d 1")
    a = torch.exp(delta_t * A)  # Ā = exp(ΔA)                              (b, l, d, n)
    x = (delta_t * rearrange(u, "b d l -> b l d 1")) * rearrange(B, "b n l -> b l 1 n")  # ΔBu  (b, l, d, n)
    if initial_state is not None and x.shape[1] > 0:
        # Fold h_{-1} into the first step: x_0 <- a_0 h_{-1} + x_0.
        x = torch.cat([x[:, :1] + a[:, :1] * initial_state.to(a.dtype)[:, None], x[:, 1:]], dim=1)
    h = _LinearScan.apply(a, x)  # (b, l, d, n)
    y = torch.einsum("bldn,bnl->bdl", h, C)  # y_t = C_t · h_t   (b, d, l)
    out = _finish(y, u, D, z, dtype)
    if not return_last_state:
        return out
    if h.shape[1] > 0:
        last = h[:, -1]
    elif initial_state is not None:
        last = initial_state.to(u.dtype)
    else:
        last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    return out, last  # (b, d, l), (b, d, n)


@_fp32_math
def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the recurrence for decoding, updating `state` in place (mamba-ssm's signature).

    Shapes: state (b, d, n) float32; x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d,).
    Returns y (b, d) in the dtype of x.
    """
    dtype = x.dtype
    dt = _up(dt)
    if dt_bias is not None:
        dt = dt + _up(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = _up(x)
    dA = torch.exp(dt[:, :, None] * _up(A))  # Ā = exp(ΔA)    (b, d, n)
    dBx = (dt * xf)[:, :, None] * _up(B)[:, None, :]  # ΔBx    (b, d, n)
    state.copy_(dA * state + dBx)  # h <- Ā h + ΔBx, in place
    y = torch.einsum("bdn,bn->bd", state.to(xf.dtype), _up(C))  # y = C · h   (b, d)
    if D is not None:
        y = y + _up(D) * xf
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype)
