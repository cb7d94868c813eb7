"""A Triton grouped matmul for int8 experts: the int8 weights are read once and dequantized in
registers, instead of cast to 16 bits in memory first (the fast twin of
`minijamba.inference.quant.grouped_int8_linear_reference`, same signature, held equal by tests/test_quant_triton.py).

Glossary:

    T   rows of x: the (token, expert) assignments, sorted so that each expert's rows are contiguous
    E   experts
    O   output channels of the projection; I its input channels
    e   an expert; its rows are x[ends[e-1]:ends[e]]

    y[r, o] = scale[e, o] * sum_i x[r, i] * q[e, o, i]      for every row r of expert e

Why: at batch 1 a decoding step reads K = 2 experts per MoE layer. The reference casts each one to
bf16 in memory (read 1 byte, write 2, then the matmul reads the 2 again: 5 bytes moved per weight);
this kernel reads each weight byte once. For Jamba-v0.1 that is 28 GB against 5.6 GB of expert
traffic per token, most of a decoding step. In prefill the same kernel is a grouped GEMM on tensor
cores, with the weight tile converted to the activation dtype after it is loaded.

The grid: axis 0 splits the O outputs into tiles of BLOCK_O; axis 1 runs over row blocks of BLOCK_T
rows, each inside one expert. Expert e owns ceil(count_e / BLOCK_T) consecutive row blocks; the
launch has ceil(T / BLOCK_T) + E of them (an upper bound, computed without reading the counts back
to the host: no synchronisation) and each program finds its expert from the prefix sums of the
block counts; those past the end return at once. Runs on CUDA, or (slowly) in Triton's interpreter
on the CPU with TRITON_INTERPRET=1, which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_T, BLOCK_O, BLOCK_I, num_warps) for few rows per expert (decoding) and for many (prefill).
# tl.dot needs at least 16 rows: a decoding step wastes the masked ones, but it is bound by the
# weight bytes anyway.
CONFIG = {"small": (16, 32, 128, 4), "large": (64, 128, 64, 4)}
SMALL_ROWS = 64  # at most this many rows per expert on average: the "small" shape


@triton.jit
def _grouped_int8_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, starts_ptr, counts_ptr, block_start_ptr,
    n_experts, O, I,
    stride_xt, stride_qe, stride_qo, stride_se, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    # The expert of this row block: the last e whose first block is <= pid_t (empty experts own no
    # block, so they share their first block with the next expert and are never the last such e).
    e = tl.full((), 0, tl.int32)
    for k in range(1, n_experts):
        e += (tl.load(block_start_ptr + k) <= pid_t).to(tl.int32)
    count = tl.load(counts_ptr + e)
    row0 = (pid_t - tl.load(block_start_ptr + e)) * BLOCK_T
    if row0 < count:
        start = tl.load(starts_ptr + e)
        rows = row0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,) rows of this expert
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,) output channels
        rmask, cmask = rows < count, cols < O
        x_rows = x_ptr + (start + rows).to(tl.int64)[:, None] * stride_xt
        q_rows = q_ptr + e.to(tl.int64) * stride_qe + cols.to(tl.int64)[:, None] * stride_qo
        # tl.full is a builtin; tl.zeros is a @jit helper, which the interpreter cannot call when
        # triton.language was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it)
        acc = tl.full((BLOCK_T, BLOCK_O), 0.0, tl.float32)
        for i0 in range(0, I, BLOCK_I):
            ks = i0 + tl.arange(0, BLOCK_I)
            kmask = ks < I
            xt = tl.load(x_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)  # (T, I) tile
            wt = tl.load(q_rows + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0)  # (O, I) int8
            w = tl.trans(wt.to(xt.dtype))  # exact: every int8 value is a bf16/fp16/fp32 value
            if IEEE:
                acc += tl.dot(xt, w, input_precision="ieee")
            else:
                acc += tl.dot(xt, w)
        scale = tl.load(s_ptr + e.to(tl.int64) * stride_se + cols, mask=cmask, other=0.0)  # (BLOCK_O,)
        y = acc * scale[None, :]
        y_ptrs = y_ptr + (start + rows).to(tl.int64)[:, None] * stride_yt + cols[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def grouped_int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Rows x[ends[e-1]:ends[e]] times (scale[e] * q[e])ᵀ for every expert e.

    x (T, I) float; q (E, O, I) int8; scale (E, O) float32; ends (E,) cumulative row counts. -> (T, O)
    in x's dtype. No host synchronisation."""
    T, I = x.shape
    E, O, _ = q.shape
    y = torch.empty(T, O, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    ends = ends.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) rows per expert
    starts = ends - counts
    BLOCK_T, BLOCK_O, BLOCK_I, warps = CONFIG["small" if T <= SMALL_ROWS * E else "large"]
    blocks = (counts + BLOCK_T - 1) // BLOCK_T  # row blocks per expert
    block_start = torch.cat([blocks.new_zeros(1), blocks.cumsum(0)])  # (E + 1,)
    grid = (triton.cdiv(O, BLOCK_O), triton.cdiv(T, BLOCK_T) + E)
    _grouped_int8_kernel[grid](
        x, q, scale, y, starts, counts, block_start, E, O, I,
        x.stride(0), q.stride(0), q.stride(1), scale.stride(0), y.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, IEEE=x.dtype == torch.float32, num_warps=warps,
    )  # fmt: skip
    return y
