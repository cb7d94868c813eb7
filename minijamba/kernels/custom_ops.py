"""How our Triton kernels meet PyTorch: one custom op per launch wrapper, traced by torch.compile,
called directly when eager.

Each wrapper (the Python function that allocates the outputs and launches a kernel) takes as its
first argument `launch`, what it calls on a kernel before indexing it with the grid:

    @custom_op("minijamba::name", mutates_args=())
    def _wrapper(launch, x: torch.Tensor, ...) -> torch.Tensor:
        launch(_kernel)[grid](x, ...)

`custom_op` registers the wrapper, without `launch`, as a `torch.library.triton_op`, with launch =
`wrap_triton`: torch.compile traces through it (no graph break). `run_op(op, body, *args)` is the one
place that chooses: the registered op under torch.compile, and the wrapper itself eagerly, with the
plain kernel. The dispatcher's layers around a custom op cost more host time than the GPU spends on
a 2K-step scan, and `wrap_triton` outside its op goes through a higher-order op (about 0.5 ms of
host time a launch, measured on the H200: bench/RESULTS.md).

With TRITON_INTERPRET=1 (Triton's CPU interpreter, which the tests use), the kernels run on CPU
tensors, launched as they are.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch.library import triton_op, wrap_triton


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _traceable(kernel):
    """The kernel in a form torch.compile can trace; the plain kernel under Triton's interpreter."""
    return kernel if interpreting() else wrap_triton(kernel)


def _plain(kernel):
    """The kernel itself, for eager calls."""
    return kernel


def custom_op(name: str, mutates_args=()):
    """Register body(launch, *args) as the triton_op `name` (launch=_traceable), and return body
    itself, for `run_op` to call eagerly."""

    def register(body):
        def op(*args):
            return body(_traceable, *args)

        sig = inspect.signature(body)
        op.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # without launch
        op.__name__ = op.__qualname__ = body.__name__
        triton_op(name, mutates_args=mutates_args)(op)
        return body

    return register


def run_op(op, body, *args):
    """Under torch.compile the registered op `op`; eagerly its body, launching the plain kernels."""
    return op(*args) if torch.compiler.is_compiling() else body(_plain, *args)
