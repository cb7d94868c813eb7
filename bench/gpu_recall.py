"""The paper's recall gap (section 6.2; the Zoology study's MQAR), measured on a GPU: recall accuracy
against model width for attention-only, Mamba-only and hybrid layouts, every run the same number of
steps (issue 19).

MQAR as in Zoology: sequences of L = 256 tokens holding P = 16 key-value pairs, and L = 512 with
P = 64; every key asked once, the queries spread over the tokens after the pairs
(`train_tiny.py --mqar-length`). Widths 64, 128 and 256; 8 layers; layouts attention (a:m 1:0),
mamba (0:1), hybrid 1:7 (Jamba's) and hybrid 1:3. Each run is `train_tiny.py --task mqar --device cuda
--fast`, several at once on the one GPU (tiny models leave it mostly idle); its recall accuracy is the
last validation's.

The recipe (what makes 8-layer models learn MQAR within a few thousand steps; a CPU probe of
L = 64, P = 8 at width 64: lr 1e-3 reached 27% recall by step 250 where 3e-3 stayed at 8%): AdamW at
lr 1e-3, a dense MLP in every layer (num_experts=1: routing is not what is measured, and the router's
noise slows learning), and on the GPU `--cuda-graphs` (tiny models are launch-bound) with TF32
matmuls (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1). Every run: the same steps, batch, lr and seed.

    python bench/gpu_recall.py --steps 2000 --out $OUT/recall.json
    python bench/gpu_recall.py --only 256:64 --steps 300 --out $OUT/probe.json   # a subset
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
        "--eval-interval", str(max(1, args.steps // args.evals)), "--eval-batches", "4", "--seed", "0",
        "--out-dir", str(out), "--overwrite", "--time-budget", "0",  # no limit: every run the same steps
        "--override", f"hidden_size={width}", "--override", f"num_attention_heads={heads}",
        "--override", f"num_key_value_heads={max(1, heads // 2)}", "--override", "num_hidden_layers=8",
        "--override", f"attn_layer_period={period}", "--override", f"attn_layer_offset={offset}",
        "--override", f"intermediate_size={2 * width}", "--override", f"mamba_dt_rank={max(1, width // 16)}",
        "--override", f"max_position_embeddings={length}",
    ]  # fmt: skip
    if args.dense:
        cmd += ["--override", "num_experts=1", "--override", "num_experts_per_tok=1"]
    if args.stop_after:  # the same schedule (of --steps), stopped at this step
        cmd += ["--stop-after", str(args.stop_after)]
    if args.smoke:
        return cmd + ["--device", "cpu"]
    return cmd + ["--device", "cuda", "--fast"] + (["--cuda-graphs"] if args.cuda_graphs else [])


def result(out: Path) -> dict:
    from minijamba.training.checkpoint import load

    state = load(out, training=True).train_state
    evals = state.get("evals", [])
    last = evals[-1] if evals else {}
    curve = [(e.get("step"), e.get("accuracy")) for e in evals]  # recall along the way
    return dict(step=state.get("step"), accuracy=last.get("accuracy"), val_loss=last.get("val_loss"), curve=curve)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--parallel", type=int, default=12, help="runs at once")
    p.add_argument("--evals", type=int, default=4, help="validations per run (the learning curve)")
    p.add_argument("--only", nargs="+", default=None, metavar="L:WIDTH[:LAYOUT]",
                   help="run only these, e.g. 256:64 or 512:256:mamba")
    p.add_argument("--moe", dest="dense", action="store_false", help="the preset's MoE MLPs instead of dense ones")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop each run at this step of the --steps schedule (to complete runs cut short)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop the runs still going after this long; each keeps its last validation "
                        "(compare all at the last step every run reached)")
    p.add_argument("--smoke", action="store_true", help="two steps of width-16 runs on the CPU")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tasks = TASKS
    if args.smoke:
        args.steps, args.batch, args.widths, args.parallel, tasks = 2, 4, [32], 2, [(40, 4)]
    work = Path(tempfile.mkdtemp(prefix="recall-"))
    runs = [dict(width=w, length=L, pairs=P, layout=lay) for (L, P), w, lay in itertools.product(tasks, args.widths, LAYOUTS)]
    if args.only:
        want = [tuple(x.split(":", 2)) for x in args.only]
        runs = [r for r in runs if any(str(r["length"]) == k[0] and str(r["width"]) == k[1]
                                       and (len(k) < 3 or r["layout"].replace(" ", "") == k[2]) for k in want)]  # fmt: skip
        if not runs:
            p.error(f"--only {' '.join(args.only)} matches no run (L:WIDTH[:LAYOUT], LAYOUT one of "
                    f"{', '.join(x.replace(' ', '') for x in LAYOUTS)})")  # fmt: skip
    pending, active, rows = list(runs), [], []
    # One thread each (many processes share the cores), TF32 matmuls (see the module docstring).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}  # fmt: skip
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
        cut = args.deadline is not None and time.perf_counter() - t_start > args.deadline
        if cut:
            pending.clear()
            for _, _, proc, _, _ in active:
                proc.terminate()  # SIGTERM: the last checkpoint written stays
            for _, _, proc, _, _ in active:
                proc.wait()
        for item in list(active):
            run, out, proc, log, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            row = dict(run, steps=args.steps, batch=args.batch, seconds=time.perf_counter() - t0, rc=proc.returncode)
            if cut and (out / "train_state.json").exists():
                row.update(result(out), rc=0, cut=True)
            elif proc.returncode == 0:
                row.update(result(out))
            else:
                row["error"] = out.with_suffix(".log").read_text()[-500:]
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
            if args.out is not None:  # after each run: a run cut short keeps what finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                meta = dict(steps=args.steps, batch=args.batch, lr=args.lr, dense=args.dense, cuda_graphs=args.cuda_graphs,
                            stop_after=args.stop_after)  # fmt: skip
                args.out.write_text(json.dumps(dict(meta, runs=rows), indent=1) + "\n")
    print(f"{len(rows)} runs in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
