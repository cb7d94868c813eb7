"""LoRA: fine-tune a frozen model through a low-rank update of some of its Linears (Hu et al. 2021).

Glossary:

    i   a Linear's input features       o   its output features
    r   the adapter's rank (r << i, o)  α   lora_alpha; the update is scaled by s = α / r
                                            (α / sqrt(r) with rank-stabilised LoRA, use_rslora)

A wrapped Linear computes

    y = x Wᵀ + bias  +  s · B(A(dropout(x)))          A (r, i), B (o, r)

W and the bias stay frozen; only A and B are trained. B starts at zero, so a fresh adapter leaves
the model exactly as it was; A starts as PEFT's (Kaiming-uniform), so that the first steps move B.
Dropout (lora_dropout) applies to the adapter's input only, as in PEFT. The adapter's weights are
float32 whatever the base's dtype (a bf16 base trains a float32 update); its output is cast back
to the base's output dtype. Merging folds s · B A into W, after which the Linear is a plain one.

`LoRALinear` is an `nn.Linear` (same `weight` and `bias`, so the base's state-dict names do not
change) with two more Linears, `lora_A` and `lora_B`: the names PEFT writes in its adapter files
(`...in_proj.lora_A.weight`), see minijamba.hf_adapter. Why not peft itself: importing it imports
transformers and accelerate, which neither the laptop path nor the fast path otherwise needs, and
the whole method is the few lines below. The file format is PEFT's, and tests/test_lora.py holds
our logits equal to `PeftModel.from_pretrained` on transformers' JambaForCausalLM.

Which Linears: `target_modules` as PEFT reads it. A list of names matches every Linear whose name
is one of them or ends with "." + one of them ("in_proj", or "layers.3.mamba.in_proj"); a string
is a regular expression that must match a whole module name, or "all-linear" (every Linear but the
LM head). Names are transformers' (with its
`model.` prefix: "model.layers.0.mamba.in_proj", "lm_head"). The experts are not Linears (stacked
weights, int8 in a quantized model) and stay frozen, as transformers' fused experts do under PEFT.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# AI21's LoRA recipe for Jamba (its model cards): the Mamba projections, attention, the dense MLP.
DEFAULT_TARGETS = ("in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")  # fmt: skip


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trained low-rank update (module docstring). Build with `wrap`."""

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> "LoRALinear":
        """`linear` (its own weight and bias, frozen: no copy) with a fresh rank-r adapter."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        device = linear.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)  # (r, i) float32
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)  # (o, r) float32
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if device.type != "meta":
            self.reset_adapter()
        return self

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (as nn.Linear's own), B zero: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term alone: x (..., i) -> s · B(A(dropout(x))) (..., o), in x's dtype
        (autocast's where it is on)."""
        a = self.lora_A.weight
        y = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B.weight) * self.scaling  # (..., o)
        kind = x.device.type
        return y.to(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., i) -> (..., o): the frozen Linear plus the update."""
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear whose weight is W + s · B A (in W's dtype), sharing the bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        acc = torch.promote_types(self.weight.dtype, torch.float32)  # float32 at least; float64 stays
        update = (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)) * self.scaling  # (o, i)
        out.weight = nn.Parameter((self.weight.to(acc) + update).to(self.weight.dtype), requires_grad=False)
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.r}, alpha={self.alpha:g}"


def hf_name(name: str) -> str:
    """Our module name -> transformers' (a `model.` prefix except for the LM head)."""
    return name if name == "lm_head" else f"model.{name}"


def linear_names(model: nn.Module) -> list[str]:
    """transformers' names of every Linear of the model that an adapter could wrap."""
    return [hf_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# transformers' Jamba multiplies by dt_proj.weight itself (its bias goes into the scan), so a PEFT
# adapter on dt_proj changes nothing there: it is no target here, and such tensors in an adapter
# folder are skipped (minijamba.hf_adapter), so that an adapter means the same in both.
NOT_TARGETS = ("dt_proj",)


def _matches(name: str, targets) -> bool:
    if name.rsplit(".", 1)[-1] in NOT_TARGETS:
        return False
    if targets == "all-linear":  # PEFT's shorthand: every Linear but the output layer
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[str]:
    """Our names of the Linears `targets` selects (module docstring); ValueError naming the
    Linears there are when a target matches none of them, or selects something that is not a Linear."""
    kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)} - set(NOT_TARGETS)))
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules {targets!r} is not a valid regular expression: {e}") from None
        found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(hf_name(n), targets)]
        if not found:
            raise ValueError(f"target_modules {targets!r} matches no Linear of this model: its Linears are {kinds}")
        return found
    if isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) and t for t in targets):
        targets = list(targets)
    else:
        raise ValueError(f"target_modules must be a non-empty list of module names or a regex string, got {targets!r}")
    for t in targets:
        if t.rsplit(".", 1)[-1] in NOT_TARGETS:
            raise ValueError(
                f"target module {t!r} cannot carry LoRA: transformers' Jamba multiplies by dt_proj's weight "
                "directly, so PEFT's adapter on it has no effect there; leave it out"
            )
    found, others = [], []
    for name, module in model.named_modules():
        if name and _matches(hf_name(name), targets):
            if isinstance(module, nn.Linear):
                found.append(name)
            else:
                others.append(f"{hf_name(name)} ({type(module).__name__})")
    if others:
        raise ValueError(
            f"LoRA wraps Linear layers only, and target_modules selects {', '.join(others[:4])}"
            f"{' ...' if len(others) > 4 else ''}: this model's Linears are {kinds}"
        )
    missing = [t for t in targets if not any(_matches(hf_name(n), [t]) for n in found)]
    if missing:
        raise ValueError(
            f"target module{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"do{'' if len(missing) > 1 else 'es'} not exist in this model: its Linears are {kinds} "
            "(the experts are stacked weights, not Linears, and stay frozen)"
        )
    return found


def add_lora(model: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0,
             targets=DEFAULT_TARGETS, rslora: bool = False) -> list[str]:  # fmt: skip
    """Freeze every parameter of `model` and wrap the Linears `targets` selects with a rank-r
    adapter (alpha: default 2r, dropout on the adapter's input). In place; returns our names of the
    wrapped Linears. Only the adapters' A and B then require a gradient."""
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"the LoRA rank must be an integer >= 1, got {r!r}")
    alpha = 2.0 * r if alpha is None else alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora_) before adding others")
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, LoRALinear.wrap(getattr(owner, attr), r, float(alpha), float(dropout), rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Our name -> LoRALinear, for every adapter of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B weights: what a LoRA fine-tune trains."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (W + s · B A), leaving plain Linears. In place; returns it."""
    for name, module in lora_modules(model).items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module.merged())
    return model
