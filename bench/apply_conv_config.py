"""Write the launch shapes a `gpu_conv.py --sweep` chose (its gpu_conv.json) into triton_conv.py.

    python bench/apply_conv_config.py $OUT/conv/gpu_conv.json

Used on a device run between the sweep and the measurements that should use its choice; the
choice then goes into the repository by hand, with the sweep's log in bench/results/.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "minijamba" / "kernels" / "triton_conv.py"


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        raise SystemExit("usage: python bench/apply_conv_config.py PATH/TO/gpu_conv.json (from gpu_conv.py --sweep)")
    result = json.loads(Path(argv[0]).read_text())
    cfg, programs = result["config"], result["programs"]
    src = PATH.read_text()
    for key in ("fwd", "bwd"):
        c = cfg[key]
        new = f'"{key}": dict(BLOCK_L={c["BLOCK_L"]}, BLOCK_D={c["BLOCK_D"]}, num_warps={c["num_warps"]}),'
        src, n = re.subn(rf'"{key}": dict\([^)]*\),', new, src, count=1)
        if n != 1:
            raise SystemExit(f"CONFIG[{key!r}] not found in {PATH}")
    src, n = re.subn(r"^PROGRAMS = \d+", f"PROGRAMS = {programs}", src, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"PROGRAMS not found in {PATH}")
    PATH.write_text(src)
    print(f"triton_conv CONFIG = {cfg}, PROGRAMS = {programs}")


if __name__ == "__main__":
    main(sys.argv[1:])
