"""The one door between the reference model and its fast twins: named primitives, chosen by backend.

Glossary (the project's letters, see the README's glossary):

    b   batch                       l   sequence length (tokens in this call)
    d   Mamba inner width (D)       n   SSM state size (N)
    h   model width                 t   tokens of a call, b * l
    i   a Linear's input features   o   its output features
    K   experts each token goes to

A backend is one function per primitive. The model's layers call the primitives and never branch
on which backend is behind them:

    selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                   seq_idx)
    selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)     one decoding step
    causal_conv1d(x, weight, bias, context, silu, seq_idx)   depthwise causal conv over time, SiLU fused

(seq_idx, (b, l) or None: the document of each position when several are packed into a row; the
state and the conv window restart where it changes.)
    to_time_last(linear, x, bias)  x (b, l, i) -> (b, o, l):  rearrange(linear(x), "b l o -> b o l")
    from_time_last(linear, x)    x (b, i, l) -> (b, l, o):  linear(rearrange(x, "b i l -> b l i"))
    experts(experts, x, weights, idx)     x (t, h), weights and idx (t, K) -> (t, h): each token's
                                 K experts, weighted by the router and summed
    packed_attention(q, k, v, seq_idx)    q (b, q, l, e), k and v (b, g, l, e) -> (b, q, l, e):
                                 causal attention within each packed document (attention.py)

The `reference` backend is the plain code in this package (`ssm.py`; `mamba.to_time_last` and
`from_time_last`; `moe.experts_loop`; `attention.packed_attention`; gathered in `reference.py`), the one to read. Faster twins live on the fast side (`minijamba.kernels`), which registers
them here under their own names ("triton", "mamba_ssm"); a backend that leaves a primitive out gets
the reference's. Each twin is held equal to its reference by a test, values and gradients.

The name comes from `JambaConfig.scan_backend`, else the environment variable `MINIJAMBA_SCAN_BACKEND`,
else "reference".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Callable


ENV_VAR = "MINIJAMBA_SCAN_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of every primitive (see the module docstring)."""

    name: str
    selective_scan: Callable
    selective_state_update: Callable
    causal_conv1d: Callable
    to_time_last: Callable | None = None  # None: the reference's
    from_time_last: Callable | None = None
    experts: Callable | None = None
    packed_attention: Callable | None = None


# name -> a function that imports the backend and returns it, or raises ValueError saying why it
# cannot run here. minijamba.model.reference registers the reference; the fast side its own.
_LOADERS: dict[str, Callable[[], Backend]] = {}
_CACHE: dict[str, Backend] = {}
_ALIASES: dict[str, Callable[[], str]] = {}  # "fast" -> a function naming the best backend here


def register(name: str, loader: Callable[[], Backend]) -> None:
    """Make backend `name` available: `loader()` imports it (lazily, on first use) and returns it."""
    _LOADERS[name] = loader
    _CACHE.pop(name, None)


def register_alias(name: str, resolve: Callable[[], str]) -> None:
    """A name that stands for another, decided when first asked for ('fast': the best one here)."""
    _ALIASES[name] = resolve


def names() -> list[str]:
    """The registered backends, the reference first."""
    return list(_LOADERS)


def get(name: str | None = None) -> Backend:
    """The backend called `name`; None means the environment variable, else 'reference'.

    An unknown name, or one this machine cannot run, is a ValueError that says why."""
    return _CACHE[_load(name or "")]


def _load(name: str) -> str:
    """Resolve `name` (environment variable, alias), import it once; return its name."""
    name = name or os.environ.get(ENV_VAR) or "reference"
    if name in _ALIASES:
        name = _ALIASES[name]()
    if name not in _CACHE:
        if name not in _LOADERS:
            raise ValueError(f"unknown scan backend {name!r}: choose one of {', '.join(_LOADERS)}"
                             + (f" (or {', '.join(map(repr, _ALIASES))})" if _ALIASES else ""))  # fmt: skip
        backend = _LOADERS[name]()
        reference = _LOADERS["reference"]() if name != "reference" else backend
        # A primitive the backend leaves as None is the reference's.
        missing = {f.name: getattr(reference, f.name) for f in fields(backend) if getattr(backend, f.name) is None}
        _CACHE[name] = replace(backend, **missing)
    return name
