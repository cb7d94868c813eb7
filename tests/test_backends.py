"""Every scan backend computes what the reference computes: outputs, gradients, decoding, states.

The backends under test are those this machine can run. On a CPU-only machine (CI) that is the
reference and our Triton kernels through Triton's interpreter (TRITON_INTERPRET=1, set below before
any kernel is defined; it runs each program in Python, so the sizes here are tiny and the launch
shapes small enough that every test still spans several programs and several time chunks). On a
GPU the same tests run on CUDA tensors with the real launch shapes, and mamba_ssm joins when
installed. The ground truth is `selective_scan_sequential` in float64.

Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,); states (b, d, n).
"""

from __future__ import annotations

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:  # must precede the first import of minijamba.kernels.triton_scan
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import assert_close, gen, seeds  # noqa: E402
from minijamba import kernels as backends  # noqa: E402
from minijamba.model.ssm import selective_scan_sequential, selective_state_update  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
# Relative to the reference's largest value. The kernels compute in float32: float32 inputs agree
# to float32 rounding through exp and sums of l terms; 16-bit inputs agree to the rounding of the
# 16-bit outputs and gradients (8 bits of mantissa for bf16, 11 for fp16).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
FAST = [name for name in backends.available() if name != "reference"]


@pytest.fixture(autouse=True, scope="module")
def _small_launches_in_the_interpreter():
    """Under the interpreter, small tiles: several programs and chunks even at these sizes."""
    if GPU or "triton" not in FAST:
        yield
        return
    from minijamba.kernels import custom_ops, triton_scan, triton_step

    if not custom_ops.interpreting():
        pytest.skip("triton_scan was imported before TRITON_INTERPRET=1 was set in this process")
    saved, saved_step = dict(triton_scan.CONFIG), dict(triton_step.CONFIG)
    small = dict(TI=2, TT=2, num_warps=1)  # chunks of 4 steps: 2 threads of 2 steps
    triton_scan.CONFIG.update(fwd=dict(small, TT=4), fwd_train=small, bwd=small)
    triton_step.CONFIG.update(BD=4, num_warps=1)
    yield
    triton_scan.CONFIG.update(saved)
    triton_step.CONFIG.update(saved_step)


def inputs(b, d, n, l, seed, dtype, softplus=True, use=("D", "z", "delta_bias", "initial_state")):
    """The scan's arguments in float64 on the CPU (the reference's copy), None where not in `use`,
    each already rounded to `dtype` so that the reference sees exactly what the backend sees."""
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    delta = r(b, d, l) if softplus else 0.05 + torch.rand(b, d, l, generator=g, dtype=torch.float64)
    args = dict(
        u=r(b, d, l), delta=delta, A=-torch.exp(0.5 * r(d, n)), B=r(b, n, l), C=r(b, n, l), D=r(d),
        z=r(b, d, l), delta_bias=0.3 * r(d), initial_state=r(b, d, n),
    )  # fmt: skip
    keep_fp32 = ("A", "D", "delta_bias", "initial_state")  # parameters and the state stay float32
    return {
        k: None if (k in ("D", "z", "delta_bias", "initial_state") and k not in use)
        else v.to(torch.float32 if k in keep_fp32 else dtype).double()
        for k, v in args.items()
    }  # fmt: skip


def on_device(args, dtype):
    keep_fp32 = ("A", "D", "delta_bias", "initial_state")
    return {
        k: None if v is None else v.detach().to(DEVICE, torch.float32 if k in keep_fp32 else dtype).requires_grad_()
        for k, v in args.items()
    }


def run(scan, args, softplus, grads_in):
    """Forward with the last state, then gradients of <y, gy> + <last, gl> w.r.t. every input
    (gl None: no gradient through the last state)."""
    names = [k for k, v in args.items() if v is not None]
    y, last = scan(
        args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
        args["delta_bias"], softplus, True, args["initial_state"],
    )  # fmt: skip
    gy, gl = grads_in
    loss = (y.double() * gy.to(y.device)).sum()
    if gl is not None:
        loss = loss + (last.double() * gl.to(y.device)).sum()
    grads = torch.autograd.grad(loss, [args[k] for k in names])
    return y, last, dict(zip(names, grads))


def check_backend(name, b, d, n, l, seed, dtype, softplus=True, use=("D", "z", "delta_bias", "initial_state")):
    ref_args = inputs(b, d, n, l, seed, dtype, softplus, use)
    g = gen(seed + 1)
    grads_in = (torch.randn(b, d, l, generator=g, dtype=torch.float64),
                torch.randn(b, d, n, generator=g, dtype=torch.float64))  # fmt: skip
    if name == "mamba_ssm":  # its backward ignores the last state's gradient: it returns it detached
        grads_in = (grads_in[0], None)
    for v in ref_args.values():
        if v is not None:
            v.requires_grad_()
    y_ref, last_ref, g_ref = run(selective_scan_sequential, ref_args, softplus, grads_in)
    args = on_device(ref_args, dtype)
    y, last, grads = run(backends.get(name).selective_scan, args, softplus, grads_in)
    if name == "mamba_ssm" and args["initial_state"] is None:
        assert not last.requires_grad
    tol = TOL[dtype]
    assert y.dtype == dtype and last.dtype == torch.float32
    assert_close(y.cpu(), y_ref, tol, f"{name} y")
    assert_close(last.cpu(), last_ref, tol, f"{name} last state")
    for k, gr in g_ref.items():
        assert grads[k].dtype == args[k].dtype, f"{name} d{k} dtype"
        assert_close(grads[k].cpu(), gr, tol, f"{name} d{k}")


@pytest.mark.parametrize("name", FAST)
def test_scan_and_gradients_match_the_reference(name):
    """Everything at once: bias + softplus, D, z, initial and last state; l spans several chunks.
    Then without the initial state (mamba_ssm hands calls with one to another backend)."""
    check_backend(name, b=2, d=6, n=3, l=19 if not GPU else 77, seed=0, dtype=torch.float32)
    check_backend(name, b=2, d=6, n=3, l=19 if not GPU else 77, seed=0, dtype=torch.float32, use=("D", "z", "delta_bias"))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_inputs(name, dtype):
    """16-bit inputs, float32 state: the error is the rounding of the 16-bit results, no more."""
    check_backend(name, b=1, d=5, n=4, l=13 if not GPU else 100, seed=1, dtype=dtype, use=("D", "z", "delta_bias"))


@pytest.mark.parametrize("fwd_tt, bwd_tt", [(4, 2), (2, 4), (8, 2)])
def test_forward_and_backward_may_chunk_differently(fwd_tt, bwd_tt, monkeypatch):
    """The forward before a backward saves the state entering each of the backward's chunks, whether
    its own chunks are longer or shorter: the gradients do not change. A backward chunk that does not
    start on a thread's run is a clear error."""
    if "triton" not in FAST:
        pytest.skip("needs the triton backend")
    from minijamba.kernels import triton_scan

    def tile(k):  # k threads under the interpreter; k warps of 32 threads on a GPU
        return dict(TI=2, TT=k, num_warps=1) if not GPU else dict(TI=8, TT=32 * k, num_warps=k)

    cfg = dict(triton_scan.CONFIG, fwd_train=tile(fwd_tt), bwd=tile(bwd_tt))
    monkeypatch.setattr(triton_scan, "CONFIG", cfg)
    check_backend("triton", b=1, d=3, n=2, l=21 if not GPU else 1500, seed=4, dtype=torch.float32)
    tb = cfg["bwd"]["TI"] * cfg["bwd"]["TT"]
    monkeypatch.setattr(triton_scan, "CONFIG", dict(cfg, fwd_train=dict(tile(fwd_tt), TI=2 * tb)))
    a = on_device(inputs(1, 2, 2, 5, 6, torch.float32), torch.float32)
    with pytest.raises(ValueError, match="multiple of the forward's TI"):
        triton_scan.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"])


@pytest.mark.parametrize("name", FAST)
@settings(max_examples=4 if not GPU else 8, deadline=None)
@given(
    b=st.integers(1, 2), d=st.integers(1, 9), n=st.integers(1, 5), l=st.integers(1, 20 if not GPU else 300),
    softplus=st.booleans(), use=st.sets(st.sampled_from(["D", "z", "delta_bias", "initial_state"])),
    seed=seeds,
)  # fmt: skip
def test_any_shape_and_options(name, b, d, n, l, softplus, use, seed):
    """Any sizes (n not a power of two, l not a multiple of the chunk), any subset of the options."""
    check_backend(name, b, d, n, l, seed % 10_000, torch.float32, softplus, tuple(use))


@pytest.mark.parametrize("name", FAST)
def test_decoding_step_matches_the_reference(name):
    """One step on a cached state: output and the in-place state update, z taken as a strided view."""
    b, d, n = 3, 7, 5
    a = inputs(b, d, n, 1, seed=2, dtype=torch.float32)
    g = gen(3)
    state = torch.randn(b, d, n, generator=g)
    z_wide = torch.randn(b, 2 * d, generator=g)  # z as the model slices it: a view with stride 2d
    args = dict(x=a["u"][..., 0], dt=a["delta"][..., 0], A=a["A"], B=a["B"][..., 0], C=a["C"][..., 0], D=a["D"])
    f32 = {k: v.float() for k, v in args.items()}
    s_ref = state.clone()
    y_ref = selective_state_update(s_ref, **f32, z=z_wide[:, d:], dt_bias=a["delta_bias"].float(), dt_softplus=True)
    s = state.to(DEVICE)
    dev = {k: v.to(DEVICE) for k, v in f32.items()}
    y = backends.get(name).selective_state_update(
        s, **dev, z=z_wide.to(DEVICE)[:, d:], dt_bias=a["delta_bias"].float().to(DEVICE), dt_softplus=True
    )
    assert_close(y.cpu(), y_ref, TOL[torch.float32], f"{name} step y")
    assert_close(s.cpu(), s_ref, TOL[torch.float32], f"{name} step state")


@pytest.mark.parametrize("name", FAST)
def test_scan_equals_decoding_steps_and_split_scans(name):
    """A scan over l tokens = l decoding steps = a scan of the first part continued from its last state."""
    b, d, n, l, k = 2, 5, 4, 11, 6
    a = {k_: None if v is None else v.float().to(DEVICE) for k_, v in inputs(b, d, n, l, 4, torch.float32).items()}
    be = backends.get(name)
    common = dict(D=a["D"], delta_bias=a["delta_bias"], delta_softplus=True, return_last_state=True)
    y, last = be.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], z=a["z"], **common)
    # The same, in two calls: the second starts from the first's last state.
    sl = lambda t, s: t[..., s]  # noqa: E731
    y1, h = be.selective_scan(*(sl(a[x], slice(0, k)) for x in ("u", "delta")), a["A"],
                              *(sl(a[x], slice(0, k)) for x in ("B", "C")), z=sl(a["z"], slice(0, k)), **common)
    y2, last2 = be.selective_scan(*(sl(a[x], slice(k, l)) for x in ("u", "delta")), a["A"],
                                  *(sl(a[x], slice(k, l)) for x in ("B", "C")), z=sl(a["z"], slice(k, l)),
                                  initial_state=h, **common)  # fmt: skip
    assert_close(torch.cat([y1, y2], -1).cpu(), y.cpu(), TOL[torch.float32], "split scan y")
    assert_close(last2.cpu(), last.cpu(), TOL[torch.float32], "split scan last state")
    # And one token at a time through the decoding step.
    state = torch.zeros(b, d, n, device=DEVICE)
    steps = [
        be.selective_state_update(state, a["u"][..., t], a["delta"][..., t], a["A"], a["B"][..., t],
                                  a["C"][..., t], a["D"], a["z"][..., t], a["delta_bias"], True)
        for t in range(l)
    ]  # fmt: skip
    assert_close(torch.stack(steps, -1).cpu(), y.cpu(), TOL[torch.float32], "decoding steps y")
    assert_close(state.cpu(), last.cpu(), TOL[torch.float32], "decoding steps state")


@pytest.mark.parametrize("name", FAST)
def test_empty_sequence_passes_the_state_through(name):
    a = {k: None if v is None else v.float().to(DEVICE) for k, v in inputs(1, 3, 2, 0, 5, torch.float32).items()}
    y, last = backends.get(name).selective_scan(
        a["u"], a["delta"], a["A"], a["B"], a["C"], return_last_state=True, initial_state=a["initial_state"]
    )
    assert y.shape == (1, 3, 0)
    assert torch.equal(last.cpu(), a["initial_state"].cpu())


# --- the dispatch point ---------------------------------------------------------------------------


def test_unknown_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scan backend 'nope'"):
        backends.get("nope")
    missing = [name for name in backends.names() if backends.why_unavailable(name) is not None]
    for name in missing:
        with pytest.raises(ValueError, match=f"'{name}' is not available here: .*Install: "):
            backends.get(name)


def test_reference_is_always_available_and_fast_picks_an_available_one():
    assert "reference" in backends.available()
    best = backends.best_available()
    assert best in backends.available()
    if not GPU:
        assert best == "cpu"  # the interpreter is for tests, never for speed
    assert backends.get("fast").name == best
    if GPU and "triton" in FAST:
        assert best == "triton"  # faster forward and backward, and torch.compile sees through it (RESULTS.md)
    elif GPU and "mamba_ssm" in FAST:
        assert best == "mamba_ssm"  # the fallback where Triton is not installed
    from minijamba.runtime import scan_backend_for

    assert scan_backend_for(True) == backends.best_available()
    assert scan_backend_for(False) is None  # no --fast: the environment variable, else the reference


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    if "triton" not in FAST or GPU:
        pytest.skip("needs the triton backend on a CPU machine")
    from minijamba.kernels import triton_scan

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = inputs(1, 2, 2, 3, 6, torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_scan.selective_scan(a["u"].float(), a["delta"].float(), a["A"].float(), a["B"].float(), a["C"].float())


def test_command_line_listing():
    out = subprocess.run(
        [sys.executable, "-m", "minijamba.kernels"], capture_output=True, text=True, check=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    ).stdout  # fmt: skip
    for name in backends.names():
        assert name in out
    assert f"--fast picks: {backends.best_available() if GPU else 'cpu'}" in out


# --- every primitive, through the model -------------------------------------------------------------


@pytest.mark.parametrize("name", FAST)
def test_the_model_on_each_backend_equals_the_reference(name):
    """The whole model, every primitive at once (scan, decoding step, conv, the projections into and
    out of time-last, the experts): the logits, the gradient of every parameter, and a cached
    decoding step, against the reference backend."""
    from minijamba import Jamba, JambaConfig

    def build(backend):
        config = JambaConfig.from_preset("tiny", vocab_size=64, hidden_size=16, intermediate_size=16,
                                         num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                                         attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
                                         mamba_dt_rank=2, scan_backend=backend)  # fmt: skip
        torch.manual_seed(0)
        return Jamba(config).to(DEVICE)

    ref, fast = build("reference"), build(name)
    ids = torch.randint(0, 64, (2, 9), generator=gen(1)).to(DEVICE)
    _, loss_ref = ref(ids, targets=ids)
    _, loss = fast(ids, targets=ids)
    loss_ref.backward()
    loss.backward()
    assert_close(loss.detach().cpu(), loss_ref.detach().cpu(), 1e-5, f"{name} loss")
    for (pname, p_ref), (_, p) in zip(ref.named_parameters(), fast.named_parameters()):
        assert_close(p.grad.cpu(), p_ref.grad.cpu(), 1e-3, f"{name} d{pname}")
    with torch.no_grad():
        states = [m.new_state(2, 10) for m in (ref, fast)]
        for m, s in zip((ref, fast), states):
            m(ids, state=s)
        step = [m(ids[:, :1], state=s) for m, s in zip((ref, fast), states)]
    assert_close(step[1].cpu(), step[0].cpu(), 1e-4, f"{name} decoding step")
