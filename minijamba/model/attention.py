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

Packed documents (seq_idx (b, l), training only): attention is block-diagonal causal, each query
seeing the keys at or before it in its own document. The reference builds the (b, l, l) mask for
SDPA (`packed_attention`); its fast twin, FlexAttention with a document mask, is a primitive of the
dispatch point (minijamba.kernels.flex_attention).

Grouped-query attention (g < q) shrinks the KV cache by q/g; `F.scaled_dot_product_attention` with
`enable_gqa=True` shares each key/value head across its group without copying it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minijamba.model import dispatch
from minijamba.model.config import JambaConfig


class Attention(nn.Module):
    """Jamba's attention layer. Parameter names match transformers' `JambaAttention`."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = config  # config.scan_backend names the primitives' backend (minijamba.model.dispatch)
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

    def forward(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None, cache=None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x (b, l, h) -> (b, l, h).

        state: the model's `InferenceState` (its `length` already counts these l tokens) and cache
        this layer's `KVCache` in it, or both None. mask: (b, l) bool, False at padding, or None
        (with a state, the state's `valid` says where the padding is). seq_idx: (b, l) int, the
        document of each position (packed rows, no state), or None.
        """
        l = x.shape[1]
        q = rearrange(self.q_proj(x), "b l (q e) -> b q l e", e=self.e)  # (b, q, l, e)
        k = rearrange(self.k_proj(x), "b l (g e) -> b g l e", e=self.e)  # (b, g, l, e)
        v = rearrange(self.v_proj(x), "b l (g e) -> b g l e", e=self.e)  # (b, g, l, e)

        if seq_idx is not None:  # packed documents: causal within each (through the dispatch point)
            out = dispatch.get(self.config.scan_backend).packed_attention(q, k, v, seq_idx)
        elif state is None:  # a whole sequence: causal, and padding keys masked out when there are any
            out = attend(q, k, v, start=0, valid=mask)
        else:  # continue from the KV cache: write this call's keys and values, read all of them
            k, v, allowed = cache.update(k, v, state)  # (b, g, s, e) twice; allowed: see KVCache.update
            if allowed is None:  # the new tokens are the last l of the s
                s = k.shape[2]
                out = attend(q, k, v, start=s - l, valid=state.valid[:, :s] if state.padded else None)
            else:  # the cache says which keys each query sees
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return self.o_proj(rearrange(out, "b q l e -> b l (q e)"))  # (b, l, h)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed document: q (b, q, l, e); k, v (b, g, l, e); seq_idx (b, l)
    int, the document of each position -> (b, q, l, e). A query sees the keys at or before it that
    carry its own seq_idx, and nothing of the documents before."""
    l = q.shape[2]
    same = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, l, l): query and key in one document
    allowed = same & torch.ones(l, l, dtype=torch.bool, device=q.device).tril()  # (b, l, l)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of l queries at positions start .. start+l-1 over s = start + l keys.

    q (b, q, l, e); k, v (b, g, s, e); valid (b, s) bool, False at padding keys, or None when there
    is no padding -> (b, q, l, e). A query sees the real keys at or before it (a padding query sees
    itself, so that no row is empty).

    Without padding the mask is causal aligned to the bottom right and SDPA is told so: then it can
    run flash attention, with no (b, l, s) mask and no scores in memory, whatever the context."""
    l, s = q.shape[2], k.shape[2]
    if valid is None:
        if start == 0:  # the whole sequence, or the first call
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if l == 1:  # a decoding step: the one new query sees every key
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        from torch.nn.attention.bias import causal_lower_right  # here: it imports torch._dynamo (slow)

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(l, s), enable_gqa=True)
    pos_q = torch.arange(start, s, device=q.device)[:, None]  # (l, 1)
    pos_k = torch.arange(s, device=q.device)[None, :]  # (1, s)
    allowed = ((pos_k <= pos_q) & valid[:, None, :]) | (pos_k == pos_q)  # (b, l, s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
