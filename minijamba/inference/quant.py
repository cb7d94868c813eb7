"""int8 weight-only experts: how all 52B parameters of Jamba-v0.1 fit one 80GB GPU.

Glossary:

    t   tokens (batch and sequence flattened)
    h   model width
    f   hidden width of an expert (intermediate_size)
    E   experts in the layer
    K   experts each token goes to
    o   output channels of one projection (2f for gate_up, h for down)
    i   input channels of one projection (h for gate_up, f for down)

Why only the experts. Jamba-v0.1 has 51.6B parameters and 45.1B of them are the MoE experts. In
bf16 they alone take 90 GB; in int8 they take 45 GB, and with the 6.5B other parameters in bf16
(13 GB) the model is about 58 GB. The Mamba layers are never quantized (AI21's advice: their
recurrence is sensitive to small errors that add up over the context); attention, the router, the
norms, the embedding and the LM head stay in bf16 too: together they are a small part of the bytes.

The scheme: symmetric, per output channel. Row r of a weight W (o, i) is stored as int8 q_r and one
scale s_r = max|W_r| / 127, with W_r ≈ s_r q_r (round to nearest; error at most s_r / 2 per
weight). Because the scale belongs to the output channel, it factors out of the matmul:

    x W_rᵀ ≈ s_r (x q_rᵀ)

so an expert runs as an ordinary matmul against q cast to the activation dtype (exact: every int8
value is a bf16 value) followed by one multiply of the output by s. Only the experts that received
tokens are cast, one at a time, so the extra memory is one expert's weights in 16 bits. On a GPU the
same grouped matmul runs as one Triton kernel that reads each int8 weight once and dequantizes it in
registers (`minijamba.kernels.int8_matmul`, chosen by `int8_kernel`): a decoding step then reads the chosen
experts' bytes once instead of moving five bytes per weight. A long prefill, bound by arithmetic
rather than bytes, instead dequantizes the experts (with their scales) into bf16 and runs one grouped
GEMM (`minijamba.kernels.int8_dequant`).

torchao (pytorch/ao) was considered first, as the issue asks: its `Int8WeightOnlyConfig` stores a
weight as an `Int8Tensor` subclass whose linear is the same cast-matmul-scale as here (it relies on
torch.compile to fuse the cast), handles 3D expert weights only by selecting one expert at a time,
and has no grouped matmul for int8 weights; it also ships compiled extensions tied to one torch
version. It would add a dependency without doing anything more, so the reference is this plain
PyTorch module, and the faster kernel plugs in at one place, `grouped_int8_linear`.

`Int8Experts` has the same forward signature and the same `expert(i, x)` as `minijamba.model.moe.Experts`,
so `SparseMoE.experts` simply *is* an `Int8Experts` in a quantized model: the MoE code has no branch.
Its forward always sorts the tokens by expert (minijamba.kernels.moe_dispatch), whatever the
backend: it exists to run a full-size model, and a loop over experts would cast each one anyway.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.model.config import JambaConfig
from minijamba.kernels import INSTALLED
from minijamba.kernels.moe_dispatch import combine, gather_rows, sort_by_expert
from minijamba.model.moe import Experts, SparseMoE

QUANTIZE_MODES = (None, "int8")
KERNEL_ENV = "MINIJAMBA_INT8_KERNEL"  # 'reference', 'triton' or 'dequant' (see int8_kernel)
INT8_KERNELS = ("reference", "triton", "dequant")
# Rows per expert (on average) from which a GPU dequantizes the experts into bf16 and runs one
# grouped GEMM (minijamba.kernels.int8_dequant) instead of the fused Triton kernel: a prefill's
# matmuls are bound by arithmetic, and there the bf16 grouped GEMM beats our int8 kernel while the
# one pass over the weights costs the same at any row count. On an H100 the twin is ahead from 1024
# rows (8K tokens in one call, by 7%), but its dequantized group (3.7 GiB for Jamba-v0.1) would cost
# serving at 8K-token prefill chunks a seventh of its slots; from 2048 rows (16K tokens) it is 11-16%
# ahead and taken. Measured with bench/gpu_serving.py --parts prefill (bench/RESULTS.md, "int8 prefill").
LARGE_ROWS = 2048


def check_quantize(quantize) -> None:
    """Raise ValueError unless `quantize` is None or one of the supported modes."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"unknown quantize={quantize!r}: choose None (no quantization) or 'int8' (int8 experts)"
        )


def _sizes(experts) -> SimpleNamespace:
    """The config fields `Experts` and `Int8Experts` read, from an existing experts module (the
    backend: the default)."""
    E, two_f, h = experts.gate_up_proj.shape
    return SimpleNamespace(num_experts=E, hidden_size=h, intermediate_size=two_f // 2, scan_backend=None)


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel). w (..., o, i) -> q (..., o, i) int8, scale (..., o) float32.

    w ≈ scale[..., None] * q, with |error| <= scale / 2. A row of zeros gets scale 1 (and q = 0)."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1)  # (..., o)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Experts(nn.Module):
    """n SwiGLU experts with int8 weights and one float32 scale per output channel.

    Same layout and names as `Experts`: gate_up_proj (E, 2f, h) = [gate; up] and down_proj (E, h, f),
    here int8 (parameters that never require a gradient, so parameter counts stay the same), with
    gate_up_scale (E, 2f) and down_scale (E, h) beside them. Frozen: the forward is differentiable
    in its input (a LoRA fine-tune trains the layers around it), never in its weights.
    """

    def __init__(self, config: JambaConfig, device=None):
        super().__init__()
        E, h, f = config.num_experts, config.hidden_size, config.intermediate_size  # all it reads
        int8 = dict(dtype=torch.int8, device=device)
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * f, h, **int8), requires_grad=False)  # (E, 2f, h)
        self.down_proj = nn.Parameter(torch.zeros(E, h, f, **int8), requires_grad=False)  # (E, h, f)
        self.register_buffer("gate_up_scale", torch.ones(E, 2 * f, device=device))  # (E, 2f) float32
        self.register_buffer("down_scale", torch.ones(E, h, device=device))  # (E, h) float32

    # --- building -----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts) -> "Int8Experts":
        """Quantize a float `Experts`, one expert at a time (no second full-size float copy)."""
        out = cls(_sizes(experts), device=experts.gate_up_proj.device)
        for i in range(experts.gate_up_proj.shape[0]):
            out.set_expert(i, experts.gate_up_proj[i], experts.down_proj[i])
        return out

    @torch.no_grad()
    def set_expert(self, i: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize expert i's float weights into slot i: gate_up (2f, h) = [gate; up], down (h, f).

        For loaders that see one expert's tensors at a time (checkpoint shards, random init)."""
        for name, w in (("gate_up", gate_up), ("down", down)):
            target = getattr(self, f"{name}_proj")
            if tuple(w.shape) != tuple(target.shape[1:]):
                raise ValueError(
                    f"expert {i}: {name}_proj has shape {tuple(w.shape)}, expected {tuple(target.shape[1:])}"
                )
            q, scale = quantize_rows(w.to(target.device))
            target[i].copy_(q)
            getattr(self, f"{name}_scale")[i].copy_(scale)

    @torch.no_grad()
    def load_rows_(self, name: str, index: tuple, w: torch.Tensor) -> None:
        """Quantize float rows `w` into `self.<name>[index]` and their scales into the matching scale.

        name: 'gate_up_proj' or 'down_proj'; index: () for all experts (w (E, o, i), quantized one
        expert at a time), (j,) for expert j, or (j, rows) for some of its rows. Scales are per row,
        so a checkpoint's gate and up halves (or any rows) quantize on their own, as they arrive."""
        target, scale = getattr(self, name), getattr(self, name.replace("_proj", "_scale"))
        if index == ():
            for j in range(target.shape[0]):
                self.load_rows_(name, (j,), w[j])
            return
        q, s = quantize_rows(w.to(target.device))
        target[index] = q
        scale[index] = s

    def dequantized(self, name: str, index: tuple = (), dtype=torch.float32) -> torch.Tensor:
        """The float weights of `self.<name>[index]` (for writing a float checkpoint)."""
        scale = getattr(self, name.replace("_proj", "_scale"))
        return (getattr(self, name)[index].to(torch.float32) * scale[index][..., None]).to(dtype)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        """Normal(0, std) gate/up and Normal(0, out_std) down weights, drawn in float32 and quantized
        one expert at a time, in the same order as a float `Experts` drawn expert by expert."""
        for i in range(self.gate_up_proj.shape[0]):
            device = self.gate_up_proj.device
            gate_up = torch.empty(self.gate_up_proj.shape[1:], device=device).normal_(0, std)
            down = torch.empty(self.down_proj.shape[1:], device=device).normal_(0, out_std)
            self.set_expert(i, gate_up, down)

    def dequantize(self) -> Experts:
        """A float32 `Experts` with the dequantized weights (for tests and inspection)."""
        out = Experts(_sizes(self)).to(self.gate_up_proj.device)
        with torch.no_grad():
            out.gate_up_proj.copy_(self.gate_up_proj.float() * self.gate_up_scale[..., None])
            out.down_proj.copy_(self.down_proj.float() * self.down_scale[..., None])
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        """Accept a float checkpoint too: float gate_up_proj/down_proj without scales are quantized
        here, instead of being silently cast to int8 by `load_state_dict`."""
        for name in ("gate_up", "down"):
            key, scale_key = f"{prefix}{name}_proj", f"{prefix}{name}_scale"
            if key in state_dict and state_dict[key].is_floating_point() and scale_key not in state_dict:
                state_dict[key], state_dict[scale_key] = quantize_rows(state_dict[key])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    # --- running ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert i on its tokens x (t_i, h) -> (t_i, h): cast-matmul-scale, twice."""
        gate_up = F.linear(x, self.gate_up_proj[i].to(x.dtype)) * self.gate_up_scale[i].to(
            x.dtype
        )  # (t_i, 2f)
        gate, up = gate_up.chunk(2, dim=-1)  # (t_i, f) each
        return F.linear(F.silu(gate) * up, self.down_proj[i].to(x.dtype)) * self.down_scale[i].to(x.dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (t, h), weights and experts (t, K) -> (t, h). Tokens sorted by expert as in `Experts`,
        then one grouped int8 matmul per projection (`grouped_int8_linear`)."""
        order, place, ends = sort_by_expert(experts, self.gate_up_proj.shape[0])
        xs = gather_rows(x, order, place, experts.shape[1])  # (t*K, h), expert 0's tokens, then 1's, ...
        gate, up = grouped_int8_linear(xs, self.gate_up_proj, self.gate_up_scale, ends).chunk(2, dim=-1)
        ys = grouped_int8_linear(F.silu(gate) * up, self.down_proj, self.down_scale, ends)  # (t*K, h)
        return combine(ys, order, place, weights).to(x.dtype)


def grouped_int8_linear_reference(x, q, scale, ends) -> torch.Tensor:
    """Rows x[ends[j-1]:ends[j]] times (scale[j] * q[j])ᵀ for every expert j. x (t*K, i); q (E, o, i)
    int8; scale (E, o); ends (E,) -> (t*K, o). Each expert that has rows is cast to x's dtype (in
    memory, one at a time) and runs one matmul; its output is scaled per channel."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # rows per expert (a host sync)
    out = [
        F.linear(xi, q[e].to(x.dtype)) * scale[e].to(x.dtype)
        for e, xi in enumerate(x.split(sizes))
        if len(xi)
    ]
    return torch.cat(out) if out else x.new_zeros(0, q.shape[1])


def int8_kernel(x: torch.Tensor, experts: int = 1) -> str:
    """Which grouped int8 matmul runs on x (rows for `experts` experts): $MINIJAMBA_INT8_KERNEL
    (one of INT8_KERNELS) if set. Else, for CUDA tensors: below LARGE_ROWS rows per expert (decoding,
    short prompts) 'triton' when Triton is installed; from there 'dequant' for bf16 x (the dtype of
    CUDA's grouped GEMM); else, and on the CPU, 'reference'."""
    name = os.environ.get(KERNEL_ENV)
    if name is None:
        if not x.is_cuda:
            return "reference"
        if x.shape[0] < LARGE_ROWS * experts:
            return "triton" if INSTALLED["triton"] else "reference"  # (looked up once: compile-safe)
        return "dequant" if x.dtype == torch.bfloat16 else "reference"
    if name not in INT8_KERNELS:
        raise ValueError(f"${KERNEL_ENV}={name!r}: choose one of {', '.join(map(repr, INT8_KERNELS))}")
    return name


def grouped_int8_linear(x, q, scale, ends) -> torch.Tensor:
    """The one dispatch point for the experts' int8 matmul (see `int8_kernel`); the twins have
    this signature and the tests hold them equal. Differentiable in x (LoRA fine-tuning trains
    through frozen int8 experts): see `_GroupedInt8Linear`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GroupedInt8Linear.apply(x, q, scale, ends)
    return _grouped_int8_forward(x, q, scale, ends)


def _grouped_int8_forward(x, q, scale, ends) -> torch.Tensor:
    kernel = int8_kernel(x, q.shape[0])
    if kernel == "triton":
        from minijamba.kernels.int8_matmul import grouped_int8_linear as fast  # lazily: optional package

        return fast(x, q, scale, ends)
    if kernel == "dequant":
        from minijamba.kernels.int8_dequant import grouped_int8_linear_dequantized

        return grouped_int8_linear_dequantized(x, q, scale, ends)
    return grouped_int8_linear_reference(x, q, scale, ends)


def grouped_int8_linear_input_grad(dy, q, scale, ends) -> torch.Tensor:
    """The gradient of `grouped_int8_linear` with respect to x: dy (t*K, o) -> (t*K, i), rows of
    expert j times scale[j] * q[j] (since y = (x q[j]ᵀ) * scale[j]). Each expert that has rows is
    cast to dy's dtype (in memory, one at a time: the dequantized weights) for one matmul."""
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # rows per expert (a host sync)
    out = [
        (gi * scale[e].to(gi.dtype)) @ q[e].to(gi.dtype)  # (t_j, o) @ (o, i)
        for e, gi in enumerate(dy.split(sizes))
        if len(gi)
    ]
    return torch.cat(out) if out else dy.new_zeros(0, q.shape[2])


class _GroupedInt8Linear(torch.autograd.Function):
    """`grouped_int8_linear` with a backward for x only. The int8 weights are frozen (no weight
    gradient is taken), and nothing but references to them is saved: a plain autograd graph of the
    reference would keep every expert's 16-bit cast for the backward, twice the int8 bytes."""

    @staticmethod
    def forward(ctx, x, q, scale, ends):
        ctx.save_for_backward(q, scale, ends)
        ctx.x_dtype = x.dtype
        return _grouped_int8_forward(x, q, scale, ends)

    @staticmethod
    def backward(ctx, dy):
        q, scale, ends = ctx.saved_tensors
        return grouped_int8_linear_input_grad(dy, q, scale, ends).to(ctx.x_dtype), None, None, None


@torch.no_grad()
def quantize_model_(model, quantize="int8"):
    """Replace the experts of every MoE layer by `Int8Experts`, in place, one layer at a time (so at
    most one layer's experts exist twice). Everything else, Mamba layers included, is untouched.
    Returns the model."""
    check_quantize(quantize)
    if quantize is None:
        return model
    for module in model.modules():
        if isinstance(module, SparseMoE) and isinstance(module.experts, Experts):
            module.experts = Int8Experts.from_experts(module.experts)
    return model
