"""Test-session setup that must happen before any test module imports torch or triton.

Without a GPU, Triton kernels run through Triton's interpreter. The switch is read when
triton.language is first imported, and importing minijamba can pull it in (through torch._dynamo),
so it is set here, before collection, rather than in the test files that need it.
"""

import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
