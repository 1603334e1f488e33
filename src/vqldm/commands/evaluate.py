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
    norm = pipeline.normalization_of(cfg, vq_ckpt["normalization"]["intensity_range"])
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
        return [pipeline.normalize_unit(read_volume(f).array, cfg.data.clip_percentiles) for f in info.files]
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
    rows = {"real_train": compare(real, train, threshold=threshold, seed=seed),
            "reconstruction": compare(real, recon, threshold=threshold, seed=seed), "samples": gen_metrics}
    names = list(gen_metrics["statistics"]) + ["mmd"]

    def ratio(m: dict, name: str):
        return m["mmd"]["ratio"] if name == "mmd" else m["statistics"][name]["ratio"]

    table = {name: {row: ratio(m, name) for row, m in rows.items()} for name in names}
    for name, r in table.items():
        r["limited_by"] = limiting_stage(r["real_train"], r["reconstruction"], r["samples"])
    return {"n_train": len(train), "ratios": table}


def _stages_markdown(stages: dict) -> str:
    lines = ["## Which stage limits each statistic", "",
             f"Ratios to the real-vs-real floor of the held-out volumes, for {stages['n_train']} real training "
             f"volumes, their stage-1 reconstructions, and the samples (<= {PASS_RATIO:g} passes). A statistic "
             "the reconstructions already miss is stage 1's to fix; one only the samples miss is the prior's.", "",
             "| statistic | real train vs val | reconstructions vs val | samples vs val | limited by |",
             "|---|---|---|---|---|"]
    for name, r in stages["ratios"].items():
        cells = [f"{r[k]:.2f}" if r[k] is not None else "undefined" for k in ("real_train", "reconstruction", "samples")]
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


def _generation(cfg: Config, samples: Path, vqvae, vq_ckpt: dict, norm: pipeline.Normalization, rt, out_dir: Path,
                preamble: str) -> tuple[dict, dict, Path]:
    """Generation statistics of ``samples`` against held-out real volumes, the three-row comparison
    (real train, reconstructions, samples), and the report."""
    gen = read_samples(samples)
    shapes = {g.shape for g in gen}
    if len(shapes) != 1:
        raise VqldmError(f"--samples {samples}: volumes of several shapes {sorted(shapes)}")
    real = real_reference(cfg, gen[0].shape, norm, seed=cfg.seed)
    if len(real) < 2:
        raise VqldmError(f"data.val_data_dir: {cfg.data.val_data_dir} gives {len(real)} real volume(s) to "
                         f"compare with; the real-vs-real floor needs at least 2 (4 or more for a stable one)")
    log.info("comparing %d generated with %d real volumes", len(gen), len(real))
    thr = cfg.data.foreground_threshold
    gen_metrics = compare(real, gen, threshold=thr, seed=cfg.seed)
    train = real_reference(cfg, gen[0].shape, norm, seed=cfg.seed, key="train_data_dir")[:len(gen)]
    recon = reconstruct_volumes(vqvae, train, norm, rt, vq_ckpt.get("intensity_calibration"))
    stages = stage_rows(real, train, recon, gen_metrics, thr, cfg.seed)
    save_png(mip_grid([train[:4], recon[:4], gen[:4]]), out_dir / "stages.png")
    preamble = preamble + "\n\n" + _stages_markdown(stages)
    return gen_metrics, stages, write_report(out_dir, gen_metrics, real, gen, preamble=preamble)


def evaluate(cfg: Config, out_dir: Path, samples: Path | None = None, vqvae_checkpoint: str | None = None,
             progress: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rt = make_runtime(cfg)
    vq_path, what = _stage1_checkpoint(cfg, vqvae_checkpoint)
    vqvae, vq_ckpt = load_vqvae(vq_path, rt, what=what)
    norm = pipeline.normalization_of(cfg, vq_ckpt["normalization"]["intensity_range"])
    metrics: dict = {"stage1": stage1_metrics(cfg, vqvae, vq_ckpt, rt, out_dir), "vqvae_checkpoint": str(vq_path)}
    pre = _stage1_markdown(metrics["stage1"], vq_path)
    if samples is not None:
        metrics["generation"], metrics["stages"], report = _generation(cfg, samples, vqvae, vq_ckpt, norm, rt, out_dir, pre)
        metrics["samples"] = str(samples)
    else:
        report = out_dir / "report.md"
        atomic_write_bytes(report, ("# vqldm evaluation\n\n" + pre
                                    + "\n\nNo `--samples` given: generation not evaluated.\n").encode("utf-8"))
    metrics_path = out_dir / "metrics.json"
    atomic_write_bytes(metrics_path, json.dumps(metrics, indent=2).encode("utf-8"))
    return {"metrics_path": metrics_path, "report_path": report, "metrics": metrics}
