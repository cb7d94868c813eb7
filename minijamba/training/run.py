"""What defines a training run: its settings (`TrainConfig`, saved as train_config.json, and how each
is checked), its result, the model, task and optimizer they describe, and the set-up's checks (the
--out-dir to start or resume in, the memory the run will need).

The loop that runs it is minijamba.training.train; train_tiny.py turns its flags into a TrainConfig.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minijamba.checks import check_fields, check_seed
from minijamba.model.config import LAYOUTS, PRESETS, JambaConfig, check_field
from minijamba.model.dispatch import ENV_VAR
from minijamba.runtime import scan_backend_for, total_memory
from minijamba.training import checkpoint, distributed
from minijamba.training import tokenizer as tk
from minijamba.training.data import MQARSpec, MQARTask, TextTask
from minijamba.training.memory_plan import check_training, training_plan

TASKS = ("text", "mqar")
# Fields a resumed run takes from the command line; all others come from the checkpoint.
RUNTIME_FIELDS = ("time_budget", "device", "compile", "cuda_graphs", "fast", "stop_after", "out_dir", "resume",
                  "overwrite", "checkpoint_activations")
WEIGHTS = ("fp32", "bf16")
DEFAULT_BATCH = {"text": 8, "mqar": 32}  # sequences per step; MQAR's are short and carry few targets


MAX_LR = 1.0  # AdamW's step moves each weight by about lr: beyond 1 a run can only diverge
FLAGS = {"overrides": "--override"}  # fields whose flag is not --<field-name>
NO_FLAG = ("min_lr_ratio", "weight_decay", "betas", "grad_clip")  # TrainConfig fields without a flag


def flag_of(field_name: str) -> str:
    """The train_tiny.py flag that sets a TrainConfig field (its name, for those without one)."""
    if field_name in NO_FLAG:
        return f"TrainConfig.{field_name}"
    return FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as train_config.json)."""

    task: str = "text"  # "text" (next-token prediction) or "mqar" (associative recall)
    data: str | None = None  # text file or folder; None = the Python standard library's modules
    vocab_size: int = 4096  # BPE vocabulary (text task)
    preset: str = "tiny"  # JambaConfig preset
    layout: str = "hybrid"  # "hybrid" (the preset's a:m), "attention" only or "mamba" only
    overrides: dict = field(default_factory=dict)  # JambaConfig fields to change from the preset
    seed: int = 0
    max_steps: int | None = None  # T; None = estimate from the time budget
    time_budget: float | None = 540.0  # seconds for the whole call; None = no limit
    stop_after: int | None = None  # stop (with a checkpoint) once this step is done
    batch_size: int | None = None  # b, global; None = DEFAULT_BATCH of the task
    seq_len: int = 128  # l (text task; MQAR's length follows from its sizes)
    pack: bool = False  # text: rows of whole documents with nothing crossing a boundary (seq_idx)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_interval: int | None = None  # steps between validations; None = about EVALS_PER_RUN per run
    eval_batches: int = 4  # validation batches of b sequences
    mqar_pairs: int = 8
    mqar_queries: int = 8
    mqar_keys: int = 32
    mqar_values: int = 32
    mqar_length: int = 0  # tokens per MQAR sequence (0: 2P + 2Q, nothing between pairs and queries)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = False  # compile with mode="reduce-overhead": steps replayed as CUDA graphs (GPU)
    weights: str = "fp32"  # "fp32" (mixed precision) or "bf16": parameters and AdamW's state in bf16
    checkpoint_activations: bool = False  # recompute each decoder layer's activations in backward
    fast: bool = False  # the fastest available scan backend instead of the reference
    out_dir: str = "out/tiny"
    resume: bool = False
    overwrite: bool = False  # replace a checkpoint already in out_dir (otherwise refuse)

    def validate(self) -> None:
        """Raise ValueError naming the flag (the field, for those without one) of the first setting
        that makes no sense: its type, its range, NaN and infinities, and the model overrides, which
        must be JambaConfig fields of the right type that make a valid model (its memory is planned
        in `train`, before it is built)."""
        if self.time_budget is not None and not (_finite(self.time_budget) and self.time_budget > 0):
            raise ValueError(
                "--time-budget must be a finite number of seconds > 0 (0 = no limit), "
                f"got {self.time_budget!r}"
            )
        if not (_finite(self.lr) and 0 < self.lr <= MAX_LR):
            raise ValueError(
                f"--lr must be a finite number in (0, {MAX_LR:g}], got {self.lr!r} (default "
                f"{TrainConfig.lr:g}): AdamW moves each weight by about lr per step"
            )
        for name in ("data", "out_dir"):  # a Path is as good as a str (and saved as one)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_fields(self, flag_of)  # types: a str where a number belongs is named here, not compared
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"unknown weights dtype {self.weights!r}: choose one of {', '.join(WEIGHTS)}")
        if self.cuda_graphs:
            self.compile = True  # CUDA graphs come from torch.compile's mode="reduce-overhead"
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH.get(self.task, 8)
        check_seed(self.seed, "--seed")
        for name in ("batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_of(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_interval", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{flag_of(name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is None and self.time_budget is None:
            raise ValueError("without a time budget the run needs --max-steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must both be in [0, 1), got {tuple(self.betas)}")
        if self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0, got {self.grad_clip}")
        if self.task == "text" and not tk.MIN_BPE_VOCAB <= self.vocab_size <= tk.MAX_BPE_VOCAB:
            raise ValueError(
                f"--vocab-size must be at least {tk.MIN_BPE_VOCAB} (256 bytes + end-of-text) and at most "
                f"{tk.MAX_BPE_VOCAB:,}, got {self.vocab_size}"
            )
        if self.task == "mqar":
            self.mqar_spec().validate()
        if self.pack and self.task != "text":
            raise ValueError("--pack packs the documents of a text corpus; an MQAR sequence is one document already")
        self._check_overrides()

    def _check_overrides(self) -> None:
        """Each --override KEY=VALUE names a JambaConfig field and has its type; together with the
        preset and the layout they make a valid model (the fields `model_config` sets from the task
        stand in with the preset's values here)."""
        fields = {f.name for f in dataclasses.fields(JambaConfig)}
        for key, value in self.overrides.items():
            if key not in fields:
                raise ValueError(
                    f"--override {key}: unknown model setting {key!r}: overrides must be JambaConfig fields"
                )
            try:
                check_field(key, value)
            except ValueError as e:
                raise ValueError(f"--override {key}={value!r}: {e}") from None
        from_task = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "scan_backend"}
        try:
            kept = {k: v for k, v in self.overrides.items() if k not in from_task}
            JambaConfig.from_preset(self.preset, **kept).with_layout(self.layout)
        except ValueError as e:
            raise ValueError(f"--override: {e}") from None

    def mqar_spec(self) -> MQARSpec:
        return MQARSpec(self.mqar_pairs, self.mqar_queries, self.mqar_keys, self.mqar_values, self.mqar_length)


@dataclass
class TrainResult:
    status: str  # "done", "budget" (time ran out), "stopped" (stop_after), "interrupted" (Ctrl-C)
    step: int
    planned_steps: int | None
    metrics: dict  # the last validation: val_loss, accuracy, bits_per_byte (text)
    tokens_per_s: float
    peak_memory_bytes: int | None
    out_dir: str
    resumed_from: int | None = None


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN or infinite; the run stopped without writing a checkpoint."""


# --- small pieces ------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, task) -> JambaConfig:
    """The preset, with the task's vocabulary and special tokens and the overrides, in the asked layout."""
    if task.kind == "text":  # end-of-text marks the end of a document, and pads (as in GPT-2)
        eot = tk.eot_id(task.tokenizer)
        special = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    else:  # MQAR: only padding
        special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    overrides = {
        **cfg.overrides,
        "vocab_size": task.vocab_size,
        **special,
        "scan_backend": scan_backend_for(cfg.fast),
    }
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(JambaConfig)})
    if unknown:
        raise ValueError(f"unknown model setting {unknown[0]!r}: overrides must be JambaConfig fields")
    return JambaConfig.from_preset(cfg.preset, **overrides).with_layout(cfg.layout)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on norms, biases, A_log or D).

    On a GPU the fused implementation: one kernel for all parameters instead of a few per tensor
    (it was 24% of a training step on an H100, bench/RESULTS.md); same update, same state."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("A_log") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def build_task(cfg: TrainConfig, tokenizer=None):
    if cfg.task == "mqar":
        return MQARTask(cfg.mqar_spec(), cfg.seed)
    return TextTask.build(cfg.data, cfg.vocab_size, cfg.seq_len, cfg.seed, tok=tokenizer, pack=cfg.pack)


# --- set-up ----------------------------------------------------------------------------------
def open_out_dir(cfg: TrainConfig, out_dir: Path, main: bool):
    """(cfg, checkpoint or None): a resumed run takes its settings from the checkpoint, but for
    RUNTIME_FIELDS; a new one refuses a folder that holds a checkpoint unless told to replace it."""
    if not main:  # rank 0 first: it alone puts back a checkpoint that a crash left half-swapped
        distributed.barrier()
    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(out_dir, training=True)
        checkpoint.check_writable(out_dir)  # before the first step, not at the first checkpoint
        saved = {k: v for k, v in ckpt.train_config.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
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
    return cfg, ckpt

def check_memory(cfg: TrainConfig, config, task, device, world: int) -> None:
    """The run's memory, planned by arithmetic on the sizes before anything is built (even on the
    meta device a million layers take minutes): refused with the largest batch that would fit."""
    backend = config.scan_backend or os.environ.get(ENV_VAR) or "reference"
    memory = training_plan(config, cfg.batch_size, task.seq_len, cfg.weights, world, cfg.checkpoint_activations,
                           task.val_nbytes(cfg.batch_size, cfg.eval_batches) // cfg.batch_size,
                           chunked_scan=device.type == "cpu" and backend == "cpu", autograd_scan=backend == "reference",
                           bf16_activations=device.type == "cuda" or cfg.weights == "bf16")  # fmt: skip
    check_training(memory, total_memory(device), f"this {device.type}")
