"""Conditions of a data set: each volume's class and continuous covariates, read and checked against
the train and val files before any training.

They come from a labels file named by ``data.labels_file``, a CSV (``file,label`` without a header, or
a header ``file,label,density,...`` naming each column) or JSON (``{file: label}`` or ``{file: {"label":
..., "density": ...}}``), and from class subfolders (``data.class_folders``: ``train/<class>/x.nii.gz``).
A file is matched by the longest trailing part of its path that the labels file names: ``mt_0000.nii.gz``
serves the file of that name in either folder, ``train/mt_0000.nii.gz`` only the one under ``train``.

Classes are the sorted distinct labels; class ``k`` is index ``k`` of the UNet's class embedding, and
index ``len(classes)`` is the learned null (no class). Covariates (``diffusion.covariates``: column
names) are numbers, normalised to [0, 1] by their range over the training files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vqldm.data.io import list_volumes
from vqldm.errors import VqldmError

LABEL = "label"  # the class column


@dataclass(frozen=True)
class LabelsTable:
    """A labels file: ``rows[key][column]`` as text; a key is a file name or a trailing part of a path."""

    path: Path
    columns: list[str]
    rows: dict[str, dict[str, str]]

    def key_of(self, f: Path) -> str | None:
        """The most specific key naming file ``f`` (its whole path, ..., its parent and name, its name)."""
        parts = Path(f).parts
        for k in range(len(parts)):
            key = PurePosixPath(*parts[k:]).as_posix()
            if key in self.rows:
                return key
        return None

    def class_of(self, f: Path) -> str | None:
        key = self.key_of(f)
        return None if key is None else self.rows[key].get(LABEL)


def read_table(path: str | Path) -> LabelsTable:
    """The labels file ``path`` (CSV or JSON), each row's cells checked; one line naming the file where not."""
    p = Path(path)
    if not p.is_file():
        raise VqldmError(f"data.labels_file {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VqldmError(f"data.labels_file {p}: cannot read it as UTF-8 text ({e})") from None
    columns, rows = _read_json(p, text) if p.suffix.lower() == ".json" else _read_csv(p, text)
    return LabelsTable(p, columns, rows)


def read_labels(path: str | Path) -> dict[str, str]:
    """``{key: class name}`` of a labels file (its ``label`` column)."""
    t = read_table(path)
    return {k: r[LABEL] for k, r in t.rows.items() if LABEL in r}


def _key(p: Path, cell: str) -> str:
    key = PurePosixPath(cell.strip().replace("\\", "/")).as_posix()
    if not cell.strip() or key == ".":
        raise VqldmError(f"data.labels_file {p}: a row without a file name")
    return key[2:] if key.startswith("./") else key


def _read_json(p: Path, text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise VqldmError(f"data.labels_file {p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VqldmError(f"data.labels_file {p}: expected a JSON object {{file name: class name}}")
    rows, columns = {}, []
    for k, v in data.items():
        row = v if isinstance(v, dict) else {LABEL: v}
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in row.values()):
            raise VqldmError(f"data.labels_file {p}: {k}: expected a class name or an object of names and numbers")
        rows[_key(p, k)] = {str(c): str(x) for c, x in row.items()}
        columns += [str(c) for c in row if str(c) not in columns]
    return columns, rows


def _read_csv(p: Path, text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    header = [c.strip() for c in lines[0]] if lines else []
    if header and header[0].lower() == "file":
        columns, lines = [c.lower() if c.lower() == LABEL else c for c in header[1:]], lines[1:]
        if not columns or len(set(columns)) != len(columns) or not all(columns):
            raise VqldmError(f"data.labels_file {p}: the header {header} needs distinct, named columns after `file`")
    else:
        columns = [LABEL]
    rows: dict[str, dict[str, str]] = {}
    for n, r in enumerate(lines, 1):
        if len(r) != len(columns) + 1 or not all(c.strip() for c in r):
            raise VqldmError(f"data.labels_file {p}: row {n} {r} is not `{','.join(['file'] + columns)}`")
        key, row = _key(p, r[0]), {c: v.strip() for c, v in zip(columns, r[1:])}
        if key in rows and rows[key] != row:
            raise VqldmError(f"data.labels_file {p}: {key} has two rows ({rows[key]}, {row})")
        rows[key] = row
    return columns, rows


@dataclass(frozen=True)
class ClassLabels:
    """The conditions of the train and val files, in file order: class indices (``classes`` empty:
    no class condition) and covariate values normalised to [0, 1] by ``covariates`` (name -> [min, max]
    over the training files)."""

    classes: list[str]
    train: list[int]
    val: list[int]
    covariates: dict[str, list[float]] = field(default_factory=dict)
    train_values: list[list[float]] = field(default_factory=list)
    val_values: list[list[float]] = field(default_factory=list)

    @property
    def null(self) -> int:
        """The class-embedding index of the learned null (no class)."""
        return len(self.classes)

    def record(self) -> dict:
        """What a prior's checkpoint records of these conditions: the class names, the covariates' ranges."""
        out = {"classes": list(self.classes)} if self.classes else {}
        return {**out, "covariates": {k: list(v) for k, v in self.covariates.items()}} if self.covariates else out

    def val_columns(self, volumes: list[int]) -> dict:
        """The classes and covariates of validation items cut from val volumes ``volumes``, as tensor columns."""
        import torch

        out = {"label": torch.tensor([self.val[v] for v in volumes], dtype=torch.long)} if self.classes else {}
        if self.covariates:
            out["covariates"] = torch.tensor([self.val_values[v] for v in volumes], dtype=torch.float32)
        return out


def _check_coverage(t: LabelsTable, files: list[Path], existing: list[Path]) -> None:
    missing = [Path(f).name for f in files if t.key_of(f) is None]
    if missing:
        raise VqldmError(f"data.labels_file {t.path}: {len(missing)} file(s) without a label, e.g. {missing[0]}")
    used = {t.key_of(f) for f in list(files) + list(existing)}
    extra = sorted(set(t.rows) - used)
    if extra:
        raise VqldmError(f"data.labels_file {t.path}: a label for {extra[0]}, which is in neither data folder "
                         f"({len(extra)} such)")


def _numbers(t: LabelsTable, files: list[Path], name: str) -> list[float]:
    out = []
    for f in files:
        text = t.rows[t.key_of(f)][name]
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise VqldmError(f"data.labels_file {t.path}: {t.key_of(f)}: {name} {text!r} is not a finite number")
        out.append(v)
    return out


def _covariates(t: LabelsTable, train: list[Path], val: list[Path], names: list[str], key: str):
    """Each covariate's training range and the files' values normalised by it (``key``: the option naming them)."""
    ranges, tr, va = {}, [], []
    for name in names:
        if name not in t.columns or name == LABEL:
            raise VqldmError(f"{key}: {name!r} is not a numeric column of data.labels_file {t.path} "
                             f"(its columns: {', '.join(t.columns)})")
        a, b = _numbers(t, train, name), _numbers(t, val, name)
        lo, hi = min(a), max(a)
        if not hi > lo:
            raise VqldmError(f"{key}: {name} takes one value ({lo:g}) over the training files; "
                             f"a constant cannot condition anything")
        ranges[name] = [lo, hi]
        tr.append([(v - lo) / (hi - lo) for v in a])
        va.append([(v - lo) / (hi - lo) for v in b])
    return ranges, [list(r) for r in zip(*tr)], [list(r) for r in zip(*va)]


def _class_names(t: LabelsTable | None, train: list[Path], val: list[Path], folders: bool) -> list[str] | None:
    """Every file's class name, from its folder or the labels file's label column (None: no classes)."""
    if folders:
        if t is not None and LABEL in t.columns:
            raise VqldmError(f"data.labels_file {t.path}: has a label column, but data.class_folders takes the "
                             f"classes from the subfolders; drop one")
        return [Path(f).parent.name for f in list(train) + list(val)]
    if t is None or LABEL not in t.columns:
        return None
    names = [t.rows[t.key_of(f)].get(LABEL) for f in list(train) + list(val)]
    if not all(names):
        raise VqldmError(f"data.labels_file {t.path}: {t.key_of((list(train) + list(val))[names.index(None)])} "
                         f"has no label")
    return names


def class_labels(path: str | Path | None, train_files: list[Path], val_files: list[Path],
                 existing: list[Path] | None = None, covariates: list[str] = (),
                 folders: bool = False, key: str = "diffusion.covariates") -> ClassLabels:
    """Every train and val file's conditions, checked: a file without a label and a label for a file that
    is in neither folder (``existing``: every volume there, including any a volume limit leaves out;
    default the files given) are each refused in one line, as are covariates that are not numbers."""
    t = read_table(path) if path else None
    if t is not None:
        _check_coverage(t, list(train_files) + list(val_files), existing or [])
    names = _class_names(t, train_files, val_files, folders)
    if names is None and not covariates:
        raise VqldmError(f"data.labels_file {path}: no label column, and {key} names no column "
                         f"to condition on")
    classes = sorted(set(names)) if names is not None else []
    if names is not None and len(classes) < 2:
        raise VqldmError(f"data.labels_file {path}: needs at least two classes, got {classes}" if not folders else
                         f"data.class_folders: needs at least two class subfolders, got {classes}")
    index = {c: k for k, c in enumerate(classes)}
    k = [index[n] for n in names] if names is not None else []
    ranges, tr, va = _covariates(t, train_files, val_files, list(covariates), key) if covariates else ({}, [], [])
    return ClassLabels(classes, k[:len(train_files)], k[len(train_files):], ranges, tr, va)


def dataset_labels(cfg, train_files: list[Path], val_files: list[Path], covariates: list[str] = (),
                   key: str = "diffusion.covariates") -> ClassLabels | None:
    """Every train and val file's conditions under ``data.labels_file`` / ``data.class_folders`` (and the
    ``covariates`` columns, named by option ``key``), checked before any compute against every volume in both
    folders; None where the config names none (an unconditional prior)."""
    d = cfg.data
    if not d.labels_file and not d.class_folders:
        return None
    if covariates and not d.labels_file:
        raise VqldmError(f"{key}: the covariates are columns of data.labels_file; set it")
    existing = list_volumes(d.train_data_dir, d.class_folders) + list_volumes(d.val_data_dir, d.class_folders)
    return class_labels(d.labels_file, train_files, val_files, existing, covariates, d.class_folders, key)


def class_index(classes: list[str] | None, name: str) -> int:
    """The index of class ``name`` of a model trained on ``classes`` (None: an unconditional model)."""
    if not classes:
        raise VqldmError(f"--class {name}: this model is unconditional (trained without data.labels_file)")
    if name not in classes:
        raise VqldmError(f"--class {name}: unknown class; this model knows {', '.join(classes)}")
    return classes.index(name)


class LabelledDataset:
    """``base`` with each item's class under ``label`` and covariates under ``covariates``: item ``i``
    comes from volume ``i % n`` (as :class:`~vqldm.data.pipeline.RepeatDataset` and the latent-crop cache
    deal them out)."""

    def __init__(self, base, labels: list[int], values: list[list[float]] | None = None):
        self.base, self.labels, self.values = base, list(labels), list(values or [])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import torch

        item, extra = self.base[i], {}
        if self.labels:
            extra["label"] = torch.tensor(self.labels[i % len(self.labels)], dtype=torch.long)
        if self.values:
            extra["covariates"] = torch.tensor(self.values[i % len(self.values)], dtype=torch.float32)
        if isinstance(item, list):  # several patches of one volume
            return [{**d, **extra} for d in item]
        return {**item, **extra}
