"""Issue 22: bad input, as a careless or hostile user gives it, on both CLIs and in the library.

Every numeric flag at 0, -1, NaN, inf and 10^18, every file input empty, binary, a folder or a file,
missing; prompts that are not UTF-8; config overrides of the wrong type or an absurd size; weights
that hold NaN or inf. Each refused case exits non-zero with one line that names the flag (or file)
and no traceback, before anything is trained or written; the legitimate ones are accepted. All
in-process (`main(argv)`), except the two non-UTF-8 prompts, which need a real command line and stdin.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_cli import ENV, ROOT, SMALL, TINY, generate, one_error_line, snapshot, train_tiny, trained  # noqa: F401
from minijamba import Jamba, JambaConfig, checks, load_hf, save_hf
from minijamba.training import checkpoint as ckpt_mod
from minijamba.inference.generation import generate as lib_generate
from minijamba.inference.materialize import from_preset
from minijamba.inference.generation import generate_stream, sample
from minijamba.inference.memory_plan import DoesNotFit
from minijamba.training.memory_plan import check_training, largest_batch, training_plan

BIG = str(10**18)
TRAIN_INT = ["--vocab-size", "--seq-len", "--seed", "--max-steps", "--stop-after", "--batch-size", "--warmup-steps",
             "--eval-interval", "--eval-batches", "--mqar-pairs", "--mqar-queries", "--mqar-keys", "--mqar-values"]  # fmt: skip
TRAIN_FLOAT = ["--time-budget", "--lr"]
MQAR_ONLY = {"--mqar-pairs", "--mqar-queries", "--mqar-keys", "--mqar-values"}
# Legitimate: validated and accepted (not run: each would train for real).
TRAIN_ACCEPTED = {
    ("--seed", "0"), ("--seed", BIG),  # any seed a torch.Generator takes, 0 .. 2**64 - 1
    ("--max-steps", BIG), ("--stop-after", BIG), ("--eval-interval", BIG),  # the time budget stops the run
    ("--warmup-steps", "0"), ("--warmup-steps", BIG),  # no warmup; a warmup longer than the run
    ("--eval-batches", BIG),  # the text task's validation split bounds it
    ("--time-budget", "0"), ("--time-budget", "1e18"),  # no limit; a limit never reached
}  # fmt: skip


def run_main(module, argv) -> int:
    try:
        return module.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def train_argv(flag, value, text_file, out) -> list[str]:
    task = ["--task", "mqar"] if flag in MQAR_ONLY else ["--data", str(text_file)]
    return [*SMALL, *TINY, "--max-steps", "1", *task, "--out-dir", str(out), flag, value]


# --- train_tiny.py: every numeric flag -------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", BIG])
@pytest.mark.parametrize("flag", TRAIN_INT + TRAIN_FLOAT)
def test_train_numeric_flags(flag, value, text_file, tmp_path, capsys):
    if flag in TRAIN_FLOAT and value == BIG:
        value = "1e18"  # (an int flag given nan or inf: argparse's "argument --seq-len: invalid int value")
    out = tmp_path / "out"
    argv = train_argv(flag, value, text_file, out)
    if (flag, value) in TRAIN_ACCEPTED:
        cfg, _ = train_tiny.config_from_args(train_tiny.build_parser().parse_args(argv))
        expected = float(value) if flag in TRAIN_FLOAT else int(value)
        assert getattr(cfg, flag[2:].replace("-", "_")) == (None if flag == "--time-budget" and value == "0" else expected)
        return
    t = time.monotonic()
    assert run_main(train_tiny, argv) not in (0, None)
    one_error_line(capsys, flag)
    assert not out.exists()
    assert time.monotonic() - t < 30  # refused up front, not after training or a huge allocation


def test_train_batch_of_ten_million_is_planned_and_refused_with_what_fits(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(train_tiny, train_argv("--batch-size", str(10**7), text_file, out)) == 1
    line = one_error_line(capsys, "--batch-size", "this run needs about", "the largest --batch-size that fits is")
    best = int(line.split("fits is ")[1].replace(",", "").split()[0])
    assert 1 <= best < 10**7
    assert not out.exists()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("rms_norm_eps=abc", ["--override rms_norm_eps", "JambaConfig.rms_norm_eps must be a finite number"]),
        ('rms_norm_eps="1e-6"', ["--override rms_norm_eps", "finite number"]),  # a JSON string
        ("rms_norm_eps=NaN", ["--override rms_norm_eps", "finite number"]),
        ("initializer_range=Infinity", ["--override initializer_range", "finite number"]),
        ("hidden_size=1.5", ["--override hidden_size", "must be an integer"]),
        ("hidden_size=true", ["--override hidden_size", "must be an integer"]),
        ("tie_word_embeddings=1", ["--override tie_word_embeddings", "must be a bool"]),
        ("hidden_size=-1", ["--override", "hidden_size must be a positive integer"]),
        ("num_attention_heads=3", ["--override", "must divide hidden_size"]),
        ("hidden_size=1000000000", ["--override", "the model alone does not fit"]),
        ("num_hidden_layers=100000", ["--override", "the model alone does not fit"]),
        ("num_hidden_layers=1000000", ["--override", "the model alone does not fit"]),
        ("intermediate_size=1000000000000000000", ["--override", "the model alone does not fit"]),
        ("wings=2", ["--override wings", "unknown model setting"]),
    ],
)
def test_train_overrides_are_checked_by_type_and_planned_before_building(override, needles, text_file, tmp_path,
                                                                         capsys):  # fmt: skip
    out = tmp_path / "out"
    t = time.monotonic()
    # The tiny preset's sizes (no TINY): a million of its layers is 350B parameters, which no test machine holds.
    argv = [*SMALL, "--max-steps", "1", "--data", str(text_file), "--out-dir", str(out), "--override", override]
    assert run_main(train_tiny, argv) == 1
    one_error_line(capsys, *needles)
    assert time.monotonic() - t < 30  # a million layers is refused by arithmetic, not built (even on meta)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["empty", "binary", "latin-1", "no-text-folder", "empty-folder", "missing"])
def test_train_data_files(kind, tmp_path, capsys):
    data = tmp_path / "data"
    if kind == "empty":
        data.write_text("")
    elif kind == "binary":
        data.write_bytes(bytes(range(256)) * 8)
    elif kind == "latin-1":
        data.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    elif kind == "no-text-folder":
        data.mkdir()
        (data / "a.bin").write_bytes(b"\x00\xff" * 10)
        (data / "b.txt").write_text("   \n")
    elif kind == "empty-folder":
        data.mkdir()
    out = tmp_path / "out"
    assert run_main(train_tiny, [*SMALL, *TINY, "--max-steps", "1", "--data", str(data), "--out-dir", str(out)]) == 1
    one_error_line(capsys, "--data", str(data))
    assert not out.exists()


def test_train_out_dir_that_is_a_file(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("notes")
    assert run_main(train_tiny, [*SMALL, *TINY, "--max-steps", "1", "--data", str(text_file), "--out-dir", str(out)]) == 1
    one_error_line(capsys, "--out-dir", "is a file")
    assert out.read_text() == "notes"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--overwrite", "--batch-size", str(10**7)], "--batch-size"),
        (["--overwrite", "--lr", "nan"], "--lr"),
        (["--overwrite", "--override", "num_hidden_layers=10000000"], "--override"),  # 30B parameters
        (["--resume", "--time-budget", "inf"], "--time-budget"),
        (["--resume", "--seed", str(2**70)], "--seed"),
    ],
)
def test_a_refused_run_never_touches_an_existing_checkpoint(argv, needle, trained, text_file, tmp_path, capsys):
    d = tmp_path / "c"
    shutil.copytree(trained, d)
    before = snapshot(d)
    rc = run_main(train_tiny, [*SMALL, *TINY, "--data", str(text_file), "--out-dir", str(d), *argv])
    assert rc == 1
    one_error_line(capsys, needle)
    assert snapshot(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# --- generate.py: every numeric flag -------------------------------------------------------
GEN_INT = ["--max-new-tokens", "--top-k", "--seed", "--num-samples", "--prefill-chunk"]
GEN_FLOAT = ["--temperature", "--top-p"]
GEN_ACCEPTED = {
    ("--temperature", "0"),  # greedy
    ("--temperature", "1e18"),  # all tokens about equally likely
    ("--top-k", BIG),  # every token
    ("--seed", "0"), ("--seed", BIG),
    ("--prefill-chunk", BIG),  # the prompt in one piece
}  # fmt: skip


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", BIG])
@pytest.mark.parametrize("flag", GEN_INT + GEN_FLOAT)
def test_generate_numeric_flags(flag, value, trained, capsys):
    if flag in GEN_FLOAT and value == BIG:
        value = "1e18"
    argv = ["--out-dir", str(trained), "--prompt", "import os", "--max-new-tokens", "2", flag, value]
    rc = run_main(generate, argv)
    if (flag, value) in GEN_ACCEPTED:
        assert rc == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("import os")
        return
    assert rc not in (0, None)
    err = capsys.readouterr().err
    if "memory plan" in err:  # --max-new-tokens 10^18: the plan is printed, then one error line
        err = err[err.index("generate.py: error:") :]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and flag in err, err


def test_a_tiny_temperature_samples_like_greedy(trained, capsys):
    """1e-300 used to divide the logits into inf - inf = NaN inside the softmax."""
    base = ["--out-dir", str(trained), "--prompt", "import os", "--max-new-tokens", "4"]
    assert run_main(generate, [*base, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert run_main(generate, [*base, "--temperature", "1e-300"]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_prompt_that_is_not_utf8_in_process(trained, capsys, monkeypatch):
    # On the command line Python hands undecodable bytes over as lone surrogates.
    assert run_main(generate, ["--out-dir", str(trained), "--prompt", "ab\udcff"]) == 1
    one_error_line(capsys, "--prompt", "not valid UTF-8", "0xff")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"import \xc3(")))
    assert run_main(generate, ["--out-dir", str(trained)]) == 1
    one_error_line(capsys, "stdin", "not valid UTF-8", "0xc3", "--prompt")


@pytest.mark.parametrize("where", ["argv", "stdin"])
def test_generate_prompt_that_is_not_utf8_as_a_script(where, trained):
    cmd = [sys.executable.encode(), b"generate.py", b"--out-dir", str(trained).encode(), b"--max-new-tokens", b"2"]
    if where == "argv":
        cmd += [b"--prompt", b"caf\xe9"]  # latin-1
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, input=b"caf\xe9\n" if where == "stdin" else None,
                         capture_output=True, timeout=120)  # fmt: skip
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not valid UTF-8" in err and ("--prompt" if where == "argv" else "stdin") in err


def _poison(folder, name, value, file="model.safetensors"):
    tensors = load_file(str(folder / file))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    manifest = folder / "manifest.json"
    if manifest.is_file():  # a consistent checkpoint whose weights diverged, not a damaged file
        m = json.loads(manifest.read_text())
        m["files"][file] = {"bytes": (folder / file).stat().st_size, "sha256": ckpt_mod._sha256(folder / file)}
        manifest.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def hf_folder(trained, tmp_path_factory):
    """The trained model as a transformers folder, with its tokenizer."""
    model, _ = ckpt_mod.load_model(trained)
    folder = save_hf(model, tmp_path_factory.mktemp("hf") / "jamba")
    shutil.copy(trained / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize(
    "setup, flag, needles",
    [
        ("missing", "--out-dir", ["--out-dir", "does not exist"]),
        ("empty", "--out-dir", ["--out-dir", "incomplete", "model.safetensors"]),
        ("file", "--out-dir", ["--out-dir", "is a file, not a folder"]),
        ("garbage", "--out-dir", ["--out-dir", "model.safetensors", "corrupt"]),
        ("nan", "--out-dir", ["--out-dir", "model.safetensors: tensor layers.0.mamba.D holds NaN or inf"]),
        ("inf", "--out-dir", ["--out-dir", "model.safetensors: tensor embed_tokens.weight holds NaN or inf"]),
        ("missing", "--hf", ["--hf", "does not exist"]),
        ("empty", "--hf", ["--hf", "config.json does not exist"]),
        ("file", "--hf", ["--hf", "is a file, not a folder"]),
        ("nan", "--hf", ["--hf", "tensor layers.0.mamba.D holds NaN or inf"]),
        ("inf", "--hf", ["--hf", "tensor embed_tokens.weight holds NaN or inf"]),
    ],
)
def test_generate_model_folders(setup, flag, needles, trained, hf_folder, tmp_path, capsys):
    d = tmp_path / "m"
    source = trained if flag == "--out-dir" else hf_folder
    hf = flag == "--hf"
    if setup == "empty":
        d.mkdir()
    elif setup == "file":
        d.write_bytes(b"\x00\x01binary")
    elif setup != "missing":
        shutil.copytree(source, d)
        if setup == "garbage":
            (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        else:
            value = float("nan") if setup == "nan" else float("inf")
            name = "layers.0.mamba.D" if setup == "nan" else "embed_tokens.weight"
            _poison(d, ("model." + name) if hf else name, value)
    before = snapshot(d) if d.is_dir() else None
    assert run_main(generate, [flag, str(d), "--prompt", "import os", "--max-new-tokens", "2"]) == 1
    one_error_line(capsys, *needles)
    assert capsys.readouterr().out == ""  # refused as it loads: no prompt printed
    if before is not None:
        assert snapshot(d) == before


# --- the library ---------------------------------------------------------------------------------
def small_model(vocab=32):
    config = JambaConfig.from_preset("tiny", vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, mamba_dt_rank=2,
                                     attn_layer_period=2, attn_layer_offset=1)  # fmt: skip
    torch.manual_seed(0)
    return Jamba(config).eval()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="0.5"), "temperature"), (dict(temperature=-1e-9), "temperature"),
        (dict(temperature=1.0, top_p=float("nan")), "top_p"), (dict(temperature=1.0, top_p=float("inf")), "top_p"),
        (dict(temperature=0.0, top_p=float("nan")), "top_p"),
    ],
)  # fmt: skip
def test_library_sampling_parameters(kwargs, word):
    model = small_model()
    ids = torch.randint(0, 32, (2, 3))
    with pytest.raises(ValueError, match=word):
        lib_generate(model, ids, 2, **kwargs)
    with pytest.raises(ValueError, match=word):
        sample(torch.randn(2, 32), **kwargs)


def test_library_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(4, 32) * 10
    assert torch.equal(sample(logits, 1e-300, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    assert torch.equal(sample(logits, 1e-44, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))


@pytest.mark.parametrize("bad", [-1, 32, 10**6])
def test_library_input_ids_outside_the_vocabulary(bad):
    model = small_model(vocab=32)
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the model's vocabulary: ids must be in \[0, 31\]"):
        lib_generate(model, ids, 2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        next(generate_stream(model, ids, 2))


def test_library_input_ids_shape_and_dtype():
    model = small_model()
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        lib_generate(model, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="integer token ids"):
        lib_generate(model, torch.tensor([[1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lib_generate(model, torch.tensor([[1, 2]]), 2.5)


def test_library_jamba_rechecks_a_config_changed_after_it_was_made():
    config = JambaConfig.from_preset("tiny")
    config.rms_norm_eps = float("nan")
    with pytest.raises(ValueError, match="JambaConfig.rms_norm_eps must be a finite number"):
        Jamba(config)
    config = JambaConfig.from_preset("tiny")
    config.hidden_size = "128"
    with pytest.raises(ValueError, match="JambaConfig.hidden_size must be an integer"):
        Jamba(config)


def test_library_seeds():
    assert checks.check_seed(0) == 0 and checks.check_seed(2**64 - 1) == 2**64 - 1
    torch.Generator().manual_seed(checks.SEED_MAX)  # the range is torch's own
    for bad in (-1, 2**64, True, 1.0, "3"):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
            checks.check_seed(bad)
    assert generate.SEED_MAX == checks.SEED_MAX


def test_library_loaders_refuse_non_finite_weights(trained, hf_folder, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(trained, d)
    _poison(d, "final_layernorm.weight", float("-inf"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor final_layernorm\.weight holds NaN or inf: "
                                         r"the weights are corrupt \(or the run that wrote them diverged\)"):  # fmt: skip
        ckpt_mod.load_model(d)
    h = tmp_path / "h"
    shutil.copytree(hf_folder, h)
    _poison(h, "model.final_layernorm.weight", float("nan"))
    for quantize in (None, "int8"):
        with pytest.raises(ValueError, match=r"tensor final_layernorm\.weight holds NaN or inf"):
            load_hf(h, quantize=quantize)
    assert checks.check_finite({"a": torch.ones(3), "ids": torch.arange(3)}, "x") is None


def test_check_finite_names_the_tensor_in_chunks(monkeypatch):
    monkeypatch.setattr(checks, "_CHUNK", 7)
    t = torch.zeros(5, 9)
    t[4, 8] = float("nan")
    with pytest.raises(ValueError, match="f.bin: tensor w holds NaN or inf"):
        checks.check_finite([("ok", torch.zeros(3)), ("w", t)], "f.bin")
    checks.check_finite([("meta", torch.empty(10**12, device="meta"))], "m")  # no data: nothing to check


# --- the training memory plan --------------------------------------------------------------------
def test_training_plan_accepts_the_default_run_and_refuses_with_the_largest_batch():
    config = JambaConfig.from_preset("tiny")
    default = training_plan(config, 8, 128, chunked_scan=True)
    assert default.parameters == config.num_parameters()
    assert default.total < 2**30  # the default run: well under 1 GiB (it measures about 0.3 GiB)
    check_training(default, 4 * 2**30)
    huge = training_plan(config, 10**7, 128, chunked_scan=True)
    with pytest.raises(DoesNotFit, match="the largest --batch-size that fits is") as e:
        check_training(huge, 4 * 2**30)
    best = e.value.largest_context
    assert best == largest_batch(huge, 4 * 2**30)
    assert huge.with_batch(best).total <= 4 * 2**30 < huge.with_batch(best + 1).total
    assert check_training(huge, None) is None  # unknown memory: nothing refused


def test_training_plan_grows_with_every_size():
    config = JambaConfig.from_preset("tiny")
    base = training_plan(config, 8, 128).total
    assert training_plan(config, 16, 128).total > base and training_plan(config, 8, 256).total > base
    assert training_plan(config, 8, 128, checkpoint_activations=True).total < base
    assert training_plan(config, 8, 128, world=2).total < base
    assert training_plan(config, 8, 128, weights="bf16").total < base
    t = time.monotonic()
    million = JambaConfig.from_preset("tiny", num_hidden_layers=10**6, vocab_size=10**6, hidden_size=2**20)
    assert training_plan(million, 10**9, 10**9).total > 2**80 and time.monotonic() - t < 5  # arithmetic only


def test_library_from_preset_seed():
    with pytest.raises(ValueError, match="seed must be an integer"):
        from_preset("tiny", device="meta", seed=-1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        from_preset("tiny", device="meta", seed=2**64)
