"""The README, docs/ and --help texts stay true to the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from vqldm.cli import build_parser, main
from vqldm.config import _NON_KEYS, Config

ROOT = Path(__file__).resolve().parents[1]


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        if f.name in _NON_KEYS:  # source, migration: set by the loader, not YAML keys
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _keys(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_configuration_doc_lists_every_key():
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [k for k in _keys(Config()) if f"`{k}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert test_cmd.strip() in ci


SUBCOMMANDS = ["synth", "voxelize", "points", "check", "config", "train-vqvae", "train-diffusion", "train-prior",
               "import-checkpoint", "sample", "reconstruct", "edit", "export-bundle", "evaluate", "score", "demo",
               "benchmark"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_answers_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert cmd in capsys.readouterr().out


def test_readme_mentions_every_subcommand():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(SUBCOMMANDS) == set(sub)
    for cmd in SUBCOMMANDS:
        assert f"vqldm {cmd}" in readme, cmd


def test_packaged_presets_validate():
    from vqldm.config import load_config

    for p in (ROOT / "configs").glob("*.yaml"):
        load_config(p)
