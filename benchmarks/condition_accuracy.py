"""Condition accuracy: are samples asked for a class classified as that class?

A nearest-centroid classifier on (foreground fraction, mean intensity), standardised on and fitted to
the labelled *real* volumes of ``--real`` (``data.labels_file``), classifies every sample of each
``--samples DIR`` folder. The class each folder was asked for is read from its ``samples.json``
(``vqldm sample --class NAME``). Prints and writes, as JSON: the real volumes' leave-one-out accuracy
(the ceiling), and per folder the share of samples classified as the asked-for class, with the
confusion counts.

``vqldm evaluate --samples DIR ...`` reports the same accuracy with per-class generation statistics; this
script classifies against any folder of labelled real volumes.

usage: python benchmarks/condition_accuracy.py --real DIR --labels LABELS --samples DIR [DIR ...] --out FILE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqldm.data.io import list_volumes, read_volume
from vqldm.data.labels import read_table
from vqldm.metrics.conditions import ConditionClassifier, volumes_by_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    real = volumes_by_class(list_volumes(args.real), read_table(args.labels).class_of)
    clf = ConditionClassifier.fit(real)
    res = {"classes": clf.classes, "real_volumes": sum(len(v) for v in real.values()),
           "real_leave_one_out_accuracy": clf.leave_one_out, "folders": []}
    for d in args.samples:
        rec = json.loads((Path(d) / "samples.json").read_text())
        acc, counts = clf.accuracy([read_volume(f).array for f in list_volumes(d)], rec["class"])
        res["folders"].append({"folder": d, "class": rec["class"], "guidance": rec.get("guidance"),
                               "n": sum(counts.values()), "accuracy": acc, "classified_as": counts})
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"real volumes, leave one out: {clf.leave_one_out:.1%}")
    for f in res["folders"]:
        print(f"{f['folder']}: asked {f['class']} (W {f['guidance']}): {f['accuracy']:.1%} {f['classified_as']}")


if __name__ == "__main__":
    main()
