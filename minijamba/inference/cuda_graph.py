"""Decoding without Python in the way: one decoding step captured in a CUDA graph, replayed per token.

Glossary:

    b   batch
    V   vocabulary size
    s   capacity of the inference state, in tokens
    w   window: the key slots attention reads in a graph-ready step (a multiple of `bucket`, at most s)

Why. At batch 1 a decoding step of a small model is a few hundred small kernels, each done in a few
microseconds; launching each one from Python takes longer than running it, so the GPU waits for the
interpreter. A CUDA graph records the launches of one step once; a replay then launches them all
with one call, and the step takes what the kernels take.

What a graph needs: every tensor at a fixed address with a fixed shape, and nothing that waits for
the device (a `.item()`, a `bincount` on CUDA) inside. The decoding step nearly is that already: the
inference state is allocated once, the Mamba layers update theirs in place, the MoE counts its
tokens on the device. Only attention depends on the position: where the new key and value go, and
how many keys to read. A graph-ready view of the state (`GraphReadyState`, whose attention layers
hold a `GraphKVCache`) moves both onto the device:

    position    `end` is a (b,) tensor on the device, each row's length after this token, set
                before each replay; attention writes each row's new key and value at its end - 1,
                and `valid` marks that position. Rows may stand at different positions (the slots
                of `minijamba.inference.serving`); in `generate` they stand together
    keys        attention reads a fixed window of w slots; the slots not written yet are False in
                `valid`, which is the attention mask, so the shapes stay the same from step to step

The window grows in buckets of `bucket` tokens, one graph per bucket, captured when the sequence first
reaches it: a step reads at most bucket - 1 slots it does not need (at batch 1 with 4 key/value heads
of 64 at bf16, 1 KiB per slot and attention layer).

Everything else is the model's own code: `DecodeStep` calls `model(ids, state=view)` with the
graph-ready view in place of the state; the reference model has no branch for it. Off the GPU (or with graph=False) that same call runs eagerly, which is
how the tests hold it to the ordinary decoding step on a CPU.
"""

from __future__ import annotations

import weakref

import torch

from minijamba.model import dispatch
from minijamba.model.moe import Experts, experts_loop
from minijamba.model.state import InferenceState, KVCache, MambaState


class GraphKVCache:
    """One attention layer's KV cache as a graph-ready step writes and reads it: each row's new
    key and value go to its position `end - 1`, read on the device, and attention reads a fixed
    window of w slots, masked by `valid` where no token has been written yet."""

    def __init__(self, cache: KVCache, view: "GraphReadyState"):
        self.cache, self.view = cache, weakref.proxy(view)  # (no cycle: the view holds this cache)

    def update(self, k: torch.Tensor, v: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (b, g, 1, e) -> the window's keys and values (b, g, w, e) and the mask (b, 1, 1, w)."""
        rows, slot, w = self.view.rows, self.view.end - 1, self.view.window  # (b,) each row's position
        self.cache.k[rows, :, slot] = k[:, :, 0].to(self.cache.k.dtype)  # (b, g, e) into (b, g, s, e)
        self.cache.v[rows, :, slot] = v[:, :, 0].to(self.cache.v.dtype)
        keys, values = self.cache.k[:, :, :w].to(k.dtype), self.cache.v[:, :, :w].to(v.dtype)
        return keys, values, self.view.valid[:, None, None, :w]  # real tokens written so far


class GraphReadyState:
    """What one graph-ready decoding step sees in place of an `InferenceState`: the same Mamba
    states and KV-cache tensors, with the positions `end` ((b,) int64 on the device: each row's
    length after this token) instead of the host's `length`, and a fixed `window` of key slots
    (at least the largest end), so that one captured CUDA graph serves every position. The caller
    keeps the lengths counted."""

    def __init__(self, state: InferenceState, end: torch.Tensor, window: int):
        self.state, self.end, self.window = state, end, window
        self.valid = state.valid  # (b, s)
        self.rows = torch.arange(state.batch_size, device=end.device)  # (b,)
        self.layers = [GraphKVCache(c, self) if isinstance(c, KVCache) else c for c in state.layers]

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def advance(self, mask: torch.Tensor, padding: bool | None = None) -> None:
        """Mark this step's token as seen: mask (b, 1) at each row's column end - 1, on the device."""
        if mask.shape[1] != 1:
            raise ValueError(f"a graph-ready decoding step takes one token per row, got {mask.shape[1]}")
        self.valid[self.rows, self.end - 1] = mask[:, 0]


class DecodeStep:
    """`step(token)`: one decoding step of `model` on `state`, the next token's logits.

    token (b,) -> logits (b, V), what `model(token[:, None], state=state, logits_to_keep=1)[:, -1]`
    gives, from a graph replay. `state` must already hold the prompt (see `generation.prefill`);
    the step owns it from then on and counts `state.length` itself.

    `step.rows(token, ends)` is the same step for rows at different positions: ends (b,) the
    length of each row after its token (the caller counts them; `state.length` is not used).

    graph: capture CUDA graphs (True, needs the state on a CUDA device), run the graph-ready step
    eagerly (False), or None: capture when the state is on a CUDA device.
    bucket: the attention window grows by this many tokens, one graph per size.
    compile: torch.compile the step before capturing it (fewer, fused kernels): True, or a dict of
    torch.compile arguments.

    With graphs, the returned logits live in the graph's memory and the next step overwrites them:
    sample from them before calling the step again.
    """

    def __init__(self, model, state: InferenceState, graph: bool | None = None, bucket=1024, compile=False):
        device = state.valid.device
        if graph is None:
            graph = device.type == "cuda"
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the inference state on a CUDA device, it is on {device}")
        if not isinstance(bucket, int) or bucket <= 0:
            raise ValueError(f"bucket must be a positive number of tokens, got {bucket!r}")
        if graph and _loops_over_experts(model):
            raise ValueError(
                f"scan backend {dispatch.get(model.config.scan_backend).name!r} runs the experts as a loop "
                "that sizes each expert's tokens on the host, which a CUDA graph cannot capture: decode with a "
                "fast backend (--fast, or scan_backend='triton'), int8 experts, or cuda_graph=False"
            )
        self.model, self.state, self.graph, self.bucket = model, state, graph, bucket
        b = state.batch_size
        self.ids = torch.zeros(b, 1, dtype=torch.int64, device=device)  # the step's input    (b, 1)
        self.end = torch.zeros(b, dtype=torch.int64, device=device)  # each row's length after the token
        options = compile if isinstance(compile, dict) else {}
        self.forward = torch.compile(self._forward, **options) if compile else self._forward
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # window -> graph, logits
        self.views: dict[int, GraphReadyState] = {}  # window -> the state as its step sees it
        self.pool = torch.cuda.graph_pool_handle() if graph else None  # one memory pool for all windows

    def window(self, end: int) -> int:
        """The key slots a step at length `end` reads: `end` rounded up to the bucket, within capacity."""
        return min(self.state.capacity, -(-end // self.bucket) * self.bucket)

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.length + 1 > state.capacity:
            raise ValueError(
                f"the inference state holds {state.capacity} tokens and {state.length} are used: "
                "1 more does not fit; create it with a larger capacity"
            )
        end = state.length + 1
        self.end.fill_(end)
        logits = self._step(token, end)
        state.length = end
        return logits

    @torch.inference_mode()
    def rows(self, token: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """token (b,), ends: b lengths, each row's after its token -> logits (b, V)."""
        if len(ends) != self.state.batch_size or not 1 <= min(ends) <= max(ends) <= self.state.capacity:
            raise ValueError(
                f"ends must be {self.state.batch_size} lengths in [1, {self.state.capacity}], got {ends}"
            )
        self.end.copy_(torch.tensor(ends, dtype=torch.int64))
        return self._step(token, max(ends))

    def _step(self, token: torch.Tensor, end: int) -> torch.Tensor:
        self.ids.copy_(token.reshape(-1, 1))  # copies on the device: no wait
        w = self.window(end)
        if not self.graph:
            return self._run(w)
        if w not in self.graphs:
            self.graphs[w] = self._capture(w)
        graph, logits = self.graphs[w]
        graph.replay()
        return logits

    def _forward(self, view: GraphReadyState) -> torch.Tensor:
        return self.model(self.ids, state=view, logits_to_keep=1)[:, -1]  # (b, V)

    def _run(self, w: int) -> torch.Tensor:
        """The graph-ready step with window w (one view a window, so a compiled step sees the same one)."""
        if w not in self.views:
            self.views[w] = GraphReadyState(self.state, self.end, w)
        return self.forward(self.views[w])

    def _capture(self, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up, then record the step with window w (recording runs nothing).

        The warm-up runs do compute: lazy set-up (cuBLAS workspaces, Triton and torch.compile builds)
        must happen before recording. They write the key/value slot and the `valid` column that the
        replay writes anyway, and the Mamba states, which are put back afterwards."""
        mamba = [layer for layer in self.state.layers if isinstance(layer, MambaState)]
        saved = [(layer.conv.clone(), layer.ssm.clone()) for layer in mamba]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # as torch.cuda.graphs recommends: warm up off the main stream
            for _ in range(2):
                self._run(w)
        torch.cuda.current_stream().wait_stream(side)
        for layer, (conv, ssm) in zip(mamba, saved, strict=True):
            layer.conv.copy_(conv)
            layer.ssm.copy_(ssm)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._run(w)
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the decoding step failed ({e}). Something in the step waits for the "
                "device; a float32 model on CUDA does (its MoE falls back to one matmul per expert, "
                "sized on the host): decode in bfloat16, or pass cuda_graph=False"
            ) from e
        return graph, logits


def _loops_over_experts(model) -> bool:
    """Whether the model's float experts run as the reference's loop (which waits for the device)."""
    has_experts = any(isinstance(m, Experts) for m in model.modules())
    return has_experts and dispatch.get(model.config.scan_backend).experts is experts_loop
