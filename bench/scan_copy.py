"""Load another version of the Triton scan (e.g. the previous commit's) as a module of its own, beside
ours: its own CONFIG, kernels and custom-op names. Used by gpu_scan.py --extra and sass_offline.py --file.

A version is the path of its `triton_scan.py`. Older versions are that one file; since the kernels
moved to `triton_scan_fwd.py` and `triton_scan_bwd.py` beside it, those come along, as one package.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import tempfile
from pathlib import Path

PARTS = ("triton_scan.py", "triton_scan_fwd.py", "triton_scan_bwd.py")
_COPIES = itertools.count()


def load(path: Path | str, namespace: str | None = None):
    """The module `triton_scan` of the version at `path`; its custom ops are registered under
    torch.ops.<namespace> (a fresh name each call by default: torch.library defines a name once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a copy of minijamba/kernels/triton_scan.py)")
    ns = namespace or f"minijamba_copy{next(_COPIES)}"
    package = Path(tempfile.mkdtemp()) / ns
    package.mkdir()
    (package / "__init__.py").write_text("")
    for part in PARTS:
        src_path = path if part == PARTS[0] else path.with_name(part)
        if part != PARTS[0] and not src_path.is_file():
            continue  # a one-file version
        src = src_path.read_text().replace('"minijamba::', f'"{ns}::')
        src = src.replace("torch.ops.minijamba.", f"torch.ops.{ns}.")
        src = src.replace("minijamba.kernels.triton_scan_", f"{ns}.triton_scan_")
        (package / part).write_text(src)
    sys.path.insert(0, str(package.parent))
    saved = os.environ.pop("TRITON_INTERPRET", None)  # kernels defined while it is set are interpreted
    try:
        return importlib.import_module(f"{ns}.triton_scan")
    finally:
        sys.path.remove(str(package.parent))
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
