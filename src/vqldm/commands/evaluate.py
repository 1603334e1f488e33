"""``vqldm evaluate``: stage-1 reconstruction quality and, with samples, generation realism."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from vqldm.autoencoder.calibration import apply_calibration
from vqldm.autoencoder.codebook import code_counts, usage_and_perplexity
from vqldm.autoencoder.model import reconstruct
from vqldm.checkpoint import file_sha256
from vqldm.commands.evaluate_classes import evaluate_classes, is_conditional
from vqldm.commands.sample import read_samples
from vqldm.config import Config
from vqldm.data import pipeline
from vqldm.data.io import read_volume
from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes
from vqldm.latents import load_vqvae
from vqldm.metrics.generation import PASS_RATIO, compare
from vqldm.metrics.reconstruction import reconstruction_metrics
from vqldm.metrics.report import write_report
from vqldm.runtime import make_runtime, seed_everything
from vqldm.visuals import mip_grid, save_png

log = logging.getLogger("vqldm")


@torch.no_grad()
def stage1_metrics(cfg: Config, vqvae, vq_ckpt: dict, rt, out_dir: Path | None = None) -> dict:
    """PSNR, SSIM, foreground Dice on the validation tiles; codebook usage and perplexity over them."""
    val_info = pipeline.scan_data_dir(cfg, "val_data_dir")
    norm = pipeline.normalization_of(cfg, vq_ckpt["normalization"])
    tiles = pipeline.val_dataset(cfg, val_info.files, norm)
    loader = pipeline.make_loader(tiles, cfg.batch_size("vqvae"), False, 0, rt.is_cuda)
    k = vq_ckpt["network"]["num_embeddings"]
    counts = torch.zeros(k, dtype=torch.float64)
    sums: dict[str, float] = {}
    n = 0
    shown = []
    for batch in loader:
        x = rt.to_device(batch["image"])
        with rt.autocast():
            rec, _, idx, _ = reconstruct(vqvae, x)
        xu = norm.to_unit(x.float())
        ru = apply_calibration(norm.to_unit(rec.float()), vq_ckpt.get("intensity_calibration")).clamp(0, 1)
        m = reconstruction_metrics(ru, xu, cfg.data.foreground_threshold)
        b = x.shape[0]
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + float(v) * b
        n += b
        counts += code_counts(idx, k, "cpu")
        if len(shown) < 4:
            for i in range(min(b, 4 - len(shown))):
                xi, ri = xu[i].cpu().numpy(), ru[i].cpu().numpy()
                shown.append([xi, ri, np.abs(ri - xi)])
    usage, perplexity = usage_and_perplexity(counts)
    res = {key: v / n for key, v in sums.items()}
    res.update({"codebook_usage": usage, "codebook_perplexity": perplexity, "num_embeddings": k, "val_tiles": n})
    if out_dir is not None and shown:
        save_png(mip_grid(shown), out_dir / "reconstruction.png")
    return res


def _stage1_markdown(m: dict, vq_path: Path) -> str:
    return "\n".join([
        "## Stage 1: reconstruction (validation tiles)", "",
        f"Checkpoint `{vq_path}`; {m['val_tiles']} validation tiles.", "",
        "| PSNR (dB) | SSIM | foreground Dice | codebook usage | perplexity |",
        "|---|---|---|---|---|",
        f"| {m['psnr']:.2f} | {m['ssim']:.4f} | {m['dice']:.4f} | {m['codebook_usage']:.1%} of {m['num_embeddings']} | "
        f"{m['codebook_perplexity']:.1f} |", "",
        "Input | reconstruction | error, as maximum-intensity projections:", "",
        "![reconstructions](reconstruction.png)",
    ])


def real_reference(cfg: Config, shape: tuple[int, ...], norm: pipeline.Normalization, seed: int = 0,
                   key: str = "val_data_dir") -> list[np.ndarray]:
    """Real volumes of ``data.<key>`` shaped like the samples, in [0, 1]: whole volumes when they
    match, else foreground-biased patches drawn the way training draws them (seeded)."""
    info = pipeline.scan_data_dir(cfg, key)
    if all(tuple(s) == tuple(shape) for s in info.shapes):
        return [norm.unit(read_volume(f).array) for f in info.files]
    if list(shape) != list(cfg.data.patch_size):
        raise VqldmError(f"--samples have shape {list(shape)}, neither the {key} volumes' nor data.patch_size "
                         f"{cfg.data.patch_size}; cannot pick matching real volumes")
    ds = pipeline.train_dataset(cfg, info.files, augment=False, norm=norm)
    from monai.data.utils import set_rnd

    seed_everything(seed)
    set_rnd(ds, seed)
    out = []
    for i in range(len(ds)):
        item = ds[i]
        item = item[0] if isinstance(item, list) else item
        out.append(norm.to_unit(np.asarray(item["image"][0])).clip(0, 1))
    return out


@torch.no_grad()
def reconstruct_volumes(vqvae, vols: list[np.ndarray], norm: pipeline.Normalization, rt, calibration: dict | None,
                        batch_size: int = 8) -> list[np.ndarray]:
    """Stage-1 reconstructions (encode -> quantise -> decode, then the checkpoint's intensity
    calibration) of volumes in [0, 1], back in [0, 1]."""
    lo, hi = norm.intensity_range
    out = []
    for start in range(0, len(vols), batch_size):
        x = torch.from_numpy(np.stack(vols[start:start + batch_size])[:, None].astype(np.float32))
        x = rt.to_device(x * (hi - lo) + lo)
        with rt.autocast():
            rec = reconstruct(vqvae, x)[0]
        out.extend(apply_calibration(norm.to_unit(rec.float()), calibration).clamp(0, 1).cpu().numpy()[:, 0])
    return out


def limiting_stage(train: float | None, recon: float | None, samples: float | None) -> str:
    """Which part keeps a statistic from its goal, read from the three rows' ratios."""
    def fails(r):
        return r is None or r > PASS_RATIO

    if not fails(samples):
        return "none (passes)"
    if fails(train):
        return "the data (train and val differ)"
    if fails(recon):
        return "stage 1 (autoencoder)"
    return "stage 2 (prior)"


def stage_rows(real: list[np.ndarray], train: list[np.ndarray], recon: list[np.ndarray], gen_metrics: dict,
               threshold: float, seed: int) -> dict:
    """Each statistic's ratio for real train volumes, their reconstructions and the samples, all
    against the same held-out volumes and floor, and the stage that limits it."""
    rows = {"real_train": compare(real, train, threshold=threshold, seed=seed, redraws=0),
            "reconstruction": compare(real, recon, threshold=threshold, seed=seed, redraws=0), "samples": gen_metrics}
    names = list(gen_metrics["statistics"]) + ["mmd"]
    table = {name: {row: _ratio_of(m, name) for row, m in rows.items()} for name in names}
    for name, r in table.items():
        r["limited_by"] = limiting_stage(r["real_train"], r["reconstruction"], r["samples"])
        interval = _ratio_of(gen_metrics, name, "ratio_interval")  # the samples' over redraws of the samples
        if interval:
            r["samples_interval"] = interval
    return {"n_train": len(train), "ratios": table}


def _stages_markdown(stages: dict) -> str:
    lines = ["## Which stage limits each statistic", "",
             f"Ratios to the real-vs-real floor of the held-out volumes, for {stages['n_train']} real training "
             f"volumes, their stage-1 reconstructions, and the samples (<= {PASS_RATIO:g} passes). A statistic "
             "the reconstructions already miss is stage 1's to fix; one only the samples miss is the prior's. "
             "Brackets: the samples' ratio over bootstrap redraws of the samples (5th-95th percentile).", "",
             "| statistic | real train vs val | reconstructions vs val | samples vs val | limited by |",
             "|---|---|---|---|---|"]
    for name, r in stages["ratios"].items():
        cells = [_cell(r["real_train"]), _cell(r["reconstruction"]), _cell(r["samples"], r.get("samples_interval"))]
        lines.append(f"| {name} | {' | '.join(cells)} | {r['limited_by']} |")
    lines += ["", "Real training volumes (top), their reconstructions (middle) and samples (bottom), as "
              "maximum-intensity projections:", "", "![real, reconstruction, sample](stages.png)"]
    return "\n".join(lines)


def _stage1_checkpoint(cfg: Config, vqvae_checkpoint: str | None) -> tuple[Path, str]:
    if vqvae_checkpoint:
        return Path(vqvae_checkpoint), "--vqvae-checkpoint"
    if cfg.diffusion.checkpoints.vqvae_path and Path(cfg.diffusion.checkpoints.vqvae_path).is_file():
        # the stage-1 model the samples were decoded with
        return Path(cfg.diffusion.checkpoints.vqvae_path), "diffusion.checkpoints.vqvae_path"
    return Path(cfg.vqvae.checkpoints.output_dir) / "best_model.pt", "vqvae.checkpoints.output_dir"


def _reference_rows(cfg: Config, shape: tuple[int, ...], n: int, vqvae, vq_ckpt: dict, norm: pipeline.Normalization,
                    rt) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The held-out real volumes every row is judged against, up to ``n`` real training volumes, and
    their stage-1 reconstructions."""
    real = real_reference(cfg, shape, norm, seed=cfg.seed)
    if len(real) < 2:
        raise VqldmError(f"data.val_data_dir: {cfg.data.val_data_dir} gives {len(real)} real volume(s) to "
                         f"compare with; the real-vs-real floor needs at least 2 (4 or more for a stable one)")
    train = real_reference(cfg, shape, norm, seed=cfg.seed, key="train_data_dir")[:n]
    recon = reconstruct_volumes(vqvae, train, norm, rt, vq_ckpt.get("intensity_calibration"))
    return real, train, recon


def _one_shape(folder: Path, gen: list[np.ndarray]) -> tuple[int, ...]:
    shapes = {g.shape for g in gen}
    if len(shapes) != 1:
        raise VqldmError(f"--samples {folder}: volumes of several shapes {sorted(shapes)}")
    return gen[0].shape


def _generation(cfg: Config, samples: Path, vqvae, vq_ckpt: dict, norm: pipeline.Normalization, rt, out_dir: Path,
                preamble: str) -> tuple[dict, dict, Path]:
    """Generation statistics of ``samples`` against held-out real volumes, the three-row comparison
    (real train, reconstructions, samples), and the report."""
    gen = read_samples(samples)
    real, train, recon = _reference_rows(cfg, _one_shape(samples, gen), len(gen), vqvae, vq_ckpt, norm, rt)
    log.info("comparing %d generated with %d real volumes", len(gen), len(real))
    thr = cfg.data.foreground_threshold
    gen_metrics = compare(real, gen, threshold=thr, seed=cfg.seed)
    stages = stage_rows(real, train, recon, gen_metrics, thr, cfg.seed)
    save_png(mip_grid([train[:4], recon[:4], gen[:4]]), out_dir / "stages.png")
    preamble = preamble + "\n\n" + _stages_markdown(stages)
    return gen_metrics, stages, write_report(out_dir, gen_metrics, real, gen, preamble=preamble)


def sample_record(folder: Path) -> dict:
    """A sample folder's ``samples.json`` (which prior, which stage 1), or {} when it has none."""
    path = folder / "samples.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VqldmError(f"--samples {folder}: {path} is not readable JSON ({e})") from None
    if not isinstance(record, dict):
        raise VqldmError(f"--samples {folder}: {path} holds no JSON object")
    return record


def prior_label(record: dict, folder: Path) -> str:
    """A column name for a sample folder, from what its samples.json says made it."""
    if record.get("prior") == "diffusion":
        ag = record.get("autoguidance")
        guided = f", autoguidance {ag['weight']:g}" if isinstance(ag, dict) and "weight" in ag else ""
        return f"diffusion ({record.get('scheduler')}, {record.get('steps')} steps{guided})"
    if record.get("prior") == "transformer":
        knobs = [f"T {record.get('temperature')}"] + [f"{k.replace('_', '-')} {record[k]}" for k in ("top_k", "top_p")
                                                       if record.get(k) is not None]
        return f"token prior ({', '.join(knobs)})"
    return folder.name


def check_same_stage1(folders: list[Path], records: list[dict], vq_path: Path, vq_sha256: str) -> None:
    """Refuse sample folders decoded with another stage-1 checkpoint than the one evaluated here
    or than each other, where their samples.json records it."""
    recorded = [(f, r["vqvae_sha256"]) for f, r in zip(folders, records) if r.get("vqvae_sha256")]
    for folder, sha in recorded[1:]:
        if sha != recorded[0][1]:
            raise VqldmError(f"--samples {folder}: its samples came from another stage-1 checkpoint (sha256 "
                             f"{sha[:12]}) than those of {recorded[0][0]} ({recorded[0][1][:12]}); the priors "
                             f"compared must share one stage 1")
    for folder, rec in zip(folders, records):
        sha = rec.get("vqvae_sha256")
        if sha and sha != vq_sha256:
            raise VqldmError(f"--samples {folder}: its samples were decoded with stage-1 checkpoint "
                             f"{rec.get('vqvae_checkpoint')} (sha256 {sha[:12]}), not {vq_path} (sha256 "
                             f"{vq_sha256[:12]}) that this evaluation reconstructs with; compare samples of one "
                             f"stage 1 (or pass --vqvae-checkpoint)")


def _labels(folders: list[Path], records: list[dict]) -> list[str]:
    labels = [prior_label(r, f) for f, r in zip(folders, records)]
    return [f"{lab} [{f.name}]" if labels.count(lab) > 1 else lab for lab, f in zip(labels, folders)]


def _ratio_of(m: dict, name: str, key: str = "ratio"):
    return (m["mmd"] if name == "mmd" else m["statistics"][name]).get(key)


def comparison_table(base: dict, priors: dict) -> dict:
    """Per statistic: the real-train and reconstruction ratios, each prior's ratio, the prior closest to
    the floor and, per prior, the stage that limits it."""
    first = next(iter(priors.values()))
    table = {}
    for name in list(first["statistics"]) + ["mmd"]:
        train, recon = _ratio_of(base["real_train"], name), _ratio_of(base["reconstruction"], name)
        ratios = {label: _ratio_of(m, name) for label, m in priors.items()}
        defined = {k: v for k, v in ratios.items() if v is not None}
        table[name] = {"real_train": train, "reconstruction": recon, "samples": ratios,
                       "samples_interval": {label: _ratio_of(m, name, "ratio_interval") for label, m in priors.items()},
                       "closest": min(defined, key=defined.get) if defined else None,
                       "limited_by": {k: limiting_stage(train, recon, v) for k, v in ratios.items()}}
    return table


def _cell(r, interval: list | None = None) -> str:
    if r is None:
        return "undefined"
    return f"{r:.2f}" + (" ({:.2f}-{:.2f})".format(*interval) if interval else "")


def _comparison_markdown(comp: dict) -> str:
    labels = [p["label"] for p in comp["priors"]]
    lines = ["## Priors side by side", "",
             f"Every column is judged against the same {comp['n_real']} held-out volumes and the same "
             f"real-vs-real floor (ratio to the floor; <= {PASS_RATIO:g} passes). `real train` and "
             f"`reconstructions` use {comp['n_train']} real training volumes and their stage-1 reconstructions, "
             "about the best any prior decoded by this stage 1 can do. Brackets: each prior's ratio over "
             "bootstrap redraws of its samples (5th-95th percentile); brackets that overlap do not rank the "
             "priors.", "",
             "| statistic | real train | reconstructions | " + " | ".join(labels) + " | closest |",
             "|---|---|---|" + "---|" * len(labels) + "---|"]
    for name, r in comp["ratios"].items():
        cells = [_cell(r["real_train"]), _cell(r["reconstruction"])] + \
            [_cell(r["samples"][k], r["samples_interval"][k]) for k in labels]
        lines.append(f"| {name} | {' | '.join(cells)} | {r['closest'] or '-'} |")
    lines += ["", "| prior | samples | folder | within 2x floor | redraws within 2x | max ratio | report |",
              "|---|---|---|---|---|---|---|"]
    for p in comp["priors"]:
        s = p["generation"]["summary"]
        passed = sum(1 for r in comp["ratios"].values() if r["samples"][p["label"]] is not None
                     and r["samples"][p["label"]] <= PASS_RATIO)
        rate = s.get("redraw_pass_rate")
        lines.append(f"| {p['label']} | {p['generation']['n_generated']} | `{p['samples']}` | {passed} of "
                     f"{len(comp['ratios'])} | {'-' if rate is None else f'{rate:.0%}'} | "
                     f"{_cell(s.get('max_ratio'))} | [{p['report']}]({p['report']}) |")
    lines += ["", "Rows, as maximum-intensity projections: real training volumes, their reconstructions, then "
              "each prior's first samples (" + ", ".join(labels) + "):", "", "![priors](priors.png)"]
    return "\n".join(lines)


def _load_sets(folders: list[Path]) -> tuple[list[list[np.ndarray]], tuple[int, ...]]:
    gens = [read_samples(f) for f in folders]
    shapes = {f: _one_shape(f, g) for f, g in zip(folders, gens)}
    if len(set(shapes.values())) > 1:
        raise VqldmError("--samples: the folders hold volumes of different shapes ("
                         + ", ".join(f"{f}: {list(s)}" for f, s in shapes.items()) + "); compare like with like")
    return gens, shapes[folders[0]]


def _compare_priors(cfg: Config, folders: list[Path], records: list[dict], vqvae, vq_ckpt: dict, norm, rt,
                    out_dir: Path) -> dict:
    """Each sample folder against the same held-out volumes and floor, beside the real-train and
    reconstruction rows; one report per prior in a subfolder and priors.png."""
    gens, shape = _load_sets(folders)
    real, train, recon = _reference_rows(cfg, shape, max(len(g) for g in gens), vqvae, vq_ckpt, norm, rt)
    thr, seed = cfg.data.foreground_threshold, cfg.seed
    base = {"real_train": compare(real, train, threshold=thr, seed=seed, redraws=0),
            "reconstruction": compare(real, recon, threshold=thr, seed=seed, redraws=0)}
    priors, entries = {}, []
    for i, (folder, rec, gen, label) in enumerate(zip(folders, records, gens, _labels(folders, records))):
        log.info("comparing %s: %d generated with %d real volumes", label, len(gen), len(real))
        priors[label] = compare(real, gen, threshold=thr, seed=seed)
        report = write_report(out_dir / f"prior_{i + 1}", priors[label], real, gen, title=f"vqldm evaluation: {label}")
        entries.append({"label": label, "samples": str(folder), "record": rec, "generation": priors[label],
                        "report": str(report.relative_to(out_dir))})
    save_png(mip_grid([train[:4], recon[:4]] + [g[:4] for g in gens]), out_dir / "priors.png")
    return {"n_real": len(real), "n_train": len(train), "priors": entries, "ratios": comparison_table(base, priors)}


def evaluate(cfg: Config, out_dir: Path, samples: Path | list[Path] | None = None,
             vqvae_checkpoint: str | None = None, progress: bool = True) -> dict:
    """Stage 1 alone; with one sample folder, its generation report and three-row comparison; with
    several (the priors of one stage 1), one side-by-side comparison; with class-conditional sample
    folders (``vqldm sample --class``), each against the real volumes of its class, and the condition
    accuracy."""
    folders = [] if samples is None else [Path(samples)] if isinstance(samples, (str, Path)) else list(samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt = make_runtime(cfg)
    vq_path, what = _stage1_checkpoint(cfg, vqvae_checkpoint)
    vqvae, vq_ckpt = load_vqvae(vq_path, rt, what=what)
    if len(set(f.resolve() for f in folders)) < len(folders):
        raise VqldmError("--samples: the same folder is given twice")
    records = [sample_record(f) for f in folders]
    check_same_stage1(folders, records, vq_path, file_sha256(vq_path))
    norm = pipeline.normalization_of(cfg, vq_ckpt["normalization"])
    metrics: dict = {"stage1": stage1_metrics(cfg, vqvae, vq_ckpt, rt, out_dir), "vqvae_checkpoint": str(vq_path)}
    pre = _stage1_markdown(metrics["stage1"], vq_path)
    report = out_dir / "report.md"
    if folders and is_conditional(records):
        metrics["per_class"], md = evaluate_classes(cfg, folders, records, norm, out_dir)
        atomic_write_bytes(report, ("# vqldm evaluation: class-conditional samples\n\n" + pre + "\n\n" + md
                                    + "\n").encode("utf-8"))
    elif len(folders) == 1:
        metrics["generation"], metrics["stages"], report = _generation(cfg, folders[0], vqvae, vq_ckpt, norm, rt,
                                                                       out_dir, pre)
        metrics["samples"] = str(folders[0])
    elif folders:
        metrics["comparison"] = _compare_priors(cfg, folders, records, vqvae, vq_ckpt, norm, rt, out_dir)
        atomic_write_bytes(report, ("# vqldm evaluation: priors on one stage 1\n\n" + pre + "\n\n"
                                    + _comparison_markdown(metrics["comparison"]) + "\n").encode("utf-8"))
    else:
        atomic_write_bytes(report, ("# vqldm evaluation\n\n" + pre
                                    + "\n\nNo `--samples` given: generation not evaluated.\n").encode("utf-8"))
    metrics_path = out_dir / "metrics.json"
    atomic_write_bytes(metrics_path, json.dumps(metrics, indent=2).encode("utf-8"))
    return {"metrics_path": metrics_path, "report_path": report, "metrics": metrics}
