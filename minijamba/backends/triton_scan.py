"""The selective scan and its decoding step as Triton kernels: the `triton` backend.

Glossary (as in `minijamba.ssm`, whose functions these replace and whose results they must equal):

    b   batch                     u, Δ, z   (b, d, l)   the input, the step size, the gate
    d   channels                  A         (d, n)      the state matrix, negative
    l   sequence length           B, C      (b, n, l)   the input and output matrices
    n   state size                D, bias   (d,)        the skip and the Δ bias
    T   time steps per chunk      h         (b, d, n)   the state, always float32

One program owns BLOCK_D channels of one sequence, with all their n states, and walks the sequence in
chunks of T steps. Inside a chunk it holds (BLOCK_D, n, T) tiles in registers and runs the recurrence
h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t as a parallel associative scan over the T axis
(`tl.associative_scan`); the state at the chunk's end carries into the next chunk. Every input is
read from memory once and every output written once, which is what a memory-bound kernel wants.

The backward pass walks the chunks in reverse. For each chunk it recomputes h from the state the
forward pass saved at the chunk's start (one (BLOCK_D, n) tile per chunk, much less than the
(b, l, d, n) a naive autograd would keep), then runs the gradient recurrence backwards in time:

    g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}

and reads every parameter gradient off g (derivation at `_bwd_kernel`). dB and dC sum over the
channels of many programs, so each program adds its partial sums atomically into a float32 buffer.

All arithmetic is float32 whatever the input dtype (bf16, fp16, fp32); outputs take the input dtypes.
The wrappers are `torch.library.triton_op`s, so `torch.compile` sees through them (no graph break),
and `SelectiveScanFn` ties the forward and backward together for autograd.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

LOG2E = math.log2(math.e)  # exp(x) = exp2(x log2 e): exp2 is the instruction the GPU has

# Launch shapes (BLOCK_D, T, num_warps): "fwd" for inference, "fwd_train" when the backward pass
# will follow (it saves one state per chunk, so its T must equal the backward's), "bwd", and
# (BLOCK_D, num_warps) for the decoding step. Chosen on an H100 by bench/gpu_scan.py --sweep.
CONFIG = {"fwd": (16, 32, 8), "fwd_train": (16, 32, 8), "bwd": (16, 32, 8), "step": (64, 4)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launcher(kernel):
    """The kernel in a form torch.compile can trace; the plain kernel under Triton's interpreter."""
    return kernel if _interpreting() else wrap_triton(kernel)


# --- small device functions ----------------------------------------------------------------------


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow, and without rounding to 0 for very negative x."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _scan_combine(a1, x1, a2, x2):
    """Compose two steps of h -> a h + x, the earlier (a1, x1) first: h -> a2 (a1 h + x1) + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _grad_combine(g2, p2, f2, g1, p1, f1):
    """Compose two stretches of the gradient recurrence g_t = dh_t + a_{t+1} g_{t+1}.

    A stretch of steps [i..j] is summarised by (g, p, f): g_i = g + p * Q with Q = a_{j+1} g_{j+1}
    the gradient flowing in from the right, and f = a_i, its first step's decay (which the stretch
    to its left needs). A reverse scan hands us (later stretch 2, earlier stretch 1).
    """
    t = p1 * f2
    return g1 + t * g2, t * p2, f1


@triton.jit
def _delta(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ from the raw input: + bias, then softplus, as asked. raw (BLOCK_D, T), bias (BLOCK_D,)."""
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        raw = _softplus(raw)
    return raw


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, hlast_ptr, hsave_ptr,  # outputs: y (b, d, l), last state (b, d, n), chunk starts
    dim, L, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's channels    (BLOCK_D,)
    rn = tl.arange(0, NP)  # state index, padded to a power of two             (NP,)
    rt = tl.arange(0, T)  # time within the chunk                              (T,)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]  # (BLOCK_D, NP)
    # Padded states get A = 0 and B = C = 0: they stay at zero and add nothing.
    A = tl.load(A_ptr + rd[:, None] * dstate + rn[None, :], mask=mdn, other=0.0).to(tl.float32) * LOG2E
    row = (pid_b * dim + rd[:, None]) * L  # start of each channel's row in u, Δ, z, y   (BLOCK_D, 1)
    bc_row = (pid_b * dstate + rn[:, None]) * L  # start of each state's row in B, C       (NP, 1)
    state_off = (pid_b * dim + rd[:, None]) * dstate + rn[None, :]  # (BLOCK_D, NP) in (b, d, n)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_chunks = tl.cdiv(L, T)

    for c in range(0, n_chunks):
        t = c * T + rt
        m2 = md[:, None] & (t < L)[None, :]  # (BLOCK_D, T)
        mbc = mn[:, None] & (t < L)[None, :]  # (NP, T)
        if SAVE:  # the state entering this chunk, for the backward pass; hsave is (b, chunks, d, n)
            tl.store(hsave_ptr + ((pid_b * n_chunks + c) * dim + rd[:, None]) * dstate + rn[None, :], h, mask=mdn)
        dt = tl.load(delta_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = tl.where(m2, _delta(dt, bias, HAS_BIAS, SOFTPLUS), 0.0)  # Δ = 0 past the end: h stays
        u = tl.load(u_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)  # (BLOCK_D, T)
        Bt = tl.load(B_ptr + bc_row + t[None, :], mask=mbc, other=0.0).to(tl.float32)  # (NP, T)
        Ct = tl.load(C_ptr + bc_row + t[None, :], mask=mbc, other=0.0).to(tl.float32)  # (NP, T)

        dA = tl.exp2(dt[:, None, :] * A[:, :, None])  # Ā_t = exp(Δ_t A)      (BLOCK_D, NP, T)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # Δ_t B_t u_t               (BLOCK_D, NP, T)
        # Prefix compositions within the chunk: h_t = Ac_t h_in + Xc_t.
        Ac, Xc = tl.associative_scan((dA, dBu), axis=2, combine_fn=_scan_combine)
        hs = Ac * h[:, :, None] + Xc  # h_t at every step of the chunk        (BLOCK_D, NP, T)
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # y_t = C_t · h_t                (BLOCK_D, T)
        h = tl.sum(tl.where(rt[None, None, :] == T - 1, hs, 0.0), axis=2)  # carry the last state

        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)  # SiLU(z) gate
        tl.store(out_ptr + row + t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)

    tl.store(hlast_ptr + state_off, h, mask=mdn)


# --- backward -----------------------------------------------------------------------------------
#
# With a_t = exp(Δ_t A), x_t = Δ_t B_t u_t, h_t = a_t h_{t-1} + x_t, y_t = C_t·h_t + D u_t and
# out_t = y_t SiLU(z_t), the chain rule gives, per channel and state (sums over n written Σ_n):
#
#   dy_t  = dout_t SiLU(z_t)                 dz_t = dout_t y_t SiLU'(z_t)
#   g_t   = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}          (a reverse-time linear recurrence)
#   w_t   = g_t a_t h_{t-1} = g_t (h_t - x_t)              (no division, no shifted h needed)
#   dA   += w_t Δ_t                                        dC_t += Σ_d dy_t h_t
#   dΔ_t  = Σ_n w_t A + u_t Σ_n g_t B_t                    dB_t += Σ_d g_t Δ_t u_t
#   du_t  = Δ_t Σ_n g_t B_t + D dy_t                       dD   += dy_t u_t
#   dh_in = a_0 g_0 (the initial state's gradient)         dbias = Σ_t dΔ_t softplus'(.)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hsave_ptr, dout_ptr, dhlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHLAST: tl.constexpr,
    NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, NP)
    rt = tl.arange(0, T)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]
    A_nat = tl.load(A_ptr + rd[:, None] * dstate + rn[None, :], mask=mdn, other=0.0).to(tl.float32)
    A = A_nat * LOG2E
    row = (pid_b * dim + rd[:, None]) * L
    bc_row = (pid_b * dstate + rn[:, None]) * L
    state_off = (pid_b * dim + rd[:, None]) * dstate + rn[None, :]
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Q: gradient flowing into the current chunk from the right, a_{t+1} g_{t+1} at its last step;
    # at the sequence's end, the last state's own gradient.
    if HAS_DHLAST:
        Q = tl.load(dhlast_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        Q = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ones = tl.full((BLOCK_D, NP, T), 1.0, dtype=tl.float32)
    n_chunks = tl.cdiv(L, T)

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i  # chunks in reverse order
        t = c * T + rt
        m2 = md[:, None] & (t < L)[None, :]
        mbc = mn[:, None] & (t < L)[None, :]
        # Recompute the forward pass of this chunk from its saved starting state.
        h = tl.load(hsave_ptr + ((pid_b * n_chunks + c) * dim + rd[:, None]) * dstate + rn[None, :], mask=mdn, other=0.0)
        raw = tl.load(delta_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw = raw + bias[:, None]
        dt = tl.where(m2, _delta(raw, bias, False, SOFTPLUS), 0.0)
        u = tl.load(u_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + bc_row + t[None, :], mask=mbc, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_row + t[None, :], mask=mbc, other=0.0).to(tl.float32)
        dA = tl.exp2(dt[:, None, :] * A[:, :, None])  # a_t              (BLOCK_D, NP, T)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # x_t
        Ac, Xc = tl.associative_scan((dA, dBu), axis=2, combine_fn=_scan_combine)
        hs = Ac * h[:, :, None] + Xc  # h_t                                   (BLOCK_D, NP, T)

        # The output gate and the skip.
        dout = tl.load(dout_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            z = tl.load(z_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))  # d SiLU(z) / dz = σ(z)(1 + z(1 - σ(z)))
            tl.store(dz_ptr + row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * z * sz
        else:
            dy = dout
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)

        # The gradient recurrence, backwards in time: g_t = C_t dy_t + a_{t+1} g_{t+1}.
        dh = dy[:, None, :] * Ct[None, :, :]  # (BLOCK_D, NP, T)
        G, P, _ = tl.associative_scan((dh, ones, dA), axis=2, combine_fn=_grad_combine, reverse=True)
        g = G + P * Q[:, :, None]  # (BLOCK_D, NP, T)
        Q = tl.sum(tl.where(rt[None, None, :] == 0, dA * g, 0.0), axis=2)  # a_first g_first, leftwards

        w = g * (hs - dBu)  # g_t a_t h_{t-1}
        dA_acc += tl.sum(w * dt[:, None, :], axis=2)
        gB = tl.sum(g * Bt[None, :, :], axis=1)  # Σ_n g_t B_t              (BLOCK_D, T)
        ddt = tl.sum(w * A_nat[:, :, None], axis=1) + u * gB
        du = dt * gB
        if HAS_D:
            du += Dv[:, None] * dy
        # dB_t, dC_t sum over all channels: this program adds its share.
        dB_part = tl.sum(g * (dt * u)[:, None, :], axis=0)  # (NP, T)
        dC_part = tl.sum(hs * dy[:, None, :], axis=0)  # (NP, T)
        tl.atomic_add(dB_ptr + bc_row + t[None, :], dB_part, mask=mbc, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_row + t[None, :], dC_part, mask=mbc, sem="relaxed")

        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)  # softplus'(x) = σ(x)
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + row + t[None, :], ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)

    # Per-batch partial sums; the wrapper adds them over the batch.
    tl.store(dA_ptr + state_off, dA_acc, mask=mdn)
    tl.store(dh0_ptr + state_off, Q, mask=mdn)  # a_0 g_0: the initial state's gradient
    tl.store(dD_ptr + pid_b * dim + rd, dD_acc, mask=md)
    tl.store(dbias_ptr + pid_b * dim + rd, dbias_acc, mask=md)


# --- decoding step ------------------------------------------------------------------------------


@triton.jit
def _step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, dstate,
    s_h_b, s_h_d, s_h_n, s_x_b, s_dt_b, s_B_b, s_C_b, s_z_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    NP: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One token: h <- exp(Δ A) h + Δ B x in place, y = C·h + D x, times SiLU(z)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, NP)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]
    h_ptrs = state_ptr + pid_b * s_h_b + rd[:, None] * s_h_d + rn[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=mdn, other=0.0).to(tl.float32)  # (BLOCK_D, NP)
    A = tl.load(A_ptr + rd[:, None] * dstate + rn[None, :], mask=mdn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + rd, mask=md, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + rd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    Bv = tl.load(B_ptr + pid_b * s_B_b + rn, mask=mn, other=0.0).to(tl.float32)  # (NP,)
    Cv = tl.load(C_ptr + pid_b * s_C_b + rn, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(state_ptr.dtype.element_ty), mask=mdn)
    y = tl.sum(h * Cv[None, :], axis=1)  # (BLOCK_D,)
    if HAS_D:
        y += tl.load(D_ptr + rd, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + rd, mask=md, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * dim + rd, y.to(out_ptr.dtype.element_ty), mask=md)


# --- the custom ops (what torch.compile sees) ----------------------------------------------------


def _np(n: int) -> int:
    return triton.next_power_of_2(n)


@triton_op("minijamba::triton_scan_fwd", mutates_args=())
def _scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, delta_softplus: bool, save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (b, d, l), last state (b, d, n) fp32, chunk-start states (b, chunks, d, n) fp32 or empty."""
    b, d, l = u.shape
    n = A.shape[1]
    block_d, T, warps = CONFIG["fwd_train" if save_states else "fwd"]
    chunks = triton.cdiv(l, T)
    out = torch.empty_like(u)
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    hsave = u.new_empty((b, chunks, d, n) if save_states else (0,), dtype=torch.float32)
    _launcher(_fwd_kernel)[(triton.cdiv(d, block_d), b)](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last, hsave, d, l, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None, SAVE=save_states,
        NP=_np(n), BLOCK_D=block_d, T=T, num_warps=warps,
    )  # fmt: skip
    return out, last, hsave


@triton_op("minijamba::triton_scan_bwd", mutates_args=())
def _scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    hsave: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor | None, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """du, dΔ, dz, dA (b, d, n), dB, dC (b, n, l) fp32, dD, dbias (b, d), dh0 (b, d, n): per-batch sums."""
    b, d, l = u.shape
    n = A.shape[1]
    block_d, T, warps = CONFIG["bwd"]
    if hsave.shape[1] != triton.cdiv(l, T):
        raise ValueError("saved chunk states do not match CONFIG['bwd']: keep its T equal to CONFIG['fwd_train']'s")
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA, dh0 = torch.empty(b, d, n, **f32), torch.empty(b, d, n, **f32)
    dB, dC = torch.zeros(b, n, l, **f32), torch.zeros(b, n, l, **f32)
    dD, dbias = torch.empty(b, d, **f32), torch.empty(b, d, **f32)
    _launcher(_bwd_kernel)[(triton.cdiv(d, block_d), b)](
        u, delta, A, B, C, D, z, delta_bias, hsave, dout, dlast,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, d, l, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_DHLAST=dlast is not None,
        NP=_np(n), BLOCK_D=block_d, T=T, num_warps=warps,
    )  # fmt: skip
    return du, ddelta, dz, dA, dB, dC, dD, dbias, dh0


@triton_op("minijamba::triton_state_update", mutates_args={"state"})
def _state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:  # fmt: skip
    b, d, n = state.shape
    block_d, warps = CONFIG["step"]
    out = torch.empty(b, d, device=x.device, dtype=x.dtype)
    _launcher(_step_kernel)[(triton.cdiv(d, block_d), b)](
        state, x, dt, A, B, C, D, z, dt_bias, out, d, n,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0), B.stride(0),
        C.stride(0), z.stride(0) if z is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        NP=_np(n), BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


# --- autograd and the public functions -----------------------------------------------------------


class SelectiveScanFn(torch.autograd.Function):
    """The Triton forward and backward as one differentiable function (also initial_state and the
    returned last state are differentiable)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        save = any(ctx.needs_input_grad)
        out, last, hsave = torch.ops.minijamba.triton_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save
        )
        ctx.set_materialize_grads(False)
        ctx.delta_softplus = delta_softplus
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hsave)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, hsave = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = torch.ops.minijamba.triton_scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, hsave, dout, dlast, ctx.delta_softplus
        )
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            None if ctx.initial_dtype is None else dh0.to(ctx.initial_dtype),
            None,
        )  # fmt: skip


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Shapes and devices, checked where the input enters; ValueError names the problem and the fix."""
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    n = A.shape[-1] if A.dim() == 2 else -1
    want = {
        "delta": (delta, (b, d, l)), "A": (A, (d, n)), "B": (B, (b, n, l)), "C": (C, (b, n, l)),
        "D": (D, (d,)), "z": (z, (b, d, l)), "delta_bias": (delta_bias, (d,)),
        "initial_state": (initial_state, (b, d, n)),
    }  # fmt: skip
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for u of shape {(b, d, l)}, got {tuple(t.shape)}")
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}: move them to one device")
    if u.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the triton backend runs on CUDA tensors, got {u.device}; use scan_backend='reference' "
            "on this device (or set TRITON_INTERPRET=1 to run the kernels slowly on the CPU)"
        )


def _c(t):
    return None if t is None else t.contiguous()


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):  # fmt: skip
    """`minijamba.ssm.selective_scan` on the Triton kernels: same arguments, shapes and result.

    u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,); initial_state (b, d, n).
    Returns y (b, d, l) in u's dtype, and the last state (b, d, n) in float32 when asked.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.shape[-1] == 0:  # nothing to scan: the state passes through
        b, d, _ = u.shape
        last = u.new_zeros(b, d, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state
        return (u.new_empty(u.shape), last) if return_last_state else u.new_empty(u.shape)
    out, last = SelectiveScanFn.apply(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        _c(D), _c(z), _c(delta_bias), _c(initial_state), bool(delta_softplus),
    )  # fmt: skip
    return (out, last) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`minijamba.ssm.selective_state_update` on a Triton kernel: one decoding step, `state`
    (b, d, n) updated in place; x, dt, z (b, d); A (d, n); B, C (b, n). Returns y (b, d)."""
    if state.dim() != 3 or x.shape != state.shape[:2]:
        raise ValueError(f"state must be (b, d, n) and x (b, d), got {tuple(state.shape)} and {tuple(x.shape)}")
    if state.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the triton backend runs on CUDA tensors, got {state.device}; use 'reference'")

    def last_contiguous(t):  # the kernel steps along the last dim with stride 1
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    x, dt, B, C, z = map(last_contiguous, (x, dt, B, C, z))
    return torch.ops.minijamba.triton_state_update(
        state, x, dt, A.contiguous(), B, C, _c(D), z, _c(dt_bias), bool(dt_softplus)
    )
