"""Tokenizers for training: a byte-level BPE learned from the training text, and MQAR's word-level one.

Glossary:

    V   vocabulary size (ids 0 .. V-1)
    EOT the end-of-text token, placed between documents and emitted by the model to say "done"

Byte-level BPE (the GPT-2 scheme) starts from the 256 byte values, so any string encodes and
decodes losslessly, then merges the most frequent adjacent pairs until the vocabulary has V
entries. Trained on Python source it learns "    ", "self", "def ", "return " and so on, which
makes each token carry several bytes and lets a small model see more text per step. The trained
tokenizer is saved with the checkpoint as `tokenizer.json` (the `tokenizers` library's own format,
also what transformers checkpoints ship), because the model's ids mean nothing without it.

Validation loss is reported in nats per token and in bits per byte. Nats per token depend on the
tokenizer (bigger tokens, bigger loss per token); bits per byte do not, so they compare runs with
different vocabularies: `token_nbytes` gives each token's length in bytes for that conversion.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOT = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte values and EOT
# The trainer allocates tables in proportion to the size asked for (2^31 aborts the process with a
# 141 GB allocation), whatever the text can give; 2^20 is 16 times Jamba's 65,536.
MAX_BPE_VOCAB = 2**20


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with at most `vocab_size` tokens (EOT included), trained on `texts`.

    Deterministic: the same texts and size give the same tokenizer. On little text the vocabulary
    can stop short of `vocab_size` (no pair left that occurs twice); use `get_vocab_size()`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab size {vocab_size!r} is too small: a byte-level BPE needs at least "
            f"{MIN_BPE_VOCAB} tokens (256 bytes + end-of-text)"
        )
    if vocab_size > MAX_BPE_VOCAB:
        raise ValueError(f"vocab size {vocab_size:,} is too large: at most {MAX_BPE_VOCAB:,} tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over exactly `words` (id i = words[i]), split on whitespace.

    MQAR's tokens are symbols like 'k12' and 'v3'; this makes them readable in and out of
    generate.py. Unknown words map to '<unk>', which must be in `words`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def load(path: str | Path):
    """The tokenizer saved at `path` (a tokenizer.json), with a clear error if it is missing or corrupt."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: the folder must hold the tokenizer.json it was trained with"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for unreadable JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a valid tokenizer.json ({first}): the file is corrupt") from None


def eot_id(tok) -> int | None:
    """The id of the end-of-text token, or None if this tokenizer has none."""
    return tok.token_to_id(EOT)


def token_nbytes(tok) -> list[int]:
    """Bytes of text each token id stands for (0 for special tokens), for bits per byte.

    Exact for byte-level BPE: every character of a byte-level token is one byte. For other
    tokenizers (word-level, SentencePiece) the length of the decoded token is the estimate.
    """
    from tokenizers import decoders

    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        if s is None or s in special:
            out.append(0)
        elif byte_level:
            out.append(len(s))
        else:
            out.append(len(tok.decode([i]).encode("utf-8")))
    return out


class StreamDecoder:
    """Turns token ids, one at a time, into the new text they add, ready to print.

    Decodes prompt + generated ids as a whole and returns only what is new, so that tokenizers that
    join words with spaces (word-level) and byte-level tokens that end inside a multi-byte UTF-8
    character both come out right: an incomplete character is held back until its last byte arrives.
    """

    def __init__(self, tok, prompt_ids: list[int]):
        self.tok = tok
        self.ids = list(prompt_ids)
        self.shown = len(tok.decode(self.ids, skip_special_tokens=False))

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        new, self.shown = text[self.shown :], len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        new, self.shown = text[self.shown :], len(text)
        return new
