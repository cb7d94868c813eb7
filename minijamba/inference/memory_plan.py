"""Memory planning: what a generation run will occupy on its device, computed before anything runs.

Glossary:

    b   batch
    s   context: tokens the inference state holds (prompt + new tokens)
    c   prefill chunk: tokens per forward call (the prompt runs in chunks of c; at most the prompt)
    t   tokens in one call, b * c
    h   model width
    f   hidden width of an MLP / expert
    d   Mamba inner width
    n   SSM state size
    q   query heads; g key/value heads; e head size
    K   experts per token
    V   vocabulary size

Three parts, each exact or an honest upper estimate:

    weights       exact: the parameters and buffers of the model as built (bf16, int8 experts and
                  their float32 scales), counted on a meta-device copy, so nothing is allocated
    state         exact: KV cache at s tokens, conv and SSM state (`minijamba.model.state.plan_nbytes`,
                  equal to what `InferenceState.nbytes()` reports once allocated)
    activations   an estimate from the shapes: the residual stream of one call, plus the largest
                  live tensors of one layer at t tokens (the layer kinds run one after the other,
                  so the peak is the worst kind, not their sum), plus the logits of the last position

The activation terms, per layer kind (bytes; x is the dtype's size):

    residual      x, its normed copy and the mixer's output, (t, h) each, plus RMSNorm's float32
                  copy:  3 t h x + 4 t h
    mamba         in_proj output (t, 2d), conv input and output, Δ: 5 t d x; inside the scan the
                  float32 u, Δ, z, y: 16 t d; and the reference scan's (b, c, d, n) float32
                  tensors (exp(ΔA), ΔBu with the state folded in, the states, and the odd/even
                  scan's levels, made out of place): 6 of them, 24 t d n bytes (the cpu backend's
                  in-place scan: 4). This term dominates: 3 GiB per 1024 tokens for Jamba-v0.1. A
                  fused scan kernel (mamba-ssm, Triton) keeps the state in registers and needs none.
    attention     q, k, v and the output: (2 q e + 2 g e) t x. With padding (or with the mask path)
                  the boolean mask (b, c, s) three times, and, because PyTorch's SDPA runs
                  grouped-query attention with an explicit mask on its math kernel, the float32
                  scores and their softmax (b, q, c, s): 8 b q c s. Without padding the causal
                  kernel needs no mask and no scores (flash attention).
    moe           the K copies of each token (t K, h), expert outputs before and after the
                  concatenation, the gate/up projection (t K, 2f) and its SiLU product: about
                  t K (3 h + 4 f) x; int8 experts add one expert's weights cast to x, 3 f h x, or
                  from LARGE_ROWS rows an expert a group of dequantized experts (`int8_workspace`)
    mlp           gate, up, SiLU(gate) and the product: 4 t f x
    logits        the last position's logits, b V x, and a float32 copy: 4 b V

`check` compares the total with the memory the device has and raises `DoesNotFit` with the
largest context that would fit, instead of an out-of-memory error halfway through a prefill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from minijamba.kernels import ENV_VAR
from minijamba.model.config import JambaConfig
from minijamba.model.state import plan_nbytes

GiB = 2**30
# Float32 (b, c, d, n) tensors alive at once inside each scan backend's prefill (see above).
SCAN_STATE_TENSORS = {"reference": 6, "cpu": 4}
DEFAULT_SCAN_STATE_TENSORS = 0  # fused kernels (mamba-ssm, Triton): the state stays on chip


class DoesNotFit(ValueError):
    """The plan needs more memory than the device has. `largest_context` says what would fit."""

    def __init__(self, message: str, largest_context: int):
        super().__init__(message)
        self.largest_context = largest_context


@dataclass
class MemoryPlan:
    """Bytes by part. `weights` and `state` are exact; `activations` is an estimate (see module)."""

    config: JambaConfig
    batch: int
    context: int
    chunk: int
    dtype: torch.dtype
    quantize: str | None
    scan_backend: str
    padding: bool
    chunk_request: int | None = None  # the chunk asked for (None: the prompt in one call)
    new_tokens: int = 0  # context = prompt + new_tokens; the prompt is the longest call
    weights: dict[str, int] = field(default_factory=dict)
    state: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    serving: bool = False  # batch slots, each prompt prefilled alone (`serving_plan`)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def activations_peak(self) -> int:
        """Residual stream + the worst layer kind + logits: the layers' internals do not add up."""
        a = self.activations
        layer = max((v for k, v in a.items() if k not in ("residual", "logits")), default=0)
        return a.get("residual", 0) + layer + a.get("logits", 0)

    @property
    def total(self) -> int:
        return self.weights_total + self.state["total"] + self.activations_peak

    def __str__(self) -> str:
        # One unit for the whole table, the one that shows the total best (GiB at full scale, MiB or
        # KiB for a tiny model, whose rows would otherwise all read 0.00).
        unit, scale = next((u, 2**p) for u, p in (("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0))
                           if self.total >= 2**p or p == 0)  # fmt: skip

        def row(name, nbytes, note=""):
            return f"  {name:<28}{nbytes / scale:>10.2f} {unit}  {note}".rstrip()

        c = self.config
        lines = [
            f"memory plan: {c.describe()}, batch {self.batch}, context {self.context:,} tokens, "
            f"prefill chunk {self.chunk:,}, {str(self.dtype).replace('torch.', '')}"
            + (f", {self.quantize} experts" if self.quantize else "")
            + f", scan backend {self.scan_backend}",
            "  weights (exact)",
        ]
        lines += [row(f"  {k}", v) for k, v in self.weights.items()]
        lines += ["  inference state (exact)"]
        lines += [row(f"  {k}", v) for k, v in self.state.items() if k != "total"]
        if self.serving:
            lines += [f"  activations of one prompt's prefill ({self.chunk:,} tokens) or one step of "
                      f"{self.batch} slots, the larger (estimate)"]  # fmt: skip
        else:
            lines += [f"  activations per call of {self.batch * self.chunk:,} tokens (estimate)"]
        lines += [
            row(f"  {k}", v, "" if k in ("residual", "logits") else "(layer kind)")
            for k, v in self.activations.items()
        ]
        lines += [row("  peak", self.activations_peak, "residual + worst layer kind + logits")]
        lines += [row("total", self.total)]
        return "\n".join(lines)


def weight_bytes(config: JambaConfig, dtype=torch.bfloat16, quantize=None) -> dict[str, int]:
    """Exact bytes of the model's parameters and buffers, by part and dtype, from a meta-device build."""
    from minijamba.inference.materialize import meta_model  # lazily: materialize imports the model

    model = meta_model(config, dtype, quantize)
    out: dict[str, int] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        part = "experts" if ".experts." in f".{name}" else "other"
        if part == "experts" and name.endswith("_scale"):
            part = "expert scales"
        key = f"{part} ({str(t.dtype).replace('torch.', '')})"
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def int8_workspace(config: JambaConfig, rows: int, dtype=torch.bfloat16) -> int:
    """What int8 experts add to an MoE layer's activations for `rows` (token, expert) rows: one
    expert's weights cast to x (the reference, the fused kernel: less), or from LARGE_ROWS rows per
    expert in bf16 the dequantized group of `minijamba.kernels.int8_dequant` (counted on any device,
    though only CUDA runs it: the plan is the same for every device)."""
    from minijamba.inference.quant import LARGE_ROWS  # lazily: quant imports the model
    from minijamba.kernels.int8_dequant import workspace_bytes

    x = torch.empty((), dtype=dtype).element_size()
    E, h, f = config.num_experts, config.hidden_size, config.intermediate_size
    if dtype != torch.bfloat16 or rows < LARGE_ROWS * E:
        return 3 * f * h * x
    return max(workspace_bytes(rows, E, 2 * f, h, x), workspace_bytes(rows, E, h, f, x))


def activation_bytes(
    config: JambaConfig, batch: int, chunk: int, context: int, dtype=torch.bfloat16, quantize=None,
    scan_backend: str = "reference", padding: bool = False,
) -> dict[str, int]:  # fmt: skip
    """The estimate described in the module docstring, by term, for one call of batch * chunk tokens."""
    x = torch.empty((), dtype=dtype).element_size()
    t, b, c, s = batch * chunk, batch, chunk, context
    h, f, d, n = config.hidden_size, config.intermediate_size, config.mamba_inner_size, config.mamba_d_state
    q, g, e, K, V = (
        config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        config.num_experts_per_tok, config.vocab_size,
    )  # fmt: skip
    kinds, moe = set(config.layer_types), config.moe_layers
    out = {"residual": 3 * t * h * x + 4 * t * h}
    if "mamba" in kinds:
        scan = SCAN_STATE_TENSORS.get(scan_backend, DEFAULT_SCAN_STATE_TENSORS)
        out["mamba"] = 5 * t * d * x + 16 * t * d + scan * 4 * t * d * n
    if "attention" in kinds:
        out["attention"] = (2 * q * e + 2 * g * e) * t * x
        if padding:
            out["attention"] += 3 * b * c * s + 8 * b * q * c * s
    if any(moe):
        out["moe"] = t * K * (3 * h + 4 * f) * x + (int8_workspace(config, t * K, dtype) if quantize else 0)
    if not all(moe):
        out["mlp"] = 4 * t * f * x
    out["logits"] = b * V * x + 4 * b * V
    return out


def plan(
    config: JambaConfig, context: int, batch: int = 1, chunk: int | None = None, dtype=torch.bfloat16,
    quantize=None, scan_backend: str | None = None, padding: bool = False, new_tokens: int = 0,
) -> MemoryPlan:  # fmt: skip
    """The memory plan of generating with `context` tokens in total per sequence: a prompt of
    context - new_tokens tokens, then new_tokens more.

    chunk: prefill chunk (None: the prompt in one call). padding: whether prompts are left-padded
    (batches of different lengths), which puts attention on its masked path."""
    for name, value in (("context", context), ("batch", batch)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"memory plan: {name} must be a positive integer, got {value!r}")
    if not isinstance(new_tokens, int) or not 0 <= new_tokens < context:
        raise ValueError(f"memory plan: new_tokens must be in [0, context), got {new_tokens!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"memory plan: chunk must be a positive integer or None, got {chunk!r}")
    scan_backend = scan_backend or config.scan_backend or os.environ.get(ENV_VAR) or "reference"
    p = MemoryPlan(config, batch, context, 0, dtype, quantize, scan_backend, padding, chunk, new_tokens)
    p.weights = weight_bytes(config, dtype, quantize)
    return with_context(p, context)


def with_context(p: MemoryPlan, context: int) -> MemoryPlan:
    """The same plan at another context: a longer or shorter prompt, the same number of new tokens
    (at least one prompt token), the same chunk. The weights are reused, not recounted."""
    prompt = max(1, context - p.new_tokens)
    c = prompt if p.chunk_request is None else min(p.chunk_request, prompt)
    out = MemoryPlan(
        p.config, p.batch, context, c, p.dtype, p.quantize, p.scan_backend, p.padding, p.chunk_request,
        context - prompt, p.weights,
    )  # fmt: skip
    out.state = plan_nbytes(p.config, p.batch, context, p.dtype)
    out.activations = activation_bytes(
        p.config, p.batch, c, context, p.dtype, p.quantize, p.scan_backend, p.padding,
    )  # fmt: skip
    return out


def largest_context(p: MemoryPlan, available: int, limit: int = 2**26) -> int:
    """The largest context (same batch, chunk, dtype...) whose plan fits in `available` bytes; 0 if none."""
    return _largest(lambda s: with_context(p, s).total <= available, limit)


def _largest(fits, limit: int) -> int:
    """The largest n in [0, limit] for which fits(n), where plans grow with n (so fits holds up to
    some n and not after it); 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def serving_plan(
    config: JambaConfig, context: int, slots: int, chunk: int | None = None, dtype=torch.bfloat16,
    quantize=None, scan_backend: str | None = None,
) -> MemoryPlan:  # fmt: skip
    """The memory plan of `minijamba.inference.serving`: `slots` rows of `context` tokens each in the
    state; the activations of the larger of its two calls, one prompt's prefill (1 row, chunk tokens
    of context - 1 at most) and one decoding step of every row (slots rows, 1 token, attention over
    the masked window)."""
    return with_slots(plan(config, context, 1, chunk, dtype, quantize, scan_backend, new_tokens=1), slots)


def with_slots(prompt: MemoryPlan, slots: int) -> MemoryPlan:
    """The serving plan of `slots` slots from `prompt`, the plan of one prompt's generation (batch 1,
    one new token): its weights and its prefill's activations are reused, not recounted."""
    p = prompt
    out = MemoryPlan(
        p.config, slots, p.context, p.chunk, p.dtype, p.quantize, p.scan_backend, True, p.chunk_request, 1,
        p.weights, serving=True,
    )  # fmt: skip
    out.state = plan_nbytes(p.config, slots, p.context, p.dtype)
    step = activation_bytes(p.config, slots, 1, p.context, p.dtype, p.quantize, p.scan_backend, padding=True)
    out.activations = {k: max(p.activations.get(k, 0), step.get(k, 0)) for k in p.activations.keys() | step.keys()}
    return out


def largest_batch(config: JambaConfig, context: int, available: int, limit: int = 2**16, **kwargs) -> int:
    """The most slots of `context` tokens whose `serving_plan` fits in `available` bytes; 0 if none.
    kwargs: serving_plan's chunk, dtype, quantize and scan_backend."""
    prompt = plan(config, context, 1, new_tokens=1, **kwargs)  # the weights counted once
    return _largest(lambda n: with_slots(prompt, n).total <= available, limit)


def available_bytes(device, reserve: int = GiB) -> int:
    """Memory the device has free for this run, less `reserve` (allocator slack, kernels' workspaces).

    CUDA: the driver's free memory now (call it before building the model). CPU: MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            with open("/proc/meminfo") as fh:
                info = dict(line.split(":", 1) for line in fh)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return 2**62  # unknown: do not refuse
    return max(free - reserve, 0)


def check(p: MemoryPlan, available: int) -> None:
    """Raise `DoesNotFit` (a ValueError) naming the shortfall and the largest context that fits."""
    if p.total <= available:
        return
    best = largest_context(p, available)
    if best:
        how = "the prompt in one piece" if p.chunk_request is None else f"prefill chunk {p.chunk_request:,}"
        hint = (
            f"the largest context that fits is {best:,} tokens (with {how}; a smaller prefill chunk lowers "
            f"the activations)"
        )
    else:
        hint = _weights_hint(p, available)
    raise DoesNotFit(
        f"this run needs {p.total / GiB:.2f} GiB (weights {p.weights_total / GiB:.2f}, state "
        f"{p.state['total'] / GiB:.2f}, activations {p.activations_peak / GiB:.2f}) but the device has "
        f"{available / GiB:.2f} GiB free: {hint}",
        best,
    )


def _weights_hint(p: MemoryPlan, available: int) -> str:
    """What to do when even the weights do not fit: int8 experts if they would fit and are not used
    yet; else say that no one device holds the model, and which released shapes would fit."""
    from minijamba.model.presets import PRESETS

    int8 = sum(weight_bytes(p.config, p.dtype, "int8").values())
    if p.quantize is None and p.config.num_experts > 1 and int8 + p.state["total"] < available:
        return f"even the weights do not fit: with int8 experts (--int8-experts) they take {int8 / GiB:.1f} GiB"
    fits = []
    for name in PRESETS:
        c = JambaConfig.from_preset(name)
        need = min(sum(weight_bytes(c, p.dtype, q).values()) for q in (None, "int8"))
        if need + GiB < available and name != "tiny":
            fits.append(f"{name} ({need / GiB:.1f} GiB)")
    smallest = int8 if p.config.num_experts > 1 else p.weights_total
    return (
        f"even the weights do not fit ({smallest / GiB:.1f} GiB"
        + (" with int8 experts" if p.config.num_experts > 1 else "")
        + f", {smallest / available:.1f}x what is free): no single device holds this model, and minijamba "
        "does not split one model over several; "
        + (f"released shapes that fit: {', '.join(fits)}" if fits else "no released shape fits either")
    )
