"""The Mamba mixer as Jamba uses it: a selective state-space layer with RMSNorm on Δ, B and C.

Glossary (the Mamba paper's symbols):

    b   batch
    l   sequence length (L)
    h   model width (hidden_size)
    d   inner width, mamba_expand * h (D in the paper)
    n   state size per channel (N)
    r   rank of the Δ projection (dt_rank)
    k   width of the causal convolution (d_conv)

Data flow, for input x (b, l, h):

    in_proj         x -> (xs, z)                       two (b, d, l) streams: the signal and the gate
    conv1d + SiLU   xs -> u                            depthwise causal conv over time, width k
                                                       (`causal_conv1d`, through the dispatch point)
    x_proj          u -> (Δ_low, B, C)                 (b, l, r), (b, l, n), (b, l, n)
    RMSNorm         Δ_low, B, C each normalised        Jamba's addition (paper section 6.4): without
                                                       it, large-scale training showed loss spikes
    dt_proj         Δ_low -> Δ (b, d, l)               the bias is added inside the scan, with softplus
    scan            y = SSM(Δ, A, B, C)(u) + D u        A = -exp(A_log); see minijamba.model.ssm
    gate            y * SiLU(z)
    out_proj        y -> (b, l, h)

Between in_proj and out_proj every stream is time-last, (b, d, l) and (b, n, l), the layout the
conv and the scan read. The projections into and out of it are primitives of the dispatch point
(`to_time_last`, `from_time_last` below: a plain Linear and a rearrange); the fast side's twins
write and read the layout inside the matmul, so that no stream is copied to transpose it.

Every primitive (the scan, the decoding step, the conv, the projections) comes from
`dispatch.get(config.scan_backend)`; the layer never branches on which backend it got.

With an inference state the same path continues from where the last call stopped: the convolution
sees the last k-1 inputs of the previous call and the scan starts from the saved state h. A single
new token takes the decoding step (`selective_state_update`) instead of the scan. Padding positions
(mask False) are zeroed before the convolution and before the scan, so that they leave the conv
window and the state exactly as if they were not there.

Packed documents (seq_idx (b, l), training only): the conv window restarts at each document's
first token and the scan's state starts again from zero there (both primitives take seq_idx), so
each document gets exactly what it would get alone in its own row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minijamba.model import dispatch
from minijamba.model.config import JambaConfig
from minijamba.model.norm import RMSNorm


class MambaMixer(nn.Module):
    """Jamba's Mamba layer. Parameter names match transformers' `JambaMambaMixer`."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        h, d, n, r, k = (
            config.hidden_size, config.mamba_inner_size, config.mamba_d_state,
            config.mamba_dt_rank, config.mamba_d_conv,
        )  # fmt: skip
        self.d, self.n, self.r, self.k = d, n, r, k
        self.config = config  # config.scan_backend names the primitives' backend (minijamba.model.dispatch)
        self.in_proj = nn.Linear(h, 2 * d, bias=config.mamba_proj_bias)  # -> (xs, z)
        self.conv1d = nn.Conv1d(d, d, k, groups=d, bias=config.mamba_conv_bias)  # its weight and bias
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))  # A = -exp(A_log), kept in float32
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = nn.Linear(d, h, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, eps=config.rms_norm_eps)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, and Δ = softplus(bias) log-uniform in
        [0.001, 0.1] at the start, so that every channel starts with a useful memory length."""
        for lin, s in ((self.in_proj, std), (self.x_proj, std), (self.out_proj, out_std)):
            nn.init.normal_(lin.weight, std=s)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()
        nn.init.uniform_(self.dt_proj.weight, -self.r**-0.5, self.r**-0.5)
        dt = torch.exp(torch.empty(self.d).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.n + 1, dtype=torch.float32)).repeat(self.d, 1))
        nn.init.ones_(self.D)
        for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
            norm.reset_parameters()

    def forward(
        self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (b, l, h) -> (b, l, h).

        state: this layer's `MambaState` to continue from and update in place, or None to start
        from zero. mask: (b, l) bool, False at padding positions, or None when there is none.
        seq_idx: (b, l) int, the document of each position (packed rows, no state), or None.
        """
        b, l, _ = x.shape
        ops = dispatch.get(self.config.scan_backend)
        xs, z = ops.to_time_last(self.in_proj, x).chunk(2, dim=1)  # (b, 2d, l) -> 2 x (b, d, l): signal, gate
        if mask is not None:
            xs = xs * mask[:, None, :]  # padding must not enter the conv window

        # Depthwise causal conv + SiLU over cat(context, xs): the context is the last k-1 inputs of
        # the previous call, None (zeros) at the start of a sequence. A copy when l > 1: the conv may
        # keep it for its backward, and state.conv is overwritten below.
        context = None if state is None else state.conv.to(xs.dtype, copy=l > 1)  # (b, d, k-1)
        w = self.conv1d.weight[:, 0]  # (d, k)
        if l == 1:  # one output: a dot product per channel (F.conv1d's set-up costs ~50x more)
            if context is None:
                context = xs.new_zeros(b, self.d, self.k - 1)
            window = torch.cat([context, xs], dim=-1)  # (b, d, k)
            u = F.silu(_last_conv_output(window, w, self.conv1d.bias))  # (b, d, 1)
        else:
            u = ops.causal_conv1d(xs, w, self.conv1d.bias, context, silu=True, seq_idx=seq_idx)  # (b, d, l)
            if state is not None:  # the window's tail: cat only what the state keeps
                m = min(l, self.k - 1)  # how many of the last k-1 inputs are new
                window = torch.cat([context[:, :, m:], xs[:, :, l - m :]], dim=-1)  # (b, d, k-1)
        if state is not None:  # the last k-1 inputs of cat(context, xs), for the next call
            state.conv.copy_(window[:, :, window.shape[-1] - (self.k - 1) :])
        if mask is not None:
            u = u * mask[:, None, :]  # and must not enter the SSM state

        # Input-dependent Δ, B, C, each RMS-normalised (Jamba's change to Mamba).
        dt, B, C = torch.split(ops.from_time_last(self.x_proj, u), [self.r, self.n, self.n], -1)  # (b, l, r+2n) split
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)  # (b, l, r|n|n)
        # Δ = dt_proj(dt) time-last, (b, d, l); its bias is added inside the scan, before the softplus
        dt = ops.to_time_last(self.dt_proj, dt, bias=False)
        up = torch.promote_types(self.A_log.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        A = -torch.exp(self.A_log.to(up))  # (d, n)
        D, dt_bias = self.D.to(up), self.dt_proj.bias.to(up)

        if state is not None and l == 1:  # decoding: one step of the recurrence
            y = ops.selective_state_update(
                state.ssm, u[..., 0], dt[..., 0], A, B[:, 0], C[:, 0], D,
                z=z[..., 0], dt_bias=dt_bias, dt_softplus=True,
            )[..., None]  # (b, d, 1)  # fmt: skip
        else:  # the scan takes mamba-ssm's layout: u, dt, z (b, d, l), B and C (b, n, l)
            initial = None if state is None else state.ssm
            y, last = ops.selective_scan(
                u, dt, A, rearrange(B, "b l n -> b n l"),
                rearrange(C, "b l n -> b n l"), D, z=z, delta_bias=dt_bias, delta_softplus=True,
                return_last_state=True, initial_state=initial, seq_idx=seq_idx,
            )  # (b, d, l), (b, d, n)  # fmt: skip
            if state is not None:
                state.ssm.copy_(last)
        return ops.from_time_last(self.out_proj, y)  # (b, d, l) -> (b, l, h)


def to_time_last(linear: torch.nn.Linear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """A Linear whose output is stored time-last: x (b, l, i) -> (b, o, l), a view of its product.
    bias=False: the weight alone (the Mamba layer adds Δ's bias inside the scan)."""
    y = linear(x) if bias else F.linear(x, linear.weight)  # (b, l, o)
    return rearrange(y, "b l o -> b o l")


def from_time_last(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear that reads its input time-last: x (b, i, l) -> (b, l, o)."""
    return linear(rearrange(x, "b i l -> b l i"))


def _last_conv_output(window: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The depthwise conv's output at the last position: window (b, d, k), taps w (d, k), bias (d,)
    -> (b, d, 1). Rounded like F.conv1d (also under autocast): weights in the window's dtype,
    products summed in float32 or wider, one rounding at the end."""
    acc = torch.promote_types(window.dtype, torch.float32)
    y = (window.to(acc) * w.to(window.dtype).to(acc)).sum(-1, keepdim=True)  # (b, d, 1)
    if bias is not None:
        y = y + bias.to(window.dtype).to(acc)[:, None]
    return y.to(window.dtype)
