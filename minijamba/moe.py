"""The MLPs: a dense SwiGLU MLP, and the mixture of experts that replaces it every e layers.

Glossary (the paper's symbols):

    t   tokens (batch and sequence flattened)
    h   model width
    f   hidden width of an MLP / expert (intermediate_size)
    n   experts in the layer
    K   experts each token goes to

Routing (`Router`): p = softmax(x W_router) over the n experts, then the K largest. The token's
output is  sum over its K experts of  p_i * expert_i(x).  The K weights are the softmax
probabilities themselves, NOT renormalised to sum to 1: that is what Jamba (like Mixtral's router
before renormalisation) does, and what the released weights expect.

Load balancing (`load_balancing_loss`, Switch Transformer eq. 4-6):  n * sum_i f_i P_i, where f_i
is the fraction of the t*K assignments that went to expert i and P_i the mean router probability
of expert i. It is 1 when routing is uniform. The model adds coef * its mean over MoE layers to
the training loss whenever `router_aux_loss_coef > 0`.

Two ways to run the experts, held equal by the tests:
    `experts_loop`     for each expert, gather its tokens and run it: the reference, easy to read
    `Experts.forward`  sort the t*K (token, expert) pairs by expert, so each expert's tokens are one
                       contiguous slice, then run all experts as one grouped matmul per projection;
                       tokens go to their experts and back by gathers (`gather_rows`), forwards
                       and backwards, no scatter-add
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.config import JambaConfig


class MLP(nn.Module):
    """The dense SwiGLU MLP: down(SiLU(gate(x)) * up(x)). Names match transformers' `JambaMLP`."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, l, h) -> (b, l, h), and an auxiliary loss of 0 (same return as SparseMoE)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), x.new_zeros(())


class Router(nn.Module):
    """Top-K router. Returns (probs (t, n) float32, weights (t, K), experts (t, K) int64)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (n, h)

    def forward(self, x: torch.Tensor):  # x (t, h)
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # (t, n)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (t, K) each, not renormalised
        return probs, weights.to(x.dtype), experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, group=None) -> torch.Tensor:
    """n * sum_i f_i P_i for one layer. probs (t, n); experts (t, K). Equals 1 for uniform routing.

    group: the process group a data-parallel batch is split over, or None. Then f is counted over
    the whole global batch (one all-reduce of n counts; f carries no gradient), so that the mean of
    this loss over the processes, and of its gradients, are those of the global batch (each
    process holding as many tokens); see minijamba.distributed."""
    n = probs.shape[-1]
    counts = torch.zeros(n, device=probs.device, dtype=probs.dtype).index_add_(
        0, experts.reshape(-1), torch.ones(experts.numel(), device=probs.device, dtype=probs.dtype)
    )  # assignments per expert   (n,)
    if group is not None:
        torch.distributed.all_reduce(counts, group=group)
    f = counts / counts.sum()  # fraction of assignments per expert   (n,)
    P = probs.mean(0)  # mean router probability per expert       (n,)
    return n * (f * P).sum()


class Experts(nn.Module):
    """n SwiGLU experts stored as stacked weights, laid out as transformers 5 holds them:
    gate_up_proj (n, 2f, h) = [gate; up] and down_proj (n, h, f)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        n, h, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * f, h))
        self.down_proj = nn.Parameter(torch.empty(n, h, f))

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert i on its tokens x (t_i, h) -> (t_i, h)."""
        gate, up = F.linear(x, self.gate_up_proj[i]).chunk(2, dim=-1)  # (t_i, f) each
        return F.linear(F.silu(gate) * up, self.down_proj[i])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (t, h), weights and experts (t, K) -> (t, h), by grouped matmuls over sorted tokens."""
        order, place, ends = sort_by_expert(experts, self.gate_up_proj.shape[0])
        xs = gather_rows(x, order, place, experts.shape[1])  # (t*K, h), expert 0's tokens, then 1's, ...
        gate, up = _grouped_linear(xs, self.gate_up_proj, ends.to(torch.int32)).chunk(2, dim=-1)  # (t*K, f) each
        ys = _grouped_linear(F.silu(gate) * up, self.down_proj, ends.to(torch.int32))  # (t*K, h)
        return combine(ys, order, place, weights).to(x.dtype)


def sort_by_expert(experts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The t*K assignments (token i's are i*K ... i*K+K-1) sorted by expert: experts (t, K) ->
    order (t*K,), the assignment at each sorted place; place (t*K,), its inverse; ends (n,), where
    each expert's slice ends (counted on the device: bincount on CUDA would sync with the host)."""
    flat = experts.reshape(-1)  # (t*K,) the expert of each assignment
    order = torch.argsort(flat, stable=True)  # (t*K,)
    place = torch.empty_like(order)
    place[order] = torch.arange(flat.numel(), device=flat.device)  # (t*K,)
    counts = flat.new_zeros(n).scatter_add_(0, flat, torch.ones_like(flat))  # assignments per expert (n,)
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
    """Rows x[ends[i-1]:ends[i]] times w[i]ᵀ for every group i. x (t, i); w (n, o, i) -> (t, o).

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


def experts_loop(experts: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The reference: for each expert, gather the tokens routed to it and add its weighted output."""
    out = torch.zeros_like(x)  # (t, h)
    for i in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.where(idx == i)  # tokens that chose expert i, and in which of their K slots
        if token.numel():
            out.index_add_(0, token, experts.expert(i, x[token]) * weights[token, slot, None])
    return out


class SparseMoE(nn.Module):
    """Router + experts. Names match transformers' `JambaSparseMoeBlock` (router, experts)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        self.balance_group = None  # set by minijamba.distributed.shard: f over the global batch

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, l, h) -> (b, l, h), and this layer's load-balancing loss (a scalar)."""
        b, l, h = x.shape
        xt = x.reshape(b * l, h)  # (t, h)
        probs, weights, idx = self.router(xt)  # (t, n), (t, K), (t, K)
        y = self.experts(xt, weights, idx)  # (t, h)
        return y.reshape(b, l, h), load_balancing_loss(probs, idx, self.balance_group)
