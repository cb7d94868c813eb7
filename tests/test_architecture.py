"""The layout's rules, held by reading the source: the reference model is plain, and nothing imports
in a circle.

- `minijamba/model/` is for reading: no autograd.Function, no torch.compile or torch.compiler, no
  CUDA graphs, no Triton or custom ops, and no import from the fast side (`minijamba.kernels`), the
  inference side or the training side. Its layers reach the fast side only through
  `minijamba.model.dispatch`, where the fast side registers itself.
- No import cycle between minijamba's modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minijamba"
MODEL = PACKAGE / "model"

FORBIDDEN_IMPORTS = ("triton", "minijamba.kernels", "minijamba.inference", "minijamba.training",
                     "torch.library", "torch._dynamo", "torch._inductor", "mamba_ssm", "causal_conv1d")  # fmt: skip
FORBIDDEN_ATTRIBUTES = ("torch.compile", "torch.compiler", "torch.autograd.Function", "torch.cuda.graph",
                        "torch.cuda.CUDAGraph", "torch.library")  # fmt: skip


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, anywhere in the file (absolute names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for name in _imports(path):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS):
            found.append(f"imports {name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name and any(name == f or name.startswith(f + ".") for f in FORBIDDEN_ATTRIBUTES):
                found.append(f"uses {name} (line {node.lineno})")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (_dotted(base) or "").endswith("Function"):
                    found.append(f"class {node.name} subclasses {_dotted(base)}")
    return found


@pytest.mark.parametrize("path", sorted(MODEL.glob("*.py")), ids=lambda p: p.name)
def test_the_reference_model_is_plain(path):
    assert _violations(path) == []


def test_the_rules_catch_what_they_name(tmp_path):
    """The checks themselves: each forbidden thing is found (a test that cannot fail is a defect)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nfrom minijamba.kernels import time_last\nimport triton.language as tl\n"
        "class F(torch.autograd.Function):\n    pass\n"
        "step = torch.compile(lambda x: x)\ntorch.compiler.disable(step)\ng = torch.cuda.CUDAGraph()\n"
    )
    found = " | ".join(_violations(bad))
    for needle in ("minijamba.kernels", "triton.language", "subclasses torch.autograd.Function",
                   "torch.compile", "torch.compiler.disable", "torch.cuda.CUDAGraph"):  # fmt: skip
        assert needle in found, found


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            while imp and imp not in modules:  # `from pkg import name` where name is not a module
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is no cycle
                deps.add(imp)
        graph[name] = deps
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_public_api_alone_knows_every_backend():
    """`import minijamba` registers the fast side's backends: a fresh process that imports only the
    public API can name them (the model package itself never imports the fast side)."""
    import subprocess
    import sys

    code = ("from minijamba import Jamba, JambaConfig; from minijamba.model import dispatch; "
            "print(sorted(dispatch.names())); Jamba(JambaConfig.from_preset('tiny', scan_backend='cpu'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['cpu', 'mamba_ssm', 'reference', 'triton']"
