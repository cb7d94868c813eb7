"""One decoding step of the selective scan as a Triton kernel: the `triton` backend's
`selective_state_update`, which must equal `minijamba.model.ssm.selective_state_update`.

Glossary (as in `minijamba.model.ssm`):

    b   batch                     x, Δ, z   (b, d)      this token's input, step size and gate
    d   channels                  A         (d, n)      the state matrix, negative
    n   state size                B, C      (b, n)      this token's input and output matrices
                                  h         (b, d, n)   the state, updated in place

A token needs no scan: h <- exp(Δ A) h + Δ B x, y = C·h + D x, times SiLU(z). One program takes a
block of BD channels of one sequence, whole states (n rounded up to a power of two) in registers;
at batch 1 the step is bound by its launch, which a CUDA graph removes (minijamba.inference.cuda_graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minijamba.kernels.custom_ops import custom_op, interpreting, run_op
from minijamba.kernels.triton_scan_fwd import LOG2E, _softplus

# Launch shape: channels per program and warps (bench/gpu_scan.py times the step).
CONFIG = dict(BD=64, num_warps=4)


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


def _np(n: int) -> int:
    return triton.next_power_of_2(n)


def _contiguous(t):
    return None if t is None else t.contiguous()


@custom_op("minijamba::triton_state_update", mutates_args={"state"})
def _state_update(
    launch,
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:  # fmt: skip
    b, d, n = state.shape
    block_d, warps = CONFIG["BD"], CONFIG["num_warps"]
    out = torch.empty(b, d, device=x.device, dtype=x.dtype)
    launch(_step_kernel)[(triton.cdiv(d, block_d), b)](
        state, x, dt, A, B, C, D, z, dt_bias, out, d, n,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0), B.stride(0),
        C.stride(0), z.stride(0) if z is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        NP=_np(n), BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`minijamba.model.ssm.selective_state_update` on a Triton kernel: one decoding step, `state`
    (b, d, n) updated in place; x, dt, z (b, d); A (d, n); B, C (b, n). Returns y (b, d)."""
    if state.dim() != 3 or x.shape != state.shape[:2]:
        raise ValueError(f"state must be (b, d, n) and x (b, d), got {tuple(state.shape)} and {tuple(x.shape)}")
    if state.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend runs on CUDA tensors, got {state.device}; use 'reference'")

    def last_contiguous(t):  # the kernel steps along the last dim with stride 1
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    x, dt, B, C, z = map(last_contiguous, (x, dt, B, C, z))
    return run_op(
        torch.ops.minijamba.triton_state_update, _state_update,
        state, x, dt, A.contiguous(), B, C, _contiguous(D), z, _contiguous(dt_bias), bool(dt_softplus),
    )  # fmt: skip
