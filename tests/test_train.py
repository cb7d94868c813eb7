"""The training loop and its checkpoints, in-process with a very small model: exact resume, same seed
same run, learning, the schedule, non-finite losses, atomic writes and corrupt files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, copy_of, quiet
from helpers import train_config as config
from minijamba.training import checkpoint
from minijamba.model.jamba import Jamba
from minijamba.training.train import NonFiniteLoss, TrainConfig, lr_at, train

def tensors(out_dir, name):
    return load_file(str(Path(out_dir) / name))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- resume, seeds, learning ---------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_resume_is_exact(text_file, tmp_path, weights):
    """N steps in one go == N/2 steps, stop, resume for N/2: bit-identical weights and optimizer."""
    whole = train(config(text_file, tmp_path / "whole", weights=weights), log=quiet)
    assert whole.status == "done" and whole.step == 6
    half = train(config(text_file, tmp_path / "split", stop_after=3, weights=weights), log=quiet)
    assert half.status == "stopped" and half.step == 3
    resumed = train(config(text_file, tmp_path / "split", resume=True), log=quiet)  # weights: from the checkpoint
    assert resumed.status == "done" and resumed.step == 6 and resumed.resumed_from == 3
    for name in (checkpoint.MODEL, checkpoint.OPTIMIZER):
        assert_same_tensors(tensors(tmp_path / "whole", name), tensors(tmp_path / "split", name))
    a = json.loads((tmp_path / "whole" / checkpoint.STATE).read_text())
    b = json.loads((tmp_path / "split" / checkpoint.STATE).read_text())
    assert a["history"] == b["history"]  # same loss at every step
    assert a["rng"] == b["rng"]


def test_same_seed_same_run_other_seed_other_run(text_file, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(config(text_file, tmp_path / name, seed=seed, max_steps=2), log=quiet)
    a, b, c = (tensors(tmp_path / n, checkpoint.MODEL) for n in "abc")
    assert_same_tensors(a, b)
    assert not torch.equal(a["embed_tokens.weight"], c["embed_tokens.weight"])


def test_training_lowers_the_validation_loss(text_file, tmp_path):
    r = train(
        config(text_file, tmp_path / "o", max_steps=40, eval_interval=40, lr=1e-2, batch_size=4), log=quiet
    )
    evals = json.loads((tmp_path / "o" / checkpoint.STATE).read_text())["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert 0 < r.metrics["bits_per_byte"] < evals[0]["bits_per_byte"]
    assert math.isclose(r.metrics["val_loss"], evals[-1]["val_loss"])


def test_bf16_weights_train_in_bf16_with_the_scan_parameters_in_fp32(text_file, tmp_path):
    """weights="bf16": parameters and AdamW's moments in bf16, but A_log, D and the Δ bias in float32
    (rounding them would move every channel's decay and step size); it still learns, and the
    checkpoint samples as fp32 on the CPU."""
    r = train(config(text_file, tmp_path / "o", weights="bf16", max_steps=30, eval_interval=30, lr=1e-2,
                     batch_size=4), log=quiet)  # fmt: skip
    evals = json.loads((tmp_path / "o" / checkpoint.STATE).read_text())["evals"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5 and r.status == "done"
    fp32 = lambda name: name.rsplit(".", 1)[-1] in ("A_log", "D") or name.endswith("dt_proj.bias")
    weights = tensors(tmp_path / "o", checkpoint.MODEL)
    assert any(fp32(k) for k in weights) and any(not fp32(k) for k in weights)
    for k, v in weights.items():
        assert v.dtype == (torch.float32 if fp32(k) else torch.bfloat16), k
    for k, v in tensors(tmp_path / "o", checkpoint.OPTIMIZER).items():
        name, key = k.split("/")
        if key in ("exp_avg", "exp_avg_sq"):
            assert v.dtype == weights[name].dtype, k
    model, _ = checkpoint.load_model(tmp_path / "o", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cuda_graphs_need_a_gpu(text_file, tmp_path):
    cfg = config(text_file, tmp_path / "o", cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs needs one process on a CUDA GPU.*cpu.*drop it"):
        train(cfg, log=quiet)
    assert cfg.compile  # CUDA graphs come from torch.compile
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="unknown weights dtype 'fp16'.*fp32, bf16"):
        config(text_file, tmp_path / "o", weights="fp16").validate()


def test_mqar_run_reports_recall_accuracy(tmp_path):
    cfg = TrainConfig(
        task="mqar", mqar_pairs=3, mqar_queries=2, mqar_keys=6, mqar_values=4, batch_size=4,
        overrides=dict(TINY), eval_batches=1, max_steps=3, time_budget=None, out_dir=str(tmp_path / "m"),
        device="cpu",
    )  # fmt: skip
    r = train(cfg, log=quiet)
    assert 0 <= r.metrics["accuracy"] <= 1 and "bits_per_byte" not in r.metrics
    model, tok = checkpoint.load_model(tmp_path / "m")
    assert model.config.vocab_size == 2 + 6 + 4 == tok.get_vocab_size()
    assert tok.decode(tok.encode("k1 v2 k1").ids) == "k1 v2 k1"


def test_time_budget_plans_the_schedule_and_stops_with_a_checkpoint(text_file, tmp_path):
    r = train(
        config(text_file, tmp_path / "o", max_steps=None, time_budget=3.0, eval_interval=None), log=quiet
    )
    assert r.status in ("done", "budget") and r.step >= 1
    state = json.loads((tmp_path / "o" / checkpoint.STATE).read_text())
    assert state["status"] == r.status and state["step"] == r.step
    again = train(config(text_file, tmp_path / "o", resume=True, time_budget=1.0), log=quiet)
    assert again.planned_steps == r.planned_steps  # a resumed run keeps its schedule


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


# --- failures ------------------------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    out = tmp_path / "o"
    train(config(text_file, out, stop_after=2), log=quiet)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    forward = Jamba.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return (out[0], out[1] * float("nan")) if isinstance(out, tuple) else out

    monkeypatch.setattr(Jamba, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 3.*last good checkpoint \(step 2\)"):
        train(config(text_file, out, resume=True), log=quiet)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_existing_checkpoint_is_not_overwritten_without_asking(text_file, tmp_path):
    out = tmp_path / "o"
    train(config(text_file, out, max_steps=1), log=quiet)
    before = (out / checkpoint.MODEL).read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(text_file, out, max_steps=1, seed=5), log=quiet)
    assert (out / checkpoint.MODEL).read_bytes() == before
    train(config(text_file, out, max_steps=1, seed=5, overwrite=True), log=quiet)
    assert (out / checkpoint.MODEL).read_bytes() != before


def test_a_folder_of_other_files_is_never_replaced(text_file, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a minijamba checkpoint"):
        train(config(text_file, tmp_path, max_steps=1, overwrite=True), log=quiet)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_with_nothing_to_resume(text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(config(text_file, tmp_path / "none", resume=True), log=quiet)


def test_resume_with_other_data_is_refused(text_file, tmp_path):
    train(config(text_file, tmp_path / "o", stop_after=1), log=quiet)
    saved = json.loads((tmp_path / "o" / checkpoint.TRAIN_CONFIG).read_text())
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[:-3000])
    saved["data"] = str(other)
    (tmp_path / "o" / checkpoint.TRAIN_CONFIG).write_text(json.dumps(saved))
    with pytest.raises(checkpoint.CheckpointError, match="data differ"):
        train(config(text_file, tmp_path / "o", resume=True), log=quiet)


# --- checkpoint files (good_checkpoint: conftest.py) ---------------------------------------------


def test_checkpoint_holds_everything_and_no_pickle(good_checkpoint):
    names = {f.name for f in good_checkpoint.iterdir()}
    assert set(checkpoint.FOR_RESUMING) | {checkpoint.MANIFEST, "loss.png"} == names
    ckpt = checkpoint.load(good_checkpoint)
    assert ckpt.train_state["step"] == 2 and ckpt.train_config["max_steps"] == 2
    assert "lm_head.weight" not in ckpt.model_tensors  # tied: stored once
    model, tok = checkpoint.load_model(good_checkpoint)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.training and tok.get_vocab_size() <= model.config.vocab_size
    assert not list(good_checkpoint.parent.glob(".run.*"))  # no temporary folders left


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors missing"),
        (lambda d: (d / "tokenizer.json").unlink(), FileNotFoundError, "tokenizer.json missing"),
        (lambda d: (d / "optimizer.safetensors").unlink(), FileNotFoundError, "optimizer.safetensors"),
        (lambda d: (d / "config.json").write_text("{oops"), checkpoint.CheckpointError, "config.json is not valid"),
        (lambda d: (d / "tokenizer.json").write_text("[]"), ValueError, "tokenizer.json is not a valid"),
        (lambda d: (d / "train_state.json").write_text("{}"), checkpoint.CheckpointError, "no 'step'"),
        (lambda d: _truncate(d / "model.safetensors"), checkpoint.CheckpointError, "model.safetensors .*corrupt"),
        (lambda d: _flip_byte(d / "optimizer.safetensors"), checkpoint.CheckpointError, "checksum"),
    ],
)  # fmt: skip
def test_missing_or_corrupt_files_are_named(good_checkpoint, tmp_path, damage, error, match):
    d = copy_of(good_checkpoint, tmp_path / "c")
    damage(d)
    with pytest.raises(error, match=match):
        checkpoint.load(d)


def test_corrupt_weights_without_manifest_are_still_caught(good_checkpoint, tmp_path):
    d = copy_of(good_checkpoint, tmp_path / "c")
    (d / checkpoint.MANIFEST).unlink()
    _truncate(d / checkpoint.MODEL)
    with pytest.raises(checkpoint.CheckpointError, match="not a valid safetensors"):
        checkpoint.load(d, training=False)


def test_weights_of_another_model_are_refused(good_checkpoint, tmp_path):
    d = copy_of(good_checkpoint, tmp_path / "c")
    cfg = json.loads((d / checkpoint.CONFIG).read_text())
    cfg["hidden_size"] = 32
    (d / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="embed_tokens.weight has shape"):
        checkpoint.load_model(d)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _save_args(ckpt: checkpoint.Checkpoint) -> dict:
    return dict(
        model_tensors=ckpt.model_tensors, optimizer_tensors=ckpt.optimizer_tensors,
        param_groups=ckpt.param_groups, config=ckpt.config, train_config=ckpt.train_config,
        tokenizer=ckpt.tokenizer, train_state={**ckpt.train_state, "step": 99},
    )  # fmt: skip


def test_a_crash_while_saving_leaves_the_old_checkpoint(good_checkpoint, tmp_path, monkeypatch):
    d = copy_of(good_checkpoint, tmp_path / "c")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    args = _save_args(checkpoint.load(d))

    def crash(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(d, **args, plot=crash)  # fails after the tensors are written
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left


def test_a_crash_between_the_two_renames_is_recovered(good_checkpoint, tmp_path, monkeypatch):
    d = copy_of(good_checkpoint, tmp_path / "c")
    args = _save_args(checkpoint.load(d))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old -> backup done; new -> final never happens
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(d, **args)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not d.exists()
    assert checkpoint.load(d).train_state["step"] == 2  # the backup is put back
    checkpoint.save(d, **args)
    assert checkpoint.load(d).train_state["step"] == 99


def test_train_config_round_trips(good_checkpoint):
    saved = checkpoint.load(good_checkpoint).train_config
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(saved) == names
    TrainConfig(**saved).validate()
