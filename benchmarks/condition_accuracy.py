"""Condition accuracy: are samples asked for a class classified as that class?

A nearest-centroid classifier on (foreground fraction, mean intensity), standardised on and fitted to
the labelled *real* volumes of ``--real`` (``data.labels_file``), classifies every sample of each
``--samples DIR`` folder. The class each folder was asked for is read from its ``samples.json``
(``vqldm sample --class NAME``). Prints and writes, as JSON: the real volumes' leave-one-out accuracy
(the ceiling), and per folder the share of samples classified as the asked-for class, with the
confusion counts.

usage: python benchmarks/condition_accuracy.py --real DIR --labels LABELS --samples DIR [DIR ...] --out FILE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vqldm.data.io import list_volumes, read_volume
from vqldm.data.labels import read_labels


def features(vol: np.ndarray) -> list[float]:
    v = np.clip(vol, 0.0, 1.0)
    return [float((v > 0.1).mean()), float(v.mean())]


def centroids(z: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    return np.array([z[y == k].mean(0) for k in range(len(classes))])


def nearest(centres: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.argmin(((centres[None] - z[:, None]) ** 2).sum(-1), axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    labels = read_labels(args.labels)
    classes = sorted(set(labels.values()))
    files = [f for f in list_volumes(args.real) if f.name in labels]
    x = np.array([features(read_volume(f).array) for f in files])
    y = np.array([classes.index(labels[f.name]) for f in files])
    mu, sd = x.mean(0), x.std(0) + 1e-12
    z = (x - mu) / sd
    loo = np.mean([nearest(centroids(z[np.arange(len(y)) != i], y[np.arange(len(y)) != i], classes),
                           z[i:i + 1])[0] == y[i] for i in range(len(y))])
    centres = centroids(z, y, classes)
    res = {"classes": classes, "real_volumes": len(files), "real_leave_one_out_accuracy": float(loo), "folders": []}
    for d in args.samples:
        rec = json.loads((Path(d) / "samples.json").read_text())
        asked = classes.index(rec["class"])
        zs = (np.array([features(read_volume(f).array) for f in list_volumes(d)]) - mu) / sd
        got = nearest(centres, zs)
        res["folders"].append({"folder": d, "class": rec["class"], "guidance": rec.get("guidance"), "n": len(got),
                               "accuracy": float(np.mean(got == asked)),
                               "classified_as": {c: int((got == k).sum()) for k, c in enumerate(classes)}})
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"real volumes, leave one out: {loo:.1%}")
    for f in res["folders"]:
        print(f"{f['folder']}: asked {f['class']} (W {f['guidance']}): {f['accuracy']:.1%} {f['classified_as']}")


if __name__ == "__main__":
    main()
