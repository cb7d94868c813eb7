"""Data: the default corpus, reading text files and folders, the split, batches as a pure function of
(seed, step), the byte-level tokenizer, and MQAR's answers being right by construction."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minijamba.training import tokenizer as tk
from minijamba.training.data import (
    IGNORE,
    STDLIB_MAX_BYTES,
    MQARSpec,
    MQARTask,
    TextTask,
    load_documents,
    mqar_sequences,
    split_document,
    stdlib_files,
)

SAMPLE = Path(textwrap.__file__).read_text(encoding="utf-8")  # ~20 KB of real Python


@pytest.fixture(scope="module")
def bpe():
    return tk.train_bpe([SAMPLE], 300)


# --- corpora -----------------------------------------------------------------------------------
def test_stdlib_corpus_is_a_fixed_ordered_selection():
    files = stdlib_files()
    assert files == stdlib_files()
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.suffix == ".py" for f in files)
    total = sum(f.stat().st_size for f in files)
    assert 2**20 < total <= STDLIB_MAX_BYTES  # "a few MB"


def test_folder_reads_text_files_recursively_in_order_and_skips_the_rest(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second\n")
    (tmp_path / "a.py").write_text("first\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n")
    assert load_documents(tmp_path) == [("a.py", "first\n"), (str(Path("b") / "two.txt"), "second\n")]


def test_bad_data_paths_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(tmp_path / "nope")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="no non-empty UTF-8 text"):
        load_documents(tmp_path / "d")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_documents(tmp_path / "d" / "x.bin")


@given(st.text(min_size=1, max_size=3000))
@settings(max_examples=30, deadline=None)
def test_split_keeps_every_character_and_holds_out_the_end(text):
    train, val = split_document(text)
    assert train + val == text
    assert len(val) <= len(text) // 2 + 1


def test_split_cuts_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(200))
    train, val = split_document(text)
    assert train.endswith("\n") and val.startswith("line ")
    assert 0.05 < len(val) / len(text) < 0.15


# --- text batches --------------------------------------------------------------------------------
def test_text_batches_are_a_pure_function_of_seed_and_step(bpe):
    ids = torch.arange(1000) % 300
    a = TextTask(bpe, ids, ids[:100], seq_len=16, seed=3)
    b = TextTask(bpe, ids, ids[:100], seq_len=16, seed=3)
    for step in [5, 0, 200, 5]:  # any order: no hidden loader state
        xa, ya = a.batch(step, 4)
        xb, yb = b.batch(step, 4)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = a.batch(7, 4)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    c = TextTask(bpe, ids, ids[:100], seq_len=16, seed=4)
    assert not torch.equal(c.batch(0, 4)[0], a.batch(0, 4)[0])


def test_text_rows_split_the_global_batch(bpe):
    """Several processes each take rows of the same global batch: together they are that batch."""
    ids = torch.arange(2000) % 300
    task = TextTask(bpe, ids, ids[:100], seq_len=8, seed=0)
    full_x, _ = task.batch(3, 6)
    parts = [task.batch(3, 6, slice(r * 2, r * 2 + 2))[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), full_x)


def test_one_epoch_visits_every_window_once(bpe):
    ids = torch.arange(10_000)  # distinct ids: a window's first token says where it starts
    task = TextTask(bpe, ids, ids[:100], seq_len=10, seed=1)
    n = task.windows
    starts = torch.cat([task.batch(s, 1)[0][:, 0] for s in range(n)])
    assert len(set(starts.tolist())) == n
    assert len({int(s) % 10 for s in starts}) == 1  # one offset per epoch


def test_too_little_text_is_refused(bpe):
    ids = torch.arange(20)
    with pytest.raises(ValueError, match="too short"):
        TextTask(bpe, ids, ids, seq_len=16, seed=0)


def test_build_trains_the_tokenizer_on_the_training_split(tmp_path):
    f = tmp_path / "t.py"
    f.write_text(SAMPLE)
    task = TextTask.build(str(f), 300, 32, seed=0)
    again = TextTask.build(str(f), 300, 32, seed=0)
    assert task.tokenizer.to_str() == again.tokenizer.to_str()  # deterministic
    assert torch.equal(task.train_ids, again.train_ids)
    assert task.vocab_size <= 300
    train, val = split_document(SAMPLE)
    eot = tk.eot_id(task.tokenizer)
    assert task.tokenizer.decode(task.val_ids[:-1].tolist()) == val
    assert task.val_ids[-1] == eot
    assert len(task.val_batches(4, 2)) == 2


# --- tokenizer -----------------------------------------------------------------------------------
@given(st.text(max_size=200))
@settings(max_examples=40, deadline=None)
def test_byte_level_bpe_is_lossless_and_counts_bytes(bpe, text):
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text
    nbytes = tk.token_nbytes(bpe)
    assert sum(nbytes[i] for i in ids) == len(text.encode("utf-8"))


@given(st.text(min_size=0, max_size=60), st.text(min_size=1, max_size=60))
@settings(max_examples=40, deadline=None)
def test_stream_decoder_prints_exactly_the_decoded_text(bpe, prompt, more):
    """Token by token, with multi-byte characters split across tokens, the printed pieces add up."""
    p, m = bpe.encode(prompt).ids, bpe.encode(more).ids
    dec = tk.StreamDecoder(bpe, p)
    shown = "".join(dec.push(i) for i in m) + dec.flush()
    assert bpe.decode(p) + shown == bpe.decode(p + m)
    assert "\ufffd" not in shown or "\ufffd" in bpe.decode(p + m)


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 257"):
        tk.train_bpe(["abc"], 100)


def test_corrupt_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid"):
        tk.load(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        tk.load(tmp_path / "missing.json")


# --- MQAR ----------------------------------------------------------------------------------------
@st.composite
def specs(draw):
    pairs = draw(st.integers(1, 12))
    return MQARSpec(
        pairs=pairs,
        queries=draw(st.integers(1, pairs)),
        keys=draw(st.integers(pairs, pairs + 10)),
        values=draw(st.integers(2, 20)),
        seq_len=draw(st.sampled_from([0, 1, 7])) and 2 * pairs + 2 * pairs + draw(st.integers(0, 9)),
    )


@given(specs(), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_mqar_answers_are_correct_by_construction(spec, seed):
    """Decode each sequence independently: every target is the value its key was given in context."""
    x, y = mqar_sequences(spec, 5, torch.Generator().manual_seed(seed))
    P, Q, K = spec.pairs, spec.queries, spec.keys
    assert x.shape == y.shape == (5, spec.length - 1)
    key_ids, val_ids = range(2, 2 + K), range(2 + K, 2 + K + spec.values)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        seq = row_x + [row_y[-1]]
        context = dict(zip(seq[0 : 2 * P : 2], seq[1 : 2 * P : 2]))
        assert len(context) == P  # keys distinct within a sequence
        assert all(k in key_ids for k in context) and all(v in val_ids for v in context.values())
        asked = []
        for t, target in enumerate(row_y):
            if target == IGNORE:
                continue
            key = row_x[t]
            assert t >= 2 * P and (t - 2 * P) % 2 == 0  # only queries are scored, each in a 2-token slot
            assert target == context[key]
            asked.append(key)
        assert len(asked) == Q == len(set(asked))  # each asked key once
        # between the queries, <pad> (the input holds every token but the last, which may be one)
        pads = row_x[2 * P :].count(0)
        assert spec.length - 2 * P - 2 * Q - 1 <= pads <= spec.length - 2 * P - 2 * Q


def test_mqar_task_batches_are_deterministic_and_split_by_rows():
    task = MQARTask(MQARSpec(4, 3, 8, 8), seed=1)
    x, y = task.batch(2, 4)
    x2, y2 = task.batch(2, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    top, bottom = task.batch(2, 4, slice(0, 2)), task.batch(2, 4, slice(2, 4))
    assert torch.equal(torch.cat([top[0], bottom[0]]), x)
    assert not torch.equal(task.batch(3, 4)[0], x)
    val = task.val_batches(4, 2)
    assert len(val) == 2 and not torch.equal(val[0][0], x)
    words = task.tokenizer.decode(x[0].tolist()).split()
    assert words[0].startswith("k") and words[1].startswith("v")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pairs=4, queries=5), "queries"),
        (dict(pairs=10, queries=10, keys=5), "keys"),
        (dict(values=1), "values"),
        (dict(pairs=0), "at least one"),
        (dict(pairs=4, queries=4, seq_len=15), "too short for 4 pairs and 4 queries: they take 16"),
    ],
)
def test_mqar_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARSpec(**kwargs).validate()
