"""Serving many prompts on one device: a fixed number of slots, refilled as rows end (continuous batching).

Glossary:

    b   slots: the rows of one inference state, decoded together
    s   capacity of a slot, in tokens (its prompt and its new tokens)
    V   vocabulary size

Why. `generate` decodes one batch of prompts from start to end: the batch runs as long as its
longest completion, rows that finished early ride along idle, and prompts of different lengths need
left padding. A hybrid's small state is what lets a GPU hold many sequences at once (the paper's
Figure 3), and this loop keeps all of them busy:

    slots        one `InferenceState` of b rows of s tokens; each row holds one sequence at its own
                 length (no padding: the lengths differ, the positions are per row)
    prefill      a prompt runs alone into a free row (`InferenceState.row`, views of that row), and
                 its first new token is sampled from the prefill's logits
    decode       every step, all rows take one token together (`DecodeStep.rows`: one CUDA graph
                 replay a step on a GPU); idle rows ride along on a dummy token
    refill       a row whose sequence ends (an end token, or its budget of new tokens) takes the
                 next prompt at once; its Mamba state is emptied and its old keys masked out

Each prompt gets exactly the tokens `generate` gives it alone (greedy): rows never meet. Attention
reads each row's own keys, the Mamba layers keep a state per row, and the MoE routes each token on
its own (there is no expert capacity, so no token is dropped because of its neighbours).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from minijamba.inference.cuda_graph import DecodeStep
from minijamba.inference.generation import check_sampling, prefill, sample


@dataclass
class Finished:
    """One prompt's completion: `index` into the prompts, the new `tokens` (an end token that stopped
    it included), and why it stopped: "stop" (an end token) or "length" (its budget)."""

    index: int
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"


def check_prompts(prompts, max_new_tokens, vocab_size: int, capacity: int | None = None) -> list[int]:
    """Raise ValueError for a bad prompt or budget, naming which; returns the budgets, one per prompt."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise ValueError("prompts must be a list of prompts, each a list of token ids")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(prompts)} prompts: give one per prompt")
    for i, (p, n) in enumerate(zip(prompts, budgets, strict=True)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prompt {i}: max_new_tokens must be an integer >= 1, got {n!r}")
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to start from")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds {bad[0]!r}: token ids must be integers in [0, {vocab_size - 1}]")
        if capacity is not None and len(p) + n > capacity:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens and a budget of {n}: {len(p) + n} do not fit the context of "
                f"{capacity} tokens (a shorter prompt, a smaller max_new_tokens, or a larger context)"
            )
    return budgets


@torch.inference_mode()
def serve(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature=0.0, top_k=None,
    top_p=None, batch_size: int = 8, eos_token_id: int | Sequence[int] | None = None, generator=None,
    prefill_chunk: int | None = None, cuda_graph: bool | None = None, capacity: int | None = None,
    compile_step: bool | dict = False,
) -> Iterator[Finished]:  # fmt: skip
    """Yield each prompt's `Finished` as it ends (not in order). See `generate_many`."""
    config = model.config
    budgets = check_prompts(prompts, max_new_tokens, config.vocab_size, capacity)
    check_sampling(temperature, top_k, top_p)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of slots, got {batch_size!r}")
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    b = min(batch_size, len(prompts))
    s = capacity or max(len(p) + n for p, n in zip(prompts, budgets, strict=True))
    state = model.new_state(b, s)
    device = state.valid.device
    graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    step = DecodeStep(model, state, graph=graph, compile=compile_step)
    queue = iter(range(len(prompts)))
    rows: list[Finished | None] = [None] * b  # what each slot is generating (None: idle)
    ends = [1] * b  # each row's length after its next token; an idle row writes at position 0
    tokens = torch.zeros(b, dtype=torch.int64, device=device)  # each row's next token

    def fill(row: int) -> None:
        """Start the next prompt in this row, if any is left: prefill it, sample its first token."""
        i = next(queue, None)
        rows[row] = None if i is None else Finished(i, len(prompts[i]))
        if i is None:
            return
        ids = torch.tensor([list(prompts[i])], dtype=torch.int64, device=device)  # (1, l)
        logits = prefill(model, ids, state.row(row), chunk=prefill_chunk)  # (1, V)
        tokens[row] = sample(logits, temperature, top_k, top_p, generator)[0]
        ends[row] = len(prompts[i]) + 1

    for row in range(b):
        fill(row)
    while any(rows):
        chosen = tokens.tolist()  # the one wait for the device a step
        for row, (seq, token) in enumerate(zip(rows, chosen, strict=True)):
            if seq is None:
                continue
            seq.tokens.append(token)
            stopped = token in stops
            if stopped or len(seq.tokens) == budgets[seq.index]:
                seq.finish_reason = "stop" if stopped else "length"
                rows[row] = None
                yield seq
        busy = [row for row, seq in enumerate(rows) if seq is not None]
        if busy:
            for row in range(b):
                if rows[row] is None:
                    ends[row] = 1
            logits = step.rows(tokens, ends)  # (b, V)
            tokens.copy_(sample(logits, temperature, top_k, top_p, generator))
            for row in busy:
                ends[row] += 1
        for row in range(b):
            if rows[row] is None:
                fill(row)


def generate_many(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature=0.0, top_k=None,
    top_p=None, batch_size: int = 8, eos_token_id: int | Sequence[int] | None = None, generator=None,
    prefill_chunk: int | None = None, cuda_graph: bool | None = None, capacity: int | None = None,
    compile_step: bool | dict = False,
) -> list[list[int]]:  # fmt: skip
    """The new tokens of every prompt, in the prompts' order.

    prompts: lists of token ids, of any lengths. max_new_tokens: one budget for all, or one per
    prompt. A row stops at its budget or at an end token (eos_token_id: one id or several; the end
    token is the last of its tokens). batch_size: the slots decoded together; a slot is refilled as
    soon as its row ends. capacity: the tokens a slot holds (default: the longest prompt plus its
    budget). cuda_graph: each step one CUDA graph replay (None: on a CUDA device). compile_step:
    torch.compile the step before it is captured (True, or torch.compile's options): slow once, then
    fewer kernels a step (at batch 1 on an H200, 130 tokens/s instead of 92). Greedy at temperature
    0, where each prompt gets exactly what `generate` gives it alone."""
    out: list[list[int]] = [[] for _ in prompts] if isinstance(prompts, Sequence) else []
    for done in serve(model, prompts, max_new_tokens, temperature, top_k, top_p, batch_size, eos_token_id,
                      generator, prefill_chunk, cuda_graph, capacity, compile_step):  # fmt: skip
        out[done.index] = done.tokens
    return out


def read_prompts_jsonl(lines: Sequence[str]) -> list[tuple[int, str | None, str | None]]:
    """(line number, prompt text, error) for each non-blank line of a JSONL file of {"prompt": TEXT}
    objects; a line that is not such an object gets an error naming its problem, and no prompt."""
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((number, None, f"line {number} is not JSON ({e.msg} at column {e.colno})"))
            continue
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            got = "no \"prompt\"" if not isinstance(record, dict) or "prompt" not in record else type(prompt).__name__
            out.append((number, None, f'line {number} must be an object {{"prompt": "text"}}, got {got}'))
            continue
        out.append((number, prompt, None))
    return out


def encode_prompts_jsonl(lines: Sequence[str], tokenizer) -> list[tuple[int, list[int] | None, str | None]]:
    """`read_prompts_jsonl` with each prompt encoded: (line number, token ids, error)."""
    return [(n, None if text is None else tokenizer.encode(text).ids, error)
            for n, text, error in read_prompts_jsonl(lines)]  # fmt: skip


def run_jsonl(
    model, tokenizer, records: Sequence[tuple[int, list[int] | None, str | None]], out, max_new_tokens: int,
    batch_size: int, capacity: int, progress=None, **kwargs,
) -> dict[str, float]:  # fmt: skip
    """Complete every prompt of a JSONL file (its `encode_prompts_jsonl` records) and write one JSON
    object per line to `out`, in the file's order: {"line", "completion", "prompt_tokens", "completion_tokens", "finish_reason"},
    or {"line", "error"} for a line that cannot run (not JSON, no prompt, an empty prompt, one that
    does not fit `capacity` tokens with its budget); the others still run. progress: a stream for a
    progress line (prompts done, tokens/s), or None. kwargs go to `serve`. Returns counts."""
    from minijamba.training.tokenizer import StreamDecoder

    results: dict[int, dict] = {}
    prompts, where = [], []
    for number, ids, error in records:
        if error is None and not ids:
            error = f"line {number}: the prompt is empty (it encodes to no tokens)"
        elif error is None and len(ids) + max_new_tokens > capacity:
            error = (f"line {number}: the prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                     f"that is more than the context of {capacity} tokens (--context)")  # fmt: skip
        if error is not None:
            results[number] = {"line": number, "error": error}
        else:
            prompts.append(ids)
            where.append(number)
    t0, generated = time.perf_counter(), 0
    if prompts:
        for done in serve(model, prompts, max_new_tokens, batch_size=batch_size, capacity=capacity, **kwargs):
            tokens = done.tokens[:-1] if done.finish_reason == "stop" else done.tokens
            decoder = StreamDecoder(tokenizer, prompts[done.index])
            text = "".join(decoder.push(t) for t in tokens) + decoder.flush()
            number = where[done.index]
            results[number] = {
                "line": number, "completion": text, "prompt_tokens": done.prompt_tokens,
                "completion_tokens": len(done.tokens), "finish_reason": done.finish_reason,
            }  # fmt: skip
            generated += len(done.tokens)
            if progress is not None:
                rate = generated / max(time.perf_counter() - t0, 1e-9)
                finished = sum("completion" in r for r in results.values())
                progress.write(f"\r{finished}/{len(prompts)} prompts, {generated:,} tokens, {rate:,.1f} tokens/s")
                progress.flush()
    if progress is not None and prompts:
        progress.write("\n")
    for number in sorted(results):
        out.write(json.dumps(results[number], ensure_ascii=False) + "\n")
    errors = sum("error" in r for r in results.values())
    return {"prompts": len(prompts), "errors": errors, "tokens": generated,
            "seconds": time.perf_counter() - t0}  # fmt: skip
