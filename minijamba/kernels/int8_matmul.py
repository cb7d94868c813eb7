"""A Triton grouped matmul for int8 experts: the int8 weights are read once and dequantized in
registers, instead of cast to 16 bits in memory first (the fast twin of
`minijamba.inference.quant.grouped_int8_linear_reference`, same signature, held equal by tests/test_quant_triton.py).

Glossary (as in `minijamba.inference.quant`):

    t   tokens; the rows of x are their t*K (token, expert) assignments, sorted by expert, so that
        expert j's rows are the contiguous slice x[ends[j-1]:ends[j]]
    E   experts in the layer
    K   experts each token goes to
    o   output channels of the projection; i its input channels

    y[r, :] = scale[j] * (q[j] @ x[r, :])      for every row r of expert j   (q[j] is (o, i) int8)

Why: at batch 1 a decoding step reads K = 2 experts per MoE layer. The reference casts each one to
bf16 in memory (read 1 byte, write 2, then the matmul reads the 2 again: 5 bytes moved per weight);
this kernel reads each weight byte once. For Jamba-v0.1 that is 28 GB against 5.6 GB of expert
traffic per token, most of a decoding step. In prefill the same kernel is a grouped GEMM on tensor
cores, with the weight tile converted to the activation dtype after it is loaded.

At most ROWS_MAX rows in all (decoding at batch 1 or 2) a second kernel runs: one program per
(row, tile of outputs), a multiply and a sum over each weight tile instead of tl.dot, whose 16-row
minimum would leave 15 of its rows masked. Each row reads its expert's weights, so two rows of one
expert read them twice: only for this handful of rows is that cheaper than the dot kernel.

The dot kernel's programs: one per (tile of BLOCK_O outputs, row block of BLOCK_T rows inside one
expert), in the order GROUP_T sets. Expert j owns ceil(count_j / BLOCK_T) consecutive row blocks; the
launch has ceil(t*K / BLOCK_T) + E of them (an upper bound, computed without reading the counts back
to the host: no synchronisation) and each program finds its expert from the prefix sums of the
block counts; those past the end return at once. Runs on CUDA, or (slowly) in Triton's interpreter
on the CPU with TRITON_INTERPRET=1, which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_T, BLOCK_O, BLOCK_I, num_warps, num_stages, W_LEFT) for at most one row an expert
# (decoding at small batches), a few (decoding at larger ones) and many (prefill). tl.dot needs at
# least 16 rows: a decoding step wastes the masked ones, but it is bound by the weight bytes anyway.
# W_LEFT: the weight tile is the dot's left operand (accumulate yᵀ tile by tile), which lets Hopper's
# tensor cores take the dequantized tile from registers; it won alone in bench/gpu_int8_sweep.py at
# one row an expert but lost inside the decoding step, so no shape uses it now. "small": the
# sweep's best at 8 rows an expert, 1.06x the batch-64 step of the "gemv" tile. "large_sm90": the
# prefill tile on Hopper (H100/H200), whose shared memory holds its 64 KiB a stage: the sweep's
# fastest at Jamba-v0.1's expert shapes. (bench/RESULTS.md, "The int8 kernel's tiles", 2026-12-03.)
CONFIG = {
    "rows": (1, 16, 512, 4, 2, False),  # _int8_rows_kernel (BLOCK_T unused), the 2026-12-04 sweep
    "gemv": (16, 32, 128, 4, 3, False),
    "small": (16, 128, 256, 4, 3, False),
    "large": (64, 128, 64, 4, 3, False),
    "large_sm90": (128, 256, 128, 8, 3, False),
}
SMALL_ROWS = 64  # at most this many rows per expert on average: the "small" shape
GEMV_ROWS = 1  # at most this many: "gemv" (decoding at batch 1 to about E / K)
ROWS_MAX = 4  # at most this many rows in all: "rows" (decoding at batch 1 and 2, K = 2)
# How the rows kernel turns an int8 weight w into a float32. The conversion instruction (I2F) runs at
# a quarter of the rate of float arithmetic: on Hopper about one weight a byte of bandwidth in all, so
# the conversion, not the memory, bounds the kernel. MAGIC instead adds w (sign-extended to 32 bits)
# to the bits of 2^23 + 128, where w + 128 lands in the mantissa: the float 2^23 + 128 + w, exactly;
# then subtracts 2^23 + 128. Integer and float adds, at full rate. Same values either way (the tests
# run both). (The dot kernel needs no such trick: Triton already lowers int8 -> bf16 without I2F.)
MAGIC = True
# In prefill, GROUP_T row blocks run output tile by output tile together (Triton's grouped ordering): the
# programs resident at once then read the same few weight tiles, which L2 serves after the first
# read. In launch order (all output tiles of one row block, then the next) each wave reads the
# whole expert from memory again: 8 times at 8K tokens. Measured on an H100, the gate/up projection
# at 8K-32K tokens took 7-9% less time, the down projection the same (bench/RESULTS.md, "int8
# prefill"): the kernel is bound more by its arithmetic than by those re-reads. Decoding shapes keep
# launch order (GROUP_T 1): each of their experts has one row block, so there is nothing to share.
GROUP_T = 8


@triton.jit
def _grouped_int8_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, starts_ptr, counts_ptr, block_start_ptr,
    n_experts, n_out, n_in, n_pid_o, n_pid_t,
    stride_xt, stride_qe, stride_qo, stride_se, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, PRECISION: tl.constexpr,
    W_LEFT: tl.constexpr, GROUP_T: tl.constexpr,
):  # fmt: skip
    # Program pid -> (output tile pid_o, row block pid_t): GROUP_T row blocks at a time, the row block
    # changing fastest, so that the programs running together share their weight tiles in L2.
    pid = tl.program_id(0)
    per_group = GROUP_T * n_pid_o
    first_t = (pid // per_group) * GROUP_T
    size_t = tl.minimum(n_pid_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % size_t
    pid_o = (pid % per_group) // size_t
    # The expert of this row block: the last j whose first block is <= pid_t (empty experts own no
    # block, so they share their first block with the next expert and are never the last such j).
    j = tl.full((), 0, tl.int32)
    for k in range(1, n_experts):
        j += (tl.load(block_start_ptr + k) <= pid_t).to(tl.int32)
    count = tl.load(counts_ptr + j)
    row0 = (pid_t - tl.load(block_start_ptr + j)) * BLOCK_T
    if row0 < count:
        start = tl.load(starts_ptr + j)
        rows = row0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,) rows of this expert
        cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,) output channels
        rmask, cmask = rows < count, cols < n_out
        x_rows = x_ptr + (start + rows).to(tl.int64)[:, None] * stride_xt
        q_rows = q_ptr + j.to(tl.int64) * stride_qe + cols.to(tl.int64)[:, None] * stride_qo
        # tl.full is a builtin; tl.zeros is a @jit helper, which the interpreter cannot call when
        # triton.language was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it)
        if W_LEFT:
            acc = tl.full((BLOCK_O, BLOCK_T), 0.0, tl.float32)  # yᵀ tile
        else:
            acc = tl.full((BLOCK_T, BLOCK_O), 0.0, tl.float32)  # y tile
        for i0 in range(0, n_in, BLOCK_I):
            ks = i0 + tl.arange(0, BLOCK_I)
            kmask = ks < n_in
            xt = tl.load(x_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_T, BLOCK_I) tile
            wt = tl.load(q_rows + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0)  # (BLOCK_O, BLOCK_I) int8
            w = wt.to(xt.dtype)  # exact: every int8 value is a bf16/fp16/fp32 value
            if W_LEFT:
                acc += tl.dot(w, tl.trans(xt), input_precision=PRECISION)  # (BLOCK_O, BLOCK_T)
            else:
                acc += tl.dot(xt, tl.trans(w), input_precision=PRECISION)  # (BLOCK_T, BLOCK_O)
        if W_LEFT:
            acc = tl.trans(acc)  # (BLOCK_T, BLOCK_O)
        scale = tl.load(s_ptr + j.to(tl.int64) * stride_se + cols, mask=cmask, other=0.0)  # (BLOCK_O,)
        y = acc * scale[None, :]
        y_ptrs = y_ptr + (start + rows).to(tl.int64)[:, None] * stride_yt + cols[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _int8_rows_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, ends_ptr,
    n_experts, n_out, n_in,
    stride_xt, stride_qe, stride_qo, stride_se, stride_yt,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0)
    r = tl.program_id(1)  # this program's row
    j = tl.full((), 0, tl.int32)  # its expert: the number of experts that end at or before row r
    for k in range(0, n_experts):
        j += (tl.load(ends_ptr + k) <= r).to(tl.int32)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,) output channels
    cmask = cols < n_out
    x_row = x_ptr + r.to(tl.int64) * stride_xt
    q_rows = q_ptr + j.to(tl.int64) * stride_qe + cols.to(tl.int64)[:, None] * stride_qo
    acc = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)  # partial products, summed over i at the end
    for i0 in range(0, n_in, BLOCK_I):
        ks = i0 + tl.arange(0, BLOCK_I)
        kmask = ks < n_in
        xv = tl.load(x_row + ks, mask=kmask, other=0.0).to(tl.float32)  # (BLOCK_I,)
        wt = tl.load(q_rows + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0,
                     eviction_policy="evict_first")  # (BLOCK_O, BLOCK_I) int8, read once  # fmt: skip
        if MAGIC:
            w = (wt.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            w = wt.to(tl.float32)
        acc += w * xv[None, :]
    scale = tl.load(s_ptr + j.to(tl.int64) * stride_se + cols, mask=cmask, other=0.0)  # (BLOCK_O,)
    y = tl.sum(acc, axis=1) * scale  # (BLOCK_O,)
    tl.store(y_ptr + r.to(tl.int64) * stride_yt + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)


def _shape(x: torch.Tensor, rows_per_expert: float) -> str:
    if rows_per_expert <= GEMV_ROWS:
        return "gemv"
    if rows_per_expert <= SMALL_ROWS:
        return "small"
    hopper = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    return "large_sm90" if hopper else "large"


def grouped_int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Rows x[ends[j-1]:ends[j]] times (scale[j] * q[j])ᵀ for every expert j.

    x (t*K, i) float; q (E, o, i) int8; scale (E, o) float32; ends (E,) cumulative row counts
    -> (t*K, o) in x's dtype. No host synchronisation."""
    rows, n_in = x.shape
    E, n_out, _ = q.shape
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    ends = ends.to(torch.int64)
    if rows <= ROWS_MAX:
        _, BLOCK_O, BLOCK_I, warps, stages, _ = CONFIG["rows"]
        _int8_rows_kernel[(triton.cdiv(n_out, BLOCK_O), rows)](
            x, q, scale, y, ends, E, n_out, n_in,
            x.stride(0), q.stride(0), q.stride(1), scale.stride(0), y.stride(0),
            BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, MAGIC=MAGIC, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return y
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) rows per expert
    starts = ends - counts
    shape = _shape(x, rows / E)
    BLOCK_T, BLOCK_O, BLOCK_I, warps, stages, w_left = CONFIG[shape]
    blocks = (counts + BLOCK_T - 1) // BLOCK_T  # row blocks per expert
    block_start = torch.cat([blocks.new_zeros(1), blocks.cumsum(0)])  # (E + 1,)
    n_pid_o, n_pid_t = triton.cdiv(n_out, BLOCK_O), triton.cdiv(rows, BLOCK_T) + E
    _grouped_int8_kernel[(n_pid_o * n_pid_t,)](
        x, q, scale, y, starts, counts, block_start, E, n_out, n_in, n_pid_o, n_pid_t,
        x.stride(0), q.stride(0), q.stride(1), scale.stride(0), y.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, W_LEFT=w_left,
        GROUP_T=GROUP_T if shape.startswith("large") else 1,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # (tf32 applies to float32 only)
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, w_ptr, n_in, BLOCK: tl.constexpr):
    """One program per (row of q, BLOCK columns): w = s[row] * q[row], in w's dtype."""
    row = tl.program_id(0).to(tl.int64)  # rows * n_in passes 2^31 at Jamba-v0.1's 16 experts
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_in
    q = tl.load(q_ptr + row * n_in + cols, mask=mask, other=0)
    w = q.to(tl.float32) * tl.load(s_ptr + row)
    tl.store(w_ptr + row * n_in + cols, w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = scale[..., None] * q in out's dtype, one pass (read 1 byte, write 2 a weight). q (E', o, i)
    int8; scale (E', o) float32; out (E', o, i), all contiguous. For the prefill twin
    (minijamba.kernels.int8_dequant); torch.mul does the same in a slower mixed-dtype kernel."""
    n_in = q.shape[-1]
    BLOCK = min(4096, triton.next_power_of_2(n_in))
    _dequantize_kernel[(q.numel() // n_in, triton.cdiv(n_in, BLOCK))](q, scale, out, n_in, BLOCK=BLOCK, num_warps=4)
    return out
