"""The selective scan on a GPU: our Triton kernels vs mamba-ssm's CUDA kernel vs the PyTorch reference.

Issue 5, point 1: b=1, d=4096, n=16, l in {2K, 8K, 32K}, bf16, with everything Jamba passes (bias +
softplus on Δ, D, the SiLU(z) gate). For each backend and length: forward time (inference, no
grad) and forward+backward time, the bytes each must move at the least, and how far each is from
that floor at the copy bandwidth this same run measures. Before timing, every backend is checked
against the others on the same large inputs (outputs and all gradients).

    python bench/gpu_scan.py                     # the table; --sweep first tries the launch shapes
    python bench/gpu_scan.py --lengths 2048 --backends triton,mamba_ssm --compile-check

Timings are medians of triton.testing.do_bench (CUDA events, warm-up excluded). The reference's
forward+backward at 32K needs more memory than an 80 GB card has: the table then says OOM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_copy  # noqa: E402
from minijamba import kernels as backends  # noqa: E402
from minijamba.model import dispatch  # noqa: E402
from minijamba.kernels import triton_scan, triton_step  # noqa: E402

DTYPE = torch.bfloat16


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy in bytes/s, counting bytes read plus bytes written."""
    x = torch.randn(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    del x, y
    return 2 * nbytes / (ms * 1e-3)


def make_inputs(b, d, n, l, seed=0):
    """Inputs shaped and scaled like a Jamba Mamba layer's, bf16 activations, fp32 parameters."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=DTYPE: torch.randn(*s, generator=g, device="cuda").to(dt)  # noqa: E731
    dt_init = torch.exp(torch.rand(d, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=r(b, d, l), delta=0.5 * r(b, d, l), A=-torch.arange(1, n + 1, device="cuda").float().repeat(d, 1)
        * torch.exp(0.1 * r(d, n, dt=torch.float32)),
        B=r(b, n, l), C=r(b, n, l), D=r(d, dt=torch.float32), z=r(b, d, l),
        delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # softplus(bias) = dt_init
    )  # fmt: skip


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def call(name, x, **kw):
    return backends.get(name).selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, **kw
    )


def fwd_bwd(name, x, gy):
    """Forward with gradients, then the gradients of <y, gy> w.r.t. every input."""
    xs = {k: v.detach().requires_grad_() for k, v in x.items()}
    y = call(name, xs)
    return y, torch.autograd.grad(y, [xs[k] for k in GRAD_ARGS], gy)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def floors(b, d, n, l, elt=2):
    """Bytes that must move: each input read once and each output written once, per pass."""
    fwd = (3 * b * d * l + 2 * b * n * l) * elt + b * d * l * elt  # read u, Δ, z, B, C; write y
    bwd = (4 * b * d * l + 2 * b * n * l) * elt + (3 * b * d * l + 2 * b * n * l) * elt  # + dout; du dΔ dz dB dC
    return fwd, fwd + bwd


def timed(fn, rep_ms):
    try:
        ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    except torch.OutOfMemoryError:
        ms = float("nan")
    torch.cuda.empty_cache()
    return ms


def add_backend_from_file(name, path):
    """Register another copy of triton_scan.py (its own CONFIG and kernels) as a scan backend."""
    mod = scan_copy.load(path, f"minijamba_{name}")
    # (the decoding step is ours: it lives in triton_step.py, which the copies do not vary)
    dispatch.register(name, lambda: dataclasses.replace(
        backends.get("triton"), name=name, selective_scan=mod.selective_scan,
        selective_state_update=triton_step.selective_state_update))  # fmt: skip


def check(names, b, d, n, l, log):
    """Every backend against every other on the same inputs: y and all eight gradients."""
    x = make_inputs(b, d, n, l, seed=1)
    gy = torch.randn(b, d, l, device="cuda").to(DTYPE)
    res = {}
    for name in names:
        try:
            y, grads = fwd_bwd(name, x, gy)
            res[name] = [y] + list(grads)
        except torch.OutOfMemoryError:
            log(f"  check l={l}: {name} OOM")
        torch.cuda.empty_cache()
    keys = ["y"] + ["d" + k for k in GRAD_ARGS]
    base = "reference" if "reference" in res else next(iter(res))
    for name in res:
        if name == base:
            continue
        errs = {k: rel(a, r) for k, a, r in zip(keys, res[name], res[base])}
        worst = max(errs, key=errs.get)
        log(f"  check l={l}: {name} vs {base}: max rel err {errs[worst]:.2e} ({worst}); "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))  # fmt: skip
        if not all(math.isfinite(v) and v < 3e-2 for v in errs.values()):
            log(f"  check l={l}: MISMATCH {name} vs {base}")
    del res, x
    torch.cuda.empty_cache()


def kernel_report(jitfn, before):
    """Registers and spills of the kernels compiled since `before` (a set of cache keys)."""
    try:
        cache = next(iter(jitfn.device_caches.values()))[0]
        return [(k.n_regs, k.n_spills) for key, k in cache.items() if key not in before]
    except Exception as e:  # the cache layout differs between Triton versions
        return f"n/a ({type(e).__name__})"


def cache_keys(jitfn):
    try:
        return set(next(iter(jitfn.device_caches.values()))[0])
    except Exception:
        return set()


# (TI steps per thread, warps); TT = 32 threads x warps.
FWD_TILES = [(8, 1), (4, 1), (16, 1), (8, 2), (8, 4), (4, 2)]
BWD_TILES = [(4, 1), (8, 1), (2, 1), (4, 2), (4, 4), (8, 2)]


def tile(ti, w):
    return dict(TI=ti, TT=32 * w, num_warps=w)


def sweep(b, d, n, l, log):
    """Try launch shapes (TI, warps) at one length; set triton_scan.CONFIG to the fastest. The
    backward first (the forward before it saves states at the backward's chunks), then the forward
    before a backward alone (the custom op, saving states), then the inference forward."""
    x = make_inputs(b, d, n, l)
    gy = torch.randn(b, d, l, device="cuda").to(DTYPE)
    xs = {k: v.detach().requires_grad_() for k, v in x.items()}
    fwd, fwd_train, bwd = {}, {}, {}

    def attempt(table, cand, kernel, what, fn):
        before = cache_keys(kernel)
        try:
            table[cand] = timed(fn, 100)
        except Exception as e:
            log(f"  sweep {what} {cand}: failed {type(e).__name__}: {str(e)[:200]}")
            return
        log(f"  sweep {what} (TI, warps)={cand}: {table[cand]:8.3f} ms  regs/spills {kernel_report(kernel, before)}")

    for cand in BWD_TILES:
        triton_scan.CONFIG["fwd_train"] = triton_scan.CONFIG["bwd"] = tile(*cand)
        y = call("triton", xs)
        attempt(bwd, cand, triton_scan._bwd_kernel, "bwd",
                lambda: torch.autograd.grad(y, [xs[k] for k in GRAD_ARGS], gy, retain_graph=True))  # fmt: skip
    triton_scan.CONFIG["bwd"] = tile(*min(bwd, key=bwd.get))
    op = torch.ops.minijamba.triton_scan_fwd
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for cand in FWD_TILES:
        triton_scan.CONFIG["fwd_train"] = triton_scan.CONFIG["fwd"] = tile(*cand)
        attempt(fwd_train, cand, triton_scan._fwd_kernel, "fwd_train", lambda: op(*args, None, True, True))
        with torch.no_grad():
            attempt(fwd, cand, triton_scan._fwd_kernel, "fwd", lambda: call("triton", x))
    triton_scan.CONFIG.update(fwd=tile(*min(fwd, key=fwd.get)), fwd_train=tile(*min(fwd_train, key=fwd_train.get)))
    log(f"  sweep chose CONFIG = {triton_scan.CONFIG}")
    del x, xs, gy
    torch.cuda.empty_cache()


def graphed(fn):
    """fn captured in a CUDA graph: its GPU time without the host's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_profile(nm, step, log, calls=50):
    """The host's time per call (the GPU waits for it when it is longer than the kernels), and
    where it goes: the functions with the most time of their own, from cProfile."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    top = [ln.strip() for ln in out.getvalue().splitlines() if ln.strip()[:1].isdigit()][:12]
    log(f"    host time per call {host * 1e3:.3f} ms (no profiler); cProfile, own time over {calls} calls:")
    for ln in top:
        log(f"      {ln[:150]}")


def parts(names, b, d, n, lengths, log):
    """Where forward+backward's time goes: each pass alone, the whole step eagerly and as a CUDA graph
    (the difference is host overhead), and the kernels of one step from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for l in lengths:
        x = make_inputs(b, d, n, l)
        gy = torch.randn(b, d, l, device="cuda").to(DTYPE)
        xs = {k: v.detach().requires_grad_() for k, v in x.items()}
        for nm in names:
            step = lambda: fwd_bwd(nm, x, gy)  # noqa: E731
            eager = timed(step, 200)
            try:
                in_graph = timed(graphed(step), 200)
            except Exception as e:
                in_graph = float("nan")
                log(f"  parts l={l} {nm}: graph capture failed ({type(e).__name__}: {str(e)[:160]})")
            extra = ""
            if nm == "triton":
                y = call(nm, xs)
                bwd = timed(lambda: torch.autograd.grad(y, [xs[k] for k in GRAD_ARGS], gy, retain_graph=True), 200)
                extra = f"  backward alone {bwd:7.3f} ms"
            log(f"  parts l={l:>6} {nm:<10} fwd+bwd eager {eager:7.3f} ms  in a CUDA graph {in_graph:7.3f} ms{extra}")
            host_profile(nm, step, log)
            try:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                kernels = sorted(
                    ((e.key, e.device_time_total / 5e3) for e in prof.key_averages() if e.device_time_total > 0),
                    key=lambda kv: -kv[1],
                )  # fmt: skip
                log("    kernels per step (ms): " + "; ".join(f"{k[:60]} {v:.3f}" for k, v in kernels[:8]))
            except Exception as e:  # a profile is a bonus
                log(f"    profile failed: {type(e).__name__}: {str(e)[:160]}")
        del x, xs, gy
        torch.cuda.empty_cache()


def compile_check(log):
    """torch.compile(fullgraph=True) through the triton backend: scan fwd+bwd, decoding step, MambaMixer."""
    b, d, n, l = 2, 256, 16, 300
    x = make_inputs(b, d, n, l, seed=3)
    gy = torch.randn(b, d, l, device="cuda").to(DTYPE)

    def f(u, delta, A, B, C, D, z, bias):
        return triton_scan.selective_scan(u, delta, A, B, C, D, z, bias, True)

    try:
        xs = {k: v.detach().requires_grad_() for k, v in x.items()}
        y = torch.compile(f, fullgraph=True)(*(xs[k] for k in GRAD_ARGS))
        g = torch.autograd.grad(y, [xs[k] for k in GRAD_ARGS], gy)
        y0, g0 = fwd_bwd("triton", x, gy)
        err = max([rel(y, y0)] + [rel(a, r) for a, r in zip(g, g0)])
        log(f"  compile: scan fwd+bwd fullgraph OK, max rel diff to eager {err:.1e}")
    except Exception as e:
        log(f"  compile: scan fwd+bwd FAILED {type(e).__name__}: {str(e)[:300]}")
    try:
        state = torch.randn(b, d, n, device="cuda")
        s2 = state.clone()
        step_args = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
                     x["delta_bias"], True)  # fmt: skip
        yc = torch.compile(triton_step.selective_state_update, fullgraph=True)(state, *step_args)
        ye = triton_step.selective_state_update(s2, *step_args)
        log(f"  compile: decoding step fullgraph OK, diff y {rel(yc, ye):.1e} state {rel(state, s2):.1e}")
    except Exception as e:
        log(f"  compile: decoding step FAILED {type(e).__name__}: {str(e)[:300]}")
    try:
        from minijamba import JambaConfig
        from minijamba.model.mamba import MambaMixer

        cfg = JambaConfig.from_preset("tiny", hidden_size=128, scan_backend="triton")
        mixer = MambaMixer(cfg).cuda()
        mixer.reset_parameters()
        h = torch.randn(2, 100, 128, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yc = torch.compile(mixer, fullgraph=True)(h)
            ye = mixer(h)
        yc.float().sum().backward()
        log(f"  compile: MambaMixer fwd+bwd fullgraph OK, diff to eager {rel(yc, ye):.1e}")
    except Exception as e:
        log(f"  compile: MambaMixer FAILED {type(e).__name__}: {str(e)[:300]}")


def step_timing(names, b, d, n, bw, log):
    """The decoding step (one token): reads and writes the (b, d, n) float32 state, so its floor is
    2 * 4 * b * d * n bytes; at b=1 it is bound by launch overhead, which a CUDA graph removes."""
    x = make_inputs(b, d, n, 1, seed=4)
    args = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
            x["delta_bias"], True)  # fmt: skip
    for nm in names:
        state = torch.randn(b, d, n, device="cuda")
        fn = backends.get(nm).selective_state_update
        eager = timed(lambda: fn(state, *args), 100)
        try:
            in_graph = timed(graphed(lambda: fn(state, *args)), 100)
        except Exception as e:
            in_graph = float("nan")
            log(f"  step {nm}: CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]})")
        log(f"  decode step b={b} d={d} n={n} {nm:<10} eager {eager * 1e3:7.1f} us  in a CUDA graph {in_graph * 1e3:7.1f} us"
            f"  (state floor {8 * b * d * n / bw * 1e6:.2f} us)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--backends", default="triton,mamba_ssm,reference")
    ap.add_argument("--sweep", action="store_true", help="first try the Triton launch shapes")
    ap.add_argument("--sweep-length", type=int, default=8192, help="the sequence length of the sweep")
    ap.add_argument("--compile-check", action="store_true", help="also check torch.compile(fullgraph=True)")
    ap.add_argument("--parts", action="store_true",
                    help="where forward+backward's time goes (passes alone, host overhead, kernels), then stop")
    ap.add_argument("--check-lengths", default="2048,32768", help="lengths for the cross-backend check")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"), help="folder for results.json")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH",
                    help="also time another version of triton_scan.py (e.g. the previous one) as backend NAME")
    args = ap.parse_args()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    for spec in args.extra:  # NAME=PATH: another version of triton_scan.py, timed beside ours
        name, path = spec.split("=", 1)
        add_backend_from_file(name, path)
    extra = {nm for nm in dispatch.names() if nm not in backends.INSTALL_HINT and nm not in ("reference", "cpu")}
    names = [nm for nm in args.backends.split(",") if nm in extra or backends.why_unavailable(nm) is None]
    for nm in set(args.backends.split(",")) - set(names):
        log(f"skipping {nm}: {backends.why_unavailable(nm)}")
    b, d, n = args.b, args.d, args.n
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    log(f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")  # fmt: skip
    if args.compile_check:
        compile_check(log)
    if args.sweep and "triton" in names:
        sweep(b, d, n, args.sweep_length, log)
    if args.parts:
        parts(names, b, d, n, list(map(int, args.lengths.split(","))), log)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_scan_parts.log").write_text("\n".join(lines) + "\n")
        return
    for l in map(int, args.check_lengths.split(",")):
        check([nm for nm in names if nm != "reference" or l <= 8192], b, d, n, l, log)

    rows = []
    for l in map(int, args.lengths.split(",")):
        x = make_inputs(b, d, n, l)
        gy = torch.randn(b, d, l, device="cuda").to(DTYPE)
        f_bytes, fb_bytes = floors(b, d, n, l)
        for nm in names:
            rep = 300 if nm != "reference" else 100
            with torch.no_grad():
                t_f = timed(lambda: call(nm, x), rep)
            t_fb = timed(lambda: fwd_bwd(nm, x, gy), rep)
            try:  # the same step replayed as a CUDA graph: the GPU's time without the host's
                t_fb_graph = timed(graphed(lambda: fwd_bwd(nm, x, gy)), rep)
            except Exception as e:  # e.g. out of memory for the reference at long lengths
                t_fb_graph = float("nan")
                log(f"  l={l} {nm}: no CUDA graph ({type(e).__name__}: {str(e)[:120]})")
            row = dict(backend=nm, l=l, fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_bwd_graph_ms=t_fb_graph,
                       fwd_floor_ms=f_bytes / bw * 1e3, fwd_bwd_floor_ms=fb_bytes / bw * 1e3,
                       fwd_TBps=f_bytes / (t_f * 1e-3) / 1e12, fwd_bwd_TBps=fb_bytes / (t_fb * 1e-3) / 1e12)  # fmt: skip
            rows.append(row)
            log(f"  l={l:>6} {nm:<10} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms  (in a CUDA graph {t_fb_graph:8.3f} ms)")
        del x, gy
        torch.cuda.empty_cache()

    log("")
    log(f"b={b} d={d} n={n} bf16, bias+softplus, D, z.  floor = bytes that must move / {bw / 1e12:.2f} TB/s copy bandwidth")
    log("| l | backend | fwd ms | fwd x floor | fwd TB/s | fwd+bwd ms | fwd+bwd x floor | fwd+bwd TB/s | fwd+bwd vs mamba_ssm "
        "| fwd+bwd in a CUDA graph ms | graph vs mamba_ssm's graph |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = [x for x in rows if x["backend"] == "mamba_ssm" and x["l"] == r["l"]]
        vs = f"{r['fwd_bwd_ms'] / m[0]['fwd_bwd_ms']:.2f}x" if m else "-"
        vs_graph = f"{r['fwd_bwd_graph_ms'] / m[0]['fwd_bwd_graph_ms']:.2f}x" if m else "-"
        log(f"| {r['l']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_ms'] / r['fwd_floor_ms']:.1f} | "
            f"{r['fwd_TBps']:.2f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_ms'] / r['fwd_bwd_floor_ms']:.1f} | "
            f"{r['fwd_bwd_TBps']:.2f} | {vs} | {r['fwd_bwd_graph_ms']:.3f} | {vs_graph} |")  # fmt: skip
    step_timing(names, b, d, n, bw, log)
    log(f"triton CONFIG: {triton_scan.CONFIG}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scan.json").write_text(json.dumps(dict(device=props.name, copy_Bps=bw, rows=rows,
                                                       config=triton_scan.CONFIG, date=time.ctime()), indent=1))  # fmt: skip
    (out / "gpu_scan.log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
