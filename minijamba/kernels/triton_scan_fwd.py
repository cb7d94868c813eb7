"""The selective scan's forward kernel in Triton, and the device functions the backward shares
(`minijamba.kernels.triton_scan` says how the work is laid out, and holds the launch shapes).

Glossary as in `triton_scan`: b batch, d channels, l sequence length, n state size; T = TI * TT
steps a chunk, TI steps a thread, TT threads a program.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x log2 e): exp2 is the GPU's instruction


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
def _delta(x, SOFTPLUS: tl.constexpr):
    """Δ from its raw input (bias already added): softplus(x) or x itself."""
    if SOFTPLUS:
        x = _softplus(x)
    return x


@triton.jit
def _row(x, i, k: tl.constexpr):
    """Row k of a (TI, TT) tile, (TT,): one register of each thread (the select folds away)."""
    return tl.sum(tl.where(i == k, x, 0.0), axis=0)


@triton.jit
def _chunk_states(a, x, h_in, TI: tl.constexpr, TT: tl.constexpr):
    """h_t at every step of a chunk for one state, from the maps h -> a_t h + x_t and the state
    h_in entering the chunk. a, x (TI, TT); h_in a scalar or (TT,), of which thread 0's is used.

    Returns hs (TI, TT); a (TT,) vector whose thread 0 holds the state at the chunk's end; and the
    state entering each thread's run (TT,)."""
    i = tl.arange(0, TI)[:, None]
    j = tl.arange(0, TT)
    # 1. inside each thread: prefix compositions over its run of TI steps (a plain loop)
    Ap, Xp = tl.associative_scan((a, x), axis=0, combine_fn=_scan_combine)
    # 2. each run's composite, with the entering state folded into the first run: h -> A h + X
    A_run, X_run = _row(Ap, i, TI - 1), _row(Xp, i, TI - 1)  # (TT,)
    X_run = tl.where(j == 0, A_run * h_in + X_run, X_run)
    _, h_end = tl.associative_scan((A_run, X_run), axis=0, combine_fn=_scan_combine)  # across threads
    # 3. the state entering run j is the one leaving run j - 1; thread 0 receives the last one,
    #    the chunk's end state, which is what the next chunk needs there
    h_prev = tl.gather(h_end, (j + TT - 1) % TT, axis=0)
    h_run = tl.where(j == 0, h_in, h_prev)  # (TT,)
    return Ap * h_run[None, :] + Xp, h_prev, h_run


@triton.jit
def _keep(seq_ptr, t, m, L, pid_b, HAS_SEQ: tl.constexpr):
    """(TI, TT) float32: 0 where a packed document starts (seq_idx[t] != seq_idx[t-1]), else 1.
    Ā_t times it is 0 there, so the state starts again from zero (minijamba.model.ssm)."""
    keep = 1.0
    if HAS_SEQ:  # (one return: Triton compiles every return of a function, taken or not)
        cur = tl.load(seq_ptr + pid_b * L + t, mask=m, other=0)
        prev = tl.load(seq_ptr + pid_b * L + t - 1, mask=m & (t > 0), other=0)
        keep = tl.where((t > 0) & (cur != prev), 0.0, 1.0)
    return keep


@triton.jit
def _state_inputs(B_ptr, C_ptr, A_ptr, carry_ptr, bc, t, m, L, pid_d, sn, n, N: tl.constexpr):
    """What both passes read for state n of a chunk: B, C (TI, TT) as float32, A (a scalar) and the
    state's carry (TT,), of which one thread's counts (the forward's h, the backward's gradient)."""
    Bn = tl.load(B_ptr + bc + n * L + t, mask=m, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc + n * L + t, mask=m, other=0.0).to(tl.float32)
    return Bn, Cn, tl.load(A_ptr + pid_d * N + n).to(tl.float32), tl.load(carry_ptr + sn + n)


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,  # inputs
    out_ptr, hlast_ptr, hsave_ptr,  # outputs: y (b, d, l), last state (b, d, n), chunk starts
    dim, L,
    N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    HAS_SEQ: tl.constexpr, TI: tl.constexpr, TT: tl.constexpr, TB: tl.constexpr,
):  # fmt: skip
    """SAVE: also store the state entering every TB steps (the backward pass's chunks, which need
    not be this pass's: TB a multiple of TI, and T a multiple of TB or TB of T). HAS_SEQ: seq_idx
    (b, l) int32 marks packed documents; then A must be <= 0, as Mamba's -exp(A_log) always is (a
    growing state, A > 0, would restart at inf)."""
    T: tl.constexpr = TI * TT
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    i, j = tl.arange(0, TI)[:, None], tl.arange(0, TT)[None, :]  # (TI, 1), (1, TT)
    first = tl.arange(0, TT) == 0  # thread 0, which carries the state from chunk to chunk   (TT,)
    row = (pid_b * dim + pid_d) * L  # this channel's row in u, Δ, z, y
    bc = pid_b * N * L  # this sequence's rows of B and C
    sn = (pid_b * dim + pid_d) * N + tl.zeros((TT,), dtype=tl.int64)  # its (n,) slice of h   (TT,)
    bias = tl.load(bias_ptr + pid_d).to(tl.float32) if HAS_BIAS else 0.0
    # hlast is the carry: it holds the state after the chunks done so far (at first, h0 or 0),
    # written and read by thread 0 alone.
    for n in tl.static_range(N):
        h0 = tl.load(h0_ptr + sn + n) if HAS_H0 else tl.zeros((TT,), dtype=tl.float32)
        tl.store(hlast_ptr + sn + n, h0, mask=first)
    n_chunks = tl.cdiv(L, T)

    for c in range(0, n_chunks):
        tl.debug_barrier()  # what the last chunk stored in hlast is visible to every thread now
        t = c * T + j * TI + i  # (TI, TT)
        m = t < L
        raw = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32) + bias
        dt = tl.where(m, _delta(raw, SOFTPLUS), 0.0)  # Δ = 0 past the end: h stays as it is
        u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)  # (TI, TT)
        dtu = dt * u
        # Δ log2(e), the exponent's factor of each state's A. Where a document starts it is +inf,
        # so that Ā = exp2(+inf · A) = 0 there (A < 0, see below): the reset costs nothing a state.
        dtl = dt * LOG2E  # (TI, TT)
        if HAS_SEQ:
            dtl = tl.where(_keep(seq_ptr, t, m, L, pid_b, HAS_SEQ) > 0.0, dtl, float("inf"))
        y = tl.zeros((TI, TT), dtype=tl.float32)
        # The runs that start a backward chunk, and where their entering state goes in hsave
        # (b, cdiv(L, TB), d, n).
        run0 = c * T + tl.arange(0, TT) * TI  # each run's first step   (TT,)
        saves = (run0 % TB == 0) & (run0 < L)
        sv = ((pid_b * tl.cdiv(L, TB) + run0 // TB) * dim + pid_d) * N  # (TT,)
        # Each state's inputs are loaded one state ahead, before the stores of the state in hand
        # (which the compiler will not move loads across).
        nxt = _state_inputs(B_ptr, C_ptr, A_ptr, hlast_ptr, bc, t, m, L, pid_d, sn, 0, N)
        for ns in range(0, N):  # the states, one after another (a loop: one state's addresses live at a time)
            Bn, Cn, An, h_in = nxt
            nxt = _state_inputs(B_ptr, C_ptr, A_ptr, hlast_ptr, bc, t, m, L, pid_d, sn, tl.minimum(ns + 1, N - 1), N)
            if HAS_SEQ:  # A = 0 would make inf · 0 = NaN; -1e-30 gives the same Ā = 1 elsewhere
                An = tl.minimum(An, -1e-30)
            a = tl.exp2(dtl * An)  # Ā_t = exp(Δ_t A), 0 where a document starts
            hs, h_end, h_run = _chunk_states(a, dtu * Bn, h_in, TI, TT)
            if SAVE:  # the state entering each backward chunk, for the backward pass
                tl.store(hsave_ptr + sv + ns, h_run, mask=saves)
            y += Cn * hs  # y_t = C_t · h_t, summed over the state loop
            tl.store(hlast_ptr + sn + ns, h_end, mask=first)

        if HAS_D:
            y += tl.load(D_ptr + pid_d).to(tl.float32) * u
        if HAS_Z:
            z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)  # SiLU(z) gate
        tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=m)
