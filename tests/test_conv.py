"""The Mamba layer's causal depthwise conv1d in every backend: the reference is the padded conv, the
Triton kernels compute what the reference computes (output, every gradient, the rounding points),
and the Mamba layer computes what it computed before its conv went through the backend.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py
before any kernel is defined), with small tiles so that these tiny sizes still span several
programs in l and in d. On a GPU the same tests run on CUDA tensors with the real tiles.

Shapes: x, y (b, d, l); weight (d, k); bias (d,); context (b, d, k-1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, assert_close, gen, mamba_sizes, seeds
from minijamba import JambaConfig, kernels as backends
from minijamba.model.mamba import MambaMixer
from minijamba.model.ssm import causal_conv1d
from minijamba.model.state import MambaState

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TRITON = backends.why_unavailable("triton") is None
needs_triton = pytest.mark.skipif(not TRITON, reason=f"triton backend: {backends.why_unavailable('triton')}")
# Relative to the reference's largest value (see helpers.assert_close). The kernels sum in float32;
# 16-bit inputs differ from the float64 truth by the rounding of the 16-bit results.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)
BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_conv.py"


def _round_bf16_to_nearest_even(trunc):
    """Triton's interpreter casts float32 to bfloat16 by dropping the low bits (toward zero); the GPU,
    like torch, rounds to nearest even. This cast rounds as the GPU does, so that the tests below can
    check the kernels' rounding points bit for bit in the interpreter too."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            a = np.ascontiguousarray(src.data).reshape(np.shape(src.data))
            bits = torch.from_numpy(a.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return TensorHandle(bits, dst_type.scalar)
        return trunc(self, src, dst_type)

    return create_fp_trunc


@pytest.fixture(autouse=True, scope="module")
def _interpreter_like_the_gpu():
    """In the interpreter: small tiles (several programs even at these sizes), GPU rounding to bf16."""
    if GPU or not TRITON:
        yield
        return
    from triton.runtime.interpreter import InterpreterBuilder

    from minijamba.kernels import custom_ops, triton_conv

    if not custom_ops.interpreting():
        pytest.skip("triton_conv was imported before TRITON_INTERPRET=1 was set in this process")
    saved, programs = dict(triton_conv.CONFIG), triton_conv.PROGRAMS
    trunc = InterpreterBuilder.create_fp_trunc
    small = dict(BLOCK_L=8, BLOCK_D=4, num_warps=1)  # the backward's windows: 8 rows, k-1 shared
    triton_conv.CONFIG.update(fwd=small, bwd=small)
    triton_conv.PROGRAMS = 3  # so that backward programs walk runs of several windows
    InterpreterBuilder.create_fp_trunc = _round_bf16_to_nearest_even(trunc)
    yield
    InterpreterBuilder.create_fp_trunc = trunc
    triton_conv.CONFIG.update(saved)
    triton_conv.PROGRAMS = programs


def conv_inputs(b, d, l, k, seed, dtype, use=("bias", "context"), layout="contiguous"):
    """The conv's arguments in float64 on the CPU, each already rounded to what the backend will use
    (x and context in `dtype`, weight and bias to `dtype` too: float32 parameters are cast to x's
    dtype), so that the float64 reference sees exactly the backend's inputs. None where not in `use`.

    layout 'contiguous': a plain (b, d, l) tensor, time-last, as in_proj's output reaches the conv
    (minijamba.kernels.time_last); 'strided': a (b, d, l) view of a (b, l, 2d) tensor, stride 1 along d, as it
    reached the conv before that (any strides must work)."""
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).double()  # noqa: E731
    x = r(b, l, 2 * d)[:, :, d:].transpose(1, 2) if layout == "strided" else r(b, d, l)
    return dict(
        x=x, weight=0.5 * r(d, k), bias=r(d) if "bias" in use else None,
        context=r(b, d, k - 1) if "context" in use else None,
    )  # fmt: skip


def on_device(args, dtype):
    """The backend's copy: x and context in `dtype` (x keeps its strides), weight and bias float32
    like the model's parameters, all on DEVICE, all requiring gradients."""
    out = {}
    for name, v in args.items():
        if v is not None:
            dt = torch.float32 if name in ("weight", "bias") else dtype
            v = torch.empty_strided(v.shape, v.stride(), dtype=dt, device=DEVICE).copy_(v.detach())
            out[name] = v.requires_grad_()
        else:
            out[name] = None
    return out


def run(fn, args, silu, gy):
    """y = fn(x, weight, bias, context, silu), and the gradients of <y, gy> w.r.t. every input."""
    names = [n for n, v in args.items() if v is not None]
    y = fn(args["x"], args["weight"], args["bias"], args["context"], silu=silu)
    grads = torch.autograd.grad(y, [args[n] for n in names], gy.to(y.device, y.dtype))
    return y, dict(zip(names, grads))


# --- the reference ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3), d=st.integers(1, 6), l=st.integers(1, 12), k=st.integers(1, 5),
    bias=st.booleans(), silu=st.booleans(), seed=seeds,
)  # fmt: skip
def test_reference_is_the_padded_conv(b, d, l, k, bias, silu, seed):
    """Without context: nn.Conv1d's padded conv (padding k-1 on both sides) cut to l outputs. With
    context: the sum over taps written out, y[t] = bias + Σ_j w[j] cat(context, x)[t + j]."""
    a = conv_inputs(b, d, l, k, seed, torch.float64, use=("bias", "context") if bias else ("context",))
    act = F.silu if silu else (lambda v: v)
    padded = F.conv1d(a["x"], a["weight"][:, None], a["bias"], padding=k - 1, groups=d)[..., :l]
    assert_close(causal_conv1d(a["x"], a["weight"], a["bias"], silu=silu), act(padded), 1e-12, "no context")
    xp = torch.cat([a["context"], a["x"]], -1)  # (b, d, k-1+l)
    taps = sum(a["weight"][:, j, None] * xp[..., j : j + l] for j in range(k))
    expected = act(taps + (0 if a["bias"] is None else a["bias"][:, None]))
    y = causal_conv1d(a["x"], a["weight"], a["bias"], a["context"], silu=silu)
    assert_close(y, expected, 1e-12, "with context")
    assert y.is_contiguous() and y.dtype == torch.float64


@pytest.mark.parametrize("name", ["reference"] + (["triton"] if TRITON else []))
@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), d=st.integers(1, 6), l=st.integers(2, 20), k=st.integers(1, 4), data=st.data())
def test_split_sequence_continues_through_the_context(name, b, d, l, k, data):
    """conv(x) == conv(x[:s]) followed by conv(x[s:]) given the last k-1 inputs before s as context."""
    s = data.draw(st.integers(1, l - 1))
    a = {n: None if v is None else v.float().to(DEVICE) for n, v in conv_inputs(b, d, l, k, data.draw(seeds),
                                                                                  torch.float32).items()}
    conv = backends.get(name).causal_conv1d
    whole = conv(a["x"], a["weight"], a["bias"], silu=True)
    xp = torch.cat([a["x"].new_zeros(b, d, k - 1), a["x"]], -1)
    context = xp[:, :, s : s + k - 1]  # the k-1 inputs before position s
    parts = [conv(a["x"][..., :s], a["weight"], a["bias"], silu=True),
             conv(a["x"][..., s:], a["weight"], a["bias"], context, silu=True)]  # fmt: skip
    assert_close(torch.cat(parts, -1).cpu(), whole.cpu(), TOL[torch.float32], f"{name} split at {s}")


# --- the Triton kernels against the reference ---------------------------------------------------------


def check_triton(b, d, l, k, seed, dtype, use, layout, silu, gy_layout="contiguous"):
    ref_args = conv_inputs(b, d, l, k, seed, dtype, use, layout)
    gy = torch.randn(b, l, d, generator=gen(seed + 1), dtype=torch.float64).transpose(1, 2)
    gy = gy.contiguous() if gy_layout == "contiguous" else gy  # 'transposed': dy read through its strides
    for v in ref_args.values():
        if v is not None:
            v.requires_grad_()
    y_ref, g_ref = run(causal_conv1d, ref_args, silu, gy.to(dtype).double())
    args = on_device(ref_args, dtype)
    assert args["x"].stride() == ref_args["x"].stride()
    y, grads = run(backends.get("triton").causal_conv1d, args, silu, gy.to(dtype))
    assert y.dtype == dtype and y.shape == (b, d, l) and y.is_contiguous()
    tol = TOL[dtype]
    assert_close(y.cpu(), y_ref, tol, "y")
    for n, gr in g_ref.items():
        assert grads[n].dtype == args[n].dtype, f"d{n} dtype"
        assert_close(grads[n].cpu(), gr, tol, f"d{n}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_with_everything(dtype):
    """Bias, context, SiLU, a strided x, k=4, l past several tiles and not a multiple of one."""
    check_triton(2, 9, 29, 4, seed=0, dtype=dtype, use=("bias", "context"), layout="strided", silu=True)


@needs_triton
@settings(max_examples=16, deadline=None)
@given(
    b=st.integers(1, 2), d=st.integers(1, 9), l=st.integers(1, 30), k=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES), use=st.sets(st.sampled_from(["bias", "context"])),
    layout=st.sampled_from(["contiguous", "strided"]), gy_layout=st.sampled_from(["contiguous", "transposed"]),
    silu=st.booleans(), seed=seeds,
)  # fmt: skip
def test_triton_matches_the_reference(b, d, l, k, dtype, use, layout, gy_layout, silu, seed):
    """Any sizes (l < k, l not a multiple of the tile, d not a multiple of the tile), any options."""
    check_triton(b, d, l, k, seed % 10_000, dtype, tuple(use), layout, silu, gy_layout)


def assert_rounded_like(actual, expected, what):
    """Two 16-bit results rounded at the same points: equal but for a rare last-place difference where
    the two float32 sums (taken in different orders) straddle a rounding boundary. Where a sum cancels
    (a result far below its terms, e.g. 1e-3 from terms of 0.1), the two sums' orders show at more
    than one of the result's last places: there the bound is 1/16 of a last place of the tensor's
    largest value (seen once in CI: dx 0.001305 against 0.001236, 0.005 of that place). "Rare" is at
    most 1% of the elements, or one element in a tensor of fewer than 100 (seen in CI: one of a dweight's
    8 elements a last place apart, 12.5%)."""
    a, e = actual.detach().cpu().float(), expected.detach().cpu().float()
    assert a.shape == e.shape, what
    eps = torch.finfo(expected.dtype).eps
    ulp = eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(1e-30))))
    bound = torch.maximum(ulp, eps * e.abs().max() / 16) if e.numel() else ulp
    assert ((a - e).abs() <= bound).all(), f"{what}: more than one unit in the last place apart"
    differ = int((a != e).sum())
    assert differ <= max(1, 0.01 * a.numel()), (
        f"{what}: {differ} of {a.numel()} elements differ (rounded at other points?)"
    )


@needs_triton
@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), d=st.integers(1, 9), l=st.integers(8, 30), k=st.integers(2, 4), seed=seeds)
@example(b=1, d=7, l=29, k=3, seed=11410)  # a dx that cancels (see assert_rounded_like)
@example(b=2, d=4, l=18, k=2, seed=18676)  # one last-place difference in a dweight of 8 elements
def test_bf16_rounding_points_match_the_reference(b, d, l, k, seed):
    """Against the reference run in bfloat16 itself (not in float64): the conv rounded once, SiLU on
    the rounded value, dpre rounded before the transposed conv, dw and dbias rounded to bf16. A
    kernel that skipped or added a rounding would differ in the last place at many elements."""
    a = conv_inputs(b, d, l, k, seed, torch.bfloat16)
    args = on_device(a, torch.bfloat16)
    ref = {n: v.detach().cpu().requires_grad_() for n, v in args.items()}  # the same bf16 / fp32 inputs
    gy = torch.randn(b, d, l, generator=gen(seed + 1)).to(torch.bfloat16)
    y_ref, g_ref = run(causal_conv1d, ref, True, gy)
    y, grads = run(backends.get("triton").causal_conv1d, args, True, gy)
    assert_rounded_like(y, y_ref, "y")
    for n in g_ref:
        assert_rounded_like(grads[n].to(torch.bfloat16), g_ref[n].to(torch.bfloat16), f"d{n}")


@needs_triton
def test_empty_sequence_and_the_mamba_ssm_backend():
    """l = 0 gives an empty output; the mamba_ssm backend's conv is our Triton conv."""
    from minijamba.kernels import mamba_ssm

    a = conv_inputs(2, 3, 7, 4, 5, torch.float32)
    x, w, bias, context = (a[n].float().to(DEVICE) for n in ("x", "weight", "bias", "context"))
    conv = backends.get("triton").causal_conv1d
    assert conv(x[..., :0], w).shape == (2, 3, 0)
    assert torch.equal(mamba_ssm.causal_conv1d(x, w, bias, context, True), conv(x, w, bias, context, True))


@pytest.mark.skipif(not GPU or importlib.util.find_spec("causal_conv1d") is None,
                    reason="causal-conv1d's kernel needs a GPU and the package")  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_mamba_ssm_backend_conv_runs_causal_conv1d_and_matches_the_reference(dtype, monkeypatch):
    """Without a context the mamba_ssm backend's conv is causal-conv1d's kernel (Triton's would be
    called otherwise: it is made to fail here), equal to the reference in values and gradients."""
    from minijamba.kernels import mamba_ssm, triton_conv

    monkeypatch.setattr(triton_conv, "causal_conv1d", lambda *a, **k: pytest.fail("not causal-conv1d"))
    a = conv_inputs(2, 64, 300, 4, 11, torch.float32)
    x, w, bias = (a[n].to(DEVICE) for n in ("x", "weight", "bias"))
    x = x.to(dtype).requires_grad_()
    w, bias = w.float().requires_grad_(), bias.float().requires_grad_()
    ours = mamba_ssm.causal_conv1d(x, w, bias, None, True)
    ref = causal_conv1d(x.double(), w.to(dtype).double(), bias.to(dtype).double(), None, True)  # float64
    gy = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (x, w, bias), gy)
    g_ref = torch.autograd.grad(ref, (x, w, bias), gy.double())
    rtol = MODEL_RTOL[dtype]
    assert_close(ours, ref, rtol, "y")
    for name, go, gr in zip(("dx", "dweight", "dbias"), g_ours, g_ref, strict=True):
        assert_close(go, gr, rtol, name)


@needs_triton
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.zeros(3, 4)), r"x must be \(b, d, l\)"),
        (dict(weight=torch.zeros(3, 1, 4)), r"pass conv.weight\[:, 0\]"),
        (dict(weight=torch.zeros(5, 4)), r"weight must be \(d, k\) = \(3, k\)"),
        (dict(bias=torch.zeros(4)), r"bias must be \(3,\)"),
        (dict(context=torch.zeros(2, 3, 4)), r"context must be \(2, 3, 3\)"),
        (dict(x=torch.zeros(2, 3, 7, dtype=torch.float64)), "float32, float16 or bfloat16"),
        (dict(weight=torch.zeros(3, 5), context=torch.zeros(2, 3, 4)), "k <= 4"),
    ],
)  # fmt: skip
def test_bad_inputs_are_a_clear_error(change, match):
    z = torch.zeros
    args = dict(x=z(2, 3, 7), weight=z(3, 4), bias=z(3), context=z(2, 3, 3))  # b=2, d=3, l=7, k=4
    args = {n: v.to(DEVICE) for n, v in {**args, **change}.items()}
    with pytest.raises(ValueError, match=match):
        backends.get("triton").causal_conv1d(**args)


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    if not TRITON or GPU:
        pytest.skip("needs the triton backend on a CPU machine")
    from minijamba.kernels import triton_conv

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_conv.causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 2))


# --- the Mamba layer through the backend ------------------------------------------------------------


@st.composite
def mixers(draw, dtype):
    """A randomly sized MambaMixer with every parameter moved off its initial value."""
    config = JambaConfig.from_preset(
        "tiny", hidden_size=draw(st.integers(1, 6)), num_attention_heads=1, num_key_value_heads=1,
        **mamba_sizes(draw),
    )  # fmt: skip
    torch.manual_seed(draw(seeds))
    mixer = MambaMixer(config)
    mixer.reset_parameters(std=0.5, out_std=0.5)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer.to(dtype)


def old_conv(mixer):
    """The Mamba layer's convolution as mamba.py wrote it before it went through the backend."""

    def conv(xs, weight, bias, context, silu):
        assert silu and weight.shape == (mixer.d, mixer.k) and bias is mixer.conv1d.bias
        b, d, _ = xs.shape
        context = xs.new_zeros(b, d, mixer.k - 1) if context is None else context
        xs = torch.cat([context, xs], dim=-1)
        return F.silu(F.conv1d(xs, mixer.conv1d.weight, mixer.conv1d.bias, groups=d))

    return conv


@contextlib.contextmanager
def through(conv):
    """Inside: every Mamba layer's conv goes through `conv`, with the reference scan."""
    backend = dataclasses.replace(backends.get("reference"), name="patched", causal_conv1d=conv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "get", lambda name=None: backend)
        yield


def mixer_run(mixer, x, gy, mask, autocast):
    """Output, gradients of <out, gy> w.r.t. x and every parameter, then two chunks through a state:
    their outputs and the state left."""
    x = x.detach().requires_grad_()
    params = [x] + list(mixer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = mixer(x, None, mask)
        grads = torch.autograd.grad((y.float() * gy).sum(), params)
        with torch.no_grad():
            b, l = x.shape[:2]
            ssm = x.new_zeros(b, mixer.d, mixer.n, dtype=torch.promote_types(x.dtype, torch.float32))
            state = MambaState(x.new_zeros(b, mixer.d, mixer.k - 1), ssm)
            s = max(1, l // 2)  # l = 2, 3: a decoding step first or second
            chunks = [mixer(x[:, :s], state), mixer(x[:, s:], state)]
    return [y, *grads, *chunks, state.conv, state.ssm]


@settings(max_examples=10, deadline=None)
@given(data=st.data(), b=st.integers(1, 2), l=st.integers(2, 9), autocast=st.booleans(), masked=st.booleans())
def test_mixer_output_and_gradients_are_unchanged(data, b, l, autocast, masked):
    """The Mamba layer through the reference backend's conv gives, bit for bit, what the old inline
    formula gave: float64, or float32 under bf16 autocast; with padding; the state's conv window."""
    mixer = data.draw(mixers(torch.float32 if autocast else torch.float64))
    x = torch.randn(b, l, mixer.in_proj.in_features, generator=gen(data.draw(seeds)), dtype=mixer.D.dtype)
    gy = torch.randn(b, l, x.shape[-1], generator=gen(1), dtype=torch.float32)
    mask = (torch.arange(l) >= torch.randint(0, l, (b, 1), generator=gen(2))) if masked else None
    new = mixer_run(mixer, x, gy, mask, autocast)
    with through(old_conv(mixer)):
        old = mixer_run(mixer, x, gy, mask, autocast)
    for i, (a, e) in enumerate(zip(new, old)):
        assert torch.equal(a, e), f"result {i} changed"


@needs_triton
@settings(max_examples=6, deadline=None)
@given(data=st.data(), b=st.integers(1, 2), l=st.integers(2, 12), autocast=st.booleans())
def test_mixer_through_the_triton_conv_matches_the_reference(data, b, l, autocast):
    """The same Mamba layer with its conv on the Triton kernels (the scan stays the reference's):
    output, gradients, and chunks through a state, in float32 or under bf16 autocast."""
    if GPU:
        pytest.skip("autocast on the CPU; the GPU runs the kernel tests above")
    mixer = data.draw(mixers(torch.float32))
    x = torch.randn(b, l, mixer.in_proj.in_features, generator=gen(data.draw(seeds)))
    gy = torch.randn(b, l, x.shape[-1], generator=gen(1))
    ref = mixer_run(mixer, x, gy, None, autocast)
    with through(backends.get("triton").causal_conv1d):
        got = mixer_run(mixer, x, gy, None, autocast)
    # float32: 1e-3, not MODEL_RTOL's 1e-4: a gradient that nearly cancels (one seen: an RMSNorm
    # weight's) carries the float32 rounding of the larger terms it sums.
    tol = MODEL_RTOL[torch.bfloat16] if autocast else 1e-3
    for i, (a, e) in enumerate(zip(got, ref)):
        assert_close(a, e, tol, f"result {i}")


# --- the benchmark script ---------------------------------------------------------------------------


@needs_triton
def test_gpu_conv_bench_smoke(tmp_path, capsys):
    """bench/gpu_conv.py --smoke runs every code path at tiny sizes (the interpreter on a CPU): its
    check passes and it writes its rows. Timings belong in bench/RESULTS.md, not in tests."""
    spec = importlib.util.spec_from_file_location("gpu_conv", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_conv.json").read_text())
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    impls = {r["impl"] for r in result["rows"]}
    assert {"triton", "reference"} <= impls
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["rows"])
    assert "| triton |" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "gpu_conv.log")

