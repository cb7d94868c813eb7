"""The fast side: faster twins of the reference model's primitives, registered with its one door.

The reference model (`minijamba.model`) calls its primitives through `minijamba.model.dispatch`;
this package registers the backends that replace them. Optional packages are imported only when
their backend is asked for (or when `available()` is asked what this machine can run).

    reference   minijamba.model: plain PyTorch; runs anywhere (the one to read)
    cpu         the reference, but the scan with a hand-written backward that keeps one state a chunk
                (chunked_scan.py) and the experts by grouped matmuls (moe_dispatch.py): what
                `--fast` picks on a machine without a GPU
    triton      our Triton kernels: the scan (triton_scan.py, its kernels in triton_scan_fwd.py and
                triton_scan_bwd.py), its decoding step (triton_step.py), the conv (triton_conv.py);
                the projections written and read time-last (time_last.py), the experts by grouped matmuls
                (moe_dispatch.py), packed attention by FlexAttention (flex_attention.py). CUDA GPUs (or,
                slowly, Triton's CPU interpreter with TRITON_INTERPRET=1, which the tests use);
                torch.compile sees through them (custom_ops.py)
    mamba_ssm   mamba-ssm's CUDA scan and Triton decoding step (mamba_ssm.py), causal-conv1d's conv
                where it is installed (else ours), the same projections, experts and attention as triton

A batched decoding step (one token per row) reads each weight once whatever the backend: the
time-last projections are a training and prefill layout; for one token the reference's plain
matmul is the faster (time_last.py).

`python -m minijamba.kernels` prints what this machine can run and what `--fast` would pick.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from minijamba.model import dispatch
from minijamba.model.dispatch import ENV_VAR, Backend, get, names

__all__ = ["ENV_VAR", "Backend", "get", "names", "available", "why_unavailable", "best_available"]

# What --fast prefers, best first, measured on an H200 (bench/RESULTS.md, 2026-12-02): our forward
# + backward takes 0.80-0.90x mamba-ssm's time, our forward 0.82-0.90x, and torch.compile can see
# through ours. mamba-ssm is the fallback where Triton is not.
FAST_ORDER = ("triton", "mamba_ssm")

INSTALL_HINT = {
    "triton": "pip install triton (Linux, with a CUDA GPU)",
    "mamba_ssm": "pip install mamba-ssm --no-build-isolation (needs a CUDA GPU and a matching CUDA "
    "toolkit; it compiles for minutes)",
}


def _checked(name: str) -> None:
    reason = why_unavailable(name)
    if reason is not None:
        raise ValueError(
            f"scan backend {name!r} is not available here: {reason}. Install: {INSTALL_HINT[name]}; "
            f"or choose one of: {', '.join(available())}"
        )


def _triton() -> Backend:
    _checked("triton")
    from minijamba.kernels import flex_attention, moe_dispatch, time_last, triton_conv, triton_scan, triton_step

    return Backend(
        "triton", triton_scan.selective_scan, triton_step.selective_state_update, triton_conv.causal_conv1d,
        time_last.to_time_last, time_last.from_time_last, moe_dispatch.experts_grouped,
        flex_attention.packed_attention,
    )  # fmt: skip


def _mamba_ssm() -> Backend:
    _checked("mamba_ssm")
    from minijamba.kernels import flex_attention, mamba_ssm, moe_dispatch, time_last

    mamba_ssm.load()  # import the compiled kernels now, so that a missing piece fails here
    return Backend(
        "mamba_ssm", mamba_ssm.selective_scan, mamba_ssm.selective_state_update, mamba_ssm.causal_conv1d,
        time_last.to_time_last, time_last.from_time_last, moe_dispatch.experts_grouped,
        flex_attention.packed_attention,
    )  # fmt: skip


def _cpu() -> Backend:
    from minijamba.kernels import chunked_scan, moe_dispatch

    return Backend(
        "cpu", chunked_scan.selective_scan, None, None, None, None, moe_dispatch.experts_grouped
    )  # None: the reference's


dispatch.register("cpu", _cpu)
dispatch.register("triton", _triton)
dispatch.register("mamba_ssm", _mamba_ssm)


# Looked up once (torch.compile cannot trace importlib); the packages do not come and go in a process.
INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("triton", "mamba_ssm")}


def _cuda() -> bool:
    return torch.cuda.is_available()


def why_unavailable(name: str) -> str | None:
    """None if backend `name` can run on this machine, else the reason it cannot."""
    if name in ("reference", "cpu"):
        return None
    if name == "triton":
        if not INSTALLED["triton"]:
            return "the triton package is not installed"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None  # the interpreter runs the kernels on CPU tensors
        if not _cuda():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels, slowly, on the CPU)"
        return None
    if name == "mamba_ssm":
        if not INSTALLED["mamba_ssm"]:
            return "the mamba-ssm package is not installed"
        if not _cuda():
            return "no CUDA GPU"
        try:
            from minijamba.kernels import mamba_ssm

            mamba_ssm.load()
        except Exception as e:  # a broken build: say what broke
            return f"mamba-ssm is installed but its kernels do not load ({type(e).__name__}: {e})"
        return None
    raise ValueError(f"unknown scan backend {name!r}: choose one of {', '.join(names())}")


def available() -> list[str]:
    """The backends that can run on this machine."""
    return [name for name in names() if why_unavailable(name) is None]


def best_available() -> str:
    """What `--fast` picks here: the fastest backend that runs on this GPU, else 'cpu'. Triton's
    CPU interpreter does not count: it is for tests, far slower than the reference."""
    if not _cuda():
        return "cpu"
    return next((name for name in FAST_ORDER if why_unavailable(name) is None), "cpu")


dispatch.register_alias("fast", best_available)
