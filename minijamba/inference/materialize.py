"""Building a model straight onto its device, layer by layer, without a copy in host memory.

Glossary:

    E   experts in an MoE layer
    h   model width
    f   hidden width of an expert

`Jamba(config)` allocates every parameter on the default device and initialises it there: for
Jamba-v0.1 that is 103 GB in bf16, more than an 80GB GPU holds, and a detour through host memory
first. Here the model is first built on the meta device (shapes only, no memory), then each piece
(the embedding, each decoder layer, the final norm, the LM head) is allocated on the target device
and filled in turn, so the peak is the finished model plus one piece being made.

With `quantize="int8"` the MoE experts become `minijamba.inference.quant.Int8Experts` while still on meta,
and their random weights are drawn one expert at a time in float32 and quantized at once: the
experts never exist in 16 bits all together (one expert's float weights, 0.7 GB for Jamba-v0.1, is
the most that does).

Seeded random weights are deterministic per piece: piece p draws from the global RNG reseeded with
(seed, p), so a layer's weights do not depend on which other layers were built, nor on quantize
(experts are always drawn expert by expert, so the int8 experts are exactly the quantized float
ones). They depend on the device's random generator: the same seed gives other numbers on CUDA.
The caller's RNG state is restored afterwards.
"""

from __future__ import annotations

import torch

from minijamba.checks import check_seed
from minijamba.model.config import JambaConfig
from minijamba.model.jamba import Jamba, cast_parameters, init_piece_, pieces
from minijamba.model.moe import SparseMoE
from minijamba.inference.quant import Int8Experts, check_quantize


def meta_model(config: JambaConfig, dtype=torch.bfloat16, quantize=None) -> Jamba:
    """The model on the meta device (no memory), in `dtype`, with int8 experts when asked.

    Exact shapes and dtypes of what `build` allocates, so its sizes can be planned (memory_plan)."""
    check_quantize(quantize)
    with torch.device("meta"):
        model = cast_parameters(Jamba(config), dtype)  # A_log, D, dt_proj.bias: float32 as in load_hf
        if quantize == "int8":
            for module in model.modules():
                if isinstance(module, SparseMoE):
                    module.experts = Int8Experts(config)  # int8 weights, float32 scales
    return model


def piece_seed(seed: int, index: int) -> int:
    """The RNG seed of piece `index` (its position in `pieces`) for a model seeded with `seed`."""
    return (seed * 1_000_003 + index * 7_919 + 1) % 2**63


@torch.no_grad()
def build(
    config: JambaConfig | str, device="cpu", dtype=torch.bfloat16, quantize=None, seed: int = 0, progress: bool = False,
) -> Jamba:  # fmt: skip
    """A model with seeded random weights, made piece by piece directly on `device`, in eval mode.

    config: a JambaConfig or a preset name ('jamba-v0.1', 'tiny'). quantize: None or 'int8' (int8
    experts, see minijamba.inference.quant). seed: weights are a function of (seed, piece, device type)."""
    if isinstance(config, str):
        config = JambaConfig.from_preset(config)
    check_seed(seed)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = meta_model(config, dtype, quantize)
    todo = pieces(model)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"building {config.describe()} on {device}", unit="piece")
    devices = [device] if device.type == "cuda" else []
    for index, (_, module) in enumerate(todo):
        module.to_empty(device=device)
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(piece_seed(seed, index))
            init_piece_(module, config)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def from_preset(
    name: str,
    device="cpu",
    dtype=torch.bfloat16,
    quantize=None,
    seed: int = 0,
    progress: bool = False,
    **overrides,
):
    """`build` for a preset, with optional config overrides (e.g. num_hidden_layers=8)."""
    return build(JambaConfig.from_preset(name, **overrides), device, dtype, quantize, seed, progress)
