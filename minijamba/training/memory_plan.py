"""Memory planning for training: what a training step will hold, computed before anything is built.

Glossary as in minijamba.inference.memory_plan (b batch, l sequence length, h model width, f MLP
width, d Mamba inner width, n SSM state size, q, g, e heads and head size, K experts per token, V
vocabulary), and x the bytes of one activation value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minijamba.inference.memory_plan import GiB, DoesNotFit
from minijamba.model.config import JambaConfig, count_layers


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
