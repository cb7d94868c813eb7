"""Saving a model as transformers' Jamba checkpoint: the folder `JambaForCausalLM.from_pretrained` loads.

The format (names, the per-expert layout, sharding) is minijamba.hf's; this is its writer:
config.json (`config.to_hf()`) and safetensors in the per-expert layout, sharded by size, swapped
in atomically (minijamba.atomic).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from minijamba import atomic
from minijamba.hf import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, _file_key
from minijamba.model.jamba import Jamba

def _parse_size(size) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (KB = 1000, KiB = 1024)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", str(size).upper())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or like '5GB', got {size!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def _hf_tensors(model: Jamba):
    """(file key, shape, dtype, make) for every tensor of the per-expert layout; `make()` returns a
    CPU copy, so that a shard's tensors exist only while the shard is written."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers ties it to the embedding on load
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            f = p.shape[1] // 2
            if p.dtype == torch.int8:  # int8 experts are written dequantized, in the model's dtype
                dtype = model.embed_tokens.weight.dtype
                p = _Dequantized(model.get_submodule(prefix), name.rpartition(".")[2], dtype)
            for j in range(p.shape[0]):
                if name.endswith("gate_up_proj"):
                    for proj, rows in (("gate_proj", slice(0, f)), ("up_proj", slice(f, 2 * f))):
                        out.append((_file_key(f"{prefix}.{j}.{proj}.weight"), (f, p.shape[2]), p.dtype,
                                    lambda p=p, j=j, rows=rows: p[j, rows]))  # fmt: skip
                else:
                    out.append((_file_key(f"{prefix}.{j}.down_proj.weight"), tuple(p.shape[1:]), p.dtype,
                                lambda p=p, j=j: p[j]))  # fmt: skip
        else:
            out.append((_file_key(name), tuple(p.shape), p.dtype, lambda p=p: p))
    return out


class _Dequantized:
    """Indexing gives float weights of an `Int8Experts` parameter, so a quantized model saves as floats."""

    def __init__(self, experts, name: str, dtype: torch.dtype):
        self.experts, self.name, self.dtype = experts, name, dtype
        self.shape = getattr(experts, name).shape

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        return self.experts.dequantized(self.name, index, self.dtype)


def save_hf(model: Jamba, path, max_shard_size="5GB", extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a folder transformers' `JambaForCausalLM.from_pretrained` loads.

    config.json (`config.to_hf()`) and safetensors in the per-expert layout: `model.safetensors`, or
    when larger than max_shard_size (bytes, or a string like '5GB') numbered shards with
    `model.safetensors.index.json`. Atomic (minijamba.atomic, as training checkpoints): everything is
    written to a temporary folder next to `path`, which then replaces it; other files already in
    `path` (a tokenizer, ...) are kept, and so are the folder's permissions. A `path` whose
    config.json is not a Jamba's (another model's folder) is refused, not overwritten. extra_files:
    name -> text of more files to write with them, in the same swap (a tokenizer, a generation
    config: `minijamba.export`). Returns the folder.
    """
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("the model is on the meta device: it has no weights to save")
    folder = Path(path)
    atomic.recover(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder: save_hf writes a checkpoint folder")
    _check_not_another_model(folder)

    tensors = _hf_tensors(model)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = torch.Size(t[1]).numel() * t[2].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_folder(folder)
    try:
        with torch.no_grad():
            for shard, file in zip(shards, names):
                data = {key: make().detach().to("cpu", copy=True).contiguous() for key, _, _, make in shard}
                save_file(data, tmp / file, metadata={"format": "pt"})
                del data
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(torch.Size(s).numel() * d.itemsize for _, s, d, _ in tensors)},
                "weight_map": {t[0]: file for shard, file in zip(shards, names) for t in shard},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf = model.config.to_hf()
        hf["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        extra = dict(extra_files or {})
        for name, text in extra.items():
            if Path(name).name != name or _OURS.match(name):
                raise ValueError(f"extra file {name!r}: give a plain file name that is not one of the model's files")
            (tmp / name).write_text(text, encoding="utf-8")
        atomic.replace_folder(tmp, folder, keep=lambda name: not _OURS.match(name) and name not in extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# The files save_hf writes, which replace those of the folder; everything else in it is kept.
_OURS = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json)$")


def _check_not_another_model(folder: Path) -> None:
    """Refuse to overwrite a config.json that is not a Jamba's: the folder holds another model."""
    path = folder / CONFIG_NAME
    if not (path.exists() or path.is_symlink()):
        return
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        hf = None
    if not isinstance(hf, dict) or hf.get("model_type") != "jamba":
        what = f"model_type {hf.get('model_type')!r}" if isinstance(hf, dict) else "not a model's config"
        raise ValueError(
            f"{path} is not a Jamba's config.json ({what}): save_hf would overwrite another model's "
            "folder; save to another folder, or remove it first"
        )
