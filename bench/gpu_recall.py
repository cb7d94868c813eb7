"""The paper's recall gap (section 6.2; the Zoology study's MQAR), measured on a GPU: recall accuracy
against model width for attention-only, Mamba-only and hybrid layouts, every run the same number of
steps (issue 19).

MQAR as in Zoology: sequences of L = 256 tokens holding P = 16 key-value pairs, and L = 512 with
P = 64; every key asked once, the queries spread over the tokens after the pairs
(`train_tiny.py --mqar-length`). Widths 64, 128 and 256; 8 layers; layouts attention (a:m 1:0),
mamba (0:1), hybrid 1:7 (Jamba's) and hybrid 1:3. Each run is `train_tiny.py --task mqar --device cuda
--fast`, several at once on the one GPU (tiny models leave it mostly idle); its recall accuracy is the
last validation's.

    python bench/gpu_recall.py --steps 1000 --out $OUT/recall.json
    python bench/gpu_recall.py --smoke --out /tmp/recall.json     # two steps of tiny runs on the CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYOUTS = {  # name: (attn_layer_period, attn_layer_offset) over 8 layers
    "attention": (1, 0),
    "mamba": (9, 8),
    "hybrid 1:7": (8, 4),
    "hybrid 1:3": (4, 2),
}
TASKS = [(256, 16), (512, 64)]  # (L, P)


def command(width: int, length: int, pairs: int, layout: str, args, out: Path) -> list[str]:
    period, offset = LAYOUTS[layout]
    heads = max(1, width // 32)
    symbols = max(4 * pairs, 64)
    cmd = [
        sys.executable, str(ROOT / "train_tiny.py"), "--task", "mqar", "--mqar-pairs", str(pairs),
        "--mqar-queries", str(pairs), "--mqar-keys", str(symbols), "--mqar-values", str(symbols),
        "--mqar-length", str(length), "--max-steps", str(args.steps), "--batch-size", str(args.batch),
        "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 20)),
        "--eval-interval", str(args.steps), "--eval-batches", "4", "--seed", "0", "--out-dir", str(out), "--overwrite",
        "--override", f"hidden_size={width}", "--override", f"num_attention_heads={heads}",
        "--override", f"num_key_value_heads={max(1, heads // 2)}", "--override", "num_hidden_layers=8",
        "--override", f"attn_layer_period={period}", "--override", f"attn_layer_offset={offset}",
        "--override", f"intermediate_size={2 * width}", "--override", f"mamba_dt_rank={max(1, width // 16)}",
        "--override", f"max_position_embeddings={length}",
    ]  # fmt: skip
    return cmd + (["--device", "cpu"] if args.smoke else ["--device", "cuda", "--fast"])


def result(out: Path) -> dict:
    from minijamba.training.checkpoint import load

    state = load(out, training=True).train_state
    evals = state.get("evals", [])
    last = evals[-1] if evals else {}
    return dict(step=state.get("step"), accuracy=last.get("accuracy"), val_loss=last.get("val_loss"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--parallel", type=int, default=12, help="runs at once")
    p.add_argument("--smoke", action="store_true", help="two steps of width-16 runs on the CPU")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tasks = TASKS
    if args.smoke:
        args.steps, args.batch, args.widths, args.parallel, tasks = 2, 4, [32], 2, [(40, 4)]
    work = Path(tempfile.mkdtemp(prefix="recall-"))
    runs = [dict(width=w, length=L, pairs=P, layout=lay) for (L, P), w, lay in itertools.product(tasks, args.widths, LAYOUTS)]
    pending, active, rows = list(runs), [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t_start = time.perf_counter()
    while pending or active:
        while pending and len(active) < args.parallel:
            run = pending.pop(0)
            out = work / f"{run['length']}-{run['width']}-{run['layout'].replace(' ', '').replace(':', '')}"
            log = open(out.with_suffix(".log"), "w")  # noqa: SIM115
            proc = subprocess.Popen(command(run["width"], run["length"], run["pairs"], run["layout"], args, out),
                                    stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            active.append((run, out, proc, log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(active):
            run, out, proc, log, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            row = dict(run, steps=args.steps, batch=args.batch, seconds=time.perf_counter() - t0, rc=proc.returncode)
            if proc.returncode == 0:
                row.update(result(out))
            else:
                row["error"] = out.with_suffix(".log").read_text()[-500:]
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
            if args.out is not None:  # after each run: a run cut short keeps what finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(dict(steps=args.steps, batch=args.batch, lr=args.lr, runs=rows), indent=1) + "\n")
    print(f"{len(rows)} runs in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
