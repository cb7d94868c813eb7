"""Linear layers that move time between the last and the middle dimension for free.

Glossary:

    b   batch
    l   sequence length (time)
    i   input features of the layer
    o   output features of the layer

The Mamba mixer's scan and convolution read each channel's time series as one contiguous row:
(b, d, l), "time-last". The rest of the model keeps (b, l, h), "time-first", one token's features
together. Between the two, `rearrange(x, "b l d -> b d l")` is free as a view, but the scan (and
a Linear on the transposed view) then copy it into the layout they need: a transposing copy of
every (b, d, l) stream in each direction, which on a GPU costs about as much as the matmul beside
it (bench/RESULTS.md: ~8% of a training step).

A matmul can write its product in either layout at no cost, by choosing which operand it treats
as transposed. These two functions do that, forward and backward:

    linear_to_time_last(x, W)     x (b, l, i) -> (b, o, l)      = rearrange(F.linear(x, W), "b l o -> b o l")
    linear_from_time_last(x, W)   x (b, i, l) -> (b, l, o)      = F.linear(rearrange(x, "b i l -> b l i"), W)

Both return a contiguous result, and the gradient of x comes back in x's own layout, so no copy
is made either way. They compute what F.linear computes (also under autocast: in the autocast
dtype, with float32 gradients for float32 weights); only the order of the sums in a gradient of
the weight may differ (it sums per-sequence products over the batch).

`to_time_last` and `from_time_last` are the fast twins of `minijamba.model.dispatch`'s primitives
of the same names: they take the mixer's `nn.Linear` and use its weight and bias (and a LoRA adapter's update). For one
token per row (a decoding step) they take the plain matmul instead, whose product is already
time-last: a batched matmul over a weight broadcast to every row would read the weight once per
row (42 of a 67 ms decoding step at batch 64 for Jamba-v0.1's sizes, before this choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minijamba.model import mamba
from minijamba.model.lora import LoRALinear


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _Linear(torch.autograd.Function):
    """y = x W^T + bias with time on either side; `to_time_last` says which way (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, to_time_last):
        dtype = _compute_dtype(x)
        xc, w = x.to(dtype), weight.to(dtype)  # (b, l, i) or (b, i, l); (o, i)
        b = x.shape[0]
        if to_time_last:  # (b, o, i) @ (b, i, l): the product comes out time-last
            y = torch.bmm(w.expand(b, -1, -1), xc.transpose(1, 2))  # (b, o, l)
            if bias is not None:
                y = y + bias.to(dtype)[:, None]
        else:  # (b, l, i) @ (b, i, o): the product comes out time-first
            y = torch.bmm(xc.transpose(1, 2), w.t().expand(b, -1, -1))  # (b, l, o)
            if bias is not None:
                y = y + bias.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.to_time_last, ctx.has_bias = to_time_last, bias is not None
        ctx.dtypes = x.dtype, weight.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, w = ctx.saved_tensors
        x_dtype, w_dtype, bias_dtype = ctx.dtypes
        dy = dy.to(xc.dtype)
        b = dy.shape[0]
        acc = torch.promote_types(xc.dtype, torch.float32)  # the weight's sums: float32 at least
        dx = dw = dbias = None
        # Time-first views of the output gradient and of x, whatever their storage: (b, l, o), (b, l, i)
        dy_t = dy.transpose(1, 2) if ctx.to_time_last else dy
        x_t = xc if ctx.to_time_last else xc.transpose(1, 2)
        if ctx.needs_input_grad[0]:
            if ctx.to_time_last:  # x was time-first: (b, l, o) @ (b, o, i)
                dx = torch.bmm(dy_t, w.expand(b, -1, -1))  # (b, l, i)
            else:  # x was time-last: (b, i, o) @ (b, o, l)
                dx = torch.bmm(w.t().expand(b, -1, -1), dy_t.transpose(1, 2))  # (b, i, l)
            dx = dx.to(x_dtype)
        if ctx.needs_input_grad[1]:  # Σ over the batch of (o, l) @ (l, i)
            dw = torch.bmm(dy_t.transpose(1, 2), x_t).sum(0, dtype=acc).to(w_dtype)  # (o, i)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy_t.sum((0, 1), dtype=acc).to(bias_dtype)  # (o,)
        return dx, dw, dbias, None


def _check(x: torch.Tensor, weight: torch.Tensor, feature_dim: int, name: str) -> None:
    if x.dim() != 3 or x.shape[feature_dim] != weight.shape[1]:
        want = "(b, l, i)" if feature_dim == 2 else "(b, i, l)"
        raise ValueError(
            f"{name}: x must be {want} with i = {weight.shape[1]} (the weight's input features), "
            f"got shape {tuple(x.shape)}"
        )


def linear_to_time_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, l, i), weight (o, i), bias (o,) or None -> (b, o, l) contiguous: a Linear whose output
    is stored time-last. The gradient of x comes back (b, l, i) contiguous."""
    _check(x, weight, 2, "linear_to_time_last")
    return _Linear.apply(x, weight, bias, True)


def linear_from_time_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, i, l), time-last, weight (o, i), bias (o,) or None -> (b, l, o) contiguous: a Linear
    that reads its input time-last. The gradient of x comes back (b, i, l) contiguous."""
    _check(x, weight, 1, "linear_from_time_last")
    return _Linear.apply(x, weight, bias, False)


def to_time_last(linear: nn.Linear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """`dispatch.to_time_last`: x (b, l, i) -> (b, o, l), written time-last by the matmul.

    One token per row (a decoding step) takes the reference's plain matmul, whose result is
    time-last as it is: the batched matmul here would read the weight once per row. A LoRA adapter
    (minijamba.model.lora) adds its low-rank update to the time-last product."""
    if x.shape[1] == 1:
        return mamba.to_time_last(linear, x, bias)  # (b, o, 1), a view of (b, 1, o)
    y = linear_to_time_last(x, linear.weight, linear.bias if bias else None)  # (b, o, l)
    if isinstance(linear, LoRALinear):
        y = y.add_(rearrange(linear.delta(x), "b l o -> b o l"))  # (b, o, l): in place, so y stays time-last
    return y


def from_time_last(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`dispatch.from_time_last`: x (b, i, l) -> (b, l, o), read time-last by the matmul (one token
    per row: the plain matmul, as in `to_time_last`). A LoRA adapter's update reads x time-first."""
    if x.shape[2] == 1:
        return linear(x.transpose(1, 2))  # (b, 1, o)
    y = linear_from_time_last(x, linear.weight, linear.bias)  # (b, l, o)
    if isinstance(linear, LoRALinear):
        y = y + linear.delta(rearrange(x, "b i l -> b l i"))  # (b, l, o)
    return y
