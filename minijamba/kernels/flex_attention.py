"""Packed attention through FlexAttention: the fast twin of `minijamba.model.attention.packed_attention`.

Glossary as in `minijamba.model.attention`: b batch, l tokens, q query heads, g key/value heads,
e head size; seq_idx (b, l) the document of each position.

The reference builds a (b, l, l) boolean mask and hands it to SDPA, which then cannot use flash
attention: it computes every score, also the ones the mask throws away. FlexAttention takes the
rule instead (same document, key not after query), builds a block mask that skips the tiles it
rules out, and compiles one fused kernel for forward and backward. On the H200 at b = 4, l = 2048,
32 heads of 128, it takes about a third of the SDPA mask's time (bench/RESULTS.md, #h200-packed).

FlexAttention has no backward on the CPU: there, where a gradient is wanted, this is the reference.
"""

from __future__ import annotations

import torch

_COMPILED = None  # torch.compile of flex_attention and of create_block_mask, made on first use
_LAST = None  # (seq_idx, its version, the block mask): the attention layers of one forward share it


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)
    return _COMPILED


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed document, as the reference's: q (b, q, l, e); k, v
    (b, g, l, e); seq_idx (b, l) int -> (b, q, l, e)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not q.is_cuda and grad:  # no CPU backward in FlexAttention
        from minijamba.model.attention import packed_attention as reference

        return reference(q, k, v, seq_idx)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _LAST
    if _LAST is not None and _LAST[0] is seq_idx and _LAST[1] == seq_idx._version:
        block = _LAST[2]  # a later attention layer of the same forward
    else:
        b, l = seq_idx.shape

        def same_document_causal(bi, hi, qi, ki):  # one score: may query qi of row bi see key ki?
            return (seq_idx[bi, qi] == seq_idx[bi, ki]) & (ki <= qi)

        # heads share it; on the GPU its making is compiled too (eager, it costs more than the attention)
        make = _compiled()[1] if q.is_cuda else create_block_mask
        block = make(same_document_causal, b, None, l, l, device=q.device)
        _LAST = (seq_idx, seq_idx._version, block)
    if q.is_cuda:
        return _compiled()[0](q, k, v, block_mask=block, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block, enable_gqa=True)  # eager: the unfused math, CPU
