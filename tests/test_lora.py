"""LoRA over a frozen Jamba (minijamba.model.lora, minijamba.hf_adapter, train_tiny.py --hf): the
adapter's math, its fast twins, the backward through int8 experts, PEFT's file format both ways
against peft on transformers' JambaForCausalLM, the CLI end to end on a folder this test makes,
and the errors at the entry points."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import train_tiny
from helpers import assert_close
from minijamba import JambaConfig, load_hf
from minijamba.hf_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from minijamba.inference.quant import Int8Experts
from minijamba.kernels import time_last
from minijamba.model import mamba
from minijamba.model.lora import LoRALinear, add_lora, lora_modules, lora_parameters, merge_lora_
from minijamba.model.moe import Experts
from minijamba.training.distributed import checkpoint_layers

TEXT = ["the cat sat on the mat and the dog ran in the park", "hello there, how are you today?"] * 30
SPECIAL = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]
CONFIG = dict(hidden_size=16, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
              attn_layer_period=2, attn_layer_offset=1, num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
              expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=4)  # fmt: skip
TARGETS = ["in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _perturb_adapters(model, seed=1, std=0.2):
    torch.manual_seed(seed)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=std)


# ------------------------------------------------------------------------------------------------
# the adapter's math
@settings(max_examples=20, deadline=None)
@given(i=st.integers(1, 12), o=st.integers(1, 12), r=st.integers(1, 6), alpha=st.floats(0.5, 32),
       bias=st.booleans(), rslora=st.booleans(), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_lora_linear_starts_as_its_base_equals_its_merged_weight_and_trains_only_a_and_b(i, o, r, alpha, bias, rslora, seed):
    torch.manual_seed(seed)
    base = nn.Linear(i, o, bias=bias).double()
    x = torch.randn(3, 5, i, dtype=torch.float64)
    want = base(x)
    lora = LoRALinear.wrap(base, r, alpha, rslora=rslora).double()
    assert torch.equal(lora(x), want)  # B = 0: a fresh adapter changes nothing
    nn.init.normal_(lora.lora_B.weight)
    scale = alpha / r**0.5 if rslora else alpha / r
    W = base.weight + scale * lora.lora_B.weight @ lora.lora_A.weight
    assert_close(lora(x), nn.functional.linear(x, W, base.bias), 1e-12, "W + s B A")
    assert_close(lora.merged()(x), lora(x), 1e-12, "merged")
    lora(x).square().sum().backward()
    assert base.weight.grad is None and (not bias or base.bias.grad is None)
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_the_time_last_fast_twins_add_the_adapter_as_the_reference_does(bias):
    torch.manual_seed(0)
    lin = LoRALinear.wrap(nn.Linear(6, 10, bias=bias), 3, 6.0)
    nn.init.normal_(lin.lora_B.weight)
    for l in (1, 7):  # noqa: E741 (l is the sequence length)
        x = torch.randn(2, l, 6, requires_grad=True)
        for name, ref, fast, inp in (("to", mamba.to_time_last, time_last.to_time_last, x),
                                     ("from", mamba.from_time_last, time_last.from_time_last, x.detach().transpose(1, 2).requires_grad_())):  # fmt: skip
            want, got = ref(lin, inp), fast(lin, inp)
            assert_close(got, want, 1e-5, f"{name}_time_last l={l}")
            gw = torch.autograd.grad(want.square().sum(), [inp, lin.lora_A.weight, lin.lora_B.weight])
            gg = torch.autograd.grad(got.square().sum(), [inp, lin.lora_A.weight, lin.lora_B.weight])
            for a, b in zip(gg, gw):
                assert_close(a, b, 1e-5, f"{name}_time_last gradients l={l}")
    y = time_last.to_time_last(lin, torch.randn(2, 7, 6))
    assert y.is_contiguous()  # the update is added in the time-last layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_experts_backward_gives_the_input_gradient_of_the_dequantized_experts(dtype):
    config = JambaConfig(**{**CONFIG, "num_experts": 4, "hidden_size": 32, "intermediate_size": 16})
    torch.manual_seed(0)
    int8 = Int8Experts(config)
    int8.reset_parameters(std=0.2, out_std=0.2)
    float_experts = int8.dequantize()  # the same weights in float32
    x = torch.randn(24, 32, dtype=dtype, requires_grad=True)
    weights = torch.rand(24, 2, dtype=dtype)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(24)])
    y = int8(x, weights, idx)
    gx = torch.autograd.grad(y.float().square().sum(), x)[0]
    x2 = x.detach().float().requires_grad_()
    y2 = float_experts(x2, weights.float(), idx)
    gx2 = torch.autograd.grad(y2.square().sum(), x2)[0]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(y.float(), y2, tol, "forward")
    assert_close(gx.float(), gx2, tol, "input gradient")
    assert all(not p.requires_grad and p.grad is None for p in int8.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu_int8_experts_train_through_the_triton_kernel_and_lora_on_the_fast_backend():
    from minijamba import Jamba
    from minijamba.inference.quant import int8_kernel, quantize_model_

    config = JambaConfig(**{**CONFIG, "num_experts": 4, "hidden_size": 32, "intermediate_size": 16})
    torch.manual_seed(0)
    int8 = Int8Experts(config, device="cuda")
    int8.reset_parameters(std=0.2, out_std=0.2)
    x = torch.randn(24, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert int8_kernel(x, 4) == "triton"
    weights, idx = torch.rand(24, 2, device="cuda"), torch.stack([torch.randperm(4)[:2] for _ in range(24)]).cuda()
    gx = torch.autograd.grad(int8(x, weights.bfloat16(), idx).float().square().sum(), x)[0]
    x2 = x.detach().float().requires_grad_()
    gx2 = torch.autograd.grad(int8.dequantize()(x2, weights, idx).square().sum(), x2)[0]
    assert_close(gx.float(), gx2, 3e-2, "input gradient through the Triton int8 kernel")

    ids = torch.randint(0, 32, (2, 33), device="cuda")
    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = quantize_model_(Jamba(JambaConfig(vocab_size=32, **CONFIG, scan_backend=backend)).cuda())
        add_lora(model, 2, 4.0, targets=TARGETS)
        _perturb_adapters(model)
        model(ids, targets=ids)[1].backward()
        grads[backend] = [p.grad for p in lora_parameters(model)]
    for a, b in zip(grads["triton"], grads["reference"]):
        assert_close(a, b, 1e-3, "LoRA gradients, triton against reference")


def test_lora_with_activation_checkpointing_gives_the_same_gradients():
    config = JambaConfig(vocab_size=32, **CONFIG)
    ids = torch.randint(0, 32, (2, 9))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        from minijamba import Jamba

        model = Jamba(config)
        add_lora(model, 2, 4.0, targets=TARGETS)
        _perturb_adapters(model)
        if ckpt:
            checkpoint_layers(model)
        model(ids, targets=ids)[1].backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    for a, b in zip(*grads):
        assert_close(a, b, 1e-5, "LoRA gradients with activation checkpointing")


# ------------------------------------------------------------------------------------------------
# PEFT's format, both ways
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-shaped folder: a random tiny JambaForCausalLM saved by transformers, and a word-level
    tokenizer saved by PreTrainedTokenizerFast (eos <|endoftext|>)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers.logging.set_verbosity_error()
    words = sorted({w for t in TEXT for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIAL, "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    path = tmp_path_factory.mktemp("release")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|pad|>")  # fmt: skip
    fast.save_pretrained(path)
    config = transformers.JambaConfig(vocab_size=tok.get_vocab_size(), use_mamba_kernels=False, **CONFIG)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    data = path.parent / "data.txt"
    data.write_text("\n".join(TEXT))
    return path


def _peft_logits(release, adapter, ids):
    import transformers

    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(transformers.JambaForCausalLM.from_pretrained(release), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(r=st.integers(1, 4), targets=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True),
       rslora=st.booleans())  # fmt: skip
def test_our_adapter_gives_peft_on_transformers_the_same_logits(release, tmp_path_factory, r, targets, rslora):
    ours = load_hf(release)
    add_lora(ours, r, 2.0 * r + 1, targets=targets, rslora=rslora)
    _perturb_adapters(ours)
    path = save_adapter(ours, tmp_path_factory.mktemp("adapter"), targets, base=str(release))
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == r and cfg["target_modules"] == sorted(targets)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        mine = ours.eval()(ids)
    assert_close(mine, _peft_logits(release, path, ids), 1e-5, "our adapter under peft")
    again = load_hf(release, adapter=path)
    with torch.no_grad():
        assert_close(again(ids), mine, 1e-6, "load_hf(adapter=)")
        assert_close(merge_lora_(again)(ids), mine, 1e-5, "merged")
    assert not lora_modules(again)


def test_a_peft_made_adapter_loads_with_the_same_logits(release, tmp_path):
    """peft's own adapter, all-linear with dropout: dt_proj is in it, and (as in transformers' Jamba,
    which multiplies by dt_proj's weight directly) has no effect."""
    import transformers

    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = transformers.JambaForCausalLM.from_pretrained(release)
    made = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.1, target_modules="all-linear",
                                                     init_lora_weights=False))  # fmt: skip
    made.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    with torch.no_grad():
        want = made.eval()(input_ids=ids, use_cache=False).logits
        got = load_hf(release, adapter=tmp_path / "peft")(ids)
    assert_close(got, want, 1e-5, "peft's adapter in load_hf")


# ------------------------------------------------------------------------------------------------
# the CLI
def _tree_hash(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def _run(*argv):
    return train_tiny.main([str(a) for a in argv])


def test_train_tiny_hf_trains_adapters_only_writes_peft_format_and_merges(release, tmp_path, capsys):
    before = _tree_hash(release)
    data = release.parent / "data.txt"
    common = ("--hf", release, "--lora-rank", 4, "--data", data, "--seq-len", 16, "--batch-size", 2,
              "--max-steps", 12, "--lr", 3e-2, "--warmup-steps", 2, "--device", "cpu")  # fmt: skip
    assert _run(*common, "--out-dir", tmp_path / "run", "--merge", "--checkpoint-activations") == 0
    assert _tree_hash(release) == before  # the base folder is never written
    out = capsys.readouterr().out
    assert "adapter:" in out and "merged checkpoint:" in out
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()
    history = json.loads((tmp_path / "run" / "finetune.json").read_text())["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learned
    tuned = load_hf(release, adapter=adapter)
    ids = torch.randint(0, tuned.config.vocab_size, (2, 12))
    with torch.no_grad():
        mine, plain = tuned(ids), load_hf(release)(ids)
        assert (mine - plain).abs().max() > 1e-3  # the adapter moved the logits
        assert_close(mine, _peft_logits(release, adapter, ids), 1e-5, "the CLI's adapter under peft")
        assert_close(load_hf(tmp_path / "run" / "merged")(ids), mine, 1e-5, "--merge")
    assert (tmp_path / "run" / "merged" / "tokenizer.json").is_file()

    # int8 experts: trains through them (their input gradient), the adapter alone written
    assert _run(*common, "--out-dir", tmp_path / "int8", "--int8-experts", "--max-steps", 3) == 0
    assert (tmp_path / "int8" / "adapter" / ADAPTER_WEIGHTS).is_file()


# ------------------------------------------------------------------------------------------------
# bad input, at the entry points
def test_bad_input_is_refused_where_it_enters(release, tmp_path, capsys):
    from minijamba import Jamba

    model = load_hf(release)
    with pytest.raises(ValueError, match=r"'mixer' does not exist.*in_proj.*q_proj"):
        add_lora(model, 2, targets=["in_proj", "mixer"])
    with pytest.raises(ValueError, match="dt_proj"):
        add_lora(model, 2, targets=["dt_proj"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, 0)
    with pytest.raises(ValueError, match="Linear layers only"):
        add_lora(model, 2, targets=["experts"])

    other = Jamba(JambaConfig(vocab_size=40, **{**CONFIG, "hidden_size": 24, "num_attention_heads": 2}))
    add_lora(other, 2, targets=["in_proj"])
    save_adapter(other, tmp_path / "other", ["in_proj"])
    with pytest.raises(ValueError, match=r"does not fit this model.*wrong shape"):
        load_hf(release, adapter=tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_hf(release, adapter=tmp_path)

    data = release.parent / "data.txt"
    cases = [
        (("--hf", release, "--lora-rank", 2, "--data", data, "--out-dir", tmp_path / "m", "--merge", "--int8-experts"),
         "--merge with --int8-experts"),
        (("--hf", release, "--lora-rank", 2, "--data", data, "--out-dir", tmp_path / "x", "--lora-targets", "in_proj,nope"),
         "'nope' does not exist"),
        (("--hf", release, "--lora-rank", 2, "--data", data, "--out-dir", release / "sub"), "inside the base folder"),
        (("--hf", release, "--lora-rank", 2, "--data", data, "--out-dir", tmp_path / "p", "--preset", "tiny"),
         "does not apply to a LoRA run"),
        (("--lora-rank", 2, "--out-dir", tmp_path / "q"), "needs --hf"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert _run(*argv) != 0
        assert needle in capsys.readouterr().err, needle

    # a train_tiny.py checkpoint is not a released folder: say what to use
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    from minijamba.training import checkpoint

    (run / checkpoint.MANIFEST).write_text("{}")
    assert _run("--hf", run, "--lora-rank", 2, "--data", data, "--out-dir", tmp_path / "t") == 1
    err = capsys.readouterr().err
    assert "train_tiny.py checkpoint" in err and "minijamba.export" in err
