"""All 52B of Jamba-v0.1 on one GPU: int8 experts, seeded random weights, chunked prefill (issue 7).

Four measurements, one per `--measure`, each made on a model built straight onto the GPU with
`minijamba.inference.materialize.build` (no checkpoint needed: the weights are seeded random numbers, which
time exactly like real ones, except that routing is uniform-ish):

    longest   the contexts given, in increasing order: prefill in chunks, then decode a few tokens;
              stops at the first that the memory plan refuses (or that runs out of memory with
              --force). The longest that worked is the result; the plan's largest context is printed
              beside it. Paper: 140K on an 80GB A100.
    prefill   prefill time (and tokens/s) at each context: 32K, 128K, 256K by default
    decode    decode tokens/s at batch 1 after each context (4K and 128K by default), greedy,
              after a few warm-up steps, against the bound of the bytes one token must read
    layouts   the hybrid (a:m = 1:7) against the all-attention layout of the same sizes (a:m = 1:0,
              same experts): prefill and decode tokens/s and peak memory at each context, and the
              largest context each fits by the plan (the paper's throughput claim, Figure 3)

Every run also records the peak GPU memory (torch.cuda.max_memory_allocated and _reserved) against
the memory plan's total (measurement 4). Before each context the plan is checked against the
memory the GPU has free; a context that does not fit is reported as refused, not run (--force runs
it anyway, and records an out-of-memory error if that is what happens).

    python bench/gpu_full_scale.py --measure prefill --contexts 32768 131072 262144
    python bench/gpu_full_scale.py --measure longest --contexts 262144 524288 1048576 --chunk 2048
    python bench/gpu_full_scale.py --smoke        # a tiny model on the CPU, every measurement, seconds

Each line of results is printed as JSON (prefix RESULT) and appended to --out. Keep one invocation
under 10 minutes: building Jamba-v0.1 takes about a minute, and a 1M-token prefill several.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba import JambaConfig  # noqa: E402
from minijamba.inference.cuda_graph import DecodeStep  # noqa: E402
from minijamba.inference.generation import prefill  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.inference.memory_plan import GiB, available_bytes, largest_context, plan  # noqa: E402
from minijamba.inference.quant import INT8_KERNELS, KERNEL_ENV, LARGE_ROWS  # noqa: E402

DEFAULT_CONTEXTS = {
    "longest": [131072, 262144, 524288, 1048576],
    "prefill": [32768, 131072, 262144],
    "decode": [4096, 131072],
    "layouts": [32768, 65536, 131072],
}
SMOKE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_dt_rank=8,
)  # fmt: skip  # the paper's layout (l=8, a:m=1:7, e=2, K=2) at toy sizes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
    }


def decode_bound(model, device: torch.device) -> dict:
    """Bytes one decoding step must read at least: every non-expert weight, K experts per MoE layer
    (at their stored size), and the KV cache (added per context by the caller). The bound in tokens/s
    is the device's copy bandwidth (bytes read + written by a large copy, measured here) over them."""
    nbytes = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name:
            n = t.shape[0]
            nbytes += t.numel() * t.element_size() * model.config.num_experts_per_tok // n
        elif name not in ("embed_tokens.weight",) or model.config.tie_word_embeddings:
            nbytes += t.numel() * t.element_size()  # the embedding is read one row per token
    out = {"weights_read_per_token_gb": nbytes / 1e9}
    if device.type == "cuda":
        x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        sync(device)
        out["copy_bandwidth_gbs"] = 2 * 10 * x.numel() / (time.perf_counter() - t0) / 1e9
        del x, y
    return out


@torch.inference_mode()
def run_context(model, context: int, chunk: int, args, device, reserve: int, decode_tokens: int) -> dict:
    """Prefill `context` random tokens in chunks of `chunk`, then decode; times, peak memory and the plan."""
    config = model.config
    warmup = 2 if decode_tokens else 0
    capacity = context + warmup + decode_tokens
    p = plan(
        config,
        capacity,
        1,
        chunk,
        args.dtype,
        args.quantize,
        args.scan_backend,
        new_tokens=capacity - context,
    )
    row = {
        "layout": "attention" if config.attn_to_mamba == (1, 0) else "hybrid",
        "context": context,
        "chunk": p.chunk,
        "plan_total_gib": p.total / GiB,
        "plan_weights_gib": p.weights_total / GiB,
        "plan_state_gib": p.state["total"] / GiB,
        "plan_activations_gib": p.activations_peak / GiB,
    }
    # The weights are on the device already: what is left must hold the state and the activations.
    # Cached blocks of the previous context count as free: hand them back before asking.
    if device.type == "cuda":
        torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else p.weights_total
    free = available_bytes(device, reserve) + held
    if args.budget_gib:
        free = min(free, int(args.budget_gib * GiB) - reserve)
    row["plan_largest_context"] = largest_context(p, free)
    if p.total > free and not args.force:
        row.update(status="refused by the plan", free_gib=free / GiB)
        return row
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, config.vocab_size, (1, context), generator=g).to(device)
    try:
        state = model.new_state(1, capacity)
        sync(device)
        t0 = time.perf_counter()
        logits = prefill(model, ids, state, chunk=chunk)
        sync(device)
        row["prefill_s"] = time.perf_counter() - t0
        row["prefill_tok_s"] = context / row["prefill_s"]
        token = logits.argmax(-1)  # (1,)
        # --cuda-graph: each step is a graph replay (captured during the warm-up steps).
        step = DecodeStep(model, state) if args.cuda_graph else None
        for i in range(warmup + decode_tokens):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            if step is not None:
                token = step(token).argmax(-1)
            else:
                token = model(token[:, None], state=state, logits_to_keep=1)[:, -1].argmax(-1)
        sync(device)
        if decode_tokens:
            row["decode_tok_s"] = decode_tokens / (time.perf_counter() - t0)
        row["status"] = "ok"
    except torch.OutOfMemoryError as e:
        row["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
    finally:
        state = logits = None
    row.update(peak(device))
    if "peak_allocated_gib" in row:
        row["peak_vs_plan"] = row["peak_allocated_gib"] / row["plan_total_gib"]
    return row


def make_model(config, args, device):
    sync(device)
    t0 = time.perf_counter()
    model = build(config, device, args.dtype, args.quantize, seed=0, progress=not args.smoke)
    sync(device)
    return model, time.perf_counter() - t0


def report(row: dict, out: Path | None) -> None:
    text = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print("RESULT", text, flush=True)
    if out is not None:
        with open(out, "a") as fh:
            fh.write(text + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--measure", choices=sorted(DEFAULT_CONTEXTS), nargs="+", default=["prefill"],
                        help="which measurement(s) to make (see the module docstring)")  # fmt: skip
    parser.add_argument(
        "--contexts", type=int, nargs="+", help="context lengths in tokens (default per measurement)"
    )
    parser.add_argument("--chunk", type=int, nargs="+", default=[2048],
                        help="prefill chunk(s) in tokens, each timed on the same model (default 2048)")  # fmt: skip
    parser.add_argument("--decode-tokens", type=int, default=32, help="decoding steps timed (default 32)")
    parser.add_argument(
        "--layouts", nargs="+", default=["hybrid", "attention"], choices=["hybrid", "attention"]
    )
    parser.add_argument(
        "--no-quantize", action="store_true", help="bf16 experts (Jamba-v0.1 then does not fit 80GB)"
    )
    parser.add_argument(
        "--scan-backend", default=None, help="scan backend (default: $MINIJAMBA_SCAN_BACKEND or reference)"
    )
    parser.add_argument(
        "--int8-kernels",
        nargs="+",
        default=None,
        choices=list(INT8_KERNELS),
        help="grouped int8 matmul(s) to time, each on the same model and contexts (default: the automatic choice)",
    )
    parser.add_argument("--reserve-gib", type=float, default=1.0, help="GPU memory kept free beyond the plan")
    parser.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="act as if the GPU had this much memory (e.g. 80 on an H200: the allocator is capped too)",
    )
    parser.add_argument("--force", action="store_true", help="run contexts the plan refuses (records OOM)")
    parser.add_argument("--cuda-graph", action="store_true", help="decode by CUDA graph replay (DecodeStep)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, every measurement")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)

    args.quantize = None if args.no_quantize else "int8"
    if args.smoke:
        device, args.dtype = torch.device("cpu"), torch.float32
        base = JambaConfig(**SMOKE, scan_backend=args.scan_backend)
        args.measure = sorted(DEFAULT_CONTEXTS)
        args.chunk, args.decode_tokens = [min(c, 16) for c in args.chunk], min(args.decode_tokens, 4)
        contexts = {m: args.contexts or [40, 96] for m in args.measure}
        contexts["longest"] = contexts["longest"] + [1_000_000]  # refused by the plan within the budget
        args.budget_gib, args.reserve_gib = args.budget_gib or 0.05, 0.0
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to check the script on the CPU")
        device, args.dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        base = JambaConfig.from_preset("jamba-v0.1", scan_backend=args.scan_backend)
        contexts = {m: args.contexts or DEFAULT_CONTEXTS[m] for m in args.measure}
        if args.budget_gib:  # the caching allocator refuses beyond the budget, as a smaller card would
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * GiB / total), device)
    reserve = int(args.reserve_gib * GiB)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": "python bench/gpu_full_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": base.describe(),
        "quantize": args.quantize,
        "scan_backend": args.scan_backend or "default",
        "budget_gib": args.budget_gib,
        "cuda_graph": args.cuda_graph,
    }
    report(header, args.out)

    layouts = args.layouts if "layouts" in args.measure else ["hybrid"]
    for layout in layouts:
        todo = args.measure if layout == "hybrid" else ["layouts"]  # the other layout only compares
        config = base.with_layout(layout)
        model, seconds = make_model(config, args, device)
        bound = decode_bound(model, device)
        report({"layout": layout, "build_s": seconds, **bound, **peak(device)}, args.out)
        for measure in todo:
            for context, chunk, kernel in [
                (c, h, k) for c in sorted(contexts[measure]) for h in args.chunk for k in args.int8_kernels or [None]
            ]:  # fmt: skip
                if kernel is not None:
                    os.environ[KERNEL_ENV] = kernel
                tokens = args.decode_tokens if measure in ("decode", "layouts", "longest") else 0
                row = run_context(model, context, chunk, args, device, reserve, tokens)
                row["measure"] = measure
                # the kernel named ($MINIJAMBA_INT8_KERNEL), or the automatic choice by rows an expert
                chosen = os.environ.get(KERNEL_ENV) or f"auto (LARGE_ROWS={LARGE_ROWS})"
                row["int8_kernel"] = chosen if args.quantize else None
                if "decode_tok_s" in row and "copy_bandwidth_gbs" in bound:
                    kv = row["plan_state_gib"] * GiB / 1e9  # the whole cache is read each step (upper end)
                    row["decode_bound_tok_s"] = bound["copy_bandwidth_gbs"] / (
                        bound["weights_read_per_token_gb"] + kv
                    )
                report(row, args.out)
                if measure == "longest" and row.get("status") != "ok":
                    break  # longer contexts will not fit either
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
