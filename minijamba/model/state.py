"""The inference state: what a Jamba model remembers between calls while it generates.

Glossary:

    b   batch
    s   capacity of the KV cache, in tokens (prompt + everything generated)
    g   key/value heads
    e   head size (hidden_size / heads)
    d   Mamba inner width
    n   SSM state size
    k   width of the Mamba convolution

An attention layer keeps every key and value it has seen: (b, g, s, e) each, growing with the context.
A Mamba layer keeps a fixed-size summary whatever the context: the last k-1 convolution inputs
(b, d, k-1) and the SSM state h (b, d, n) in float32 (float64 for a float64 model). This is the
paper's memory argument (Table 1): with one attention layer in eight, Jamba's cache is a fraction of
a transformer's of the same size.

All buffers are allocated once, up front, for `capacity` tokens, so that `nbytes()` is what the
state really occupies and the memory plan can be computed before anything runs (`plan_nbytes`).
`valid` records which positions hold real tokens (False for left padding), for the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minijamba.model.config import JambaConfig


@dataclass
class KVCache:
    """Keys and values of one attention layer: (b, g, s, e) each, filled up to `InferenceState.length`."""

    k: torch.Tensor
    v: torch.Tensor

    def update(self, k: torch.Tensor, v: torch.Tensor, state: "InferenceState"):
        """Write this call's l keys and values (b, g, l, e) at the positions `state.advance` just
        counted, and return all of them so far, (b, g, s, e) each in k's dtype, with None: the new
        tokens are the last l of the s, and attention masks causally (a graph-ready cache,
        minijamba.inference.cuda_graph, returns its own (b, 1, l, s) mask instead)."""
        end = state.length  # keys are positions [0, end)
        start = end - k.shape[2]  # the new tokens sit at [start, end)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        # under bf16 autocast the queries are bf16 while the cache keeps the model's dtype
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype), None


@dataclass
class MambaState:
    """The recurrent state of one Mamba layer: conv inputs (b, d, k-1) and SSM state h (b, d, n)."""

    conv: torch.Tensor
    ssm: torch.Tensor


def _layer_shapes(config: JambaConfig, batch_size: int, capacity: int) -> list[dict[str, tuple]]:
    b, g, e = batch_size, config.num_key_value_heads, config.head_dim
    d, n, k = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv
    shapes = []
    for kind in config.layer_types:
        if kind == "attention":
            shapes.append({"k": (b, g, capacity, e), "v": (b, g, capacity, e)})
        else:
            shapes.append({"conv": (b, d, k - 1), "ssm": (b, d, n)})
    return shapes


def _ssm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state never accumulates in 16 bits: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def plan_nbytes(config: JambaConfig, batch_size: int, capacity: int, dtype=torch.bfloat16) -> dict[str, int]:
    """Bytes an `InferenceState` of this size will occupy, computed without allocating it.

    KV cache and conv state are in `dtype`; the SSM state is float32 (float64 if `dtype` is).
    """
    size = torch.empty((), dtype=dtype).element_size()
    out = {"kv_cache": 0, "conv_state": 0, "ssm_state": 0}
    for shapes in _layer_shapes(config, batch_size, capacity):
        for name, shape in shapes.items():
            numel = 1
            for s in shape:
                numel *= s
            if name in ("k", "v"):
                out["kv_cache"] += numel * size
            elif name == "conv":
                out["conv_state"] += numel * size
            else:
                out["ssm_state"] += numel * _ssm_dtype(dtype).itemsize
    out["total"] = sum(out.values())
    return out


class InferenceState:
    """KV caches and Mamba states for every layer of one model, for `batch_size` sequences of up to
    `capacity` tokens. The model fills it in place as it runs; `length` counts the tokens seen."""

    def __init__(self, config: JambaConfig, batch_size: int, capacity: int, device=None, dtype=torch.float32):
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(f"InferenceState needs batch_size and capacity > 0, got {batch_size}, {capacity}")
        self.capacity = capacity
        self.length = 0
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (b, s)
        self.padded = False  # whether any position seen so far is padding (attention then needs a mask)
        self.layers: list[KVCache | MambaState] = []
        for shapes in _layer_shapes(config, batch_size, capacity):
            if "k" in shapes:
                self.layers.append(
                    KVCache(*(torch.zeros(shapes[x], device=device, dtype=dtype) for x in ("k", "v")))
                )
            else:
                conv = torch.zeros(shapes["conv"], device=device, dtype=dtype)
                ssm = torch.zeros(shapes["ssm"], device=device, dtype=_ssm_dtype(dtype))
                self.layers.append(MambaState(conv, ssm))

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def row(self, i: int) -> "InferenceState":
        """Row i emptied, as a state of its own for one sequence: its buffers are views of this
        state's row i, so what runs on it (a prompt's prefill) fills row i here. Its length starts
        at 0. This is how a serving loop starts a new sequence in a free row while the others go on."""
        if not 0 <= i < self.batch_size:
            raise ValueError(f"row {i} is not in this state's batch of {self.batch_size}")
        one = object.__new__(InferenceState)
        one.capacity, one.length, one.padded = self.capacity, 0, False
        one.valid = self.valid[i : i + 1]  # (1, s)
        one.valid.zero_()
        one.layers = []
        for layer in self.layers:
            if isinstance(layer, KVCache):  # stale keys stay: `valid` masks them until overwritten
                one.layers.append(KVCache(layer.k[i : i + 1], layer.v[i : i + 1]))
            else:
                one.layers.append(MambaState(layer.conv[i : i + 1].zero_(), layer.ssm[i : i + 1].zero_()))
        return one

    def advance(self, mask: torch.Tensor, padding: bool | None = None) -> None:
        """Mark the next mask.shape[1] positions as seen; mask (b, l) is False at padding.
        padding: whether mask has any False, when the caller knows (None: read it from the mask,
        which waits for the device)."""
        l = mask.shape[1]
        if self.length + l > self.capacity:
            raise ValueError(
                f"the inference state holds {self.capacity} tokens and {self.length} are used: "
                f"{l} more do not fit; create it with a larger capacity"
            )
        self.valid[:, self.length : self.length + l] = mask
        self.length += l
        if not self.padded and (padding if padding is not None else not bool(mask.all())):
            self.padded = True

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by kind: kv_cache, conv_state, ssm_state, and the total."""
        out = {"kv_cache": 0, "conv_state": 0, "ssm_state": 0}
        for layer in self.layers:
            if isinstance(layer, KVCache):
                out["kv_cache"] += layer.k.nbytes + layer.v.nbytes
            else:
                out["conv_state"] += layer.conv.nbytes
                out["ssm_state"] += layer.ssm.nbytes
        out["total"] = sum(out.values())
        return out
