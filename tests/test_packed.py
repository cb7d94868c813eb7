"""Packed rows (`seq_idx`): documents packed into one row get exactly what each gets alone.

Glossary: b batch (rows), l row length, d channels, n state size, k conv width; a document is a
run of equal seq_idx values; lengths are drawn by hypothesis, documents of one token included.

What is held, for every backend that runs here (the Triton kernels through the interpreter, with
tiles small enough that documents straddle their chunks and windows):
- the scan and the conv with seq_idx equal each document scanned (convolved) alone: outputs and
  the gradients of every input;
- the whole model: each document's logits in a packed row equal its logits alone, and the gradient
  of every parameter equals the sum of the gradients the documents give alone;
- `train_tiny.py --pack`'s rows: full, no padding, and no target across a boundary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, assert_close, gen, make_model, seeds, small_configs
from minijamba import kernels as backends
from minijamba.model import ssm
from minijamba.kernels import chunked_scan

TRITON = backends.why_unavailable("triton") is None
GPU = torch.cuda.is_available()
MODEL_BACKENDS = ["reference", "cpu"] + (["triton"] if TRITON else [])
doc_lengths = st.lists(st.integers(1, 6), min_size=1, max_size=5)  # one row's documents


@pytest.fixture(autouse=True, scope="module")
def _small_tiles_in_the_interpreter():
    """Under the interpreter, tiles of a few steps: chunk and window edges fall inside documents."""
    if GPU or not TRITON:
        yield
        return
    from minijamba.kernels import custom_ops, triton_conv, triton_scan

    if not custom_ops.interpreting():
        pytest.skip("the triton kernels were imported before TRITON_INTERPRET=1 was set in this process")
    scan, conv, programs = dict(triton_scan.CONFIG), dict(triton_conv.CONFIG), triton_conv.PROGRAMS
    small = dict(TI=2, TT=2, num_warps=1)  # chunks of 4 steps
    triton_scan.CONFIG.update(fwd=dict(small, TT=4), fwd_train=small, bwd=small)
    triton_conv.CONFIG.update(fwd=dict(BLOCK_L=8, BLOCK_D=4, num_warps=1), bwd=dict(BLOCK_L=8, BLOCK_D=4, num_warps=1))
    triton_conv.PROGRAMS = 3
    yield
    triton_scan.CONFIG.update(scan)
    triton_conv.CONFIG.update(conv)
    triton_conv.PROGRAMS = programs


def seq_idx_of(rows: list[list[int]]) -> torch.Tensor:
    """(b, l) int32 document indices from each row's document lengths (rows of equal total)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(torch.int32)


def spans(lengths: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each document of a row."""
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def equal_rows(draw, b: int) -> list[list[int]]:
    """b rows of documents, all rows of one length (the first row's total)."""
    first = draw(doc_lengths)
    rows = [first]
    for _ in range(b - 1):
        rest, row = sum(first), []
        while rest:
            row.append(draw(st.integers(1, rest)))
            rest -= row[-1]
        rows.append(row)
    return rows


# --- the primitives ---------------------------------------------------------------------------------

SCANS = {
    "sequential": ssm.selective_scan_sequential,
    "parallel": ssm.selective_scan,
    "cpu": chunked_scan.selective_scan,
}


def _on_device(fn):
    """fn with its tensor arguments on the GPU where there is one, and its results back on the CPU
    (the tests build their inputs on the CPU; autograd flows through the moves)."""
    if not GPU:
        return fn

    def moved(*args, **kwargs):
        to = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = fn(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    return moved


if TRITON:
    from minijamba.kernels import triton_conv, triton_scan

    SCANS["triton"] = _on_device(triton_scan.selective_scan)


def scan_inputs(b, d, n, l, seed, dtype):
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.exp(0.5 * r(d, n)), B=r(b, n, l), C=r(b, n, l),
                D=r(d), z=r(b, d, l), delta_bias=0.3 * r(d), initial_state=r(b, d, n))  # fmt: skip


def _grads(out, inputs, seed):
    """Gradients of every input of a random linear function of the outputs."""
    g = gen(seed + 1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in out)
    return torch.autograd.grad(loss, inputs)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(list(SCANS)), st.data(), st.integers(1, 3), st.integers(1, 3), seeds)
def test_scan_with_seq_idx_equals_each_document_alone(name, data, d, n, seed):
    """y and the last state of a packed row equal the documents scanned one by one, the initial
    state going to the first; and so do the gradients of u, Δ, A, B, C, D, z, the bias and h0."""
    scan = SCANS[name]
    dtype = torch.float32 if name == "triton" else torch.float64
    rows = equal_rows(data.draw, data.draw(st.integers(1, 2)))
    b, l = len(rows), sum(rows[0])
    x = {k: v.requires_grad_() for k, v in scan_inputs(b, d, n, l, seed, dtype).items()}
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = [x[k] for k in order]
    y, last = scan(*args[:8], True, True, x["initial_state"], seq_idx=seq_idx_of(rows))
    got = _grads((y, last), args, seed)
    # Alone: each document of each row on its own, from zero (the first: from the initial state).
    ys, lasts = [], []
    for i, row in enumerate(rows):
        parts = []
        for j, (s, e) in enumerate(spans(row)):
            t = lambda v: v[i : i + 1, :, s:e]  # noqa: E731
            h0 = x["initial_state"][i : i + 1] if j == 0 else None
            yp, hp = ssm.selective_scan_sequential(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]), x["D"],
                                                   t(x["z"]), x["delta_bias"], True, True, h0)  # fmt: skip
            parts.append(yp)
        ys.append(torch.cat(parts, -1))
        lasts.append(hp)
    want_y, want_last = torch.cat(ys), torch.cat(lasts)
    want = _grads((want_y, want_last), args, seed)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    assert_close(y, want_y, rtol, f"{name} y")
    assert_close(last, want_last, rtol, f"{name} last state")
    for k, a, w in zip(order, got, want):
        assert_close(a, w, rtol, f"{name} d{k}")


CONVS = {"reference": ssm.causal_conv1d} | ({"triton": _on_device(triton_conv.causal_conv1d)} if TRITON else {})


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(list(CONVS)), st.data(), st.integers(1, 4), st.integers(1, 5), st.booleans(), seeds)
def test_conv_with_seq_idx_equals_each_document_alone(name, data, k, d, with_context, seed):
    """The conv window restarts at each document: a packed row equals each document convolved
    alone (the context going to the first), outputs and the gradients of x, weight, bias, context."""
    conv = CONVS[name]
    dtype = torch.float32 if name == "triton" else torch.float64
    rows = equal_rows(data.draw, data.draw(st.integers(1, 2)))
    b, l = len(rows), sum(rows[0])
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    x, w, bias = r(b, d, l), r(d, k), r(d)
    context = r(b, d, k - 1) if with_context else None
    inputs = [x, w, bias] + ([context] if with_context else [])
    y = conv(x, w, bias, context, True, seq_idx=seq_idx_of(rows))
    got = _grads((y,), inputs, seed)
    parts = []
    for i, row in enumerate(rows):
        ctx = (lambda j: context[i : i + 1] if (with_context and j == 0) else None)  # noqa: E731
        parts.append(torch.cat([ssm.causal_conv1d(x[i : i + 1, :, s:e], w, bias, ctx(j), True)
                                for j, (s, e) in enumerate(spans(row))], -1))  # fmt: skip
    want_y = torch.cat(parts)
    want = _grads((want_y,), inputs, seed)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(y, want_y, rtol, f"{name} conv")
    # dweight and dbias are sums over the row whose terms may cancel: float32 rounds each of them
    grad_rtol = 1e-4 if dtype == torch.float32 else rtol
    for what, a, e in zip(("x", "weight", "bias", "context"), got, want):
        assert_close(a, e, grad_rtol, f"{name} d{what}")


def _qkv(b, q, g, l, e, seed, dtype, device="cpu"):
    gen_ = gen(seed)
    return [torch.randn(b, h, l, e, generator=gen_, dtype=torch.float64).to(device, dtype) for h in (q, g, g)]


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 8), st.sampled_from([torch.float32, torch.float64]), seeds)
def test_packed_attention_is_each_document_alone_and_flex_equals_it(data, heads, e, dtype, seed):
    """The reference's block-diagonal causal attention equals causal attention over each document
    alone, and its fast twin (FlexAttention, minijamba.kernels.flex_attention) equals it; on the CPU
    the twin runs FlexAttention's forward (its backward is GPU-only, test below)."""
    from minijamba.kernels import flex_attention
    from minijamba.model import attention

    rows = equal_rows(data.draw, data.draw(st.integers(1, 2)))
    (q, g), b, l = heads, len(rows), sum(rows[0])
    qt, kt, vt = _qkv(b, q, g, l, e, seed, dtype)
    seq = seq_idx_of(rows)
    ref = attention.packed_attention(qt, kt, vt, seq)  # (b, q, l, e)
    alone = torch.cat([torch.cat([attention.attend(qt[i:i + 1, :, s:t], kt[i:i + 1, :, s:t], vt[i:i + 1, :, s:t], 0, None)
                                  for s, t in spans(row)], 2) for i, row in enumerate(rows)])  # fmt: skip
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(ref, alone, rtol, "reference packed attention")
    with torch.no_grad():
        assert_close(flex_attention.packed_attention(qt, kt, vt, seq), ref, rtol, "flex packed attention")


@pytest.mark.skipif(not GPU, reason="FlexAttention's backward runs on CUDA only (the forward is held on the CPU above)")
def test_flex_packed_attention_gradients_equal_the_reference_on_the_gpu():
    from minijamba.kernels import flex_attention
    from minijamba.model import attention

    rows = [[700, 1, 300, 23], [1024]]
    seq = seq_idx_of(rows).cuda()
    qkv = [t.requires_grad_() for t in _qkv(2, 8, 2, 1024, 64, 0, torch.float32, "cuda")]
    gy = torch.randn(2, 8, 1024, 64, device="cuda")
    got = flex_attention.packed_attention(*qkv, seq)
    want = attention.packed_attention(*qkv, seq)
    assert_close(got, want, 2e-3, "flex forward")
    for a, w in zip(torch.autograd.grad(got, qkv, gy), torch.autograd.grad(want, qkv, gy)):
        assert_close(a, w, 2e-3, "flex gradient")


# --- the whole model ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(MODEL_BACKENDS), small_configs(), st.data(), seeds)
def test_packed_rows_give_each_document_its_logits_and_gradients_alone(backend, config, data, seed):
    """Logits of a packed row == each document's logits alone; the gradient of every parameter of a
    random linear function of the logits == the sum of those the documents give alone. Any layout,
    MoE or dense, documents of one token included."""
    if backend == "triton" and data.draw(st.integers(0, 2), label="thin out the slow interpreter"):
        return
    dtype = torch.float32 if backend == "triton" else torch.float64
    config = dataclasses.replace(config, scan_backend=backend)
    device = "cuda" if GPU and backend == "triton" else "cpu"  # on a GPU, its kernels (and FlexAttention)
    model = make_model(config, seed, dtype).to(device)
    rows = equal_rows(data.draw, data.draw(st.integers(1, 2)))
    b, l = len(rows), sum(rows[0])
    ids = torch.randint(config.vocab_size, (b, l), generator=gen(seed)).to(device)
    R = torch.randn(b, l, config.vocab_size, generator=gen(seed + 1), dtype=dtype).to(device)  # the linear function

    logits = model(ids, seq_idx=seq_idx_of(rows).to(device))
    packed = torch.autograd.grad((logits * R).sum(), list(model.parameters()), allow_unused=True)
    want_logits = torch.zeros_like(logits)
    alone = [torch.zeros_like(p) for p in model.parameters()]
    for i, row in enumerate(rows):
        for s, e in spans(row):
            part = model(ids[i : i + 1, s:e])  # (1, e - s, V)
            want_logits[i, s:e] = part[0].detach()
            grads = torch.autograd.grad((part * R[i : i + 1, s:e]).sum(), list(model.parameters()), allow_unused=True)
            for acc, gr in zip(alone, grads):
                if gr is not None:
                    acc += gr
    rtol = MODEL_RTOL[dtype] * (10 if dtype == torch.float32 else 1)
    assert_close(logits, want_logits, rtol, f"{backend} logits")
    for (name, _), got, want in zip(model.named_parameters(), packed, alone):
        got = torch.zeros_like(want) if got is None else got
        assert_close(got, want, rtol, f"{backend} d{name}")


def test_seq_idx_is_checked_where_it_enters():
    from minijamba import JambaConfig, Jamba

    model = Jamba(JambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, attn_layer_period=2,
                              attn_layer_offset=1, num_experts=1, num_experts_per_tok=1, mamba_d_state=2,
                              mamba_dt_rank=1))  # fmt: skip
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        model(ids, seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        model(ids, seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5), seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="inference state"):
        model(ids, state=model.new_state(2, 8), seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    one = torch.zeros(2, 5, dtype=torch.int32)  # one document per row: the plain forward
    assert torch.allclose(model(ids, seq_idx=one), model(ids), atol=1e-6)


# --- train_tiny.py --pack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(text_file, tmp_path_factory):
    """A folder of documents of varied lengths (pieces of a real source file, 20 to 400 bytes)."""
    folder = tmp_path_factory.mktemp("docs")
    text, at = text_file.read_text(), 0
    for i, size in enumerate([20, 400, 30, 100, 240, 50, 330, 25, 150, 200] * 6):
        (folder / f"doc{i:02d}.txt").write_text(text[at : at + size])
        at += size
    return folder


@pytest.fixture(scope="module")
def packed_task(corpus):
    from minijamba.training.data import TextTask

    return TextTask.build(str(corpus), 300, 48, seed=0, pack=True)


def test_packed_rows_are_full_and_no_target_crosses_a_boundary(packed_task):
    from minijamba.training.data import IGNORE

    task = packed_task
    x, y = task.batch(3, 12)
    seq_idx = task.documents(x)
    assert x.shape == y.shape == seq_idx.shape == (12, 48)
    ends = x == task.eot
    assert ends.any(), "the rows should hold document boundaries at this length"
    assert torch.equal(y == IGNORE, ends)  # only the prediction after an end token is left out
    # A new document starts right after each end token, and only there.
    starts = torch.cat([torch.zeros(12, 1, dtype=torch.bool), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
    assert torch.equal(starts[:, 1:], ends[:, :-1])
    assert (seq_idx[:, 0] == 0).all()


def test_packed_loss_is_the_loss_of_each_document_alone(packed_task):
    """The training loss on a packed batch == the cross-entropy of every kept target, each
    document's logits computed alone."""
    import torch.nn.functional as F

    from minijamba import JambaConfig, Jamba
    from minijamba.training.data import IGNORE

    task = packed_task
    config = JambaConfig(vocab_size=task.vocab_size, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, attn_layer_period=4, attn_layer_offset=2,
                         num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_dt_rank=2,
                         router_aux_loss_coef=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = Jamba(config).double()
    x, y = task.batch(1, 3)
    seq_idx = task.documents(x)
    _, loss = model(x, targets=y, seq_idx=seq_idx)
    nats, count = 0.0, 0
    for i in range(x.shape[0]):
        for doc in seq_idx[i].unique():
            where = (seq_idx[i] == doc).nonzero()[:, 0]
            s, e = int(where[0]), int(where[-1]) + 1
            logits = model(x[i : i + 1, s:e])[0]
            t = y[i, s:e]
            nats += F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum").item()
            count += int((t != IGNORE).sum())
    assert abs(loss.item() - nats / count) < 1e-9


def test_train_tiny_pack_trains_and_resumes(corpus, text_file, tmp_path):
    from helpers import quiet, train_config
    from minijamba.training.train import train

    out = tmp_path / "packed"
    first = train(train_config(corpus, out, pack=True, max_steps=4, stop_after=2), log=quiet)
    assert first.step == 2
    done = train(train_config(corpus, out, pack=True, max_steps=4, resume=True), log=quiet)
    assert done.step == 4 and done.metrics["val_loss"] > 0
    with pytest.raises(ValueError, match="--pack"):
        train(train_config(text_file, tmp_path / "mqar", task="mqar", pack=True), log=quiet)


def test_gpu_packed_bench_runs_on_the_cpu(tmp_path):
    """bench/gpu_packed.py --smoke: every measurement runs (its numbers belong in bench/RESULTS.md)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_packed.py"
    spec = importlib.util.spec_from_file_location("gpu_packed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "packed.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())[1:]
    layouts = {r["layout"]: r for r in rows if r["measure"] == "train"}
    assert set(layouts) == {"packed", "padded", "packed, no seq_idx"}
    assert layouts["packed"]["useful_fraction"] > layouts["padded"]["useful_fraction"]
    assert {r["measure"] for r in rows} >= {"scan forward", "scan forward+backward", "conv forward+backward"}


def test_activation_checkpointing_keeps_the_documents_apart():
    """With per-layer activation checkpointing (`--checkpoint-activations`) a packed row still gives
    the logits and parameter gradients it gives without."""
    from minijamba import JambaConfig, Jamba
    from minijamba.training.distributed import checkpoint_layers

    config = JambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1,
                         num_experts=1, num_experts_per_tok=1, mamba_d_state=2, mamba_dt_rank=1)  # fmt: skip
    ids = torch.randint(16, (2, 9), generator=gen(0))
    seq_idx = seq_idx_of([[3, 1, 5], [9]])
    out = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = Jamba(config).double()
        if wrap:
            checkpoint_layers(model)
        logits = model(ids, seq_idx=seq_idx)
        out.append((logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    assert_close(out[1][0], out[0][0], 1e-12, "logits")
    for a, b in zip(out[1][1], out[0][1]):
        assert_close(a, b, 1e-12, "gradient")
