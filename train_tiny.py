#!/usr/bin/env python
"""Train a tiny Jamba on this machine, offline: by default on the Python standard library's source.

    python train_tiny.py                          # ~10 minutes on a 2-core CPU, writes out/tiny
    python generate.py --prompt "def "            # sample from it
    python train_tiny.py --resume                 # continue where it stopped
    python train_tiny.py --layout mamba --out-dir out/mamba      # the same size, Mamba layers only
    python train_tiny.py --task mqar --out-dir out/mqar           # associative recall
    python train_tiny.py --pack --out-dir out/packed              # documents packed, none crossing into the next
    python train_tiny.py --fast --cuda-graphs --weights bf16      # a GPU's fastest: see README.md
    torchrun --nproc-per-node 2 train_tiny.py --out-dir out/two   # 2 GPUs (or CPU processes): FSDP2
    python train_tiny.py --hf DIR --lora-rank 8 --data notes/ --out-dir out/lora   # LoRA on a released Jamba

The training loop itself is minijamba/training/train.py; this script only turns flags into a TrainConfig.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minijamba.model.config import LAYOUTS, PRESETS
from minijamba.training.train import DEFAULT_BATCH, EVALS_PER_RUN, TASKS, WEIGHTS, TrainConfig

DEFAULTS = TrainConfig()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    d = DEFAULTS
    p = Parser(
        prog="train_tiny.py",
        description="Train a tiny Jamba (hybrid Mamba-attention MoE) on this machine, without a download. "
        "By default: the 'tiny' preset on the Python standard library's own source files, for a time "
        "budget that finishes within 10 minutes on a 2-core CPU. Writes a checkpoint folder that "
        "--resume continues and generate.py samples from.",
    )
    g = p.add_argument_group("data and task")
    g.add_argument(
        "--task",
        choices=TASKS,
        help=f"text: next-token prediction; mqar: multi-query associative recall (default {d.task})",
    )
    g.add_argument(
        "--data",
        metavar="PATH",
        help="a UTF-8 text file or a folder of them (default: the Python standard library's top-level modules)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help=f"byte-level BPE vocabulary size, trained on the training split (default {d.vocab_size})",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        metavar="L",
        help=f"tokens per training sequence (text task; default {d.seq_len})",
    )
    g.add_argument(
        "--pack",
        action="store_true",
        default=None,
        help="text: pack the corpus's documents into full rows with nothing crossing a boundary (the conv "
        "window, the SSM state and attention restart at each document; no target across one)",
    )
    g.add_argument(
        "--mqar-pairs",
        type=int,
        metavar="P",
        help=f"MQAR key-value pairs per sequence (default {d.mqar_pairs})",
    )
    g.add_argument(
        "--mqar-queries",
        type=int,
        metavar="Q",
        help=f"MQAR keys asked again per sequence (default {d.mqar_queries})",
    )
    g.add_argument(
        "--mqar-keys", type=int, metavar="K", help=f"MQAR distinct keys to draw from (default {d.mqar_keys})"
    )
    g.add_argument(
        "--mqar-values",
        type=int,
        metavar="V",
        help=f"MQAR distinct values to draw from (default {d.mqar_values})",
    )
    g.add_argument(
        "--mqar-length",
        type=int,
        metavar="L",
        help="MQAR tokens per sequence, the queries spread over those after the pairs among <pad> tokens, as in "
        "the Zoology study (default 0: the queries right after the pairs)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset", metavar="NAME", help=f"model preset: {', '.join(PRESETS)} (default {d.preset})"
    )
    g.add_argument(
        "--layout",
        metavar="LAYOUT",
        help=f"{' | '.join(LAYOUTS)}: the preset's attention:Mamba mix, or the same size with only attention or only Mamba layers (default {d.layout})",
    )
    g.add_argument(
        "--override",
        action="append",
        metavar="KEY=VALUE",
        help="change one JambaConfig field of the preset, e.g. --override hidden_size=64 (repeatable)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--seed",
        type=int,
        help=f"seed for initialisation and data order: same seed, same run (default {d.seed})",
    )
    g.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="optimizer steps (the length of the LR schedule); default: as many as the time budget allows",
    )
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help=f"stop (with a checkpoint) after this many seconds, set-up included; 0 = no limit (default {d.time_budget:.0f})",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="stop (with a checkpoint) once this step is done, leaving the schedule as it is; --resume continues",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="sequences per step (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")",
    )
    g.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default {d.lr})")
    g.add_argument(
        "--warmup-steps",
        type=int,
        metavar="N",
        help=f"linear warmup steps before the cosine decay (default {d.warmup_steps})",
    )
    g.add_argument(
        "--eval-interval",
        type=int,
        metavar="N",
        help=f"steps between validations and checkpoints (default: about {EVALS_PER_RUN} per run)",
    )
    g.add_argument(
        "--eval-batches", type=int, metavar="N", help=f"validation batches (default {d.eval_batches})"
    )
    g = p.add_argument_group(
        "fine-tuning a released model (LoRA)",
        "with --hf: train LoRA adapters on a transformers Jamba folder, the base frozen (experts in int8 with "
        "--int8-experts), on --data packed into rows of --seq-len with the folder's own tokenizer; writes "
        "OUT_DIR/adapter in PEFT's format (the base folder is never written). Also applies: --data, --seq-len, "
        "--batch-size, --max-steps, --lr, --warmup-steps, --eval-interval, --eval-batches, --seed, --device, "
        "--checkpoint-activations, --fast, --out-dir",
    )
    g.add_argument("--hf", metavar="DIR", help="the base: a transformers Jamba checkpoint folder (config.json, safetensors, tokenizer.json)")
    g.add_argument("--lora-rank", type=int, metavar="R", help="the adapters' rank r")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="the update is scaled by A / r (default 2r)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapters' input (default 0)")
    g.add_argument(
        "--lora-targets",
        metavar="NAMES",
        help="comma-separated Linears to adapt (default AI21's recipe: in_proj,x_proj,out_proj,q_proj,k_proj,"
        "v_proj,o_proj,gate_proj,up_proj,down_proj), or all-linear",
    )
    g.add_argument("--int8-experts", action="store_true", default=None, help="hold the frozen experts in int8 (all 52B of Jamba-v0.1 on one 80GB GPU)")
    g.add_argument("--merge", action="store_true", default=None, help="also write OUT_DIR/merged: the base with the adapters folded in (not with --int8-experts)")
    g = p.add_argument_group("machine and output")
    g.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {d.device}: cuda if available)")
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model (slow to start, faster after)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="--compile with mode='reduce-overhead': each step replays as CUDA graphs, without a launch "
        "per kernel (one process on a GPU)",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        help=f"fp32: float32 weights, bf16 matmuls under autocast on a GPU; bf16: parameters and AdamW's "
        f"state in bf16 (A_log, D, the dt bias stay fp32), as transformers trains Jamba: less memory and "
        f"faster, but an update under ~0.2-0.4%% of its weight rounds away (default {d.weights})",
    )
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        default=None,
        help="keep only each decoder layer's input for backward and recompute the rest there: "
        "less memory for about a third more compute",
    )
    g.add_argument(
        "--fast",
        action="store_true",
        default=None,
        help="run the model's primitives on the fastest backend here instead of the plain reference: on a "
        "GPU our Triton kernels (else mamba-ssm's); on a CPU the cpu twins (the scan's hand-written "
        "backward, grouped experts: 1.8x faster steps, a quarter of the memory; bench/RESULTS.md)",
    )
    g.add_argument("--out-dir", metavar="DIR", help=f"checkpoint folder (default {d.out_dir})")
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out-dir exactly where it stopped (its settings are kept)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start a new run even if --out-dir holds a checkpoint (replacing it when the first one is written)",
    )
    return p


def _parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--override {item!r}: expected KEY=VALUE, e.g. hidden_size=64")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


FLAG_TO_FIELD = {"override": "overrides"}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig the flags describe, and the flags that were given explicitly."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    fields = {}
    for key, value in given.items():
        if key == "override":
            value = dict(_parse_override(item) for item in value)
        if key == "time_budget" and value == 0:
            value = None
        fields[FLAG_TO_FIELD.get(key, key)] = value
    cfg = TrainConfig(**fields)
    cfg.validate()
    return cfg, sorted(given)


LORA_FLAGS = ("hf", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "int8_experts", "merge")
# The flags a LoRA run (--hf) reads besides its own; --pack is what it does anyway.
FINETUNE_FLAGS = ("data", "seq_len", "batch_size", "max_steps", "lr", "warmup_steps", "eval_interval",
                  "eval_batches", "seed", "device", "checkpoint_activations", "fast", "out_dir", "pack")  # fmt: skip


def finetune_config_from_args(args: argparse.Namespace):
    """The FinetuneConfig of a --hf run; ValueError for a flag that does not apply to one."""
    from minijamba.training.finetune import FinetuneConfig

    given = {k: v for k, v in vars(args).items() if v is not None}
    other = sorted(k for k in given if k not in LORA_FLAGS + FINETUNE_FLAGS)
    if other:
        flags = ", ".join("--" + k.replace("_", "-") for k in other)
        verb = "do" if len(other) > 1 else "does"
        raise ValueError(f"{flags} {verb} not apply to a LoRA run (--hf): it keeps the base model, its tokenizer and packs --data")
    for need in ("lora_rank", "data", "out_dir"):
        if need not in given:
            raise ValueError(f"--hf fine-tunes LoRA adapters and needs --{need.replace('_', '-')}")
    given.pop("pack", None)
    if "lora_targets" in given:
        t = given["lora_targets"]
        given["lora_targets"] = t if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]
    cfg = FinetuneConfig(**given)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hf is not None:
        return finetune_main(args)
    lora = [f for f in LORA_FLAGS if getattr(args, f) is not None]
    if lora:
        print(f"train_tiny.py: error: --{lora[0].replace('_', '-')} needs --hf DIR (LoRA fine-tunes a transformers folder)",
              file=sys.stderr)  # fmt: skip
        return 2
    from minijamba.training import distributed
    from minijamba.training.checkpoint import CheckpointError
    from minijamba.training.train import RUNTIME_FIELDS, NonFiniteLoss, train

    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 prints (errors: every rank)
    who = "train_tiny.py" + (f" (rank {rank})" if distributed.launched_by_torchrun() else "")
    err = lambda msg: print(f"{who}: error: {msg}", file=sys.stderr)
    try:
        cfg, given = config_from_args(args)
        if cfg.resume:
            ignored = [k for k in given if FLAG_TO_FIELD.get(k, k) not in RUNTIME_FIELDS]
            if ignored and rank == 0:
                flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
                print(f"note: {flags} ignored: a resumed run keeps the settings it was started with")
        result = train(cfg)
        # Leave the process group together: a gloo peer torn down while the other is still in it
        # can abort the other at exit ("terminate called without an active exception").
        distributed.barrier()
    except NonFiniteLoss as e:
        err(e)
        return 1
    except (ValueError, OSError, CheckpointError) as e:  # incl. FileNotFoundError, FileExistsError
        err(e)
        return 1
    except KeyboardInterrupt:
        err("interrupted before a checkpoint could be written; any earlier checkpoint is kept")
        return 130
    finally:
        distributed.shutdown()
    if rank == 0:
        _summary(result)
    return 130 if result.status == "interrupted" else 0


def finetune_main(args) -> int:
    from minijamba.training.finetune import finetune

    try:
        r = finetune(finetune_config_from_args(args))
    except (ValueError, OSError) as e:
        print(f"train_tiny.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_tiny.py: error: interrupted; the adapter written last is kept", file=sys.stderr)
        return 130
    peak = f"; peak memory {r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_memory_bytes"] else ""
    print(f"{r['status']} at step {r['steps']}; validation loss {r['val_loss']:.4f} nats/token; "
          f"{r['tokens_per_s']:,.0f} training tokens/s{peak}")  # fmt: skip
    print(f"adapter: {r['adapter']}" + (f"; merged checkpoint: {r['merged']}" if "merged" in r else ""))
    return 130 if r["status"] == "interrupted" else 0


def _summary(r) -> None:
    m = r.metrics
    words = {
        "done": "done",
        "budget": "time budget reached",
        "stopped": "stopped",
        "interrupted": "interrupted",
    }
    steps = f"step {r.step}" + (f" of {r.planned_steps}" if r.planned_steps else "")
    parts = [f"{words[r.status]} at {steps}"]
    if m:
        v = f"validation loss {m['val_loss']:.4f} nats/token"
        if "bits_per_byte" in m:
            v += f" ({m['bits_per_byte']:.4f} bits/byte)"
        else:
            v += f", recall accuracy {m['accuracy']:.1%}"
        parts.append(v)
    if r.tokens_per_s:
        parts.append(f"{r.tokens_per_s:,.0f} training tokens/s")
    if r.peak_memory_bytes:
        parts.append(f"peak memory {r.peak_memory_bytes / 2**20:,.0f} MiB")
    print("; ".join(parts))
    print(f"checkpoint: {r.out_dir}  (sample with: python generate.py --out-dir {r.out_dir})")


if __name__ == "__main__":
    sys.exit(main())
