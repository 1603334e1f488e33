"""The import rules that docs/architecture.md states, enforced on the code.

The layers are read from the document itself (its "Layers" block), so the document and the code
cannot drift apart: a module may import its own component and components on lower lines, never a
component on its own line or a higher one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vqldm"


def documented_layers() -> list[list[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"## Layers.*?```text\n(.*?)```", text, re.S)
    assert m, "docs/architecture.md has no '## Layers' section with a ```text block"
    layers = []
    for line in m.group(1).splitlines():
        line = line.split("#")[0].strip()
        if line:
            layers.append(line.split())
    return layers


def component(module: str) -> str:
    """``vqldm.priors.diffusion.task`` -> ``priors``; ``vqldm`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported vqldm module) for every import in the file, at any depth (lazy ones too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vqldm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "vqldm":
                continue
            if base == "vqldm":  # from vqldm import distributed / latents / __version__
                found += [(node.lineno, f"vqldm.{a.name}" if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                           else "vqldm") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


# the package re-exports the Python API on first use (PEP 562 __getattr__), the one upward import
FACADE = {("__init__", "api")}


def violations(layers: list[list[str]]) -> list[str]:
    rank = {c: i for i, line in enumerate(layers) for c in line}
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mine = component(module_name(path))
        assert mine in rank, f"{path.relative_to(ROOT)}: component {mine!r} is not in docs/architecture.md's layers"
        for line, imported in imports_of(path):
            theirs = component(imported)
            assert theirs in rank, f"{path.relative_to(ROOT)}:{line} imports {imported}, not in the documented layers"
            if (mine, theirs) in FACADE:
                continue
            if theirs != mine and rank[theirs] >= rank[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} (layer {rank[mine]}) imports {imported} "
                           f"(layer {rank[theirs]})")
    return bad


def test_imports_run_one_way_as_documented():
    bad = violations(documented_layers())
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_import_vqldm_stays_light():
    """The API's names load on first use: ``import vqldm`` (what the CLI starts with) imports no torch,
    and the facade is the only upward import (a module-level import of the API would be one)."""
    import subprocess
    import sys

    code = "import sys, vqldm; print('torch' in sys.modules, 'vqldm.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    tree = ast.parse((SRC / "__init__.py").read_text(encoding="utf-8"))
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_every_documented_component_exists():
    for line in documented_layers():
        for c in line:
            assert c == "__init__" or (SRC / c).is_dir() or (SRC / f"{c}.py").is_file(), c


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule bites: with the engine moved below the data layer, its import of data is reported."""
    layers = documented_layers()
    flat = [c for line in layers for c in line]
    assert flat.index("data") < flat.index("engine")
    swapped = [[c for c in line if c != "engine"] for line in layers]
    swapped = [line for line in swapped if line]
    swapped.insert(0, ["engine"])
    bad = violations(swapped)
    assert any(v.startswith("src/vqldm/engine/") and "imports vqldm.data" in v for v in bad), bad
    same_line = [line + ["engine"] if "data" in line else [c for c in line if c != "engine"] for line in layers]
    assert any("engine" in v and "imports vqldm.data" in v for v in violations([l for l in same_line if l]))


@pytest.mark.parametrize("name", ["config", "errors", "files"])
def test_the_lowest_modules_import_no_torch(name):
    """config, errors and files stay light: no torch, MONAI or numpy at import."""
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    heavy = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             and any(m.split(".")[0] in ("torch", "monai", "numpy")
                     for m in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))]
    assert not heavy, name


def test_no_function_is_longer_than_60_lines():
    """Short enough to read at once: at most 60 lines, not counting the docstring."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
                if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                    n -= doc.end_lineno - doc.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
