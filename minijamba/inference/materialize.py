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

import math

import torch
from torch import nn

from minijamba.model.config import JambaConfig
from minijamba.model.jamba import cast_parameters
from minijamba.model.jamba import Jamba
from minijamba.model.moe import Experts, SparseMoE
from minijamba.model.norm import RMSNorm
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


def pieces(model: Jamba) -> list[tuple[str, nn.Module]]:
    """The model in the order it is built: embedding, each decoder layer, final norm, LM head."""
    out = [("embed_tokens", model.embed_tokens)]
    out += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    out += [("final_layernorm", model.final_layernorm)]
    if not model.config.tie_word_embeddings:
        out += [("lm_head", model.lm_head)]
    return out


def piece_seed(seed: int, index: int) -> int:
    """The RNG seed of piece `index` (its position in `pieces`) for a model seeded with `seed`."""
    return (seed * 1_000_003 + index * 7_919 + 1) % 2**63


@torch.no_grad()
def init_piece_(module: nn.Module, config: JambaConfig) -> None:
    """Random weights for one piece, as `Jamba.reset_parameters` draws them, except that the experts
    of an MoE layer are drawn one expert at a time (float and int8 experts alike)."""
    std = config.initializer_range
    out_std = std / math.sqrt(2 * config.num_hidden_layers)
    if isinstance(module, (nn.Embedding, nn.Linear)):  # the embedding and the LM head
        nn.init.normal_(module.weight, std=std)
        return
    for sub in module.modules():
        if isinstance(sub, SparseMoE):
            nn.init.normal_(sub.router.weight, std=std)
            _init_experts_(sub.experts, std, out_std)
        elif isinstance(sub, RMSNorm):
            sub.reset_parameters()
        elif isinstance(sub, (nn.Linear, nn.Conv1d, nn.Embedding, Experts, Int8Experts)):
            continue  # initialised by the module that owns them
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters(std=std, out_std=out_std)


def _init_experts_(experts, std: float, out_std: float) -> None:
    if isinstance(experts, Int8Experts):
        experts.reset_parameters(std, out_std)  # float32 draws, quantized expert by expert
        return
    for i in range(experts.gate_up_proj.shape[0]):
        shape_gu, shape_d = experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]
        device = experts.gate_up_proj.device
        experts.gate_up_proj[i].copy_(torch.empty(shape_gu, device=device).normal_(0, std))
        experts.down_proj[i].copy_(torch.empty(shape_d, device=device).normal_(0, out_std))


@torch.no_grad()
def build(
    config: JambaConfig | str, device="cpu", dtype=torch.bfloat16, quantize=None, seed: int = 0, progress: bool = False,
) -> Jamba:  # fmt: skip
    """A model with seeded random weights, made piece by piece directly on `device`, in eval mode.

    config: a JambaConfig or a preset name ('jamba-v0.1', 'tiny'). quantize: None or 'int8' (int8
    experts, see minijamba.inference.quant). seed: weights are a function of (seed, piece, device type)."""
    if isinstance(config, str):
        config = JambaConfig.from_preset(config)
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
