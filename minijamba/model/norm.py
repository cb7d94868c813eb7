"""RMSNorm, the only normalisation in Jamba: before each mixer and MLP, at the end, and on Δ, B, C.

Glossary: ... (any leading dims), h the normalised (last) dimension.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in float32 and cast back before the weight
    (the order transformers' JambaRMSNorm uses, so that logits match it bit for bit in float32)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., h)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
