"""The Triton grouped int8 matmul (minijamba.kernels.int8_matmul) computes what the reference computes.

On a CPU-only machine (CI) the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below
before the kernel is defined), in float32 and float16: the interpreter's bfloat16 tl.dot is wrong
even for a plain 16x16 product, so bfloat16 is checked on a GPU only. Sizes are tiny and include
experts with no rows, row counts that straddle the row blocks, and both launch shapes.
"""

from __future__ import annotations

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:  # must precede the first import of minijamba.kernels.int8_matmul
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import assert_close, gen, seeds  # noqa: E402
from minijamba import JambaConfig  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.inference.quant import KERNEL_ENV, grouped_int8_linear_reference, int8_kernel, quantize_rows  # noqa: E402

triton_kernel = pytest.importorskip("minijamba.kernels.int8_matmul")
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# float32 accumulates in float32 on both sides (the kernel with IEEE products); 16-bit outputs are
# rounded to 16 bits after a float32 sum in the kernel and after a 16-bit matmul in the reference.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=5),  # rows per expert, zeros included
    st.integers(1, 70),  # O
    st.integers(1, 40),  # I
    st.sampled_from(DTYPES),
    st.sampled_from(["rows", "gemv", "small", "large"]),
    st.booleans(),  # W_LEFT: the weight tile as the dot's left operand
    st.booleans(),  # MAGIC (the rows kernel): int8 -> float by integer add and bitcast, or a conversion
    seeds,
)
def test_kernel_equals_reference(counts, O, I, dtype, shape, w_left, magic, seed):
    n = len(counts)
    q, scale = quantize_rows(torch.randn(n, O, I, generator=gen(seed)))
    ends = torch.tensor(counts).cumsum(0)
    x = torch.randn(sum(counts), I, generator=gen(seed + 1)).to(dtype)
    q, scale, ends, x = q.to(DEVICE), scale.to(DEVICE), ends.to(DEVICE), x.to(DEVICE)
    saved = triton_kernel.GEMV_ROWS, triton_kernel.SMALL_ROWS, dict(triton_kernel.CONFIG), triton_kernel.ROWS_MAX
    saved_magic, triton_kernel.MAGIC = triton_kernel.MAGIC, magic
    # whatever the rows, the launch shape asked for (on a Hopper GPU "large" is "large_sm90"; "rows"
    # is the multiply-and-sum kernel, the others the tl.dot one)
    triton_kernel.ROWS_MAX = 10**9 if shape == "rows" else -1
    triton_kernel.GEMV_ROWS = 10**9 if shape == "gemv" else -1
    triton_kernel.SMALL_ROWS = 10**9 if shape == "small" else -1
    triton_kernel.CONFIG.update({k: (*v[:-1], w_left) for k, v in saved[2].items()})
    try:
        got = triton_kernel.grouped_int8_linear(x, q, scale, ends)
    finally:
        triton_kernel.GEMV_ROWS, triton_kernel.SMALL_ROWS = saved[:2]
        triton_kernel.CONFIG.update(saved[2])
        triton_kernel.ROWS_MAX = saved[3]
        triton_kernel.MAGIC = saved_magic
    expected = grouped_int8_linear_reference(x.float(), q, scale, ends)  # float32 truth
    assert got.dtype == dtype and got.shape == (sum(counts), O)
    assert_close(got, expected, TOL[dtype], f"{shape} launch, W_LEFT={w_left}, MAGIC={magic}, {dtype}")


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=4),  # rows per expert, zeros included
    st.integers(1, 70),  # O
    st.sampled_from([1, 2, 3, 8]),  # GROUP_T
    seeds,
)
def test_prefill_order_covers_every_tile(counts, O, group, seed):
    """The prefill launch's grouped order (GROUP_T row blocks at a time) gives every (output tile, row
    block) exactly one program: with 16 x 16 tiles, several of each, groups that straddle experts and
    a last group cut short, the result is the reference's."""
    n = len(counts)
    q, scale = quantize_rows(torch.randn(n, O, 24, generator=gen(seed)))
    ends = torch.tensor(counts).cumsum(0)
    x = torch.randn(sum(counts), 24, generator=gen(seed + 1))
    q, scale, ends, x = q.to(DEVICE), scale.to(DEVICE), ends.to(DEVICE), x.to(DEVICE)
    tile = (16, 16, 16, 4, 2, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_kernel, "ROWS_MAX", -1)
        mp.setattr(triton_kernel, "GEMV_ROWS", -1)
        mp.setattr(triton_kernel, "SMALL_ROWS", -1)
        mp.setattr(triton_kernel, "GROUP_T", group)
        mp.setitem(triton_kernel.CONFIG, "large", tile)
        mp.setitem(triton_kernel.CONFIG, "large_sm90", tile)
        got = triton_kernel.grouped_int8_linear(x, q, scale, ends)
    expected = grouped_int8_linear_reference(x, q, scale, ends)
    assert_close(got, expected, TOL[torch.float32], f"GROUP_T={group}, counts={counts}, O={O}")


def test_int8_experts_model_runs_the_same_with_either_kernel(monkeypatch):
    model = build(JambaConfig.from_preset("tiny", hidden_size=64, intermediate_size=64), device=DEVICE,
                  dtype=torch.float32, quantize="int8")  # fmt: skip
    ids = torch.randint(0, 4096, (2, 9), generator=gen(0)).to(DEVICE)
    monkeypatch.setenv(KERNEL_ENV, "reference")
    with torch.no_grad():
        expected = model(ids)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    with torch.no_grad():
        got = model(ids)
    assert_close(got, expected, 1e-4, "model logits, triton vs reference int8 kernel")


def test_kernel_choice(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert int8_kernel(x) == "reference"  # CPU tensors: the reference unless asked
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert int8_kernel(x) == "triton"
    if torch.cuda.is_available():  # unset: the fused kernel for few rows per expert, dequant for many
        monkeypatch.delenv(KERNEL_ENV)
        from minijamba.inference.quant import LARGE_ROWS

        rows = torch.zeros(LARGE_ROWS * 4, 8, device="cuda", dtype=torch.bfloat16)
        assert int8_kernel(rows[:-1], 4) == "triton" and int8_kernel(rows, 4) == "dequant"
        assert int8_kernel(rows.float(), 4) == "reference"  # CUDA's grouped GEMM is bf16 only
    monkeypatch.setenv(KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match="reference"):
        int8_kernel(x)


@pytest.mark.parametrize("shape, magic", [("rows", True), ("rows", False), ("gemv", False)])
def test_every_int8_value_converts_exactly(shape, magic, monkeypatch):
    """All 256 int8 values, one an output channel, times x = 1: y is each value times its scale, for
    either conversion (MAGIC's integer add and bitcast must be exact at -128 and 127 too)."""
    q = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 256, 1).to(DEVICE)  # (E=1, o=256, i=1)
    scale = torch.full((1, 256), 0.5, device=DEVICE)
    x = torch.ones(2, 1, device=DEVICE)  # two rows of the one expert
    ends = torch.tensor([2], device=DEVICE)
    monkeypatch.setattr(triton_kernel, "ROWS_MAX", 10**9 if shape == "rows" else -1)
    monkeypatch.setattr(triton_kernel, "MAGIC", magic)
    got = triton_kernel.grouped_int8_linear(x, q, scale, ends)
    expected = (torch.arange(-128, 128, device=DEVICE).float() * 0.5).expand(2, 256)
    assert torch.equal(got, expected)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 300), st.sampled_from(DTYPES), seeds)
def test_dequantize_kernel_equals_torch_mul(E, o, i, dtype, seed):
    """The prefill twin's Triton dequantization: scale * q rounded once to the output dtype, every
    element written (the output starts as NaN), any width (a partial last column block)."""
    q, scale = quantize_rows(torch.randn(E * o, i, generator=gen(seed)))
    q, scale = q.view(E, o, i).to(DEVICE), scale.view(E, o).to(DEVICE)
    out = torch.full((E, o, i), float("nan"), dtype=dtype, device=DEVICE)
    got = triton_kernel.dequantize(q, scale, out)
    expected = torch.mul(q, scale[..., None]).to(dtype)  # float32 product, one rounding
    assert torch.equal(got, expected)
