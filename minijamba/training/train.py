"""The training loop: one loop for the laptop (`train_tiny.py`) and, later, for several GPUs.

Glossary:

    b   global batch (sequences per optimizer step, over all processes)
    l   sequence length
    step      optimizer steps done so far
    planned   planned steps: the length of the learning-rate schedule

`train` is the loop, to read first; `Run` holds its set-up and the pieces each step calls.

What one step does: take batch `step` (a pure function of the seed and the step, see
minijamba.training.data), forward with the loss (bf16 autocast on a GPU, fp32 on the CPU),
backward, clip the gradient norm, set the learning rate for the step, AdamW step. The step's loss and gradient norm are read (and checked) a
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

Schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` at the planned step. With
`max_steps` it is known; with only a time budget, it is estimated from the speed of the first
steps and saved, so a resumed run keeps the same schedule. The time budget covers the whole call, set-up included.

Same seed, same run: the model's initialisation, the data order and the MQAR sequences all come
from the seed, and nothing else draws random numbers. With `max_steps` the whole run repeats
(bit for bit on the CPU); with only a time budget the planned length depends on the measured speed.

Stopping: at the planned step, at the time budget, at `stop_after`, or on Ctrl-C (finish the step,
write a checkpoint, return). A non-finite loss or gradient, or a non-finite validation loss or
weight when a checkpoint is due, stops the run without writing, so the last good checkpoint stays. Resume (`resume=True`) restores weights, optimizer, RNG states, schedule
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
import sys
import time
from pathlib import Path

import torch

from minijamba.checks import first_non_finite
from minijamba.model.jamba import Jamba, cast_parameters
from minijamba.runtime import Readout, StopFlag, dist_info, peak_memory, scan_backend_for
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
    check_memory,
    make_optimizer,
    model_config,
    open_out_dir,
)
from minijamba.training.schedule import EVALS_PER_RUN, lr_at, plan_steps, time_left

PLAN_AFTER = 10  # steps timed before planning the schedule's length from the time budget ...
PLAN_SECONDS = 15.0  # ... and seconds (unless warmup ends first)


# --- the loop ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Run (or resume) the training run described by `cfg`; see the module docstring."""
    run = Run(cfg, log)  # the set-up: resume or start, data, the memory plan, model, optimizer
    run.validate_first()  # step 0's validation (a resumed run: the one it saved, unless it is stale)
    with StopFlag() as stop:
        run.model.train()
        while (status := run.stop_reason(stop)) is None:
            run.step()  # one optimizer step; the last step's loss and gradient norm checked meanwhile
            run.plan_schedule()  # with only a time budget: the schedule's length, once the speed is known
            run.show_progress()
            if run.validation_due():
                run.validate_and_save()
        run.drain()  # nothing is evaluated or written before the last step's loss is known to be finite
    return run.finish(status)


class Run:
    """One call of `train`: its set-up, and what the loop's steps share (the model, the optimizer,
    the saved `state`, the timing, the progress bar, the step whose loss is still on the device)."""

    def __init__(self, cfg: TrainConfig, log=None):
        self.start = time.monotonic()
        cfg.validate()
        self.device = device = distributed.setup(cfg.device)  # joins torchrun's process group when it started us
        self.rank, self.world = rank, world = dist_info()
        if cfg.cuda_graphs and (device.type != "cuda" or world > 1):
            where = f"a {device.type} device" if device.type != "cuda" else f"{world} processes"
            raise ValueError(f"--cuda-graphs needs one process on a CUDA GPU, and this run has {where}: drop it")
        self.main = rank == 0
        from tqdm import tqdm

        self.tqdm = tqdm
        self.say = (log or tqdm.write) if self.main else (lambda *a, **k: None)
        self.out_dir = Path(cfg.out_dir)
        self.cfg, self.ckpt = cfg, ckpt = open_out_dir(cfg, self.out_dir, self.main)
        if cfg.batch_size % world:
            raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
        self.rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        self.task = task = build_task(cfg, tokenizer=ckpt.tokenizer if ckpt else None)
        if distributed.from_rank0(task.fingerprint()) != task.fingerprint():
            raise ValueError("the processes built different training data: give every process the same --data")
        self.config = config = ckpt.config if ckpt else model_config(cfg, task)
        config.scan_backend = scan_backend_for(cfg.fast)
        check_memory(cfg, config, task, device, world)
        torch.manual_seed(cfg.seed)
        model = Jamba(config).to(device)
        if cfg.weights == "bf16":
            cast_parameters(model, torch.bfloat16)
        self.model = model = distributed.prepare(model, device, cfg.checkpoint_activations)  # FSDP2 if several processes
        self.optimizer = make_optimizer(model, cfg)
        self.state = {
            "step": 0, "planned_steps": cfg.max_steps, "eval_interval": cfg.eval_interval, "tokens_seen": 0,
            "train_seconds": 0.0, "data": task.fingerprint(), "history": {"step": [], "loss": [], "lr": []},
            "evals": [], "status": "running",
        }  # fmt: skip
        if ckpt:
            self._restore(ckpt)
        self.resumed_from = self.state["step"] if ckpt else None
        self.net = torch.compile(model, mode="reduce-overhead" if cfg.cuda_graphs else None) if cfg.compile else model
        # A step's CUDA graphs own their outputs until the next step begins; say when it does.
        self.step_begin = torch.compiler.cudagraph_mark_step_begin if cfg.cuda_graphs else (lambda: None)
        use_bf16 = device.type == "cuda" or cfg.weights == "bf16"  # bf16 weights: bf16 math on a CPU too
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.val = task.val_batches(cfg.batch_size, cfg.eval_batches)  # every process evaluates all of it
        self.title = f"{cfg.layout} {config.describe()}"
        self.say(f"model: {cfg.preset} {cfg.layout}, {config.describe()}, {model.num_parameters() / 1e6:.2f}M parameters "
                 f"({model.num_parameters(active=True) / 1e6:.2f}M active), scan backend {config.scan_backend or 'default'}")  # fmt: skip
        self.say(f"data: {task.describe()}; batch {cfg.batch_size} x {task.seq_len} tokens; device {device}"
                 + (" (bf16 weights)" if cfg.weights == "bf16" else " (bf16 autocast)" if use_bf16 else " (fp32)")
                 + ("; CUDA graphs" if cfg.cuda_graphs else "")
                 + (f"; {world} processes, FSDP2" if world > 1 else "")
                 + ("; activation checkpointing" if cfg.checkpoint_activations else ""))  # fmt: skip
        self.plot_note = False
        self.last_good = self.state["step"] if ckpt else None
        self.metrics, self.eval_seconds, self.save_seconds = {}, 0.0, 1.0
        self.budget_end = None if cfg.time_budget is None else self.start + cfg.time_budget
        self.tokens_per_step = cfg.batch_size * task.seq_len
        self.train_time, self.train_tokens, self.timed_from, self.done_here = 0.0, 0, None, 0
        self.warm_steps = 3 if cfg.cuda_graphs else 1  # steps of this call left out of the throughput (see step)
        self.bar, self.ema, self.pending = None, None, None

    # --- resuming -------------------------------------------------------------------------------
    def _restore(self, ckpt) -> None:
        """Weights, optimizer, RNG states and the saved state of the checkpoint being resumed."""
        if ckpt.train_state.get("data") != self.task.fingerprint():
            raise checkpoint.CheckpointError(
                f"the training data differ from those of the checkpoint in {self.out_dir} (another --data, "
                f"or another Python's standard library): resume with the same data"
            )
        distributed.load_model_state(self.model, ckpt.model_tensors, source=str(self.out_dir / checkpoint.MODEL))
        distributed.load_optimizer_state(self.model, self.optimizer, ckpt.optimizer_tensors, ckpt.param_groups)
        checkpoint.set_rng_state(ckpt.train_state.get("rng", {}))
        self.state.update({k: v for k, v in ckpt.train_state.items() if k != "rng"})
        planned = self.state["planned_steps"]
        self.say(f"resuming {self.out_dir} at step {self.state['step']}" + (f" of {planned}" if planned else ""))

    # --- validation and checkpoints -----------------------------------------------------------
    def run_eval(self) -> None:
        t = time.monotonic()
        self.metrics = evaluate(self.net, self.val, self.task.token_nbytes, self.device, self.autocast, self.step_begin,
                                self.task.documents)  # fmt: skip
        self.state["evals"].append({"step": self.state["step"], **self.metrics})
        self.eval_seconds = time.monotonic() - t
        self.say(format_eval(self.state["step"], self.metrics))

    def validate_first(self) -> None:
        """Validate at the step the run starts from (unless the checkpoint holds that validation),
        then open the progress bar."""
        evals = self.state["evals"]
        if not evals or evals[-1]["step"] != self.state["step"]:
            self.run_eval()
        else:
            self.metrics = {k: v for k, v in evals[-1].items() if k != "step"}
        self.bar = self.tqdm(total=self.state["planned_steps"], initial=self.state["step"], unit="step",
                             disable=not self.main, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)  # fmt: skip

    def validation_due(self) -> bool:
        step, interval = self.state["step"], self.state["eval_interval"]
        return bool(interval) and step % interval == 0 and step not in (self.state["planned_steps"], self.cfg.stop_after)

    def validate_and_save(self) -> None:
        self.settle()
        self.run_eval()
        self.model.train()
        self.save("running")
        self.last_good = self.state["step"]

    def plot(self, path) -> None:
        if not plot_history(self.state, path, self.title) and not self.plot_note:
            self.plot_note = True
            self.say("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")

    def refuse(self, what: str):
        """Stop instead of saving broken weights: the last good checkpoint stays as it is."""
        if self.bar is not None:
            self.bar.close()
        kept = (f"the last good checkpoint (step {self.last_good}) is kept in {self.out_dir}" if self.last_good is not None
                else "no checkpoint had been written yet")  # fmt: skip
        raise NonFiniteLoss(f"{what} at step {self.state['step']}; training stopped without saving and {kept}; "
                            "try a lower --lr")  # fmt: skip

    def save(self, status: str) -> None:
        t, state, model = time.monotonic(), self.state, self.model
        # Never save a NaN: the last validation and the weights are checked (rank 0 decides for all).
        last = state["evals"][-1] if state["evals"] else {}
        bad = next((f"the validation {k.removeprefix('val_').replace('_', ' ')} became {v}" for k, v in last.items()
                    if k != "step" and not math.isfinite(v)), None)  # fmt: skip
        bad = distributed.from_rank0(bad)
        if bad is not None:
            self.refuse(bad)
        state["status"] = status
        tensors = distributed.model_state(model)  # sharded: gathered to rank 0 (every rank calls)
        bad = distributed.from_rank0(first_non_finite(tensors) if self.main else None)
        if bad is not None:
            self.refuse(f"the weight {bad} became NaN or infinite")
        opt_tensors, groups = distributed.optimizer_state(model, self.optimizer)
        if self.main:
            checkpoint.save(
                self.out_dir, model_tensors=tensors, optimizer_tensors=opt_tensors, param_groups=groups,
                config=self.config, train_config=_jsonable(self.cfg), tokenizer=self.task.tokenizer,
                train_state={**state, "rng": checkpoint.rng_state()}, plot=self.plot,
            )  # fmt: skip
        distributed.barrier()  # the checkpoint is on disk before any process goes on
        self.save_seconds = time.monotonic() - t

    # --- the steps -----------------------------------------------------------------------------
    def stop_reason(self, stop) -> str | None:
        """'done' (at the planned step), 'stopped' (at stop_after), 'interrupted' (Ctrl-C), 'budget', or None: go on.
        Every process stops at the same step."""
        step, planned = self.state["step"], self.state["planned_steps"]
        if planned is not None and step >= planned:
            return "done"
        if self.cfg.stop_after is not None and step >= self.cfg.stop_after:
            return "stopped"
        over = self.budget_end is not None and time.monotonic() + self.eval_seconds + self.save_seconds > self.budget_end
        interrupted, over_budget = distributed.any_rank(stop.set, over)
        return "interrupted" if interrupted else "budget" if over_budget else None

    def step(self) -> None:
        """One optimizer step on batch s; then the last step's loss and gradient norm are read (a step
        late, so that the host launches this one while the device runs it)."""
        cfg, device, state = self.cfg, self.device, self.state
        t0 = time.monotonic()
        step = state["step"]
        lr = lr_at(step, cfg, state["planned_steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.task.batch(step, cfg.batch_size, self.rows)
        seq_idx = self.task.documents(x)  # packed rows: each position's document (else None)
        if device.type == "cuda":  # from pinned memory the copy need not wait for the last step
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if seq_idx is not None:
            seq_idx = seq_idx.to(device, non_blocking=True)
        self.step_begin()
        with self.autocast():
            _, loss = self.net(x, targets=y, seq_idx=seq_idx)
        loss.backward()
        grad_norm = distributed.clip_grad_norm(self.model, cfg.grad_clip)  # over all shards
        values = Readout(torch.stack([_mean_over_ranks(loss.detach(), self.world).float(), grad_norm.float()]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        state["tokens_seen"] += self.tokens_per_step
        self.settle()  # the last step's loss, read now that the device is on this one
        self.pending = (step, lr, values)
        dt = time.monotonic() - t0
        state["train_seconds"] += dt
        # Throughput once warm: the first step of this call warms up caches and compiles; with CUDA
        # graphs the next ones run the graphs' warm-up and capture them.
        self.done_here += 1
        if self.done_here <= self.warm_steps:
            self.timed_from = step
        else:
            self.train_time += dt
            self.train_tokens += self.tokens_per_step

    def settle(self) -> None:
        """Check and record the pending step's loss and gradient norm (waiting for them if need be).
        Read a step late, they leave the device busy: a non-finite one still stops the run before
        anything is evaluated or written, and the last good checkpoint stays."""
        if self.pending is None:
            return
        (done, lr_done, values), self.pending = self.pending, None
        loss_value, norm = values.get()
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            self.bar.close()
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            kept = (f"the last good checkpoint (step {self.last_good}) is kept in {self.out_dir}"
                    if self.last_good is not None else "no checkpoint had been written yet")  # fmt: skip
            raise NonFiniteLoss(f"the {what} became {loss_value if what == 'loss' else norm} at step {done}; "
                                f"training stopped and {kept}; try a lower --lr")  # fmt: skip
        hist = self.state["history"]
        hist["step"].append(done), hist["loss"].append(loss_value), hist["lr"].append(lr_done)
        self.ema = loss_value if self.ema is None else 0.9 * self.ema + 0.1 * loss_value

    def plan_schedule(self) -> None:
        """With only a time budget: fix the schedule's length once the speed is known (rank 0's
        clock: one schedule for all), and the validation interval once that is."""
        state, step, cfg = self.state, self.state["step"], self.cfg
        if state["planned_steps"] is None:
            timed = step - self.timed_from >= PLAN_AFTER and (
                self.train_time >= PLAN_SECONDS or step >= cfg.warmup_steps
            )
            planned = plan_steps(cfg, step, self.train_time / (step - self.timed_from), self.eval_seconds,
                                 self.save_seconds, self.budget_end - time.monotonic()) if timed else None  # fmt: skip
            planned = distributed.from_rank0(planned)
            if planned is not None:
                state["planned_steps"] = planned
                self.bar.total = planned
                self.say(f"time budget {cfg.time_budget:.0f} s: planning {planned} steps")
        if state["eval_interval"] is None and state["planned_steps"] is not None:
            state["eval_interval"] = max(1, state["planned_steps"] // EVALS_PER_RUN)

    def show_progress(self) -> None:
        tok_s = self.train_tokens / self.train_time if self.train_time else 0.0
        left = time_left(self.state, self.state["step"], self.train_time, self.train_tokens, self.tokens_per_step,
                         self.budget_end)  # fmt: skip
        shown = f"loss {self.ema:.3f}, " if self.ema is not None else ""
        self.bar.set_postfix_str(f"{shown}{tok_s:,.0f} tok/s, {left} left", refresh=False)
        self.bar.update(1)

    # --- the end -------------------------------------------------------------------------------
    def drain(self) -> None:
        """The last step's loss checked, and the device's last step counted in the time."""
        t_end = time.monotonic()
        self.settle()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_time += time.monotonic() - t_end if self.train_tokens else 0.0

    def finish(self, status: str) -> TrainResult:
        """A last validation (unless interrupted: then get out fast), a checkpoint, the result."""
        self.bar.close()
        state = self.state
        if status != "interrupted" and state["evals"][-1]["step"] != state["step"]:
            self.run_eval()
        self.save(status)
        planned = f" of {state['planned_steps']}" if state["planned_steps"] else ""
        if status == "budget":
            self.say(f"time budget of {self.cfg.time_budget:.0f} s reached at step {state['step']}{planned}; "
                     "continue with --resume")  # fmt: skip
        elif status == "interrupted":
            self.say(f"interrupted at step {state['step']}: checkpoint written to {self.out_dir}; continue with --resume")
        tokens_per_s = self.train_tokens / self.train_time if self.train_time else 0.0
        return TrainResult(status, state["step"], state["planned_steps"], self.metrics, tokens_per_s,
                           peak_memory(self.device), str(self.out_dir), self.resumed_from)  # fmt: skip


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
