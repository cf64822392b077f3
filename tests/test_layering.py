"""The import graph of ``var/`` (static AST parse, lazy imports inside functions included): no cycles, no upward
imports, no imports between sibling packages of one layer; each subpackage imports on its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "var"

# DESIGN.md's layering, lowest first: a module may import its own subpackage and any lower layer, nothing else.
# train sits below eval because evaluation renders the procedural training data (var.train.data); train never
# needs eval.
# var.errors imports nothing of var: it sits below utils, so range checks and file helpers raise named errors
LAYERS = (("var.errors",), ("var.utils", "var.assets"), ("var.tokenizers", "var.kernels"), ("var.models",),
          ("var.hub", "var.samplers"), ("var.train",), ("var.eval",), ("var.cli",), ("var",))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The ``var`` module ``name`` refers to (a submodule if it is one, else its nearest package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every ``var`` module that ``module`` imports, at the top or lazily inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from var.samplers import jacobi" imports the submodule var.samplers.jacobi
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in map(_resolve, (f for f in found if f == "var" or f.startswith("var."))) if m and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, top-level package) of a module."""
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or (package != "var" and module.startswith(package + ".")):
                return index, package
    raise AssertionError(f"{module} is in no layer of LAYERS: add its package")


def test_every_package_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_upward_or_sideways_imports():
    bad = []
    for module, targets in sorted(GRAPH.items()):
        (layer, package) = layer_of(module)
        for target in sorted(targets):
            target_layer, target_package = layer_of(target)
            if target_package != package and target_layer >= layer:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering " + str(LAYERS) + ":\n  " + "\n  ".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("var.kernels.kv_cache") < layer_of("var.models.gpt") < layer_of("var.samplers.jacobi")
    assert "var.samplers.next_scale" in GRAPH["var.samplers"]  # "from var.samplers.x import y" is seen


SUBPACKAGES = sorted({p for layer in LAYERS for p in layer if p != "var"})


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_imports_on_its_own(package):
    """A fresh interpreter imports ``package`` alone and loads no ``var`` module of a higher layer."""
    code = (f"import sys, {package}; "
            "print('\\n'.join(m for m in sys.modules if m == 'var' or m.startswith('var.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    layer, _ = layer_of(package)
    loaded = [m for m in out.stdout.split() if m in MODULES and m != "var"]
    above = [m for m in loaded if layer_of(m)[0] > layer]
    assert not above, f"import {package} loads higher layers: {above}"


def test_moved_names_keep_working():
    """``var.kernels.calibrate`` (now :func:`var.samplers.calibrate`) resolves with a DeprecationWarning; the
    top-level subpackages load on first access."""
    import var
    import var.kernels
    with pytest.warns(DeprecationWarning, match="var.samplers.calibrate"):
        assert var.kernels.calibrate is var.samplers.calibrate
    assert var.hub.load_var is not None and "hub" in dir(var)
    with pytest.raises(AttributeError):
        var.not_a_subpackage
