"""The selective scan and its decoding step as Triton kernels: the `triton` backend.

Glossary (as in `minijamba.ssm`, whose functions these replace and whose results they must equal):

    b   batch                     u, Δ, z   (b, d, l)   the input, the step size, the gate
    d   channels                  A         (d, n)      the state matrix, negative
    l   sequence length           B, C      (b, n, l)   the input and output matrices
    n   state size                D, bias   (d,)        the skip and the Δ bias
                                  h         (b, d, n)   the state, always float32

One program owns BD channels of one sequence, with all their n states, and walks the sequence in
chunks of T = TI * TL steps, carrying the state h from chunk to chunk. Each input is read once and
each output written once: the scan is bound by memory traffic and by arithmetic, not by structure.

How a chunk is laid out (the part that decides the speed). A chunk is a register tile of every
(step, state, channel) triple, shaped (TI, NQ, BD, TL, NL) with

    step  t = j * TI + i     i < TI: consecutive steps held by one thread (a "run")
                             j < TL: the runs, one per lane
    state n = q * NL + m     q < NQ: states held by one thread;  m < NL: spread over lanes

Triton spreads a tile's last dimensions over the 32 lanes of a warp and then over the warps, and
keeps the leading ones inside each thread, so this order puts NL x TL x (part of BD) on the lanes, the
rest of BD on the warps, and TI x NQ values in each thread. Then:

  - the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t runs sequentially inside each thread over
    its run of TI steps (`tl.associative_scan` along a dimension that lives in one thread is a
    plain loop); only each run's composite crosses lanes, in a short scan over the TL runs;
  - y_t = C_t · h_t sums NQ states inside the thread and NL across lanes: few shuffles.

(A tile shaped (BD, n, T) instead puts the 32 lanes on T: every step of the scan then crosses
lanes, and the compiled forward spends about 17 shuffles and 60 instructions per element instead of
2 and 25; see bench/RESULTS.md.)

The backward pass walks the chunks in reverse. For each chunk it recomputes h from the state the
forward pass saved at the chunk's start (one (BD, n) tile per chunk, far less than the (b, l, d, n)
a naive autograd would keep), then runs the gradient recurrence backwards in time,

    g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1},

with the same run-and-lanes split, and reads every gradient off g (derivation at `_bwd_kernel`).
dB and dC sum over channels of many programs: each program adds its share atomically.

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

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x log2 e): exp2 is the GPU's instruction

# Launch shapes: the tile (BD, TI, TL, NL) and the warps of each kernel. "fwd" is the forward
# without gradients; "fwd_train" the forward before a backward pass (it saves one state per chunk,
# so its chunk TI * TL must equal "bwd"'s); "step" the decoding step. BD should be
# (32 / (TL * NL)) * num_warps so that the lanes and warps fill exactly. These are the fastest of
# bench/gpu_scan.py --sweep on an H100 at b=1, d=4096, n=16, l=8K (bench/RESULTS.md).
CONFIG = {
    "fwd": dict(BD=8, TI=8, TL=4, NL=4, num_warps=4),
    "fwd_train": dict(BD=16, TI=8, TL=2, NL=4, num_warps=4),
    "bwd": dict(BD=4, TI=4, TL=4, NL=8, num_warps=1),
    "step": dict(BD=64, num_warps=4),
}


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
    """Compose two affine maps h -> a h + x, (a1, x1) applied first: h -> a2 (a1 h + x1) + x2.
    (A reverse scan hands the later stretch first, which composes maps applied right to left.)"""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _grad_combine(g2, p2, f2, g1, p1, f1):
    """Compose two stretches of the gradient recurrence g_t = dh_t + a_{t+1} g_{t+1}.

    A stretch of steps [s..e] is summarised by (g, p, f): g_s = g + p * Q with Q = a_{e+1} g_{e+1}
    the gradient flowing in from the right, and f = a_s, its first step's decay (which the stretch
    to its left needs). A reverse scan hands us (later stretch 2, earlier stretch 1).
    """
    t = p1 * f2
    return g1 + t * g2, t * p2, f1


@triton.jit
def _delta(x, SOFTPLUS: tl.constexpr):
    """Δ from its raw input (bias already added): softplus(x) or x itself."""
    if SOFTPLUS:
        x = _softplus(x)
    return x


@triton.jit
def _dt5(x):
    """A per-(step, channel) tile (TI, BD, TL) as (TI, 1, BD, TL, 1)."""
    return x[:, None, :, :, None]


@triton.jit
def _nt5(x):
    """A per-(step, state) tile (TI, NQ, TL, NL) as (TI, NQ, 1, TL, NL)."""
    return x[:, :, None, :, :]


@triton.jit
def _dn5(x):
    """A per-(channel, state) tile (NQ, BD, NL) as (1, NQ, BD, 1, NL)."""
    return x[None, :, :, None, :]


@triton.jit
def _sum_n(x):
    """Σ over the states of a (TI, NQ, BD, TL, NL) tile -> (TI, BD, TL): first the NQ states inside
    each thread, then the NL lanes (the other order would shuffle NQ times as much)."""
    return tl.sum(tl.sum(x, axis=1), axis=3)


@triton.jit
def _chunk_states(dA, dBu, h, TI: tl.constexpr, TL: tl.constexpr):
    """h_t at every step of a chunk, from the per-step maps h -> dA h + dBu and the entering state.

    dA, dBu (TI, NQ, BD, TL, NL); h (NQ, BD, NL). Returns hs (TI, NQ, BD, TL, NL) and the state
    at the chunk's end (NQ, BD, NL)."""
    i = tl.arange(0, TI)[:, None, None, None, None]
    j = tl.arange(0, TL)[None, None, :, None]
    # 1. inside each thread: prefix compositions over its run of TI steps (a plain loop)
    Ar, Xr = tl.associative_scan((dA, dBu), axis=0, combine_fn=_scan_combine)
    # 2. each run's composite (its last prefix), then prefixes over the TL runs, across lanes
    Aj = tl.sum(tl.where(i == TI - 1, Ar, 0.0), axis=0)  # (NQ, BD, TL, NL)
    Xj = tl.sum(tl.where(i == TI - 1, Xr, 0.0), axis=0)
    Ac, Xc = tl.associative_scan((Aj, Xj), axis=2, combine_fn=_scan_combine)
    h_end = Ac * h[:, :, None, :] + Xc  # the state at the end of each run      (NQ, BD, TL, NL)
    # 3. the state entering run j is the one leaving run j - 1 (h itself for the first run)
    prev = tl.maximum(j - 1, 0) + tl.zeros(h_end.shape, dtype=tl.int32)
    h_in = tl.where(j == 0, h[:, :, None, :], tl.gather(h_end, prev, axis=2))
    hs = Ar * h_in[None] + Xr
    return hs, tl.sum(tl.where(j == TL - 1, h_end, 0.0), axis=2)


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, hlast_ptr, hsave_ptr,  # outputs: y (b, d, l), last state (b, d, n), chunk starts
    dim, L, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    NP: tl.constexpr, BD: tl.constexpr, TI: tl.constexpr, TL: tl.constexpr, NL: tl.constexpr,
):  # fmt: skip
    NQ: tl.constexpr = NP // NL
    T: tl.constexpr = TI * TL
    pid_b = tl.program_id(1).to(tl.int64)
    rd = tl.program_id(0) * BD + tl.arange(0, BD)  # this program's channels (BD,)
    # Index tiles. Per (step, channel): (TI, BD, TL). Per (step, state): (TI, NQ, TL, NL).
    # Per (channel, state): (NQ, BD, NL). Padded states (n >= dstate) have A = B = C = 0: no effect.
    i3, d3, j3 = tl.arange(0, TI)[:, None, None], rd[None, :, None], tl.arange(0, TL)[None, None, :]
    i4, q4 = tl.arange(0, TI)[:, None, None, None], tl.arange(0, NQ)[None, :, None, None]
    j4, m4 = tl.arange(0, TL)[None, None, :, None], tl.arange(0, NL)[None, None, None, :]
    n4 = q4 * NL + m4
    n3 = tl.arange(0, NQ)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]  # (NQ, 1, NL)
    dn = rd[None, :, None]  # (1, BD, 1)
    mdn = (dn < dim) & (n3 < dstate)  # (NQ, BD, NL)
    A = tl.load(A_ptr + dn * dstate + n3, mask=mdn, other=0.0).to(tl.float32) * LOG2E
    state_off = (pid_b * dim + dn) * dstate + n3  # (NQ, BD, NL) offsets into a (b, d, n) tensor
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NQ, BD, NL), dtype=tl.float32)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=rd < dim, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=rd < dim, other=0.0).to(tl.float32)[None, :, None]
    row = (pid_b * dim + d3) * L  # where each channel's row starts in u, Δ, z, y   (1, BD, 1)
    bc_row = (pid_b * dstate + n4) * L  # where each state's row starts in B, C      (1, NQ, 1, NL)
    n_chunks = tl.cdiv(L, T)

    for c in range(0, n_chunks):
        t3 = c * T + j3 * TI + i3  # (TI, 1, TL)
        t4 = c * T + j4 * TI + i4  # (TI, 1, TL, 1)
        m3 = (d3 < dim) & (t3 < L)  # (TI, BD, TL)
        mbc = (n4 < dstate) & (t4 < L)  # (TI, NQ, TL, NL)
        if SAVE:  # the state entering this chunk, for the backward pass; hsave is (b, chunks, d, n)
            tl.store(hsave_ptr + ((pid_b * n_chunks + c) * dim + dn) * dstate + n3, h, mask=mdn)
        raw = tl.load(delta_ptr + row + t3, mask=m3, other=0.0).to(tl.float32) + bias[None, :, None]
        dt = tl.where(m3, _delta(raw, SOFTPLUS), 0.0)  # Δ = 0 past the end: h stays as it is
        u = tl.load(u_ptr + row + t3, mask=m3, other=0.0).to(tl.float32)  # (TI, BD, TL)
        Bt = tl.load(B_ptr + bc_row + t4, mask=mbc, other=0.0).to(tl.float32)  # (TI, NQ, TL, NL)
        Ct = tl.load(C_ptr + bc_row + t4, mask=mbc, other=0.0).to(tl.float32)

        dA = tl.exp2(_dt5(dt) * _dn5(A))  # Ā_t = exp(Δ_t A)            (TI, NQ, BD, TL, NL)
        dBu = _dt5(dt * u) * _nt5(Bt)  # Δ_t B_t u_t
        hs, h = _chunk_states(dA, dBu, h, TI, TL)
        y = _sum_n(hs * _nt5(Ct))  # y_t = C_t · h_t                      (TI, BD, TL)

        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + row + t3, mask=m3, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)  # SiLU(z) gate
        tl.store(out_ptr + row + t3, y.to(out_ptr.dtype.element_ty), mask=m3)

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
#
# g runs backwards with the same split as h: within each thread's run first (from its last step
# to its first), then across the runs, then each step is fixed up with what flows in from the right.


@triton.jit
def _chunk_grads(dh, dA, Q, TI: tl.constexpr, TL: tl.constexpr):
    """g_t at every step of a chunk, and the gradient Q = a_first g_first it passes leftwards.

    dh, dA (TI, NQ, BD, TL, NL); Q (NQ, BD, NL), flowing in from the chunk to the right."""
    i = tl.arange(0, TI)[:, None, None, None, None]
    j = tl.arange(0, TL)[None, None, :, None]
    ones = tl.full(dh.shape, 1.0, dtype=tl.float32)
    # 1. inside each thread, backwards over its run: g_t = G + P * (gradient flowing into the run)
    G, P, _ = tl.associative_scan((dh, ones, dA), axis=0, combine_fn=_grad_combine, reverse=True)
    # 2. run j passes Q_out = a_s g_s = F (G_s + P_s Q_in) to its left (s its first step): an
    #    affine map of Q_in; compose these maps over the runs, from the right, across lanes
    G0 = tl.sum(tl.where(i == 0, G, 0.0), axis=0)  # (NQ, BD, TL, NL)
    P0 = tl.sum(tl.where(i == 0, P, 0.0), axis=0)
    F0 = tl.sum(tl.where(i == 0, dA, 0.0), axis=0)
    Ao, Xo = tl.associative_scan((F0 * P0, F0 * G0), axis=2, combine_fn=_scan_combine, reverse=True)
    q_out = Ao * Q[:, :, None, :] + Xo  # what each run passes to its left        (NQ, BD, TL, NL)
    # 3. what flows into run j is what run j + 1 passes on (Q itself for the last run)
    nxt = tl.minimum(j + 1, TL - 1) + tl.zeros(q_out.shape, dtype=tl.int32)
    q_in = tl.where(j == TL - 1, Q[:, :, None, :], tl.gather(q_out, nxt, axis=2))
    g = G + P * q_in[None]
    return g, tl.sum(tl.where(j == 0, q_out, 0.0), axis=2)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hsave_ptr, dout_ptr, dhlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, dstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHLAST: tl.constexpr,
    NP: tl.constexpr, BD: tl.constexpr, TI: tl.constexpr, TL: tl.constexpr, NL: tl.constexpr,
):  # fmt: skip
    NQ: tl.constexpr = NP // NL
    T: tl.constexpr = TI * TL
    pid_b = tl.program_id(1).to(tl.int64)
    rd = tl.program_id(0) * BD + tl.arange(0, BD)
    i3, d3, j3 = tl.arange(0, TI)[:, None, None], rd[None, :, None], tl.arange(0, TL)[None, None, :]
    i4, q4 = tl.arange(0, TI)[:, None, None, None], tl.arange(0, NQ)[None, :, None, None]
    j4, m4 = tl.arange(0, TL)[None, None, :, None], tl.arange(0, NL)[None, None, None, :]
    n4 = q4 * NL + m4
    n3 = tl.arange(0, NQ)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]
    dn = rd[None, :, None]
    mdn = (dn < dim) & (n3 < dstate)
    A_nat = tl.load(A_ptr + dn * dstate + n3, mask=mdn, other=0.0).to(tl.float32)  # (NQ, BD, NL)
    A = A_nat * LOG2E
    state_off = (pid_b * dim + dn) * dstate + n3
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=rd < dim, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=rd < dim, other=0.0).to(tl.float32)[None, :, None]
    row = (pid_b * dim + d3) * L
    bc_row = (pid_b * dstate + n4) * L
    # Q: gradient flowing into the current chunk from the right, a_{t+1} g_{t+1} at its last step;
    # at the sequence's end, the last state's own gradient.
    if HAS_DHLAST:
        Q = tl.load(dhlast_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        Q = tl.zeros((NQ, BD, NL), dtype=tl.float32)
    dA_acc = tl.zeros((NQ, BD, TL, NL), dtype=tl.float32)
    dD_acc = tl.zeros((TI, BD, TL), dtype=tl.float32)
    dbias_acc = tl.zeros((TI, BD, TL), dtype=tl.float32)
    n_chunks = tl.cdiv(L, T)

    for k in range(0, n_chunks):
        c = n_chunks - 1 - k  # chunks in reverse order
        t3 = c * T + j3 * TI + i3
        t4 = c * T + j4 * TI + i4
        m3 = (d3 < dim) & (t3 < L)
        mbc = (n4 < dstate) & (t4 < L)
        # Recompute the forward pass of this chunk from its saved starting state.
        h = tl.load(hsave_ptr + ((pid_b * n_chunks + c) * dim + dn) * dstate + n3, mask=mdn, other=0.0)
        raw = tl.load(delta_ptr + row + t3, mask=m3, other=0.0).to(tl.float32) + bias[None, :, None]
        dt = tl.where(m3, _delta(raw, SOFTPLUS), 0.0)
        u = tl.load(u_ptr + row + t3, mask=m3, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + bc_row + t4, mask=mbc, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_row + t4, mask=mbc, other=0.0).to(tl.float32)
        dA = tl.exp2(_dt5(dt) * _dn5(A))  # a_t                           (TI, NQ, BD, TL, NL)
        dtu = dt * u
        dBu = _dt5(dtu) * _nt5(Bt)  # x_t
        hs, _ = _chunk_states(dA, dBu, h, TI, TL)

        # The output gate and the skip.
        dout = tl.load(dout_ptr + row + t3, mask=m3, other=0.0).to(tl.float32)  # (TI, BD, TL)
        if HAS_Z:
            y = _sum_n(hs * _nt5(Ct))
            if HAS_D:
                y += Dv * u
            z = tl.load(z_ptr + row + t3, mask=m3, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))  # d SiLU(z) / dz = σ(z)(1 + z(1 - σ(z)))
            tl.store(dz_ptr + row + t3, dz.to(dz_ptr.dtype.element_ty), mask=m3)
            dy = dout * z * sz
        else:
            dy = dout
        if HAS_D:
            dD_acc += dy * u
        # dC_t sums over all channels: this program adds its share (so does dB_t below).
        dC_part = tl.sum(hs * _dt5(dy), axis=2)  # (TI, NQ, TL, NL)
        tl.atomic_add(dC_ptr + bc_row + t4, dC_part, mask=mbc, sem="relaxed")
        hs = hs - dBu  # a_t h_{t-1}: all the rest needs of h (one tile fewer in registers)

        # The gradient recurrence, backwards in time: g_t = C_t dy_t + a_{t+1} g_{t+1}.
        g, Q = _chunk_grads(_dt5(dy) * _nt5(Ct), dA, Q, TI, TL)
        w = g * hs  # g_t a_t h_{t-1}
        dA_acc += tl.sum(w * _dt5(dt), axis=0)
        gB = _sum_n(g * _nt5(Bt))  # Σ_n g_t B_t                           (TI, BD, TL)
        ddt = _sum_n(w * _dn5(A_nat)) + u * gB
        du = dt * gB
        if HAS_D:
            du += Dv * dy
        dB_part = tl.sum(g * _dt5(dtu), axis=2)  # (TI, NQ, TL, NL)
        tl.atomic_add(dB_ptr + bc_row + t4, dB_part, mask=mbc, sem="relaxed")

        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)  # softplus'(x) = σ(x)
        ddt = tl.where(m3, ddt, 0.0)
        dbias_acc += ddt
        tl.store(du_ptr + row + t3, du.to(du_ptr.dtype.element_ty), mask=m3)
        tl.store(ddelta_ptr + row + t3, ddt.to(ddelta_ptr.dtype.element_ty), mask=m3)

    # Per-batch partial sums; the wrapper adds them over the batch.
    tl.store(dA_ptr + state_off, tl.sum(dA_acc, axis=2), mask=mdn)
    tl.store(dh0_ptr + state_off, Q, mask=mdn)  # a_0 g_0: the initial state's gradient
    md = rd < dim
    tl.store(dD_ptr + pid_b * dim + rd, tl.sum(tl.sum(dD_acc, axis=2), axis=0), mask=md)
    tl.store(dbias_ptr + pid_b * dim + rd, tl.sum(tl.sum(dbias_acc, axis=2), axis=0), mask=md)


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


def _tile(cfg: dict, n: int) -> dict:
    """A CONFIG entry as kernel arguments for state size n (NL lanes cannot exceed the padded n)."""
    NP = _np(n)
    return dict(cfg, NP=NP, NL=min(cfg["NL"], NP))


@triton_op("minijamba::triton_scan_fwd", mutates_args=())
def _scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, delta_softplus: bool, save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (b, d, l), last state (b, d, n) fp32, chunk-start states (b, chunks, d, n) fp32 or empty."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = _tile(CONFIG["fwd_train" if save_states else "fwd"], n)
    chunks = triton.cdiv(l, cfg["TI"] * cfg["TL"])
    out = torch.empty_like(u)
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    hsave = u.new_empty((b, chunks, d, n) if save_states else (0,), dtype=torch.float32)
    _launcher(_fwd_kernel)[(triton.cdiv(d, cfg["BD"]), b)](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last, hsave, d, l, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None, SAVE=save_states, **cfg,
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
    cfg = _tile(CONFIG["bwd"], n)
    if hsave.shape[1] != triton.cdiv(l, cfg["TI"] * cfg["TL"]):
        raise ValueError("saved chunk states do not match CONFIG['bwd']: keep its T equal to CONFIG['fwd_train']'s")
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA, dh0 = torch.empty(b, d, n, **f32), torch.empty(b, d, n, **f32)
    dB, dC = torch.zeros(b, n, l, **f32), torch.zeros(b, n, l, **f32)
    dD, dbias = torch.empty(b, d, **f32), torch.empty(b, d, **f32)
    _launcher(_bwd_kernel)[(triton.cdiv(d, cfg["BD"]), b)](
        u, delta, A, B, C, D, z, delta_bias, hsave, dout, dlast,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, d, l, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_DHLAST=dlast is not None, **cfg,
    )  # fmt: skip
    return du, ddelta, dz, dA, dB, dC, dD, dbias, dh0


@triton_op("minijamba::triton_state_update", mutates_args={"state"})
def _state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:  # fmt: skip
    b, d, n = state.shape
    block_d, warps = CONFIG["step"]["BD"], CONFIG["step"]["num_warps"]
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
