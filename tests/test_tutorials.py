"""The tutorials cannot rot: every ```python block of every chapter runs, in order, one namespace per
chapter, with the working directory set to tutorials/ (so figures land in tutorials/figures/).

The extraction and execution live in tutorials/run.py, which is also the command that regenerates
the figures, so there is one extractor for both.
"""

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

# As in tests/helpers.py: one torch thread per xdist worker, or two workers fight over two cores.
torch.set_num_threads(1)

_RUN = Path(__file__).resolve().parent.parent / "tutorials" / "run.py"
_spec = importlib.util.spec_from_file_location("tutorials_run", _RUN)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

CHAPTERS = run.chapters()


def test_chapters_are_numbered_from_01_without_gaps():
    assert CHAPTERS, "no tutorials/NN-name.md chapters found"
    assert [int(p.name[:2]) for p in CHAPTERS] == list(range(1, len(CHAPTERS) + 1)), [p.name for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_and_makes_its_figures(path):
    blocks = run.extract_blocks(path)
    assert blocks, f"{path.name} has no python blocks"
    start = time.time()
    run.run_chapter(path)
    for figure in run.figures_referenced(path):
        written = path.parent / figure
        assert written.exists(), f"{path.name} shows {figure} but running it did not write it"
        assert written.stat().st_mtime >= start - 1, f"{path.name} shows {figure} but did not rewrite it"


@pytest.mark.parametrize("path", CHAPTERS + [_RUN.parent / "README.md"], ids=[p.stem for p in CHAPTERS] + ["README"])
def test_chapter_links_resolve(path):
    """Every relative link (to a module, a chapter, a figure) points at a file that exists."""
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_readme_lists_every_chapter():
    readme = (_RUN.parent / "README.md").read_text(encoding="utf-8")
    for path in CHAPTERS:
        assert f"({path.name})" in readme, f"tutorials/README.md does not link {path.name}"


def test_extractor(tmp_path):
    md = tmp_path / "01-x.md"
    md.write_text(
        "text\n```python\na = 1\n```\n```bash\nnot python\n```\n````text\n```python\nnot run\n```\n````\n"
        "```python\nb = a + 1\n```\n",
        encoding="utf-8",
    )
    blocks = run.extract_blocks(md)
    assert [b.code for b in blocks] == ["a = 1\n", "b = a + 1\n"]
    assert [b.line for b in blocks] == [3, 14]
    assert run.run_chapter(md)["b"] == 2


def test_a_failing_block_names_its_line(tmp_path):
    md = tmp_path / "01-x.md"
    md.write_text("```python\nx = 1\n```\n\n```python\nraise ValueError('boom')\n```\n", encoding="utf-8")
    with pytest.raises(run.BlockError, match=r"01-x.md: block 2 \(starting on line 6\).*boom"):
        run.run_chapter(md)


def test_unclosed_fence_is_an_error(tmp_path):
    md = tmp_path / "01-x.md"
    md.write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closed"):
        run.extract_blocks(md)
