"""Prefill throughput for bench/gpu_serving.py's `prefill` part (issue 17, part 3): one 8-layer block of
Jamba-v0.1 (so bf16 experts fit), bf16 experts against int8 experts through the Triton grouped kernel,
dequantized into one bf16 grouped GEMM (minijamba.kernels.int8_dequant), through the reference (each
expert cast to bf16, one cuBLAS matmul) and as the code chooses (int8-auto), with the model FLOP
utilisation and the peak memory; --prefill-variants times the Triton kernel at other program orders
(GROUP_T) and tiles, --dequant-gib the dequantized twin at other group sizes, in the same process, so
that an A/B shares one device and one build."""

from __future__ import annotations

import gc
import itertools
import os
import time
from contextlib import nullcontext
from unittest.mock import patch

import torch

from minijamba.inference.materialize import build
from minijamba.model.config import JambaConfig


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def active_matmul_parameters(config: JambaConfig) -> int:
    """Parameters a token multiplies (the experts it is routed to, no embedding): 2 FLOPs each. The
    MFU leaves out attention's scores (4 s h a token per attention layer, a few % at 32K)."""
    E, K, f, h = config.num_experts, config.num_experts_per_tok, config.intermediate_size, config.hidden_size
    idle = sum(config.moe_layers) * (E - K) * 3 * f * h if E > 1 else 0
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return config.num_parameters() - idle - embed + config.vocab_size * h  # the LM head multiplies


def prefill_variants(args, mode: str) -> list[tuple[dict, object]]:
    """(labels for the row, a context that sets the variant) to time `mode` at: for int8-triton each of
    --prefill-variants ("GROUP" or "GROUP:T,O,I,W,S,L": int8_matmul.GROUP_T and its prefill tile), for
    int8-dequant each of --dequant-gib (int8_dequant.DEQUANT_BYTES); else the code's, once."""
    if mode == "int8-triton" and args.prefill_variants:
        out = []
        for item in args.prefill_variants:
            group, _, tile = item.partition(":")
            out.append((dict(group=int(group), tile=tile or None), (int(group), tile or None)))
        return [(labels, triton_variant(*v)) for labels, v in out]
    if mode == "int8-dequant" and args.dequant_gib:
        from minijamba.kernels import int8_dequant

        return [(dict(dequant_gib=g), patch.object(int8_dequant, "DEQUANT_BYTES", int(g * 2**30)))
                for g in args.dequant_gib]  # fmt: skip
    return [({}, nullcontext())]


def triton_variant(group, tile):
    """int8_matmul.GROUP_T and its prefill tile set for one timing, then restored."""
    from minijamba.kernels import int8_matmul

    key = "large_sm90" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else "large"
    config = dict(int8_matmul.CONFIG)
    if tile:
        *ints, left = tile.split(",")
        config[key] = (*map(int, ints), left.lower() in ("1", "true"))
    return patch.multiple(int8_matmul, GROUP_T=group, CONFIG=config)


def prefill_rows(args, device, dtype, emit, smoke_sizes: dict) -> None:
    """One 8-layer block (a:m 1:7, 4 MoE layers) of Jamba-v0.1's widths, prefill at --prefill-lens; each
    row goes to `emit`. With --smoke, Jamba-v0.1 at `smoke_sizes` on the CPU."""
    config = JambaConfig.from_preset("jamba-v0.1", num_hidden_layers=8) if not args.smoke else JambaConfig.from_preset(
        "jamba-v0.1", **smoke_sizes)  # fmt: skip
    config.scan_backend = args.backend
    for mode in args.prefill_modes:  # int8-auto: LARGE_ROWS decides (minijamba.inference.quant)
        quantize = None if mode == "bf16" else "int8"
        os.environ.pop("MINIJAMBA_INT8_KERNEL", None)
        if mode in ("int8-triton", "int8-reference", "int8-dequant"):  # the fused kernel needs CUDA
            cpu_ok = mode != "int8-triton" or device.type == "cuda"
            os.environ["MINIJAMBA_INT8_KERNEL"] = mode.split("-")[1] if cpu_ok else "reference"
        model = build(config, device, dtype, quantize=quantize, seed=0)
        active = active_matmul_parameters(config)
        for n, (labels, variant) in itertools.product(args.prefill_lens, prefill_variants(args, mode)):
            ids = torch.randint(0, config.vocab_size, (1, n), device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                with variant, torch.inference_mode():
                    for _ in range(2):
                        model(ids, state=model.new_state(1, n), logits_to_keep=1)
                    sync(device)
                    t0 = time.perf_counter()
                    reps = 3
                    for _ in range(reps):
                        model(ids, state=model.new_state(1, n), logits_to_keep=1)
                    sync(device)
                dt = (time.perf_counter() - t0) / reps
                row = dict(part="prefill", experts=mode, layers=config.num_hidden_layers, tokens=n,
                           seconds=dt, tokens_per_s=n / dt)  # fmt: skip
                if active and device.type == "cuda":
                    row["mfu"] = 2 * active * n / dt / args.peak_flops
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError as e:
                row = dict(part="prefill", experts=mode, tokens=n, error=f"out of memory: {str(e)[:100]}")
            emit({**row, **labels})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        gc.collect()
    os.environ.pop("MINIJAMBA_INT8_KERNEL", None)
