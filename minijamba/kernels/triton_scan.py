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

This file is the host side (launch shapes, custom ops, autograd, checks); the kernels are in
`triton_scan_fwd` (the forward and the device functions both share) and `triton_scan_bwd`.
"""

from __future__ import annotations

import torch
import triton

from minijamba.kernels.custom_ops import custom_op, interpreting, run_op
from minijamba.kernels.triton_scan_bwd import _bwd_kernel
from minijamba.kernels.triton_scan_fwd import _fwd_kernel

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


# --- the custom ops (what torch.compile sees) ----------------------------------------------------


def _bwd_chunk() -> int:
    """The backward pass's chunk, in steps: the forward before it saves the state entering each."""
    return CONFIG["bwd"]["TI"] * CONFIG["bwd"]["TT"]


@custom_op("minijamba::triton_scan_fwd", mutates_args=())
def _scan_fwd(
    launch,
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, delta_softplus: bool, save_states: bool,
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
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, out, last, hsave, d, l,
        N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None, SAVE=save_states,
        HAS_SEQ=seq_idx is not None, TB=tb, **cfg,
    )  # fmt: skip
    return out, last, hsave


@custom_op("minijamba::triton_scan_bwd", mutates_args=())
def _scan_bwd(
    launch,
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, seq_idx: torch.Tensor | None,
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
        u, delta, A, B, C, D, z, delta_bias, seq_idx, hsave, dout, dlast,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, d, l,
        N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_DHLAST=dlast is not None, HAS_SEQ=seq_idx is not None, **cfg,
    )  # fmt: skip
    return du, ddelta, dz, dA.sum(-1), dB, dC, dD, dbias, dh0


# --- autograd and the public functions -----------------------------------------------------------


class SelectiveScanFn(torch.autograd.Function):
    """The Triton forward and backward as one differentiable function (also initial_state and the
    returned last state are differentiable)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
        save = any(ctx.needs_input_grad)
        out, last, hsave = run_op(
            torch.ops.minijamba.triton_scan_fwd, _scan_fwd,
            u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, save,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.delta_softplus = delta_softplus
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, hsave)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, hsave = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = run_op(
            torch.ops.minijamba.triton_scan_bwd, _scan_bwd,
            u, delta, A, B, C, D, z, delta_bias, seq_idx, hsave, dout, dlast, ctx.delta_softplus,
        )  # fmt: skip
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            None if ctx.initial_dtype is None else dh0.to(ctx.initial_dtype),
            None, None,
        )  # fmt: skip


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx=None):
    """Shapes and devices, checked where the input enters; ValueError names the problem and the fix."""
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    n = A.shape[-1] if A.dim() == 2 else -1
    want = {
        "delta": (delta, (b, d, l)), "A": (A, (d, n)), "B": (B, (b, n, l)), "C": (C, (b, n, l)),
        "D": (D, (d,)), "z": (z, (b, d, l)), "delta_bias": (delta_bias, (d,)),
        "initial_state": (initial_state, (b, d, n)), "seq_idx": (seq_idx, (b, l)),
    }  # fmt: skip
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for u of shape {(b, d, l)}, got {tuple(t.shape)}")
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}: move them to one device")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool):
        raise ValueError(f"seq_idx must hold integer document indices, got dtype {seq_idx.dtype}")
    if u.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the triton backend runs on CUDA tensors, got {u.device}; use scan_backend='reference' "
            "on this device (or set TRITON_INTERPRET=1 to run the kernels slowly on the CPU)"
        )


def _c(t):
    return None if t is None else t.contiguous()


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, seq_idx=None,
):  # fmt: skip
    """`minijamba.model.ssm.selective_scan` on the Triton kernels: same arguments, shapes and result.

    u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,); initial_state (b, d, n);
    seq_idx (b, l) or None (packed documents). Returns y (b, d, l) in u's dtype, and the last
    state (b, d, n) in float32 when asked.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if u.shape[-1] == 0:  # nothing to scan: the state passes through
        b, d, _ = u.shape
        last = u.new_zeros(b, d, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state
        return (u.new_empty(u.shape), last) if return_last_state else u.new_empty(u.shape)
    out, last = SelectiveScanFn.apply(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        _c(D), _c(z), _c(delta_bias), _c(initial_state),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(), bool(delta_softplus),
    )  # fmt: skip
    return (out, last) if return_last_state else out
