"""Condition accuracy: does a sample asked for a class look like that class?

A nearest-centroid classifier on two volume statistics (foreground fraction and mean intensity, each
standardised on the real volumes) is fitted to labelled *real* volumes and then classifies samples.
Its leave-one-out accuracy on the real volumes is the ceiling a perfect prior could reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vqldm.data.io import read_volume


def features(vol: np.ndarray, threshold: float = 0.1) -> list[float]:
    """(foreground fraction, mean intensity) of a volume in [0, 1]."""
    v = np.clip(np.asarray(vol, dtype=np.float64), 0.0, 1.0)
    return [float((v > threshold).mean()), float(v.mean())]


def volumes_by_class(files: list[Path], class_of: Callable[[Path], str | None], unit: Callable = np.asarray
                     ) -> dict[str, list[np.ndarray]]:
    """The labelled ``files`` (``class_of``: a file's class; None: unlabelled) read and grouped by class,
    each through ``unit``."""
    out: dict[str, list[np.ndarray]] = {}
    for f in files:
        c = class_of(f)
        if c is not None:
            out.setdefault(c, []).append(unit(read_volume(f).array))
    return out


def _nearest(centres: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.argmin(((centres[None] - z[:, None]) ** 2).sum(-1), axis=1)


@dataclass
class ConditionClassifier:
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    centres: np.ndarray
    leave_one_out: float  # accuracy on the real volumes it was fitted to, each left out in turn

    @classmethod
    def fit(cls, volumes: dict[str, list[np.ndarray]], threshold: float = 0.1) -> "ConditionClassifier":
        """Fit to ``{class: real volumes}``; every class needs at least one volume."""
        classes = sorted(volumes)
        x = np.array([features(v, threshold) for c in classes for v in volumes[c]])
        y = np.array([k for k, c in enumerate(classes) for _ in volumes[c]])
        mean, std = x.mean(0), x.std(0) + 1e-12
        z = (x - mean) / std
        hits = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            if all((y[keep] == k).any() for k in range(len(classes))):
                centres = np.array([z[keep][y[keep] == k].mean(0) for k in range(len(classes))])
                hits.append(_nearest(centres, z[i:i + 1])[0] == y[i])
        centres = np.array([z[y == k].mean(0) for k in range(len(classes))])
        return cls(classes, mean, std, centres, float(np.mean(hits)) if hits else float("nan"))

    def predict(self, vols: list[np.ndarray], threshold: float = 0.1) -> list[str]:
        z = (np.array([features(v, threshold) for v in vols]) - self.mean) / self.std
        return [self.classes[k] for k in _nearest(self.centres, z)]

    def accuracy(self, vols: list[np.ndarray], asked: str, threshold: float = 0.1) -> tuple[float, dict[str, int]]:
        """Share of ``vols`` classified as ``asked``, and how many went to each class."""
        got = self.predict(vols, threshold)
        return (float(np.mean([g == asked for g in got])) if got else float("nan"),
                {c: got.count(c) for c in self.classes})
