"""The one dispatch point for the selective scan, its decoding step and the Mamba layer's conv.

A backend is three functions, the scan's two with mamba-ssm's signatures (see `minijamba.ssm`) and
the convolution with the reference's (see `minijamba.mamba.causal_conv1d`):

    selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    causal_conv1d(x, weight, bias, context, silu)        depthwise causal conv1d, SiLU fused

The model code never branches on the backend: the Mamba layer asks `get(name)` for the three once
and calls them. Optional packages are imported only when their backend is asked for (or when
`available()` is asked what this machine can run).

    reference   minijamba.ssm and minijamba.mamba.causal_conv1d, plain PyTorch; runs anywhere (the
                one to read)
    triton      minijamba.backends.triton_scan, triton_step and triton_conv, our Triton kernels; CUDA GPUs (or,
                slowly, Triton's CPU interpreter with TRITON_INTERPRET=1, which the tests use);
                torch.compile sees through them
    mamba_ssm   mamba-ssm's CUDA scan and Triton decoding step, through minijamba.backends.mamba_ssm,
                with our Triton conv (mamba-ssm ships none); CUDA GPUs with mamba-ssm installed

`python -m minijamba.backends` prints what this machine can run and what `--fast` would pick.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple

import torch

ENV_VAR = "MINIJAMBA_SCAN_BACKEND"

# What --fast prefers, best first, measured on an H200 (bench/RESULTS.md, 2026-12-02). Training:
# our forward + backward takes 0.90x mamba-ssm's time at the batched 2K-token steps training runs
# and 0.80-0.87x at b=1 from 2K to 32K tokens. Inference (prefill): our forward takes 0.82-0.90x.
# Under torch.compile: triton, which it can see through. mamba-ssm is the fallback where Triton is not.
FAST_ORDER = {"training": ("triton", "mamba_ssm"), "inference": ("triton", "mamba_ssm")}

INSTALL_HINT = {
    "triton": "pip install triton (Linux, with a CUDA GPU)",
    "mamba_ssm": "pip install mamba-ssm --no-build-isolation (needs a CUDA GPU and a matching CUDA "
    "toolkit; it compiles for minutes)",
}


class Backend(NamedTuple):
    name: str
    selective_scan: Callable
    selective_state_update: Callable
    causal_conv1d: Callable


def _reference() -> Backend:
    from minijamba import mamba, ssm

    return Backend("reference", ssm.selective_scan, ssm.selective_state_update, mamba.causal_conv1d)


def _triton() -> Backend:
    from minijamba.backends import triton_conv, triton_scan, triton_step

    return Backend(
        "triton", triton_scan.selective_scan, triton_step.selective_state_update, triton_conv.causal_conv1d
    )


def _mamba_ssm() -> Backend:
    from minijamba.backends import mamba_ssm

    mamba_ssm.load()  # import the compiled kernels now, so that a missing piece fails here
    return Backend(
        "mamba_ssm", mamba_ssm.selective_scan, mamba_ssm.selective_state_update, mamba_ssm.causal_conv1d
    )


_LOADERS: dict[str, Callable[[], Backend]] = {"reference": _reference, "triton": _triton, "mamba_ssm": _mamba_ssm}
_CACHE: dict[str, Backend] = {}


def names() -> list[str]:
    return list(_LOADERS)


def _cuda() -> bool:
    return torch.cuda.is_available()


def why_unavailable(name: str) -> str | None:
    """None if backend `name` can run on this machine, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None  # the interpreter runs the kernels on CPU tensors
        if not _cuda():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels, slowly, on the CPU)"
        return None
    if name == "mamba_ssm":
        if importlib.util.find_spec("mamba_ssm") is None:
            return "the mamba-ssm package is not installed"
        if not _cuda():
            return "no CUDA GPU"
        try:
            from minijamba.backends import mamba_ssm

            mamba_ssm.load()
        except Exception as e:  # a broken build: say what broke
            return f"mamba-ssm is installed but its kernels do not load ({type(e).__name__}: {e})"
        return None
    raise ValueError(f"unknown scan backend {name!r}: choose one of {', '.join(_LOADERS)}")


def available() -> list[str]:
    """The backends that can run on this machine."""
    return [name for name in _LOADERS if why_unavailable(name) is None]


def best_available(compile: bool = False, training: bool = True) -> str:
    """What `--fast` picks here: the fastest backend that runs on this GPU, else 'reference'.

    training: the model will be trained (the backward pass counts) rather than only run forward.
    compile=True: the model will run under torch.compile, which cannot see inside mamba-ssm's
    kernels (a graph break at every Mamba layer), so prefer triton. Triton's CPU interpreter does
    not count: it is for tests, far slower than the reference."""
    if not _cuda():
        return "reference"
    order = FAST_ORDER["inference" if compile or not training else "training"]
    for name in order:
        if why_unavailable(name) is None:
            return name
    return "reference"


def get(name: str | None = None) -> Backend:
    """The backend called `name`; None means the environment variable, else 'reference'.

    'fast' means `best_available()`. An unknown name or one this machine cannot run is a ValueError
    that says why and how to install it."""
    return _CACHE[_load(name or "")]


@torch.compiler.assume_constant_result  # torch.compile runs this once while tracing: no graph break
def _load(name: str) -> str:
    """Resolve `name` (env var, 'fast'), check it can run here, import it once; return its name."""
    name = name or os.environ.get(ENV_VAR) or "reference"
    if name == "fast":
        name = best_available()
    if name not in _CACHE:
        if name not in _LOADERS:
            raise ValueError(f"unknown scan backend {name!r}: choose one of {', '.join(_LOADERS)} (or 'fast')")
        reason = why_unavailable(name)
        if reason is not None:
            raise ValueError(
                f"scan backend {name!r} is not available here: {reason}. Install: {INSTALL_HINT[name]}; "
                f"or choose one of: {', '.join(available())}"
            )
        _CACHE[name] = _LOADERS[name]()
    return name
