"""Class labels of a data set: a labels file (CSV ``file,label`` or JSON ``{file: label}``) named by
``data.labels_file``, read and checked against the train and val files before any training.

Files are matched by name (``mt_0000.nii.gz``), so one labels file serves both folders; a train and a
val file of the same name share one label. Classes are the sorted distinct labels; class ``k`` is
index ``k`` of the UNet's class embedding, and index ``len(classes)`` is the learned null (no class).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from vqldm.data.io import list_volumes
from vqldm.errors import VqldmError


def read_labels(path: str | Path) -> dict[str, str]:
    """``{file name: class name}`` of a CSV (``file,label``, header optional) or JSON labels file."""
    p = Path(path)
    if not p.is_file():
        raise VqldmError(f"data.labels_file {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VqldmError(f"data.labels_file {p}: cannot read it as UTF-8 text ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise VqldmError(f"data.labels_file {p}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
            raise VqldmError(f"data.labels_file {p}: expected a JSON object {{file name: class name}}")
        return {Path(k).name: str(v) for k, v in data.items()}
    return _read_csv(p, text)


def _read_csv(p: Path, text: str) -> dict[str, str]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0]] == ["file", "label"]:
        rows = rows[1:]
    out: dict[str, str] = {}
    for n, r in enumerate(rows, 1):
        if len(r) != 2 or not r[0].strip() or not r[1].strip():
            raise VqldmError(f"data.labels_file {p}: row {n} {r} is not `file,label`")
        name = Path(r[0].strip()).name
        if name in out and out[name] != r[1].strip():
            raise VqldmError(f"data.labels_file {p}: {name} has two labels ({out[name]}, {r[1].strip()})")
        out[name] = r[1].strip()
    return out


@dataclass(frozen=True)
class ClassLabels:
    """The classes (sorted names) and each train and val file's class index, in file order."""

    classes: list[str]
    train: list[int]
    val: list[int]

    @property
    def null(self) -> int:
        """The class-embedding index of the learned null (no class)."""
        return len(self.classes)


def class_labels(path: str | Path, train_files: list[Path], val_files: list[Path],
                 existing: list[Path] | None = None) -> ClassLabels:
    """Every train and val file's class, checked: a file without a label and a label for a file that
    is in neither folder (``existing``: every volume there, including any a volume limit leaves out;
    default the files given) are each refused in one line."""
    labels = read_labels(path)
    names = {Path(f).name for f in list(train_files) + list(val_files)}
    there = names | {Path(f).name for f in existing or []}
    missing = [Path(f).name for f in list(train_files) + list(val_files) if Path(f).name not in labels]
    if missing:
        raise VqldmError(f"data.labels_file {path}: {len(missing)} file(s) without a label, e.g. {missing[0]}")
    extra = sorted(set(labels) - there)
    if extra:
        raise VqldmError(f"data.labels_file {path}: a label for {extra[0]}, which is in neither data folder "
                         f"({len(extra)} such)")
    classes = sorted({labels[n] for n in names})
    if len(classes) < 2:
        raise VqldmError(f"data.labels_file {path}: needs at least two classes, got {classes}")
    index = {c: k for k, c in enumerate(classes)}
    return ClassLabels(classes, [index[labels[Path(f).name]] for f in train_files],
                       [index[labels[Path(f).name]] for f in val_files])


def dataset_labels(cfg, train_files: list[Path], val_files: list[Path]) -> ClassLabels | None:
    """Every train and val file's class under ``data.labels_file``, checked before any compute against
    every volume in both folders; None where the config names no labels (an unconditional prior)."""
    if not cfg.data.labels_file:
        return None
    existing = list_volumes(cfg.data.train_data_dir) + list_volumes(cfg.data.val_data_dir)
    return class_labels(cfg.data.labels_file, train_files, val_files, existing)


def class_index(classes: list[str] | None, name: str) -> int:
    """The index of class ``name`` of a model trained on ``classes`` (None: an unconditional model)."""
    if not classes:
        raise VqldmError(f"--class {name}: this model is unconditional (trained without data.labels_file)")
    if name not in classes:
        raise VqldmError(f"--class {name}: unknown class; this model knows {', '.join(classes)}")
    return classes.index(name)


class LabelledDataset:
    """``base`` with each item's class under ``label``: item ``i`` comes from volume ``i % len(labels)``
    (as :class:`~vqldm.data.pipeline.RepeatDataset` and the latent-crop cache deal them out)."""

    def __init__(self, base, labels: list[int]):
        self.base, self.labels = base, list(labels)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import torch

        item, label = self.base[i], torch.tensor(self.labels[i % len(self.labels)], dtype=torch.long)
        if isinstance(item, list):  # several patches of one volume
            return [{**d, "label": label} for d in item]
        return {**item, "label": label}
