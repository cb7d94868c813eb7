"""JambaConfig: the layout in the paper's terms, validation, presets and the config.json round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_configs
from minijamba import Jamba, JambaConfig


@st.composite
def layouts(draw):
    """Any valid (layers, attention period/offset, expert period/offset, n, K)."""
    layers = draw(st.integers(1, 40))
    period = draw(st.integers(1, 12))
    e_period = draw(st.integers(1, 6))
    n = draw(st.integers(1, 16))
    return dict(
        num_hidden_layers=layers,
        attn_layer_period=period,
        attn_layer_offset=draw(st.integers(0, period - 1)),
        expert_layer_period=e_period,
        expert_layer_offset=draw(st.integers(0, e_period - 1)),
        num_experts=n,
        num_experts_per_tok=draw(st.integers(1, n)),
    )


def tiny(**overrides) -> JambaConfig:
    return JambaConfig.from_preset("tiny", **overrides)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_layout_count_and_placement(lay):
    c = tiny(**lay)
    L, p, o = lay["num_hidden_layers"], lay["attn_layer_period"], lay["attn_layer_offset"]
    attn = [i for i, t in enumerate(c.layer_types) if t == "attention"]
    assert len(c.layer_types) == L
    assert set(c.layer_types) <= {"attention", "mamba"}
    assert attn == list(range(o, L, p))  # one attention layer per period, at the offset
    assert len(attn) == max(0, math.ceil((L - o) / p))
    moe = [i for i, m in enumerate(c.moe_layers) if m]
    if lay["num_experts"] == 1:
        assert moe == []  # a single expert is a dense MLP
    else:
        assert moe == list(range(lay["expert_layer_offset"], L, lay["expert_layer_period"]))
    a, m = c.attn_to_mamba
    assert math.gcd(a, m) == 1
    assert a * (L - len(attn)) == m * len(attn)  # the reduced ratio of the real counts


@settings(max_examples=40, deadline=None)
@given(
    l=st.integers(1, 10), blocks=st.integers(1, 4), e=st.integers(1, 4), n=st.integers(2, 16), data=st.data()
)
def test_paper_terms_of_whole_blocks(l, blocks, e, n, data):
    """Blocks of l layers with one attention layer each: a:m = 1:(l-1), and every e-th layer MoE."""
    K = data.draw(st.integers(1, n))
    offset = data.draw(st.integers(0, l - 1))
    e_offset = data.draw(st.integers(0, e - 1))
    L = l * blocks
    c = tiny(
        num_hidden_layers=L, attn_layer_period=l, attn_layer_offset=offset, expert_layer_period=e,
        expert_layer_offset=e_offset, num_experts=n, num_experts_per_tok=K,
    )  # fmt: skip
    g = math.gcd(1, l - 1)
    assert c.attn_to_mamba == (1 // g, (l - 1) // g)
    assert c.layer_types.count("attention") == blocks
    for b in range(blocks):  # exactly one attention layer in each block, at the same place
        assert c.layer_types[b * l : (b + 1) * l].count("attention") == 1
        assert c.layer_types[b * l + offset] == "attention"
    assert sum(c.moe_layers) == len(range(e_offset, L, e))
    a, m = c.attn_to_mamba
    assert c.describe() == f"l={l} a:m={a}:{m} e={e} n={n} K={K} ({L} layers)"


def test_jamba_v01_layout_in_paper_terms():
    c = JambaConfig.from_preset("jamba-v0.1")
    assert c.describe() == "l=8 a:m=1:7 e=2 n=16 K=2 (32 layers)"
    assert c.attn_to_mamba == (1, 7)
    assert [i for i, t in enumerate(c.layer_types) if t == "attention"] == [4, 12, 20, 28]
    assert [i for i, m in enumerate(c.moe_layers) if m] == list(range(1, 32, 2))
    assert (c.head_dim, c.mamba_inner_size, c.mamba_dt_rank) == (128, 8192, 256)


def test_tiny_preset_has_the_paper_layout():
    c = JambaConfig.from_preset("tiny")
    assert c.attn_to_mamba == (1, 7)
    assert c.describe().startswith("l=8 a:m=1:7 e=2 ")
    assert c.num_experts_per_tok == 2


def test_describe_without_moe_and_single_kind_layouts():
    c = tiny(num_experts=1, num_experts_per_tok=1)
    assert "no MoE" in c.describe() and not any(c.moe_layers)
    assert c.with_layout("attention").attn_to_mamba == (1, 0)
    assert c.with_layout("mamba").attn_to_mamba == (0, 1)


@settings(max_examples=30, deadline=None)
@given(layouts(), st.sampled_from(["hybrid", "attention", "mamba"]))
def test_with_layout(lay, layout):
    c = tiny(**lay)
    d = c.with_layout(layout)
    assert d is not c
    assert d.moe_layers == c.moe_layers  # only the mixers change
    same = {f.name for f in dataclasses.fields(c)} - {"attn_layer_period", "attn_layer_offset"}
    assert all(getattr(d, k) == getattr(c, k) for k in same)
    if layout == "hybrid":
        assert d == c
    elif layout == "attention":
        assert d.layer_types == ["attention"] * c.num_hidden_layers
    else:
        assert d.layer_types == ["mamba"] * c.num_hidden_layers
    assert JambaConfig.from_hf(d.to_hf()) == d  # still a valid, round-trippable config


def test_with_layout_rejects_unknown():
    with pytest.raises(ValueError, match="layout"):
        tiny().with_layout("transformer")


# --- validation --------------------------------------------------------------------------------

POSITIVE = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "attn_layer_period", "num_experts", "num_experts_per_tok",
    "expert_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(POSITIVE), st.one_of(st.integers(-5, 0), st.sampled_from([1.5, "4", None, True])))
def test_non_positive_or_non_integer_sizes_raise(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(2, 12), width=st.integers(1, 64))
def test_heads_must_divide_width(heads, width):
    if width % heads == 0:
        width += 1
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny(hidden_size=width, num_attention_heads=heads, num_key_value_heads=1)


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 8), kv=st.integers(2, 8))
def test_kv_heads_must_divide_heads(heads, kv):
    if heads % kv == 0:
        heads = kv + 1  # kv >= 2 never divides kv + 1
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny(hidden_size=heads * 4, num_attention_heads=heads, num_key_value_heads=kv)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 16), extra=st.integers(1, 4))
def test_top_k_at_most_n(n, extra):
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny(num_experts=n, num_experts_per_tok=n + extra)


@settings(max_examples=30, deadline=None)
@given(period=st.integers(1, 10), extra=st.integers(0, 5), which=st.sampled_from(["attn", "expert"]))
def test_offset_below_period(period, extra, which):
    with pytest.raises(ValueError, match=f"{which}_layer_offset"):
        tiny(**{f"{which}_layer_period": period, f"{which}_layer_offset": period + extra})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attn_layer_offset=-1), "attn_layer_offset"),
        (dict(expert_layer_offset=-2), "expert_layer_offset"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(scan_backend=""), "scan_backend"),
        (dict(scan_backend=3), "scan_backend"),
        (dict(mamba_dt_rank="big"), "mamba_dt_rank"),
    ],
)
def test_other_invalid_fields_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


def test_valid_edge_cases_are_accepted():
    tiny(num_experts=1, num_experts_per_tok=1)  # dense everywhere
    tiny(num_experts=4, num_experts_per_tok=4)  # K = n
    tiny(num_hidden_layers=3)  # shorter than one period: Mamba only
    tiny(router_aux_loss_coef=0.0)
    assert tiny(hidden_size=160, mamba_dt_rank="auto").mamba_dt_rank == 10  # ceil(160 / 16)
    assert tiny(hidden_size=161, num_attention_heads=7, num_key_value_heads=7, mamba_dt_rank="auto").mamba_dt_rank == 11


def test_presets():
    with pytest.raises(ValueError, match="preset"):
        JambaConfig.from_preset("jamba-v9")
    c = JambaConfig.from_preset("tiny", num_hidden_layers=16)
    assert c.num_hidden_layers == 16 and c.hidden_size == JambaConfig.from_preset("tiny").hidden_size


# --- transformers' config.json -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(small_configs())
def test_hf_round_trip(config):
    hf = config.to_hf()
    assert hf["model_type"] == "jamba" and "scan_backend" not in hf
    assert json.loads(json.dumps(hf)) == hf  # a config.json holds it as is
    assert JambaConfig.from_hf(hf) == config
    assert JambaConfig.from_hf(json.loads(json.dumps(hf))) == config


def test_from_hf_accepts_transformers_spellings():
    hf = JambaConfig.from_preset("jamba-v0.1").to_hf()
    del hf["num_experts"]
    hf.update(num_local_experts=16, num_key_value_heads=None, eos_token_id=[2, 5], some_future_key=1)
    c = JambaConfig.from_hf(hf)
    assert c.num_experts == 16
    assert c.num_key_value_heads == c.num_attention_heads  # None means no grouping
    assert c.eos_token_id == [2, 5] and c.end_tokens() == (2, 5)  # every end token is kept
    assert JambaConfig.from_hf({**hf, "eos_token_id": [7]}).eos_token_id == 7
    assert JambaConfig.from_hf({**hf, "eos_token_id": []}).end_tokens() == ()
    with pytest.raises(ValueError, match="eos_token_id must be an integer or a list of integers or None"):
        JambaConfig.from_hf({**hf, "eos_token_id": [2, "x"]})
    assert c.scan_backend is None
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        JambaConfig.from_hf({**hf, "num_experts_per_tok": 17})


def test_jamba_v01_parameter_counts_on_meta():
    """The released model: 51.57B parameters in total, 12.11B active per token (paper, Table 1
    says 52B / 12B; the exact counts are those of ai21labs/Jamba-v0.1's weights)."""
    with torch.device("meta"):
        model = Jamba(JambaConfig.from_preset("jamba-v0.1"))
    assert all(p.is_meta for p in model.parameters())
    assert round(model.num_parameters() / 1e9, 2) == 51.57
    assert round(model.num_parameters(active=True) / 1e9, 2) == 12.11


# --- issue 22: every field type-checked by its annotation; the size known by arithmetic ---------


@pytest.mark.parametrize(
    "field, value, want",
    [
        ("rms_norm_eps", "1e-6", "a finite number"), ("rms_norm_eps", float("nan"), "a finite number"),
        ("router_aux_loss_coef", float("inf"), "a finite number"), ("initializer_range", True, "a finite number"),
        ("hidden_size", True, "an integer"), ("vocab_size", 4096.0, "an integer"),
        ("tie_word_embeddings", 1, "a bool"), ("mamba_conv_bias", "yes", "a bool"),
        ("pad_token_id", 0.5, "an integer or None"), ("max_position_embeddings", None, "an integer"),
        ("scan_backend", b"reference", "a string or None"), ("initializer_range", -0.1, ">= 0"),
    ],
)  # fmt: skip
def test_every_field_is_type_checked_by_its_annotation(field, value, want):
    with pytest.raises(ValueError, match=rf"JambaConfig\.{field} must be {want}"):
        tiny(**{field: value})


def test_ints_are_accepted_where_floats_belong_and_none_where_allowed():
    c = tiny(rms_norm_eps=1, router_aux_loss_coef=0, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    assert c.rms_norm_eps == 1 and c.pad_token_id is None


@settings(max_examples=60, deadline=None)
@given(small_configs())
def test_num_parameters_by_arithmetic_equals_the_model_built_on_meta(config):
    with torch.device("meta"):
        model = Jamba(config)
    assert config.num_parameters() == model.num_parameters()


@pytest.mark.parametrize("layout", ["hybrid", "attention", "mamba"])
@pytest.mark.parametrize("name, extra", [("jamba-v0.1", {}), ("tiny", {}), ("tiny", dict(num_experts=1, num_experts_per_tok=1,
                         tie_word_embeddings=False, mamba_proj_bias=True, mamba_conv_bias=False, num_hidden_layers=13))])  # fmt: skip
def test_num_parameters_of_the_presets(name, extra, layout):
    config = JambaConfig.from_preset(name, **extra).with_layout(layout)
    with torch.device("meta"):
        model = Jamba(config)
    assert config.num_parameters() == model.num_parameters()
    assert [config.layer_type(i) for i in range(config.num_hidden_layers)] == config.layer_types
    assert [config.is_moe_layer(i) for i in range(config.num_hidden_layers)] == config.moe_layers


def test_num_parameters_of_a_huge_config_is_instant():
    import time

    t = time.monotonic()
    c = tiny(num_hidden_layers=10**9, hidden_size=2**30, num_attention_heads=2**10, num_key_value_heads=2**10)
    assert c.num_parameters() > 10**27 and time.monotonic() - t < 1
