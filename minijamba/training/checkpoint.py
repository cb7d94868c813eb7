"""Training checkpoints: one folder holding everything needed to resume a run or sample from it.

    model.safetensors      the weights (a tied LM head is stored once, as embed_tokens.weight)
    optimizer.safetensors  AdamW's moments and step per parameter, keyed by parameter name;
                           the parameter groups (lr, betas, ...) as JSON in the file's metadata
    train_state.json       step, schedule, loss history, RNG states, data fingerprint
    config.json            the model (transformers' JambaConfig keys, see JambaConfig.to_hf)
    train_config.json      the TrainConfig of the run
    tokenizer.json         the tokenizer the model was trained with
    loss.png               the loss curves (when matplotlib is installed)
    manifest.json          size and SHA-256 of each .safetensors file, to detect corruption

Only safetensors and JSON: nothing is ever unpickled, so a checkpoint from anywhere is safe to open.

Atomic writes (minijamba.atomic, shared with hf.save_hf): the new checkpoint is written to a
temporary sibling folder, then swapped in with two renames (old -> backup, new -> final) and the
backup deleted. A crash at any moment leaves either the old checkpoint or the new one in place (or,
between the two renames, the old one as the backup, which `load` and `save` put back; they also
delete the temporary folders of saves that died). Files in the folder that are not the checkpoint's
own (notes.txt, samples/) are carried into the new one; a folder that holds only other files is
never written into. Weights that are NaN or infinite are never written.

Optimizer state is keyed by parameter name, not by position, in the same layout as PyTorch's
`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`: a full (unsharded) state
dict written by one process loads into any number of processes, and the reverse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os  # noqa: F401  (the module minijamba.atomic renames with; tests patch checkpoint.os.replace)
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from minijamba import atomic
from minijamba.checks import first_non_finite, read_json_object
from minijamba.training import tokenizer as tk
from minijamba.model.config import JambaConfig

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "train_state.json"
CONFIG, TRAIN_CONFIG, TOKENIZER, MANIFEST = (
    "config.json",
    "train_config.json",
    "tokenizer.json",
    "manifest.json",
)
FOR_SAMPLING = (MODEL, CONFIG, TOKENIZER)
FOR_RESUMING = FOR_SAMPLING + (OPTIMIZER, STATE, TRAIN_CONFIG)
PLOT = "loss.png"
OWNED = frozenset(FOR_RESUMING + (MANIFEST, PLOT))  # what a save writes; anything else is the user's
FORMAT = "minijamba-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt, or does not fit the model."""


# --- state dicts -------------------------------------------------------------------------------
def model_state(model) -> dict[str, torch.Tensor]:
    """The weights as name -> contiguous CPU tensor; a tied LM head is left out (it is the embedding)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_model_state(model, tensors: dict[str, torch.Tensor], source: str = MODEL) -> None:
    """Copy `tensors` into `model` (or assign them, if the model is on the meta device), checking
    that names and shapes match exactly."""
    _check_float(tensors, source)
    expected = model_state_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source} does not fit the model in config.json: {what}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model in config.json needs {shape}"
            )
    meta = model.embed_tokens.weight.device.type == "meta"
    model.load_state_dict(tensors, strict=False, assign=meta)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def model_state_shapes(model) -> dict[str, tuple]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as ("<param name>/<key>" -> tensor, param groups listing parameter names)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        params = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        for p, name in zip(group["params"], params):
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{name}/{key}"] = t.detach().to("cpu").contiguous()
    return tensors, groups


def load_optimizer_state(model, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Put back what `optimizer_state` returned, matching parameters by name."""
    params = dict(model.named_parameters())
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{OPTIMIZER} has {len(groups)} parameter groups, the optimizer {len(optimizer.param_groups)}"
        )
    for saved, group in zip(groups, optimizer.param_groups):
        if sorted(saved["params"]) != sorted(params_names(model, group)):
            raise CheckpointError(
                f"{OPTIMIZER} does not fit the model: its parameter groups name other parameters"
            )
        group.update({k: v for k, v in saved.items() if k != "params"})
        for name in saved["params"]:
            p = params[name]
            state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
            for key, value in state.items():
                if key != "step" and value.shape != p.shape:
                    raise CheckpointError(
                        f"{OPTIMIZER}: {name}/{key} has shape {tuple(value.shape)}, expected {tuple(p.shape)}"
                    )
            if state:
                optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in state.items()}


def params_names(model, group) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in group["params"]]


def rng_state() -> dict:
    """The RNG states of torch (CPU and every CUDA device), as JSON-safe strings."""
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()
    out = {"torch_cpu": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["torch_cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    if "torch_cpu" in state:
        torch.set_rng_state(dec(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        states = [dec(s) for s in state["torch_cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# --- writing -----------------------------------------------------------------------------------
def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / STATE).is_file()


def _check_target(out_dir: Path) -> None:
    atomic.recover(out_dir)  # a save interrupted between its two renames: put the old one back
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out-dir {out_dir} is a file, not a folder: choose another --out-dir")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_checkpoint(out_dir):
        raise FileExistsError(
            f"--out-dir {out_dir} holds files that are not a minijamba checkpoint: choose another --out-dir"
        )


def _not_writable(out_dir: Path, e: OSError, where: Path | None = None) -> ValueError:
    above = out_dir.parent  # the nearest folder above that exists, or the file in the way
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        why = f"{above} is a file, not a folder"
    elif where is not None:  # the parent exists but takes no new folder
        why = f"a folder cannot be created in {where}: {e.strerror or e}"
    else:
        why = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return ValueError(f"--out-dir {out_dir} cannot be written ({why}): choose another --out-dir")


def check_writable(out_dir: str | Path) -> None:
    """Raise unless a checkpoint can be saved to `out_dir`: it is absent, empty, or a checkpoint
    folder (the only kind we replace), and its parent folder takes the temporary sibling a save
    writes into (tried, then removed). Creates missing parent folders, never `out_dir` itself."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(out_dir, e) from None
    _check_target(out_dir)
    try:
        atomic.probe(out_dir)
    except OSError as e:
        raise _not_writable(out_dir, e, out_dir.parent) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save(
    out_dir: str | Path,
    *,
    model_tensors: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    param_groups: list[dict],
    config: JambaConfig,
    train_config: dict,
    tokenizer,
    train_state: dict,
    plot=None,
) -> None:
    """Write a complete checkpoint to `out_dir` atomically. `plot(path)`, if given, draws loss.png.

    Refuses (ValueError, nothing written) model tensors that hold NaN or infinite values. Entries of
    `out_dir` that are not the checkpoint's own files are kept."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    bad = first_non_finite(model_tensors)
    if bad is not None:
        raise ValueError(
            f"model tensor {bad} holds NaN or infinite values: not writing a checkpoint of broken weights "
            f"to {out_dir} (the one there, if any, is kept)"
        )
    check_writable(out_dir)
    try:
        tmp = atomic.temp_folder(out_dir)
    except OSError as e:
        raise _not_writable(out_dir, e, out_dir.parent) from None
    try:
        save_file(model_tensors, str(tmp / MODEL), metadata={"format": "pt"})
        save_file(
            optimizer_tensors, str(tmp / OPTIMIZER), metadata={"param_groups": json.dumps(param_groups)}
        )
        _write_json(tmp / CONFIG, config.to_hf())
        _write_json(tmp / TRAIN_CONFIG, train_config)
        _write_json(tmp / STATE, train_state)
        tokenizer.save(str(tmp / TOKENIZER))
        if plot is not None:
            plot(tmp / PLOT)
        files = {
            n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in (MODEL, OPTIMIZER)
        }
        _write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
        atomic.replace_folder(tmp, out_dir, keep=lambda name: name not in OWNED)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- reading -----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What `load` read from a checkpoint folder (training parts are None when not asked for)."""

    path: Path
    config: JambaConfig
    tokenizer: object
    model_tensors: dict[str, torch.Tensor]
    train_config: dict | None = None
    train_state: dict | None = None
    optimizer_tensors: dict[str, torch.Tensor] | None = None
    param_groups: list[dict] | None = None


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _read_safetensors(path: Path, manifest: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    entry = (manifest or {}).get("files", {}).get(path.name)
    if entry is not None and (
        path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256")
    ):
        raise CheckpointError(f"{path} does not match its checksum in {MANIFEST}: the file is corrupt")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})  # noqa: SIM118
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}): the file is corrupt") from None


def _check_float(tensors: dict[str, torch.Tensor], source) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(
                f"{source}: {name} holds {str(t.dtype).removeprefix('torch.')} values, not floating point: "
                "these are not the weights of a minijamba model"
            )


def _check_model_tensors(config: JambaConfig, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Before anything is built: weights are floating point, and config.json does not describe a
    model far larger than model.safetensors holds (`checks.check_size`)."""
    from minijamba.checks import check_size

    _check_float(tensors, path / MODEL)
    try:
        check_size(config, {k: tuple(v.shape) for k, v in tensors.items()}, path / CONFIG, path / MODEL)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load(path: str | Path, training: bool = True) -> Checkpoint:
    """Read a checkpoint folder; `training=False` reads only what sampling needs.

    Raises FileNotFoundError for a missing folder or file and CheckpointError for a corrupt one,
    each naming the file.
    """
    path = Path(path)
    atomic.recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: the folder does not exist")
    needed = FOR_RESUMING if training else FOR_SAMPLING
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"the checkpoint in {path} is incomplete: {', '.join(missing)} missing")
    manifest = _read_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    try:
        config = JambaConfig.from_hf(_read_json(path / CONFIG))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG} does not describe a valid model: {e}") from None
    tokenizer = tk.load(path / TOKENIZER)
    tensors, _ = _read_safetensors(path / MODEL, manifest)
    _check_model_tensors(config, tensors, path)
    ckpt = Checkpoint(path, config, tokenizer, tensors)
    if training:
        ckpt.train_config = _read_json(path / TRAIN_CONFIG)
        ckpt.train_state = _read_json(path / STATE)
        if "step" not in ckpt.train_state:
            raise CheckpointError(f"{path / STATE} has no 'step': the file is corrupt")
        ckpt.optimizer_tensors, meta = _read_safetensors(path / OPTIMIZER, manifest)
        try:
            ckpt.param_groups = json.loads(meta["param_groups"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(
                f"{path / OPTIMIZER} has no parameter groups in its metadata: the file is corrupt"
            ) from None
    return ckpt


def load_model(path: str | Path, device="cpu", dtype=None, scan_backend: str | None = None):
    """(model, tokenizer) from a checkpoint folder, ready for sampling (eval mode)."""
    from minijamba.model.jamba import Jamba

    ckpt = load(path, training=False)
    ckpt.config.scan_backend = scan_backend
    with torch.device("meta"):
        model = Jamba(ckpt.config)
    load_model_state(model, ckpt.model_tensors, source=str(Path(path) / MODEL))
    if ckpt.tokenizer.get_vocab_size() > ckpt.config.vocab_size:
        raise CheckpointError(
            f"{Path(path) / TOKENIZER} has {ckpt.tokenizer.get_vocab_size()} tokens but the model only "
            f"{ckpt.config.vocab_size}: the tokenizer belongs to another model"
        )
    model.check_finite(Path(path) / MODEL)  # NaN or inf weights: refused as they load, like a corrupt file
    return model.to(device=device, dtype=dtype).eval(), ckpt.tokenizer
