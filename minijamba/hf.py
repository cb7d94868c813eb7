"""Reading and writing transformers' Jamba checkpoints: a folder with config.json and safetensors.

Glossary:

    n   experts in an MoE layer
    h   model width
    f   hidden width of an expert (intermediate_size)
    i   layer index, j expert index

Tensor names are transformers' `JambaForCausalLM` state dict keys: ours with a `model.` prefix
(`lm_head.weight` has none). The experts come in two layouts, and `load_hf` reads both:

    per expert   model.layers.{i}.feed_forward.experts.{j}.gate_proj.weight   (f, h)
                 model.layers.{i}.feed_forward.experts.{j}.up_proj.weight     (f, h)
                 model.layers.{i}.feed_forward.experts.{j}.down_proj.weight   (h, f)
                 as the published checkpoints (ai21labs/Jamba-v0.1) and transformers' save_pretrained
                 write them; `save_hf` writes this layout too, so from_pretrained loads it.
    fused        model.layers.{i}.feed_forward.experts.gate_up_proj           (n, 2f, h)
                 model.layers.{i}.feed_forward.experts.down_proj              (n, h, f)
                 as transformers 5 holds them in memory (its state_dict()) and minijamba's `Experts`
                 stores them: gate_up_proj[j] = cat([gate_j, up_j]), gate first, which is what
                 transformers' conversion does (stack the experts, then concatenate gate and up).

Loading is built for models larger than host memory (the 52B Jamba-v0.1 onto a GPU):

    1. plan     read only the shard headers (names, shapes, dtypes); refuse tensors that are not
                floating point, and a config.json that describes a model far larger than the
                headers hold (`check_size`: its size is planned by arithmetic, nothing is built);
                map every tensor to the parameter, and the slice of it, that it fills; report every
                missing, unexpected or misshapen tensor before a single weight is read
    2. build    `Jamba(config)` on the meta device: no memory, no initialisation
    3. fill     shard by shard (one open at a time, one tensor in host memory at a time), copy each
                tensor into its parameter, allocated on `device` in `dtype` when first needed; a fused
                expert parameter is filled expert by expert, so experts may straddle shards
    4. finish   a parameter whose last slice has arrived goes through `_finish_parameter`. With
                quantize='int8' the experts are `minijamba.inference.quant.Int8Experts` from the start and each
                expert tensor is quantized on `device` the moment it is read (scales are per row, so
                gate, up and down quantize on their own): the experts never exist in 16 bits, and
                the full-precision model never has to fit on the device

A_log, D and dt_proj.bias stay in float32 whatever `dtype` is: the scan reads them in float32
(A = -exp(A_log), the skip D, and Δ = softplus(Δ + bias)), and rounding them to bf16 would move every
channel's decay rate and step size. They are a tiny fraction of the parameters.

Only safetensors are read: never torch.load or pickle, which can run code from an untrusted file.
And only files inside the folder: an index entry that is absolute or climbs out with `..`, or a
file that is a symbolic link to somewhere outside, is refused. (One exception, so that a Hugging Face
hub cache snapshot loads as it is: a file in `<repo>/snapshots/<revision>/` may link into `<repo>/blobs/`.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from minijamba import atomic
from minijamba.checks import check_size, read_json_object
from minijamba.model.config import JambaConfig
from minijamba.model.jamba import FLOAT32_PARAMS, Jamba, cast_parameters, keeps_float32 as _fp32  # noqa: F401

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_MODES = (None, "int8")  # `quantize` values load_hf accepts (see minijamba.inference.quant)

_PER_EXPERT = re.compile(  # layers.{i}.feed_forward.experts.{j}.{gate,up,down}_proj.weight
    r"^(layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}  # fmt: skip
_SHOW = 8  # names shown in an error message before "... and N more"


# ------------------------------------------------------------------------------------------------
# names
def _file_key(name: str) -> str:
    """Our parameter name -> transformers' key: a `model.` prefix except for the LM head."""
    return name if name == "lm_head.weight" else f"model.{name}"


def _model_name(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return f"{shown} ... and {len(names) - _SHOW} more" if len(names) > _SHOW else shown


# ------------------------------------------------------------------------------------------------
# loading
@dataclass
class _Piece:
    """Where one tensor of the files goes: `index` of parameter `name`, which covers `parts`."""

    key: str  # the tensor's name in the files
    name: str  # our parameter
    index: tuple  # the slice of the parameter it fills (() = all of it)
    parts: frozenset  # which parts of the parameter it covers, for the missing-tensor check
    shape: tuple  # the shape the tensor must have


def _parts(name: str, shape: tuple) -> frozenset:
    """The parts a parameter is assembled from: one per expert and projection for fused experts."""
    if name.endswith("experts.gate_up_proj"):
        return frozenset((j, p) for j in range(shape[0]) for p in ("gate_proj", "up_proj"))
    if name.endswith("experts.down_proj"):
        return frozenset((j, "down_proj") for j in range(shape[0]))
    return frozenset([None])


def _piece(key: str, shapes: dict[str, tuple]) -> _Piece | None:
    """Map a file key onto our parameters, or None when it has no place in this model."""
    name = _model_name(key)
    if name in shapes:
        return _Piece(key, name, (), _parts(name, shapes[name]), shapes[name])
    m = _PER_EXPERT.match(name)
    if m is None:
        return None
    prefix, j, proj = m.group(1), int(m.group(2)), m.group(3)
    target = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
    if target not in shapes or j >= shapes[target][0]:
        return None
    n, rows, cols = shapes[target]
    if proj == "down_proj":
        index = (j,)
    else:
        f = rows // 2
        index = (j, slice(0, f)) if proj == "gate_proj" else (j, slice(f, 2 * f))
        rows = f
    return _Piece(key, target, index, frozenset([(j, proj)]), (rows, cols))


def _missing_keys(name: str, shape: tuple, have: frozenset) -> list[str]:
    """File keys a reader could add to supply the parts of `name` that nothing supplied."""
    missing = _parts(name, shape) - have
    if missing == _parts(name, shape) or missing == {None}:
        return [_file_key(name)]
    prefix = name.rsplit(".", 1)[0]
    return [_file_key(f"{prefix}.{j}.{p}.weight") for j, p in sorted(missing)]


def _inside(path: Path, folder: Path) -> Path:
    """`path`, after checking that it (following symbolic links) lies inside `folder`."""
    real, root = path.resolve(), folder.resolve()
    if real == root or root in real.parents:
        return path
    if root.parent.name == "snapshots" and root.parent.parent / "blobs" in real.parents:
        return path  # a Hugging Face hub cache snapshot: its files link to ../../blobs/<hash>
    raise ValueError(
        f"{path} is a link to {real}, outside the checkpoint folder {folder}: only files inside it are read"
    )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards named by the index, or the one file.
    Every one must lie inside the folder (see the module docstring)."""
    index = folder / INDEX_NAME
    if index.is_file():
        _inside(index, folder)
        obj = read_json_object(index, what="it has no 'weight_map': it is not a safetensors index")
        weight_map = obj.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map': it is not a safetensors index")
        for key, value in weight_map.items():
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{index}: weight_map entry {key!r} is {value!r}, not a file name: the index is corrupt"
                )
            name = PurePosixPath(value)
            if name.is_absolute() or ".." in name.parts or "\\" in value:
                raise ValueError(
                    f"{index}: weight_map entry {key!r} names {value!r}, outside the checkpoint folder: "
                    "shards must be files inside it (a relative name without '..')"
                )
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is listed in {index} but does not exist: the download is incomplete"
                )
            _inside(f, folder)
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [_inside(folder / WEIGHTS_NAME, folder)]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {WEIGHTS_NAME}, or {INDEX_NAME} with its shards "
        "(only safetensors are read; convert .bin checkpoints with transformers first)"
    )


def read_config(folder) -> JambaConfig:
    """The JambaConfig of a checkpoint folder's config.json, after putting back a save that a crash
    interrupted. FileNotFoundError for a missing folder or config.json, ValueError naming the file
    for one that is not a Jamba's."""
    folder = Path(folder)
    atomic.recover(folder)  # a save_hf interrupted between its two renames: put the old folder back
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist (or is not a folder)")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_NAME} does not exist: a checkpoint folder needs its config.json")
    path = _inside(folder / CONFIG_NAME, folder)
    hf = read_json_object(path, what="it is not a config.json")
    try:
        return JambaConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} does not describe a valid Jamba: {e}") from None


# ------------------------------------------------------------------------------------------------
# the size a config describes, planned before anything is built


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"quantize={quantize!r} is not supported: choose one of {', '.join(map(repr, QUANTIZE_MODES))}"
        )


def _finish_parameter(model: Jamba, name: str, tensor: torch.Tensor, quantize) -> None:
    """The quantize hook: the one place a fully loaded tensor becomes parameter `name` of the model.

    With quantize=None it is installed as it is. A quantized mode will replace the expert weights
    here, as each completes, by their quantized form (and the modules that use them)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def load_hf(path, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None,
            adapter=None) -> Jamba:  # fmt: skip
    """Load a transformers Jamba checkpoint folder (config.json + safetensors) as a `Jamba`.

    path: the folder; weights in `model.safetensors`, or sharded with `model.safetensors.index.json`;
        experts per expert or fused (see the module docstring).
    device: where the parameters are created, directly (the model never sits in host memory whole).
    dtype: of the parameters; None = the dtype the checkpoint stores its embedding in. A_log, D and
        dt_proj.bias are float32 whatever this is.
    quantize: None, or 'int8' for int8 weight-only experts (minijamba.inference.quant), quantized as they load;
        everything else (Mamba layers included) stays in `dtype`.

    adapter: a LoRA adapter folder in PEFT's format (minijamba.hf_adapter), applied unmerged (the
        base frozen; `minijamba.model.lora.merge_lora_` folds it in), or None.

    With `tie_word_embeddings` the LM head is the embedding, and an `lm_head.weight` in the files
    is ignored, as transformers does.

    Raises FileNotFoundError for a missing folder, config.json or weight file, and ValueError for a
    file outside the folder (an index entry or a link), a corrupt config.json or index, tensors that
    are not floating point, a config far larger than the weights (all before anything is built), and
    listing the missing, unexpected or misshapen tensors. Returns the model in eval mode.
    """
    _check_quantize(quantize)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    folder, device = Path(path), torch.device(device)
    config, files = _open_folder(folder)
    headers = _read_headers(folder, config, files)  # 1. plan: headers only, the size by arithmetic
    model, int8 = _meta_model(config, device, quantize)  # 2. build: no memory, no initialisation
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied head listed once
    plan, stored_dtype = _plan(folder, config, files, headers, shapes)
    dtype = dtype or stored_dtype or torch.float32
    _fill(model, files, plan, shapes, int8, dtype, device, quantize)  # 3. fill; 4. finish each parameter
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.check_finite(folder)  # NaN or inf weights: refused as they load, like a corrupt file
    if adapter is not None:
        from minijamba.hf_adapter import load_adapter

        load_adapter(model, adapter)
    return model.eval()


def _open_folder(folder: Path) -> tuple[JambaConfig, list[Path]]:
    """The folder's config and weight files, after putting back a save that a crash interrupted."""
    return read_config(folder), _weight_files(folder)


def _read_headers(folder: Path, config: JambaConfig, files: list[Path]) -> dict[Path, list[tuple[str, tuple, str]]]:
    """(key, shape, dtype) of every tensor of every file, from the headers alone; refuses tensors that
    are not floating point and a config far larger than the files hold, before anything is built."""
    from safetensors import safe_open

    headers: dict[Path, list[tuple[str, tuple, str]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            headers[file] = []
            for key in f.keys():  # noqa: SIM118
                info = f.get_slice(key)
                headers[file].append((key, tuple(info.get_shape()), info.get_dtype()))
    not_float = [f"{key} ({dt})" for file in files for key, _, dt in headers[file] if dt not in _DTYPES]
    if not_float:
        raise ValueError(
            f"the tensors in {folder} must be floating point ({', '.join(_DTYPES)}), and {len(not_float)} "
            f"are not: {_listing(not_float)}; these are not the weights of a Jamba"
        )
    check_size(config, {key: shape for file in files for key, shape, _ in headers[file]},
               folder / CONFIG_NAME, ", ".join(f.name for f in files))  # fmt: skip
    return headers


def _meta_model(config: JambaConfig, device: torch.device, quantize) -> tuple[Jamba, dict]:
    """The model on the meta device, and with quantize='int8' its experts as `Int8Experts` on
    `device` (experts module name -> Int8Experts), to be filled as the tensors arrive."""
    with torch.device("meta"):
        model = Jamba(config)
    int8 = {}
    if quantize == "int8":
        from minijamba.inference.quant import Int8Experts
        from minijamba.model.moe import Experts

        for name, module in list(model.named_modules()):
            if isinstance(module, Experts):
                parent, _, attr = name.rpartition(".")
                int8[name] = Int8Experts(config, device=device)
                setattr(model.get_submodule(parent), attr, int8[name])
    return model, int8


def _plan(folder, config, files, headers, shapes) -> tuple[dict[Path, list[_Piece]], torch.dtype | None]:
    """Where each tensor of the files goes (file -> its pieces), and the dtype the embedding is stored
    in; a ValueError listing the missing, unexpected, misshapen and repeated tensors."""
    plan: dict[Path, list[_Piece]] = {f: [] for f in files}
    have: dict[str, frozenset] = {name: frozenset() for name in shapes}
    unexpected, misshapen, twice = [], [], []
    stored_dtype = None
    for file in files:
        for key, shape, dt in headers[file]:
            piece = _piece(key, shapes)
            if piece is None:
                if not (key == "lm_head.weight" and config.tie_word_embeddings):  # tied: the embedding
                    unexpected.append(key)
                continue
            if have[piece.name] & piece.parts:
                twice.append(key)
                continue
            have[piece.name] |= piece.parts  # found (so not also listed as missing)
            if shape != piece.shape:
                misshapen.append(f"{key} {shape} (expected {piece.shape})")
            else:
                plan[file].append(piece)
                if piece.name == "embed_tokens.weight" or stored_dtype is None:
                    stored_dtype = _DTYPES.get(dt, stored_dtype)
    missing = [k for name in shapes if have[name] != _parts(name, shapes[name])
               for k in _missing_keys(name, shapes[name], have[name])]  # fmt: skip
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen),
                       ("given twice", twice)):  # fmt: skip
        if keys:
            problems.append(f"{len(keys)} {what}: {_listing(keys)}")
    if problems:
        raise ValueError(
            f"the tensors in {folder} do not match its config.json ({config.describe()}): "
            + "; ".join(problems)
        )
    return plan, stored_dtype


def _fill(model, files, plan, shapes, int8, dtype, device, quantize) -> None:
    """Read the files shard by shard into the planned pieces; each parameter is finished (installed,
    or quantized) as its last part arrives, so one shard at a time is in memory."""
    from safetensors import safe_open

    filling: dict[str, torch.Tensor] = {}
    done: dict[str, frozenset] = {name: frozenset() for name in shapes}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for piece in plan[file]:
                module_name, _, attr = piece.name.rpartition(".")
                if module_name in int8:  # int8 experts: quantized as read, in place
                    int8[module_name].load_rows_(attr, piece.index, f.get_tensor(piece.key))
                    continue
                if piece.name not in filling:
                    filling[piece.name] = torch.empty(
                        shapes[piece.name], dtype=torch.float32 if _fp32(piece.name) else dtype, device=device
                    )
                filling[piece.name][piece.index].copy_(f.get_tensor(piece.key))
                done[piece.name] |= piece.parts
                if done[piece.name] == _parts(piece.name, shapes[piece.name]):
                    _finish_parameter(model, piece.name, filling.pop(piece.name), quantize)
