"""Int8 experts for prefill: dequantize a group of experts into x's dtype, then one grouped GEMM (the
fast twin of `minijamba.inference.quant.grouped_int8_linear_reference` for many rows per expert,
same signature, held equal by tests/test_quant.py).

Glossary (as in `minijamba.inference.quant`):

    t   tokens; the rows of x are their t*K (token, expert) assignments, sorted by expert, so that
        expert j's rows are the contiguous slice x[ends[j-1]:ends[j]]
    E   experts in the layer; E' of them dequantized at a time (DEQUANT_BYTES)
    o   output channels of the projection; i its input channels

    y[r, :] = (scale[j] * q[j]) @ x[r, :]      for every row r of expert j   (q[j] is (o, i) int8)

Why: a prefill's expert matmuls are bound by arithmetic, and there the library's bf16 grouped GEMM
(`F.grouped_mm`, the one the bf16 experts run) is faster than our Triton int8 kernel, which converts
every weight tile after loading it, once per row block. Dequantizing costs one pass over the weights
(read 1 byte, write 2 a weight, the scale folded in), the same for 8K rows as for 128; the GEMM's
work grows with the rows. So from about a thousand rows per expert this twin wins, and below, the
fused kernel, which reads each weight byte once, does; it is taken from `quant.LARGE_ROWS`, where
its gain is worth the dequantized weights it holds.

The reference casts one expert at a time and runs one matmul for each: E launches and a
per-expert scale of the output. Here E' experts at a time are cast, with their scales, in one
elementwise pass, and multiplied in one `F.grouped_mm`; at most DEQUANT_BYTES of 16-bit weights
exist at once (Jamba-v0.1: all 16 experts of a projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The bf16 copy of at most this many bytes of expert weights is alive at a time (memory_plan counts
# it). Each further group costs a launch and a copy of its outputs into the result; 4 GiB keeps each
# of Jamba-v0.1's projections in one group (gate/up: 3.5 GiB); 1 GiB takes four (bench/RESULTS.md).
DEQUANT_BYTES = 4 << 30


def grouped_int8_linear_dequantized(x, q, scale, ends) -> torch.Tensor:
    """Rows x[ends[j-1]:ends[j]] times (scale[j] * q[j])ᵀ for every expert j. x (t*K, i); q (E, o, i)
    int8; scale (E, o); ends (E,) -> (t*K, o), in x's dtype. Reads `ends` back to the host (as the
    reference does) to slice the rows of each group of experts."""
    E, o, i = q.shape
    per_group = max(1, DEQUANT_BYTES // (o * i * x.element_size()))  # E'
    bounds = [0] + ends.tolist()  # row where each expert starts, then the end (a host sync)
    w = x.new_empty(min(per_group, E), o, i)  # (E', o, i): reused by every group
    groups = [(e0, min(E, e0 + per_group)) for e0 in range(0, E, per_group)]
    out = x.new_empty(x.shape[0], o) if len(groups) > 1 else None  # (t*K, o), filled group by group
    for e0, e1 in groups:
        r0, r1 = bounds[e0], bounds[e1]
        if r0 == r1:
            continue  # no rows for these experts: nothing to cast
        wg = _dequantize(q[e0:e1], scale[e0:e1], w[: e1 - e0])  # (E', o, i), one pass
        offs = (ends[e0:e1] - r0).to(torch.int32)  # (E',) ends of each expert's rows within the group
        y = F.grouped_mm(x[r0:r1], wg.transpose(1, 2), offs=offs)  # (r1 - r0, o)
        if out is None:
            return y  # one group: all the rows
        out[r0:r1] = y
    return out if out is not None else x.new_zeros(0, o)

def _dequantize(q, scale, out) -> torch.Tensor:
    """out = scale[..., None] * q in out's dtype: on CUDA a Triton kernel (torch.mul's mixed-dtype
    kernel ran at a quarter of the bandwidth on an H100), elsewhere torch.mul."""
    if q.is_cuda:
        from minijamba.kernels.int8_matmul import dequantize  # lazily: Triton is optional

        return dequantize(q, scale, out)
    return torch.mul(q, scale[..., None], out=out)


def workspace_bytes(rows: int, E: int, o: int, i: int, itemsize: int) -> int:
    """Memory the twin holds beyond its inputs and its output, for `rows` rows (memory_plan counts it):
    the 16-bit weights of one group of experts and, with more than one group, the groups' outputs
    before their concatenation."""
    per_group = max(1, DEQUANT_BYTES // (o * i * itemsize))
    several = E > per_group
    return min(per_group, E) * o * i * itemsize + (rows * o * itemsize if several else 0)
