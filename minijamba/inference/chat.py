"""A conversation with a model: each turn rendered by the folder's chat template, and the inference
state kept from one turn to the next, so that a turn prefills only its own tokens.

Why keep the state: a transformer that keeps its KV cache across turns holds every past token of
every layer; a Jamba's state is the KV cache of its few attention layers (4 of 32 in Jamba-v0.1)
plus each Mamba layer's conv window and SSM state, of a fixed size whatever the length. So keeping
it costs an eighth of what the same model all-attention would keep, and no re-reading of the past:
`Chat.reply` reports the size after each turn (generate.py --chat prints it next to the
all-attention figure).

Each turn renders the whole conversation (the system prompt, every user message and every reply)
with `add_generation_prompt=True`, as transformers' `apply_chat_template` does, and compares its
tokens with those the state already holds. When they begin with them, only the rest is run; when
the template renders an earlier turn differently (some drop a reply's reasoning, say), the state is
emptied and the conversation runs again from its start: the reply is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minijamba.inference.generation import generate_stream


@dataclass
class Turn:
    """One reply: its text, its tokens (the end token that stopped it included), the tokens this
    turn ran through the model before replying, whether the state was kept, and its size after."""

    text: str
    tokens: list[int]
    prefilled: int
    kept_state: bool
    state_bytes: int
    context_tokens: int


class Chat:
    """A conversation. `reply(message)` adds a user message and returns the model's `Turn`.

    tokenizer: a `minijamba.hf_tokenizer.FolderTokenizer` with a chat template. capacity: the tokens
    the conversation may hold in all (the state is allocated once at this size). end_tokens: the
    ids that end a reply. Sampling as `generate` (greedy at temperature 0)."""

    def __init__(
        self, model, tokenizer, end_tokens, system: str | None = None, capacity: int = 4096,
        max_new_tokens: int = 256, temperature=0.0, top_k=None, top_p=None, generator=None,
        prefill_chunk: int | None = None, cuda_graph: bool = False,
    ):  # fmt: skip
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"the chat's context must be at least 2 tokens, got {capacity!r}")
        self.model, self.tokenizer, self.end_tokens = model, tokenizer, set(end_tokens)
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.capacity, self.max_new_tokens = capacity, max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.prefill_chunk, self.cuda_graph = prefill_chunk, cuda_graph
        self.state = model.new_state(1, capacity)
        self.held: list[int] = []  # the tokens the state has run, in order

    def reply(self, message: str) -> Turn:
        if not isinstance(message, str) or not message.strip():
            raise ValueError("the message is empty: say something")
        messages = [*self.messages, {"role": "user", "content": message}]
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)  # the whole conversation
        if max(ids, default=0) >= self.model.config.vocab_size:
            raise ValueError(f"the chat template gives token id {max(ids)}, beyond the model's vocabulary")
        room = self.capacity - len(ids)
        if room < 1:
            raise ValueError(
                f"the conversation has {len(ids):,} tokens and the context holds {self.capacity:,}: start a "
                "new chat, or give a larger --context"
            )
        kept = len(self.held) > 0 and ids[: len(self.held)] == self.held
        if not kept:  # nothing held yet, or the template changed an earlier turn: start over
            self.state = self.model.new_state(1, self.capacity)
            self.held = []
        new = ids[len(self.held) :]  # this turn's tokens: the end of the last reply, the message, the prompt
        if not new:
            raise ValueError("the chat template renders this message to no new tokens")
        device = self.state.valid.device
        x = torch.tensor([new], dtype=torch.int64, device=device)  # (1, l)
        tokens: list[int] = []
        stream = generate_stream(self.model, x, min(self.max_new_tokens, room), state=self.state,
                                 prefill_chunk=self.prefill_chunk, cuda_graph=self.cuda_graph, **self.sampling)  # fmt: skip
        for token in stream:
            tokens.append(int(token[0]))
            if tokens[-1] in self.end_tokens:
                break
        stream.close()
        # The state ran the new tokens and every reply token but the last (sampled, never fed back).
        self.held = ids + tokens[:-1]
        text = self.tokenizer.decode([t for t in tokens if t not in self.end_tokens], skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": text}]
        return Turn(text, tokens, len(new), kept, self.state.nbytes()["total"], len(self.held))
