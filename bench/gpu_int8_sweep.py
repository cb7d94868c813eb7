"""Launch shapes of the int8 grouped matmul (minijamba.kernels.int8_matmul.CONFIG: tile, warps,
pipeline stages, and W_LEFT, the weight tile as the dot's left operand) on a GPU, against bf16
experts' grouped GEMM (F.grouped_mm) and the per-expert cast + cuBLAS reference on the same rows, at
Jamba-v0.1's expert shapes (issue 17: int8 prefill no slower than bf16; decoding at its bandwidth).

Shapes: E = 16 experts, rows = tokens * K (K = 2), spread evenly (random routing): gate/up (o = 2f =
28672, i = h = 4096) and down (o = h, i = f = 14336). The prefill tile ("large_sm90" on Hopper, else
"large") is swept at --tokens; the decoding tile ("small") at --decode-tokens (batch sizes: one
token a row), where the figure of merit is the weight bandwidth (GB/s of the experts the rows
touch). Medians of triton.testing.do_bench.

    python bench/gpu_int8_sweep.py --tokens 8192 --decode-tokens 1 64 --out $OUT/int8_sweep.json
    python bench/gpu_int8_sweep.py --tokens --rows-tokens 1 2 --out $OUT/rows_sweep.json
    python bench/gpu_int8_sweep.py --tokens 8192 32768 --groups 1 4 8 16 --out $OUT/group_sweep.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.inference.quant import grouped_int8_linear_reference, quantize_rows  # noqa: E402
from minijamba.kernels import int8_matmul  # noqa: E402


LARGE = [dict(tile=(bt, bo, bi, 8, stages, left)) for bt, bo, bi, stages, left in
         itertools.product([64, 128], [128, 256], [64, 128], [3, 4], [False, True])]  # fmt: skip
SMALL = [dict(tile=(16, bo, bi, 4, stages, left)) for bo, bi, stages, left in
         itertools.product([32, 64, 128], [128, 256], [3, 4], [False, True])]  # fmt: skip
# the prefill tiles near the best of the 2026-12-03 sweep, each at every --groups (int8_matmul.GROUP_T)
LARGE_GROUPED = [(128, bo, bi, 8, stages, False) for bo, bi, stages in itertools.product([128, 256], [64, 128], [3, 4])]
ROWS = [dict(tile=(1, bo, bi, warps, stages, False)) for bo, bi, warps, stages in
        itertools.product([16, 32, 64], [128, 256, 512], [4, 8], [2, 3]) if bo * bi <= 16384]  # fmt: skip


def sweep(key: str, candidates: list[dict], x, q, scale, ends, info: dict, rows_out: list, bench=do_bench) -> dict:
    """Time each candidate tile as CONFIG[key]; the fastest row."""
    saved, best = int8_matmul.CONFIG[key], None
    for cand in candidates:
        int8_matmul.CONFIG[key] = cand["tile"]
        group = cand.get("group", int8_matmul.GROUP_T)
        try:
            with patch.multiple(int8_matmul, GROUP_T=group):
                ms = bench(lambda: int8_matmul.grouped_int8_linear(x, q, scale, ends))
        except Exception as e:  # out of shared memory or registers: not a candidate
            print(f"skip {cand['tile']}: {type(e).__name__}", flush=True)
            continue
        row = dict(info, kernel="int8 triton", key=key, config=list(cand["tile"]), group=group, ms=ms,
                   **{m: v / ms for m, v in info["per_ms"].items()})  # fmt: skip
        row.pop("per_ms")
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if best is None or ms < best["ms"]:
            best = row
    int8_matmul.CONFIG[key] = saved
    current = bench(lambda: int8_matmul.grouped_int8_linear(x, q, scale, ends))
    print(f"RESULT {key} tokens={info['tokens']} o={info['o']} i={info['i']}: now {saved} {current:.3f} ms, "
          f"best {best['config']} {best['ms']:.3f} ms", flush=True)  # fmt: skip
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[8192], help="prefill token counts")
    p.add_argument("--decode-tokens", type=int, nargs="*", default=[], help="decoding batch sizes")
    p.add_argument("--rows-tokens", type=int, nargs="*", default=[],
                   help="decoding batch sizes for the multiply-and-sum kernel (the 'rows' tile): swept at the "
                        "first, the current tile timed at the others; each against the tl.dot kernel's 'gemv' tile")
    p.add_argument("--groups", type=int, nargs="*", default=[],
                   help="prefill: sweep GROUP_T (row blocks run together) over a few tiles instead of the tile grid; "
                        "prints the best tile and group over all --tokens as BEST large=T,O,I,W,S,L@GROUP")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    E, K, h, f = 16, 2, 4096, 14336
    rows_out = []
    large = "large_sm90" if torch.cuda.get_device_capability()[0] >= 9 else "large"
    runs = [(t, "rows") for t in args.rows_tokens] + [(t, "small") for t in args.decode_tokens] + [(t, large) for t in args.tokens]
    for (tokens, key), (o, i) in itertools.product(runs, [(2 * f, h), (h, f)]):
        rows = tokens * K
        q, scale = quantize_rows(torch.randn(E, o, i, device="cuda", dtype=torch.bfloat16))
        w = (q.float() * scale[..., None]).to(torch.bfloat16)
        x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
        ends = torch.linspace(rows / E, rows, E, device="cuda").round().to(torch.int64)
        touched = int((torch.diff(ends, prepend=ends.new_zeros(1)) > 0).sum())  # experts with rows
        per_ms = dict(tflops=2 * rows * o * i / 1e9, weight_gbs=touched * o * i / 1e6)  # (per ms)
        info = dict(tokens=tokens, o=o, i=i, per_ms=per_ms)
        base = {
            "bf16 grouped_mm": do_bench(lambda: F.grouped_mm(x, w.transpose(1, 2), offs=ends.to(torch.int32))),
            "int8 reference": do_bench(lambda: grouped_int8_linear_reference(x, q, scale, ends)),
        }
        call = lambda: int8_matmul.grouped_int8_linear(x, q, scale, ends)  # noqa: E731
        if key == "rows":  # a few microseconds a call: timed in a CUDA graph, as in a decoding step
            with patch.multiple(int8_matmul, ROWS_MAX=-1):  # the tl.dot kernel on the same rows
                base["int8 triton dot (gemv tile), graph"] = do_bench_cudagraph(call)
            for magic in (False, True):
                with patch.multiple(int8_matmul, ROWS_MAX=10**9, MAGIC=magic):
                    base[f"int8 triton rows, MAGIC={magic}, graph"] = do_bench_cudagraph(call)
        for name, ms in base.items():
            rows_out.append(dict(tokens=tokens, o=o, i=i, kernel=name, ms=ms, **{m: v / ms for m, v in per_ms.items()}))
            print(json.dumps(rows_out[-1]), flush=True)
        if key == "rows":  # swept at the first batch; the tile in CONFIG at the others
            tiles = ROWS if tokens == args.rows_tokens[0] else [dict(tile=int8_matmul.CONFIG["rows"])]
            with patch.multiple(int8_matmul, ROWS_MAX=10**9):
                sweep(key, tiles, x, q, scale, ends, info, rows_out, bench=do_bench_cudagraph)
        else:  # the tl.dot kernel, whatever the rows
            tiles = SMALL if key == "small" else LARGE
            if key != "small" and args.groups:
                tiles = [dict(tile=t, group=g) for t in LARGE_GROUPED for g in args.groups]
            with patch.multiple(int8_matmul, ROWS_MAX=-1):
                sweep(key, tiles, x, q, scale, ends, info, rows_out)
        del q, scale, w, x
        torch.cuda.empty_cache()
        if key == "rows" and tokens == args.rows_tokens[0] and i == f:  # both projections swept: the best
            total = collections.defaultdict(float)  # tile for gate/up + down, for gpu_int8_run.sh rows
            for r in rows_out:
                if r.get("key") == "rows" and r["tokens"] == tokens:
                    total[tuple(r["config"])] += r["ms"]
            tile = min(total, key=total.get)
            print(f"BEST rows={','.join(str(int(v)) for v in tile)} {total[tile]:.3f} ms", flush=True)
        if key == large and args.groups and tokens == args.tokens[-1] and i == f:  # the best over all --tokens
            total = collections.defaultdict(float)
            for r in rows_out:
                if r.get("key") == large:
                    total[(*r["config"], r["group"])] += r["ms"]
            *tile, group = min(total, key=total.get)
            print(f"BEST large={','.join(str(int(v)) for v in tile)}@{group} {total[(*tile, group)]:.3f} ms", flush=True)
        if args.out is not None:  # after each shape: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows_out, indent=1) + "\n")


if __name__ == "__main__":
    main()
