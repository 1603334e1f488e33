"""Covariate control: do samples asked for a covariate value look like real volumes of that value?

For each ``--samples DIR`` (``vqldm sample --cond KEY=VALUE``; the value is read from its samples.json), the
samples' foreground fraction is set beside that of the real volumes of ``--real`` whose covariate lies
within ``--window`` (relative) of the asked value. Where the labels file also has a ``label`` column (as
``vqldm synth --vary density --levels N`` writes), a nearest-centroid classifier on (foreground fraction,
mean intensity), fitted to the labelled real volumes (:mod:`vqldm.metrics.conditions`), gives the
condition accuracy: the share of samples put in the class whose real covariate range holds the asked
value. Also the Spearman correlation between asked value and foreground fraction over all samples.

usage: python benchmarks/covariate_control.py --real DIR --labels LABELS --covariate NAME --samples DIR [DIR ...]
       --out FILE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vqldm.data.io import list_volumes, read_volume
from vqldm.data.labels import LABEL, read_table
from vqldm.metrics.conditions import ConditionClassifier, features, volumes_by_class
from vqldm.metrics.generation import PASS_RATIO, compare
from vqldm.visuals import mip_grid, save_png


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their mean rank (as Spearman's correlation needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def _class_of_value(table, files, name: str, value: float) -> str | None:
    """The class whose real volumes' covariate range holds ``value`` (None: none does)."""
    spans: dict[str, list[float]] = {}
    for f in files:
        row = table.rows[table.key_of(f)]
        spans.setdefault(row[LABEL], []).append(float(row[name]))
    hits = [c for c, v in spans.items() if min(v) <= value <= max(v)]
    return hits[0] if len(hits) == 1 else None


def _ratios(val: str, table, cls: str, gen: list[np.ndarray], threshold: float) -> dict:
    """Each generation statistic's ratio to its floor, against the held-out volumes of class ``cls``."""
    real = [np.clip(read_volume(f).array, 0, 1) for f in list_volumes(val) if table.class_of(f) == cls]
    m = compare(real, gen, threshold=threshold)
    ratios = {k: s["ratio"] for k, s in m["statistics"].items()} | {"mmd": m["mmd"]["ratio"]}
    return {**ratios, "within_2x": sum(1 for r in ratios.values() if r is not None and r <= PASS_RATIO),
            "n_real": len(real)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--real", "--labels", "--covariate", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--window", type=float, default=0.15, help="real volumes within this relative distance")
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--val", default=None, help="held-out real volumes: each folder's generation ratios against "
                                                "those of the class holding its value (as vqldm evaluate per class)")
    ap.add_argument("--png", default=None, help="also a picture: per folder, real volumes near the value (up to 3), "
                                                "then 4 samples (MIPs)")
    args = ap.parse_args()
    table, files = read_table(args.labels), list_volumes(args.real)
    real = {f: np.clip(read_volume(f).array, 0, 1) for f in files}
    value_of = {f: float(table.rows[table.key_of(f)][args.covariate]) for f in files}
    clf = ConditionClassifier.fit(volumes_by_class(files, table.class_of, lambda v: np.clip(v, 0, 1)),
                                  args.threshold) if LABEL in table.columns else None
    res = {"covariate": args.covariate, "real": args.real, "folders": [],
           "real_leave_one_out_accuracy": clf.leave_one_out if clf else None}
    asked_all, fg_all, rows = [], [], []
    for d in args.samples:
        rec = json.loads((Path(d) / "samples.json").read_text())
        asked = float(rec["covariates"]["asked"][args.covariate])
        gen = [np.clip(read_volume(f).array, 0, 1) for f in list_volumes(d)]
        fg = np.array([features(v, args.threshold)[0] for v in gen])
        near = [real[f] for f in files if abs(value_of[f] - asked) <= args.window * asked]
        rfg = np.array([features(v, args.threshold)[0] for v in near])
        entry = {"samples": d, "asked": asked, "guidance": rec.get("guidance"), "n": len(gen),
                 "foreground": [float(fg.mean()), float(fg.std())], "n_real_near": len(near),
                 "real_foreground_near": [float(rfg.mean()), float(rfg.std())] if len(near) else None}
        cls = _class_of_value(table, files, args.covariate, asked) if clf else None
        if cls is not None:
            entry["class"], (entry["accuracy"], entry["classified_as"]) = cls, clf.accuracy(gen, cls, args.threshold)
            if args.val:
                entry["ratios"] = _ratios(args.val, table, cls, gen, args.threshold)
        res["folders"].append(entry)
        rows.append(near[:3] + gen[:4])
        asked_all += [asked] * len(gen)
        fg_all += list(fg)
    a, f = np.array(asked_all), np.array(fg_all)
    res["spearman_asked_vs_foreground"] = float(np.corrcoef(_ranks(a), _ranks(f))[0, 1])
    Path(args.out).write_text(json.dumps(res, indent=2))
    if args.png:
        save_png(mip_grid(rows), args.png)
    print(json.dumps({k: v for k, v in res.items() if k != "folders"}, indent=2))
    for e in res["folders"]:
        print(f"{e['asked']:g} (W {e['guidance']}): fg {e['foreground'][0]:.4f} +- {e['foreground'][1]:.4f}, real near "
              f"{e['real_foreground_near']} (n {e['n_real_near']}), class {e.get('class')}: accuracy "
              f"{e.get('accuracy')} {e.get('classified_as')}")
        if "ratios" in e:
            print("   ratios:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in e["ratios"].items()})


if __name__ == "__main__":
    main()
