"""Autoregressive generation: prefill the prompt in parallel (in one piece or in chunks), then one
token per step.

Glossary:

    b   batch (prompts decoded together)
    l   prompt length (after left padding)
    V   vocabulary size

The prompt runs through the model once, filling the inference state (KV caches, conv and SSM
states); each new token then costs one call with l = 1, which uses the cache in attention layers
and the single-step recurrence in Mamba layers. Prompts of different lengths batch together with
left padding and an attention mask; padding never enters any state, so each row gets exactly the
tokens it would get alone. A long prompt can run in chunks (`prefill_chunk`), with the same result
and an activation memory that depends on the chunk instead of the prompt.
"""

from __future__ import annotations

from typing import Iterator

import torch

from minijamba.checks import finite_number
from minijamba.model.state import InferenceState


TINY_TEMPERATURE = torch.finfo(torch.float32).tiny  # below it sampling is greedy (see `sample`)


def check_sampling(temperature=0.0, top_k=None, top_p=None) -> None:
    """Raise ValueError for a bad temperature, top_k or top_p, whatever the temperature (a bad top_k
    is a mistake even where greedy decoding does not use it). NaN and infinities are bad values."""
    rule = "a finite number >= 0 (0 = greedy)"
    if _number(temperature, "temperature", rule) < 0:
        raise ValueError(f"temperature must be {rule}, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < _number(top_p, "top_p", "in (0, 1] or None") <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _number(value, name: str, rule: str) -> float:
    try:
        return finite_number(value, name)
    except ValueError:
        raise ValueError(f"{name} must be {rule}, got {value!r}") from None


def check_input_ids(input_ids, vocab_size: int) -> None:
    """Raise ValueError unless `input_ids` is a (b, l) tensor of integer ids in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        is_tensor = isinstance(input_ids, torch.Tensor)
        what = f"shape {tuple(input_ids.shape)}" if is_tensor else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {what}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids holds token id {bad}, outside the model's vocabulary: ids must be in "
                f"[0, {vocab_size - 1}] (vocab_size {vocab_size})"
            )


def sample(logits: torch.Tensor, temperature=0.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick one token per row of logits (b, V) -> (b,). Greedy at temperature 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature < TINY_TEMPERATURE:  # 0, or so close that float32 would divide by zero
        return logits.argmax(-1)
    logits = logits.float()
    # Shifted so that the largest is 0 (softmax is the same): a tiny temperature then gives -inf,
    # not inf - inf = NaN, to all but the largest.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (b, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def prefill(model, input_ids, state: InferenceState, attention_mask=None, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt (b, l) into `state`, `chunk` tokens per call (None: all at once). Returns the
    logits of the last position, (b, V).

    Chunks give the same logits and state as one piece: Mamba layers carry their conv inputs and
    SSM state from one call to the next, attention layers append to the KV cache and attend to all
    of it. What changes is the peak activation memory, which then grows with the chunk, not the prompt.
    """
    l = input_ids.shape[1]
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {chunk!r}")
    step = l if chunk is None else chunk
    for start in range(0, l, step):
        mask = None if attention_mask is None else attention_mask[:, start : start + step]
        logits = model(input_ids[:, start : start + step], state=state, attention_mask=mask, logits_to_keep=1)
    return logits[:, -1]  # (b, V)


@torch.inference_mode()
def generate_stream(
    model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, generator=None,
    attention_mask=None, state: InferenceState | None = None, prefill_chunk: int | None = None,
    cuda_graph: bool = False, compile_step: bool | dict = False,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """Yield the next token of every row, (b,), max_new_tokens times. prefill_chunk: run the prompt
    this many tokens at a time (None: in one piece); the result is the same either way.
    cuda_graph: decode through `minijamba.inference.cuda_graph.DecodeStep`, each step one CUDA graph replay
    when the model is on a GPU (there it must be bfloat16), the same step run eagerly elsewhere;
    the same tokens up to rounding. compile_step: also torch.compile that step (True, or the options
    for torch.compile) before it is captured: slow once, then fewer kernels per token."""
    check_input_ids(input_ids, model.config.vocab_size)
    b, l = input_ids.shape
    if l == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                "they must match"
            )
        real = attention_mask.to(torch.bool)
        if not real[:, -1].all() or (real[:, :-1] & ~real[:, 1:]).any():
            # Right padding (or a hole) would let the SSM state decay over the padding, and an
            # all-padding row would generate from nothing.
            raise ValueError(
                "attention_mask must be left padding: each row 0...0 1...1 with at least one 1 "
                "(pad prompts on the left)"
            )
    if state is None:
        state = model.new_state(b, l + max_new_tokens)
    logits = prefill(model, input_ids, state, attention_mask, prefill_chunk)  # (b, V)
    if cuda_graph or compile_step:
        from minijamba.inference.cuda_graph import DecodeStep

        step = DecodeStep(model, state, graph=None if cuda_graph else False, compile=compile_step)
    else:
        step = lambda token: model(token[:, None], state=state, logits_to_keep=1)[:, -1]  # noqa: E731 (a one-line step)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (b,)
        yield token
        if i + 1 < max_new_tokens:
            logits = step(token)  # (b, V)


def generate(
    model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, generator=None,
    attention_mask=None, prefill_chunk: int | None = None, cuda_graph: bool = False,
    compile_step: bool | dict = False,
) -> torch.Tensor:  # fmt: skip
    """Prompt + new tokens, (b, l + max_new_tokens). Greedy at temperature 0; batched; prompts of
    different lengths are left-padded with `attention_mask` (b, l) marking real tokens with 1.
    prefill_chunk: run the prompt this many tokens at a time (bounds activation memory).
    cuda_graph, compile_step: each decoding step one CUDA graph replay, compiled (see `generate_stream`)."""
    new = list(
        generate_stream(
            model, input_ids, max_new_tokens, temperature, top_k, top_p, generator, attention_mask,
            prefill_chunk=prefill_chunk, cuda_graph=cuda_graph, compile_step=compile_step,
        )
    )  # fmt: skip
    return torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids.clone()
