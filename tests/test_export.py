"""python -m minijamba.export: a train_tiny.py checkpoint becomes a folder that transformers'
AutoModelForCausalLM and AutoTokenizer load, and transformers continues a prompt with the same greedy
text as generate.py; the folder then reads back through our own --hf path too."""

from __future__ import annotations

import json

import pytest
import torch

import generate
from minijamba.export import export, main

transformers = pytest.importorskip("transformers")


def test_transformers_continues_with_generate_py_greedy_text(good_checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([str(good_checkpoint), str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}  # fmt: skip
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    capsys.readouterr()
    for prompt in ["def ", "import os\n"]:
        argv = ["--out-dir", str(good_checkpoint), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]
        assert generate.main([*argv, "--device", "cpu"]) == 0
        ours = capsys.readouterr().out
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=12, do_sample=False)
        theirs = prompt + tok.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)
        assert ours == theirs + "\n", prompt
    # and back: the exported folder through generate.py --hf gives the same text again
    assert generate.main(["--hf", str(out), "--prompt", "def ", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "generation_config.json: temperature 0.0" in captured.err
    first = generate.main(["--out-dir", str(good_checkpoint), "--prompt", "def ", "--temperature", "0",
                           "--max-new-tokens", "12", "--device", "cpu"])  # fmt: skip
    assert first == 0 and capsys.readouterr().out == captured.out
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["eos_token_id"] == model.config.eos_token_id


def test_export_refuses_what_it_cannot_write(good_checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "hf")]) == 1
    assert "is not a folder: give the --out-dir of a train_tiny.py run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the run's own folder"):
        export(good_checkpoint, good_checkpoint)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main([str(good_checkpoint), str(other)]) == 1
    assert "is not a Jamba's config.json" in capsys.readouterr().err
    assert json.loads((other / "config.json").read_text()) == {"model_type": "llama"}  # left as it was
