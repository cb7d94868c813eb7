"""JambaConfig: every size and switch of a Jamba model, and the layer layout derived from them.

The paper (arXiv 2403.19887, section 2) describes the layout with five numbers:

    l    layers per Jamba block                          (Jamba-v0.1: 8)
    a:m  attention-to-Mamba ratio inside a block          (1:7)
    e    a mixture-of-experts MLP replaces the dense MLP every e layers   (2)
    n    experts per MoE layer                            (16)
    K    experts each token is routed to                  (2)

transformers stores the same layout as period/offset pairs, and so do we, so that a `config.json`
round-trips unchanged: layer i is an attention layer when `i % attn_layer_period == attn_layer_offset`
(otherwise Mamba), and has an MoE MLP when `i % expert_layer_period == expert_layer_offset` (otherwise a
dense SwiGLU MLP). With period 8 and offset 4, each block of l = 8 layers has one attention layer:
a:m = 1:7. With period 2 and offset 1, every e = 2nd layer is MoE.

Two layouts outside the paper are expressible too: attention only (period 1, offset 0) and Mamba only
(a period longer than the model, so no index ever matches). `with_layout` builds them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minijamba.checks import check_fields, field_types, type_problem
from minijamba.model.presets import PRESETS

__all__ = ["LAYOUTS", "PRESETS", "JambaConfig", "check_field", "count_layers"]

LAYOUTS = ("hybrid", "attention", "mamba")


@dataclass
class JambaConfig:
    """All hyperparameters of a Jamba model. Field names follow transformers' `JambaConfig`."""

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 65536  # tokens in the vocabulary
    hidden_size: int = 4096  # model width (called d_model in the Mamba paper)
    intermediate_size: int = 14336  # hidden width of each SwiGLU MLP / expert
    num_hidden_layers: int = 32  # decoder layers in total (4 blocks of l = 8 for Jamba-v0.1)
    # --- attention ---------------------------------------------------------------------------
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 8  # key/value heads (grouped-query attention); must divide the heads
    attn_layer_period: int = 8  # l: an attention layer once every this many layers
    attn_layer_offset: int = 4  # index of the attention layer inside each period
    # --- mixture of experts ------------------------------------------------------------------
    num_experts: int = 16  # n: experts per MoE layer (1 = dense MLP everywhere)
    num_experts_per_tok: int = 2  # K: experts each token is routed to
    expert_layer_period: int = 2  # e: an MoE MLP once every this many layers
    expert_layer_offset: int = 1  # index of the MoE layer inside each period
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in the training loss
    # --- Mamba -------------------------------------------------------------------------------
    mamba_d_state: int = 16  # N: state size per channel (the size of B and C)
    mamba_d_conv: int = 4  # width of the depthwise causal convolution
    mamba_expand: int = 2  # inner width = mamba_expand * hidden_size (D in the Mamba paper)
    mamba_dt_rank: int | str = "auto"  # rank of the Δ projection; "auto" = ceil(hidden_size / 16)
    mamba_conv_bias: bool = True  # bias in the depthwise convolution
    mamba_proj_bias: bool = False  # bias in in_proj and out_proj
    # --- the rest ----------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    tie_word_embeddings: bool = False  # share the embedding matrix with the LM head
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    max_position_embeddings: int = 262144  # informational only: Jamba has no positional encoding
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # the end token, or several (Jamba 1.5: end of text and of a turn)
    # --- minijamba only (not in transformers' config.json) -----------------------------------
    # Selective-scan implementation (see minijamba.kernels); None = $MINIJAMBA_SCAN_BACKEND or "reference".
    scan_backend: str | None = None

    def __post_init__(self):
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first field that makes no sense: first its type (by the
        field's annotation: an int is an int and not a bool, a float is a finite int or float, a
        bool is a bool, None only where the annotation allows it), then its range, then the fields
        that must agree with each other."""
        check_fields(self, lambda name: f"JambaConfig.{name}")
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "attn_layer_period",
            "num_experts", "num_experts_per_tok", "expert_layer_period",
            "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"JambaConfig.{name} must be a positive integer, got {value!r}")
        for name in ("attn_layer_offset", "expert_layer_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"JambaConfig.{name} must be an integer >= 0, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"JambaConfig.num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"JambaConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"JambaConfig.num_experts_per_tok (K={self.num_experts_per_tok}) must be <= "
                f"num_experts (n={self.num_experts})"
            )
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ValueError(
                f"JambaConfig.attn_layer_offset ({self.attn_layer_offset}) must be smaller than "
                f"attn_layer_period ({self.attn_layer_period})"
            )
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ValueError(
                f"JambaConfig.expert_layer_offset ({self.expert_layer_offset}) must be smaller than "
                f"expert_layer_period ({self.expert_layer_period})"
            )
        if self.initializer_range < 0:
            raise ValueError(f"JambaConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"JambaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(
                f"JambaConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}"
            )
        if self.scan_backend is not None and (not isinstance(self.scan_backend, str) or not self.scan_backend):
            raise ValueError(f"JambaConfig.scan_backend must be a backend name or None, got {self.scan_backend!r}")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_inner_size(self) -> int:
        """D, the Mamba layer's inner width (transformers calls it intermediate_size of the mixer)."""
        return self.mamba_expand * self.hidden_size

    def num_parameters(self) -> int:
        """The parameters `Jamba(self)` has (a tied LM head counted once), equal to its
        `num_parameters()`, by arithmetic on the sizes: nothing is built, so the size of a config of
        a million layers or a width of 10^9 is known at once (and can be refused before building)."""
        h, V, f, L = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_hidden_layers
        q, g, e = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        d, n, r, k = self.mamba_inner_size, self.mamba_d_state, self.mamba_dt_rank, self.mamba_d_conv
        attention_layers = count_layers(L, self.attn_layer_period, self.attn_layer_offset)
        moe_layers = count_layers(L, self.expert_layer_period, self.expert_layer_offset)
        moe_layers = moe_layers if self.num_experts > 1 else 0
        attention = 2 * h * q * e + 2 * h * g * e  # q_proj and o_proj; k_proj and v_proj
        mamba = (
            2 * d * h + (2 * d if self.mamba_proj_bias else 0)  # in_proj
            + d * k + (d if self.mamba_conv_bias else 0)  # the depthwise conv1d
            + d * (r + 2 * n) + r * d + d  # x_proj; dt_proj with its bias
            + d * n + d  # A_log, D
            + h * d + (h if self.mamba_proj_bias else 0)  # out_proj
            + r + 2 * n  # the RMSNorms of Δ, B and C
        )  # fmt: skip
        moe = self.num_experts * h + 3 * self.num_experts * f * h  # router; experts' gate, up and down
        return (
            V * h * (1 if self.tie_word_embeddings else 2) + h  # embedding, LM head, final norm
            + L * 2 * h  # each layer's two RMSNorms
            + attention_layers * attention + (L - attention_layers) * mamba
            + moe_layers * moe + (L - moe_layers) * 3 * h * f  # MoE or dense SwiGLU MLP
        )  # fmt: skip

    # --- the layout ----------------------------------------------------------------------------
    def layer_type(self, i: int) -> str:
        """'attention' or 'mamba': the mixer of layer i."""
        return "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"

    def is_moe_layer(self, i: int) -> bool:
        """True where layer i has an MoE MLP (n > 1 experts), False where it has a dense MLP."""
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    @property
    def layer_types(self) -> list[str]:
        """'attention' or 'mamba' for each layer, transformers' `layers_block_type`."""
        return [self.layer_type(i) for i in range(self.num_hidden_layers)]

    @property
    def moe_layers(self) -> list[bool]:
        """True where layer i has an MoE MLP (n > 1 experts), False where it has a dense MLP."""
        return [self.is_moe_layer(i) for i in range(self.num_hidden_layers)]

    @property
    def attn_to_mamba(self) -> tuple[int, int]:
        """a:m as a reduced pair: (1, 7) for Jamba, (1, 0) attention-only, (0, 1) Mamba-only."""
        a = self.layer_types.count("attention")
        m = self.num_hidden_layers - a
        g = math.gcd(a, m)
        return a // g, m // g

    def describe(self) -> str:
        """The layout in the paper's terms, e.g. 'l=8 a:m=1:7 e=2 n=16 K=2 (32 layers)'."""
        a, m = self.attn_to_mamba
        l = min(self.attn_layer_period, self.num_hidden_layers)
        if self.num_experts == 1:
            moe = "no MoE"
        else:
            moe = f"e={self.expert_layer_period} n={self.num_experts} K={self.num_experts_per_tok}"
        return f"l={l} a:m={a}:{m} {moe} ({self.num_hidden_layers} layers)"

    def with_layout(self, layout: str) -> "JambaConfig":
        """The same sizes with a 'hybrid' (unchanged), 'attention'-only or 'mamba'-only layout."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        if layout == "hybrid":
            return dataclasses.replace(self)
        if layout == "attention":
            return dataclasses.replace(self, attn_layer_period=1, attn_layer_offset=0)
        # A period longer than the model: no layer index ever hits the offset.
        n = self.num_hidden_layers
        return dataclasses.replace(self, attn_layer_period=n + 1, attn_layer_offset=n)

    # --- presets and transformers' config.json -------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "JambaConfig":
        """A named configuration: a released Jamba ('jamba-v0.1', 'jamba-1.5-mini', 'jamba-1.5-large',
        'jamba2-mini', 'jamba-reasoning-3b', 'jamba-tiny-dev': see minijamba.model.presets, which
        cites each one's source) or 'tiny' (trains on a laptop)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict) -> "JambaConfig":
        """From the dict of a transformers `config.json` (unknown keys are ignored)."""
        hf = dict(hf)
        if "num_local_experts" in hf and "num_experts" not in hf:
            hf["num_experts"] = hf["num_local_experts"]
        if hf.get("num_key_value_heads") is None:
            hf["num_key_value_heads"] = hf.get("num_attention_heads", cls.num_attention_heads)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):  # every one of them ends generation; one is kept as an int
            hf["eos_token_id"] = (eos[0] if len(eos) == 1 else list(eos)) if eos else None
        names = {f.name for f in dataclasses.fields(cls)} - {"scan_backend"}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def end_tokens(self) -> tuple[int, ...]:
        """The ids that end generation: `eos_token_id` as a tuple (empty when it is None)."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    def to_hf(self) -> dict:
        """The dict of a `config.json` that transformers' JambaForCausalLM reads."""
        d = dataclasses.asdict(self)
        d.pop("scan_backend")
        d.update(model_type="jamba", architectures=["JambaForCausalLM"], hidden_act="silu")
        d.update(attention_dropout=0.0, use_cache=True, use_mamba_kernels=True, output_router_logits=False)
        return d


def count_layers(layers: int, period: int, offset: int) -> int:
    """Layers i < `layers` with i % period == offset."""
    return 0 if offset >= layers else (layers - 1 - offset) // period + 1


def check_field(name: str, value) -> None:
    """Raise ValueError unless `value` has the type JambaConfig's annotation of `name` gives it.

    int: an int, not a bool; float: an int or float, finite; bool: a bool; str: a str; None only
    where the annotation allows it. (Ranges are checked by `JambaConfig.validate`.)"""
    hints = field_types(JambaConfig)
    if name not in hints:
        raise ValueError(f"unknown model setting {name!r}: JambaConfig has no such field")
    want = type_problem(value, hints[name])
    if want is not None:
        raise ValueError(f"JambaConfig.{name} must be {want}, got {value!r}")
