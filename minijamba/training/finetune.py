"""LoRA fine-tuning of a released Jamba: `train_tiny.py --hf DIR --lora-rank R --data PATH --out-dir RUN`.

Glossary:

    b   rows per step        l   tokens per row (seq_len)
    r   the adapters' rank   α   lora_alpha (minijamba.model.lora)

What a run does:

    1. load      the transformers folder DIR (`load_hf`), bf16 on a GPU and float32 on the CPU,
                 the experts in int8 with `int8_experts` (frozen: the backward takes only their
                 input's gradient, minijamba.inference.quant), and its own tokenizer
    2. adapt     freeze everything and wrap the target Linears with rank-r adapters (`add_lora`)
    3. data      the documents of --data, each followed by the folder's end token, packed into full
                 rows of l tokens with `seq_idx` (nothing crosses a document boundary: the conv
                 window, the SSM state and attention restart; no target after an end token); the
                 last 10% of each document is held out for validation
    4. train     AdamW on the adapters alone (float32), warmup then cosine, gradient clipping; bf16
                 autocast on a GPU; activation checkpointing per decoder layer if asked
    5. write     RUN/adapter/ in PEFT's format (minijamba.hf_adapter) at each validation and at the
                 end, atomically; RUN/finetune.json, the settings and the loss history; with `merge`,
                 RUN/merged/: the base with the adapters folded in, a folder transformers loads,
                 the tokenizer files beside it

DIR is only read. The balancing loss is left out (the router is frozen: its only effect would be to
pull the adapters towards balanced routing), as PEFT on transformers' Jamba trains by default.
Ctrl-C finishes the step and writes the adapter.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minijamba.hf_tokenizer import CHAT_TEMPLATE, GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG

ADAPTER = "adapter"  # RUN/adapter/: the PEFT folder
MERGED = "merged"  # RUN/merged/: the merged checkpoint folder (--merge)
STATE = "finetune.json"
IGNORE = -100


@dataclass
class FinetuneConfig:
    """A LoRA run's settings (train_tiny.py's flags with --hf)."""

    hf: str  # the base checkpoint folder (transformers' format); never written
    data: str  # text file or folder
    out_dir: str
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2r
    lora_dropout: float = 0.0
    lora_targets: list[str] | str | None = None  # None: minijamba.model.lora.DEFAULT_TARGETS; or "all-linear"
    int8_experts: bool = False
    merge: bool = False
    seq_len: int = 512
    batch_size: int = 1
    max_steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int | None = None  # None: 4 validations a run
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"
    checkpoint_activations: bool = False
    fast: bool = False
    history: list = field(default_factory=list)

    def validate(self) -> None:
        for name in ("lora_rank", "seq_len", "batch_size", "max_steps", "eval_batches"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"--lr must be in (0, 1], got {self.lr!r}")
        if self.merge and self.int8_experts:
            raise ValueError(
                "--merge with --int8-experts would write int8-rounded experts into the merged folder: merge "
                "from the full-precision base (drop --int8-experts; RUN/adapter applies to either)"
            )


def _check_base(folder: Path, out: Path) -> None:
    """DIR must be a transformers folder (not a train_tiny.py run), and RUN must lie outside it."""
    from minijamba.hf import CONFIG_NAME
    from minijamba.training.checkpoint import is_checkpoint

    if not folder.is_dir():
        raise FileNotFoundError(f"--hf {folder}: no such folder (give a transformers Jamba checkpoint folder)")
    if is_checkpoint(folder) and not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"--hf {folder} is a train_tiny.py checkpoint, not a transformers folder: LoRA fine-tunes a "
            f"released model's folder. Export it first (python -m minijamba.export {folder} HF_DIR) and pass "
            "--hf HF_DIR, or continue training all its weights with --resume --out-dir"
        )
    base, run = folder.resolve(), out.resolve()
    if run == base or base in run.parents:
        raise ValueError(f"--out-dir {out} lies inside the base folder {folder}, which is never written: choose another")


def pack_rows(tok, texts: list[str], eos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents -> packed rows: inputs, targets and seq_idx, (N, l) each. The texts, each followed
    by `eos`, run on as one stream cut into rows of l + 1 (the last, partial one dropped); seq_idx
    counts the end tokens before each position, and no target follows an end token."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"--data holds {len(ids)} tokens, fewer than one row of --seq-len {seq_len} + 1: give more text")
    stream = torch.tensor(ids[: n * seq_len + 1])
    x = stream[:-1].view(n, seq_len)  # (N, l)
    y = stream[1:].view(n, seq_len).masked_fill(x == eos, IGNORE)  # (N, l)
    ends = (x == eos).to(torch.int32)
    return x, y, (ends.cumsum(1) - ends).to(torch.int32)


def finetune(cfg: FinetuneConfig, log=print):
    """Run a LoRA fine-tune (module docstring). Returns the run's summary dict."""
    from tqdm import tqdm

    from minijamba.hf import load_hf, read_config
    from minijamba.model.jamba import Jamba
    from minijamba.hf_adapter import save_adapter
    from minijamba.hf_tokenizer import load_tokenizer
    from minijamba.model.lora import DEFAULT_TARGETS, add_lora, find_targets, lora_parameters
    from minijamba.runtime import StopFlag, peak_memory, resolve_device, scan_backend_for
    from minijamba.training.data import load_documents, split_document
    from minijamba.training.distributed import checkpoint_layers
    from minijamba.training.schedule import lr_at

    cfg.validate()
    base, out = Path(cfg.hf), Path(cfg.out_dir)
    _check_base(base, out)
    device = resolve_device(cfg.device)
    if not (base / TOKENIZER).is_file():
        raise FileNotFoundError(f"--hf {base} has no {TOKENIZER}: fine-tuning encodes --data with the folder's own tokenizer")
    targets = cfg.lora_targets or list(DEFAULT_TARGETS)
    with torch.device("meta"):  # the targets checked on the config's model before anything is read
        find_targets(Jamba(read_config(base)), targets)
    tok = load_tokenizer(base)
    eos = tok.special_id("eos_token")
    if eos is None:
        raise ValueError(f"--hf {base}: its tokenizer names no eos_token, which the packed documents end with")
    docs = load_documents(cfg.data)
    parts = [split_document(text) for _, text in docs]
    train = pack_rows(tok, [t for t, _ in parts if t], eos, cfg.seq_len)
    val = pack_rows(tok, [v for _, v in parts if v], eos, cfg.seq_len) if any(v for _, v in parts) else train

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_hf(base, device, dtype=dtype, quantize="int8" if cfg.int8_experts else None)
    model.config.scan_backend = scan_backend_for(cfg.fast)
    model.config.router_aux_loss_coef = 0.0  # the router is frozen (module docstring)
    wrapped = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)
    if cfg.checkpoint_activations:
        checkpoint_layers(model)
    params = lora_parameters(model)
    trained = sum(p.numel() for p in params)
    log(f"LoRA r={cfg.lora_rank} on {len(wrapped)} Linears: {trained:,} trained parameters of "
        f"{model.num_parameters():,}; {len(train[0])} training rows of {cfg.seq_len} tokens")  # fmt: skip
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.999))
    interval = cfg.eval_interval or max(1, cfg.max_steps // 4)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train[0]), generator=g)

    def batch(rows, i):
        x, y, s = (t[i].to(device) for t in rows)
        return x, y, s

    def loss_of(x, y, s):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return model(x, targets=y, seq_idx=s)[1]

    def validate(step):
        model.eval()
        with torch.no_grad():
            n = min(len(val[0]), cfg.eval_batches * cfg.batch_size)
            losses = [loss_of(*batch(val, torch.arange(i, min(i + cfg.batch_size, n)))).item()
                      for i in range(0, n, cfg.batch_size)]  # fmt: skip
        model.train()
        cfg.history.append({"step": step, "val_loss": sum(losses) / len(losses)})
        save_adapter(model, out / ADAPTER, targets, base=str(base))
        (out / STATE).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        return cfg.history[-1]["val_loss"]

    out.mkdir(parents=True, exist_ok=True)
    model.train()
    tokens, start, status = 0, time.monotonic(), "done"
    bar = tqdm(total=cfg.max_steps, desc="fine-tuning", unit="step")
    with StopFlag() as stop:
        for step in range(cfg.max_steps):
            idx = order[torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % len(order)]
            x, y, s = batch(train, idx)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, cfg.max_steps)
            loss = loss_of(x, y, s)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                raise ValueError(f"step {step + 1}: the loss or gradient is not finite: lower --lr (the adapter written last is kept)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += x.numel()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.monotonic() - start):,.0f}")
            if (step + 1) % interval == 0 or step + 1 == cfg.max_steps or stop.set:
                bar.write(f"step {step + 1}: validation loss {validate(step + 1):.4f}")
            if stop.set:
                status = "interrupted"
                break
    bar.close()
    seconds = time.monotonic() - start
    summary = {"status": status, "steps": step + 1, "val_loss": cfg.history[-1]["val_loss"],
               "tokens_per_s": tokens / seconds, "peak_memory_bytes": peak_memory(device),
               "adapter": str(out / ADAPTER)}  # fmt: skip
    if cfg.merge and status == "done":
        summary["merged"] = str(write_merged(model, base, out / MERGED))
    return summary


def write_merged(model, base: Path, folder: Path) -> Path:
    """The model with its adapters folded in (minijamba.model.lora.merge_lora_), written as a
    transformers folder with the base folder's tokenizer files beside it."""
    from minijamba.hf_save import save_hf
    from minijamba.model.lora import merge_lora_

    merge_lora_(model)
    extra = {name: (base / name).read_text(encoding="utf-8")
             for name in (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE, GENERATION_CONFIG)
             if (base / name).is_file()}  # fmt: skip
    return save_hf(model, folder, extra_files=extra)
