"""LoRA adapters in PEFT's format: the folder `PeftModel.from_pretrained(JambaForCausalLM..., PATH)` loads.

    adapter_config.json          peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
                                 use_rslora, bias "none", task_type "CAUSAL_LM", base_model_name_or_path
    adapter_model.safetensors    base_model.model.<transformers' module name>.lora_A.weight   (r, i)
                                 base_model.model.<transformers' module name>.lora_B.weight   (o, r)

e.g. `base_model.model.model.layers.0.mamba.in_proj.lora_A.weight`: PEFT's wrapper prefix
(`base_model.model.`), then transformers' JambaForCausalLM name of the Linear, whose own `model.`
prefix ours lacks (minijamba.model.lora.hf_name). The adapter math is minijamba.model.lora's.

Read: LoRA only, with what PEFT's own LoRA does by default (no DoRA, no per-module ranks, no trained
biases, no extra trained modules); anything else is refused by name rather than applied wrongly.
Written atomically (minijamba.atomic): a crash leaves the folder as it was. Only safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from minijamba import atomic
from minijamba.checks import read_json_object
from minijamba.model.lora import NOT_TARGETS, LoRALinear, add_lora, hf_name, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's: its PeftModel holds a LoraModel that holds the model
_UNSUPPORTED = {  # PEFT settings a plain LoRA does not have: key -> the value that means "off"
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "fan_in_fan_out": False, "bias": "none",
    "lora_bias": False, "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None,
}  # fmt: skip


def _key(name: str, part: str) -> str:
    return f"{PREFIX}{hf_name(name)}.{part}.weight"


def adapter_config(modules: dict[str, LoRALinear], targets, base: str | None = None) -> dict:
    """adapter_config.json's fields for these adapters (one rank, alpha and dropout for all)."""
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "use_rslora": first.rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(set(targets)),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip


def save_adapter(model: nn.Module, path, targets, base: str | None = None) -> Path:
    """Write the model's adapters as a PEFT folder at `path` (created or replaced atomically; other
    files in it are kept). targets: the target_modules they were added with. Returns the folder."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save (add them with minijamba.model.lora.add_lora)")
    folder = Path(path)
    atomic.recover(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_folder(folder)
    try:
        tensors = {}
        for name, m in modules.items():
            tensors[_key(name, "lora_A")] = m.lora_A.weight.detach().to("cpu", torch.float32).contiguous()
            tensors[_key(name, "lora_B")] = m.lora_B.weight.detach().to("cpu", torch.float32).contiguous()
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        text = json.dumps(adapter_config(modules, targets, base), indent=2, sort_keys=True) + "\n"
        (tmp / ADAPTER_CONFIG).write_text(text)
        atomic.replace_folder(tmp, folder, keep=lambda n: n not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_adapter_config(folder) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked: FileNotFoundError for a missing folder or
    file, ValueError naming a field that is not a plain LoRA's."""
    folder = Path(folder)
    atomic.recover(folder)
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist (or is not a folder)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT's format)"
        )
    cfg = read_json_object(path, what="it is not an adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters ('LORA') are read")
    for key, off in _UNSUPPORTED.items():
        value = cfg.get(key, off)
        if value != off and not (off is None and value in ([], {})) and not (off == {} and value is None):
            raise ValueError(f"{path}: {key} = {value!r} is not supported (a plain LoRA has {off!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"{path}: r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        raise ValueError(f"{path}: target_modules must be a list of module names or a regex, got {targets!r}")
    return cfg


def load_adapter(model: nn.Module, folder) -> list[str]:
    """Add the adapters of a PEFT LoRA folder to `model` (in place, frozen base): our names of the
    wrapped Linears. ValueError when the folder's tensors do not fit this model (another model's
    adapter: missing, unexpected or misshapen tensors, listed)."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = "adapter_model.bin (a pickle, which is never read)" if (folder / "adapter_model.bin").is_file() else "no weights"
        raise FileNotFoundError(f"{weights} does not exist ({found}): save the adapter with safetensors")
    targets = cfg["target_modules"]
    if isinstance(targets, list):  # dt_proj: no effect in transformers' Jamba, so none here (lora.NOT_TARGETS)
        targets = [t for t in targets if t.rsplit(".", 1)[-1] not in NOT_TARGETS]
        if not targets:
            raise ValueError(f"{folder}: the adapter targets only {', '.join(cfg['target_modules'])}, which "
                             "transformers' Jamba does not apply: it changes nothing")  # fmt: skip
    names = add_lora(model, cfg["r"], float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0) or 0.0),
                     targets, bool(cfg.get("use_rslora", False)))  # fmt: skip
    modules = lora_modules(model)
    expected = {}
    for name, m in modules.items():
        expected[_key(name, "lora_A")] = (m.lora_A.weight, (m.r, m.in_features))
        expected[_key(name, "lora_B")] = (m.lora_B.weight, (m.out_features, m.r))
    with safe_open(weights, framework="pt") as f:
        keys = [k for k in f.keys() if k.split(".")[-3] not in NOT_TARGETS]  # noqa: SIM118 (see above)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        missing = sorted(set(expected) - set(keys))
        unexpected = sorted(set(keys) - set(expected))
        wrong = [f"{k} {shapes[k]} (this model's: {expected[k][1]})" for k in keys if k in expected and shapes[k] != expected[k][1]]
        problems = [f"{len(v)} {what}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                    for what, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v]  # fmt: skip
        if problems:
            raise ValueError(
                f"the adapter in {folder} does not fit this model ({'; '.join(problems)}): it was trained "
                "for another model; give the base folder it was made for"
            )
        with torch.no_grad():
            for k, (param, _) in expected.items():
                param.copy_(f.get_tensor(k))
    return names
