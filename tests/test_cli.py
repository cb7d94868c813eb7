"""train_tiny.py and generate.py as a user runs them: short end-to-end runs, Ctrl-C, --help, and every
kind of bad input giving one clear line on stderr, a non-zero exit, no traceback, and no damage."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import copy_of

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--override", "hidden_size=16", "--override", "intermediate_size=16", "--override", "num_attention_heads=2",
    "--override", "num_key_value_heads=1", "--override", "num_experts=2", "--override", "mamba_d_state=4",
    "--override", "mamba_dt_rank=2",
]  # fmt: skip
SMALL = [
    "--vocab-size",
    "300",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--eval-batches",
    "1",
    "--device",
    "cpu",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny, generate = script("train_tiny"), script("generate")


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """A checkpoint written by train_tiny.main, shared by the generate tests (never modified)."""
    out = tmp_path_factory.mktemp("run") / "out"
    torch.set_num_threads(1)
    rc = train_tiny.main(["--data", str(text_file), "--out-dir", str(out), "--max-steps", "3", *SMALL, *TINY])
    assert rc == 0
    return out


def snapshot(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- end to end ----------------------------------------------------------------------------------
def test_train_then_generate_as_scripts(text_file, tmp_path):
    """The two scripts, run as a user runs them."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "train_tiny.py", "--data", str(text_file), "--out-dir", str(out), "--max-steps", "2",
         *SMALL, *TINY],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (
        "done at step 2 of 2" in run.stdout and "validation loss" in run.stdout and "bits/byte" in run.stdout
    )
    assert {"model.safetensors", "tokenizer.json", "loss.png"} <= {f.name for f in out.iterdir()}
    gen = subprocess.run(
        [sys.executable, "generate.py", "--out-dir", str(out), "--max-new-tokens", "5", "--temperature", "0"],
        cwd=ROOT, env=ENV, input="def main():\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("def main():\n")  # the prompt from stdin, then the continuation
    assert "tokens/s" in gen.stderr and "KV cache" in gen.stderr and "SSM state" in gen.stderr


def test_generate_streams_samples_and_reports_the_state(trained, capsys):
    argv = ["--out-dir", str(trained), "--prompt", "import os", "--max-new-tokens", "6", "--num-samples", "2",
            "--seed", "3", "--top-k", "5", "--top-p", "0.9"]  # fmt: skip
    assert generate.main(argv) == 0
    first = capsys.readouterr()
    assert first.out.count("--- sample") == 2 and first.out.count("import os") == 2
    assert "tokens/s" in first.err
    assert "KV cache" in first.err and "(1 attention layer)" in first.err and "(7 Mamba layers)" in first.err
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == first.out  # same seed, same samples


def test_mqar_end_to_end(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["--task", "mqar", "--out-dir", str(out), "--max-steps", "2", "--mqar-pairs", "3", "--mqar-queries", "2",
            "--mqar-keys", "6", "--mqar-values", "4", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu",
            *TINY]  # fmt: skip
    assert train_tiny.main(argv) == 0
    assert "recall accuracy" in capsys.readouterr().out
    assert generate.main(["--out-dir", str(out), "--prompt", "k1 v2 k3 v0 k1", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("k1 v2 k3 v0 k1 ")


def test_layouts_train(text_file, tmp_path, capsys):
    for layout in ("attention", "mamba"):
        argv = [
            "--data",
            str(text_file),
            "--out-dir",
            str(tmp_path / layout),
            "--max-steps",
            "1",
            "--layout",
            layout,
        ]
        assert train_tiny.main([*argv, *SMALL, *TINY]) == 0
    out = capsys.readouterr().out
    assert "a:m=1:0" in out and "a:m=0:1" in out


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(text_file, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train_tiny.py", "--data", str(text_file), "--out-dir", str(out), "--max-steps", "100000",
           "--eval-interval", "100000", *SMALL, *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the first validation is printed just before the loop starts
            if line.startswith("step 0: validation"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    resumed = subprocess.run(
        [sys.executable, "train_tiny.py", "--out-dir", str(out), "--resume", "--stop-after", str(step + 2)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {step} of 100000" in resumed.stdout
    assert f"stopped at step {step + 2} of 100000" in resumed.stdout


def test_help_lists_the_flags(capsys):
    for module, flags in (
        (train_tiny, ["--data", "--vocab-size", "--preset", "--layout", "--compile", "--seed", "--max-steps",
                      "--time-budget", "--device", "--fast", "--cuda-graphs", "--weights", "--out-dir", "--resume",
                      "--task"]),
        (generate, ["--out-dir", "--hf", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                    "--seed", "--num-samples", "--device", "--fast"]),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, flag


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--data", "{tmp}/missing.txt"], ["missing.txt", "no such file"]),
        (["--data", "{tmp}/empty.txt"], ["empty"]),
        (["--data", "{tmp}/binaries"], ["no non-empty UTF-8 text"]),
        (["--preset", "huge"], ["unknown preset 'huge'", "tiny"]),
        (["--layout", "diagonal"], ["unknown layout 'diagonal'", "hybrid"]),
        (["--task", "chess"], ["invalid choice"]),
        (["--override", "wings=2"], ["unknown model setting 'wings'"]),
        (["--override", "hidden_size"], ["KEY=VALUE"]),
        (["--resume", "--out-dir", "{tmp}/nothing"], ["no checkpoint", "does not exist"]),
        (["--vocab-size", "10"], ["at least 257"]),
        (["--max-steps", "0"], ["--max-steps must be >= 1"]),
        (["--weights", "fp8"], ["invalid choice", "bf16"]),
        (["--cuda-graphs", "--device", "cpu"], ["--cuda-graphs needs one process on a CUDA GPU", "drop it"]),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
    ],
)
def test_train_bad_input(argv, needles, text_file, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\x00\xff" * 10)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(text_file)]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "out")]
    try:
        rc = train_tiny.main([*SMALL, *TINY, "--max-steps", "1", *argv])  # the flags under test come last
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc not in (0, None)
    one_error_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_resume_of_a_corrupt_checkpoint_fails_cleanly_and_changes_nothing(trained, tmp_path, capsys):
    d = copy_of(trained, tmp_path / "c")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    before = snapshot(d)
    assert train_tiny.main(["--out-dir", str(d), "--resume"]) == 1
    one_error_line(capsys, "model.safetensors", "corrupt")
    assert snapshot(d) == before


def test_a_new_run_does_not_overwrite_a_checkpoint(trained, text_file, capsys):
    before = snapshot(trained)
    assert train_tiny.main(["--data", str(text_file), "--out-dir", str(trained), *SMALL, *TINY]) == 1
    one_error_line(capsys, "already holds a checkpoint", "--resume")
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    "setup, argv, needles",
    [
        (None, ["--out-dir", "{tmp}/nothing", "--prompt", "x"], ["no checkpoint", "does not exist"]),
        ("drop_tokenizer", ["--out-dir", "{ckpt}", "--prompt", "x"], ["tokenizer.json missing"]),
        ("drop_weights", ["--out-dir", "{ckpt}", "--prompt", "x"], ["model.safetensors missing"]),
        ("corrupt_weights", ["--out-dir", "{ckpt}", "--prompt", "x"], ["model.safetensors", "corrupt"]),
        ("corrupt_config", ["--out-dir", "{ckpt}", "--prompt", "x"], ["config.json", "corrupt"]),
        (None, ["--out-dir", "{ckpt}", "--prompt", ""], ["prompt encodes to no tokens"]),
        (None, ["--hf", "{tmp}/nothing", "--prompt", "x"], ["--hf", "does not exist"]),
        (None, ["--out-dir", "{ckpt}", "--prompt", "x", "--top-p", "0"], ["--top-p"]),
        (None, ["--out-dir", "{ckpt}", "--hf", "{ckpt}"], ["not allowed with"]),
    ],
)
def test_generate_bad_input(setup, argv, needles, trained, tmp_path, capsys):
    d = copy_of(trained, tmp_path / "c")
    if setup == "drop_tokenizer":
        (d / "tokenizer.json").unlink()
    elif setup == "drop_weights":
        (d / "model.safetensors").unlink()
    elif setup == "corrupt_weights":
        (d / "model.safetensors").write_bytes(b"\x00" * 64)
    elif setup == "corrupt_config":
        (d / "config.json").write_text("{")
    argv = [a.format(tmp=tmp_path, ckpt=d) for a in argv]
    try:
        rc = generate.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None)
    one_error_line(capsys, *needles)


# --- issue 7: int8 experts, chunked prefill, the memory plan -------------------------------------
def test_generate_prefill_chunk_int8_experts_and_the_memory_plan(trained, capsys):
    argv = ["--out-dir", str(trained), "--prompt", "import os, sys", "--max-new-tokens", "5", "--temperature", "0"]
    assert generate.main(argv) == 0
    whole = capsys.readouterr()
    assert "memory plan" in whole.err and "kv_cache" in whole.err and "activations" in whole.err
    assert generate.main([*argv, "--prefill-chunk", "2"]) == 0  # same greedy tokens, in chunks
    chunked = capsys.readouterr()
    assert chunked.out == whole.out and "prefill chunk 2," in chunked.err
    assert generate.main([*argv, "--int8-experts"]) == 0
    assert "int8 experts" in capsys.readouterr().err


def test_generate_refuses_a_context_that_does_not_fit(trained, capsys):
    argv = ["--out-dir", str(trained), "--prompt", "x", "--max-new-tokens", str(10**10)]
    assert generate.main(argv) == 1
    err = capsys.readouterr().err
    assert "memory plan" in err  # printed first, then one error line naming what would fit
    assert "generate.py: error: this run needs" in err and "the largest context that fits is" in err
    assert "Traceback" not in err


# --- issue 17: many prompts from a JSONL file ----------------------------------------------------
def test_prompts_file_gives_each_prompt_what_it_gets_alone(trained, tmp_path, capsys):
    """Greedy completions of a JSONL file, three slots: each line's completion is what generate.py
    prints for that prompt alone; bad lines get an error line (by number) and the rest still run."""
    prompts = ["import os", "def f(x):", "x", "class A:\n    def", "for i in range(3):"]
    lines = [json.dumps({"prompt": p}) for p in prompts[:3]] + [
        "{not json", json.dumps({"prompt": ""}), json.dumps({"text": "x"}), json.dumps({"prompt": "y" * 300}),
    ] + [json.dumps({"prompt": p}) for p in prompts[3:]]  # fmt: skip
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    greedy = ["--out-dir", str(trained), "--max-new-tokens", "6", "--temperature", "0"]
    argv = [*greedy, "--prompts-file", str(src), "--output", str(dst), "--batch-size", "3", "--context", "64"]
    assert generate.main(argv) == 0
    err = capsys.readouterr().err
    assert "memory plan" in err and "5 prompts (4 lines refused)" in err and "tokens/s" in err
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in got] == list(range(1, 10))
    errors = {r["line"]: r["error"] for r in got if "error" in r}
    assert sorted(errors) == [4, 5, 6, 7]
    assert "line 4 is not JSON" in errors[4] and "empty" in errors[5] and 'no "prompt"' in errors[6]
    assert "context of 64 tokens" in errors[7]
    done = [r for r in got if "completion" in r]
    for prompt, r in zip(prompts, done, strict=True):
        assert generate.main([*greedy, "--prompt", prompt]) == 0
        alone = capsys.readouterr().out
        assert alone == prompt + r["completion"] + "\n"
        assert r["finish_reason"] in ("stop", "length") and r["prompt_tokens"] >= 1
        assert r["completion_tokens"] == 6 or r["finish_reason"] == "stop"


def test_prompts_file_batch_size_auto_and_refusals(trained, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "import os"}) + "\n")
    base = ["--out-dir", str(trained), "--max-new-tokens", "3", "--prompts-file", str(src)]
    assert generate.main([*base, "--batch-size", "auto"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["completion_tokens"] >= 1
    assert "memory plan" in captured.err and "slots of" in captured.err
    assert generate.main([*base, "--batch-size", "65536", "--context", str(10**6)]) == 1
    one_error_line_after_plan = capsys.readouterr().err
    assert "--batch-size 65536" in one_error_line_after_plan and "the most that fit is" in one_error_line_after_plan
    assert generate.main([*base, "--context", str(10**15)]) == 1
    assert "not one slot" in capsys.readouterr().err
    assert generate.main([*base[:-1], str(tmp_path / "missing.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{}\n")
    assert generate.main([*base[:-1], str(tmp_path / "bad.jsonl")]) == 1
    assert "no prompt to run" in capsys.readouterr().err
    for flags, word in ((["--batch-size", "0"], "--batch-size"), (["--batch-size", "many"], "--batch-size"),
                        (["--context", "1"], "--context")):  # fmt: skip
        with pytest.raises(SystemExit):
            generate.main([*base, *flags])
        assert word in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--out-dir", str(trained), "--prompt", "x", "--output", "o.jsonl"])
    assert "goes with --prompts-file" in capsys.readouterr().err


def test_generation_stops_at_any_of_the_end_tokens(trained, tmp_path, capsys):
    """A config.json with a list of end tokens (as Jamba 1.5's): generate.py stops at any of them,
    not only at the first (the list used to be cut to its first entry)."""
    from minijamba.inference.generation import generate as lib_generate
    from minijamba.training import checkpoint

    model, tok = checkpoint.load_model(trained)
    ids = tok.encode("import os").ids
    first = int(lib_generate(model.eval(), torch.tensor([ids]), 1)[0, -1])
    eot = model.config.eos_token_id
    assert isinstance(eot, int) and first != eot  # the list's second entry is what must stop it
    d = copy_of(trained, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["eos_token_id"] = [eot, first]
    (d / "config.json").write_text(json.dumps(config))
    argv = ["--max-new-tokens", "6", "--temperature", "0", "--prompt", "import os"]
    assert generate.main(["--out-dir", str(trained), *argv]) == 0
    assert capsys.readouterr().out != "import os\n"  # without the list it goes on
    assert generate.main(["--out-dir", str(d), *argv]) == 0
    assert capsys.readouterr().out == "import os\n"  # the first new token ends it
