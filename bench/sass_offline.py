"""The scan kernels' machine code for an H100/H200 (sm_90), compiled here, without a GPU.

Triton's wheel carries ptxas, cuobjdump and nvdisasm, so a kernel compiles to sm_90 SASS on any
Linux machine. This prints what decides a latency-bound kernel's speed: registers per thread (the
warps an SM can hold), spills, and per loop the instruction count and mix; then the shuffles
(SHFL, data moving between threads) by the source line they come from. That is how the reverse
scan that Triton 3.6 lowers to ~150 shuffles a state was found (bench/RESULTS.md, 2026-12-02).

    python bench/sass_offline.py bwd                       # the committed CONFIG["bwd"]
    python bench/sass_offline.py fwd_train --ti 8 --warps 1
    python bench/sass_offline.py bwd --file .old/triton_scan.py  # another version of the file
    PYTHONPATH=/tmp/triton36 python bench/sass_offline.py bwd    # another Triton (pip install
                                                                 # --target /tmp/triton36 triton==3.6.0)

The launch is specialised as on the GPU at the benchmark shapes: bf16 u, Δ, z, B, C (and dout), fp32
A, D, bias and state, every pointer 16-byte aligned and d, l multiples of 16; bias, softplus, D and z
on. Writes the PTX, TTGIR and SASS to --out.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import scan_copy  # noqa: E402

# (argument names, types) of each kernel, as triton_scan.py declares them
ARGS = {
    "fwd": (
        "u delta A B C D z bias h0 seq out hlast hsave dim L",
        "*bf16 *bf16 *fp32 *bf16 *bf16 *fp32 *bf16 *fp32 *fp32 *i32 *bf16 *fp32 *fp32 i32 i32",
    ),
    "bwd": (
        "u delta A B C D z bias seq hsave dout dhlast du ddelta dz dA dB dC dD dbias dh0 dim L",
        "*bf16 *bf16 *fp32 *bf16 *bf16 *fp32 *bf16 *fp32 *i32 *fp32 *bf16 *fp32 "
        "*bf16 *bf16 *bf16 *fp32 *fp32 *fp32 *fp32 *fp32 *fp32 i32 i32",
    ),
}
FLAGS = dict(N=16, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False)


def compile_kernel(path: Path, which: str, ti: int | None, warps: int | None):
    """The compiled kernel (triton's CompiledKernel) for CONFIG[which], or the given TI and warps."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = scan_copy.load(path)  # its custom ops get names of their own, a new one each call
    cfg = dict(mod.CONFIG[which])
    if ti is not None:
        cfg["TI"] = ti
    if warps is not None:
        cfg["num_warps"], cfg["TT"] = warps, 32 * warps
    kind = "bwd" if which == "bwd" else "fwd"
    names, types = (s.split() for s in ARGS[kind])
    const = dict(FLAGS, TI=cfg["TI"], TT=cfg["TT"])
    if kind == "bwd":
        const["HAS_DHLAST"] = False
    else:
        const.update(HAS_H0=False, SAVE=which == "fwd_train", TB=mod._bwd_chunk())
    fn = mod._bwd_kernel if kind == "bwd" else mod._fwd_kernel
    params = list(fn.arg_names)
    sig = dict(zip(params, types + ["constexpr"] * len(const)))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
    ast = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(ast, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["num_warps"])), cfg


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of every line of a SASS listing."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def loops(ins: list[tuple[int, str]]) -> list[tuple[int, int, collections.Counter]]:
    """Each backward branch's loop: (start, end, opcode counts)."""
    where = {a: k for k, (a, _) in enumerate(ins)}
    found = []
    for k, (a, text) in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\(.*?\)\s*)?(?:\S+\s+)?0x([0-9a-f]+)", text)
        target = int(m.group(1), 16) if m else None
        if target is not None and target < a and target in where:
            body = ins[where[target] : k + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
            found.append((target, a, ops))
    return found


def shuffles_by_line(cubin: Path) -> collections.Counter:
    """SHFL instructions counted by the source (file, line) nvdisasm's line info gives them."""
    listing = subprocess.run([_tool("nvdisasm"), "-g", "-c", str(cubin)], capture_output=True, text=True).stdout
    where, counts = None, collections.Counter()
    for line in listing.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (Path(m.group(1)).name, int(m.group(2)))
        elif "SHFL" in line:
            counts[where] += 1
    return counts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["fwd", "fwd_train", "bwd"], help="which kernel (a CONFIG key)")
    ap.add_argument("--file", type=Path, default=ROOT / "minijamba" / "kernels" / "triton_scan.py")
    ap.add_argument("--ti", type=int, help="steps per thread (default: CONFIG's)")
    ap.add_argument("--warps", type=int, help="warps per program (default: CONFIG's)")
    ap.add_argument("--out", type=Path, default=Path("out/sass"), help="folder for the .ptx, .ttgir, .sass")
    args = ap.parse_args(argv)
    if not args.file.is_file():
        raise SystemExit(f"--file {args.file}: no such file (a copy of minijamba/kernels/triton_scan.py)")
    import triton

    kernel, cfg = compile_kernel(args.file, args.which, args.ti, args.warps)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.which
    for ext in ("ptx", "ttgir"):
        (stem.with_suffix("." + ext)).write_text(kernel.asm[ext])
    cubin = stem.with_suffix(".cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    stem.with_suffix(".sass").write_text(sass)
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ins = instructions(sass)
    print(f"{args.which} of {args.file.name}, Triton {triton.__version__}, sm_90, {cfg}")
    print(f"  {len(ins)} instructions, {regs} registers a thread, {spills} bytes of local memory (spills)")
    found = loops(ins)
    for start, end, ops in found:
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        print(f"  loop {start:#06x}-{end:#06x}: {sum(ops.values())} instructions ({top})")
    by_line = shuffles_by_line(cubin)
    for (name, line), n in sorted(by_line.items(), key=lambda kv: -kv[1])[:6] if by_line else []:
        print(f"  {n:4d} SHFL from {name}:{line}")
    return dict(instructions=len(ins), registers=regs, spills=spills, loops=[sum(o.values()) for *_, o in found],
                shuffles=dict(by_line))  # fmt: skip


if __name__ == "__main__":
    main()
