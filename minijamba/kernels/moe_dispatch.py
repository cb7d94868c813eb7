"""The experts by grouped matmuls: the fast twin of the reference's loop over experts.

Glossary (as in minijamba.model.moe):

    t   tokens (batch and sequence flattened)
    h   model width
    f   hidden width of an expert
    E   experts in the layer
    K   experts each token goes to

The reference (`minijamba.model.dispatch.experts_loop`) runs one expert at a time on the tokens
that chose it. Here the t*K (token, expert) assignments are sorted by expert, so that each expert's
tokens are one contiguous slice, and all E experts run as one grouped matmul per projection
(`F.grouped_mm`). Tokens go to their experts and back by gathers (`gather_rows`), forwards and
backwards: no scatter-add, whose bf16 atomics cost 0.54 ms of a compiled training step on an H200
(bench/RESULTS.md). Same result as the loop up to the order of the K-term sums (tests/test_moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_grouped(experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`dispatch.experts` by grouped matmuls: x (t, h), weights and idx (t, K) -> (t, h), for an
    `Experts` (stacked weights gate_up_proj (E, 2f, h), down_proj (E, h, f))."""
    order, place, ends = sort_by_expert(idx, experts.num_experts)
    xs = gather_rows(x, order, place, idx.shape[1])  # (t*K, h), expert 0's tokens, then 1's, ...
    ends = ends.to(torch.int32)
    gate, up = _grouped_linear(xs, experts.gate_up_proj, ends).chunk(2, dim=-1)  # (t*K, f) each
    ys = _grouped_linear(F.silu(gate) * up, experts.down_proj, ends)  # (t*K, h)
    return combine(ys, order, place, weights).to(x.dtype)


def sort_by_expert(experts: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The t*K assignments (token i's are i*K ... i*K+K-1) sorted by expert: experts (t, K) ->
    order (t*K,), the assignment at each sorted place; place (t*K,), its inverse; ends (E,), where
    each expert's slice ends (counted on the device: bincount on CUDA would sync with the host)."""
    flat = experts.reshape(-1)  # (t*K,) the expert of each assignment
    order = torch.argsort(flat, stable=True)  # (t*K,)
    place = torch.empty_like(order)
    place[order] = torch.arange(flat.numel(), device=flat.device)  # (t*K,)
    counts = flat.new_zeros(E).scatter_add_(0, flat, torch.ones_like(flat))  # assignments per expert (E,)
    return order, place, counts.cumsum(0)


def combine(ys: torch.Tensor, order: torch.Tensor, place: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's K expert outputs, weighted and summed: ys (t*K, h) in sorted order, weights
    (t, K) -> (t, h) in the weights' dtype or ys', whichever is wider."""
    t, K = weights.shape
    ys = gather_rows(ys, place, order, 1).view(t, K, ys.shape[-1])  # back in token order   (t, K, h)
    return (ys * weights[..., None]).sum(1)


class _GatherRows(torch.autograd.Function):
    """x[index // K] for a permutation `index` of t*K rows, whose gradient is a gather too."""

    @staticmethod
    def forward(ctx, x, index, inverse, K):  # x (t, h) -> (t*K, h)
        ctx.save_for_backward(inverse)
        ctx.K = K
        return x[index // K]

    @staticmethod
    def backward(ctx, g):  # g (t*K, h) -> (t, h)
        (inverse,) = ctx.saved_tensors
        return g[inverse].view(g.shape[0] // ctx.K, ctx.K, g.shape[-1]).sum(1), None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, K: int) -> torch.Tensor:
    """Row index[j] // K of x for each j: x (t, h) -> (t*K, h), each row of x K times, in the order of
    the permutation `index` of range(t*K) (`inverse` its inverse: index[inverse[i]] == i).

    The MoE's dispatch (K copies of each token, sorted by expert) and, with K = 1, its way back.
    Autograd would take x[index]'s gradient by adding g's rows into x's (an index_add: atomic adds,
    in bf16 on a GPU); a permutation lets it be a gather instead, g[inverse], and the K copies of a
    row are neighbours there, summed in one pass."""
    return _GatherRows.apply(x, index, inverse, K)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows x[ends[i-1]:ends[i]] times w[i]ᵀ for every group i. x (t, i); w (E, o, i) -> (t, o).

    `F.grouped_mm` does it in one call where it has a kernel (CPU; CUDA in bf16 with dims that are
    multiples of 16 bytes; no float64 kernel anywhere); elsewhere the same slices run one matmul each."""
    if torch.is_autocast_enabled(x.device.type):  # as autocast does for a matmul: both in its dtype
        x, w = x.to(torch.get_autocast_dtype(x.device.type)), w.to(torch.get_autocast_dtype(x.device.type))
    aligned = all(s * x.element_size() % 16 == 0 for s in (x.shape[1], w.shape[1]))
    kernel = x.dtype != torch.float64 and (x.device.type == "cpu" or x.dtype == torch.bfloat16)
    if aligned and kernel and x.dtype == w.dtype:
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return _grouped_mm_eager(x, w, ends)  # torch.compile admits only bf16 grouped_mm
        return F.grouped_mm(x, w.transpose(1, 2), offs=ends)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return torch.cat([F.linear(xi, w[i]) for i, xi in enumerate(x.split(sizes))])


@torch.compiler.disable
def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm run outside torch.compile (one graph break), for the float32 CPU kernel."""
    return F.grouped_mm(x, w.transpose(1, 2), offs=ends)
