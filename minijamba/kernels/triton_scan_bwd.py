"""The selective scan's backward kernel in Triton: the gradient recurrence run backwards over the
chunks, recomputing each chunk's states from the one the forward saved at its start
(`minijamba.kernels.triton_scan` says how the work is laid out).

Glossary as in `triton_scan`: b batch, d channels, l sequence length, n state size; T = TI * TT
steps a chunk, TI steps a thread, TT threads a program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from minijamba.kernels.triton_scan_fwd import LOG2E, _chunk_states, _delta, _keep, _row, _scan_combine, _state_inputs

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
# Packed documents set a_t = 0 where one starts (a constant there): then w_t = 0 and no gradient
# crosses from g_t to g_{t-1}, which the same formulas give with that a_t.
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
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, hsave_ptr, dout_ptr, dhlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L,
    N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DHLAST: tl.constexpr, HAS_SEQ: tl.constexpr,
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
        keep = _keep(seq_ptr, t, m, L, pid_b, HAS_SEQ)  # 0 where a document starts
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
            a = tl.exp2(dt * (A_nat * LOG2E)) * keep  # a_t (0 where a document starts)
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
