"""The selective scan as Triton kernels, forward and backward: the `triton` backend's scan (its
decoding step is `triton_step`, its conv `triton_conv`).

Glossary (as in `minijamba.model.ssm`, whose functions these replace and whose results they must equal):

    b   batch                     u, Δ, z   (b, d, l)   the input, the step size, the gate
    d   channels                  A         (d, n)      the state matrix, negative
    l   sequence length           B, C      (b, n, l)   the input and output matrices
    n   state size                D, bias   (d,)        the skip and the Δ bias
                                  h         (b, d, n)   the state, always float32

One program owns one channel of one sequence and walks the sequence in chunks of T = TI * TT
steps. Inside a chunk it takes the n states one after another, and for each state scans the
chunk's T steps. This is how mamba-ssm's CUDA kernel lays the work out, written in Triton: the
inputs of a step (u, Δ, z) are read once per chunk and stay in registers over the state loop; B_n
and C_n are read once per state (from the L2 cache: every channel reads them).

How a chunk's steps are laid out (what decides the speed). A chunk is a (TI, TT) register tile:

    step  t = j * TI + i      i < TI: consecutive steps held by one thread (a "run")
                              j < TT: the runs, one per thread (TT = 32 lanes x num_warps)

so the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t runs as a plain loop inside each thread
over its run, and only each run's composite crosses threads, in one short scan over the TT runs.
The sums over the states (y_t = C_t · h_t and, in the backward pass, the sums behind du and dΔ)
are running sums over the state loop, inside each thread: no data moves between threads for them.

The state loop is a loop, not unrolled: unrolled, the compiler keeps all n states' B and C
addresses live at once, and a backward program needs 255 registers and spills. Each state's
inputs are loaded one state ahead. Between chunks, each state's carry (h for the forward, the
gradient for the backward) waits in a small float32 buffer, written and read by the one thread
that needs it, with a barrier at each chunk's start.

The backward pass walks the chunks in reverse. For each chunk and state it recomputes h from the
state the forward pass saved at the chunk's start (one float per (chunk, channel, state), far less
than the (b, l, d, n) a naive autograd would keep), then runs the gradient recurrence backwards,

    g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1},

with the same run-and-threads split, and reads every gradient off g (derivation at `_bwd_kernel`).
dB and dC sum over channels, that is over programs: each program adds its share atomically.

All arithmetic is float32 whatever the input dtype (bf16, fp16, fp32); outputs take the input dtypes.
The wrappers are `torch.library.triton_op`s, so `torch.compile` sees through them (no graph break);
eagerly they launch the kernels directly (`minijamba.kernels.custom_ops`),
and `SelectiveScanFn` ties the forward and backward together for autograd.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minijamba.kernels.custom_ops import custom_op, interpreting, run_op

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x log2 e): exp2 is the GPU's instruction

# Launch shapes: steps per thread (TI), threads per program (TT = 32 x num_warps on a GPU) and warps.
# "fwd" is the forward without gradients; "fwd_train" the forward before a backward pass (it also
# saves the state entering each of the backward's chunks, every TI * TT steps of "bwd").
# The fastest of bench/gpu_scan.py --sweep on an H200 at l=2K (b=1, d=4096 and b=4, d=2048) and
# l=8K (bench/RESULTS.md); the backward's at the training shape b=4, d=2048, l=2K (2026-12-02,
# after its run-level loop replaced the reverse associative scan). TI = 8 bf16 values are one
# 16-byte load per thread.
CONFIG = {
    "fwd": dict(TI=8, TT=64, num_warps=2),
    "fwd_train": dict(TI=8, TT=64, num_warps=2),
    "bwd": dict(TI=4, TT=128, num_warps=4),
}


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
def _state_inputs(B_ptr, C_ptr, A_ptr, carry_ptr, bc, t, m, L, pid_d, sn, n, N: tl.constexpr):
    """What both passes read for state n of a chunk: B, C (TI, TT) as float32, A (a scalar) and the
    state's carry (TT,), of which one thread's counts (the forward's h, the backward's gradient)."""
    Bn = tl.load(B_ptr + bc + n * L + t, mask=m, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc + n * L + t, mask=m, other=0.0).to(tl.float32)
    return Bn, Cn, tl.load(A_ptr + pid_d * N + n).to(tl.float32), tl.load(carry_ptr + sn + n)


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, hlast_ptr, hsave_ptr,  # outputs: y (b, d, l), last state (b, d, n), chunk starts
    dim, L,
    N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    TI: tl.constexpr, TT: tl.constexpr, TB: tl.constexpr,
):  # fmt: skip
    """SAVE: also store the state entering every TB steps (the backward pass's chunks, which need
    not be this pass's: TB a multiple of TI, and T a multiple of TB or TB of T)."""
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
            a = tl.exp2(dt * (An * LOG2E))  # Ā_t = exp(Δ_t A)
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
def _chunk_grads(dh, a, q_in, TI: tl.constexpr, TT: tl.constexpr):
    """g_t at every step of a chunk for one state, and what the chunk passes leftwards.

    dh = C_t dy_t and a (TI, TT); q_in (TT,), of which the last thread's is used: a_{e+1} g_{e+1},
    the gradient flowing in from the chunk to the right. Returns g (TI, TT) and a (TT,) vector whose
    last thread holds a_s g_s for the chunk's first step s (what the chunk to the left needs there)."""
    i = tl.arange(0, TI)[:, None]
    j = tl.arange(0, TT)
    # 1. inside each thread, backwards over its run: g_t = G_t + P_t q, q the gradient flowing into
    #    the run, with G_k = dh_k + a_{k+1} G_{k+1} and P_k = a_{k+1} P_{k+1} from the run's last
    #    step k = TI-1 (G = dh, P = 1). The loop unrolls over the thread's own registers, so the row
    #    selects fold away. (tl.associative_scan(..., reverse=True) computes the same, but Triton 3.6,
    #    which the lent GPUs run, lowers that reverse scan to ~150 shuffles a state and chunk.)
    g = _row(dh, i, TI - 1)  # (TT,)
    p = tl.full(g.shape, 1.0, dtype=tl.float32)
    G = tl.where(i == TI - 1, g[None, :], 0.0)  # (TI, TT)
    P = tl.where(i == TI - 1, 1.0, 0.0)
    for k in tl.static_range(TI - 2, -1, -1):
        f = _row(a, i, k + 1)  # a_{k+1}
        g = _row(dh, i, k) + f * g
        p = f * p
        G = tl.where(i == k, g[None, :], G)
        P = tl.where(i == k, p[None, :], P)
    # 2. run j passes q_out = F (G_s + P_s q) to its left (s its first step, F = a_s): an affine map
    #    of what flows into it, q. Fold q_in into the last run, compose the maps from the right.
    F0 = _row(a, i, 0)
    A_run, X_run = F0 * _row(P, i, 0), F0 * _row(G, i, 0)  # (TT,)
    X_run = tl.where(j == TT - 1, A_run * q_in + X_run, X_run)
    _, q_out = tl.associative_scan((A_run, X_run), axis=0, combine_fn=_scan_combine, reverse=True)
    # 3. what flows into run j is what run j + 1 passes; the last thread receives what run 0
    #    passes, the chunk's own output, which is what the chunk to the left needs there
    q_next = tl.gather(q_out, (j + 1) % TT, axis=0)
    q_run = tl.where(j == TT - 1, q_in, q_next)  # (TT,)
    return G + P * q_run[None, :], q_next


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hsave_ptr, dout_ptr, dhlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L,
    N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DHLAST: tl.constexpr,
    TI: tl.constexpr, TT: tl.constexpr,
):  # fmt: skip
    T: tl.constexpr = TI * TT
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    i, j = tl.arange(0, TI)[:, None], tl.arange(0, TT)[None, :]
    row = (pid_b * dim + pid_d) * L
    bc = pid_b * N * L
    st = (pid_b * dim + pid_d) * N
    bias = tl.load(bias_ptr + pid_d).to(tl.float32) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + pid_d).to(tl.float32) if HAS_D else 0.0
    last = tl.arange(0, TT) == TT - 1  # the thread that carries the gradient from chunk to chunk
    sn = st + tl.zeros((TT,), dtype=tl.int64)
    # dh0 is the carry: every state's gradient flowing into the current chunk from the right,
    # a_{t+1} g_{t+1} at its last step (at the sequence's end, the last state's own gradient),
    # written and read by the last thread.
    for n in tl.static_range(N):
        q = tl.load(dhlast_ptr + sn + n) if HAS_DHLAST else tl.zeros((TT,), dtype=tl.float32)
        tl.store(dh0_ptr + sn + n, q, mask=last)
    # dA's running sums are kept per thread, (b, d, n, TT), each thread's own sum over its steps:
    # no sum across threads in the state loop (its shuffles are a chain of latencies), and the
    # thread's running value is loaded one state ahead like the other inputs. The wrapper adds
    # the TT partial sums.
    lanes = tl.arange(0, TT)
    dAp = dA_ptr + st * TT + lanes  # this program's (n, TT) rows   (TT,)
    for n in tl.static_range(N):
        tl.store(dAp + n * TT, tl.zeros((TT,), dtype=tl.float32))
    dD_acc = tl.zeros((TT,), dtype=tl.float32)
    dbias_acc = tl.zeros((TT,), dtype=tl.float32)
    n_chunks = tl.cdiv(L, T)

    for k in range(0, n_chunks):
        c = n_chunks - 1 - k  # chunks in reverse order
        tl.debug_barrier()  # what the last chunk stored in dh0 is visible to every thread now
        t = c * T + j * TI + i
        m = t < L
        sv = ((pid_b * n_chunks + c) * dim + pid_d) * N  # hsave (b, chunks, d, n)
        raw = tl.load(delta_ptr + row + t, mask=m, other=0.0).to(tl.float32) + bias
        dt = tl.where(m, _delta(raw, SOFTPLUS), 0.0)
        u = tl.load(u_ptr + row + t, mask=m, other=0.0).to(tl.float32)
        dtu = dt * u
        dout = tl.load(dout_ptr + row + t, mask=m, other=0.0).to(tl.float32)  # (TI, TT)
        if HAS_Z:
            z = tl.load(z_ptr + row + t, mask=m, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dy = dout * z * sz
        else:
            dy = dout
        y = tl.zeros((TI, TT), dtype=tl.float32)  # C·h, for dz
        gB = tl.zeros((TI, TT), dtype=tl.float32)  # Σ_n g_t B_t
        wA = tl.zeros((TI, TT), dtype=tl.float32)  # Σ_n w_t A
        # Each state's inputs are loaded one state ahead, before the atomics and stores of the state
        # in hand (which the compiler will not move loads across). Programs take the states in
        # staggered order (channel d starts at state d mod n), so that their atomic adds into dB
        # and dC spread over n rows instead of meeting in one.
        # The backward's carry is the gradient in dh0; it also reads the state entering the chunk.
        nxt = _state_inputs(B_ptr, C_ptr, A_ptr, dh0_ptr, bc, t, m, L, pid_d, sn, pid_d % N, N)
        h_next = tl.load(hsave_ptr + sv + pid_d % N)
        dA_next = tl.load(dAp + (pid_d % N) * TT)
        for r in range(0, N):  # a loop, not unrolled: one state's addresses live at a time
            ns = (pid_d + r) % N
            Bn, Cn, A_nat, q_in = nxt
            h_in = h_next
            nxt = _state_inputs(B_ptr, C_ptr, A_ptr, dh0_ptr, bc, t, m, L, pid_d, sn, (pid_d + r + 1) % N, N)
            h_next = tl.load(hsave_ptr + sv + (pid_d + r + 1) % N)
            dA_in = dA_next
            dA_next = tl.load(dAp + ((pid_d + r + 1) % N) * TT)
            # Recompute this state's h over the chunk from its saved starting value.
            a = tl.exp2(dt * (A_nat * LOG2E))  # a_t
            x = dtu * Bn  # x_t
            hs, _, _ = _chunk_states(a, x, h_in, TI, TT)
            y += Cn * hs
            # The gradient recurrence, backwards in time: g_t = C_t dy_t + a_{t+1} g_{t+1}.
            g, q_out = _chunk_grads(Cn * dy, a, q_in, TI, TT)
            w = g * (hs - x)  # g_t a_t h_{t-1}
            wA += w * A_nat
            gB += g * Bn
            tl.store(dh0_ptr + sn + ns, q_out, mask=last)
            tl.store(dAp + ns * TT, dA_in + tl.sum(w * dt, axis=0))  # this thread's steps
            # dB_t and dC_t sum over all channels: this program adds its share.
            tl.atomic_add(dC_ptr + bc + ns * L + t, dy * hs, mask=m, sem="relaxed")
            tl.atomic_add(dB_ptr + bc + ns * L + t, g * dtu, mask=m, sem="relaxed")

        if HAS_Z:
            if HAS_D:
                y += Dv * u
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))  # d SiLU(z) / dz = σ(z)(1 + z(1 - σ(z)))
            tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=m)
        du = dt * gB
        if HAS_D:
            du += Dv * dy
            dD_acc += tl.sum(dy * u, axis=0)
        ddt = wA + u * gB
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)  # softplus'(x) = σ(x)
        ddt = tl.where(m, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)

    # Per-batch partial sums (dh0 = a_0 g_0 is in place); the wrapper adds them over the batch.
    tl.store(dD_ptr + pid_b * dim + pid_d, tl.sum(dD_acc, axis=0))
    tl.store(dbias_ptr + pid_b * dim + pid_d, tl.sum(dbias_acc, axis=0))


# --- the custom ops (what torch.compile sees) ----------------------------------------------------


def _bwd_chunk() -> int:
    """The backward pass's chunk, in steps: the forward before it saves the state entering each."""
    return CONFIG["bwd"]["TI"] * CONFIG["bwd"]["TT"]


@custom_op("minijamba::triton_scan_fwd", mutates_args=())
def _scan_fwd(
    launch,
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, delta_softplus: bool, save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (b, d, l), last state (b, d, n) fp32, chunk-start states (b, chunks, d, n) fp32 or empty."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = CONFIG["fwd_train" if save_states else "fwd"]
    tb = _bwd_chunk()
    if tb % cfg["TI"] or (tb % (cfg["TI"] * cfg["TT"]) and (cfg["TI"] * cfg["TT"]) % tb):
        raise ValueError(f"CONFIG: the backward's chunk ({tb} steps) must be a multiple of the forward's TI, "
                         "and a multiple or a divisor of its chunk TI * TT")  # fmt: skip
    out = torch.empty_like(u)
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    hsave = u.new_empty((b, triton.cdiv(l, tb), d, n) if save_states else (0,), dtype=torch.float32)
    launch(_fwd_kernel)[(d, b)](
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last, hsave, d, l,
        N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None, SAVE=save_states, TB=tb, **cfg,
    )  # fmt: skip
    return out, last, hsave


@custom_op("minijamba::triton_scan_bwd", mutates_args=())
def _scan_bwd(
    launch,
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    hsave: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor | None, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """du, dΔ, dz, dA (b, d, n), dB, dC (b, n, l) fp32, dD, dbias (b, d), dh0 (b, d, n): per-batch sums."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = CONFIG["bwd"]
    if hsave.shape[1] != triton.cdiv(l, _bwd_chunk()):
        raise ValueError("the saved chunk states do not match CONFIG['bwd']: it changed between the passes")
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA, dh0 = torch.empty(b, d, n, cfg["TT"], **f32), torch.empty(b, d, n, **f32)
    dB, dC = torch.zeros(b, n, l, **f32), torch.zeros(b, n, l, **f32)
    dD, dbias = torch.empty(b, d, **f32), torch.empty(b, d, **f32)
    launch(_bwd_kernel)[(d, b)](
        u, delta, A, B, C, D, z, delta_bias, hsave, dout, dlast,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, d, l,
        N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_DHLAST=dlast is not None, **cfg,
    )  # fmt: skip
    return du, ddelta, dz, dA.sum(-1), dB, dC, dD, dbias, dh0


# --- autograd and the public functions -----------------------------------------------------------


class SelectiveScanFn(torch.autograd.Function):
    """The Triton forward and backward as one differentiable function (also initial_state and the
    returned last state are differentiable)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        save = any(ctx.needs_input_grad)
        out, last, hsave = run_op(
            torch.ops.minijamba.triton_scan_fwd, _scan_fwd,
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save,
        )  # fmt: skip
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
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = run_op(
            torch.ops.minijamba.triton_scan_bwd, _scan_bwd,
            u, delta, A, B, C, D, z, delta_bias, hsave, dout, dlast, ctx.delta_softplus,
        )  # fmt: skip
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
    if u.device.type != "cuda" and not interpreting():
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
    """`minijamba.model.ssm.selective_scan` on the Triton kernels: same arguments, shapes and result.

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
