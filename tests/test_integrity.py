"""Issue 23, nothing lost and nothing read from outside the folder: no NaN checkpoint, shard paths that
stay inside the folder, the user's files kept by a save, crash-safe folder swaps (recovered, no stale
temporary folders, permissions kept), wrongly typed configs and tensors refused, an unwritable
--out-dir refused before the first step, and configs far larger than their weights refused before
anything is built."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file

from helpers import small_configs
from helpers import TINY, copy_of, quiet, train_config  # good_checkpoint (a fixture): conftest.py
from minijamba import Jamba, JambaConfig, atomic, load_hf, save_hf
from minijamba.training import checkpoint
from minijamba.training import distributed
from minijamba import hf as hfmod
from minijamba.training import train as train_mod
from minijamba.training.train import NonFiniteLoss, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

# --- small pieces ---------------------------------------------------------------------------------
CLI = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--device", "cpu",
       *[a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]]  # fmt: skip
SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=4,
             num_experts_per_tok=2, mamba_d_state=4, mamba_dt_rank=4)  # fmt: skip


def snapshot(folder: Path) -> dict:
    """Every file and link under `folder`, by relative path: its bytes (a link: its target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def small_model(seed: int) -> Jamba:
    torch.manual_seed(seed)
    model = Jamba(JambaConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_parameters(a: Jamba, b: Jamba) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_args(ckpt: checkpoint.Checkpoint, step: int = 99) -> dict:
    return dict(
        model_tensors=ckpt.model_tensors, optimizer_tensors=ckpt.optimizer_tensors,
        param_groups=ckpt.param_groups, config=ckpt.config, train_config=ckpt.train_config,
        tokenizer=ckpt.tokenizer, train_state={**ckpt.train_state, "step": step},
    )  # fmt: skip


@pytest.fixture()
def nan_validation(monkeypatch):
    """Every validation loss is NaN from now on (the weights stay as they are)."""
    real = train_mod.evaluate

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "val_loss": float("nan")}

    monkeypatch.setattr(train_mod, "evaluate", evaluate)


# --- 1. a NaN is never a "last good" checkpoint ---------------------------------------------------
def test_a_nan_validation_loss_never_overwrites_the_last_good_checkpoint(text_file, tmp_path, request):
    out = tmp_path / "o"
    train(train_config(text_file, out, stop_after=2), log=quiet)
    before = snapshot(out)
    request.getfixturevalue("nan_validation")  # from step 3 on
    with pytest.raises(NonFiniteLoss, match=r"validation loss became nan at step 4; training stopped without "
                                            r"saving and the last good checkpoint \(step 2\) is kept"):  # fmt: skip
        train(train_config(text_file, out, resume=True), log=quiet)
    assert snapshot(out) == before
    assert checkpoint.load(out).train_state["step"] == 2


def test_non_finite_weights_are_never_saved(text_file, tmp_path, monkeypatch):
    real = distributed.model_state

    def poisoned(model):
        tensors = real(model)
        tensors["layers.0.mamba.D"] = tensors["layers.0.mamba.D"].clone()
        tensors["layers.0.mamba.D"][1] = float("inf")
        return tensors

    monkeypatch.setattr(distributed, "model_state", poisoned)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLoss, match=r"the weight layers\.0\.mamba\.D became NaN or infinite at step 2; "
                                            r".*no checkpoint had been written yet"):  # fmt: skip
        train(train_config(text_file, out), log=quiet)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_a_diverged_run_exits_1_and_writes_nothing(text_file, tmp_path, nan_validation, capsys):
    """The issue's `--lr 1e38 --max-steps 3`: step 1's validation is NaN; no checkpoint is called good."""
    train_tiny = load_script("train_tiny")
    out = tmp_path / "out"
    rc = train_tiny.main(["--data", str(text_file), "--out-dir", str(out), "--max-steps", "3", "--eval-interval",
                          "1", *CLI])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "train_tiny.py: error: the validation loss became nan at step 1" in err
    assert "no checkpoint had been written yet" in err and "Traceback" not in err
    assert not out.exists()


def test_checkpoint_save_refuses_non_finite_tensors_naming_them(good_checkpoint, tmp_path):
    d = copy_of(good_checkpoint, tmp_path / "c")
    before = snapshot(d)
    args = save_args(checkpoint.load(d))
    args["model_tensors"] = dict(args["model_tensors"])
    args["model_tensors"]["final_layernorm.weight"] = torch.full_like(
        args["model_tensors"]["final_layernorm.weight"], float("nan")
    )
    with pytest.raises(ValueError, match=r"model tensor final_layernorm\.weight holds NaN or infinite values"):
        checkpoint.save(d, **args)
    assert snapshot(d) == before and hidden(tmp_path) == []


# --- 2. load_hf reads nothing outside the folder --------------------------------------------------
@pytest.fixture()
def sharded(tmp_path):
    """A sharded save_hf folder at tmp/a/ckpt, and a valid shard copied to tmp/other/model.safetensors."""
    folder = tmp_path / "a" / "ckpt"
    model = small_model(1)
    save_hf(model, folder, max_shard_size=3000)
    index = json.loads((folder / hfmod.INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "other").mkdir()
    shutil.copy(folder / first, tmp_path / "other" / "model.safetensors")
    return folder, model, index


@pytest.fixture()
def opened(monkeypatch):
    """The paths load_hf opens with safetensors."""
    paths, real = [], safetensors.safe_open

    def safe_open(path, *args, **kwargs):
        paths.append(Path(path).resolve())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    return paths


@pytest.mark.parametrize("entry", ["../../other/model.safetensors", "../ckpt/../../other/model.safetensors",
                                   "/etc/passwd", "/proc/self/environ", "{tmp}/other/model.safetensors"])  # fmt: skip
def test_index_entries_outside_the_folder_are_refused(sharded, tmp_path, opened, entry):
    folder, _, index = sharded
    entry = entry.format(tmp=tmp_path)
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = entry
    (folder / hfmod.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        load_hf(folder)
    msg = str(err.value)
    assert f"weight_map entry {key!r} names {entry!r}, outside the checkpoint folder" in msg
    assert hfmod.INDEX_NAME in msg
    assert opened == []  # refused before a single file is opened


def test_links_out_of_the_folder_are_refused_links_inside_are_read(sharded, tmp_path, opened):
    folder, model, index = sharded
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    (folder / shard).symlink_to(tmp_path / "other" / "model.safetensors")  # a valid file, elsewhere
    with pytest.raises(ValueError, match=rf"{shard} is a link to .*other.model\.safetensors, outside the "
                                         r"checkpoint folder"):  # fmt: skip
        load_hf(folder)
    assert opened == []
    # one file: model.safetensors a link to the outside; config.json too
    single = tmp_path / "single"
    save_hf(model, single)
    (single / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (single / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is a link to .*outside"):
        load_hf(single)
    (single / "model.safetensors").unlink()
    (single / "sub").mkdir()
    (tmp_path / "outside.safetensors").rename(single / "sub" / "w.safetensors")
    (single / "model.safetensors").symlink_to("sub/w.safetensors")  # inside: fine
    assert_same_parameters(load_hf(single), model)
    (single / "config.json").rename(tmp_path / "config.json")
    (single / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"config\.json is a link to .*outside"):
        load_hf(single)


def test_a_hub_cache_snapshot_loads_through_its_blob_links(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>, outside the snapshot."""
    model = small_model(2)
    save_hf(model, tmp_path / "plain")
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "plain").iterdir())):
        (f).rename(repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    assert_same_parameters(load_hf(snap), model)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "is not valid JSON"),
        ('{"weight_map": {"model.embed_tokens.weight": 3}}', "weight_map entry 'model.embed_tokens.weight' is 3, "
                                                             "not a file name"),
        ('{"weight_map": {"model.embed_tokens.weight": null}}', "is None, not a file name"),
        ('{"weight_map": {"model.embed_tokens.weight": ["a"]}}', "is ['a'], not a file name"),
        ('{"weight_map": {"model.embed_tokens.weight": ""}}', "is '', not a file name"),
        ('["model.safetensors"]', "has no 'weight_map'"),
    ],
)  # fmt: skip
def test_a_malformed_index_is_refused_naming_the_entry(sharded, text, needle):
    folder, _, _ = sharded
    (folder / hfmod.INDEX_NAME).write_text(text)
    with pytest.raises(ValueError) as err:
        load_hf(folder)
    assert needle in str(err.value) and hfmod.INDEX_NAME in str(err.value)


# --- 3. a save keeps the user's files -------------------------------------------------------------
def test_resume_keeps_the_users_files_in_the_checkpoint_folder(text_file, tmp_path):
    out = tmp_path / "o"
    train(train_config(text_file, out, stop_after=2), log=quiet)
    (out / "notes.txt").write_text("mine\n")
    (out / "samples" / "deep").mkdir(parents=True)
    (out / "samples" / "a.txt").write_text("sample a")
    (out / "samples" / "deep" / "b.txt").write_text("sample b")
    (out / "latest").symlink_to("notes.txt")
    os.chmod(out / "samples", 0o750)
    mine = {k: v for k, v in snapshot(out).items() if k.split("/")[0] in ("notes.txt", "samples", "latest")}
    log = open(out / "notes.txt", "a")  # a `tee` still appending to it while the run saves
    try:
        r = train(train_config(text_file, out, resume=True, stop_after=4), log=quiet)
        log.write("more\n")
        log.flush()
    finally:
        log.close()
    assert r.step == 4 and checkpoint.load(out).train_state["step"] == 4
    after = snapshot(out)
    assert after["notes.txt"] == b"mine\nmore\n"  # the same file, not a frozen copy
    assert {k: after[k] for k in mine if k != "notes.txt"} == {k: v for k, v in mine.items() if k != "notes.txt"}
    assert (out / "latest").is_symlink() and stat.S_IMODE((out / "samples").stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folders left


def test_save_hf_keeps_the_users_files(tmp_path):
    folder = tmp_path / "ckpt"
    save_hf(small_model(1), folder, max_shard_size=3000)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "samples").mkdir()
    (folder / "samples" / "s.txt").write_text("x")
    new = small_model(2)
    save_hf(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "samples",
                                                        "tokenizer.json"]  # fmt: skip
    assert (folder / "samples" / "s.txt").read_text() == "x"
    assert_same_parameters(load_hf(folder), new)


# --- 4. one crash-safe folder swap, recovered by every loader -------------------------------------
def _crash_on_second_replace(monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # rename 1 (old -> backup) done; rename 2 (new -> final) never happens
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("recover_by", ["load_hf", "save_hf"])
def test_save_hf_interrupted_between_its_renames_is_recovered(tmp_path, monkeypatch, recover_by):
    folder = tmp_path / "ckpt"
    old = small_model(1)
    save_hf(old, folder)
    (folder / "tokenizer.json").write_text("{}")
    _crash_on_second_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_hf(small_model(2), folder)
    monkeypatch.undo()
    assert not folder.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".ckpt.old"]
    if recover_by == "load_hf":
        assert_same_parameters(load_hf(folder), old)
    else:
        new = small_model(3)
        save_hf(new, folder)
        assert_same_parameters(load_hf(folder), new)
    assert (folder / "tokenizer.json").read_text() == "{}"  # the user's file came back too
    assert hidden(tmp_path) == []


KILLED_SAVE = """
import os, signal, sys, torch
import safetensors.torch
from minijamba import Jamba, JambaConfig, save_hf
torch.manual_seed(5)
model = Jamba(JambaConfig(**{small}))
where, calls = sys.argv[2], []
if where == "writing":
    real = safetensors.torch.save_file
    def save_file(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    safetensors.torch.save_file = save_file
else:
    real = os.replace
    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
save_hf(model, sys.argv[1], max_shard_size=3000)
"""


@pytest.mark.parametrize("where", ["writing", "between the renames"])
def test_kill_9_during_save_hf_loses_nothing_and_leaves_no_temporary_folder(tmp_path, where):
    folder = tmp_path / "ckpt"
    old = small_model(1)
    save_hf(old, folder)
    before = snapshot(folder)
    script = KILLED_SAVE.format(small=SMALL)
    proc = subprocess.run([sys.executable, "-c", script, str(folder), where.split()[0]], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    kinds = [n.split("-")[0] for n in hidden(tmp_path)]
    assert kinds == ([".ckpt.tmp"] if where == "writing" else [".ckpt.old", ".ckpt.tmp"])
    assert folder.exists() == (where == "writing")
    assert_same_parameters(load_hf(folder), old)  # put back, and the dead save's folders removed
    assert snapshot(folder) == before and hidden(tmp_path) == []


def test_only_dead_processes_temporary_folders_are_removed(good_checkpoint, tmp_path):
    d = copy_of(good_checkpoint, tmp_path / "c")
    dead, alive = dead_pid(), os.getppid()
    for name in (f".c.tmp-{dead}-00ff00ff", f".c.old-{dead}-0a0a0a0a", f".c.tmp-{alive}-11111111"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
    checkpoint.load(d)
    assert hidden(tmp_path) == [f".c.tmp-{alive}-11111111"]  # a live process's save is left alone
    (tmp_path / f".c.tmp-{dead}-22222222").mkdir()
    checkpoint.save(d, **save_args(checkpoint.load(d)))  # a save cleans up too
    assert hidden(tmp_path) == [f".c.tmp-{alive}-11111111"]
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    (tmp_path / f".hf.tmp-{dead}-33333333").mkdir()
    load_hf(folder)
    assert hidden(tmp_path) == [f".c.tmp-{alive}-11111111"]


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o711], ids=oct)
def test_a_save_keeps_the_folders_permissions(good_checkpoint, tmp_path, mode):
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    os.chmod(folder, mode)
    save_hf(small_model(2), folder)
    assert stat.S_IMODE(folder.stat().st_mode) == mode
    d = copy_of(good_checkpoint, tmp_path / "c")
    os.chmod(d, mode)
    checkpoint.save(d, **save_args(checkpoint.load(d)))
    assert stat.S_IMODE(d.stat().st_mode) == mode


def test_a_new_folder_gets_the_umasks_permissions(good_checkpoint, tmp_path):
    umask = os.umask(0o027)
    try:
        save_hf(small_model(1), tmp_path / "hf")
        checkpoint.save(tmp_path / "c", **save_args(checkpoint.load(good_checkpoint)))
    finally:
        os.umask(umask)
    for d in (tmp_path / "hf", tmp_path / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "llama", "hidden_size": 8}, "model_type 'llama'"),
    ({"hidden_size": 8}, "model_type None"),
    ("{oops", "not a model's config"),
])  # fmt: skip
def test_save_hf_does_not_overwrite_another_models_folder(tmp_path, config, needle):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"their weights")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"llama.config\.json is not a Jamba's config\.json") as err:
        save_hf(small_model(1), folder)
    assert needle in str(err.value)
    assert snapshot(folder) == before and hidden(tmp_path) == []


# --- 5. wrongly typed configs and tensors ---------------------------------------------------------
def test_a_string_for_a_bool_in_config_json_is_refused(tmp_path, good_checkpoint):
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    hf = json.loads((folder / "config.json").read_text())
    hf["tie_word_embeddings"] = "false"
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_hf(folder)
    d = copy_of(good_checkpoint, tmp_path / "c")
    cfg = json.loads((d / checkpoint.CONFIG).read_text())
    cfg["tie_word_embeddings"] = "true"
    (d / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="tie_word_embeddings"):
        checkpoint.load_model(d)


@pytest.mark.parametrize("dtype, code", [(torch.int64, "I64"), (torch.bool, "BOOL"), (torch.int8, "I8"),
                                         (torch.int32, "I32")])  # fmt: skip
def test_integer_and_bool_weights_are_refused_naming_the_tensor(tmp_path, good_checkpoint, dtype, code):
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.final_layernorm.weight"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"must be floating point .*1 are not: {key} \({code}\)"):
        load_hf(folder)
    d = copy_of(good_checkpoint, tmp_path / "c")
    (d / checkpoint.MANIFEST).unlink()  # no checksum to catch it: the dtype check must
    tensors = load_file(d / checkpoint.MODEL)
    tensors["final_layernorm.weight"] = torch.ones_like(tensors["final_layernorm.weight"]).to(dtype)
    save_file(tensors, d / checkpoint.MODEL)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(checkpoint.CheckpointError, match=rf"final_layernorm\.weight holds {name} values, not "
                                                         "floating point"):  # fmt: skip
        checkpoint.load_model(d)


# --- 6. an unwritable --out-dir, found before the first step --------------------------------------
@pytest.fixture()
def no_training(monkeypatch):
    def build_task(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "build_task", build_task)


@pytest.mark.parametrize("out, needle", [("{tmp}/file.txt/out", "{tmp}/file.txt is a file, not a folder"),
                                         ("{tmp}/file.txt/a/b", "{tmp}/file.txt is a file, not a folder"),
                                         ("/proc/x", "a folder cannot be created in /proc")])  # fmt: skip
def test_an_unwritable_out_dir_is_refused_before_the_first_step(text_file, tmp_path, no_training, out, needle):
    (tmp_path / "file.txt").write_text("mine")
    out, needle = out.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    with pytest.raises(ValueError) as err:
        train(train_config(text_file, out), log=quiet)
    msg = str(err.value)
    assert msg.startswith(f"--out-dir {out} cannot be written") and needle in msg and "choose another" in msg
    assert "tmp-" not in msg  # no temporary path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_cli_an_unwritable_out_dir_exits_1_with_one_line(text_file, tmp_path, capsys):
    train_tiny = load_script("train_tiny")
    (tmp_path / "file.txt").write_text("mine")
    for out in (tmp_path / "file.txt" / "out", Path("/proc/x")):
        rc = train_tiny.main(["--data", str(text_file), "--out-dir", str(out), "--max-steps", "1", *CLI])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1 and len(lines) == 1, err
        assert lines[0].startswith(f"train_tiny.py: error: --out-dir {out} cannot be written")
        assert "tmp-" not in lines[0]


def test_a_resumed_run_checks_its_out_dir_before_the_first_step(good_checkpoint, tmp_path, monkeypatch, no_training):
    d = copy_of(good_checkpoint, tmp_path / "c")
    before = snapshot(d)

    def probe(target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic, "probe", probe)
    with pytest.raises(ValueError, match=rf"--out-dir {d} cannot be written \(a folder cannot be created in "
                                         rf"{tmp_path}: Permission denied\)"):  # fmt: skip
        train(TrainConfig(out_dir=str(d), resume=True, device="cpu"), log=quiet)
    assert snapshot(d) == before


def test_check_writable_leaves_no_trace(tmp_path):
    out = tmp_path / "new" / "deep" / "out"
    checkpoint.check_writable(out)
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []


# --- 7. sizes planned from the config, before anything is built -----------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs())
def test_the_planned_parameter_count_is_what_jamba_builds(config):
    with torch.device("meta"):
        assert config.num_parameters() == Jamba(config).num_parameters()


@pytest.mark.parametrize("preset", ["tiny", "jamba-v0.1"])
def test_the_planned_parameter_count_of_the_presets(preset):
    config = JambaConfig.from_preset(preset)
    with torch.device("meta"):
        assert config.num_parameters() == Jamba(config).num_parameters()
    if preset == "jamba-v0.1":
        assert round(config.num_parameters() / 1e9, 2) == 51.57


@pytest.fixture()
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(hfmod, "Jamba", refuse)
    monkeypatch.setattr("minijamba.model.jamba.Jamba", refuse)


@pytest.mark.parametrize("change, needle", [
    (dict(num_hidden_layers=10**6), "describes a model of 1,000,000 layers"),
    (dict(num_hidden_layers=10**5, attn_layer_period=10**5 + 1, attn_layer_offset=10**5), "100,000 layers"),
    (dict(hidden_size=10**9, mamba_dt_rank=4), "describes a model of 4 layers and "),
    (dict(num_experts=10**8), "parameters, but the weights"),
])  # fmt: skip
def test_a_config_far_larger_than_its_weights_is_refused_before_building(tmp_path, good_checkpoint, nothing_built, change,
                                                                        needle):  # fmt: skip
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    hf = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="the config.json does not belong to these weights") as err:
        load_hf(folder)
    assert needle in str(err.value) and "model.safetensors" in str(err.value)
    d = copy_of(good_checkpoint, tmp_path / "c")
    cfg = {**json.loads((d / checkpoint.CONFIG).read_text()), **change}
    if "hidden_size" in change:
        cfg["num_attention_heads"], cfg["num_key_value_heads"] = 2, 1
    (d / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="does not belong to these weights"):
        checkpoint.load_model(d)
    with pytest.raises(checkpoint.CheckpointError, match="does not belong to these weights"):
        train(TrainConfig(out_dir=str(d), resume=True, device="cpu"), log=quiet)


def test_a_small_disagreement_still_lists_the_tensors(tmp_path):
    """A config one layer off is built (cheaply) and the missing tensors are listed by name."""
    folder = tmp_path / "hf"
    save_hf(small_model(1), folder)
    hf = {**json.loads((folder / "config.json").read_text()), "num_hidden_layers": 5}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.4\."):
        load_hf(folder)


def test_planning_is_arithmetic(monkeypatch):
    """A million layers plan in no time: nothing is built or even listed per layer."""
    config = JambaConfig.from_preset("tiny", num_hidden_layers=10**6)
    monkeypatch.setattr(JambaConfig, "layer_types", property(lambda self: pytest.fail("listed the layers")))
    n = config.num_parameters()
    assert n > 10**6 * 2 * 128 and math.isfinite(n)
