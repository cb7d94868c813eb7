"""The training loop itself on a GPU: what `train_tiny.py --fast` runs, on issue 5's 8-layer config,
against transformers' training step measured in the same run (issue 5, point 2).

bench/gpu_e2e.py times one optimizer step in a harness: random token ids, no gradient clipping, no
loss read back. This script runs `minijamba.training.train.train`, the loop train_tiny.py runs, as a user
runs it: BPE-tokenized text, the learning-rate schedule, gradient clipping, the non-finite check
(the loss and the gradient norm read back: a sync each step), a validation at the start and the
end, a checkpoint. Its tokens/s is the one train_tiny.py prints: steady state, the warm-up steps
(compilation, and with CUDA graphs their warm-up and capture) left out. Rows, each the flags of
train_tiny.py:

    fp32          --fast --compile                       float32 weights under bf16 autocast
    fp32_graphs   --fast --cuda-graphs                   the same, each step replayed as CUDA graphs
    bf16_graphs   --fast --cuda-graphs --weights bf16    bf16 weights and AdamW state, as transformers trains

transformers, run first in the same process: bench/gpu_e2e.py's train row (JambaForCausalLM with
mamba-ssm, bf16 weights, fused AdamW; tokens/s of the median step and of the steps run back to
back), and the same step with what train.py adds to one (`transformers_loop`): the gradient norm
clipped to 1, the loss and the norm read back (a sync), the steps back to back; loop against loop.

--profile: the kernels of three steady steps of the first row's loop (torch.profiler, stepped by an
optimizer hook), with the device's busy and idle time, next to the JSON (*_profiles.txt).

Data: the Python standard library's modules and packages (tests left out) up to 11 MiB, copied
into one folder (--data of train_tiny.py), so that the BPE reaches the config's 32000 tokens.

    python bench/gpu_train_loop.py             # ~6 minutes on an H200, most of it compiling
    python bench/gpu_train_loop.py --smoke     # tiny sizes on the CPU, no compile, no CUDA graphs:
                                               # the script's code paths, no timing value

A table goes to stdout; every number to JSON (--out, default $OUT/gpu_train_loop.json when $OUT is
set), rewritten after each row.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_e2e  # noqa: E402

from minijamba.training.train import TrainConfig, train  # noqa: E402

ROWS = {  # key: (label, TrainConfig fields)
    "fp32": ("train_tiny.py --fast --compile", dict(compile=True)),
    "fp32_graphs": ("train_tiny.py --fast --cuda-graphs", dict(cuda_graphs=True)),
    "bf16_graphs": ("train_tiny.py --fast --cuda-graphs --weights bf16", dict(cuda_graphs=True, weights="bf16")),
}
SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def corpus(folder: Path, max_bytes: int) -> tuple[int, int]:
    """The stdlib's .py files in path order, tests left out, up to `max_bytes`, copied flat into `folder`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))
    folder.mkdir(parents=True, exist_ok=True)
    n, count = 0, 0
    for p in files:
        if n >= max_bytes:
            break
        shutil.copyfile(p, folder / str(p.relative_to(root)).replace(os.sep, "__"))
        n, count = n + p.stat().st_size, count + 1
    return count, n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every code path, in seconds")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="settings to run")
    p.add_argument("--steps", type=int, help="optimizer steps a row (default 100; --smoke: 4)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip its rows")
    p.add_argument("--profile", action="store_true", help="profile three steps of the first row's loop")
    p.add_argument("--e2e-also", nargs="*", default=[], choices=[k for k in gpu_e2e.IMPLS if k != "transformers"],
                   help="gpu_e2e.py train rows to run too, after transformers' (the harness's numbers, same run)")
    default_out = Path(os.environ["OUT"]) / "gpu_train_loop.json" if os.environ.get("OUT") else Path("gpu_train_loop.json")
    p.add_argument("--out", default=str(default_out), help="JSON results (default $OUT/gpu_train_loop.json)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU check of the script")
    out = Path(args.out)
    args.steps = args.steps or (4 if args.smoke else 100)
    sizes = gpu_e2e.SIZES["smoke" if args.smoke else "full"]
    model = gpu_e2e.SMOKE_CONFIG if args.smoke else gpu_e2e.CONFIG
    result = {"meta": {"argv": list(sys.argv[1:] if argv is None else argv), "config": model}, "rows": []}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)

    if args.transformers:  # first, so its row stands whatever the compiled rows do
        e2e = gpu_e2e.main(["--only", "transformers", *args.e2e_also, "--what", "train", "--no-profile",
                            "--out", str(out.with_name(out.stem + "_transformers.json"))]
                           + (["--smoke"] if args.smoke else []))  # fmt: skip
        result["meta"]["e2e_meta"] = e2e["meta"]
        result["rows"] += [r for r in e2e["rows"] if r["measure"] == "train"]
        result["rows"].append(transformers_loop(args.smoke))
        print("RESULT", json.dumps(result["rows"][-1]), flush=True)
        save()
    work = Path(tempfile.mkdtemp(prefix="gpu_train_loop_"))
    files, nbytes = corpus(work / "data", 256 * 2**10 if args.smoke else 11 * 2**20)
    result["meta"]["data"] = {"files": files, "bytes": nbytes, "python": sys.version.split()[0]}
    # The rows, then (--profile) the first one again, shorter, under the profiler: not a row.
    plan = [(key, args.steps, False) for key in args.rows]
    plan += [(args.rows[0], 30, True)] if args.profile and not args.smoke else []
    for key, steps, prof in plan:
        label, fields = ROWS[key]
        if args.smoke:  # the CPU: no compile, no CUDA graphs; bf16 weights run as they would
            fields = {k: v for k, v in fields.items() if k == "weights"}
        cfg = TrainConfig(
            task="text", data=str(work / "data"), vocab_size=model["vocab_size"], seq_len=sizes["seq"],
            batch_size=sizes["batch"], overrides={k: v for k, v in model.items() if k != "vocab_size"},
            max_steps=steps, eval_interval=steps, eval_batches=1, warmup_steps=10, time_budget=None,
            device="cpu" if args.smoke else "cuda", fast=not args.smoke, out_dir=str(work / key), overwrite=True,
            **fields,
        )  # fmt: skip
        t0 = time.perf_counter()
        try:
            with profiled(prof, out) as summary:
                r = train(cfg, log=print)
            if prof:
                result["meta"]["profile"] = {"row": label, "steps": steps, **summary}
                save()
                continue
            config = json.loads((work / key / "config.json").read_text())
            row = dict(impl=label, measure="train", tok_s=r.tokens_per_s, status=r.status, steps=r.step,
                       peak_gib=r.peak_memory_bytes / 2**30 if r.peak_memory_bytes else None,
                       val_loss=r.metrics.get("val_loss"), vocab_size=config["vocab_size"],
                       batch=sizes["batch"], seq=sizes["seq"])  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failed row is a result; the next one runs
            traceback.print_exc()
            row = dict(impl=label, measure="train", status=f"failed: {type(e).__name__}: {str(e)[:400]}")
        row["wall_s"] = time.perf_counter() - t0
        print("RESULT", json.dumps(row), flush=True)
        result["rows"].append(row)
        save()
        shutil.rmtree(work / key, ignore_errors=True)
        torch._dynamo.reset()  # the next row compiles its own graphs; free this one's CUDA graph pool
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    result["meta"]["table"] = table(result["rows"])
    save()
    print("\n" + result["meta"]["table"], flush=True)
    return result


def transformers_loop(smoke: bool) -> dict:
    """transformers' training step as train.py takes one: gpu_e2e's step (bf16 weights, fused
    AdamW, the router's loss), and the gradient norm clipped to 1 and read back with the loss."""
    ns = argparse.Namespace(smoke=smoke)
    device = torch.device("cpu" if smoke else "cuda")
    s = gpu_e2e.SIZES["smoke" if smoke else "full"]
    dtype = torch.float32 if smoke else torch.bfloat16
    model = gpu_e2e.build_transformers(ns, gpu_e2e.random_weights(ns, device), device, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not smoke or None)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (s["batch"], s["seq"]), device=device, generator=g)
               for _ in range(2)]  # fmt: skip
    values = []

    def step(i):
        with gpu_e2e.autocast(device):
            loss = model(input_ids=batches[i % 2], labels=batches[i % 2], output_router_logits=True,
                         use_cache=False).loss  # fmt: skip
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        values.append((loss.item(), float(norm)))  # train.py's check: a sync each step
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(s["train_warmup"]):
        step(i)
    gpu_e2e.sync(device)
    t0 = time.perf_counter()
    for i in range(s["train_iters"]):
        step(i)
    gpu_e2e.sync(device)
    dt = (time.perf_counter() - t0) / s["train_iters"]
    del model, opt
    gpu_e2e.cleanup()
    return dict(impl="transformers_loop", measure="train", tok_s=s["batch"] * s["seq"] / dt, step_s=dt,
                last_loss=values[-1][0], last_grad_norm=values[-1][1], batch=s["batch"], seq=s["seq"])  # fmt: skip


@contextlib.contextmanager
def profiled(on: bool, out: Path):
    """torch.profiler over three steady steps of train() (after 22), stepped by an optimizer hook;
    yields a dict that gets the busy/idle summary (the kernel table goes to *_profiles.txt)."""
    if not on:
        yield None
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    summary: dict = {}

    def ready(prof):
        try:
            spans = gpu_e2e.kernel_spans(prof)
            wall_us = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)  # first kernel to last
            kernels, head = gpu_e2e.kernel_summary(spans, wall_us)
        except Exception as e:  # noqa: BLE001 - a profile is a bonus; the run goes on
            summary.update(head=f"profile failed: {type(e).__name__}: {e}")
            return
        summary.update(head=f"three steps of the loop: {wall_us / 1e3:.1f} ms from the first kernel to the last, {head}")
        with open(out.with_name(out.stem + "_profiles.txt"), "a") as f:
            f.write(f"== {summary['head']}\n{kernels}\n\n")
        print(summary["head"], flush=True)

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], on_trace_ready=ready,
                   schedule=schedule(wait=20, warmup=2, active=3, repeat=1))  # fmt: skip

    handle = register_optimizer_step_post_hook(lambda *_: prof.step())
    prof.start()
    try:
        yield summary
    finally:
        handle.remove()
        prof.stop()


def table(rows: list[dict]) -> str:
    """Each row's tokens/s, and ours against transformers' step (median, back to back) and its loop."""
    by = {r["impl"]: r for r in rows if "tok_s" in r}
    hf, hf_loop = by.get("transformers", {}), by.get("transformers_loop", {})
    refs = [hf.get("tok_s"), hf.get("tok_s_back_to_back"), hf_loop.get("tok_s")]
    lines = ["| row | tok/s | x transformers' step (median) | x its steps back to back | x its steps as train.py's "
             "(clip, sync) | peak GiB | vocab |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['impl']} | {r.get('status', '?')[:60]} | | | | | |")
            continue
        ours = not r["impl"].startswith("transformers")
        xs = [f"{r['tok_s'] / ref:.2f}x" if ours and ref else "" for ref in refs]
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['impl']} | {r['tok_s']:,.0f} | {' | '.join(xs)} | {peak} | {r.get('vocab_size', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
