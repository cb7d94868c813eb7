"""The `mamba_ssm` backend: mamba-ssm's CUDA selective scan and Triton decoding step, adapted.

Glossary as in `minijamba.model.ssm`: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,);
state (b, d, n) float32.

What the adapter does, and where mamba-ssm differs from the reference:

- dtypes: mamba-ssm's CUDA scan wants Δ, B, C and z in u's dtype and A, D, the bias in float32; we
  cast to that (the reference computes in float32 from whatever it is given, so results agree to
  the input dtype's rounding).
- initial_state: mamba-ssm's scan always starts from h = 0; it has no initial-state argument. A
  call with an initial state that is all zeros and needs no gradient goes to mamba-ssm as usual
  (checking costs one device-to-host sync). Any other initial state is honestly not mamba-ssm's
  to compute: that call goes to our Triton scan when it can run here, else to the reference.
  In the model this happens only when a prompt continues an earlier one (chunked prefill).
- seq_idx (packed documents): mamba-ssm's Mamba-1 scan has no such argument (state-spaces/mamba#180),
  and causal-conv1d takes it only for a channel-last layout; such calls go to our Triton kernels
  (else the reference), as calls with an initial state do.
- the last state: mamba-ssm's backward ignores any gradient reaching it, so we return it detached
  (an honest graph: no gradient path instead of a silently wrong one). The model only copies it
  into the inference state, which needs no gradient; initial and last states that must carry
  gradients (truncated backpropagation through time) need the triton or reference backend.
- mamba-ssm's functions are opaque to torch.compile (graph breaks); use the triton backend there.
- the convolution: mamba-ssm ships no conv kernel; the separate causal-conv1d package does, and
  where it is installed this backend uses its `causal_conv1d_fn` (2.6-2.8x faster than ours on the
  model's time-contiguous layout, bench/RESULTS.md). It takes no context for that layout, so a call
  that continues from a conv state (chunked prefill) goes to our Triton conv
  (`minijamba.kernels.triton_conv`), as every call does where causal-conv1d is not installed.

The kernels are imported on first use, never at module import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_OPS: dict[str, object] = {}


def _import(module: str):
    """Import a mamba_ssm submodule. mamba_ssm/__init__.py imports every model it ships (Mamba-3
    too, with optional needs of its own); the scan kernels need none of them, so if that top-level
    import fails, load the package's submodules without running its __init__."""
    try:
        return importlib.import_module(module)
    except ImportError as first:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or spec.submodule_search_locations is None or "mamba_ssm" in sys.modules:
            raise first
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mamba_ssm"] = package
        try:
            return importlib.import_module(module)
        except ImportError:
            del sys.modules["mamba_ssm"]
            raise first from None


def load() -> None:
    """Import mamba-ssm's scan and decoding step (ImportError if the package or its build is broken)."""
    if "scan" not in _OPS:  # (the conv may be loaded already: it has its own key)
        scan = _import("mamba_ssm.ops.selective_scan_interface")
        step = _import("mamba_ssm.ops.triton.selective_state_update")
        _OPS["scan"] = scan.selective_scan_fn
        _OPS["step"] = step.selective_state_update


def _fallback_scan():
    """Where a call mamba-ssm cannot compute goes: our Triton scan on a GPU, else the reference."""
    from minijamba import kernels as backends

    name = "triton" if backends.why_unavailable("triton") is None else "reference"
    return backends.get(name).selective_scan


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, seq_idx=None,
):  # fmt: skip
    """`minijamba.model.ssm.selective_scan` through mamba-ssm's `selective_scan_fn` (see the module
    docstring for initial_state and seq_idx). Returns y (b, d, l), and the last state (b, d, n) when asked."""
    if seq_idx is not None or (
        initial_state is not None and (initial_state.requires_grad or bool(initial_state.any()))
    ):
        return _fallback_scan()(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, seq_idx
        )  # fmt: skip
    load()
    dtype = u.dtype
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    result = _OPS["scan"](
        u, delta.to(dtype), A.float(), B.to(dtype), C.to(dtype), f32(D),
        None if z is None else z.to(dtype), f32(delta_bias), delta_softplus, return_last_state,
    )  # fmt: skip
    if return_last_state:
        out, last = result
        return out, last.detach().float()  # no gradient flows back through it (module docstring)
    return result


def causal_conv1d(x, weight, bias=None, context=None, silu=False, seq_idx=None):
    """`minijamba.model.ssm.causal_conv1d` on causal-conv1d's kernel where it is installed and can
    take the call (no context, no seq_idx), else on our Triton kernel. x (b, d, l) -> (b, d, l) in
    x's dtype."""
    if context is None and seq_idx is None and x.stride(-1) == 1 and _causal_conv1d_fn() is not None:
        w, b = weight.to(x.dtype).contiguous(), None if bias is None else bias.to(x.dtype)
        return _causal_conv1d_fn()(x, w, b, activation="silu" if silu else None)
    from minijamba.kernels import triton_conv

    return triton_conv.causal_conv1d(x, weight, bias, context, silu, seq_idx)


def _causal_conv1d_fn():
    """causal-conv1d's `causal_conv1d_fn`, or None where the package is not installed."""
    if "conv" not in _OPS:
        spec = importlib.util.find_spec("causal_conv1d")
        _OPS["conv"] = importlib.import_module("causal_conv1d").causal_conv1d_fn if spec else None
    return _OPS["conv"]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`minijamba.model.ssm.selective_state_update` through mamba-ssm's Triton kernel: one decoding step,
    `state` (b, d, n) updated in place. Returns y (b, d) in x's dtype."""
    load()
    return _OPS["step"](
        state, x, dt, A.float(), B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )  # fmt: skip
