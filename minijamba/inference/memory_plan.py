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
                  t K (3 h + 4 f) x; int8 experts add one expert's weights cast to x: 3 f h x
    mlp           gate, up, SiLU(gate) and the product: 4 t f x
    logits        the last position's logits, b V x, and a float32 copy: 4 b V

`check` compares the total with the memory the device has and raises `DoesNotFit` with the
largest context that would fit, instead of an out-of-memory error halfway through a prefill.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from minijamba.kernels import ENV_VAR
from minijamba.model.config import JambaConfig, count_layers
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
        out["moe"] = t * K * (3 * h + 4 * f) * x + (3 * f * h * x if quantize else 0)
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

    lo, hi = 0, limit
    while lo < hi:  # the largest s that fits; plans grow with s
        mid = (lo + hi + 1) // 2
        if with_context(p, mid).total <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
        hint = "even the weights do not fit: use quantize='int8' (--int8-experts) or a smaller model"
    raise DoesNotFit(
        f"this run needs {p.total / GiB:.2f} GiB (weights {p.weights_total / GiB:.2f}, state "
        f"{p.state['total'] / GiB:.2f}, activations {p.activations_peak / GiB:.2f}) but the device has "
        f"{available / GiB:.2f} GiB free: {hint}",
        best,
    )


# --- training ---------------------------------------------------------------------------------
# What a training step holds, planned from the config's sizes by arithmetic before anything (even a
# meta-device model) is built. An estimate, not a measurement (on a CPU it came within 15% below the
# resident memory a step of the tiny preset added, batch 8 to 96; allocator slack is not in it):
#
#     state         per parameter: the weights, their gradients and AdamW's two moments, 16 bytes in
#                   float32 (8 with --weights bf16), shared by the processes (FSDP2 shards them)
#     activations   per token, what backward keeps of each layer (x bytes per value: 4 in float32, 2
#                   in bf16: bf16 weights, or autocast on a GPU), summed over the layers, all alive at once:
#                     norms and residual   4 h                  (two RMSNorms' inputs and outputs)
#                     mamba                10 d + 3 (r + 2 n)   (in_proj's two halves, the conv and its
#                                                               SiLU, Δ, the scan's saved inputs, the gate)
#                     attention            2 h + 2 g e + q      (q, k, v, the output, the softmax's log-sum)
#                     moe                  K (2 h + 4 f) + 2 n  (K copies of the token, gate/up, SiLU and
#                                                               product, the experts' outputs; router)
#                     mlp                  4 f + h
#                   plus the logits: float32 logits, their log-softmax and their gradient, 12 V bytes;
#                   plus, with the reference scan (differentiated by autograd), what autograd keeps
#                   of its odd/even scan: about 9 float32 (b, l, d, n) tensors per Mamba layer
#                   (Ā, ΔBu, the states and the scan's levels; measured: 1.03 GiB for the tiny
#                   preset's 7 Mamba layers at batch 8 x 128);
#                   or, with the cpu backend's scan (its hand-written backward, on a CPU), the float32
#                   state at the start of each chunk of T steps that its backward restarts from, (b, l/T, n, d) per Mamba layer,
#                   where T shrinks as the batch grows (`minijamba.model.ssm.CHUNK_BYTES`): at large batches
#                   T = 1 and this is the whole (b, l, n, d) state. With activation checkpointing each
#                   layer keeps only its input, h x, and one layer's full set is alive while it is
#                   recomputed.
#     data          the validation set the task builds (its own estimate: `val_nbytes`)
#
# `check_training` compares the total with the device's memory (`runtime.total_memory`: the GPU's,
# or the machine's RAM) and refuses with the largest batch that would fit.


@dataclass
class TrainingPlan:
    """Bytes of one training process, by part (see above), for a global batch of `batch` sequences."""

    config: JambaConfig
    batch: int  # global batch: sequences per step over all processes
    seq_len: int
    weights: str  # "fp32" or "bf16"
    world: int
    checkpoint_activations: bool
    chunked_scan: bool  # the cpu backend's scan on a CPU, which keeps a state per chunk (see above)
    value_bytes: int  # x: 4 for float32 activations, 2 for bf16 (bf16 weights, or autocast on a GPU)
    data_per_sequence: int  # validation data per sequence of the batch
    autograd_scan: bool = False  # the reference scan, whose levels autograd keeps (see above)
    parameters: int = 0
    state: int = 0  # weights, gradients and AdamW's moments, this process's shard
    activations: int = 0  # this process's rows

    @property
    def rows(self) -> int:
        """Sequences of the batch this process runs."""
        return -(-self.batch // self.world)

    @property
    def data(self) -> int:
        return self.batch * self.data_per_sequence  # every process builds the whole validation set

    @property
    def total(self) -> int:
        return self.state + self.activations + self.data

    def with_batch(self, batch: int) -> "TrainingPlan":
        p = dataclasses.replace(self, batch=batch)
        p.activations = training_activation_bytes(p.config, p.rows, p.seq_len, p.value_bytes,
                                                  p.checkpoint_activations, p.chunked_scan, p.autograd_scan)  # fmt: skip
        return p


def training_activation_bytes(
    config: JambaConfig, rows: int, seq_len: int, x: int = 4, checkpoint: bool = False,
    chunked_scan: bool = False, autograd_scan: bool = False,
) -> int:  # fmt: skip
    """The activations backward keeps for a batch of `rows` x `seq_len` tokens (see above), in bytes."""
    c = config
    h, f, d, n, r = c.hidden_size, c.intermediate_size, c.mamba_inner_size, c.mamba_d_state, c.mamba_dt_rank
    q, g, e, K, V, L = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_experts_per_tok,
                        c.vocab_size, c.num_hidden_layers)  # fmt: skip
    attention_layers = count_layers(L, c.attn_layer_period, c.attn_layer_offset)
    moe_layers = count_layers(L, c.expert_layer_period, c.expert_layer_offset) if c.num_experts > 1 else 0
    mamba_layers = L - attention_layers
    mixer = {"attention": 2 * h + 2 * g * e + q, "mamba": 10 * d + 3 * (r + 2 * n)}
    mlp = {"moe": K * (2 * h + 4 * f) + 2 * c.num_experts, "mlp": 4 * f + h}
    per_token = (
        L * 4 * h
        + attention_layers * mixer["attention"] + mamba_layers * mixer["mamba"]
        + moe_layers * mlp["moe"] + (L - moe_layers) * mlp["mlp"]
    )  # fmt: skip
    kept_layers = mamba_layers
    if checkpoint:  # each layer's input, plus one layer (the largest kind) while it is recomputed
        mixers = [mixer["attention"]] * (attention_layers > 0) + [mixer["mamba"]] * (mamba_layers > 0)
        mlps = [mlp["moe"]] * (moe_layers > 0) + [mlp["mlp"]] * (moe_layers < L)
        per_token = L * h + 4 * h + max(mixers) + max(mlps)
        kept_layers = min(mamba_layers, 1)
    tokens = rows * seq_len
    out = tokens * (per_token * x + 12 * V)
    if chunked_scan and mamba_layers:
        from minijamba.model.ssm import CHUNK_BYTES

        T = max(1, min(seq_len, CHUNK_BYTES // (4 * rows * d * n)))
        out += (kept_layers + 1) * rows * -(-seq_len // T) * n * d * 4  # the last one: its stacking copy
    if autograd_scan and mamba_layers:
        out += kept_layers * 9 * tokens * d * n * 4
    return out


def training_plan(
    config: JambaConfig, batch: int, seq_len: int, weights: str = "fp32", world: int = 1,
    checkpoint_activations: bool = False, data_per_sequence: int = 0, chunked_scan: bool = False,
    bf16_activations: bool | None = None, autograd_scan: bool = False,
) -> TrainingPlan:  # fmt: skip
    """The memory plan of training `config` on batches of `batch` x `seq_len` tokens (see above).
    chunked_scan: the Mamba layers run the cpu backend's scan on a CPU; autograd_scan: the
    reference scan. bf16_activations: under bf16 (autocast on a GPU, or bf16 weights); None: only
    with bf16 weights."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"training memory plan: {name} must be a positive integer, got {value!r}")
    params = config.num_parameters()
    per_param = 8 if weights == "bf16" else 16
    bf16 = weights == "bf16" if bf16_activations is None else bf16_activations
    p = TrainingPlan(config, batch, seq_len, weights, world, checkpoint_activations, chunked_scan,
                     2 if bf16 else 4, data_per_sequence, autograd_scan, params, -(-per_param * params // world))  # fmt: skip
    return p.with_batch(batch)


def largest_batch(p: TrainingPlan, available: int) -> int:
    """The largest global batch (a multiple of the processes) whose plan fits in `available`; 0 if none."""
    lo, hi = 0, p.batch // p.world  # in units of `world` sequences
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if p.with_batch(mid * p.world).total <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo * p.world


def check_training(p: TrainingPlan, available: int | None, where: str = "the device") -> None:
    """Raise `DoesNotFit` (a ValueError) when the plan needs more than `available` bytes (None:
    unknown, nothing is refused), naming the flag to change and, where one fits, the largest
    --batch-size."""
    if available is None or p.total <= available:
        return
    need = (
        f"this run needs about {p.total / GiB:,.2f} GiB (an estimate: {p.parameters:,} parameters with "
        f"AdamW {p.state / GiB:,.2f} GiB, activations of --batch-size {p.batch:,} x {p.seq_len:,} tokens "
        f"{p.activations / GiB:,.2f} GiB"
        + (f", validation data {p.data / GiB:,.2f} GiB" if p.data > p.total // 100 else "")
        + f") and {where} has {available / GiB:,.2f} GiB"
    )
    if p.state > available:
        raise DoesNotFit(f"{need}: the model alone does not fit; choose a smaller --preset or --override "
                         "smaller sizes", 0)  # fmt: skip
    best = largest_batch(p, available)
    if best:
        hint = f"the largest --batch-size that fits is {best:,}"
    elif p.state + p.with_batch(p.world).activations <= available:  # batch 1 fits, its validation set not
        hint = "not even --batch-size 1 with this validation set: lower --eval-batches"
    else:
        hint = "not even --batch-size 1: a shorter --seq-len, --checkpoint-activations, or a smaller model"
    raise DoesNotFit(f"{need}: {hint}", best)
