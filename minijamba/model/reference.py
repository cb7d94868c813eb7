"""The reference backend: the model's own plain primitives, registered with the dispatch point."""

from __future__ import annotations

from minijamba.model import attention, dispatch, mamba, moe, ssm

REFERENCE = dispatch.Backend(
    "reference", ssm.selective_scan, ssm.selective_state_update, ssm.causal_conv1d,
    mamba.to_time_last, mamba.from_time_last, moe.experts_loop, attention.packed_attention,
)  # fmt: skip
dispatch.register("reference", lambda: REFERENCE)
