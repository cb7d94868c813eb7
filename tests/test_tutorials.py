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
def test_chapter_runs_makes_its_figures_and_shows_what_it_prints(path, tmp_path):
    """Every block runs; the figures go to a temporary folder (the tree is left as it was); every
    block that prints shows its output, and a deterministic block's output is the one shown."""
    blocks = run.extract_blocks(path)
    assert blocks, f"{path.name} has no python blocks"
    before = {p: p.stat().st_mtime for p in (path.parent / "figures").iterdir()}
    outputs = run.run_chapter(path, figures=tmp_path)["__outputs__"]
    for figure in run.figures_referenced(path):
        assert (tmp_path / Path(figure).name).exists(), f"{path.name} shows {figure} but running it did not write it"
    assert {p: p.stat().st_mtime for p in (path.parent / "figures").iterdir()} == before, "the tree's figures changed"
    problems = run.differences(path, outputs)
    assert not problems, "\n".join(problems)


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


def test_outputs_are_written_replaced_and_removed(tmp_path):
    md = tmp_path / "01-x.md"
    md.write_text("```python\nprint(1)\n```\n\ntext\n\n```python\nx = 2\n```\n"
                  "<!--\n```python\nprint('hidden')\n```\n-->\n", encoding="utf-8")  # fmt: skip
    outputs = run.run_chapter(md)["__outputs__"]
    assert outputs == ["1\n", "", "hidden\n"]
    assert run.differences(md, outputs) == [f"01-x.md block 1 (line 2) prints but shows nothing: run python tutorials/run.py to write its output"]
    assert run.write_outputs(md, outputs)
    assert "```python\nprint(1)\n```\n\n```text output\n1\n```\n" in md.read_text()
    assert "print('hidden')\n```\n-->" in md.read_text() and md.read_text().count("```text output") == 1
    assert run.differences(md, outputs) == [] and not run.write_outputs(md, outputs)  # stable
    assert "now prints something else" in run.differences(md, ["2\n", "", ""])[0]
    md.write_text(md.read_text().replace("print(1)", "# output varies\nprint(1)"))
    assert run.differences(md, ["2\n", "", ""]) == []  # shown, not compared
    run.write_outputs(md, ["", "", ""])
    assert "```text output" not in md.read_text()


def test_says_holds_the_prose_to_the_code(tmp_path):
    md = tmp_path / "01-x.md"
    md.write_text("The state is 4 MiB.\n\n<!--\n```python\nsays(f'{2 * 2} MiB')\n```\n-->\n", encoding="utf-8")
    run.run_chapter(md)
    md.write_text(md.read_text().replace("4 MiB.", "8 MiB."))
    with pytest.raises(run.BlockError, match="should say '4 MiB'"):
        run.run_chapter(md)
