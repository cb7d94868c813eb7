"""Shared pieces of the core test suite: tolerances by dtype, small random configs, seeded tensors.

Every property test draws its sizes, dtype and seed from hypothesis and keeps the sizes tiny, so that
the whole suite stays fast on two CPU cores.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from minijamba import JambaConfig, Jamba

# The tests run tiny tensors in `pytest -n 2` workers on two cores. With torch's default of one
# thread per core, the two workers oversubscribe the cores and every small op waits on a busy
# thread pool: a depthwise conv1d then takes 15 ms instead of 0.04 ms. One thread per worker.
torch.set_num_threads(1)

# Relative tolerance by dtype, scaled by the size of the reference (see assert_close).
# float64: the two computations agree to rounding; float32: a few ulps through exp and long sums;
# bfloat16: 8 bits of mantissa.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Whole models in float32 add attention softmaxes, RMSNorms and several layers: allow a bit more.
MODEL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """|actual - expected| <= rtol * max(1e-3, max|expected|) everywhere, with the same shape.

    The tolerance is relative to the largest value of the reference rather than to each element:
    elementwise relative error is meaningless where the reference crosses zero. The floor keeps a
    near-zero reference from demanding an absurdly small absolute error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(e).all(), f"{what}: non-finite values"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-3)
    err = (a - e).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


seeds = st.integers(0, 2**31 - 1)
float_dtypes = st.sampled_from([torch.float64, torch.float32])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mamba_sizes(draw) -> dict:
    """Random Mamba-layer sizes (N, conv width, expand, Δ rank) and biases, as JambaConfig fields."""
    return dict(
        mamba_d_state=draw(st.integers(1, 4)),
        mamba_d_conv=draw(st.integers(1, 4)),
        mamba_expand=draw(st.integers(1, 2)),
        mamba_dt_rank=draw(st.integers(1, 3)),
        mamba_conv_bias=draw(st.booleans()),
        mamba_proj_bias=draw(st.booleans()),
    )


@st.composite
def small_configs(draw, layout: str | None = None, moe: bool | None = None, **fixed) -> JambaConfig:
    """A random tiny but complete JambaConfig: any period/offset layout, GQA ratio, experts, sizes.

    layout: None (any hybrid/attention/mamba mix the periods give), or 'hybrid' to force at least
    one attention and one Mamba layer. moe: None (any), True (at least one MoE layer), False (none).
    """
    layers = draw(st.integers(1, 4)) if layout != "hybrid" else draw(st.integers(2, 4))
    g = draw(st.sampled_from([1, 2]))  # key/value heads
    q = g * draw(st.sampled_from([1, 2]))  # query heads: a multiple of the kv heads
    e = draw(st.sampled_from([2, 4]))  # head size
    period = draw(st.integers(1, layers + 1))
    offset = draw(st.integers(0, period - 1))
    if layout == "hybrid":
        period = draw(st.integers(2, layers))
        offset = draw(st.integers(0, period - 1))
    n = draw(st.integers(1, 4)) if moe is None else (draw(st.integers(2, 4)) if moe else 1)
    e_period = draw(st.integers(1, layers))
    e_offset = draw(st.integers(0, e_period - 1))  # e_offset < e_period <= layers: layer e_offset is MoE
    kwargs = dict(
        vocab_size=draw(st.integers(8, 40)),
        hidden_size=q * e,
        intermediate_size=draw(st.sampled_from([4, 8])),
        num_hidden_layers=layers,
        num_attention_heads=q,
        num_key_value_heads=g,
        attn_layer_period=period,
        attn_layer_offset=offset,
        num_experts=n,
        num_experts_per_tok=draw(st.integers(1, n)),
        expert_layer_period=e_period,
        expert_layer_offset=e_offset,
        **mamba_sizes(draw),
        tie_word_embeddings=draw(st.booleans()),
        router_aux_loss_coef=draw(st.sampled_from([0.0, 0.01, 0.5])),
        initializer_range=0.3,  # large enough that every layer visibly changes the logits
    )
    kwargs.update(fixed)
    return JambaConfig(**kwargs)


def make_model(config: JambaConfig, seed: int, dtype=torch.float64) -> Jamba:
    """A randomly initialised model in eval mode, with every norm weight perturbed off 1 too."""
    torch.manual_seed(seed)
    model = Jamba(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def left_pad(rows: list[torch.Tensor], pad_id: int = 0, fill: torch.Tensor | None = None):
    """Left-pad 1-d token rows to one batch. Returns ids (b, l) and attention_mask (b, l) of 0/1.

    fill: optional (b, l) tensor of junk tokens to put in the padding instead of pad_id, so that a
    test also catches padding values leaking into real positions."""
    l = max(len(r) for r in rows)
    ids = torch.full((len(rows), l), pad_id, dtype=torch.long)
    if fill is not None:
        ids.copy_(fill[:, :l])
    mask = torch.zeros(len(rows), l, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, l - len(r) :] = r
        mask[i, l - len(r) :] = 1
    return ids, mask


# --- a very small training run (tests/test_train.py, tests/test_integrity.py) ---------------------
# A very small Jamba that keeps the tiny preset's layout (8 layers, 1:7, MoE every 2, top-2).
TINY = dict(
    hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
    num_experts=2, mamba_d_state=4, mamba_dt_rank=2,
)  # fmt: skip


def train_config(text_file, out_dir, **kw):
    """A TrainConfig of TINY on `text_file`, six steps on the CPU unless `kw` says otherwise."""
    from minijamba.training.train import TrainConfig

    base = dict(
        data=str(text_file), vocab_size=300, seq_len=32, batch_size=2, overrides=dict(TINY),
        eval_batches=1, eval_interval=2, max_steps=6, time_budget=None, out_dir=str(out_dir),
        device="cpu", warmup_steps=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def quiet(*args, **kwargs):
    pass


def copy_of(src, dst):
    """A copy of the checkpoint folder src at dst (a new folder); returns dst."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst
