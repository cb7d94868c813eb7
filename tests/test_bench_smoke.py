"""bench/gpu_full_scale.py runs end to end on the CPU (--smoke: a toy model, every measurement), so
that the script the GPU time is spent on cannot rot. Only statuses and the plan are checked here:
timings belong in bench/RESULTS.md, not in tests."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_full_scale.py"


def test_gpu_full_scale_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_full_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.jsonl"
    bench.main(["--smoke", "--decode-tokens", "2", "--contexts", "20", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["quantize"] == "int8" and "command" in rows[0]
    runs = [r for r in rows if "context" in r]
    measures = {(r["layout"], r["measure"]) for r in runs}
    assert measures == {
        ("hybrid", "prefill"), ("hybrid", "decode"), ("hybrid", "longest"), ("hybrid", "layouts"),
        ("attention", "layouts"),
    }  # fmt: skip
    for r in runs:
        if r["context"] == 1_000_000:  # beyond the smoke budget: refused by the plan, not run
            assert r["status"] == "refused by the plan" and 20 < r["plan_largest_context"] < 1_000_000
        else:
            assert r["status"] == "ok" and r["prefill_s"] > 0 and r["plan_total_gib"] > r["plan_weights_gib"]
            assert ("decode_tok_s" in r) == (r["measure"] != "prefill")
    assert "RESULT" in capsys.readouterr().out


def test_sass_offline_compiles_the_backward_for_sm90(tmp_path):
    """bench/sass_offline.py compiles the scan's backward to sm_90 machine code on this CPU machine
    (Triton's own ptxas) and finds its loops. Counts differ between Triton versions, so only their
    presence is checked, and that the state loop (the inner one) is the shorter.

    It runs in a process of its own, as it is run: Triton imported under TRITON_INTERPRET=1 (which
    the test session sets) compiles nothing; and with a fresh compile cache, so that an entry left
    by another run cannot stand in for the compile."""
    import re
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, str(BENCH.parent / "sass_offline.py"), "bwd", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    n, regs = map(int, re.search(r"(\d+) instructions, (\d+) registers", out).groups())
    assert regs > 0 and n > 100
    loops = [int(k) for k in re.findall(r"loop 0x[0-9a-f]+-0x[0-9a-f]+: (\d+) instructions", out)]
    assert len(loops) >= 2 and min(loops) < max(loops)  # the state loop inside the chunk loop
    assert (tmp_path / "bwd.sass").read_text().count("SHFL") > 0
    assert "SHFL from triton_scan_" in out


def test_gpu_serving_smoke(tmp_path, capsys):
    """bench/gpu_serving.py's parts run end to end on a tiny model on the CPU (no graphs, no compile)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_serving", BENCH.with_name("gpu_serving.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "serving.json"
    mod.main(["--smoke", "--parts", "batch", "context", "engine", "prefill", "profile", "--batches", "1", "3",
              "--contexts", "128", "--prompt", "64", "--new", "8", "--steps", "2", "--warmup", "1",
              "--engine-prompts", "4", "--engine-len", "9", "--engine-new", "3", "--engine-slots", "2",
              "--prefill-lens", "32", "--prefill-modes", "bf16", "int8-auto", "--profile-batches", "2",
              "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())
    parts = {r["part"] for r in rows}
    assert parts == {"device", "batch", "context", "engine", "prefill", "profile"}
    batch = [r for r in rows if r["part"] == "batch"]
    assert {r["layout"] for r in batch} == {"hybrid", "attention"}
    assert all(r["fits"] and r["tokens_per_s"] > 0 for r in batch)
    engine = next(r for r in rows if r["part"] == "engine")
    assert engine["prompts"] == 4 and engine["new_tokens_per_s"] > 0
    assert next(r for r in rows if r["part"] == "profile")["kernels_a_step"] > 0


def test_gpu_recall_smoke(tmp_path):
    """bench/gpu_recall.py's grid on the CPU: every layout's train_tiny.py run finishes and reports
    its recall accuracy after the same number of steps."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_recall", Path(__file__).resolve().parents[1] / "bench" / "gpu_recall.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "recall.json"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["layout"] for r in runs) == sorted(mod.LAYOUTS)
    assert all(r["step"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in runs)
