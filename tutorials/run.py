"""Run the tutorials: every ```python block of each chapter, in order, one namespace per chapter.

    python tutorials/run.py              # every chapter; rewrites tutorials/figures/*.png
    python tutorials/run.py 03 07        # only the chapters whose file name starts with 03 or 07

The blocks run with the working directory set to tutorials/, so a chapter that saves
`figures/name.png` writes the PNG its Markdown shows. matplotlib uses the Agg backend (no window).
A failing block is reported with the chapter and the Markdown line it starts on; tracebacks point
at lines of the .md file itself. `tests/test_tutorials.py` imports this file, so the test and this
command extract and run the blocks in exactly the same way.

Only fences that open with exactly ```python run; shell commands go in ```bash fences and output
in ```text fences, which are shown but not run.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

TUTORIALS = Path(__file__).resolve().parent
ROOT = TUTORIALS.parent
CHAPTER = re.compile(r"^\d\d-[\w-]+\.md$")
FIGURE_REF = re.compile(r"\]\((figures/[\w.-]+\.png)\)")


class Block(NamedTuple):
    line: int  # 1-based line of the Markdown file where the code starts (after the fence)
    code: str


class BlockError(RuntimeError):
    """A block of a chapter raised; the message names the chapter, the block and its line."""


def chapters(root: Path = TUTORIALS) -> list[Path]:
    """The numbered chapters, in order: tutorials/NN-name.md."""
    return sorted(p for p in root.iterdir() if CHAPTER.match(p.name))


def extract_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order. An unclosed fence is an error."""
    blocks, code, start, fence = [], None, 0, None
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if code is None:
            if stripped.startswith("```"):
                fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]  # ``` or longer
                if stripped[len(fence) :].strip() == "python":
                    code, start = [], number + 1
                else:
                    code, start = False, number + 1  # a fence we show but do not run
        elif stripped == fence:
            if code is not False:
                blocks.append(Block(start, "\n".join(code) + "\n"))
            code = None
        elif code is not False:
            code.append(line)
    if code is not None:
        raise ValueError(f"{path}: the code fence opened on line {start - 1} is never closed")
    return blocks


def figures_referenced(path: Path) -> list[str]:
    """The figures/NAME.png paths a chapter shows, in order of appearance."""
    return FIGURE_REF.findall(Path(path).read_text(encoding="utf-8"))


def run_chapter(path: Path, verbose: bool = False) -> dict:
    """Execute every python block of one chapter in one fresh namespace; return the namespace.

    The working directory is tutorials/ while the blocks run, and it and torch's thread count are
    restored after; the torch seed is 0 at the start, so figures come out the same each run on the
    same machine and code (timings aside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    path = Path(path).resolve()
    namespace = {"__name__": f"tutorial_{path.stem.replace('-', '_')}", "__file__": str(path)}
    cwd, threads = os.getcwd(), torch.get_num_threads()  # chapters may change both; restore them
    os.chdir(path.parent)
    (path.parent / "figures").mkdir(exist_ok=True)
    torch.manual_seed(0)
    try:
        for i, block in enumerate(extract_blocks(path), start=1):
            # Pad with blank lines so that line numbers in tracebacks are the Markdown file's.
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            t0 = time.perf_counter()
            try:
                exec(code, namespace)
            except Exception as exc:
                raise BlockError(
                    f"{path.name}: block {i} (starting on line {block.line}) raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                plt.close("all")
            if verbose:
                print(f"  [{path.name} block {i}, line {block.line}: {time.perf_counter() - t0:.1f}s]")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return namespace


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Run the tutorials' python blocks and regenerate tutorials/figures/*.png."
    )
    parser.add_argument("prefixes", nargs="*", help="run only chapters whose file name starts with these (e.g. 03)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print per-block timings")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run against this checkout even when it is not installed
    selected = [p for p in chapters() if not args.prefixes or p.name.startswith(tuple(args.prefixes))]
    if not selected:
        parser.error(f"no chapter starts with {' or '.join(args.prefixes)}; chapters: "
                     + ", ".join(p.name for p in chapters()))
    total = time.perf_counter()
    for path in selected:
        print(f"== {path.name}", flush=True)
        t0 = time.perf_counter()
        run_chapter(path, verbose=not args.quiet)
        print(f"== {path.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"{len(selected)} chapter(s) in {time.perf_counter() - total:.1f}s; figures in {TUTORIALS / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
