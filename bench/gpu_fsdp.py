"""Training throughput on 1 and 2 GPUs with FSDP2 (issue 8): tokens/s, scaling efficiency, peak memory.

    torchrun --nproc-per-node 2 bench/gpu_fsdp.py --out results.jsonl      # both models, a few minutes
    torchrun --nproc-per-node 2 bench/gpu_fsdp.py --models 8layer --steps 20
    torchrun --nproc-per-node 2 bench/gpu_fsdp.py --smoke                  # CPU, gloo, toy sizes: seconds

Models (Jamba-v0.1's layout, l=8 a:m=1:7 e=2 n=16 K=2, untied embeddings):

    8layer   issue 5's config: hidden 1024, intermediate 2816, 16 heads, 4 kv heads, vocab 32000
             (0.70B parameters); batch 4 x 2048 per GPU
    block    one full-width Jamba block: 8 layers at Jamba-v0.1's widths (13.3B parameters); batch
             1 x 4096 per GPU with activation checkpointing. Its fp32 weights, gradients and AdamW
             moments (16 bytes per parameter, 213 GB) do not fit one GPU; sharded over 2 they are half

Modes, each timed the same way (warm-up steps, then timed steps of what one step of
minijamba.training.train does: bf16 autocast forward with the loss, backward, gradient clipping, AdamW):

    single   each process alone, no sharding: what train_tiny.py runs on one GPU (fp32 weights,
             bf16 autocast)
    fsdp1    each process alone, FSDP2 over a one-process mesh (bf16 parameters, fp32 gradient
             reduction): the sharding code with nothing to shard, to separate its overhead
    fsdp     FSDP2 over all w processes (minijamba.training.distributed.shard, as the loop under torchrun):
             the global batch is w times the per-GPU batch

In `single` and `fsdp1` every GPU runs its own copy at the same time, so the 1-GPU numbers come
from the same GPUs under the same conditions as the w-GPU number. Scaling efficiency =
tokens/s on w GPUs / (w x tokens/s on 1); the issue's target is a speed-up of at least 1.8 on 2.

Before each mode a memory plan (`plan_bytes`: 16 bytes per parameter for fp32 weights, gradients
and AdamW moments, divided by the processes that share them, plus the working copies) is compared
with the GPU's memory; a mode that cannot fit is reported as "does not fit" and not run (--force
runs it anyway: an out-of-memory error then ends the run, since the other process would wait for
it forever). The model is built on the meta device, sharded, then allocated, so no process ever
holds more than its shards. Activations are not in the plan: the peak measured is in each row.

Each result is printed as JSON (prefix RESULT) by rank 0 and appended to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.training import distributed  # noqa: E402
from minijamba.model.config import JambaConfig  # noqa: E402
from minijamba.model.jamba import Jamba  # noqa: E402
from minijamba.runtime import dist_info, scan_backend_for  # noqa: E402
from minijamba.training.train import TrainConfig, make_optimizer  # noqa: E402

GiB = 2**30
MODELS = {
    "8layer": dict(
        overrides=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, mamba_dt_rank=64),
        batch=4, seq_len=2048, checkpoint_activations=False,
    ),
    "block": dict(overrides=dict(num_hidden_layers=8), batch=1, seq_len=4096, checkpoint_activations=True),
}  # fmt: skip
SMOKE_MODELS = {
    "8layer": dict(
        overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, mamba_dt_rank=8, num_experts=4),
        batch=2, seq_len=32, checkpoint_activations=False,
    ),
    "block": dict(
        overrides=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, mamba_dt_rank=8, num_experts=4),
        batch=1, seq_len=48, checkpoint_activations=True,
    ),
}  # fmt: skip
MODES = ("single", "fsdp1", "fsdp")


def say(row: dict, out: Path | None) -> None:
    """Rank 0 prints a result line and appends it to `out`."""
    if dist_info()[0] != 0:
        return
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_bytes(model, processes: int, sharded: bool) -> dict:
    """What one process must hold at least: its share of the fp32 weights, gradients and both AdamW
    moments (16 bytes per parameter), plus, sharded, the largest unit at work (its bf16 parameters
    gathered for the unit running and the one prefetched, its bf16 gradient and the fp32 copy
    reduced: 10 bytes per parameter of the unit), or, not sharded, the bf16 copies of every weight
    that autocast keeps during a forward (2 bytes per parameter). Activations come on top."""
    n = model.num_parameters()
    unit = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    states = 16 * n / processes
    working = 10 * unit if sharded else 2 * n
    return {"parameters": n, "largest_unit": unit, "states_gib": states / GiB, "plan_gib": (states + working) / GiB}


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Weights of the right scale on each process's shard (a benchmark needs no more): normal(0, 0.02)
    matrices, unit norms and D, Mamba's A = -(1..n) and Δ bias for Δ = 0.01, zero biases."""
    g = None
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if g is None:
            g = torch.Generator(t.device).manual_seed(seed)
        if name.endswith("A_log"):
            n = t.shape[-1]
            t.copy_(torch.log(torch.arange(1, n + 1, dtype=t.dtype, device=t.device)).expand_as(t))
        elif name.endswith(".D") or "norm" in name:
            t.fill_(1.0)
        elif name.endswith("dt_proj.bias"):
            t.fill_(math.log(math.expm1(0.01)))  # softplus^-1(0.01)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=g)


def build(config: JambaConfig, spec: dict, mode: str, device, mesh):
    """The model for `mode`, built on meta, checkpointed/sharded as asked, then allocated."""
    with torch.device("meta"):
        model = Jamba(config)
    if spec["checkpoint_activations"]:
        distributed.checkpoint_layers(model)
    if mode == "fsdp":
        distributed.shard(model, device)
    elif mode == "fsdp1":
        distributed.shard(model, device, mesh=mesh)
    return model


def measure(name: str, spec: dict, mode: str, args, device, mesh) -> dict:
    rank, world = dist_info()
    processes = world if mode == "fsdp" else 1
    config = JambaConfig.from_preset("jamba-v0.1", **spec["overrides"], scan_backend=args.scan_backend)
    model = build(config, spec, mode, device, mesh)
    row = {"model": name, "mode": mode, "gpus": processes, "batch_per_gpu": spec["batch"],
           "seq_len": spec["seq_len"], "checkpoint_activations": spec["checkpoint_activations"]}  # fmt: skip
    plan = plan_bytes(model, processes, sharded=mode != "single")
    row.update(plan)
    budget = args.budget_gib * GiB if args.budget_gib else (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )  # fmt: skip
    (too_big,) = distributed.any_rank(budget is not None and plan["plan_gib"] * GiB > budget)
    if too_big and not args.force:
        row.update(status="does not fit", budget_gib=budget / GiB)
        return row

    model.to_empty(device=device)
    init_weights(model, seed=args.seed + rank)
    optimizer = make_optimizer(model, TrainConfig())  # the loop's AdamW and parameter groups
    use_bf16 = device.type == "cuda"
    b, l = spec["batch"], spec["seq_len"]
    gen = torch.Generator(device).manual_seed(1000 + rank)  # each process its own rows

    def step():
        x = torch.randint(config.vocab_size, (b, l + 1), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        distributed.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = b * l * args.steps
    mine = {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "loss": float(loss),
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else None,
    }
    every = distributed.gather_objects(mine)
    if mode == "fsdp":  # one job over all processes: global tokens over the slowest process's time
        row["tokens_per_s"] = processes * tokens / max(e["step_s"] * args.steps for e in every)
    else:  # independent copies: the mean of the GPUs (each listed below)
        row["tokens_per_s"] = sum(e["tokens_per_s"] for e in every) / len(every)
    row.update(
        status="ok", warmup_s=warm_s, step_s=max(e["step_s"] for e in every),
        tokens_per_s_per_process=[e["tokens_per_s"] for e in every],
        loss=every[0]["loss"], peak_allocated_gib=[e["peak_allocated_gib"] for e in every],
        peak_reserved_gib=[e["peak_reserved_gib"] for e in every],
    )  # fmt: skip
    if not all(math.isfinite(e["loss"]) for e in every):
        row["status"] = "non-finite loss"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per GPU (default: per model)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: per model)")
    parser.add_argument(
        "--scan-backend", default=None, help="selective-scan backend (default: what --fast picks; reference on the CPU)"
    )
    parser.add_argument("--budget-gib", type=float, default=None, help="act as if each GPU had this much memory")
    parser.add_argument("--force", action="store_true", help="run modes the memory plan refuses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (gloo), every mode, seconds")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)

    if args.smoke:
        torch.set_num_threads(1)
        device = distributed.setup("cpu")
        models = SMOKE_MODELS
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.scan_backend = args.scan_backend or "reference"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to check the script on the CPU")
        device = distributed.setup("cuda")
        models = MODELS
        args.scan_backend = args.scan_backend or scan_backend_for(True)
    world = dist_info()[1]
    mesh = None
    if "fsdp1" in args.modes:  # every process alone in a one-process group, for FSDP over 1 GPU
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if world > 1:
            own, _ = dist.new_subgroups(group_size=1)
            mesh = DeviceMesh.from_group(own, device.type)
        else:
            if not dist.is_initialized():
                args.modes = [m for m in args.modes if m != "fsdp1"]  # no process group: single only
            else:
                mesh = init_device_mesh(device.type, (1,))
    if world == 1:
        args.modes = [m for m in args.modes if m != "fsdp"]
    say({
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "processes": world, "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "command": (f"torchrun --nproc-per-node {world}" if distributed.launched_by_torchrun() else "python")
        + " bench/gpu_fsdp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "scan_backend": args.scan_backend, "steps": args.steps, "warmup": args.warmup,
    }, args.out)  # fmt: skip

    for name in args.models:
        spec = dict(models[name])
        spec["batch"] = args.batch or spec["batch"]
        spec["seq_len"] = args.seq_len or spec["seq_len"]
        rows = {}
        for mode in args.modes:
            rows[mode] = measure(name, spec, mode, args, device, mesh)
            say(rows[mode], args.out)
            gc.collect()  # the model and optimizer of that mode are gone: give their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "fsdp" in rows and rows["fsdp"]["status"] == "ok":
            summary = {"model": name, "gpus": world, "fsdp_tokens_per_s": rows["fsdp"]["tokens_per_s"]}
            for base in ("single", "fsdp1"):
                if base in rows and rows[base]["status"] == "ok":
                    speedup = rows["fsdp"]["tokens_per_s"] / rows[base]["tokens_per_s"]
                    summary[f"speedup_vs_{base}"] = speedup
                    summary[f"efficiency_vs_{base}"] = speedup / world
                elif base in rows:
                    summary[f"speedup_vs_{base}"] = f"1 GPU: {rows[base]['status']}"
            say(summary, args.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
