"""LoRA fine-tuning of all 52B of Jamba-v0.1 on one GPU capped at 80 GiB (issue 21, item 3).

The model is built straight onto the GPU with seeded random weights (`materialize.build`: bf16, the
experts in int8, which time as real ones do), then as `train_tiny.py --hf ... --int8-experts
--checkpoint-activations --fast` trains it: adapters of rank r on AI21's target Linears
(minijamba.model.lora.DEFAULT_TARGETS), everything else frozen, activation checkpointing per
decoder layer, the fast backend (Triton scan and conv, FlexAttention for packed rows), AdamW on
the adapters. One step = forward with the loss, backward, clip, AdamW.

    row      packed rows of --row tokens (documents of random lengths, seq_idx): tokens/s and the
             peak memory of a step (torch.cuda.max_memory_allocated), --steps timed after a warm-up
    longest  one document a row at each of --lengths, in increasing order, until a step runs out of
             memory: the longest row that fits

    python bench/gpu_lora.py --out bench/results/.../lora.jsonl
    python bench/gpu_lora.py --smoke      # a toy model on the CPU: the script runs, numbers mean nothing

Each result is printed as JSON (prefix RESULT) and appended to --out.
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
from minijamba import JambaConfig  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.model.lora import DEFAULT_TARGETS, add_lora, lora_parameters  # noqa: E402
from minijamba.training.distributed import checkpoint_layers  # noqa: E402

GiB = 2**30
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_dt_rank=8)  # fmt: skip


def packed_row(length: int, vocab: int, g: torch.Generator, max_doc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens in documents of random lengths (1 .. max_doc): ids (1, l) and seq_idx (1, l) int32."""
    lengths, total = [], 0
    while total < length:
        lengths.append(min(int(torch.randint(1, max_doc + 1, (1,), generator=g)), length - total))
        total += lengths[-1]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    return torch.randint(0, vocab, (1, length), generator=g), seq_idx[None]


def step_fn(model, params, optimizer):
    def step(ids, seq_idx):
        targets = ids.roll(-1, 1)
        targets[:, -1] = -100
        if seq_idx is not None:  # no target across a document boundary
            targets[:, :-1].masked_fill_(seq_idx[:, 1:] != seq_idx[:, :-1], -100)
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=ids.device.type == "cuda"):
            loss = model(ids, targets=targets, seq_idx=seq_idx)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="the adapters' rank (AI21's recipe: 8)")
    p.add_argument("--row", type=int, default=4096, help="tokens per packed row (measurement 'row')")
    p.add_argument("--max-doc", type=int, default=2048, help="longest document in a packed row")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 24576, 32768, 49152, 65536])
    p.add_argument("--budget-gib", type=float, default=80.0, help="cap the GPU at this much memory")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.smoke else "cuda:0")
    rows = []

    def record(row):
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.smoke:
        config, args.row, args.max_doc, args.steps, args.lengths = JambaConfig(**SMOKE), 64, 16, 1, [128, 256]
        dtype = torch.float32
    else:
        config, dtype = JambaConfig.from_preset("jamba-v0.1"), torch.bfloat16
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * GiB / total), device)
    config.scan_backend = "fast"
    t0 = time.time()
    model = build(config, device, dtype=dtype, quantize="int8", seed=0, progress=not args.smoke)
    build_s = time.time() - t0
    wrapped = add_lora(model, args.rank, 2.0 * args.rank, targets=DEFAULT_TARGETS)
    checkpoint_layers(model)
    model.train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    step = step_fn(model, params, optimizer)
    weights_gib = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    record(dict(
        what="setup", device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        torch=torch.__version__, command=" ".join(["python", "bench/gpu_lora.py", *(argv or sys.argv[1:])]),
        parameters=model.num_parameters(), active=model.num_parameters(active=True), wrapped=len(wrapped),
        trained=sum(p.numel() for p in params), build_s=round(build_s, 1), budget_gib=args.budget_gib,
        weights_gib=weights_gib,
    ))  # fmt: skip

    g = torch.Generator().manual_seed(0)
    batches = [packed_row(args.row, config.vocab_size, g, args.max_doc) for _ in range(args.steps + 1)]
    batches = [(ids.to(device), s.to(device)) for ids, s in batches]
    step(*batches[0])  # warm-up: Triton and FlexAttention compile here
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step(*b).detach() for b in batches[1:]]
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    record(dict(what="row", row=args.row, packed=True, steps=args.steps, step_s=seconds, tokens_per_s=args.row / seconds,
                peak_gib=peak, loss=losses[-1].item(), finite=all(bool(torch.isfinite(x.detach())) for x in losses)))  # fmt: skip

    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t0 = time.perf_counter()
            step(ids, None)
            sync(device)
            record(dict(what="longest", row=length, status="ok", step_s=time.perf_counter() - t0,
                        peak_gib=torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None))  # fmt: skip
        except torch.OutOfMemoryError as e:
            optimizer.zero_grad(set_to_none=True)
            record(dict(what="longest", row=length, status="out of memory", error=str(e).splitlines()[0][:200]))
            break
    fits = [r["row"] for r in rows if r.get("what") == "longest" and r["status"] == "ok"]
    record(dict(what="summary", longest_row=max(fits, default=None), row=args.row,
                row_fits=rows[1]["finite"], budget_gib=args.budget_gib))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
