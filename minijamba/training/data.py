"""Training data: text corpora cut into batches, and the MQAR synthetic recall task.

Glossary:

    b   batch (sequences per step, across all processes)
    l   sequence length (tokens per training sequence)

Text. The default corpus needs nothing beyond Python itself: the standard library's own top-level
modules (`stdlib_files`), a fixed list in name order, so the tiny model learns to write Python.
`--data PATH` takes any UTF-8 text file or folder of them instead. The last tenth of every document
(cut at a line break) is held out for validation, so the validation text is unseen but of the
same kind. Documents are joined with the end-of-text token.

Packing (`--pack`). The windows above are full rows with no padding, but a row that holds the end
of one document and the start of the next lets the model carry one into the other. Packed, each
row also gives `documents(x)`, the (b, l) document index of each position (`seq_idx`: a new
document after each end-of-text token, which belongs to the document it ends), and the target
after an end-of-text token, the next document's first token, is left out of the loss (IGNORE):
nothing crosses a boundary, and no position is wasted on padding.

Batches are a pure function of (seed, step): the training tokens are cut into windows of l + 1
tokens (input and target shifted by one) at an offset drawn per epoch, the windows are shuffled
per epoch, and step i takes windows i*b .. i*b + b - 1 of that order. No data-loader state to
save: resuming at step i gives exactly the batches an uninterrupted run would have seen, and
`rows` lets each of several processes take its own slice of the same global batch.

MQAR (multi-query associative recall, Arora et al. 2023, "Zoology"): a sequence lists P key-value
pairs, then asks Q of the keys again; after each asked key the model must produce its value:

    k12 v3 k7 v9 k40 v3 ... | k7 v9 k12 v3 ...       (targets only at the answers: v9, v3, ...)

With a length L (`--mqar-length`, as the Zoology study's sequence length), the queries are spread
over the L - 2P tokens after the pairs, each (key, value) at a random place among <pad> tokens, so
that a key is asked far from where it was given:

    k12 v3 k7 v9 k40 v3 ... | <pad> <pad> k7 v9 <pad> <pad> <pad> <pad> k12 v3 <pad> ...

Attention can look the key up; a recurrent state has to have stored all P pairs. The Jamba paper
(section 6.2) finds pure Mamba weak at this kind of in-context recall and the hybrid strong.
Sequences are drawn from (seed, step) too, and every answer is correct by construction.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from minijamba.training import tokenizer as tk

STDLIB_MAX_BYTES = 4 * 2**20  # the default corpus: stdlib modules in name order up to 4 MiB
VAL_FRACTION = 0.1
MAX_MQAR_SYMBOLS = 10**6  # MQAR keys, values (so pairs, queries too): the vocabulary is 2 + keys + values
IGNORE = -100  # target id that the loss skips


# --- text corpora ------------------------------------------------------------------------------
def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The default corpus: the standard library's top-level `.py` modules, in name order, until the
    next one would pass `max_bytes`. The same list on every run of the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(f"found no .py files in the standard library folder {root}: pass --data PATH")
    return files


def _read_text(path: Path) -> str | None:
    """The file's text if it is UTF-8 text (no NUL bytes), else None."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_documents(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(name, text) of every document: the stdlib corpus when `path` is None, else the text file
    at `path`, or every UTF-8 text file under the folder `path` (recursively, in path order,
    skipping hidden files and folders). Raises FileNotFoundError / ValueError naming the problem."""
    if path is None:
        return [(p.name, p.read_text(encoding="utf-8")) for p in stdlib_files()]
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise ValueError(f"--data {path}: not a UTF-8 text file")
        if not text.strip():
            raise ValueError(f"--data {path}: the file is empty")
        return [(path.name, text)]
    docs, seen = [], 0
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            seen += 1
            file = Path(root) / name
            text = _read_text(file)
            if text is not None and text.strip():
                docs.append((str(file.relative_to(path)), text))
    if not docs:
        raise ValueError(
            f"--data {path}: the folder holds no non-empty UTF-8 text files ({seen} files looked at)"
        )
    return docs


def split_document(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, val): the val part is the last `val_fraction` of the text, starting at a line break
    when there is one shortly before the cut."""
    cut = int(len(text) * (1 - val_fraction))
    line = text.rfind("\n", 0, cut)
    if line > 0 and cut - line <= len(text) // 20:  # move the cut back by at most 5% of the text
        cut = line + 1
    return text[:cut], text[cut:]


def encode_documents(tok, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-d tensor of ids, each followed by the end-of-text token."""
    eot = tk.eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        if eot is not None:
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a token tensor, to check on resume that the data did not change."""
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _mix(*ints: int) -> int:
    """A seed for torch.Generator from several integers (deterministic, well spread)."""
    h = hashlib.sha256(",".join(map(str, ints)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class TextTask:
    """Next-token prediction on a tokenized corpus, with a held-out validation split."""

    kind = "text"

    def __init__(self, tok, train_ids: torch.Tensor, val_ids: torch.Tensor, seq_len: int, seed: int,
                 pack: bool = False):  # fmt: skip
        if seq_len < 1:
            raise ValueError(f"sequence length must be >= 1, got {seq_len}")
        n = len(train_ids)
        if n < 2 * seq_len + 1:
            raise ValueError(
                f"the training text is too short: {n} tokens, and a sequence length of {seq_len} needs "
                f"at least {2 * seq_len + 1}; give more text with --data or a smaller --seq-len"
            )
        if len(val_ids) < 2:
            raise ValueError("the validation split is empty: give more text with --data")
        self.tokenizer, self.train_ids, self.val_ids = tok, train_ids, val_ids
        self.seq_len, self.seed = seq_len, seed
        self.pack, self.eot = pack, tk.eot_id(tok)
        if pack and self.eot is None:
            raise ValueError("--pack needs the tokenizer's end-of-text token <|endoftext|> to find the documents")
        self.vocab_size = tok.get_vocab_size()
        self.token_nbytes = torch.tensor(tk.token_nbytes(tok), dtype=torch.int64)  # (V,)
        self.windows = (n - seq_len) // seq_len  # windows per epoch (room left for any offset < l)
        self._epoch, self._order, self._offset = None, None, 0

    @classmethod
    def build(cls, data: str | None, vocab_size: int, seq_len: int, seed: int, tok=None, pack: bool = False) -> TextTask:
        """Read the corpus, split it, train a tokenizer on the training split (unless `tok` is
        given, as on resume) and encode both splits."""
        docs = load_documents(data)
        parts = [split_document(text) for _, text in docs]
        train_texts = [t for t, _ in parts if t]
        val_texts = [v for _, v in parts if v]
        if not train_texts or not val_texts:
            raise ValueError(f"--data {data}: too little text to hold out a validation split")
        if tok is None:
            tok = tk.train_bpe(train_texts, vocab_size)
        return cls(tok, encode_documents(tok, train_texts), encode_documents(tok, val_texts), seq_len, seed, pack)

    def describe(self) -> str:
        return f"{len(self.train_ids):,} training and {len(self.val_ids):,} validation tokens, vocabulary {self.vocab_size}"

    def fingerprint(self) -> str:
        return fingerprint(self.train_ids)

    def _order_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
            self._offset = int(torch.randint(self.seq_len, (1,), generator=g))
            self._order = torch.randperm(self.windows, generator=g)
            self._epoch = epoch
        return self._order

    def batch(
        self, step: int, batch_size: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets for `step`, (b, l) each; `rows` picks this process's part."""
        out = []
        for i in range(step * batch_size, (step + 1) * batch_size)[rows]:
            epoch, j = divmod(i, self.windows)
            order = self._order_for(epoch)  # also sets this epoch's offset
            start = self._offset + int(order[j]) * self.seq_len
            out.append(self.train_ids[start : start + self.seq_len + 1])
        w = torch.stack(out)  # (b, l + 1)
        return self._targets(w[:, :-1], w[:, 1:])

    def _targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed: no target after an end-of-text token (it would cross into the next document)."""
        if self.pack:
            y = y.masked_fill(x == self.eot, IGNORE)
        return x, y

    def documents(self, x: torch.Tensor) -> torch.Tensor | None:
        """Packed: seq_idx (b, l) int32 for inputs x (b, l), a new document after each end-of-text
        token; else None (one sequence per row, as the windows run)."""
        if not self.pack:
            return None
        ends = (x == self.eot).to(torch.int32)  # (b, l)
        return (ends.cumsum(1) - ends).to(torch.int32)  # the ends before each position
    def val_nbytes(self, batch_size: int, max_batches: int) -> int:
        """Bytes `val_batches` holds: its windows, int64 (at most the validation split's tokens)."""
        l = min(self.seq_len, len(self.val_ids) - 1)
        return 8 * (l + 1) * min((len(self.val_ids) - 1) // l, batch_size * max_batches)

    def val_batches(self, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows of the validation split from its start, at most max_batches batches."""
        l = min(self.seq_len, len(self.val_ids) - 1)
        count = min((len(self.val_ids) - 1) // l, batch_size * max_batches)
        w = torch.stack([self.val_ids[i * l : i * l + l + 1] for i in range(count)])  # (count, l + 1)
        return [self._targets(w[i : i + batch_size, :-1], w[i : i + batch_size, 1:]) for i in range(0, count, batch_size)]


# --- MQAR --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MQARSpec:
    """Sizes of the recall task: P pairs in context, Q of them asked, keys and values to draw from,
    and the sequence length L (0: the pairs then the queries, 2P + 2Q tokens, nothing between)."""

    pairs: int = 8
    queries: int = 8
    keys: int = 32
    values: int = 32
    seq_len: int = 0

    def validate(self) -> None:
        for name in ("pairs", "queries", "keys", "values", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"--mqar-{name} must be an integer, got {value!r}")
            if value > MAX_MQAR_SYMBOLS:
                raise ValueError(f"--mqar-{name} must be at most {MAX_MQAR_SYMBOLS:,}, got {value:,}")
        if self.pairs < 1 or self.queries < 1:
            raise ValueError(
                f"MQAR needs at least one pair and one query (--mqar-pairs, --mqar-queries), got "
                f"{self.pairs} and {self.queries}"
            )
        if self.queries > self.pairs:
            raise ValueError(
                f"MQAR asks each key at most once: queries (--mqar-queries {self.queries}) must be <= pairs "
                f"(--mqar-pairs {self.pairs})"
            )
        if self.keys < self.pairs:
            raise ValueError(
                f"MQAR keys are distinct within a sequence: keys (--mqar-keys {self.keys}) must be >= pairs "
                f"(--mqar-pairs {self.pairs})"
            )
        if self.values < 2:
            raise ValueError(f"MQAR needs at least 2 values (--mqar-values), got {self.values}")
        need = 2 * self.pairs + 2 * self.queries
        if self.seq_len and self.seq_len < need:
            raise ValueError(
                f"--mqar-length {self.seq_len} is too short for {self.pairs} pairs and {self.queries} queries: "
                f"they take {need} tokens (2P + 2Q); give at least that, or 0 for no room between them"
            )
        if self.seq_len < 0:
            raise ValueError(f"--mqar-length must be >= 0 (0: no room between pairs and queries), got {self.seq_len}")

    @property
    def length(self) -> int:
        """Tokens per sequence: L, or 2P for the pairs and 2Q for the queries and answers."""
        return self.seq_len or 2 * self.pairs + 2 * self.queries

    def words(self) -> list[str]:
        return (
            ["<pad>", "<unk>"] + [f"k{i}" for i in range(self.keys)] + [f"v{i}" for i in range(self.values)]
        )


def mqar_sequences(spec: MQARSpec, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n MQAR sequences as inputs and targets, (n, L - 1) each (L = spec.length).

    Ids: 0 pad, 1 unk, keys 2 .. 2+K-1, values after them. targets is IGNORE everywhere except
    where the input is an asked key; there it is the value that key was paired with.
    """
    P, Q, K = spec.pairs, spec.queries, spec.keys
    key0, val0 = 2, 2 + K
    keys = torch.argsort(torch.rand(n, K, generator=generator), dim=1)[:, :P]  # (n, P) distinct keys
    values = torch.randint(spec.values, (n, P), generator=generator)  # (n, P), repeats allowed
    asked = torch.argsort(torch.rand(n, P, generator=generator), dim=1)[:, :Q]  # (n, Q) which pairs
    # Where each query goes: one of the 2-token slots after the pairs (in order; with no room
    # between, slot i is query i).
    slots = (spec.length - 2 * P) // 2
    if slots == Q:  # no room between: no draw, so that these sequences are those of before --mqar-length
        where = torch.arange(Q).expand(n, Q)
    else:
        where = torch.argsort(torch.rand(n, slots, generator=generator), dim=1)[:, :Q].sort(1).values  # (n, Q)
    at = 2 * P + 2 * where  # (n, Q) position of each asked key
    seq = torch.zeros(n, spec.length, dtype=torch.int64)  # <pad> wherever nothing is placed
    seq[:, 0 : 2 * P : 2] = key0 + keys
    seq[:, 1 : 2 * P : 2] = val0 + values
    seq.scatter_(1, at, key0 + keys.gather(1, asked))
    seq.scatter_(1, at + 1, val0 + values.gather(1, asked))
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    answer = torch.zeros_like(targets, dtype=torch.bool).scatter_(1, at, True)  # the target after each asked key
    targets[~answer] = IGNORE
    return inputs, targets


class MQARTask:
    """Multi-query associative recall as a training task: fresh sequences every step."""

    kind = "mqar"
    token_nbytes = None  # bits per byte mean nothing here
    pack = False  # one document per sequence

    def documents(self, x: torch.Tensor) -> None:
        return None

    def __init__(self, spec: MQARSpec, seed: int):
        spec.validate()
        self.spec, self.seed = spec, seed
        self.tokenizer = tk.word_tokenizer(spec.words())
        self.vocab_size = len(spec.words())
        self.seq_len = spec.length - 1

    def describe(self) -> str:
        s = self.spec
        return f"MQAR: {s.pairs} key-value pairs then {s.queries} queries ({s.keys} keys, {s.values} values), {self.seq_len} tokens"

    def fingerprint(self) -> str:
        s = self.spec
        return f"mqar-{s.pairs}-{s.queries}-{s.keys}-{s.values}" + (f"-{s.seq_len}" if s.seq_len else "")

    def batch(
        self, step: int, batch_size: int, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = [
            mqar_sequences(self.spec, 1, torch.Generator().manual_seed(_mix(self.seed, i, 2)))
            for i in range(step * batch_size, (step + 1) * batch_size)[rows]
        ]
        return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])

    def val_nbytes(self, batch_size: int, max_batches: int) -> int:
        """Bytes `val_batches` needs while it draws its n = batch_size * max_batches sequences (an
        estimate): the (n, K) float32 draws and their int64 argsort, then inputs, targets and the
        answer mask, (n, 2P + 2Q) each."""
        n, s = batch_size * max_batches, self.spec
        return n * (20 * s.keys + 17 * s.length)

    def val_batches(self, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set, drawn from a stream the training batches never use."""
        g = torch.Generator().manual_seed(_mix(self.seed, 3))
        x, y = mqar_sequences(self.spec, batch_size * max_batches, g)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def bits_per_byte(nats: float, nbytes: int) -> float:
    """Total loss in nats over text of `nbytes` bytes, as bits per byte."""
    return nats / max(nbytes, 1) / math.log(2)
