"""The Jamba language model: embedding, a stack of pre-norm decoder layers, final norm, LM head.

Glossary:

    b   batch
    l   sequence length
    h   model width
    V   vocabulary size

Each decoder layer is one mixer (attention or Mamba) and one MLP (dense or mixture of experts),
both pre-norm with a residual around them, in this order:

    x = x + mixer(RMSNorm(x))
    x = x + mlp(RMSNorm(x))

Which mixer and which MLP layer i gets is the config's layout (`JambaConfig.layer_types` and
`moe_layers`): for Jamba-v0.1 one attention layer in each block of l = 8 (a:m = 1:7) and an MoE
MLP (n = 16, K = 2) every e = 2 layers. Module names follow transformers' `JambaForCausalLM`
without its `model.` prefix, so its state dict maps one to one (see minijamba.hf).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.model.attention import Attention
from minijamba.model.config import JambaConfig
from minijamba.model.mamba import MambaMixer
from minijamba.model.moe import MLP, SparseMoE, load_balancing_loss
from minijamba.model import reference  # noqa: F401  (registers the reference primitives)
from minijamba.model.norm import RMSNorm
from minijamba.model.state import InferenceState


# Parameters kept in float32 whatever the model's dtype: the SSM's A (as A_log), D and the Δ bias
# enter the recurrence's exponent and sum, where bf16 rounding adds up over the context; they are
# few (3 d per Mamba layer). transformers' Jamba keeps them so too.
FLOAT32_PARAMS = ("A_log", "D", "dt_proj.bias")


def keeps_float32(name: str) -> bool:
    """Whether parameter `name` stays float32 whatever the model's dtype (FLOAT32_PARAMS)."""
    return any(name == s or name.endswith("." + s) for s in FLOAT32_PARAMS)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with its parameters in `dtype`, but FLOAT32_PARAMS in float32. In place; returns it."""
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_float32(name) else dtype)
    return model


class DecoderLayer(nn.Module):
    """One pre-norm layer: a mixer (`self_attn` or `mamba`) then an MLP (`feed_forward`)."""

    def __init__(self, config: JambaConfig, index: int):
        super().__init__()
        self.kind = config.layer_type(index)  # (not layer_types[index]: a list per layer is O(L^2) in all)
        self.index = index
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.kind == "attention":
            self.self_attn = Attention(config)
        else:
            self.mamba = MambaMixer(config)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = SparseMoE(config) if config.is_moe_layer(index) else MLP(config)

    def forward(self, x, state: InferenceState | None = None, mask=None, seq_idx=None):
        """x (b, l, h) -> (b, l, h), and the MoE's routing counts (`RouterStats`; None for a dense MLP)."""
        layer_state = None if state is None else state.layers[self.index]
        if self.kind == "attention":
            x = x + self.self_attn(self.input_layernorm(x), state, mask, cache=layer_state, seq_idx=seq_idx)
        else:
            x = x + self.mamba(self.input_layernorm(x), layer_state, mask, seq_idx)
        y, routing = self.feed_forward(self.pre_ff_layernorm(x), mask)
        return x + y, routing


class Jamba(nn.Module):
    """A Jamba causal language model.

    `model(input_ids)` returns logits (b, l, V). `model(input_ids, targets=t)` returns
    `(logits, loss)`: the mean cross-entropy over targets != -100, plus
    `router_aux_loss_coef` times the load-balancing loss of the MoE layers' pooled routing, padding
    excluded, whenever that coefficient is above zero: transformers' `JambaForCausalLM` loss with
    `output_router_logits=True` (no extra flag here: the router is trained by default).
    """

    def __init__(self, config: JambaConfig):
        super().__init__()
        config.validate()  # a config changed after it was made (a NaN epsilon, a str size) stops here
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, output projections scaled down by sqrt(2 * layers)
        (GPT-2's residual scaling), Mamba's own init for A, D and Δ, norms at 1 (`init_piece_`)."""
        for _, piece in pieces(self):
            init_piece_(piece, self.config)

    def num_parameters(self, active: bool = False) -> int:
        """Parameters in total, or active per token (only K of the n experts count)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for layer in self.layers:
            if isinstance(layer.feed_forward, SparseMoE):
                ex = layer.feed_forward.experts
                n = ex.gate_up_proj.shape[0]
                per_expert = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // n
                total -= (n - self.config.num_experts_per_tok) * per_expert
        return total

    def check_finite(self, source) -> None:
        """Raise ValueError naming the first parameter or buffer that holds a NaN or an infinity
        (`source`, the file or folder the weights came from, starts the message)."""
        from minijamba.checks import check_finite

        check_finite(self.state_dict(), source)

    def new_state(self, batch_size: int, capacity: int, dtype=None) -> InferenceState:
        """An empty inference state on this model's device, for `capacity` tokens per sequence."""
        w = self.embed_tokens.weight
        return InferenceState(self.config, batch_size, capacity, device=w.device, dtype=dtype or w.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: InferenceState | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        seq_idx: torch.Tensor | None = None,
    ):
        """input_ids (b, l) -> logits (b, l, V), or (logits, loss) when targets (b, l) are given.

        state: an `InferenceState` to continue from and fill (prefill and decoding), or None.
        attention_mask: (b, l), 1 for real tokens and 0 for (left) padding, or None.
        logits_to_keep: compute logits for the last this-many positions only (0 = all).
        seq_idx: (b, l) int32, the document of each position when several are packed into one row
        (mamba-ssm's name): positions of different documents never influence each other, so each
        document gets the logits it gets alone. Training and scoring only: no state, no mask (give
        padding a document of its own). The targets' prediction across a boundary is the caller's
        to exclude (-100), as `train_tiny.py --pack` does.
        """
        b, l = input_ids.shape
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if seq_idx is not None:
            _check_seq_idx(seq_idx, input_ids, state, attention_mask)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if state is not None:
            if state.batch_size != b:
                raise ValueError(f"the inference state is for batch {state.batch_size}, input_ids has {b}")
            if mask is None:  # all real tokens: no need to look (no host sync while decoding)
                state.advance(torch.ones(b, l, dtype=torch.bool, device=input_ids.device), padding=False)
            else:
                state.advance(mask)
        x = self.embed_tokens(input_ids)  # (b, l, h)
        routing = []  # each MoE layer's RouterStats
        for layer in self.layers:
            x, stats = layer(x, state, mask, seq_idx)
            if stats is not None:
                routing.append(stats)
        x = self.final_layernorm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (b, l, V)
        if targets is None:
            return logits
        up = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        loss = F.cross_entropy(logits.to(up).flatten(0, 1), targets.flatten(), ignore_index=-100)
        if routing and self.config.router_aux_loss_coef > 0:
            loss = loss + self.config.router_aux_loss_coef * load_balancing_loss(routing)
        return logits, loss


def _check_seq_idx(seq_idx, input_ids, state, attention_mask) -> None:
    """seq_idx where it enters: (b, l) integers on input_ids' device, and only for whole rows."""
    if tuple(seq_idx.shape) != tuple(input_ids.shape):
        raise ValueError(f"seq_idx must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must hold integer document indices (int32), got dtype {seq_idx.dtype}")
    if seq_idx.device != input_ids.device:
        raise ValueError(f"seq_idx is on {seq_idx.device} but input_ids on {input_ids.device}: move it there")
    if state is not None or attention_mask is not None:
        raise ValueError(
            "seq_idx packs documents for training and scoring: it takes no inference state and no "
            "attention_mask (decode each document on its own; give padding a document index of its own)"
        )


def pieces(model: Jamba) -> list[tuple[str, nn.Module]]:
    """The model in the order it is built and initialised: embedding, each decoder layer, final
    norm, LM head (none when tied: it is the embedding)."""

    out = [("embed_tokens", model.embed_tokens)]
    out += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    out += [("final_layernorm", model.final_layernorm)]
    if not model.config.tie_word_embeddings:
        out += [("lm_head", model.lm_head)]
    return out


@torch.no_grad()
def init_piece_(module: nn.Module, config: JambaConfig) -> None:
    """Random weights for one piece (see `pieces`): normal(0, initializer_range), output projections
    at that over sqrt(2 * layers). A module with `reset_parameters(std, out_std)` initialises
    itself and what it holds (the experts one at a time, so that int8 experts are quantized as
    they are drawn); RMSNorms start at 1; the walk goes down to such modules."""
    std = config.initializer_range
    out_std = std / math.sqrt(2 * config.num_hidden_layers)
    if isinstance(module, (nn.Embedding, nn.Linear)):  # the embedding and the LM head
        nn.init.normal_(module.weight, std=std)
        return

    def walk(m: nn.Module) -> None:
        if isinstance(m, RMSNorm):
            m.reset_parameters()
        elif hasattr(m, "reset_parameters") and not isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
            m.reset_parameters(std=std, out_std=out_std)
        else:
            for child in m.children():
                walk(child)

    walk(module)
