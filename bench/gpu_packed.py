"""Packed variable-length training on a GPU (issue 20): what packing buys, and what seq_idx costs.

Three measurements, each its comparison measured in the same process:

1. `train`: training steps (forward, backward, AdamW) of a mid-size hybrid on a corpus of varied
   document lengths (log-normal, median 400 tokens, clipped to 16 .. 16K), as
   - packed: the documents back to back in full rows of l tokens, seq_idx marking them, the target
     across each boundary left out (what `train_tiny.py --pack` does);
   - padded: each document in rows of its own (a long one cut into l-token pieces), the rest of
     the row padding, whose targets are left out;
   - packed without seq_idx: the same rows, documents leaking into each other (the cost of seq_idx).
   For each: tokens/s through the model, the fraction of positions that carry a target (useful
   tokens) and useful tokens/s.
2. `scan`: the Triton scan, forward + backward and forward alone, with seq_idx against without, at
   the training shape b = 4, d = 2048, n = 16, l = 2048 in bf16 (target: within 5%); the Triton conv
   likewise.
3. `attention`: block-diagonal causal attention for the packed rows, SDPA with a boolean mask (the
   reference) against FlexAttention with a document mask (made once, and as the fast backends' twin
   makes it, each call), and plain causal SDPA (flash, documents leaking) as the floor; forward +
   backward.

    python bench/gpu_packed.py --out $OUT/packed.json
    python bench/gpu_packed.py --smoke --out /tmp/packed.json    # tiny sizes on the CPU: it runs

Times are medians of triton.testing.do_bench (CUDA events) on the GPU, of a few perf_counter
repeats with --smoke.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba import Jamba, JambaConfig  # noqa: E402
from minijamba.training.data import IGNORE  # noqa: E402

EOT, PAD = 0, 1  # token ids of the synthetic corpus: end of document, padding


def bench(fn, smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if not smoke:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def doc_lengths(total: int, l_max: int, seed: int) -> list[int]:
    """Document lengths (tokens, end token included) summing to about `total`: log-normal, median
    400, clipped to [16, l_max]."""
    g = torch.Generator().manual_seed(seed)
    out, n = [], 0
    while n < total:
        x = int(math.exp(math.log(400) + 1.2 * float(torch.randn(1, generator=g))))
        out.append(min(max(x, 16), l_max))
        n += out[-1]
    return out


def corpus(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(2, vocab, (n - 1,), generator=g), torch.tensor([EOT])]) for n in lengths]


def packed_rows(docs, l):
    """Documents back to back in rows of l + 1 tokens: inputs, targets (none after an end token),
    seq_idx, as TextTask.batch and TextTask.documents give them with --pack."""
    stream = torch.cat(docs)
    rows = stream[: len(stream) // (l + 1) * (l + 1)].view(-1, l + 1)
    x, y = rows[:, :-1], rows[:, 1:].masked_fill(rows[:, :-1] == EOT, IGNORE)
    ends = (x == EOT).to(torch.int32)
    return x, y, (ends.cumsum(1) - ends).to(torch.int32)


def padded_rows(docs, l):
    """Each document in rows of its own, cut into pieces of l + 1 tokens, right-padded (padding
    targets left out)."""
    rows = []
    for d in docs:
        for s in range(0, len(d) - 1, l):
            piece = d[s : s + l + 1]
            rows.append(torch.cat([piece, torch.full((l + 1 - len(piece),), PAD)]))
    rows = torch.stack(rows)
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[rows[:, 1:] == PAD] = IGNORE
    return x, y


def measure_train(args, device) -> list[dict]:
    if args.smoke:
        sizes = dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                     num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, num_experts=2,
                     mamba_d_state=4, mamba_dt_rank=2, vocab_size=256)  # fmt: skip
    else:
        sizes = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4,
                     num_hidden_layers=8, num_experts=8, mamba_dt_rank=64, vocab_size=8192)  # fmt: skip
    config = JambaConfig.from_preset("tiny", **sizes, scan_backend="fast" if device.type == "cuda" else "reference")
    torch.manual_seed(0)
    model = Jamba(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    l, b = args.length, args.batch
    docs = corpus(doc_lengths(args.tokens, 8 * l, seed=0), config.vocab_size, seed=1)
    px, py, ps = packed_rows(docs, l)
    qx, qy = padded_rows(docs, l)
    rows = []
    for name, (x, y, s) in {"packed": (px, py, ps), "padded": (qx, qy, None),
                            "packed, no seq_idx": (px, py, None)}.items():  # fmt: skip
        batches = [(x[i : i + b], y[i : i + b], None if s is None else s[i : i + b]) for i in range(0, len(x) - b + 1, b)]
        batches = [tuple(None if t is None else t.to(device) for t in bt) for bt in batches[: args.steps]]

        def step(batch):
            bx, by, bs = batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, loss = model(bx, targets=by, seq_idx=bs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for batch in batches[:3]:  # warm-up: compilation, autotuning, allocator
            step(batch)
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(bt[0].numel() for bt in batches)
        useful = sum(int((bt[1] != IGNORE).sum()) for bt in batches)
        all_x, all_y = x, y
        rows.append(dict(
            measure="train", layout=name, rows_in_corpus=len(all_x), steps=len(batches), batch=b, length=l,
            tokens_per_s=tokens / seconds, useful_fraction=float((all_y != IGNORE).float().mean()),
            useful_tokens_per_s=useful / seconds, step_ms=1e3 * seconds / len(batches),
        ))  # fmt: skip
        print("RESULT " + json.dumps(rows[-1]), flush=True)
        if args.profile and name != "padded":  # where the time of a step goes, by kernel
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for batch in batches[:5]:
                    step(batch)
                sync(device)
            table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=25)
            print(f"PROFILE {name} (5 steps)\n{table}", flush=True)
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_scan(args, device) -> list[dict]:
    from minijamba import kernels as backends

    scan = backends.get("triton" if device.type == "cuda" else "reference")
    b, d, n, l = (1, 8, 4, 64) if args.smoke else (4, 2048, 16, 2048)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, t=dt: torch.randn(*s, generator=g, device=device).to(t)  # noqa: E731
    u, delta, z = r(b, d, l), 0.5 * r(b, d, l), r(b, d, l)
    B, C = r(b, n, l), r(b, n, l)
    A = -torch.arange(1, n + 1, device=device).float().repeat(d, 1)
    D, bias = r(d, t=torch.float32), r(d, t=torch.float32) - 4
    seq = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))[:l]
                       for ls in (doc_lengths(l, l, seed=i) for i in range(b))]).to(device, torch.int32)  # fmt: skip
    docs = [int(s.max()) + 1 for s in seq]
    ins = [t.requires_grad_() for t in (u, delta, B, C, z)]
    w = r(d, 4, t=torch.float32).requires_grad_()
    gy = torch.randn(b, d, l, device=device).to(dt)
    out = []

    def scan_fwd(s):
        with torch.no_grad():
            scan.selective_scan(u, delta, A, B, C, D, z, bias, True, False, None, seq_idx=s)

    def scan_fb(s):
        y = scan.selective_scan(*ins[:2], A, *ins[2:4], D, ins[4], bias, True, False, None, seq_idx=s)
        torch.autograd.grad(y, ins, gy)

    def conv_fb(s):
        y = scan.causal_conv1d(ins[0], w, None, None, True, seq_idx=s)
        torch.autograd.grad(y, (ins[0], w), gy)

    # First, the kernels against the reference on these inputs (float32 copies), seq_idx given.
    from minijamba.model import ssm

    f32 = [t.detach().float() for t in (u, delta, B, C, z)]
    with torch.no_grad():
        ref = ssm.selective_scan(f32[0], f32[1], A, f32[2], f32[3], D, f32[4], bias, True, False, None, seq_idx=seq)
        got = scan.selective_scan(u, delta, A, B, C, D, z, bias, True, False, None, seq_idx=seq).float()
        conv_ref = ssm.causal_conv1d(f32[0], w.detach(), None, None, True, seq_idx=seq)
        conv_got = scan.causal_conv1d(u, w.detach(), None, None, True, seq_idx=seq).float()
    check = dict(measure="check", scan_max_rel_err=float((got - ref).abs().max() / ref.abs().max()),
                 conv_max_rel_err=float((conv_got - conv_ref).abs().max() / conv_ref.abs().max()))  # fmt: skip
    out.append(check)
    print("RESULT " + json.dumps(check), flush=True)
    for what, fn in (("scan forward", scan_fwd), ("scan forward+backward", scan_fb), ("conv forward+backward", conv_fb)):
        times = {}
        for rep in range(2):  # alternate, so that drift does not favour one
            for key, s in (("without", None), ("with", seq)):
                times.setdefault(key, []).append(bench(lambda: fn(s), args.smoke))
        without, with_ = min(times["without"]), min(times["with"])
        out.append(dict(measure=what, b=b, d=d, n=n, l=l, documents_per_row=docs, ms_without_seq_idx=without,
                        ms_with_seq_idx=with_, ratio=with_ / without))  # fmt: skip
        print("RESULT " + json.dumps(out[-1]), flush=True)
    return out


def measure_attention(args, device) -> list[dict]:
    b, q, g, e, l = (1, 2, 1, 8, 64) if args.smoke else (4, 32, 8, 128, 2048)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    qt = torch.randn(b, q, l, e, generator=gen, device=device).to(dt).requires_grad_()
    kt = torch.randn(b, g, l, e, generator=gen, device=device).to(dt).requires_grad_()
    vt = torch.randn(b, g, l, e, generator=gen, device=device).to(dt).requires_grad_()
    seq = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))[:l]
                       for ls in (doc_lengths(l, l, seed=i) for i in range(b))]).to(device)  # fmt: skip
    allowed = (seq[:, :, None] == seq[:, None, :]) & torch.ones(l, l, dtype=torch.bool, device=device).tril()
    gy = torch.randn_like(qt)

    def sdpa_mask():
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed[:, None], enable_gqa=True)
        torch.autograd.grad(o, (qt, kt, vt), gy)

    def sdpa_causal():
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (qt, kt, vt), gy)

    ways = {"sdpa, block-diagonal mask (the model)": sdpa_mask, "sdpa causal (documents leak; flash)": sdpa_causal}
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(bi, h, qi, ki):
            return (seq[bi, qi] == seq[bi, ki]) & (ki <= qi)

        block = create_block_mask(doc_causal, b, None, l, l, device=device)
        flex = torch.compile(flex_attention)

        def flex_doc():
            o = flex(qt, kt, vt, block_mask=block, enable_gqa=True)
            torch.autograd.grad(o, (qt, kt, vt), gy)

        ways["flex_attention, document mask"] = flex_doc
        from minijamba.kernels import flex_attention as twin

        def flex_twin():  # what the fast backends run: the block mask made again each call
            o = twin.packed_attention(qt, kt, vt, seq.clone())  # a new seq_idx: a new block mask
            torch.autograd.grad(o, (qt, kt, vt), gy)

        ways["minijamba.kernels.flex_attention (block mask each call)"] = flex_twin
    out = []
    for name, fn in ways.items():
        out.append(dict(measure="attention forward+backward", way=name, b=b, heads=q, kv_heads=g, head_dim=e, l=l,
                        ms=bench(fn, args.smoke)))  # fmt: skip
        print("RESULT " + json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=["train", "scan", "attention"], default=["train", "scan", "attention"])
    p.add_argument("--length", type=int, default=2048, help="tokens per row (train)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (train)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per layout (train)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="corpus size in tokens (train)")
    p.add_argument("--profile", action="store_true", help="train: also print the kernels of 5 steps, packed with and without seq_idx")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the script runs, numbers mean nothing")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.length, args.batch, args.steps, args.tokens = 64, 2, 2, 2000
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = [dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 torch=torch.__version__)]  # fmt: skip
    for what in args.only:
        rows += {"train": measure_train, "scan": measure_scan, "attention": measure_attention}[what](args, device)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
