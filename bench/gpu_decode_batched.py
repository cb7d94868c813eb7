"""The decoding step of Jamba-v0.1 (int8 experts) at an 8K context, at batch 1, 16 and 64 (issue 16).

What it times: one decoding step, replayed as a CUDA graph (`minijamba.inference.cuda_graph.DecodeStep`),
after the inference state holds `--context` tokens. The state's content does not change the time of
a step (every position is read anyway), so the state is filled by marking its first `--context`
positions seen instead of by a prefill: a step at batch 64 after 8K tokens costs what it would
after a real 512K-token prefill, without the minutes that prefill takes.

The comparison (`--projections`):

    plain       the projections of a decoding step as the backend now runs them: one token per row
                takes the plain matmul (each weight read once)
    time-last   the training layout forced on the step too (the batched matmul over the weight
                broadcast to every row: each weight read once per row), as before issue 16

Both rows run in the same process on the same model, one after the other, so they compare on one
device in one run.

    python bench/gpu_decode_batched.py --batches 1 16 64 --context 8192 --out $OUT/decode.json
    python bench/gpu_decode_batched.py --smoke       # a tiny model on the CPU, seconds

Prints one JSON line per (projections, batch) with prefix RESULT, and writes them all to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.inference.cuda_graph import DecodeStep  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.kernels import time_last  # noqa: E402
from minijamba.model.config import JambaConfig  # noqa: E402

SMOKE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_dt_rank=8,
)  # fmt: skip


def forced_time_last(linear, x, bias=True):
    """The time-last twin for every call, one token per row included (the layout before issue 16)."""
    return time_last.linear_to_time_last(x, linear.weight, linear.bias if bias else None)


def forced_from_time_last(linear, x):
    return time_last.linear_from_time_last(x, linear.weight, linear.bias)


def time_steps(model, batch: int, context: int, steps: int, warmup: int, graph: bool) -> dict:
    device = model.embed_tokens.weight.device
    state = model.new_state(batch, context + warmup + steps + 1)
    state.valid[:, :context] = True  # the first `context` positions count as seen (module docstring)
    state.length = context
    step = DecodeStep(model, state, graph=graph, bucket=1024)
    token = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(warmup):  # the capture happens here
        logits = step(token)
        token = logits.argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = step(token)
        token = logits.argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    out = dict(batch=batch, context=context, step_ms=1e3 * dt, tokens_per_s=batch / dt)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del step, state
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed decoding steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--projections", nargs="+", default=["plain", "time-last"], choices=["plain", "time-last"])
    p.add_argument("--memory-gib", type=float, default=80.0, help="cap the GPU at this much (an 80GB card)")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, without CUDA graphs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    if args.smoke:
        device, config, graph = torch.device("cpu"), JambaConfig.from_preset("jamba-v0.1", **SMOKE), False
        dtype = torch.float32
    else:
        device, config, graph = torch.device("cuda"), JambaConfig.from_preset("jamba-v0.1"), True
        dtype = torch.bfloat16
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    config.scan_backend = "triton" if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    model = build(config, device, dtype, quantize="int8", seed=0)
    built = time.perf_counter() - t0
    print(f"built {config.describe()} in {built:.0f} s", file=sys.stderr)
    results = []
    plain = (time_last.to_time_last, time_last.from_time_last)
    for mode in args.projections:
        time_last.to_time_last, time_last.from_time_last = plain if mode == "plain" else (
            forced_time_last, forced_from_time_last)  # fmt: skip
        # The backend holds the functions it was registered with: rebuild it for this mode.
        from minijamba.model import dispatch

        dispatch._CACHE.clear()
        for b in args.batches:
            row = dict(projections=mode, **time_steps(model, b, args.context, args.steps, args.warmup, graph))
            row.update(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                       model=config.describe(), int8_experts=True, backend=config.scan_backend)  # fmt: skip
            print("RESULT " + json.dumps(row), flush=True)
            results.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    time_last.to_time_last, time_last.from_time_last = plain
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
