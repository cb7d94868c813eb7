"""Causal self-attention with grouped key/value heads and no positional encoding.

Glossary:

    b   batch
    l   new tokens in this call (queries)
    s   tokens attended to (keys): l without a cache, everything seen so far with one
    h   model width
    q   query heads (num_attention_heads)
    g   key/value heads (num_key_value_heads); each serves q/g query heads (grouped-query attention)
    e   head size, h / q

No positional encoding (no RoPE, no learned positions): the paper (section 6.5) trained Jamba with and
without RoPE and found no difference. The Mamba layers see tokens in order, and that order is
enough: attention layers placed after them inherit position implicitly.

Grouped-query attention (g < q) shrinks the KV cache by q/g; `F.scaled_dot_product_attention` with
`enable_gqa=True` shares each key/value head across its group without copying it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minijamba.config import JambaConfig


class Attention(nn.Module):
    """Jamba's attention layer. Parameter names match transformers' `JambaAttention`."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        h, q, g, e = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q, self.g, self.e = q, g, e
        self.q_proj = nn.Linear(h, q * e, bias=False)
        self.k_proj = nn.Linear(h, g * e, bias=False)
        self.v_proj = nn.Linear(h, g * e, bias=False)
        self.o_proj = nn.Linear(q * e, h, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x (b, l, h) -> (b, l, h).

        state: the model's `InferenceState` (its `length` already counts these l tokens) and cache
        this layer's `KVCache` in it, or both None. mask: (b, l) bool, False at padding, or None.
        """
        l = x.shape[1]
        q = rearrange(self.q_proj(x), "b l (q e) -> b q l e", e=self.e)  # (b, q, l, e)
        k = rearrange(self.k_proj(x), "b l (g e) -> b g l e", e=self.e)  # (b, g, l, e)
        v = rearrange(self.v_proj(x), "b l (g e) -> b g l e", e=self.e)  # (b, g, l, e)

        if state is None and mask is None:  # training: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(rearrange(out, "b q l e -> b l (q e)"))  # (b, l, h)

        if state is not None and state.window is not None:  # a graph-ready decoding step (cuda_graph.py)
            slot = state.end - 1  # (1,) this token's position, on the device
            cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
            cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
            w = state.window  # a fixed number of key slots; `valid` is False at those not yet written
            k, v = cache.k[:, :, :w].to(q.dtype), cache.v[:, :, :w].to(q.dtype)  # (b, g, w, e)
            seen = state.valid[:, None, None, :w]  # (b, 1, 1, w): real tokens written so far
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=True)
            return self.o_proj(rearrange(out, "b q l e -> b l (q e)"))  # (b, 1, h)

        end = l if state is None else state.length  # keys are positions [0, end)
        start = end - l  # the new tokens sit at [start, end)
        if cache is not None:
            cache.k[:, :, start:end] = k
            cache.v[:, :, start:end] = v
            # All keys and values so far (b, g, s, e), in the queries' dtype: under bf16 autocast the
            # queries are bf16 while the cache keeps the model's dtype.
            k, v = cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
        if state is not None and not state.padded:
            # No padding anywhere: query i (position start + i) sees keys [0, start + i], a causal mask
            # aligned to the bottom right. Said so, SDPA can run flash attention: no (b, l, s) mask and
            # no scores in memory, whatever the context. Same result as the masked path below.
            if start == 0:  # the first call: plain causal
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif l == 1:  # a decoding step: the one new query sees every key
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:  # a later prefill chunk; imported here because it imports torch._dynamo (slow)
                from torch.nn.attention.bias import causal_lower_right

                out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(l, end), enable_gqa=True)
        else:
            valid = mask if state is None else state.valid[:, :end]  # (b, s) real tokens
            pos_q = torch.arange(start, end, device=x.device)[:, None]  # (l, 1)
            pos_k = torch.arange(end, device=x.device)[None, :]  # (1, s)
            # A query sees real keys at or before it; a padding query sees itself (so no row is empty).
            allowed = (pos_k <= pos_q) & valid[:, None, :]  # (b, l, s)
            allowed = allowed | (pos_k == pos_q)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
        return self.o_proj(rearrange(out, "b q l e -> b l (q e)"))  # (b, l, h)
