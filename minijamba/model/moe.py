"""The MLPs: a dense SwiGLU MLP, and the mixture of experts that replaces it every e layers.

Glossary (the paper's symbols):

    t   tokens (batch and sequence flattened)
    h   model width
    f   hidden width of an MLP / expert (intermediate_size)
    E   experts in the layer
    K   experts each token goes to

Routing (`Router`): p = softmax(x W_router) over the E experts, then the K largest. The token's
output is  sum over its K experts of  p_i * expert_i(x).  The K weights are the softmax
probabilities themselves, NOT renormalised to sum to 1: that is what Jamba (like Mixtral's router
before renormalisation) does, and what the released weights expect.

Load balancing (Switch Transformer eq. 4-6), as transformers' Jamba trains with it
(`load_balancing_loss_func`): each MoE layer counts its routing (`router_stats`: the top-K
assignments per expert and the router probabilities summed over its real tokens, padding left
out), and `load_balancing_loss` pools the counts of every MoE layer before it multiplies:

    E * sum_i f_i P_i,   f_i = assignments to expert i / tokens,   P_i = probability of i / tokens,

tokens and assignments summed over all MoE layers. f sums to K, P to 1, so the loss is K when the
routing is uniform (not 1: transformers' scale, which `router_aux_loss_coef` was tuned for). The
model adds coef * this loss to the training loss whenever `router_aux_loss_coef > 0`.

The experts run through the dispatch point (`minijamba.model.dispatch`): the reference,
`experts_loop`, takes each expert in turn, gathers the tokens routed to it, runs it and adds its
weighted output back. Its fast twin (minijamba.kernels.moe_dispatch) sorts the tokens by expert
and runs all experts as one grouped matmul per projection; a test holds the two equal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.model import dispatch
from minijamba.model.config import JambaConfig


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

    def forward(self, x: torch.Tensor, mask=None) -> tuple[torch.Tensor, None]:
        """x (b, l, h) -> (b, l, h), and None: no routing (SparseMoE returns its RouterStats there)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class Router(nn.Module):
    """Top-K router. Returns (probs (t, E) float32, weights (t, K), experts (t, K) int64)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, h)

    def forward(self, x: torch.Tensor):  # x (t, h)
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # (t, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (t, K) each, not renormalised
        return probs, weights.to(x.dtype), experts


class RouterStats(NamedTuple):
    """One MoE layer's routing, summed over its real tokens (see `load_balancing_loss`)."""

    counts: torch.Tensor  # (E,) top-K assignments per expert (no gradient); over the global batch
    rows: torch.Tensor  # () tokens those counts are over
    probs: torch.Tensor  # (E,) router probability per expert, summed over this process's tokens
    local_rows: torch.Tensor  # () tokens those probabilities are over


def router_stats(probs: torch.Tensor, experts: torch.Tensor, mask=None, group=None) -> RouterStats:
    """probs (t, E), experts (t, K), mask (t,) True for real tokens (None: all) -> RouterStats.

    group: the process group a data-parallel batch is split over, or None. Then the counts are
    over the whole global batch (one all-reduce; they carry no gradient), so that the mean over
    the processes of the loss and of its gradients are those of the global batch (each process
    holding as many tokens); see minijamba.training.distributed."""
    E, K = probs.shape[-1], experts.shape[-1]
    real = probs.new_ones(probs.shape[0]) if mask is None else mask.to(probs.dtype)  # (t,)
    counts = probs.new_zeros(E).index_add_(0, experts.reshape(-1), real.repeat_interleave(K))  # (E,)
    rows = real.sum()
    local_rows = rows
    if group is not None:
        both = torch.cat([counts, rows[None]]).detach()
        torch.distributed.all_reduce(both, group=group)
        counts, rows = both[:E], both[E]
    return RouterStats(counts.detach(), rows.detach(), (probs * real[:, None]).sum(0), local_rows)


def load_balancing_loss(stats: list[RouterStats]) -> torch.Tensor:
    """E * sum_i f_i P_i over the pooled routing of every MoE layer in `stats` (K when uniform)."""
    counts = torch.stack([s.counts for s in stats]).sum(0)  # (E,)
    probs = torch.stack([s.probs for s in stats]).sum(0)  # (E,)
    rows = torch.stack([s.rows for s in stats]).sum().clamp(min=1)
    local_rows = torch.stack([s.local_rows for s in stats]).sum().clamp(min=1)
    f, P = counts / rows, probs / local_rows  # (E,) each: f sums to K, P to 1
    return counts.shape[0] * (f * P).sum()


class Experts(nn.Module):
    """n SwiGLU experts stored as stacked weights, laid out as transformers 5 holds them:
    gate_up_proj (E, 2f, h) = [gate; up] and down_proj (E, h, f)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        E, h, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.config = config  # config.scan_backend names the primitives' backend (minijamba.model.dispatch)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, h))
        self.down_proj = nn.Parameter(torch.empty(E, h, f))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        """Normal weights, drawn one expert at a time in float32 (as int8 experts draw theirs, so that
        the same seed gives the same experts quantized or not)."""
        for i in range(self.num_experts):
            self.gate_up_proj[i].copy_(torch.empty_like(self.gate_up_proj[i], dtype=torch.float32).normal_(0, std))
            self.down_proj[i].copy_(torch.empty_like(self.down_proj[i], dtype=torch.float32).normal_(0, out_std))

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert i on its tokens x (t_i, h) -> (t_i, h)."""
        gate, up = F.linear(x, self.gate_up_proj[i]).chunk(2, dim=-1)  # (t_i, f) each
        return F.linear(F.silu(gate) * up, self.down_proj[i])

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (t, h), weights and idx (t, K) -> (t, h): each token's K experts, weighted and summed
        (`experts_loop`, or its fast twin, through the dispatch point)."""
        return dispatch.get(self.config.scan_backend).experts(self, x, weights, idx)


def experts_loop(experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """For each expert, gather the tokens routed to it, run it, and add its weighted output back.
    x (t, h); weights, idx (t, K) -> (t, h)."""
    out = torch.zeros_like(x)  # (t, h)
    for i in range(experts.num_experts):
        token, slot = torch.where(idx == i)  # the tokens that chose expert i, and in which of their K slots
        if token.numel():
            y = experts.expert(i, x[token]) * weights[token, slot, None]  # (t_i, h)
            out.index_add_(0, token, y.to(out.dtype))
    return out


class SparseMoE(nn.Module):
    """Router + experts. Names match transformers' `JambaSparseMoeBlock` (router, experts)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        self.balance_group = None  # set by minijamba.training.distributed.shard: f over the global batch

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, out_std)

    def forward(self, x: torch.Tensor, mask=None) -> tuple[torch.Tensor, RouterStats]:
        """x (b, l, h), mask (b, l) True for real tokens or None -> (b, l, h), and this layer's
        routing counts for the load-balancing loss (padding left out of them; it is routed as any token)."""
        b, l, h = x.shape
        xt = x.reshape(b * l, h)  # (t, h)
        probs, weights, idx = self.router(xt)  # (t, E), (t, K), (t, K)
        y = self.experts(xt, weights, idx)  # (t, h)
        real = None if mask is None else mask.reshape(b * l)  # (t,)
        return y.reshape(b, l, h), router_stats(probs, idx, real, self.balance_group)
