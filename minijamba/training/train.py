"""The training loop: one loop for the laptop (`train_tiny.py`) and, later, for several GPUs.

Glossary:

    b   global batch (sequences per optimizer step, over all processes)
    l   sequence length
    s   optimizer steps done so far ("step")
    T   planned steps: the length of the learning-rate schedule

What one step does: take batch s (a pure function of seed and s, see minijamba.training.data), forward
with the loss (bf16 autocast on a GPU, fp32 on the CPU), backward, clip the gradient norm, set
the learning rate for s, AdamW step. The step's loss and gradient norm are read (and checked) a
step late, so the host launches the next step while the device runs this one. Every so often:
validation loss in nats per token and bits per byte (MQAR: recall accuracy), a checkpoint, the
loss-curve plot.

Weights: float32 by default, the matmuls in bf16 under autocast on a GPU (mixed precision: AdamW
updates float32 weights, so no update is lost to rounding). `weights="bf16"` keeps the parameters
and AdamW's state in bf16 (A_log, D and the Δ bias stay float32, see `minijamba.model.jamba.cast_parameters`), as
transformers' Jamba trains: half the memory and the optimizer's traffic, but an update smaller
than half a weight's bf16 step (0.2-0.4% of the weight) rounds away. `cuda_graphs=True` compiles
the model with torch.compile's mode="reduce-overhead": each step's kernels replay as CUDA graphs,
without a launch each. With both and --fast: the fastest training on a GPU (bench/RESULTS.md).

Schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` at step T. With `max_steps` T is
known; with only a time budget, T is estimated from the speed of the first steps and saved, so a
resumed run keeps the same schedule. The time budget covers the whole call, set-up included.

Same seed, same run: the model's initialisation, the data order and the MQAR sequences all come
from the seed, and nothing else draws random numbers. With `max_steps` the whole run repeats
(bit for bit on the CPU); with only a time budget T depends on the measured speed.

Stopping: at T, at the time budget, at `stop_after`, or on Ctrl-C (finish the step, write a
checkpoint, return). A non-finite loss or gradient stops the run without writing, so the last
good checkpoint stays. Resume (`resume=True`) restores weights, optimizer, RNG states, schedule
and history; the next batch is the one an uninterrupted run would have taken.

Several processes (`torchrun --nproc-per-node N train_tiny.py ...`): the same loop.
`distributed.setup` joins torchrun's process group, `distributed.prepare` shards the model with
FSDP2 (one unit per decoder layer), each process takes rows rank*b/w .. (rank+1)*b/w of the same
global batch, and only rank 0 prints and writes. Checkpoints hold the full state, gathered to rank 0,
in the single-process format, so a run resumes on any number of processes. Stopping (Ctrl-C, the
time budget) and the schedule's length are decided once for all processes. See minijamba.training.distributed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from minijamba.training.memory_plan import check_training, training_plan
from minijamba.model.dispatch import ENV_VAR
from minijamba.model.jamba import Jamba, cast_parameters
from minijamba.runtime import Readout, StopFlag, dist_info, peak_memory, scan_backend_for, total_memory
from minijamba.training import checkpoint, distributed
from minijamba.training.evaluate import evaluate, format_eval
from minijamba.training.plots import plot_history
from minijamba.training.run import (  # noqa: F401  (train_tiny.py and the tests import these from here)
    DEFAULT_BATCH,
    NonFiniteLoss,
    RUNTIME_FIELDS,
    TASKS,
    TrainConfig,
    TrainResult,
    WEIGHTS,
    build_task,
    make_optimizer,
    model_config,
)
from minijamba.training.schedule import EVALS_PER_RUN, lr_at, plan_steps, time_left

PLAN_AFTER = 10  # steps timed before estimating T from the time budget ...
PLAN_SECONDS = 15.0  # ... and seconds (unless warmup ends first)


# --- the loop ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Run (or resume) the training run described by `cfg`; see the module docstring."""
    start = time.monotonic()
    cfg.validate()
    device = distributed.setup(cfg.device)  # joins torchrun's process group when it started us
    rank, world = dist_info()
    if cfg.cuda_graphs and (device.type != "cuda" or world > 1):
        where = f"a {device.type} device" if device.type != "cuda" else f"{world} processes"
        raise ValueError(f"--cuda-graphs needs one process on a CUDA GPU, and this run has {where}: drop it")
    main = rank == 0
    from tqdm import tqdm

    say = (log or tqdm.write) if main else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)

    if not main:  # rank 0 first: it alone puts back a checkpoint that a crash left half-swapped
        distributed.barrier()
    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(out_dir, training=True)
        checkpoint.check_writable(out_dir)  # before the first step, not at the first checkpoint
        saved = {
            k: v
            for k, v in ckpt.train_config.items()
            if k in {f.name for f in dataclasses.fields(TrainConfig)}
        }
        runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
        try:
            cfg = TrainConfig(**{**saved, **runtime})
            cfg.betas = tuple(cfg.betas)
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(
                f"{out_dir / checkpoint.TRAIN_CONFIG} is not a valid training config: {e}"
            ) from None
    else:
        checkpoint.check_writable(out_dir)
        if checkpoint.is_checkpoint(out_dir) and not cfg.overwrite:
            raise FileExistsError(
                f"{out_dir} already holds a checkpoint: pass --resume to continue it, --overwrite to "
                f"start over, or another --out-dir"
            )
    if main:
        distributed.barrier()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    task = build_task(cfg, tokenizer=ckpt.tokenizer if ckpt else None)
    if distributed.from_rank0(task.fingerprint()) != task.fingerprint():
        raise ValueError("the processes built different training data: give every process the same --data")
    config = ckpt.config if ckpt else model_config(cfg, task)
    config.scan_backend = scan_backend_for(cfg.fast)
    # The run's memory, planned by arithmetic on the sizes before anything is built (even on the meta
    # device a million layers take minutes): refused with the largest batch that would fit.
    backend = config.scan_backend or os.environ.get(ENV_VAR) or "reference"
    memory = training_plan(config, cfg.batch_size, task.seq_len, cfg.weights, world, cfg.checkpoint_activations,
                           task.val_nbytes(cfg.batch_size, cfg.eval_batches) // cfg.batch_size,
                           chunked_scan=device.type == "cpu" and backend == "cpu", autograd_scan=backend == "reference",
                           bf16_activations=device.type == "cuda" or cfg.weights == "bf16")  # fmt: skip
    check_training(memory, total_memory(device), f"this {device.type}")
    torch.manual_seed(cfg.seed)
    model = Jamba(config).to(device)
    if cfg.weights == "bf16":
        cast_parameters(model, torch.bfloat16)
    model = distributed.prepare(model, device, cfg.checkpoint_activations)  # FSDP2 if several processes
    optimizer = make_optimizer(model, cfg)
    state = {
        "step": 0, "planned_steps": cfg.max_steps, "eval_interval": cfg.eval_interval, "tokens_seen": 0,
        "train_seconds": 0.0, "data": task.fingerprint(), "history": {"step": [], "loss": [], "lr": []},
        "evals": [], "status": "running",
    }  # fmt: skip
    if ckpt:
        if ckpt.train_state.get("data") != task.fingerprint():
            raise checkpoint.CheckpointError(
                f"the training data differ from those of the checkpoint in {out_dir} (another --data, "
                f"or another Python's standard library): resume with the same data"
            )
        distributed.load_model_state(model, ckpt.model_tensors, source=str(out_dir / checkpoint.MODEL))
        distributed.load_optimizer_state(model, optimizer, ckpt.optimizer_tensors, ckpt.param_groups)
        checkpoint.set_rng_state(ckpt.train_state.get("rng", {}))
        state.update({k: v for k, v in ckpt.train_state.items() if k != "rng"})
        say(
            f"resuming {out_dir} at step {state['step']}"
            + (f" of {state['planned_steps']}" if state["planned_steps"] else "")
        )
    resumed_from = state["step"] if ckpt else None

    net = torch.compile(model, mode="reduce-overhead" if cfg.cuda_graphs else None) if cfg.compile else model
    # A step's CUDA graphs own their outputs until the next step begins; say when it does.
    step_begin = torch.compiler.cudagraph_mark_step_begin if cfg.cuda_graphs else (lambda: None)
    use_bf16 = device.type == "cuda" or cfg.weights == "bf16"  # bf16 weights: bf16 math on a CPU too
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    val = task.val_batches(cfg.batch_size, cfg.eval_batches)  # every process evaluates all of it
    title = f"{cfg.layout} {config.describe()}"
    say(f"model: {cfg.preset} {cfg.layout}, {config.describe()}, {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(active=True) / 1e6:.2f}M active), scan backend {config.scan_backend or 'default'}")  # fmt: skip
    say(f"data: {task.describe()}; batch {cfg.batch_size} x {task.seq_len} tokens; device {device}"
        + (" (bf16 weights)" if cfg.weights == "bf16" else " (bf16 autocast)" if use_bf16 else " (fp32)")
        + ("; CUDA graphs" if cfg.cuda_graphs else "")
        + (f"; {world} processes, FSDP2" if world > 1 else "")
        + ("; activation checkpointing" if cfg.checkpoint_activations else ""))  # fmt: skip

    plot_note = []

    def plot(path):
        if not plot_history(state, path, title) and not plot_note:
            plot_note.append(1)
            say("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")

    def refuse(what):
        """Stop instead of saving broken weights: the last good checkpoint stays as it is."""
        bar.close()
        kept = (f"the last good checkpoint (step {last_good}) is kept in {out_dir}" if last_good is not None
                else "no checkpoint had been written yet")  # fmt: skip
        raise NonFiniteLoss(f"{what} at step {state['step']}; training stopped without saving and {kept}; "
                            "try a lower --lr")  # fmt: skip

    def save(status):
        t = time.monotonic()
        # Never save a NaN: the last validation and the weights are checked (rank 0 decides for all).
        last = state["evals"][-1] if state["evals"] else {}
        bad = next((f"the validation {k.removeprefix('val_').replace('_', ' ')} became {v}" for k, v in last.items()
                    if k != "step" and not math.isfinite(v)), None)  # fmt: skip
        bad = distributed.from_rank0(bad)
        if bad is not None:
            refuse(bad)
        state["status"] = status
        tensors = distributed.model_state(model)  # sharded: gathered to rank 0 (every rank calls)
        bad = distributed.from_rank0(checkpoint.first_non_finite(tensors) if main else None)
        if bad is not None:
            refuse(f"the weight {bad} became NaN or infinite")
        opt_tensors, groups = distributed.optimizer_state(model, optimizer)
        if main:
            checkpoint.save(
                out_dir, model_tensors=tensors, optimizer_tensors=opt_tensors, param_groups=groups,
                config=config, train_config=_jsonable(cfg), tokenizer=task.tokenizer,
                train_state={**state, "rng": checkpoint.rng_state()}, plot=plot,
            )  # fmt: skip
        distributed.barrier()  # the checkpoint is on disk before any process goes on
        return time.monotonic() - t

    def run_eval():
        t = time.monotonic()
        metrics = evaluate(net, val, task.token_nbytes, device, autocast, step_begin)
        state["evals"].append({"step": state["step"], **metrics})
        return metrics, time.monotonic() - t

    last_good = state["step"] if ckpt else None
    metrics, eval_seconds = ({}, 0.0)
    if not state["evals"] or state["evals"][-1]["step"] != state["step"]:
        metrics, eval_seconds = run_eval()
        say(format_eval(state["step"], metrics))
    else:
        metrics = {k: v for k, v in state["evals"][-1].items() if k != "step"}
    save_seconds = 1.0
    budget_end = None if cfg.time_budget is None else start + cfg.time_budget
    tokens_per_step = cfg.batch_size * task.seq_len
    train_time, train_tokens, timed_from, done_here = 0.0, 0, None, 0
    warm_steps = 3 if cfg.cuda_graphs else 1  # steps of this call left out of the throughput (see below)

    bar = tqdm(total=state["planned_steps"], initial=state["step"], unit="step", disable=not main,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)  # fmt: skip
    status, ema, pending = "done", None, None

    def settle():
        """Check and record the pending step's loss and gradient norm (waiting for them if need be).
        Read a step late, they leave the device busy: a non-finite one still stops the run before
        anything is evaluated or written, and the last good checkpoint stays."""
        nonlocal pending, ema
        if pending is None:
            return
        (done, lr_done, values), pending = pending, None
        loss_value, norm = values.get()
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            bar.close()
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            kept = (f"the last good checkpoint (step {last_good}) is kept in {out_dir}" if last_good is not None
                    else "no checkpoint had been written yet")  # fmt: skip
            raise NonFiniteLoss(f"the {what} became {loss_value if what == 'loss' else norm} at step {done}; "
                                f"training stopped and {kept}; try a lower --lr")  # fmt: skip
        hist = state["history"]
        hist["step"].append(done), hist["loss"].append(loss_value), hist["lr"].append(lr_done)
        ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value

    with StopFlag() as stop:
        model.train()
        while True:
            step = state["step"]
            if state["planned_steps"] is not None and step >= state["planned_steps"]:
                status = "done"
                break
            if cfg.stop_after is not None and step >= cfg.stop_after:
                status = "stopped"
                break
            now = time.monotonic()
            interrupted, over_budget = distributed.any_rank(  # every process stops at the same step
                stop.set, budget_end is not None and now + eval_seconds + save_seconds > budget_end
            )
            if interrupted:
                status = "interrupted"
                break
            if over_budget:
                status = "budget"
                break
            # One optimizer step.
            t0 = time.monotonic()
            lr = lr_at(step, cfg, state["planned_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = task.batch(step, cfg.batch_size, rows)
            if device.type == "cuda":  # from pinned memory the copy need not wait for the last step
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            step_begin()
            with autocast():
                _, loss = net(x, targets=y)
            loss.backward()
            grad_norm = distributed.clip_grad_norm(model, cfg.grad_clip)  # over all shards
            values = Readout(torch.stack([_mean_over_ranks(loss.detach(), world).float(), grad_norm.float()]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens_seen"] += tokens_per_step
            settle()  # the last step's loss, read now that the device is on this one
            pending = (step, lr, values)
            dt = time.monotonic() - t0
            state["train_seconds"] += dt
            # Throughput once warm: the first step of this call warms up caches and compiles; with
            # CUDA graphs the next ones run the graphs' warm-up and capture them.
            done_here += 1
            if done_here <= warm_steps:
                timed_from = step
            else:
                train_time += dt
                train_tokens += tokens_per_step

            # With only a time budget: fix the schedule's length T once the speed is known.
            timed = step - timed_from >= PLAN_AFTER and (
                train_time >= PLAN_SECONDS or step >= cfg.warmup_steps
            )
            if state["planned_steps"] is None:
                planned = plan_steps(cfg, step, train_time / (step - timed_from), eval_seconds, save_seconds,
                                budget_end - time.monotonic()) if timed else None  # fmt: skip
                planned = distributed.from_rank0(planned)  # rank 0's clock: one schedule for all
                if planned is not None:
                    state["planned_steps"] = planned
                    bar.total = state["planned_steps"]
                    say(f"time budget {cfg.time_budget:.0f} s: planning {state['planned_steps']} steps")
            if state["eval_interval"] is None and state["planned_steps"] is not None:
                state["eval_interval"] = max(1, state["planned_steps"] // EVALS_PER_RUN)

            tok_s = train_tokens / train_time if train_time else 0.0
            left = time_left(state, step, train_time, train_tokens, tokens_per_step, budget_end)
            shown = f"loss {ema:.3f}, " if ema is not None else ""
            bar.set_postfix_str(f"{shown}{tok_s:,.0f} tok/s, {left} left", refresh=False)
            bar.update(1)

            interval = state["eval_interval"]
            if (
                interval
                and step % interval == 0
                and step != state["planned_steps"]
                and step != cfg.stop_after
            ):
                settle()
                metrics, eval_seconds = run_eval()
                model.train()
                say(format_eval(step, metrics))
                save_seconds = save("running")
                last_good = step
        t_end = time.monotonic()
        settle()  # nothing is evaluated or written before the last step's loss is known to be finite
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.monotonic() - t_end if train_tokens else 0.0  # the device's last step
    bar.close()

    # The end: a last validation (unless interrupted: then get out fast) and a checkpoint.
    if status != "interrupted" and state["evals"][-1]["step"] != state["step"]:
        metrics, _ = run_eval()
        say(format_eval(state["step"], metrics))
    save(status)
    if status == "budget":
        say(f"time budget of {cfg.time_budget:.0f} s reached at step {state['step']}"
            + (f" of {state['planned_steps']}" if state["planned_steps"] else "") + "; continue with --resume")  # fmt: skip
    elif status == "interrupted":
        say(f"interrupted at step {state['step']}: checkpoint written to {out_dir}; continue with --resume")
    tokens_per_s = train_tokens / train_time if train_time else 0.0
    return TrainResult(status, state["step"], state["planned_steps"], metrics, tokens_per_s, peak_memory(device),
                       str(out_dir), resumed_from)  # fmt: skip


def _mean_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= world
    return t


def _jsonable(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    return d
