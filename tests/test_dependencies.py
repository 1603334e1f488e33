"""pyproject.toml's dependencies stay true to the code and to the MONAI in use (issue 19)."""

from __future__ import annotations

import ast
import re
from importlib.metadata import requires, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _deps() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def _floor(spec: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split(".")[:2])


def test_torch_floor_is_the_one_the_installed_monai_declares():
    monai_torch = next(r for r in requires("monai") if re.match(r"torch\s*[><=]", r))
    ours = next(d for d in _deps() if d.startswith("torch"))
    assert _floor(ours) == _floor(monai_torch), (ours, monai_torch)
    monai_dep = next(d for d in _deps() if d.startswith("monai"))
    assert _floor(monai_dep) <= tuple(int(x) for x in version("monai").split(".")[:2])


def test_einops_comes_with_monai_because_vqldm_never_imports_it():
    used = set()
    for path in (ROOT / "src" / "vqldm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used.add(node.module.split(".")[0])
    assert "einops" not in used
    assert not any(d.startswith("einops") for d in _deps())
    assert any(d.startswith("monai[einops]") for d in _deps())
