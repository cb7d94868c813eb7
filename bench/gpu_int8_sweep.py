"""Launch shapes of the int8 grouped matmul's prefill tile ("large", minijamba.kernels.int8_matmul.CONFIG)
on a GPU, against bf16 experts' grouped GEMM (F.grouped_mm) and the per-expert cast + cuBLAS reference
on the same rows, at Jamba-v0.1's expert shapes (issue 17: int8 prefill no slower than bf16).

Shapes: E = 16 experts, rows = tokens * K (K = 2), spread evenly (random routing): gate/up (o = 2f =
28672, i = h = 4096) and down (o = h, i = f = 14336). Medians of triton.testing.do_bench.

    python bench/gpu_int8_sweep.py --tokens 8192 --out $OUT/int8_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.inference.quant import grouped_int8_linear_reference, quantize_rows  # noqa: E402
from minijamba.kernels import int8_matmul  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    E, K, h, f = 16, 2, 4096, 14336
    rows_out = []
    saved = dict(int8_matmul.CONFIG)
    for tokens, (o, i) in itertools.product(args.tokens, [(2 * f, h), (h, f)]):
        rows = tokens * K
        q, scale = quantize_rows(torch.randn(E, o, i, device="cuda", dtype=torch.bfloat16))
        w = (q.float() * scale[..., None]).to(torch.bfloat16)
        x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
        ends = torch.linspace(rows / E, rows, E, device="cuda").round().to(torch.int64)
        flops = 2 * rows * o * i
        base = {
            "bf16 grouped_mm": do_bench(lambda: F.grouped_mm(x, w.transpose(1, 2), offs=ends.to(torch.int32))),
            "int8 reference": do_bench(lambda: grouped_int8_linear_reference(x, q, scale, ends)),
        }
        for name, ms in base.items():
            rows_out.append(dict(tokens=tokens, o=o, i=i, kernel=name, ms=ms, tflops=flops / ms / 1e9))
            print(json.dumps(rows_out[-1]), flush=True)
        best = None
        for bt, bo, bi, warps in itertools.product([64, 128], [64, 128, 256], [32, 64, 128], [4, 8]):
            int8_matmul.CONFIG["large"] = (bt, bo, bi, warps)
            try:
                ms = do_bench(lambda: int8_matmul.grouped_int8_linear(x, q, scale, ends))
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"skip {(bt, bo, bi, warps)}: {type(e).__name__}", flush=True)
                continue
            row = dict(tokens=tokens, o=o, i=i, kernel="int8 triton", config=[bt, bo, bi, warps], ms=ms,
                       tflops=flops / ms / 1e9)  # fmt: skip
            rows_out.append(row)
            print(json.dumps(row), flush=True)
            if best is None or ms < best["ms"]:
                best = row
        int8_matmul.CONFIG.update(saved)
        current = do_bench(lambda: int8_matmul.grouped_int8_linear(x, q, scale, ends))
        print(f"RESULT tokens={tokens} o={o} i={i}: bf16 {base['bf16 grouped_mm']:.3f} ms, reference "
              f"{base['int8 reference']:.3f}, triton now {saved['large']} {current:.3f}, best {best['config']} "
              f"{best['ms']:.3f}", flush=True)  # fmt: skip
        del q, scale, w, x
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows_out, indent=1) + "\n")


if __name__ == "__main__":
    main()
