"""minijamba.hf: transformers' Jamba checkpoints load with the same logits and greedy tokens, and save_hf
writes folders transformers loads back; sharded files, both expert layouts, dtypes and the errors.

The parity tests need transformers (a dev extra): it is imported inside them only, and they skip
without it. Everything else runs on minijamba and safetensors alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import MODEL_RTOL, assert_close
from minijamba import Jamba, JambaConfig, generate, load_hf, save_hf
from minijamba import hf_save

RTOL = MODEL_RTOL[torch.float32]  # 1e-4: fp32, relative to the largest logit
NEW_TOKENS = 20


@st.composite
def configs(draw) -> JambaConfig:
    """A tiny random JambaConfig with every size a multiple of 4: any layout, GQA ratio, experts."""
    layers = draw(st.integers(1, 4))
    g = draw(st.sampled_from([1, 2]))  # key/value heads
    q = g * draw(st.sampled_from([1, 2, 4]))  # query heads, a multiple of them
    n = draw(st.sampled_from([1, 2, 4]))  # experts (1: dense MLPs only)
    period = draw(st.integers(1, layers + 1))
    e_period = draw(st.integers(1, layers))
    config = JambaConfig(
        vocab_size=draw(st.sampled_from([32, 48])),
        hidden_size=q * draw(st.sampled_from([4, 8])),  # head size 4 or 8
        intermediate_size=draw(st.sampled_from([4, 8, 12])),
        num_hidden_layers=layers,
        num_attention_heads=q,
        num_key_value_heads=g,
        attn_layer_period=period,
        attn_layer_offset=draw(st.integers(0, period - 1)),
        num_experts=n,
        num_experts_per_tok=draw(st.integers(1, n)),
        expert_layer_period=e_period,
        expert_layer_offset=draw(st.integers(0, e_period - 1)),
        mamba_d_state=draw(st.sampled_from([4, 8])),
        mamba_d_conv=draw(st.integers(2, 4)),
        mamba_expand=draw(st.integers(1, 2)),
        mamba_dt_rank=draw(st.sampled_from([4, "auto"])),
        mamba_conv_bias=draw(st.booleans()),
        mamba_proj_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
    )
    return config.with_layout(draw(st.sampled_from(["hybrid", "attention", "mamba"])))


def hf_model(config: JambaConfig, seed: int):
    """A randomly initialised transformers JambaForCausalLM (fp32, eval, its pure-PyTorch path), with
    every parameter perturbed, so that norms, biases, D and A differ from their initial constants."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.JambaForCausalLM(transformers.JambaConfig(**config.to_hf())).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # generate all NEW_TOKENS, as ours does
    return model


def our_model(config: JambaConfig, seed: int) -> Jamba:
    torch.manual_seed(seed)
    model = Jamba(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_greedy(ours: torch.Tensor, theirs, prompt_len: int) -> None:
    """Our greedy tokens equal transformers', up to a genuine tie: if they part, transformers' top two
    logits at that step must be within the tolerance (then either pick is right, and we stop there)."""
    for row in range(ours.shape[0]):
        for step in range(NEW_TOKENS):
            a, b = ours[row, prompt_len + step], theirs.sequences[row, prompt_len + step]
            if a != b:
                top2 = theirs.scores[step][row].topk(2).values
                scale = theirs.scores[step][row].abs().max()
                assert top2[0] - top2[1] <= RTOL * scale, f"row {row}: greedy tokens part at step {step}"
                break


def write_folder(folder: Path, config: JambaConfig, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def assert_same_parameters(a: Jamba, b: Jamba) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


# ------------------------------------------------------------------------------------------------
# parity with transformers
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**31 - 1))
def test_transformers_parity_both_layouts_and_back(tmp_path_factory, config, seed):
    """save_pretrained -> load_hf: same logits and greedy tokens; a fused state_dict -> load_hf: the
    same parameters; save_hf -> from_pretrained: no missing/unexpected keys and the same logits."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("parity")
    theirs = hf_model(config, seed)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))

    theirs.save_pretrained(tmp / "per_expert")  # the published layout: experts.{j}.gate_proj.weight, ...
    with safe_open(tmp / "per_expert" / "model.safetensors", "pt") as f:
        assert not any(k.endswith("gate_up_proj") for k in f.keys())
    ours = load_hf(tmp / "per_expert")
    assert ours.config.layer_types == config.layer_types and ours.config.moe_layers == config.moe_layers
    with torch.no_grad():
        reference = theirs(ids, use_cache=False).logits
        assert_close(ours(ids), reference, RTOL, "logits after load_hf")
    if config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight

    # transformers 5.23's cache needs an attention layer to count tokens: without one, its generate
    # recomputes the whole sequence each step (use_cache=False); ours still decodes from its state.
    cache = "attention" in config.layer_types
    out = theirs.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        use_cache=cache, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    assert_same_greedy(generate(ours, ids, NEW_TOKENS), out, ids.shape[1])

    # The fused layout, as transformers 5 holds it in memory (a tied head saved too: it is ignored).
    # Equal parameters also pin the order inside gate_up_proj (gate first) to transformers' own.
    state = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    if any(config.moe_layers):
        assert any(k.endswith("experts.gate_up_proj") for k in state)
    fused = load_hf(write_folder(tmp / "fused", config, state))
    assert_same_parameters(fused, ours)

    path = save_hf(ours, tmp / "ours")
    back, info = transformers.JambaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = back.float().eval()(ids, use_cache=False).logits
        assert_close(logits, reference, 1e-6, "logits after save_hf -> from_pretrained")


def test_sharded_transformers_checkpoint_loads(tmp_path):
    """A checkpoint transformers shards (index + shards, experts split across files) loads whole."""
    transformers = pytest.importorskip("transformers")
    config = JambaConfig.from_preset(
        "tiny", vocab_size=64, hidden_size=32, intermediate_size=16, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    theirs = hf_model(config, 0)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = load_hf(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = theirs(ids, use_cache=False).logits
        assert_close(ours(ids), reference, RTOL, "sharded load")
    # ... and a sharded save_hf loads back in transformers.
    save_hf(ours, tmp_path / "ours", max_shard_size="30KB")
    back, info = transformers.JambaForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert_close(back.eval()(ids, use_cache=False).logits, reference, 1e-6, "sharded save_hf")


# ------------------------------------------------------------------------------------------------
# round trips and sharding without transformers
SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=4,
             num_experts_per_tok=2, mamba_d_state=4, mamba_dt_rank=4)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_sharded(tmp_path, monkeypatch, tied):
    """save_hf shards with an index, the experts straddle shards, and load_hf reads them back exactly,
    one shard open at a time and never through torch.load."""
    model = our_model(JambaConfig(**SMALL, tie_word_embeddings=tied), 1)
    save_hf(model, tmp_path / "ckpt", max_shard_size=3000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "ckpt" / s).is_file() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    expert_files = {f for k, f in index["weight_map"].items() if "layers.1.feed_forward.experts." in k}
    assert len(expert_files) > 1  # one fused parameter assembled from several files

    open_now, most = 0, 0

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)
            return self.f.__enter__()

        def __exit__(self, *exc):
            nonlocal open_now
            open_now -= 1
            return self.f.__exit__(*exc)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be used"))
    loaded = load_hf(tmp_path / "ckpt")
    assert most == 1
    assert_same_parameters(loaded, model)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_save_hf_single_file_and_config(tmp_path):
    model = our_model(JambaConfig(**SMALL), 2)
    save_hf(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert JambaConfig.from_hf(hf) == model.config and hf["model_type"] == "jamba"
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    gate_up = model.layers[1].feed_forward.experts.gate_up_proj
    f = model.config.intermediate_size
    assert torch.equal(tensors["model.layers.1.feed_forward.experts.2.gate_proj.weight"], gate_up[2, :f])
    assert torch.equal(tensors["model.layers.1.feed_forward.experts.2.up_proj.weight"], gate_up[2, f:])
    assert not any("gate_up_proj" in k for k in tensors)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_load_in_bfloat16_keeps_scan_parameters_in_float32(tmp_path):
    model = our_model(JambaConfig(**SMALL), 3)
    save_hf(model, tmp_path / "ckpt")
    loaded = load_hf(tmp_path / "ckpt", dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        fp32 = name.endswith(("A_log", ".D", "dt_proj.bias"))
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
        assert torch.equal(p, model.get_parameter(name).to(p.dtype)), name
    # dtype=None: the dtype the checkpoint stores.
    save_hf(loaded, tmp_path / "bf16")
    again = load_hf(tmp_path / "bf16")
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    assert again.layers[0].mamba.A_log.dtype == torch.float32
    assert_same_parameters(again, loaded)


def test_save_hf_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    """A save that fails half way leaves the old folder untouched; a good one replaces the weights and
    config (stale shards included) and keeps the files that are not its own."""
    folder = tmp_path / "ckpt"
    old = our_model(JambaConfig(**SMALL), 4)
    save_hf(old, folder, max_shard_size=3000)
    (folder / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    new = our_model(JambaConfig(**SMALL), 5)
    with pytest.raises(OSError, match="disk full"):
        save_hf(new, folder, max_shard_size=3000)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left

    save_hf(new, folder)  # one file now: the old shards and index must go
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_same_parameters(load_hf(folder), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_max_shard_size_parsing():
    assert hf_save._parse_size("5GB") == 5 * 10**9
    assert hf_save._parse_size("2GiB") == 2 * 2**30
    assert hf_save._parse_size("500kb") == 500_000
    assert hf_save._parse_size(1234) == 1234
    for bad in ("five GB", 0, -3, "0MB", "12 XB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            hf_save._parse_size(bad)


# ------------------------------------------------------------------------------------------------
# clear errors
@pytest.fixture()
def checkpoint(tmp_path):
    """A small saved model: (folder, config, its tensors by key)."""
    config = JambaConfig(**SMALL)
    save_hf(our_model(config, 6), tmp_path / "ckpt")
    return tmp_path / "ckpt", config, load_file(tmp_path / "ckpt" / "model.safetensors")


def test_missing_files_name_the_path(tmp_path, checkpoint):
    folder, config, tensors = checkpoint
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.config\.json"):
        load_hf(empty)
    (empty / "config.json").write_text(json.dumps(config.to_hf()))
    with pytest.raises(FileNotFoundError, match=r"no weights in .*empty.*model\.safetensors"):
        load_hf(empty)
    index = {"weight_map": {"a": "model-1.safetensors"}}
    (empty / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-1\.safetensors"):
        load_hf(empty)


def test_missing_tensors_are_listed(tmp_path, checkpoint):
    folder, config, tensors = checkpoint
    drop = ["model.layers.1.feed_forward.experts.3.up_proj.weight", "model.layers.0.mamba.A_log",
            "lm_head.weight"]  # fmt: skip
    write_folder(tmp_path / "bad", config, {k: v for k, v in tensors.items() if k not in drop})
    with pytest.raises(ValueError, match="3 missing") as err:
        load_hf(tmp_path / "bad")
    for key in drop:
        assert key in str(err.value)
    # Many missing: the first few and the count.
    keep = {k: v for k, v in tensors.items() if "layers" not in k}
    write_folder(tmp_path / "bad2", config, keep)
    with pytest.raises(ValueError, match=r"missing: .* and \d+ more"):
        load_hf(tmp_path / "bad2")


def test_unexpected_and_misshapen_tensors_are_listed(tmp_path, checkpoint):
    folder, config, tensors = checkpoint
    extra = dict(tensors)
    extra["model.layers.0.mamba.surprise"] = torch.zeros(3)
    extra["model.layers.1.feed_forward.experts.4.gate_proj.weight"] = torch.zeros(8, 16)  # n = 4
    extra["model.layers.0.feed_forward.experts.0.gate_proj.weight"] = torch.zeros(8, 16)  # a dense layer
    write_folder(tmp_path / "extra", config, extra)
    with pytest.raises(ValueError, match="3 unexpected") as err:
        load_hf(tmp_path / "extra")
    for key in ("mamba.surprise", "experts.4.gate_proj", "layers.0.feed_forward.experts.0"):
        assert key in str(err.value)
    wrong = dict(tensors)
    wrong["model.layers.1.feed_forward.experts.0.down_proj.weight"] = torch.zeros(16, 9)
    write_folder(tmp_path / "wrong", config, wrong)
    expected = r"wrong shape: .*experts\.0\.down_proj\.weight \(16, 9\) \(expected \(16, 8\)\)"
    with pytest.raises(ValueError, match=expected) as err:
        load_hf(tmp_path / "wrong")
    assert "missing" not in str(err.value)


def test_bad_arguments(checkpoint):
    folder, _, _ = checkpoint
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported: choose one of None, 'int8'"):
        load_hf(folder, quantize="int4")
    with pytest.raises(ValueError, match="dtype"):
        load_hf(folder, dtype=torch.int8)
    with torch.device("meta"):
        meta = Jamba(JambaConfig(**SMALL))
    with pytest.raises(ValueError, match="meta"):
        save_hf(meta, folder.parent / "meta")
    (folder.parent / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        save_hf(load_hf(folder), folder.parent / "file")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**31 - 1), coef=st.sampled_from([0.0, 0.3, 1.0]), pad=st.integers(0, 3))
def test_training_loss_equals_transformers_with_its_balancing_loss(tmp_path_factory, config, seed, coef, pad):
    """Our training loss (cross-entropy + coef * balancing loss) equals transformers'
    JambaForCausalLM(..., labels, output_router_logits=True): the balancing loss pooled over the MoE
    layers, times n (K at uniform routing), the padding excluded by the attention mask."""
    pytest.importorskip("transformers")
    config.router_aux_loss_coef = coef
    theirs = hf_model(config, seed)
    theirs.config.router_aux_loss_coef, theirs.router_aux_loss_coef = coef, coef
    tmp = tmp_path_factory.mktemp("loss")
    theirs.save_pretrained(tmp)
    ours = load_hf(tmp)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # row 1 left-padded
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # nothing predicted from padding
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)  # ours: already shifted
    moe = any(config.moe_layers)  # (transformers' loss function fails on an empty tuple of router logits)
    if pad:  # transformers' pure-PyTorch Mamba path lets left padding reach the first real tokens for
        # some configs (found: one Mamba layer, d_conv 3): its padded row then differs from the same
        # row alone, and there is no single truth to compare with; ours equals the row alone always
        # (tests/test_model.py). Such examples are left out here.
        with torch.no_grad():
            padded = theirs(ids[1:], attention_mask=mask[1:], use_cache=False).logits[0, pad:]
            alone = theirs(ids[1:, pad:], use_cache=False).logits[0]
        assume(torch.allclose(padded, alone, rtol=0, atol=1e-5 * max(1.0, float(alone.abs().max()))))
    out = theirs(ids, attention_mask=mask, labels=labels, output_router_logits=moe, use_cache=False)
    _, loss = ours(ids, targets=targets, attention_mask=mask)
    assert_close(loss, out.loss, RTOL, f"total loss at coef {coef}, {pad} padded")
    if moe and coef > 0:  # the balancing part alone, padding excluded by the mask on both sides
        ours.config.router_aux_loss_coef = 0.0
        _, ce = ours(ids, targets=targets, attention_mask=mask)
        assert_close((loss - ce) / coef, out.aux_loss, RTOL, f"balancing loss, {pad} padded")
