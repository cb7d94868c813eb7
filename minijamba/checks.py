"""Checks of values that come from outside (flags, files, callers), shared by the CLIs and the library.

Each raises one ValueError that names what was wrong, the bad value and what would work, at the
place the value enters, instead of a deep error (an overflow inside torch, a NaN in a softmax) later.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping

import torch

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
_CHUNK = 2**20  # elements checked at a time: a whole tensor's isfinite temporaries would cost as much as a shard


def first_non_finite(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None.

    named_tensors: a state dict, or (name, tensor) pairs such as `model.named_parameters()`.
    Meta tensors (no data) and integer tensors (int8 experts) are skipped. Checked _CHUNK elements
    at a time (isfinite's temporaries stay a few MB whatever the tensor's size), one sync a tensor."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    for name, t in items:
        if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        finite = torch.stack([torch.isfinite(part).all() for part in flat.split(_CHUNK)])
        if not bool(finite.all()):
            return name
    return None


def check_finite(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], source
) -> None:
    """Raise ValueError naming the first floating-point tensor that holds a NaN or an infinity
    (`first_non_finite`); source: where the tensors came from (a file or folder), the start of the message."""
    name = first_non_finite(named_tensors)
    if name is not None:
        raise ValueError(
            f"{source}: tensor {name} holds NaN or inf: the weights are corrupt (or the run that wrote "
            "them diverged)"
        )


def check_seed(seed, name: str = "seed") -> int:
    """`seed` if it is an integer torch's generators take (0 .. 2**64 - 1), else ValueError naming `name`."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be an integer from 0 to 2**64 - 1 = {SEED_MAX}, got {seed!r}")
    return seed


def finite_number(value, name: str) -> float:
    """`value` as a float if it is a finite real number (not a bool), else ValueError naming `name`."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return x


_WORDS = {int: "an integer", float: "a finite number", bool: "a bool", str: "a string", dict: "a dict",
          type(None): "None"}  # fmt: skip


def type_problem(value, hint) -> str | None:
    """What `value` should be if it does not match the type annotation `hint`, else None.

    int: an int, not a bool; float: a finite int or float, not a bool; bool: a bool; str: a str;
    dict: a dict; tuple[X, Y]: a tuple or list of that length and those types; list[X]: a list of
    X; a union (X | None): any of its members. Other annotations are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, a) for a in args]
        return None if None in problems else " or ".join(problems)
    if hint is type(None):
        return None if value is None else "None"
    if origin is list:
        if not isinstance(value, list) or any(type_problem(v, args[0]) for v in value):
            return f"a list of {_WORDS.get(args[0], str(args[0]))[3:]}s"  # "a list of integers"
        return None
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(args) or any(
            type_problem(v, a) for v, a in zip(value, args)
        ):
            return f"a tuple of {len(args)} values ({', '.join(_WORDS.get(a, str(a)) for a in args)})"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else _WORDS[bool]
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _WORDS[int]
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else _WORDS[float]
    if hint in (str, dict):
        return None if isinstance(value, hint) else _WORDS[hint]
    return None


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict:
    """The type annotations of a class's fields, evaluated (once per class)."""
    return typing.get_type_hints(cls)


def check_fields(obj, name_of=lambda field: field) -> None:
    """Raise ValueError naming (via `name_of`) the first field of the dataclass `obj` whose value does
    not match its annotation (see `type_problem`)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        want = type_problem(value, hints[f.name])
        if want is not None:
            raise ValueError(f"{name_of(f.name)} must be {want}, got {value!r}")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_size(config, shapes: dict[str, tuple], config_path, weights) -> None:
    """Raise ValueError, before anything is built, when `config` (a JambaConfig) describes a model far larger than
    the tensors `shapes` (name -> shape, from the file headers) hold: more than twice their
    parameters (plus 2^20), or more than twice their layers (plus 16). Building such a model only
    to list what is missing could take hours or overflow; a smaller disagreement goes on to the
    detailed listing of missing, unexpected and misshapen tensors."""
    planned, layers = config.num_parameters(), config.num_hidden_layers  # arithmetic: nothing is built
    held = sum(
        _numel(shape) for key, shape in shapes.items()
        if not (config.tie_word_embeddings and key == "lm_head.weight")
    )  # fmt: skip
    held_layers = 1 + max((int(m.group(1)) for m in map(_LAYER.search, shapes) if m), default=-1)
    if planned == held:
        return
    if planned > 2 * held + 2**20 or layers > 2 * held_layers + 16:
        raise ValueError(
            f"{config_path} describes a model of {layers:,} layers and {planned:,} parameters, but the "
            f"weights ({weights}) hold {held_layers:,} layers and {held:,} parameters: the config.json does "
            "not belong to these weights (nothing was built)"
        )


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def read_json_object(path, error: type[ValueError] = ValueError, what: str = "the file is corrupt") -> dict:
    """The JSON object in the file at `path`; `error` (a ValueError) naming the file if it is not
    JSON or holds something other than an object (`what` says what that means)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}): the file is corrupt") from None
    if not isinstance(obj, dict):
        raise error(f"{path} should hold a JSON object: {what}")
    return obj
