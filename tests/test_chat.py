"""Folders as published, and chat (minijamba.hf_tokenizer, minijamba.inference.chat, generate.py
--chat): on a folder this test makes as a release is made (a random tiny JambaForCausalLM saved by
transformers, a PreTrainedTokenizerFast built with `tokenizers` that puts a BOS first, a ChatML
template, two end tokens, a generation_config.json), our tokens, rendered chats and greedy replies
equal transformers'; each turn prefills only its own tokens; bad folders are refused naming the file."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import generate
from minijamba import load_hf
from minijamba.hf_tokenizer import TemplateError, generation_defaults, load_tokenizer
from minijamba.inference.chat import Chat

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = ["the cat sat on the mat and the dog ran in the park", "hello there, how are you today?"] * 40
NEW = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A release-shaped folder: weights and config by transformers, tokenizer files by transformers'
    PreTrainedTokenizerFast over a `tokenizers` BPE, end tokens [<|endoftext|>, <|im_end|>]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    # Word-level, so that every reply decodes to text that encodes back to the same tokens (a byte-level
    # BPE's random replies are often not UTF-8): then the state can be kept, as with a trained model.
    words = sorted({w for t in TEXT for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIAL, "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    bos = tok.token_to_id("<|startoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", bos)])
    path = tmp_path_factory.mktemp("release")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                                                pad_token="<|pad|>")  # fmt: skip
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    ends = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    config = transformers.JambaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=2, num_experts_per_tok=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False,
        bos_token_id=bos, eos_token_id=ends, pad_token_id=tok.token_to_id("<|pad|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # spread the logits: no near-ties for greedy to split on
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=ends, do_sample=False)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def theirs(folder):
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def their_reply(theirs, messages, budget=NEW) -> list[int]:
    model, tok = theirs
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = model.generate(torch.tensor([list(ids)]), max_new_tokens=budget, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_tokens_special_tokens_and_defaults_as_transformers_reads_them(folder, theirs):
    tok, (_, hf) = load_tokenizer(folder), theirs
    for text in ["hello there", "the cat sat on the mat", "  odd   spacing\n", "<|im_start|>user hi<|im_end|>"]:
        assert tok.encode(text).ids == hf(text)["input_ids"]  # the BOS first, from tokenizer.json
        assert tok.encode(text).ids[0] == tok.special_id("bos_token")
    assert tok.special == {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert tok.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    defaults = generation_defaults(folder)
    assert defaults.found and defaults.temperature == 0.0
    assert defaults.eos_token_id == [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]


def test_greedy_replies_equal_transformers_turn_after_turn_keeping_the_state(folder, theirs):
    model, tok = load_hf(folder, dtype=torch.float32), load_tokenizer(folder)
    ends = generation_defaults(folder).eos_token_id
    chat = Chat(model, tok, ends, system="be brief", capacity=256, max_new_tokens=NEW)
    history = [{"role": "system", "content": "be brief"}]
    specials = {tok.token_to_id(t) for t in SPECIAL}
    kept, clean = [], False  # clean: the last reply decodes to text that encodes back to its tokens
    for i, message in enumerate(["hello there", "how are you today?", "the cat sat", "hello", "the dog ran"]):
        held = list(chat.held)
        turn = chat.reply(message)
        history.append({"role": "user", "content": message})
        assert turn.tokens == their_reply(theirs, history), f"turn {i + 1}"
        # The state is kept exactly when the last reply round-trips (a special token inside it, which the
        # text drops, makes the template render it differently): then only this turn's tokens run.
        assert turn.kept_state == clean, f"turn {i + 1}"
        full = tok.encode_chat(history)
        assert turn.prefilled == (len(full) - len(held) if clean else len(full))
        assert turn.state_bytes == chat.state.nbytes()["total"] and turn.context_tokens == len(chat.held)
        history.append({"role": "assistant", "content": turn.text})
        body = turn.tokens[:-1] if turn.tokens[-1] in ends else turn.tokens
        clean = not specials & set(body)
        kept.append(turn.kept_state)
    assert any(kept[1:]), "no turn kept the state: the test's replies all held special tokens"


def test_generate_py_chat_one_prompt_and_a_session_over_stdin(folder, theirs, capsys, monkeypatch):
    argv = ["--hf", str(folder), "--chat", "--max-new-tokens", str(NEW), "--device", "cpu"]
    assert generate.main([*argv, "--prompt", "hello there", "--system", "be brief"]) == 0
    out, err = capsys.readouterr()
    _, hf = theirs
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    expected = hf.decode([t for t in their_reply(theirs, history)], skip_special_tokens=True)
    assert out == expected + "\n"
    assert "generation_config.json: temperature 0.0" in err and "prefilled" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nthe cat sat\n"))
    assert generate.main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) >= 2 and err.count("[turn ") == 2
    assert "state kept from the last turn" in err and "all-attention model's KV cache" in err


def test_bad_folders_name_the_file(folder, tmp_path, capsys):
    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(folder, d)
        edit(d)
        return d

    cases = {
        "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json"),
        "corrupt config": (lambda d: (d / "tokenizer_config.json").write_text("[1,"), "tokenizer_config.json"),
        "bad template": (lambda d: _set_template(d, "{% for m in messages %}{{ m.content }"), "not valid Jinja"),
        "unknown special": (lambda d: _set_config(d, bos_token="<|nope|>"), "not in"),
        "small vocab": (lambda d: _set_model_config(d, vocab_size=10), "token ids but the model's vocabulary (config.json vocab_size) is 10"),
    }
    for name, (edit, needle) in cases.items():
        d = broken(name.replace(" ", "_"), edit)
        assert generate.main(["--hf", str(d), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("generate.py: error: --hf: ") and needle in err, (name, err)
    # a template that parses but does not render: refused at the chat, naming the file
    d = broken("raises", lambda d: _set_template(d, "{{ raise_exception('no system messages') }}"))
    assert generate.main(["--hf", str(d), "--chat", "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "does not render" in err and "no system messages" in err and "tokenizer_config.json" in err
    with pytest.raises(TemplateError, match="no chat template"):
        _no_template(folder, tmp_path).render_chat([{"role": "user", "content": "hi"}])


def _set_config(d, **fields):
    path = d / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _set_template(d, template):
    (d / "chat_template.jinja").unlink(missing_ok=True)
    _set_config(d, chat_template=template)


def _set_model_config(d, **fields):
    path = d / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _no_template(folder, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(folder, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    path = d / "tokenizer_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "chat_template"}))
    return load_tokenizer(d)
