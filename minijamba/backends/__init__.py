"""The one dispatch point for the selective scan and its decoding step.

A backend is a pair of functions with mamba-ssm's signatures (see `minijamba.ssm`):

    selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

The model code never branches on the backend: the Mamba layer asks `get(name)` for the pair once and
calls it. Optional packages are imported only when their backend is asked for.

    reference   minijamba.ssm, plain PyTorch; runs anywhere (the one to read)
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

ENV_VAR = "MINIJAMBA_SCAN_BACKEND"


class Backend(NamedTuple):
    name: str
    selective_scan: Callable
    selective_state_update: Callable


def _reference() -> Backend:
    from minijamba import ssm

    return Backend("reference", ssm.selective_scan, ssm.selective_state_update)


_LOADERS: dict[str, Callable[[], Backend]] = {"reference": _reference}
_CACHE: dict[str, Backend] = {}


def names() -> list[str]:
    return list(_LOADERS)


def get(name: str | None = None) -> Backend:
    """The backend called `name`; None means the environment variable, else 'reference'."""
    name = name or os.environ.get(ENV_VAR) or "reference"
    if name not in _LOADERS:
        raise ValueError(f"unknown scan backend {name!r}: choose one of {', '.join(_LOADERS)}")
    if name not in _CACHE:
        _CACHE[name] = _LOADERS[name]()
    return _CACHE[name]
