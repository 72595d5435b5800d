"""The package's layout: stages import one way only, no module imports another in a cycle, no sibling import hides
inside a function, and a wheel carries the data files (device profiles, the bundled model, the prior table)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ccmoe_runtime"
# Each stage may import the stages before it (and itself), never one after it: ccmoe_runtime/__init__.py explains.
LAYERS = ["core", "model", "engine", "devices", "testmodels", "placement", "compress", "prune", "serve", "bench", "cli"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, bool]]:
    """(importing module, imported module, inside a function?) for every import of a ccmoe_runtime module."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                names = [n for n in names if n.startswith("ccmoe_runtime")]
            else:
                continue
            found += [(mod, n, node.col_offset > 0) for n in names if _exists(n)]
    return found


def _exists(module: str) -> bool:
    """A module or package of ccmoe_runtime (not an attribute such as ccmoe_runtime.__version__)."""
    path = PACKAGE.parent / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else ""    # `python -m ccmoe_runtime` is the CLI


def test_stages_import_only_the_stages_before_them():
    wrong = [(a, b) for a, b, _ in _imports() if _stage(a) and _stage(b) and _stage(a) != _stage(b)
             and LAYERS.index(_stage(b)) > LAYERS.index(_stage(a))]
    assert not wrong, wrong


def test_every_stage_is_a_listed_subpackage():
    stages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert stages == sorted(LAYERS)
    # no flat modules beside the stages; __main__ only runs the CLI
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in _imports():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_no_sibling_import_hides_inside_a_function():
    lazy = [(a, b) for a, b, inside in _imports() if inside]
    assert not lazy, lazy


@pytest.mark.slow
def test_the_wheel_carries_the_data_files(tmp_path):
    """A non-editable install finds device profiles, the bundled model and the prior table (package data)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(PACKAGE.parent)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("ccmoe_runtime-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ccmoe_runtime/devices/data/strixhalo-128g.toml" in names
    assert "ccmoe_runtime/testmodels/bundled/ccmoe-mini-moe-f16.gguf" in names
    assert "ccmoe_runtime/compress/gaussian-errors.json" in names
    assert "ccmoe_runtime/cli/__main__.py" in names
