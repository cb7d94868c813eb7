"""Training on several processes (minijamba.training.distributed) on the CPU: two processes on the gloo
backend, started by torchrun as a user would (`python -m torch.distributed.run --standalone`:
loopback only, a port the OS picks, a timeout), running the same train_tiny.py.

Tolerance. Two processes compute the same sums as one in another order: each sums its half of
the batch, and FSDP's reduce-scatter adds the halves (and halves the sum). fp32 additions in another
order differ by about 1e-7 relative each; after six AdamW steps we measured at most 2e-7 relative.
We allow 1e-5 relative: for each loss, and for each weight tensor as |a - b| / |a| (norms of whole
tensors; a single element whose gradient is near AdamW's eps can move by more, so elements are not
compared one by one). The mistakes this guards against are far outside it: with the load-balancing
loss counted per process instead of over the global batch, the same run differs by 1e-4 in the
losses and 2e-2 in the weights (the router's loss coefficient is 1.0 here so that it counts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minijamba import JambaConfig
from minijamba.training.checkpoint import load_model
from minijamba.training.distributed import checkpoint_layers
from minijamba.model.jamba import Jamba

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed here")

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
TINY = [
    "--override", "hidden_size=32", "--override", "intermediate_size=64", "--override", "router_aux_loss_coef=1.0",
    "--device", "cpu", "--time-budget", "0", "--max-steps", "6", "--batch-size", "8", "--eval-batches", "1",
    "--eval-interval", "3",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
if sys.platform.startswith("linux"):
    ENV["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only


def torchrun(script: Path, args: list[str], cwd: Path, nproc: int = 2, timeout: int = 240) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script)]
    r = subprocess.run(cmd + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def one_process(args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(args) == 0


def read(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {
        "model": load_file(out_dir / "model.safetensors"),
        "optimizer": load_file(out_dir / "optimizer.safetensors"),
        "state": json.loads((out_dir / "train_state.json").read_text()),
    }


def assert_close_runs(a: dict, b: dict, first_step: int = 1) -> None:
    """Same losses (from `first_step` on), validations, weights and AdamW moments, to RTOL."""
    la, lb = a["state"]["history"]["loss"], b["state"]["history"]["loss"]
    assert a["state"]["history"]["step"] == b["state"]["history"]["step"]
    for step, x, y in zip(a["state"]["history"]["step"], la, lb):
        if step >= first_step:
            assert abs(x - y) <= RTOL * abs(y), f"step {step}: loss {x} vs {y}"
    va = {e["step"]: e["val_loss"] for e in a["state"]["evals"]}
    vb = {e["step"]: e["val_loss"] for e in b["state"]["evals"]}
    common = va.keys() & vb.keys()  # a stopped run also validates where it stopped
    assert len(common) >= 3 and all(abs(va[s] - vb[s]) <= RTOL * vb[s] for s in common)
    for part in ("model", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for name, x in a[part].items():
            y = b[part][name]
            assert x.shape == y.shape, name
            if name.endswith("/step"):
                assert torch.equal(x, y), name
            else:
                assert (x - y).norm() <= RTOL * y.norm() + 1e-12, f"{part} {name}: {(x - y).norm() / y.norm():.2e}"


def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path):
    """FSDP2 over 2 processes (each half of every batch, activation checkpointing on) == 1 process."""
    torchrun(ROOT / "train_tiny.py", ["--task", "mqar", *TINY, "--checkpoint-activations", "--out-dir", "two"], tmp_path)
    one_process(["--task", "mqar", *TINY, "--out-dir", str(tmp_path / "one")])
    two, one = read(tmp_path / "two"), read(tmp_path / "one")
    assert two["state"]["step"] == one["state"]["step"] == 6
    assert_close_runs(two, one)
    # The checkpoint written by rank 0 is the single-process format: generate.py's loader reads it.
    model, _ = load_model(tmp_path / "two")
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reference, _ = load_model(tmp_path / "one")
    torch.testing.assert_close(model(ids), reference(ids), rtol=RTOL, atol=RTOL)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.py"
    path.write_text(Path(textwrap.__file__).read_text(encoding="utf-8"))
    return path


def test_resume_across_a_change_of_world_size(text_file, tmp_path):
    """Save on 2 processes, resume on 1, save, resume on 2: the same run as one uninterrupted
    process, step for step (each resumed step's loss, then the final weights and moments)."""
    text = ["--data", str(text_file), "--vocab-size", "300", "--seq-len", "32", *TINY]
    out = str(tmp_path / "run")
    torchrun(ROOT / "train_tiny.py", [*text, "--stop-after", "2", "--out-dir", out], tmp_path)
    assert read(tmp_path / "run")["state"]["step"] == 2
    one_process(["--resume", "--stop-after", "4", "--out-dir", out])
    assert read(tmp_path / "run")["state"]["step"] == 4
    torchrun(ROOT / "train_tiny.py", ["--resume", "--out-dir", out], tmp_path)
    one_process([*text, "--out-dir", str(tmp_path / "straight")])
    resumed, straight = read(tmp_path / "run"), read(tmp_path / "straight")
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    assert_close_runs(resumed, straight)


def saved_bytes(model, ids, targets) -> tuple[int, float, list[torch.Tensor]]:
    """Bytes autograd keeps for backward during a training forward, the loss, and the gradients."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(ids, targets=targets)
    loss.backward()
    return sum(kept), loss.item(), [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_same_gradients_less_memory():
    config = JambaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    torch.manual_seed(0)
    model = Jamba(config)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(64, (2, 24), generator=g), torch.randint(64, (2, 24), generator=g)
    plain_bytes, plain_loss, plain_grads = saved_bytes(model, ids, targets)
    names = list(model.state_dict())
    checkpoint_layers(model)
    assert list(model.state_dict()) == names  # checkpoint-compatible: no wrapper in the names
    ckpt_bytes, ckpt_loss, ckpt_grads = saved_bytes(model, ids, targets)
    assert ckpt_loss == plain_loss
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same operations, recomputed
    # Kept for backward: each layer's input (b, l, h) and the head's tensors, not every intermediate.
    assert ckpt_bytes < plain_bytes / 4, (ckpt_bytes, plain_bytes)
    # Decoding with a state and forwards without gradients are untouched.
    with torch.no_grad():
        state = model.new_state(2, 30)
        torch.testing.assert_close(model(ids, state=state), model(ids), rtol=1e-5, atol=1e-5)


def test_gpu_fsdp_bench_runs_on_the_cpu(tmp_path):
    """bench/gpu_fsdp.py --smoke: every mode of both models on 2 gloo processes, and a memory budget
    that refuses the 'block' model on one process but not sharded over two (timings not checked)."""
    out = tmp_path / "results.jsonl"
    torchrun(ROOT / "bench" / "gpu_fsdp.py", ["--smoke", "--budget-gib", "0.02", "--out", str(out)], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["processes"] == 2
    runs = {(r["model"], r["mode"]): r for r in rows if "mode" in r}
    assert set(runs) == {(m, mode) for m in ("8layer", "block") for mode in ("single", "fsdp1", "fsdp")}
    for key, r in runs.items():
        if key in {("block", "single"), ("block", "fsdp1")}:
            assert r["status"] == "does not fit" and r["plan_gib"] > 0.02
        else:
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and len(r["tokens_per_s_per_process"]) == 2
    assert runs[("8layer", "fsdp")]["gpus"] == 2 and runs[("8layer", "single")]["gpus"] == 1
    summaries = {r["model"]: r for r in rows if "fsdp_tokens_per_s" in r}
    assert summaries["8layer"]["efficiency_vs_single"] > 0
    assert summaries["block"]["speedup_vs_single"] == "1 GPU: does not fit"


def test_ctrl_c_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    """torchrun passes Ctrl-C (SIGINT) on to its processes; they agree on the step to stop at, gather
    the state and write one checkpoint, which a single process then resumes."""
    out = tmp_path / "run"
    args = ["--task", "mqar", *TINY, "--max-steps", "100000", "--eval-interval", "2", "--out-dir", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "train_tiny.py")]
    proc = subprocess.Popen(cmd + args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.json").exists():  # the first checkpoint: the loop is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "interrupted at step" in stdout, stderr[-3000:]
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    state = read(out)["state"]
    assert state["status"] == "interrupted" and state["step"] == step >= 2
    one_process(["--resume", "--stop-after", str(step + 1), "--out-dir", str(out)])
    assert read(out)["state"]["step"] == step + 1


def test_gpu_precision_policy_runs_on_a_one_process_cpu_group():
    """The policy shard() uses on GPUs (bf16 compute, fp32 gradient reduction, Mamba mixers in fp32),
    run on the CPU in a one-process gloo group: each unit computes in the dtype it should, and the
    master weights, gradients, AdamW moments and the gathered checkpoint stay fp32."""
    import torch.distributed as dist

    from minijamba.training import distributed
    from minijamba.training.train import TrainConfig, make_optimizer

    config = JambaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    torch.manual_seed(0)
    model = Jamba(config)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(64, (2, 16), generator=g), torch.randint(64, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, reference = model(ids, targets=targets)  # one process, no sharding, same autocast
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        distributed.checkpoint_layers(model)
        distributed.shard(model, torch.device("cpu"), param_dtype=torch.bfloat16)
        seen = {}

        def record(kind):  # the dtype of the module's weights while it runs
            def hook(module, args):
                seen.setdefault(kind, next(module.parameters()).dtype)

            return hook

        for layer in model.layers:
            mixer = layer.mamba if hasattr(layer, "mamba") else layer.self_attn
            mixer.register_forward_pre_hook(record(layer.kind))
        model.layers[1].feed_forward.register_forward_pre_hook(record("moe"))
        optimizer = make_optimizer(model, TrainConfig())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids, targets=targets)
        loss.backward()
        assert seen == {"mamba": torch.float32, "attention": torch.bfloat16, "moe": torch.bfloat16}
        # Matmuls get the same bf16 weights as autocast makes; the embedding and the norms' weights are
        # bf16 here and fp32 under plain autocast (measured: 2e-5 relative; bf16's epsilon is 8e-3).
        assert abs(loss.item() - reference.item()) < 1e-3 * reference.item()
        optimizer.step()
        for name, p in model.named_parameters():
            assert p.dtype == p.grad.dtype == torch.float32, name
            assert all(v.dtype == torch.float32 for k, v in optimizer.state[p].items() if k != "step"), name
        assert {v.dtype for v in distributed.model_state(model).values()} == {torch.float32}
    finally:
        dist.destroy_process_group()
