"""Test-session setup that must happen before any test module imports torch or triton.

Without a GPU, Triton kernels run through Triton's interpreter. The switch is read when
triton.language is first imported, and importing minijamba can pull it in (through torch._dynamo),
so it is set here, before collection, rather than in the test files that need it.
"""

import os
import shutil
import textwrap
from pathlib import Path

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def good_checkpoint(text_file, tmp_path_factory):
    """A training checkpoint at step 2 (never modified: tests work on copies, `helpers.copy_of`)."""
    from helpers import quiet, train_config
    from minijamba.training.train import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    torch.set_num_threads(1)
    train(train_config(text_file, out, max_steps=2), log=quiet)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread, and two test workers share two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small real Python source file to train on."""
    path = tmp_path_factory.mktemp("data") / "sample.py"
    path.write_text(Path(textwrap.__file__).read_text(encoding="utf-8"))
    return path
