"""The Mamba layer's causal depthwise convolution (with its SiLU fused) as Triton kernels.

Glossary (as in `minijamba.model.ssm.causal_conv1d`, the reference these kernels must equal):

    b   batch                 x, y, dy   (b, d, l)     input (any strides), output, output gradient
    d   channels              w          (d, k)        taps; w[:, k-1] multiplies the current input
    l   sequence length       bias       (d,)
    k   conv width            context    (b, d, k-1)   the k-1 inputs before x (zeros when None)
    p   a padded position     xp         (b, d, k-1+l) cat(context, x): xp[p] = x[p - (k-1)]

What is computed, per channel, with every sum in float32:

    pre[t] = bias + Σ_j w[j] xp[t + j]          rounded once to x's dtype
    y[t]   = SiLU(pre[t])  (or pre[t])           rounded to x's dtype

The rounding points are the reference's (F.conv1d, then F.silu on its 16-bit output): w, bias and
context are used in x's dtype, so under bf16 autocast the weights are the bf16 copies autocast
would make.

Forward. One program owns a tile of BLOCK_L positions x BLOCK_D channels of one sequence. Tap j
is one load of the tile shifted by j - (k-1) positions; the k loads overlap, so DRAM delivers each
input once and the shifted re-reads hit the cache. x is read through its strides, so no contiguous
copy is made: in the model it is in_proj's time-last (b, d, l) output, stride 1 along l, and a view
with stride 1 along d works as well (CONFIG is tuned for the first). The first k-1 positions read
the context instead. The output is written contiguous (b, d, l).

Backward. With dpre = dy SiLU'(pre), rounded to x's dtype as autograd's 16-bit tensor would be,

    dxp[p] = Σ_j w[j] dpre[p - j]               dx = dxp[k-1:], dcontext = dxp[:k-1]
    dw[j]  = Σ_{b,t} dpre[t] xp[t + j]          dbias = Σ_{b,t} dpre[t]

dxp at one position needs dpre at k consecutive positions, and dpre is never stored. So the
backward recomputes pre and dpre over windows of BLOCK_L positions (k loads of x, as in the
forward); a window owns its last BLOCK_L - (k-1) positions and shifts dpre along itself in
registers (`tl.gather`) for the k taps. Windows overlap by k-1 positions: those are recomputed,
not re-read from DRAM. Each program walks a run of consecutive windows of BLOCK_D channels and
keeps its dw and dbias terms in registers, one tile per tap (so k <= 4, as in causal-conv1d's
kernels; Mamba's k is 4), summing them over positions once at the end (a sum over l crosses the
warps; once per window it cost about 7% of the backward). Each program's sums go to a
(programs, d, k) float32 buffer that torch sums over the programs: deterministic, no atomics.

Where the time goes (H200, bench/gpu_conv.py, x time-last): the forward runs at 1.9x the DRAM
floor at l=32K, forward + backward at 3.2x, and causal-conv1d's kernel for this layout is 2.6-2.8x
faster in GPU time (bench/RESULTS.md). The k shifted loads of each pass come from L2, not DRAM, and
the L2 reads, k per pass (2k in the backward: pre, then dw), bound both kernels. Loading each tile
once and shifting it in registers, as dpre is shifted, is the next step.

Packed documents (seq_idx (b, l) int32): a tap that would read a position of another document than
its output's reads zero instead (the context counts as the row's first document), in both passes:
the forward's and the recomputed pre-activation, dw's terms, and dxp's taps, each tap masked by
comparing two loads of seq_idx.

The wrappers are `torch.library.triton_op`s (`minijamba.kernels.custom_ops`), so torch.compile
sees through them (no graph break), and eager calls launch the kernels directly.
`CausalConv1dFn` ties forward and backward together for autograd. CUDA tensors only, unless
TRITON_INTERPRET=1 (Triton's CPU interpreter, which the tests use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minijamba.kernels.custom_ops import custom_op, interpreting, run_op

# Launch shapes. BLOCK_D channels x BLOCK_L positions a program; the backward's BLOCK_L is raised
# to at least 2k so that its windows overlap by at most half. The fastest of bench/gpu_conv.py
# --sweep on an H200 at the training shape b=4, d=2048, l=2K, bf16, k=4, with x time-last as the
# model passes it (2026-12-02): long in l, narrow in d, since l is the contiguous dimension.
# (With x strided, stride 1 along d, as the model passed it before minijamba.kernels.time_last, the sweep
# chose 64 x 64 and 64 x 32; bench/RESULTS.md.)
CONFIG = {
    "fwd": dict(BLOCK_L=256, BLOCK_D=16, num_warps=4),
    "bwd": dict(BLOCK_L=256, BLOCK_D=8, num_warps=4),
}
PROGRAMS = 1024  # the backward's programs in all (each walks a run of windows): ~8 per SM of an H200


# --- the shared pieces -----------------------------------------------------------------------------


@triton.jit
def _xp(x_row, ctx_row, q, ok, L, sx_l, sc_l, K: tl.constexpr, HAS_CONTEXT: tl.constexpr):
    """The padded input xp = cat(context, x) at padded positions q (BLOCK_L, 1), as float32
    (BLOCK_L, BLOCK_D); zero where there is none. x_row, ctx_row (1, BLOCK_D): each channel's row
    of x and of the context; ok (1, BLOCK_D): the channels that exist."""
    t = q - (K - 1)  # the position in x
    v = tl.load(x_row + t * sx_l, mask=ok & (t >= 0) & (t < L), other=0.0).to(tl.float32)
    if HAS_CONTEXT:
        v += tl.load(ctx_row + q * sc_l, mask=ok & (q >= 0) & (q < K - 1), other=0.0).to(tl.float32)
    return v


@triton.jit
def _doc(seq_ptr, pid_b, pos, L):
    """seq_idx at positions pos (any shape), clamped into the row: before it is the context, which
    belongs to the first document."""
    return tl.load(seq_ptr + pid_b * L + tl.minimum(tl.maximum(pos, 0), L - 1))


@triton.jit
def _same(seq_ptr, pid_b, out_pos, in_pos, L, HAS_SEQ: tl.constexpr):
    """1.0 where the output at out_pos and the input at in_pos (positions in x) are one document."""
    same = 1.0
    if HAS_SEQ:  # (one return: Triton compiles every return of a function, taken or not)
        same = tl.where(_doc(seq_ptr, pid_b, out_pos, L) == _doc(seq_ptr, pid_b, in_pos, L), 1.0, 0.0)
    return same


@triton.jit
def _pre(x_row, ctx_row, w_ptr, bias_ptr, seq_ptr, pid_b, s, c, ok, L, sx_l, sc_l,
         K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_SEQ: tl.constexpr):  # fmt: skip
    """pre[s] = Σ_j w[j] xp[s + j] + bias at positions s (BLOCK_L, 1) of channels c (1, BLOCK_D),
    summed in float32 and not yet rounded; with HAS_SEQ, only taps of s's own document. The taps
    unroll (k is a compile-time constant)."""
    acc = tl.zeros((s.shape[0], c.shape[1]), dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + c * K + j, mask=ok, other=0.0).to(tl.float32)  # (1, BLOCK_D)
        v = _xp(x_row, ctx_row, s + j, ok, L, sx_l, sc_l, K, HAS_CONTEXT)
        acc += w * v * _same(seq_ptr, pid_b, s, s + j - (K - 1), L, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _rows(x_ptr, ctx_ptr, pid_b, c, sx_b, sx_d, sc_b, sc_d, HAS_CONTEXT: tl.constexpr):
    """Pointers to the start of each channel's row of x and of the context (1, BLOCK_D)."""
    x_row = x_ptr + pid_b * sx_b + c * sx_d
    if HAS_CONTEXT:
        ctx_row = ctx_ptr + pid_b * sc_b + c * sc_d
    else:
        ctx_row = x_row  # never read
    return x_row, ctx_row


# --- forward ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, ctx_ptr, seq_ptr, y_ptr,
    dim, L, sx_b, sx_d, sx_l, sc_b, sc_d, sc_l,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONTEXT: tl.constexpr, SILU: tl.constexpr,
    HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]  # this tile's positions (BL, 1)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # and channels          (1, BD)
    ok = c < dim
    x_row, ctx_row = _rows(x_ptr, ctx_ptr, pid_b, c, sx_b, sx_d, sc_b, sc_d, HAS_CONTEXT)
    acc = _pre(x_row, ctx_row, w_ptr, bias_ptr, seq_ptr, pid_b, t, c, ok, L, sx_l, sc_l, K, HAS_BIAS, HAS_CONTEXT, HAS_SEQ)
    y = acc.to(y_ptr.dtype.element_ty)  # the one rounding of the convolution
    if SILU:
        pre = y.to(tl.float32)
        y = (pre * tl.sigmoid(pre)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (pid_b * dim + c) * L + t, y, mask=ok & (t < L))  # y contiguous (b, d, l)


# --- backward --------------------------------------------------------------------------------------


@triton.jit
def _bwd_kernel(
    x_ptr, w_ptr, bias_ptr, ctx_ptr, seq_ptr, dy_ptr,  # inputs
    dx_ptr, dctx_ptr, dw_ptr, dbias_ptr,  # outputs: dx like x, dcontext (b, d, k-1), partial sums
    dim, L, n_windows, per_program,
    sx_b, sx_d, sx_l, sc_b, sc_d, sc_l, sdy_b, sdy_d, sdy_l, sdx_b, sdx_d, sdx_l,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONTEXT: tl.constexpr, SILU: tl.constexpr,
    HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    OWN: tl.constexpr = BLOCK_L - (K - 1)  # positions a window owns; it starts K-1 before them
    pid_b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, BLOCK_L)[:, None]  # rows of a window                                    (BL, 1)
    cd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's channels          (BD,)
    c = cd[None, :]  # (1, BD)
    ok = c < dim
    x_row, ctx_row = _rows(x_ptr, ctx_ptr, pid_b, c, sx_b, sx_d, sc_b, sc_d, HAS_CONTEXT)
    zero = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dw0, dw1, dw2, dw3, dbias = zero, zero, zero, zero, zero  # Σ over this program's windows, per row

    # A run of consecutive windows (their overlaps stay in the cache); the sums over rows wait.
    first = tl.program_id(1) * per_program
    for win in range(first, tl.minimum(first + per_program, n_windows)):
        s = win * OWN - (K - 1) + r  # row r holds dpre[s] and, once shifted, dxp[p] at p = s

        # 1. Recompute the forward's pre-activation and take the gradient through SiLU.
        in_seq = ok & (s >= 0) & (s < L)  # zero outside the sequence: no gradient flows from there
        dpre = tl.load(dy_ptr + pid_b * sdy_b + c * sdy_d + s * sdy_l, mask=in_seq, other=0.0).to(tl.float32)
        if SILU:
            acc = _pre(x_row, ctx_row, w_ptr, bias_ptr, seq_ptr, pid_b, s, c, ok, L, sx_l, sc_l, K, HAS_BIAS,
                       HAS_CONTEXT, HAS_SEQ)  # fmt: skip
            pre = acc.to(dx_ptr.dtype.element_ty).to(tl.float32)  # as the forward rounded it
            sg = tl.sigmoid(pre)
            dpre = dpre * sg * (1.0 + pre * (1.0 - sg))  # d SiLU(v) / dv = σ(v)(1 + v(1 - σ(v)))
        dpre = dpre.to(dx_ptr.dtype.element_ty).to(tl.float32)  # autograd holds dpre in x's dtype

        # 2. dw[j] += dpre[s] xp[s + j] and dbias += dpre[s] over the rows this window owns (the
        #    tap loads re-read the ones above, from the cache). k <= 4, as in causal-conv1d.
        mine = tl.where(r >= K - 1, dpre, 0.0)
        dbias += mine
        dw0 += mine * _xp(x_row, ctx_row, s, ok, L, sx_l, sc_l, K, HAS_CONTEXT) * _same(
                seq_ptr, pid_b, s, s + 0 - (K - 1), L, HAS_SEQ
            )
        if K > 1:
            dw1 += mine * _xp(x_row, ctx_row, s + 1, ok, L, sx_l, sc_l, K, HAS_CONTEXT) * _same(
                seq_ptr, pid_b, s, s + 1 - (K - 1), L, HAS_SEQ
            )
        if K > 2:
            dw2 += mine * _xp(x_row, ctx_row, s + 2, ok, L, sx_l, sc_l, K, HAS_CONTEXT) * _same(
                seq_ptr, pid_b, s, s + 2 - (K - 1), L, HAS_SEQ
            )
        if K > 3:
            dw3 += mine * _xp(x_row, ctx_row, s + 3, ok, L, sx_l, sc_l, K, HAS_CONTEXT) * _same(
                seq_ptr, pid_b, s, s + 3 - (K - 1), L, HAS_SEQ
            )

        # 3. dxp[p] = Σ_j w[j] dpre[p - j]: tap j reads the window shifted down by j rows. Rows
        #    below K-1 would need the window before; they belong to it and are not stored here.
        #    With HAS_SEQ, only outputs s - j of the input's own document (input s - (K-1) in x).
        w0 = tl.load(w_ptr + c * K, mask=ok, other=0.0).to(tl.float32)
        dxp = w0 * dpre * _same(seq_ptr, pid_b, s, s - (K - 1), L, HAS_SEQ)  # tap 0: no shift
        for j in tl.static_range(1, K):
            w = tl.load(w_ptr + c * K + j, mask=ok, other=0.0).to(tl.float32)  # (1, BD)
            rows = tl.maximum(r - j, 0) + tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.int32)
            dxp += w * tl.gather(dpre, rows, axis=0) * _same(seq_ptr, pid_b, s - j, s - (K - 1), L, HAS_SEQ)
        dxp = dxp.to(dx_ptr.dtype.element_ty)
        p = s  # the padded position of each row
        own = (r >= K - 1) & ok
        t = p - (K - 1)  # dxp[p] is dx[t] for p >= K-1, dcontext[p] before
        tl.store(dx_ptr + pid_b * sdx_b + c * sdx_d + t * sdx_l, dxp, mask=own & (t >= 0) & (t < L))
        if HAS_CONTEXT:
            tl.store(dctx_ptr + (pid_b * dim + c) * (K - 1) + p, dxp, mask=own & (p < K - 1))

    # This program's partial sums: one row of the (programs, d, k) and (programs, d) buffers.
    part = pid_b * tl.num_programs(1) + tl.program_id(1)
    md = cd < dim
    out = dw_ptr + (part * dim + cd) * K
    tl.store(out, tl.sum(dw0, axis=0), mask=md)
    if K > 1:
        tl.store(out + 1, tl.sum(dw1, axis=0), mask=md)
    if K > 2:
        tl.store(out + 2, tl.sum(dw2, axis=0), mask=md)
    if K > 3:
        tl.store(out + 3, tl.sum(dw3, axis=0), mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + part * dim + cd, tl.sum(dbias, axis=0), mask=md)


# --- the custom ops (what torch.compile sees) ------------------------------------------------------


def _bwd_block_l(k: int) -> int:
    return max(CONFIG["bwd"]["BLOCK_L"], triton.next_power_of_2(2 * k))


def _has_context(context: torch.Tensor | None) -> bool:
    return context is not None and context.shape[-1] > 0  # k = 1 has an empty context


def _context_strides(context: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(context.stride()) if _has_context(context) else (0, 0, 0)


@custom_op("minijamba::triton_causal_conv1d_fwd", mutates_args=())
def _conv_fwd(
    launch,
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, context: torch.Tensor | None,
    seq_idx: torch.Tensor | None, silu: bool,
) -> torch.Tensor:
    """y (b, d, l), contiguous, in x's dtype. weight (d, k) contiguous; all in x's dtype."""
    b, d, l = x.shape
    k = weight.shape[1]
    cfg = CONFIG["fwd"]
    y = torch.empty(b, d, l, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(l, cfg["BLOCK_L"]), triton.cdiv(d, cfg["BLOCK_D"]), b)
    has_ctx = _has_context(context)  # an unused pointer goes in as None (an empty tensor has none)
    launch(_fwd_kernel)[grid](
        x, weight, bias, context if has_ctx else None, seq_idx, y, d, l, *x.stride(), *_context_strides(context),
        K=k, HAS_BIAS=bias is not None, HAS_CONTEXT=has_ctx, SILU=silu, HAS_SEQ=seq_idx is not None, **cfg,
    )  # fmt: skip
    return y


@custom_op("minijamba::triton_causal_conv1d_bwd", mutates_args=())
def _conv_bwd(
    launch,
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, context: torch.Tensor | None,
    seq_idx: torch.Tensor | None, dy: torch.Tensor, silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dx (laid out like x), dcontext (b, d, k-1) or empty, and the float32 partial sums of dw
    (programs, d, k) and dbias (programs, d), to be summed over dim 0."""
    b, d, l = x.shape
    k = weight.shape[1]
    cfg = dict(CONFIG["bwd"], BLOCK_L=_bwd_block_l(k))
    block_l, block_d = cfg["BLOCK_L"], cfg["BLOCK_D"]
    n_windows = triton.cdiv(l + k - 1, block_l - (k - 1))  # over the l + k - 1 padded positions
    # Runs of windows, enough programs to fill the GPU PROGRAMS times over, no more (fewer partials).
    runs = min(n_windows, max(1, triton.cdiv(PROGRAMS, b * triton.cdiv(d, block_d))))
    per_program = triton.cdiv(n_windows, runs)
    runs = triton.cdiv(n_windows, per_program)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)  # dense, in x's order of strides (x itself may be a strided view)
    dctx = x.new_empty((b, d, k - 1) if context is not None else (0,))
    dw, dbias = torch.empty(b * runs, d, k, **f32), torch.empty(b * runs if bias is not None else 0, d, **f32)
    has_ctx = _has_context(context)
    launch(_bwd_kernel)[(triton.cdiv(d, block_d), runs, b)](
        x, weight, bias, context if has_ctx else None, seq_idx, dy, dx, dctx if has_ctx else None, dw,
        dbias if bias is not None else None, d, l, n_windows, per_program,
        *x.stride(), *_context_strides(context), *dy.stride(), *dx.stride(),
        K=k, HAS_BIAS=bias is not None, HAS_CONTEXT=has_ctx, SILU=silu, HAS_SEQ=seq_idx is not None, **cfg,
    )  # fmt: skip
    return dx, dctx, dw, dbias


# --- autograd and the public function --------------------------------------------------------------


class CausalConv1dFn(torch.autograd.Function):
    """The Triton forward and backward as one differentiable function of x, weight, bias, context
    (all in x's dtype: `causal_conv1d` casts them; seq_idx int32 or None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, context, seq_idx, silu):
        ctx.silu = silu
        ctx.save_for_backward(x, weight, bias, context, seq_idx)
        fwd = torch.ops.minijamba.triton_causal_conv1d_fwd
        return run_op(fwd, _conv_fwd, x, weight, bias, context, seq_idx, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, context, seq_idx = ctx.saved_tensors
        bwd = torch.ops.minijamba.triton_causal_conv1d_bwd
        dx, dctx, dw, dbias = run_op(bwd, _conv_bwd, x, weight, bias, context, seq_idx, dy, ctx.silu)
        return (
            dx, dw.sum(0).to(weight.dtype),  # rounded to x's dtype, as F.conv1d's weight gradient is
            None if bias is None else dbias.sum(0).to(bias.dtype),
            None if context is None else dctx,
            None, None,
        )  # fmt: skip


def _check(x, weight, bias, context, seq_idx=None):
    """Shapes, dtypes and devices, checked where the input enters; ValueError names the problem and
    the fix."""
    if x.dim() != 3:
        raise ValueError(f"x must be (b, d, l), got shape {tuple(x.shape)}")
    b, d, l = x.shape
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        hint = " (nn.Conv1d's weight is (d, 1, k): pass conv.weight[:, 0])" if weight.dim() == 3 else ""
        got = tuple(weight.shape)
        raise ValueError(f"weight must be (d, k) = ({d}, k) for x {(b, d, l)}, got {got}{hint}")
    k = weight.shape[1]
    if k > 4:
        raise ValueError(f"the triton conv takes k <= 4 taps (Mamba's d_conv is 4), got k={k}; "
                         "use scan_backend='reference' for wider convolutions")  # fmt: skip
    for name, t, shape in (("bias", bias, (d,)), ("context", context, (b, d, k - 1))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for x {(b, d, l)} and k={k}, got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("context", context)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move them to one device")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"x must be float32, float16 or bfloat16 (the kernels sum in float32), got {x.dtype}; "
            "use scan_backend='reference' for other dtypes"
        )
    if seq_idx is not None and (tuple(seq_idx.shape) != (b, l) or seq_idx.dtype.is_floating_point
                                or seq_idx.dtype == torch.bool or seq_idx.device != x.device):  # fmt: skip
        raise ValueError(f"seq_idx must be integer document indices of shape {(b, l)} on {x.device}, got "
                         f"{seq_idx.dtype} {tuple(seq_idx.shape)} on {seq_idx.device}")  # fmt: skip
    span = sum((n - 1) * abs(st) for n, st in zip(x.shape[1:], x.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"one sequence of x spans {span} elements: the kernels index within one in int32")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the triton backend runs on CUDA tensors, got {x.device}; use scan_backend='reference' "
            "on this device (or set TRITON_INTERPRET=1 to run the kernels slowly on the CPU)"
        )


def causal_conv1d(x, weight, bias=None, context=None, silu=False, seq_idx=None):
    """`minijamba.model.ssm.causal_conv1d` on the Triton kernels: same arguments, result and rounding.

    x (b, d, l), any strides; weight (d, k); bias (d,) or None; context (b, d, k-1) or None (zeros);
    seq_idx (b, l) or None (packed documents). Returns SiLU(conv) if silu else conv, contiguous
    (b, d, l) in x's dtype. Differentiable in x, weight, bias and context.
    """
    _check(x, weight, bias, context, seq_idx)
    b, d, l = x.shape
    if l == 0:
        return x.new_empty(b, d, 0)
    dt = x.dtype
    return CausalConv1dFn.apply(
        x, weight.to(dt).contiguous(), None if bias is None else bias.to(dt).contiguous(),
        None if context is None else context.to(dt),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(), bool(silu),
    )  # fmt: skip
