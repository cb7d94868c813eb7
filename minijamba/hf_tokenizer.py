"""A published checkpoint folder's text side: its tokenizer, special tokens, chat template and
generation defaults, read as transformers reads them, offline, with nothing but `tokenizers` and
`jinja2`.

The files, all optional but the first:

    tokenizer.json            the `tokenizers` library's file: vocabulary, merges, and the post-processor
                              that adds a BOS token (transformers 5 encodes with exactly this, so its
                              `tokenizer(text)` and ours give the same ids: the BOS Jamba 1.5 puts first
                              comes from here, and tokenizer_config.json's add_bos_token is not read,
                              as transformers 5 does not read it for these folders)
    tokenizer_config.json     the special tokens by name (bos_token, eos_token, pad_token, unk_token:
                              a string or {"content": ...}) and the chat template ("chat_template": one
                              Jinja template, or a list of {"name", "template"}, "default" taken)
    special_tokens_map.json   special tokens again (older folders keep them only here)
    chat_template.jinja       the chat template in its own file (transformers 4.43 and later)
    generation_config.json    the defaults `model.generate` starts from: do_sample, temperature,
                              top_k, top_p, max_new_tokens, eos_token_id (one id or a list)

A chat template renders a list of messages ({"role", "content"}) to the text of a prompt, as
transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` does: a
sandboxed Jinja environment with trim_blocks and lstrip_blocks, the loop controls extension,
`raise_exception` and `strftime_now`, and the special tokens' strings as variables. The text is then
encoded without adding special tokens (the template writes them), again as transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from minijamba.checks import read_json_object

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


class TemplateError(ValueError):
    """A chat template that does not parse or does not render, named with the file it came from."""


@dataclass
class FolderTokenizer:
    """tokenizer.json with what the folder says around it. Encodes, decodes and renders chats; other
    attributes (`token_to_id`, `get_vocab_size`, `decoder`, ...) are the `tokenizers` object's."""

    tokenizer: object  # tokenizers.Tokenizer
    special: dict[str, str] = field(default_factory=dict)  # "bos_token" -> "<|startoftext|>", ...
    chat_template: str | None = None
    source: str = ""  # the file the template came from, for error messages

    def __getattr__(self, name):
        return getattr(self.__dict__["tokenizer"], name)

    def encode(self, text: str, add_special_tokens: bool = True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_id(self, name: str) -> int | None:
        """The id of a special token by its role ("eos_token"), or None if the folder names none."""
        token = self.special.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`, as transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise TemplateError(
                "this folder has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja): use --prompt without --chat for plain text"
            )
        template = _compile(self.chat_template, self.source)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **self.special)  # fmt: skip
        except Exception as e:  # jinja2 raises TemplateError subclasses, a template's own code anything
            raise TemplateError(f"the chat template in {self.source} does not render: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of the rendered chat (the template writes the special tokens itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def _compile(source: str, where: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template in {where} is not valid Jinja (line {e.lineno}: {e.message})") from None


def _token_string(value, path: Path, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {name} must be a token string or {{\"content\": ...}}, got {value!r}")


def load_tokenizer(folder) -> FolderTokenizer:
    """The folder's tokenizer. FileNotFoundError without tokenizer.json; ValueError naming the file
    for a corrupt one, a special token the vocabulary lacks, or a chat template that does not parse."""
    from minijamba.training.tokenizer import load

    folder = Path(folder)
    tok = load(folder / TOKENIZER)  # FileNotFoundError / ValueError naming the file
    special: dict[str, str] = {}
    template, source = None, ""
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins, as in transformers
        path = folder / name
        if not path.is_file():
            continue
        obj = read_json_object(path)
        for key in SPECIAL:
            token = _token_string(obj.get(key), path, key)
            if token is not None:
                if tok.token_to_id(token) is None:
                    raise ValueError(f"{path}: {key} {token!r} is not in {folder / TOKENIZER}'s vocabulary")
                special[key] = token
        if name == TOKENIZER_CONFIG and obj.get("chat_template") is not None:
            template, source = _pick_template(obj["chat_template"], path), str(path)
    jinja = folder / CHAT_TEMPLATE
    if jinja.is_file():
        try:
            template, source = jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja} is not UTF-8 text ({e.reason}): the file is corrupt") from None
    out = FolderTokenizer(tok, special, template, source)
    if template is not None:
        _compile(template, source)  # a template that does not parse is refused as the folder loads
    return out


def _pick_template(value, path: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{path}: chat_template must be a template string or a list of {{name, template}} with a default")


def check_vocabulary(tok, vocab_size: int, folder) -> None:
    """Raise ValueError if the tokenizer can give an id the model has no embedding for."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(
            f"{Path(folder) / TOKENIZER} has {n:,} token ids but the model's vocabulary (config.json "
            f"vocab_size) is {vocab_size:,}: the tokenizer is not this model's"
        )


@dataclass
class GenerationDefaults:
    """generation_config.json's sampling defaults, with transformers' meaning: greedy unless
    do_sample is true; the end tokens, when it names them, replace config.json's."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    eos_token_id: list[int] | None = None
    found: bool = False


def generation_defaults(folder) -> GenerationDefaults:
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationDefaults()
    obj = read_json_object(path)
    out = GenerationDefaults(found=True)
    sample = obj.get("do_sample", False) is True
    if sample:
        out.temperature = float(obj.get("temperature", 1.0))
        out.top_k = obj.get("top_k", 50)  # transformers' default when sampling
        out.top_p = obj.get("top_p")
        out.top_p = None if out.top_p in (None, 1.0) else float(out.top_p)
        out.top_k = None if out.top_k in (None, 0) else int(out.top_k)
    if isinstance(obj.get("max_new_tokens"), int):
        out.max_new_tokens = obj["max_new_tokens"]
    eos = obj.get("eos_token_id")
    if isinstance(eos, int) and not isinstance(eos, bool):
        out.eos_token_id = [eos]
    elif isinstance(eos, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        out.eos_token_id = list(eos)
    elif eos is not None:
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return out
