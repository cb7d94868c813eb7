"""One training step of the tiny preset on this CPU, by backend: the plain reference against the cpu twins.

What `python train_tiny.py` runs by default (the reference: the scan differentiated by autograd, the
experts as a loop) against `--fast` on a machine without a GPU (the `cpu` backend: the chunked scan
with its hand-written backward, the experts by grouped matmuls). Batch 8 x 128 (train_tiny.py's
default), AdamW, float32, 2 threads; each backend's steps interleaved with the other's, the median
of the timed steps after two warm-up steps, and the memory a step adds (peak resident set).

    python bench/cpu_train_step.py                 # one JSON line per backend, prefix RESULT
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(backend: str, steps: int, batch: int) -> dict:
    import torch

    from minijamba import Jamba, JambaConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Jamba(JambaConfig.from_preset("tiny", scan_backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (batch, 129))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return dict(backend=backend, batch=batch, step_ms=1e3 * step, tokens_per_s=batch * 128 / step,
                step_added_mib=added / 2**20, steps=steps)  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="each backend this many times, alternating")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:  # a fresh process per measurement: the resident-set peak is its own
        print(json.dumps(one(a.one, a.steps, a.batch)))
        return
    rows = {}
    for _ in range(a.rounds):
        for backend in ("reference", "cpu"):
            out = subprocess.run([sys.executable, __file__, "--one", backend, "--steps", str(a.steps),
                                  "--batch", str(a.batch)], capture_output=True, text=True, check=True)  # fmt: skip
            rows.setdefault(backend, []).append(json.loads(out.stdout))
    for backend, runs in rows.items():
        best = min(runs, key=lambda r: r["step_ms"])
        print("RESULT " + json.dumps({**best, "step_ms_all": [round(r["step_ms"], 1) for r in runs]}))
    ratio = min(r["step_ms"] for r in rows["reference"]) / min(r["step_ms"] for r in rows["cpu"])
    print(f"reference / cpu step time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
