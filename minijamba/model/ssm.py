"""The selective scan: the recurrence at the heart of a Mamba layer, in plain PyTorch.

Glossary (the Mamba paper's symbols; mamba-ssm's argument layout):

    b   batch
    d   channels (the Mamba layer's inner width, D in the paper)
    l   sequence length (L)
    n   state size per channel (N)
    u   the input sequence x, (b, d, l)
    Δ   `delta`, the input-dependent step size, (b, d, l); softplus(Δ + bias) when asked
    A   the (diagonal) state matrix, (d, n), negative real: A = -exp(A_log)
    B   the input matrix, (b, n, l), input-dependent ("selective")
    C   the output matrix, (b, n, l), input-dependent
    D   the skip connection, (d,)
    z   the gate, (b, d, l): the output is multiplied by SiLU(z)
    h   the state, (b, d, n), always float32
    T   time steps per chunk of the parallel scan (its (b, T, n, d) work tensors stay in cache)
    seq_idx   (b, l) int, the document of each position when several are packed into one row

For each channel and state index the scan runs the zero-order-hold discretised recurrence

    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t          (Ā = exp(ΔA), B̄u ≈ ΔBu, as in the paper)
    y_t = C_t · h_t + D u_t

Three entry points, all with mamba-ssm's signatures so that faster backends can replace them:

    selective_scan_sequential   the recurrence exactly as written above, one step at a time
    selective_scan              the same result by a parallel (associative) scan; the default reference
    selective_state_update      one decoding step: advance a cached state by one token, in place

State accumulates in float32 whatever the input dtype; the output has the dtype of u.

Packed documents (`seq_idx`, as mamba-ssm's Mamba-2 kernels name it): where seq_idx[t] differs from
seq_idx[t-1] a new document starts, and its state starts again from zero. That is Ā_t = 0 there,
h_t = Δ_t B_t u_t: nothing of the document before reaches it, forwards or backwards. The initial
state, and a conv's context, belong to the row's first document.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import einsum, rearrange


def _fp32_math(fn):
    """Run fn with autocast off: under bf16 autocast the einsums would otherwise drop to 16 bits."""

    @functools.wraps(fn)
    def wrapper(u, *args, **kwargs):
        if not torch.is_autocast_enabled(u.device.type):  # entering the context costs a decoding step 5%
            return fn(u, *args, **kwargs)
        with torch.autocast(u.device.type, enabled=False):
            return fn(u, *args, **kwargs)

    return wrapper


def _up(t: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (float64 stays float64): the state never accumulates in 16 bits."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.promote_types(t.dtype, torch.float32))


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Upcast and apply the Δ bias and softplus. Returns u, Δ, A, B, C in float32 (or float64)."""
    delta = _up(delta)
    if delta_bias is not None:
        delta = delta + _up(delta_bias)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return _up(u), delta, _up(A), _up(B), _up(C)


def _finish(y, u, D, z, dtype):
    """y + D u, then the SiLU(z) gate, then back to the input dtype. y, u, z: (b, d, l)."""
    if D is not None:
        y = y + _up(D)[None, :, None] * u
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype)


def continues(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) bool: True where position t continues the document of t-1 (always at t = 0, whose
    document the initial state belongs to), False where a new one starts. seq_idx (b, l) int."""
    same = seq_idx[:, 1:] == seq_idx[:, :-1]  # (b, l-1)
    return torch.cat([torch.ones_like(seq_idx[:, :1], dtype=torch.bool), same], 1)  # (b, l)


@_fp32_math
def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, seq_idx=None,
):  # fmt: skip
    """The recurrence one time step at a time: O(l) work and O(l) depth. The readable reference.

    Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
    initial_state (b, d, n); seq_idx (b, l) or None (one document). Returns y (b, d, l), and the
    last state (b, d, n) when asked.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, l = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else _up(initial_state)  # (b, d, n)
    keep = None if seq_idx is None else continues(seq_idx).to(u.dtype)  # (b, l): 0 where a document starts
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # Ā_t = exp(Δ_t A)        (b, d, n)
        if keep is not None:
            dA = dA * keep[:, t, None, None]  # a new document forgets the state
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # Δ_t B_t u_t   (b, d, n)
        h = dA * h + dBu  # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))  # y_t = C_t · h_t   (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)  # (b, d, l)
    out = _finish(y, u, D, z, dtype)
    return (out, h) if return_last_state else out


# --- the parallel scan ---------------------------------------------------------------------------
#
# Write one step as the affine map h -> a h + x, with a = exp(ΔA) and x = ΔBu. Composing two steps
# gives another affine map:  (a1, x1) then (a2, x2)  =  (a2 a1, a2 x1 + x2).  Composition of functions
# is associative, so the prefix compositions h_1..h_l can be computed by any parallel prefix-sum
# algorithm. We use the recursive odd/even scan (Ladner-Fischer / Blelloch's work-efficient shape):
#
#   1. combine each pair (2i, 2i+1) into the odd element        l/2 combines, all in parallel
#   2. scan the l/2 odd elements recursively                     they now hold prefixes 0..2i+1
#   3. fix each even element 2i from the odd prefix 2i-1 before it    l/2 combines, in parallel
#
# Work: l/2 + l/4 + ... twice, so O(l) (about 2l combines, like the sequential loop).
# Depth: two parallel steps per level, log2(l) levels, so O(log l) instead of O(l).
# Every step below is an in-place elementwise op on a strided view, so PyTorch runs each level as
# a handful of large vectorised kernels. We scan along dim 1 (time) of (b, T, n, d) tensors so that
# every time slice is one contiguous block of n*d numbers.
#
# Chunks. `selective_scan` does not form a and x for the whole sequence at once: (b, l, d, n) is n
# times the input, and on a CPU every pass over a tensor that size goes to main memory (and a fresh
# one also pays a page fault per 4 KiB). It cuts time into chunks of T steps, small enough that a
# chunk's (b, T, d, n) tensors stay in cache, runs the odd/even scan inside each chunk, and hands the
# last state of a chunk to the next as its h_{-1}. That is still an associative scan of the same
# combines, only in a different order: work O(l), depth O((l/T) log T). On a GPU, which has the
# parallel hardware the depth argument is about, the whole sequence is one chunk (T = l).
# The backward keeps only each chunk's starting state and recomputes the chunk's states from it,
# as mamba-ssm's kernel does: memory O(l/T) states instead of O(l).


def _scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t along dim 1 (time) of (b, l, ...), h_{-1} = 0, by the odd/even scan
    above. Out of place: each level makes new tensors, so autograd differentiates it as it is."""
    l = x.shape[1]
    if l == 1:
        return x
    a_even, a_odd = a[:, 0::2], a[:, 1::2]  # (b, ceil(l/2), ...), (b, floor(l/2), ...)
    x_even, x_odd = x[:, 0::2], x[:, 1::2]
    m, e = x_odd.shape[1], x_even.shape[1]
    h_odd = _scan(a_odd * a_even[:, :m], a_odd * x_even[:, :m] + x_odd)  # 1. pairs, 2. their scan: h_{2i+1}
    h_even = torch.cat([x_even[:, :1], a_even[:, 1:] * h_odd[:, : e - 1] + x_even[:, 1:]], 1)  # 3. h_{2i}
    h = rearrange(torch.stack([h_even[:, :m], h_odd], 2), "b m two ... -> b (m two) ...")  # interleave
    return torch.cat([h, h_even[:, m:]], 1) if l % 2 else h  # (b, l, ...)


# Bytes of one (b, T, d, n) chunk on a CPU: the few such tensors a chunk makes must stay in the
# L2/L3 caches (2 MiB measured best on a 2-core EPYC; 1 and 4 MiB within 10%).
CHUNK_BYTES = 2**21


def chunk_len(b: int, d: int, n: int, l: int, device: torch.device, itemsize: int) -> int:
    """Steps per chunk: as many as fit in CHUNK_BYTES on a CPU (at least 1); the whole sequence elsewhere."""
    if device.type != "cpu":
        return max(l, 1)
    return max(1, min(l, CHUNK_BYTES // (itemsize * b * d * n)))


@_fp32_math
def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, seq_idx=None,
):  # fmt: skip
    """The selective scan by a parallel prefix scan: O(l) work, O((l/T) log T) depth.

    Same arguments, shapes and result as `selective_scan_sequential` (and mamba-ssm's
    `selective_scan_fn`): u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
    initial_state (b, d, n); seq_idx (b, l) or None. Returns y (b, d, l), and the last state
    (b, d, n) when asked.

    Time is cut into chunks of T steps (`chunk_len`: the whole sequence on a GPU); each chunk's
    state is the odd/even scan of its steps, started from the last chunk's final state.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    f = functools.reduce(torch.promote_types, [t.dtype for t in (u, delta, A, B, C)])  # float32 or float64
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    b, d, l = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.to(f)  # (b, d, n)
    T = chunk_len(b, d, A.shape[1], l, u.device, u.element_size())
    keep = None if seq_idx is None else continues(seq_idx).to(f)  # (b, l): 0 where a document starts
    ys = []
    for s in range(0, l, T):
        ut, dt, Bt, Ct = u[..., s : s + T], delta[..., s : s + T], B[..., s : s + T], C[..., s : s + T]
        a = torch.exp(einsum(dt, A, "b d l, d n -> b l d n"))  # Ā_t = exp(Δ_t A)   (b, T, d, n)
        if keep is not None:
            a = a * keep[:, s : s + T, None, None]  # a new document forgets the state
        x = einsum(dt * ut, Bt, "b d l, b n l -> b l d n")  # Δ_t B_t u_t              (b, T, d, n)
        x = torch.cat([x[:, :1] + a[:, :1] * h[:, None], x[:, 1:]], 1)  # fold in the state so far
        hs = _scan(a, x)  # the states h_s .. h_{s+T-1}   (b, T, d, n)
        ys.append(einsum(hs, Ct, "b l d n, b n l -> b d l"))  # y_t = C_t · h_t   (b, d, T)
        h = hs[:, -1]  # (b, d, n)
    y = torch.cat(ys, -1) if ys else u.new_zeros(b, d, 0)  # (b, d, l)
    out = _finish(y, u, D, z, dtype)
    return (out, h) if return_last_state else out


@_fp32_math
def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the recurrence for decoding, updating `state` in place (mamba-ssm's signature).

    Shapes: state (b, d, n) float32; x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d,).
    Returns y (b, d) in the dtype of x.
    """
    dtype = x.dtype
    dt = _up(dt)
    if dt_bias is not None:
        dt = dt + _up(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = _up(x)
    dA = torch.exp(dt[:, :, None] * _up(A))  # Ā = exp(ΔA)    (b, d, n)
    dBx = (dt * xf)[:, :, None] * _up(B)[:, None, :]  # ΔBx    (b, d, n)
    state.mul_(dA).add_(dBx)  # h <- Ā h + ΔBx, in place
    y = (state.to(xf.dtype) @ _up(C)[:, :, None]).squeeze(-1)  # y = C · h, a batched matvec   (b, d)
    if D is not None:
        y = y + _up(D) * xf
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype)


# --- the causal convolution before the scan ----------------------------------------------------
def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    context: torch.Tensor | None = None, silu: bool = False, seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Mamba's depthwise causal convolution over time, then SiLU when asked: the reference every
    scan backend's `causal_conv1d` must equal.

    x (b, d, l), any strides; weight (d, k): one filter per channel, weight[:, k-1] multiplying the
    current input; bias (d,) or None; context (b, d, k-1): the k-1 inputs before x (zeros when
    None, the start of a sequence); seq_idx (b, l) or None: packed documents. Returns (b, d, l) in
    x's dtype, contiguous:

        y[:, c, t] = bias[c] + Σ_j weight[c, j] · cat(context, x)[:, c, t + j]      (j = 0 .. k-1)

    where, with seq_idx, a tap reading a position of another document reads zero instead: the
    window restarts at each document's first token (the context counts as the first document's).

    Rounded as F.conv1d rounds (also under autocast, which casts the float32 parameters): weights,
    bias and context in x's dtype, products summed in float32 or wider, one rounding at the end;
    SiLU then applies to that rounded result.
    """
    b, d, l = x.shape
    k = weight.shape[-1]
    if context is None:
        context = x.new_zeros(b, d, k - 1)
    window = torch.cat([context.to(x.dtype), x], dim=-1)  # (b, d, k-1+l)
    if seq_idx is not None:
        y = _packed_conv(window, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), seq_idx)
        return F.silu(y) if silu else y
    w = weight.to(x.dtype)[:, None, :]  # (d, 1, k): groups=d gives each channel its own filter
    y = F.conv1d(window, w, None if bias is None else bias.to(x.dtype), groups=d)  # (b, d, l)
    return F.silu(y) if silu else y


def _packed_conv(window, w, bias, seq_idx):
    """The conv over packed documents: window (b, d, k-1+l) = cat(context, x), taps w (d, k), bias
    (d,) or None, seq_idx (b, l) -> (b, d, l), rounded as F.conv1d rounds. Each output's k taps
    (an unfold of the window) keep only the inputs of its own document."""
    k = w.shape[-1]
    docs = torch.cat([seq_idx[:, :1].expand(-1, k - 1), seq_idx], 1)  # (b, k-1+l): the context is the first's
    same = docs.unfold(1, k, 1) == seq_idx[:, :, None]  # (b, l, k): tap j of output t in t's document
    acc = torch.promote_types(window.dtype, torch.float32)
    taps = window.to(acc).unfold(-1, k, 1) * same[:, None]  # (b, d, l, k)
    y = einsum(taps, w.to(acc), "b d l k, d k -> b d l")  # (b, d, l)
    if bias is not None:
        y = y + bias.to(acc)[:, None]
    return y.to(window.dtype)
