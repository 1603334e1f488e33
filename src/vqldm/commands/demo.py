"""``vqldm demo``: the whole pipeline on built-in synthetic microtubules.

synthesise -> train stage 1 -> train stage 2 -> sample -> evaluate, all under one folder, with
the resolved config written there so every step can be rerun by hand.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch
import yaml

from vqldm.autoencoder.train import train_vqvae
from vqldm.commands.evaluate import evaluate
from vqldm.commands.sample import SampleOptions, sample_to_files
from vqldm.config import config_from_dict
from vqldm.data.io import check_data_dirs, list_volumes
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write_bytes
from vqldm.priors.diffusion.train import train_diffusion
from vqldm.synth import write_dataset

log = logging.getLogger("vqldm")

# preset -> (packaged config, synthetic data set, samples to draw)
PRESETS = {
    "demo": {"config": "demo.yaml", "shape": (48, 48, 24), "num_train": 64, "num_val": 16, "samples": 32},
    "microtubules": {"config": "microtubules.yaml", "shape": (96, 96, 48), "num_train": 256, "num_val": 32,
                     "samples": 64},
}


TIMINGS = "timings.json"  # seconds per phase of the last run, beside config.yaml
PHASES = (("synth_s", "synthesis"), ("stage1_s", "stage 1"), ("stage2_s", "stage 2"), ("sample_s", "sampling"),
          ("evaluate_s", "evaluation"))


def preset_config_dict(name: str) -> dict:
    text = resources.files("vqldm.configs").joinpath(PRESETS[name]["config"]).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _under(out: Path, d: dict) -> dict:
    """Point every data and output path of a preset into ``out``."""
    d["data"]["train_data_dir"] = str(out / "data" / "train")
    d["data"]["val_data_dir"] = str(out / "data" / "val")
    for stage, ck, lg in (("vqvae", "vqvae_checkpoints", "vqvae_logs"),
                          ("diffusion", "diffusion_checkpoints", "diffusion_logs"),
                          ("prior", "prior_checkpoints", "prior_logs")):
        d.setdefault(stage, {}).setdefault("checkpoints", {})["output_dir"] = str(out / ck)
        d[stage].setdefault("logging", {})["log_dir"] = str(out / lg)
    for stage in ("diffusion", "prior"):
        d[stage]["checkpoints"]["vqvae_path"] = str(out / "vqvae_checkpoints" / "best_model.pt")
    return d


def _check_device(d: dict, device: str) -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise VqldmError("--device cuda: no CUDA GPU is visible (use --device cpu or auto)")
    if device != "auto":
        d.setdefault("device", {})["use_cuda"] = device == "cuda"


def _timed(timings: dict, key: str, fn):
    t = time.perf_counter()
    out = fn()
    timings[key] = time.perf_counter() - t
    return out


def _print_summary(out: Path, preset: str, timings: dict, r1, r2, ev: dict, samples: Path) -> None:
    s1 = ev["metrics"]["stage1"]
    gen = ev["metrics"]["generation"]["summary"]
    print(f"\nvqldm demo finished in {timings['total_s']:.0f} s ({preset} preset): "
          + ", ".join(f"{label} {timings[k]:.0f} s" for k, label in PHASES if k in timings))
    rows = {
        "config": out / "config.yaml",
        "data": out / "data",
        "stage 1 checkpoint": r1.best_path,
        "stage 2 checkpoint": r2.best_path,
        "samples (NIfTI)": samples,
        "sample preview": samples / "preview.png",
        "metrics": ev["metrics_path"],
        "report": ev["report_path"],
        "timings": out / TIMINGS,
        "TensorBoard": f"tensorboard --logdir {out}",
    }
    for k, v in rows.items():
        print(f"  {k:<20} {v}")
    print(f"  stage 1 (val): PSNR {s1['psnr']:.2f} dB, SSIM {s1['ssim']:.3f}, foreground Dice {s1['dice']:.3f}, "
          f"codebook usage {s1['codebook_usage']:.0%}")
    print(f"  generation: max distance ratio to the real-vs-real floor {gen['max_ratio']:.2f} "
          f"({'within' if gen['within_2x_floor'] else 'not within'} 2x)" if gen.get("max_ratio") is not None
          else "  generation: see the report")
    if gen.get("redraw_pass_rate") is not None:
        print(f"    within 2x in {gen['redraw_pass_rate']:.0%} of {gen['redraws']['n']} bootstrap redraws of the "
              f"samples: how much the verdict owes to which volumes were drawn")
    for name, r in ev["metrics"].get("stages", {}).get("ratios", {}).items():
        if r["limited_by"] != "none (passes)":
            print(f"    {name}: samples {_ratio(r['samples'], r.get('samples_interval'))}, reconstructions "
                  f"{_ratio(r['reconstruction'])} x floor; limited by {r['limited_by']}")


def _ratio(r: float | None, interval: list | None = None) -> str:
    if r is None:
        return "undefined"
    return f"{r:.2f}" + (" (redraws {:.2f}-{:.2f})".format(*interval) if interval else "")


def run_demo(out: Path, progress: bool = True, overwrite: bool = False, device: str = "auto",
             preset: str = "demo") -> dict:
    p = PRESETS[preset]
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = _under(out, preset_config_dict(preset))
    _check_device(d, device)
    timings = {}
    if list_volumes(out / "data" / "train"):
        log.info("[1/5] reusing the synthetic volumes in %s", out / "data")
    else:
        log.info("[1/5] synthesising %d + %d microtubule volumes of %s voxels", p["num_train"], p["num_val"], p["shape"])
        write_dataset(out / "data", p["num_train"], p["num_val"], p["shape"], seed=0, progress=progress)
    timings["synth_s"] = time.perf_counter() - t0
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(d, sort_keys=False).encode("utf-8"))
    cfg = config_from_dict(d, source=str(out / "config.yaml"))
    check_data_dirs(cfg.data)
    log.info("[2/5] stage 1: VQ-VAE")
    r1 = _timed(timings, "stage1_s", lambda: train_vqvae(cfg, overwrite=overwrite, progress=progress))
    log.info("[3/5] stage 2: latent diffusion")
    r2 = _timed(timings, "stage2_s", lambda: train_diffusion(cfg, overwrite=overwrite, progress=progress))
    log.info("[4/5] sampling %d volumes", p["samples"])
    samples = out / "samples"
    opts = SampleOptions(num_samples=p["samples"], out_dir=samples, seed=0, batch_size=16, progress=progress,
                         overwrite=overwrite)
    sampled = _timed(timings, "sample_s", lambda: sample_to_files(cfg, opts))
    log.info("[5/5] evaluating")
    ev = _timed(timings, "evaluate_s", lambda: evaluate(cfg, out / "evaluation", samples=samples, progress=progress))
    timings["total_s"] = time.perf_counter() - t0
    archive_previous(out, (TIMINGS,))  # an --overwrite run keeps the earlier run's times
    record = {"preset": preset, "device": sampled["device"], "threads": torch.get_num_threads(), **timings}
    atomic_write_bytes(out / TIMINGS, json.dumps(record, indent=2).encode("utf-8"))
    _print_summary(out, preset, timings, r1, r2, ev, samples)
    return {"timings": timings, "evaluation": ev["metrics"], "out": str(out)}
