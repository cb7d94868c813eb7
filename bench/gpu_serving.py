"""Serving throughput of Jamba-v0.1 (int8 experts) on one GPU capped at 80 GiB: the paper's Figure 3 (issue 17).

Parts (each `--parts` name):

    batch     (Figure 3a) decoding throughput against batch size at an 8K prompt and 512 new tokens,
              the hybrid against the all-attention layout of the same widths. A batch is timed
              when the serving memory plan fits it in the cap (`memory_plan.serving_plan`, each
              prompt prefilled alone as `minijamba.inference.serving` does), else recorded as not
              fitting, with the most slots that would. The rows stand at different positions
              around prompt + new/2 (the middle of the 512 new tokens), as slots refilled at
              different times do, and each step is `DecodeStep.rows`: one CUDA graph replay.
    context   (Figure 3b) the same at batch 1, against the context (4K to 256K).
    compile   the step torch.compile-d before capture, at the --compile-batches.
    engine    `generate_many` end to end: --engine-prompts random prompts of --engine-len tokens,
              --engine-new new tokens each, in --engine-slots slots (prefill included).
    profile   where a decoding step's time goes, at --profile-batches: CUDA kernels by kind
              (torch.profiler over 5 graph replays), with their count a step.
    prefill   prefill tokens/s of one 8-layer block of Jamba-v0.1 (so bf16 experts fit): bf16
              experts, and int8 experts through our Triton grouped kernel, dequantized into one
              bf16 grouped GEMM, and through the reference (each expert cast to bf16, one cuBLAS
              matmul), with the MFU (bench/serving_prefill.py).

The decoding state's content does not change a step's time (every position is read), so a context
is set up by marking its positions seen instead of prefilling it (as bench/gpu_decode_batched.py).
The tokens fed are drawn at random, so that a batch routes to the experts as real traffic does (a
batch of equal rows would read only K experts a layer, and time a step that serving never sees).
Every decoding row carries its bandwidth bound: the bytes a step must read (the non-expert weights,
the experts the batch routes to, 1 - (1 - K/E)^b of each layer's expected under uniform routing,
the KV cache at each row's length, the Mamba states read and written) at the copy bandwidth
measured in the same run.

    python bench/gpu_serving.py --out $OUT/serving.json
    python bench/gpu_serving.py --smoke            # a tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.inference.cuda_graph import DecodeStep  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.inference.memory_plan import GiB, largest_batch, serving_plan, weight_bytes  # noqa: E402
from minijamba.inference.serving import generate_many  # noqa: E402
from minijamba.model.config import JambaConfig  # noqa: E402
from minijamba.model.state import plan_nbytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_prefill import prefill_rows  # noqa: E402

SMOKE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_dt_rank=8,
)  # fmt: skip
RESULTS: list[dict] = []


def emit(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)
    RESULTS.append(row)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def step_bytes(config: JambaConfig, batch: int, context: int, quantize) -> int:
    """The bytes one decoding step must move at this batch and context (module docstring)."""
    w = weight_bytes(config, torch.bfloat16, quantize)
    experts = sum(v for k, v in w.items() if k.startswith("expert"))
    E, K = config.num_experts, config.num_experts_per_tok
    touched = 1 - (1 - K / E) ** batch if E > 1 else 1.0
    state = plan_nbytes(config, batch, context, torch.bfloat16)
    return int(sum(w.values()) - experts + touched * experts + state["kv_cache"]
               + 2 * (state["ssm_state"] + state["conv_state"]))  # fmt: skip


def time_decode(model, batch: int, context: int, steps: int, warmup: int, graph: bool, compile=False) -> dict:
    """Mean decoding step over `steps`, rows at lengths spread over context - 32 .. context + 31."""
    device = model.embed_tokens.weight.device
    spread = [context + (37 * i) % 64 - 32 for i in range(batch)] if batch > 1 else [context]
    state = model.new_state(batch, max(spread) + warmup + steps + 1)
    for row, n in enumerate(spread):
        state.valid[row, :n] = True
    step = DecodeStep(model, state, graph=graph, bucket=1024, compile=compile)
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, batch), device=device)
    ends = [n + 1 for n in spread]
    t_capture = time.perf_counter()
    for i in range(warmup):
        step.rows(tokens[i], ends)
        ends = [e + 1 for e in ends]
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step.rows(tokens[i], ends)
        ends = [e + 1 for e in ends]
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    out = dict(batch=batch, context=context, step_ms=1e3 * dt, tokens_per_s=batch / dt,
               warmup_s=t0 - t_capture)  # fmt: skip
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    del step, state
    return out


def decode_row(model, part, layout, batch, context, args, bandwidth, cap, compile=False):
    config = model.config
    plan = serving_plan(config, context + 64 + args.steps + args.warmup, batch, chunk=args.prefill_chunk,
                        quantize=args.quantize, scan_backend=config.scan_backend)  # fmt: skip
    row = dict(part=part, layout=layout, batch=batch, context=context, compiled=bool(compile),
               int8_rows=int8_rows(), plan_gib=plan.total / GiB)  # fmt: skip
    if plan.total > cap:
        row.update(fits=False, largest_batch=largest_batch(config, context, cap, chunk=args.prefill_chunk,
                                                           quantize=args.quantize, scan_backend=config.scan_backend))  # fmt: skip
        emit(row)
        return
    try:
        row.update(fits=True, **time_decode(model, batch, context, args.steps, args.warmup, args.graph, compile))
    except torch.OutOfMemoryError as e:
        row.update(fits=False, error=f"out of memory: {str(e)[:120]}")
    if "step_ms" in row and bandwidth == bandwidth:  # not NaN
        bound_s = step_bytes(config, batch, context, args.quantize) / bandwidth
        row.update(bound_ms=1e3 * bound_s, bound_tokens_per_s=batch / bound_s,
                   of_bound=bound_s / (row["step_ms"] / 1e3))  # fmt: skip
    emit(row)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def int8_rows():
    """minijamba.kernels.int8_matmul's [ROWS_MAX, MAGIC] (ROWS_MAX -1: the tl.dot kernel only), None
    without Triton."""
    try:
        from minijamba.kernels import int8_matmul
    except ImportError:
        return None
    return [int8_matmul.ROWS_MAX, int8_matmul.MAGIC]


def ab_rows(variants):
    """Set int8_matmul's ROWS_MAX and MAGIC to each (rows_max, magic) in turn, None keeping the code's
    value: the A/B of the multiply-and-sum kernel and of its int8 -> float conversion."""
    from minijamba.kernels import int8_matmul

    for rows_max, magic in variants:
        changes = {k: v for k, v in (("ROWS_MAX", rows_max), ("MAGIC", magic)) if v is not None}
        with patch.multiple(int8_matmul, **changes) if changes else nullcontext():
            yield rows_max, magic


KINDS = (  # kernel name fragments -> kind, first match wins
    ("grouped_int8", "int8 experts"), ("int8_rows", "int8 experts"),
    ("triton_poi", "fused elementwise"), ("triton_red", "fused reductions"), ("triton_per", "fused reductions"),
    ("_step_kernel", "SSM step"), ("conv", "conv"),
    ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"), ("softmax", "attention"),
    ("gemv", "matmul"), ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"), ("sm90", "matmul"),
    ("index", "indexing"), ("scatter", "indexing"), ("gather", "indexing"), ("sort", "indexing"),
    ("reduce", "reductions"), ("elementwise", "elementwise"), ("vectorized", "elementwise"),
)  # fmt: skip


def profile(model, batch: int, context: int, args, compile=False) -> None:
    """CUDA kernel time of one decoding step by kind, over 5 graph replays after the capture."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = model.embed_tokens.weight.device
    state = model.new_state(batch, context + 16)
    state.valid[:, :context] = True
    step = DecodeStep(model, state, graph=args.graph, bucket=1024, compile=compile)
    tokens = torch.randint(0, model.config.vocab_size, (8, batch), device=device)
    ends = [context + 1] * batch
    for i in range(3):
        step.rows(tokens[i], [e + i for e in ends])
    sync(device)
    what = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]  # (CPU: the smoke run)
    with torch_profile(activities=what) as prof:
        for i in range(3, 8):
            step.rows(tokens[i], [e + i for e in ends])
        sync(device)
    kinds: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = e.device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us <= 0 or e.key.startswith("ProfilerStep"):
            continue
        name = e.key.lower()
        kind = next((k for frag, k in KINDS if frag in name), "other")
        acc = kinds.setdefault(kind, [0.0, 0])
        acc[0] += us / 5 / 1e3
        acc[1] += e.count / 5
    top = sorted(((getattr(e, "device_time_total", 0.0) / 5 / 1e3, e.key[:90]) for e in prof.key_averages()), reverse=True)[:8]
    emit(dict(part="profile", batch=batch, context=context, compiled=bool(compile), int8_rows=int8_rows(),
              kernel_ms=round(sum(v[0] for v in kinds.values()), 3),
              kernels_a_step=round(sum(v[1] for v in kinds.values())),
              by_kind={k: dict(ms=round(v[0], 3), kernels=round(v[1])) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
              top=[dict(ms=round(ms, 3), kernel=k) for ms, k in top]))  # fmt: skip
    del step, state
    gc.collect()


def engine(model, args) -> None:
    device = model.embed_tokens.weight.device
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (args.engine_len,), generator=g).tolist() for _ in range(args.engine_prompts)]
    sync(device)
    t0 = time.perf_counter()
    out = generate_many(model, prompts, args.engine_new, batch_size=args.engine_slots, cuda_graph=args.graph,
                        prefill_chunk=args.prefill_chunk)  # fmt: skip
    sync(device)
    dt = time.perf_counter() - t0
    new = sum(len(t) for t in out)
    emit(dict(part="engine", layout="hybrid", slots=args.engine_slots, prompts=len(prompts),
              prompt_len=args.engine_len, new_tokens=args.engine_new, seconds=dt,
              new_tokens_per_s=new / dt, all_tokens_per_s=(new + sum(map(len, prompts))) / dt))  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["batch", "context", "compile", "engine", "prefill"])
    p.add_argument("--layouts", nargs="*", default=["hybrid", "attention"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 24, 32, 64, 96, 128, 160])
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--new", type=int, default=512, help="new tokens: rows are timed at prompt + new/2")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072, 262144])
    p.add_argument("--profile-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--compile-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--engine-prompts", type=int, default=96)
    p.add_argument("--engine-len", type=int, default=1024)
    p.add_argument("--engine-new", type=int, default=128)
    p.add_argument("--engine-slots", type=int, default=64)
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--prefill-modes", nargs="+", default=["bf16", "int8-triton", "int8-dequant", "int8-reference", "int8-auto"])
    p.add_argument("--prefill-chunk", type=int, default=8192, help="the serving plan's and the engine's prefill chunk")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 peak for the MFU (H200: 989 TFLOP/s)")
    p.add_argument("--memory-gib", type=float, default=80.0, help="cap the GPU at this much (an 80GB card)")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, without CUDA graphs")
    p.add_argument("--int8-config", nargs="*", default=[], metavar="KEY=T,O,I,WARPS,STAGES,LEFT",
                   help="set minijamba.kernels.int8_matmul.CONFIG[KEY] for this run (a tile from gpu_int8_sweep.py)")
    p.add_argument("--dequant-gib", type=float, nargs="*", default=[],
                   help="time int8-dequant prefill at each of these int8_dequant.DEQUANT_BYTES (GiB), in one process")
    p.add_argument("--prefill-variants", nargs="*", default=[], metavar="GROUP[:T,O,I,W,S,L]",
                   help="time int8 prefill at each of these int8_matmul.GROUP_T values (and prefill tiles), in one process")
    p.add_argument("--rows-ab", action="store_true",
                   help="time each batch, compiled step and profile three times: int8_matmul.ROWS_MAX = -1 (the "
                        "tl.dot kernel only, as before the multiply-and-sum kernel), then the code's with MAGIC off and on")
    p.add_argument("--profile-compile", action="store_true", help="profile the compiled step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.quantize = "int8"
    for item in args.int8_config:
        from minijamba.kernels import int8_matmul

        key, _, tile = item.partition("=")
        *ints, left = tile.split(",")
        int8_matmul.CONFIG[key] = (*map(int, ints), left.lower() in ("1", "true"))
    if args.smoke:
        device, dtype, args.graph, args.backend = torch.device("cpu"), torch.float32, False, "cpu"
        config = JambaConfig.from_preset("jamba-v0.1", **SMOKE)
        cap = 4 * GiB
    else:
        device, dtype, args.graph, args.backend = torch.device("cuda"), torch.bfloat16, True, "triton"
        config = JambaConfig.from_preset("jamba-v0.1")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * GiB / total))
        cap = int(args.memory_gib * GiB) - GiB  # the allocator's slack, as memory_plan.available_bytes
    bandwidth = copy_bandwidth(device)
    emit(dict(part="device", name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              copy_bandwidth_tb_s=bandwidth / 1e12, cap_gib=args.memory_gib, torch=torch.__version__,
              int8_config=args.int8_config))  # fmt: skip
    if "prefill" in args.parts:  # first: it builds its own (smaller) models
        prefill_rows(args, device, dtype, emit, SMOKE)
    for layout in args.layouts:
        c = config if layout == "hybrid" else config.with_layout("attention")
        c.scan_backend = args.backend
        t0 = time.perf_counter()
        model = build(c, device, dtype, quantize=args.quantize, seed=0)
        print(f"built {layout} {c.describe()} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        mid = args.prompt + args.new // 2
        ab = [(-1, None), (None, False), (None, True)] if args.rows_ab and device.type == "cuda" else [(None, None)]
        if "batch" in args.parts:
            for b in args.batches:
                for _ in ab_rows(ab):
                    decode_row(model, "batch", layout, b, mid, args, bandwidth, cap)
        if "context" in args.parts:
            for s in args.contexts:
                decode_row(model, "context", layout, 1, s, args, bandwidth, cap)
        if "compile" in args.parts and layout == "hybrid":
            for b in args.compile_batches:
                for _ in ab_rows(ab):
                    try:
                        decode_row(model, "compile", layout, b, mid, args, bandwidth, cap, compile=True)
                    except Exception as e:  # a compile failure is a result too
                        emit(dict(part="compile", layout=layout, batch=b, int8_rows=int8_rows(),
                                  error=f"{type(e).__name__}: {str(e)[:300]}"))  # fmt: skip
        if "profile" in args.parts and layout == "hybrid":
            for b in args.profile_batches:
                for _ in ab_rows(ab):
                    profile(model, b, mid, args, compile=args.profile_compile)
        if "engine" in args.parts and layout == "hybrid":
            engine(model, args)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(RESULTS, indent=1) + "\n")


if __name__ == "__main__":
    main()
