"""Run the tutorials: every ```python block of each chapter, in order, one namespace per chapter,
and show what each block prints in a ```text output block under it.

    python tutorials/run.py              # every chapter; rewrites tutorials/figures/*.png and the outputs
    python tutorials/run.py 03 07        # only the chapters whose file name starts with 03 or 07
    python tutorials/run.py --check      # run, and fail where a recorded output differs (writes nothing)

The blocks run with the working directory set to tutorials/, so a chapter that saves
`figures/name.png` writes the PNG its Markdown shows. matplotlib uses the Agg backend (no window).
A failing block is reported with the chapter and the Markdown line it starts on; tracebacks point
at lines of the .md file itself. `tests/test_tutorials.py` imports this file, so the test and this
command extract and run the blocks in exactly the same way.

Only fences that open with exactly ```python run; shell commands go in ```bash fences and output
in ```text fences, which are shown but not run. What a block prints is written into the
```text output fence that follows it (created, replaced, or removed when it prints nothing), so a
reader of the rendered page sees it. A block whose output is not the same from run to run (timings)
starts with the comment `# output varies`: its output is shown but not compared.

A ```python fence inside an HTML comment (`<!--` ... `-->`) runs too but is not shown: chapters hold
their prose to the code that way. `says(text)`, in every chapter's namespace, fails unless the
chapter's text contains `text`, so a check block can build a sentence from the code's numbers
(`says(f"{mib} MiB instead of 2 GiB")`) and the prose cannot drift from them.
"""

from __future__ import annotations

import contextlib
import io
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


OUTPUT_FENCE = "```text output"
VARIES = "# output varies"


class Block(NamedTuple):
    line: int  # 1-based line of the Markdown file where the code starts (after the fence)
    code: str
    output: str | None = None  # the ```text output block under it, as recorded (None: there is none)
    hidden: bool = False  # inside an HTML comment: run, not shown

    @property
    def varies(self) -> bool:
        return self.code.lstrip().startswith(VARIES)


class BlockError(RuntimeError):
    """A block of a chapter raised; the message names the chapter, the block and its line."""


def chapters(root: Path = TUTORIALS) -> list[Path]:
    """The numbered chapters, in order: tutorials/NN-name.md."""
    return sorted(p for p in root.iterdir() if CHAPTER.match(p.name))


def extract_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order, each with the output block recorded under
    it. An unclosed fence is an error."""
    return [b for b, _ in _scan(Path(path).read_text(encoding="utf-8").splitlines(), path)]


def _scan(lines: list[str], path) -> list[tuple[Block, tuple[int, int] | None]]:
    """(block, (first, last) 0-based line span of its output fence, or None) for every python block."""
    out, code, start, fence, hidden, comment = [], None, 0, None, False, False
    number = 0
    while number < len(lines):
        line = lines[number]
        stripped = line.strip()
        number += 1
        if code is None:
            if stripped.startswith("<!--"):
                comment = "-->" not in stripped
            elif comment and "-->" in stripped:
                comment = False
            if stripped.startswith("```"):
                fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]  # ``` or longer
                if stripped[len(fence) :].strip() == "python":
                    code, start, hidden = [], number + 1, comment
                else:
                    code, start = False, number + 1  # a fence we show but do not run
        elif stripped == fence:
            if code is not False:
                block = Block(start, "\n".join(code) + "\n", hidden=hidden)
                span = _output_span(lines, number)
                if span is not None:
                    block = block._replace(output="".join(x + "\n" for x in lines[span[0] + 1 : span[1]]))
                out.append((block, span))
            code = None
        elif code is not False:
            code.append(line)
    if code is not None:
        raise ValueError(f"{path}: the code fence opened on line {start - 1} is never closed")
    return out


def _output_span(lines: list[str], after: int) -> tuple[int, int] | None:
    """The ```text output fence starting at `after` (0-based; blank lines before it allowed)."""
    i = after
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or lines[i].strip() != OUTPUT_FENCE:
        return None
    for j in range(i + 1, len(lines)):
        if lines[j].strip() == "```":
            return i, j
    raise ValueError(f"the output fence on line {i + 1} is never closed")


def write_outputs(path: Path, outputs: list[str]) -> bool:
    """Put each shown block's output in the ```text output fence under it (created, replaced, or
    removed when the block prints nothing). Returns whether the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    scanned = _scan(lines, path)
    if len(scanned) != len(outputs):
        raise ValueError(f"{path}: {len(outputs)} outputs for {len(scanned)} blocks")
    for (block, span), output in reversed(list(zip(scanned, outputs))):
        close = block.line - 1 + block.code.count("\n")  # the closing fence's 0-based line
        new = [] if block.hidden or not output else ["", OUTPUT_FENCE, *output.rstrip("\n").split("\n"), "```"]
        if span is not None:
            lines[close + 1 : span[1] + 1] = new
        else:
            lines[close + 1 : close + 1] = new
    new_text = "\n".join(lines) + "\n"
    if new_text != text:
        path.write_text(new_text, encoding="utf-8")
    return new_text != text


def figures_referenced(path: Path) -> list[str]:
    """The figures/NAME.png paths a chapter shows, in order of appearance."""
    return FIGURE_REF.findall(Path(path).read_text(encoding="utf-8"))


def run_chapter(path: Path, verbose: bool = False, figures: Path | None = None) -> dict:
    """Execute every python block of one chapter in one fresh namespace; return the namespace, with
    what each block printed under the key "__outputs__".

    The working directory is tutorials/ while the blocks run, and it and torch's thread count are
    restored after; the torch seed is 0 at the start, so figures come out the same each run on the
    same machine and code (timings aside). figures: write `figures/NAME.png` there instead (the
    tests use a temporary folder, so that running them leaves the tree as it was)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.figure import Figure

    path = Path(path).resolve()
    text = path.read_text(encoding="utf-8")

    def says(phrase: str) -> None:
        if phrase not in text:
            raise AssertionError(f"{path.name} should say {phrase!r} (the code's number), and does not")

    namespace = {"__name__": f"tutorial_{path.stem.replace('-', '_')}", "__file__": str(path), "says": says}
    cwd, threads = os.getcwd(), torch.get_num_threads()  # chapters may change both; restore them
    os.chdir(path.parent)
    (path.parent / "figures").mkdir(exist_ok=True)
    save = Figure.savefig

    def savefig(fig, fname, *args, **kwargs):
        if figures is not None and isinstance(fname, (str, Path)) and Path(fname).parts[:1] == ("figures",):
            Path(figures).mkdir(parents=True, exist_ok=True)
            fname = Path(figures) / Path(fname).name
        return save(fig, fname, *args, **kwargs)

    Figure.savefig = savefig
    torch.manual_seed(0)
    outputs = []
    try:
        for i, block in enumerate(extract_blocks(path), start=1):
            # Pad with blank lines so that line numbers in tracebacks are the Markdown file's.
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            t0 = time.perf_counter()
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, namespace)
            except Exception as exc:
                raise BlockError(
                    f"{path.name}: block {i} (starting on line {block.line}) raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                plt.close("all")
                outputs.append(printed.getvalue())
            if verbose:
                print(f"  [{path.name} block {i}, line {block.line}: {time.perf_counter() - t0:.1f}s]")
    finally:
        Figure.savefig = save
        os.chdir(cwd)
        torch.set_num_threads(threads)
    namespace["__outputs__"] = outputs
    return namespace


def differences(path: Path, outputs: list[str]) -> list[str]:
    """Where the recorded outputs of a chapter differ from `outputs`: a shown block that prints and
    has no output block, or a block not marked `# output varies` whose output changed."""
    out = []
    for i, (block, got) in enumerate(zip(extract_blocks(path), outputs, strict=True), start=1):
        where = f"{Path(path).name} block {i} (line {block.line})"
        if block.hidden:
            continue
        if got and block.output is None:
            out.append(f"{where} prints but shows nothing: run python tutorials/run.py to write its output")
        elif not got and block.output is not None:
            out.append(f"{where} prints nothing but shows an output: run python tutorials/run.py")
        elif got and not block.varies and got.rstrip("\n") != block.output.rstrip("\n"):
            out.append(f"{where} now prints something else:\n--- shown\n{block.output}--- now\n{got}")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Run the tutorials' python blocks, regenerate tutorials/figures/*.png and the outputs shown."
    )
    parser.add_argument("prefixes", nargs="*", help="run only chapters whose file name starts with these (e.g. 03)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print per-block timings")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail where a shown output differs from what the block prints now")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run against this checkout even when it is not installed
    selected = [p for p in chapters() if not args.prefixes or p.name.startswith(tuple(args.prefixes))]
    if not selected:
        parser.error(f"no chapter starts with {' or '.join(args.prefixes)}; chapters: "
                     + ", ".join(p.name for p in chapters()))
    total, problems = time.perf_counter(), []
    for path in selected:
        print(f"== {path.name}", flush=True)
        t0 = time.perf_counter()
        if args.check:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                outputs = run_chapter(path, verbose=not args.quiet, figures=Path(tmp))["__outputs__"]
            problems += differences(path, outputs)
        else:
            outputs = run_chapter(path, verbose=not args.quiet)["__outputs__"]
            if write_outputs(path, outputs):
                print(f"   outputs rewritten in {path.name}")
        print(f"== {path.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"{len(selected)} chapter(s) in {time.perf_counter() - total:.1f}s; figures in {TUTORIALS / 'figures'}")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
