"""bench/gpu_e2e.py runs end to end on the CPU (--smoke: a toy config, transformers included), so that
the script the GPU time is spent on cannot rot. Only what each row holds is checked, and the parity
of the two implementations' logits: timings belong in bench/RESULTS.md, not in tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_e2e.py"
LOOP = BENCH.with_name("gpu_train_loop.py")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_e2e_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.set_num_threads(1)  # tiny ops: one thread per test worker (see tests/helpers.py)
    bench = load(BENCH)
    out = tmp_path / "e2e.json"
    bench.main(["--smoke", "--only", "fast", "fast_bf16", "transformers", "compile", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    by = {(r["impl"], r["measure"]): r for r in rows}
    assert by[("minijamba vs transformers", "parity")]["logits_rel_err"] < 1e-5  # same weights, fp32
    for impl in ("minijamba --fast", "transformers"):
        for measure in ("train", "prefill 48", "prefill 96", "decode"):
            assert by[(impl, measure)]["tok_s"] > 0, (impl, measure)
    assert by[("minijamba --fast, bf16 weights", "train")]["tok_s"] > 0
    assert by[("minijamba --fast (no graph)", "decode")]["tok_s"] > 0
    for impl in ("minijamba --fast", "minijamba triton+compile"):  # the graph-ready step == the eager one
        assert by[(impl, "decode")]["vs_eager_step_rel_err"] < 1e-5
    assert by[("minijamba triton+compile", "train")]["tok_s"] > 0
    assert not [r for r in rows if "status" in r]  # nothing failed or skipped
    assert "| minijamba --fast |" in capsys.readouterr().out


def test_gpu_train_loop_smoke(tmp_path, capsys):
    """The training loop's benchmark: transformers' row, then train_tiny.py's loop in each setting
    (on the CPU without compile and CUDA graphs), each row a finished run with its vocabulary."""
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    out = tmp_path / "loop.json"
    load(LOOP).main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["transformers", "transformers_loop", "train_tiny.py --fast --compile",
                                         "train_tiny.py --fast --cuda-graphs",
                                         "train_tiny.py --fast --cuda-graphs --weights bf16"]  # fmt: skip
    assert all(r["tok_s"] > 0 for r in rows)
    for r in rows[2:]:
        assert r["status"] == "done" and r["steps"] == 4 and r["vocab_size"] == 512, r
    assert "| train_tiny.py --fast --cuda-graphs --weights bf16 |" in capsys.readouterr().out


def test_kernel_summary_counts_overlaps_once():
    """The profile's busy time is the union of the kernels' spans; their sum counts overlaps twice."""
    spec = importlib.util.spec_from_file_location("gpu_e2e", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    spans = [(30.0, 40.0, "a"), (0.0, 1000.0, "b"), (500.0, 1500.0, "a"), (2000.0, 2500.0, "c")]
    table, head = bench.kernel_summary(spans, wall_us=4000.0)
    assert head == "GPU kernels 2.5 ms (4 kernels), busy 2.0 ms, idle 2.0 ms of the wall"
    rows = table.splitlines()
    assert [r.split()[-1] for r in rows[1:4]] == ["a", "b", "c"]  # by total time: a 1010, b 1000, c 500
    assert rows[1].split()[:2] == ["1010.0", "2"]
    assert rows[5].split() == ["500.0", "1500", "a", "->", "c"]  # the one gap: 1500-2000 us, after a
