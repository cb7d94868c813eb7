"""The Mamba layer's causal conv1d on a GPU: our Triton kernels vs the reference (F.conv1d) vs
causal-conv1d's CUDA kernel (`causal_conv1d_fn`, when that package is installed).

bf16, k=4, SiLU fused, bias, at the shapes of the model's Mamba layers: b=4, d=2048, l=2048
(training), b=1, d=2048, l=16384 (prefill) and b=1, d=4096, l=32768. x is what the model hands
the conv: a contiguous (b, d, l) tensor, stride 1 along l (the projection writes it time-last,
minijamba.kernels.time_last); --x-layout strided times the layout before that, a (b, d, l) view of a
(b, l, 2d) tensor, stride 1 along d. For each shape and
implementation: the forward without gradients, and forward + backward (gradients of x, weight and
bias), against the bytes that must move (forward: read x, write y; backward: read x and dy, write
dx) at the copy bandwidth this same run measures. Before timing, triton and causal-conv1d are
checked against the reference on the same inputs (output and the three gradients).

    python bench/gpu_conv.py                   # the table; results in $OUT (or out/bench)
    python bench/gpu_conv.py --sweep           # first try launch shapes; the fastest become CONFIG
    python bench/gpu_conv.py --sweep --sweep-shape training --shapes training
    python bench/gpu_conv.py --compile-check   # also torch.compile(fullgraph=True) through the op
    python bench/gpu_conv.py --smoke           # tiny shapes, on the CPU through Triton's interpreter

Timings are medians of triton.testing.do_bench (CUDA events, warm-up excluded, L2 flushed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPE, K = torch.bfloat16, 4
SHAPES = {"training": (4, 2048, 2048), "prefill": (1, 2048, 16384), "long": (1, 4096, 32768)}
SMOKE_SHAPES = {"smoke": (2, 16, 37)}  # causal-conv1d's channel-last kernel wants d % 8 == 0
# Launch shapes to sweep (BLOCK_L, BLOCK_D, warps): wide in d for the strided layout (stride 1 on d),
# long in l for the time-last one (stride 1 on l), which the model passes since minijamba.kernels.time_last.
FWD_TILES = [(32, 64, 4), (64, 64, 4), (128, 64, 4), (64, 128, 4), (32, 128, 4), (64, 32, 2), (128, 128, 8),
             (256, 8, 4), (256, 16, 4), (512, 8, 4), (128, 16, 4), (256, 32, 8)]  # fmt: skip
BWD_TILES = [  # (BLOCK_L, BLOCK_D, warps, PROGRAMS)
    (64, 32, 4, 1024), (64, 32, 4, 512), (64, 32, 4, 2048), (32, 32, 2, 1024), (64, 64, 4, 1024),
    (32, 64, 4, 1024), (128, 32, 4, 1024), (64, 32, 2, 1024), (128, 64, 8, 1024),
    (256, 8, 4, 1024), (256, 16, 4, 1024), (128, 16, 4, 1024), (512, 8, 4, 1024), (256, 16, 8, 1024),
    (128, 8, 2, 1024), (256, 8, 4, 2048),
]


def timed(fn, rep_ms: int) -> float:
    """Median milliseconds per call: do_bench on a GPU, a few wall-clock calls on the CPU (--smoke)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        try:
            return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
        except torch.OutOfMemoryError:
            return float("nan")
        finally:
            torch.cuda.empty_cache()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, n: int = 10) -> float:
    """GPU busy time per call: the sum of its kernels' times (from the profiler), without the host's
    gaps between launches. Inside a model the host runs ahead of the GPU and these gaps vanish; a
    lone conv at the smaller shapes is bound by Python and autograd (every implementation here)."""
    if not torch.cuda.is_available():
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time for e in kernels) / n / 1e3  # µs -> ms
    except Exception as e:  # the profiler's API moves between versions
        print(f"gpu_ms: {type(e).__name__}: {e}")
        return float("nan")


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy in bytes/s, counting bytes read plus bytes written."""
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), 300)
    return 2 * nbytes / (ms * 1e-3)


X_LAYOUT = "time-last"  # --x-layout


def make_inputs(b, d, l, device, seed=0):
    """x as the model passes it, bf16 taps and bias scaled like the initialised conv's, and an output
    gradient. x: time-last, a contiguous (b, d, l) tensor (the model since minijamba.kernels.time_last), or
    strided, a view of a (b, l, 2d) tensor (the model before it)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    if X_LAYOUT == "strided":
        x = rearrange(r(b, l, 2 * d).to(DTYPE), "b l (two d) -> two b d l", two=2)[0]  # (b, d, l), stride 1 on d
    else:
        x = r(b, d, l).to(DTYPE)  # (b, d, l), stride 1 on l
    return dict(x=x, weight=(0.5 * r(d, K)).to(DTYPE), bias=(0.5 * r(d)).to(DTYPE), dy=r(b, d, l).to(DTYPE))


def implementations():
    """name -> conv(x, weight, bias) with SiLU, for what this machine has."""
    from minijamba.kernels import triton_conv
    from minijamba.model.ssm import causal_conv1d

    impls = {
        "triton": lambda x, w, b: triton_conv.causal_conv1d(x, w, b, silu=True),
        "reference": lambda x, w, b: causal_conv1d(x, w, b, silu=True),
    }
    try:
        from causal_conv1d import causal_conv1d_fn

        impls["causal_conv1d"] = lambda x, w, b: causal_conv1d_fn(x, w, b, activation="silu")
    except ImportError as e:
        print(f"skipping causal_conv1d: not importable ({e})")
    return impls


def fwd_bwd(conv, inp):
    """Forward with gradients, then the gradients of <y, dy> w.r.t. x (the strided view), weight, bias."""
    x, w, b = (inp[n].detach().requires_grad_() for n in ("x", "weight", "bias"))
    y = conv(x, w, b)
    return [y, *torch.autograd.grad(y, [x, w, b], inp["dy"])]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(impls, name, shape, device, log):
    """Each implementation against the reference on the same inputs: y, dx, dweight, dbias."""
    inp = make_inputs(*shape, device, seed=1)
    ref = fwd_bwd(impls["reference"], inp)
    out = []
    for impl, conv in impls.items():
        if impl == "reference":
            continue
        got = fwd_bwd(conv, inp)
        errs = {k: rel(a, r) for k, a, r in zip(("y", "dx", "dweight", "dbias"), got, ref)}
        ok = all(math.isfinite(v) and v < 1e-2 for v in errs.values())
        out.append(dict(shape=name, impl=impl, ok=ok, **errs))
        said = " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + ("" if ok else "  MISMATCH")
        log(f"  check {name} {shape}: {impl} vs reference (relative norm error): {said}")
    return out


def sweep(impls, shape, device, log):
    """Launch shapes at one shape; triton_conv.CONFIG (and PROGRAMS) become the fastest."""
    from minijamba.kernels import triton_conv

    inp = make_inputs(*shape, device)
    fwd, bwd = {}, {}
    for cand in FWD_TILES:
        triton_conv.CONFIG["fwd"] = dict(BLOCK_L=cand[0], BLOCK_D=cand[1], num_warps=cand[2])
        with torch.no_grad():
            fwd[cand] = timed(lambda: impls["triton"](inp["x"], inp["weight"], inp["bias"]), 100)
        log(f"  sweep fwd (BLOCK_L, BLOCK_D, warps)={cand}: {fwd[cand]:.4f} ms")
    best = min(fwd, key=fwd.get)
    triton_conv.CONFIG["fwd"] = dict(BLOCK_L=best[0], BLOCK_D=best[1], num_warps=best[2])
    for cand in BWD_TILES:
        triton_conv.CONFIG["bwd"] = dict(BLOCK_L=cand[0], BLOCK_D=cand[1], num_warps=cand[2])
        triton_conv.PROGRAMS = cand[3]
        bwd[cand] = timed(lambda: fwd_bwd(impls["triton"], inp), 100)
        log(f"  sweep fwd+bwd (BLOCK_L, BLOCK_D, warps, PROGRAMS)={cand}: {bwd[cand]:.4f} ms")
    best = min(bwd, key=bwd.get)
    triton_conv.CONFIG["bwd"] = dict(BLOCK_L=best[0], BLOCK_D=best[1], num_warps=best[2])
    triton_conv.PROGRAMS = best[3]
    log(f"  sweep chose CONFIG = {triton_conv.CONFIG}, PROGRAMS = {triton_conv.PROGRAMS}")


def compile_check(device, log):
    """torch.compile(fullgraph=True) through the triton op (fwd+bwd), then a MambaMixer on the
    triton backend."""
    from minijamba.kernels import triton_conv

    inp = make_inputs(2, 256, 300, device, seed=3)

    def f(x, w, b):
        return triton_conv.causal_conv1d(x, w, b, silu=True)

    try:
        got = fwd_bwd(torch.compile(f, fullgraph=True), inp)
        err = max(rel(a, e) for a, e in zip(got, fwd_bwd(f, inp)))
        log(f"  compile: conv fwd+bwd fullgraph OK, max rel diff to eager {err:.1e}")
    except Exception as e:
        log(f"  compile: conv fwd+bwd FAILED {type(e).__name__}: {str(e)[:300]}")
    try:
        from minijamba import JambaConfig
        from minijamba.model.mamba import MambaMixer

        mixer = MambaMixer(JambaConfig.from_preset("tiny", hidden_size=128, scan_backend="triton")).to(device)
        mixer.reset_parameters()
        h = torch.randn(2, 100, 128, device=device, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yc, ye = torch.compile(mixer, fullgraph=True)(h), mixer(h)
        yc.float().sum().backward()
        log(f"  compile: MambaMixer fwd+bwd fullgraph OK, diff to eager {rel(yc, ye):.1e}")
    except Exception as e:
        log(f"  compile: MambaMixer FAILED {type(e).__name__}: {str(e)[:300]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--sweep", action="store_true", help="first time Triton launch shapes (at --sweep-shape)")
    ap.add_argument("--sweep-shape", default="long", choices=list(SHAPES), help="the shape the sweep times")
    ap.add_argument("--x-layout", default="time-last", choices=["time-last", "strided"],
                    help="how x is laid out: as the model passes it now (time-last), or before minijamba.kernels.time_last")
    ap.add_argument("--compile-check", action="store_true", help="also check torch.compile(fullgraph=True)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on a CPU, in Triton's interpreter")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"), help="folder for gpu_conv.json")
    args = ap.parse_args(argv)
    global X_LAYOUT
    X_LAYOUT = args.x_layout
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        ap.error("no CUDA GPU here: run with --smoke for the CPU check of the script")
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, just below
    device = "cuda" if gpu else "cpu"
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    impls = implementations()
    from minijamba.kernels import triton_conv

    shapes = SMOKE_SHAPES if args.smoke else {n: SHAPES[n] for n in args.shapes.split(",")}
    name = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter)"
    bw = copy_bandwidth(device, 2 << 30 if gpu else 1 << 20)
    log(f"device {name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    if args.compile_check and gpu:
        compile_check(device, log)
    if args.sweep and gpu:
        sweep(impls, SHAPES[args.sweep_shape], device, log)
    checks = [c for n, shape in shapes.items() for c in check(impls, n, shape, device, log)]

    rows = []
    for n, (b, d, l) in shapes.items():
        inp = make_inputs(b, d, l, device)
        elems = b * d * l * inp["x"].element_size()
        floor_f, floor_fb = 2 * elems, 5 * elems  # fwd: x, y; bwd: x, dy, dx
        for impl, conv in impls.items():
            rep = 200 if impl != "reference" else 100
            with torch.no_grad():
                t_f = timed(lambda: conv(inp["x"], inp["weight"], inp["bias"]), rep)
            t_fb = timed(lambda: fwd_bwd(conv, inp), rep)
            g_fb = gpu_ms(lambda: fwd_bwd(conv, inp))
            rows.append(dict(
                shape=n, b=b, d=d, l=l, impl=impl, fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_bwd_gpu_ms=g_fb,
                fwd_floor_ms=floor_f / bw * 1e3, fwd_bwd_floor_ms=floor_fb / bw * 1e3,
                fwd_TBps=floor_f / (t_f * 1e-3) / 1e12, fwd_bwd_TBps=floor_fb / (t_fb * 1e-3) / 1e12,
            ))  # fmt: skip
            log(f"  {n} {(b, d, l)} {impl:<14} fwd {t_f:8.4f} ms  fwd+bwd {t_fb:8.4f} ms (GPU {g_fb:.4f})")
        del inp

    log("")
    x_is = "a strided view of (b, l, 2d)" if X_LAYOUT == "strided" else "(b, d, l) contiguous, time-last"
    log(f"bf16, k={K}, SiLU, bias; x {x_is}. floor = bytes that must move "
        f"(fwd: x, y; bwd: x, dy, dx) / {bw / 1e12:.2f} TB/s copy bandwidth")  # fmt: skip
    log("| shape | b, d, l | impl | fwd ms | fwd TB/s | fwd x floor | fwd+bwd ms | fwd+bwd TB/s | "
        "fwd+bwd x floor | fwd+bwd vs reference | fwd+bwd GPU busy ms |")  # fmt: skip
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["impl"] == "reference" and x["shape"] == r["shape"])
        log(f"| {r['shape']} | {r['b']}, {r['d']}, {r['l']} | {r['impl']} | {r['fwd_ms']:.4f} | "
            f"{r['fwd_TBps']:.2f} | {r['fwd_ms'] / r['fwd_floor_ms']:.2f} | {r['fwd_bwd_ms']:.4f} | "
            f"{r['fwd_bwd_TBps']:.2f} | {r['fwd_bwd_ms'] / r['fwd_bwd_floor_ms']:.2f} | "
            f"{r['fwd_bwd_ms'] / ref['fwd_bwd_ms']:.2f}x | {r['fwd_bwd_gpu_ms']:.4f} |")  # fmt: skip
    log(f"triton CONFIG: {triton_conv.CONFIG}, PROGRAMS: {triton_conv.PROGRAMS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(device=name, torch=torch.__version__, copy_Bps=bw, config=triton_conv.CONFIG,
                  programs=triton_conv.PROGRAMS, checks=checks,
                  rows=rows, date=time.ctime(), command=" ".join(sys.argv))  # fmt: skip
    (out / "gpu_conv.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_conv.log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
