"""``vqldm evaluate --samples DIR ...`` for class-conditional samples (``vqldm sample --class NAME``).

Each folder is judged against the held-out real volumes *of its class* (``data.labels_file``): every
generation statistic next to that class's own real-vs-real floor. A nearest-centroid classifier on
volume statistics, fitted to the labelled real training volumes (:mod:`vqldm.metrics.conditions`),
gives the condition accuracy: the share of a folder's samples that look like the class asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vqldm.commands.sample import read_samples
from vqldm.config import Config
from vqldm.data import pipeline
from vqldm.data.labels import read_table
from vqldm.errors import VqldmError
from vqldm.metrics.conditions import ConditionClassifier, volumes_by_class
from vqldm.metrics.generation import PASS_RATIO, compare
from vqldm.visuals import mip_grid, save_png

log = logging.getLogger("vqldm")


def is_conditional(records: list[dict]) -> bool:
    """Whether the sample folders are class-conditional samples (their samples.json names a class);
    a mix of conditional and unconditional folders is refused in one line."""
    asked = [bool(r.get("class")) for r in records]
    if any(asked) and not all(asked):
        raise VqldmError("--samples: some folders hold samples of one class (vqldm sample --class) and some do not; "
                         "evaluate class-conditional folders together, and other priors separately")
    return bool(asked) and all(asked)


def class_volumes(cfg: Config, key: str, norm: pipeline.Normalization) -> dict[str, list[np.ndarray]]:
    """The volumes of ``data.<key>`` in [0, 1], grouped by their class (their subfolder with
    ``data.class_folders``, else the labels file's label column)."""
    class_of = (lambda f: f.parent.name) if cfg.data.class_folders else read_table(cfg.data.labels_file).class_of
    return volumes_by_class(pipeline.scan_data_dir(cfg, key).files, class_of, norm.unit)


def _held_out(val: dict[str, list[np.ndarray]], cls: str, folder: Path, shape: tuple[int, ...]) -> list[np.ndarray]:
    real = val.get(cls, [])
    if len(real) < 2:
        raise VqldmError(f"--samples {folder}: class {cls} has {len(real)} held-out volume(s) in data.val_data_dir; "
                         f"its real-vs-real floor needs at least 2")
    if any(r.shape != shape for r in real):
        raise VqldmError(f"--samples {folder}: samples of shape {list(shape)}, but the class-{cls} volumes of "
                         f"data.val_data_dir are {list(real[0].shape)}; per-class evaluation compares whole volumes")
    return real


def evaluate_classes(cfg: Config, folders: list[Path], records: list[dict], norm: pipeline.Normalization,
                     out_dir: Path) -> tuple[dict, str]:
    """Per folder: its class's generation statistics and condition accuracy; ``classes.png`` (per folder,
    real volumes of its class over its samples). Returns the metrics and the report's markdown."""
    if not cfg.data.labels_file and not cfg.data.class_folders:
        raise VqldmError("--samples: these are class-conditional samples; per-class evaluation needs the "
                         "data.labels_file (or data.class_folders) the model was trained with")
    thr, seed = cfg.data.foreground_threshold, cfg.seed
    val = class_volumes(cfg, "val_data_dir", norm)
    clf = ConditionClassifier.fit(class_volumes(cfg, "train_data_dir", norm), thr)
    entries, rows = [], []
    for folder, rec in zip(folders, records):
        cls, gen = rec["class"], read_samples(folder)
        if cls not in clf.classes:
            raise VqldmError(f"--samples {folder}: class {cls} is not among the classes of the training data "
                             f"({', '.join(clf.classes)})")
        real = _held_out(val, cls, folder, gen[0].shape if gen else ())
        log.info("class %s (%s): %d generated against %d real volumes", cls, folder, len(gen), len(real))
        m = compare(real, gen, threshold=thr, seed=seed)
        acc, counts = clf.accuracy(gen, cls, thr)
        ratios = {k: s["ratio"] for k, s in m["statistics"].items()} | {"mmd": m["mmd"]["ratio"]}
        entries.append({"samples": str(folder), "class": cls, "guidance": rec.get("guidance"), "n": len(gen),
                        "n_real": len(real), "accuracy": acc, "classified_as": counts, "ratios": ratios,
                        "within_2x": sum(1 for r in ratios.values() if r is not None and r <= PASS_RATIO),
                        "generation": m})
        rows += [real[:4], gen[:4]]
    save_png(mip_grid(rows), out_dir / "classes.png")
    result = {"classes": clf.classes, "real_leave_one_out_accuracy": clf.leave_one_out, "folders": entries}
    return result, _markdown(result)


def _markdown(res: dict) -> str:
    names = list(res["folders"][0]["ratios"]) if res["folders"] else []
    lines = ["## Per class", "",
             "Each folder against the held-out real volumes of the class it was asked for, each statistic as a "
             f"ratio to that class's real-vs-real floor (<= {PASS_RATIO:g} passes). *Accuracy*: the share of samples "
             "that a nearest-centroid classifier on (foreground fraction, mean intensity), fitted to the labelled "
             "real training volumes, puts in the class asked for; the same classifier recovers "
             f"{res['real_leave_one_out_accuracy']:.1%} of the real volumes (leave one out).", "",
             "| class | guidance | samples | accuracy | within 2x | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for e in res["folders"]:
        cells = ["undefined" if e["ratios"][k] is None else f"{e['ratios'][k]:.2f}" for k in names]
        lines.append(f"| {e['class']} | {e['guidance']} | {e['n']} (`{e['samples']}`) | {e['accuracy']:.1%} | "
                     f"{e['within_2x']} of {len(names)} | " + " | ".join(cells) + " |")
    lines += ["", "Real volumes of each folder's class (upper row) and its samples (lower row), as "
              "maximum-intensity projections:", "", "![per class](classes.png)"]
    return "\n".join(lines)
