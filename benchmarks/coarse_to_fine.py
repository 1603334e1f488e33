"""Coarse-to-fine: do samples match the coarse view they were given, and do they differ in the detail?

For each of the first ``--volumes`` held-out volumes (``data.val_data_dir``), a coarse-to-fine prior
(trained with ``diffusion.coarse_condition``) draws ``--per-volume`` samples with that volume as
``--cond-volume``, and as many without a condition (the same seeds). It reports, per volume and overall:

- PSNR (data range 1) between each sample's coarse view (block means over the VQ-VAE's stride, i.e.
  the volume downsampled 4x for the demo; for a ``coarse_view: projection`` prior their mean along z)
  and the real volume's: conditioned samples against
  unconditioned ones, which show what an unguided prior gives;
- the mean pairwise MS-SSIM among one volume's conditioned samples (below 1: the detail varies), beside
  the MS-SSIM of each sample to the real volume it was conditioned on and the real volumes' own
  pairwise MS-SSIM.

usage: python benchmarks/coarse_to_fine.py --config CFG [--diffusion-checkpoint P] --out FILE.json
       [--volumes 8] [--per-volume 8] [--autoguidance W] [--guidance W]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import vqldm
from vqldm.data import pipeline
from vqldm.data.io import read_volume
from vqldm.latents import block_means
from vqldm.priors.diffusion.coarse import as_view
from vqldm.metrics.generation import ms_ssim_diversity


def coarse(vol: np.ndarray, stride: int, view: str = "volume") -> np.ndarray:
    """The view a coarse-to-fine prior is given: block means, or their mean along z (``projection``)."""
    return as_view(block_means(torch.from_numpy(np.asarray(vol, np.float32))[None, None], stride), view)[0, 0].numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _row(f: Path, real, target, cond, free, stride: int, view: str) -> dict:
    """One held-out volume's figures: each sample's view against the real one (PSNR at data range 1, and
    Pearson correlation, which a low-contrast projection needs), and the samples' MS-SSIM diversity."""
    def corr(v):
        return float(np.corrcoef(coarse(v, stride, view).ravel(), target.ravel())[0, 1])

    r = {"volume": str(f), "psnr_conditioned": [psnr(coarse(v, stride, view), target) for v in cond],
         "psnr_unconditioned": [psnr(coarse(v, stride, view), target) for v in free],
         "correlation_conditioned": [corr(v) for v in cond], "correlation_unconditioned": [corr(v) for v in free],
         "ms_ssim_among_samples": ms_ssim_diversity(list(cond))["mean"],
         "ms_ssim_to_the_real_volume": float(np.mean([ms_ssim_diversity([v, real])["mean"] for v in cond]))}
    print(f"{f.name}: coarse PSNR {np.mean(r['psnr_conditioned']):.2f} dB (unconditioned "
          f"{np.mean(r['psnr_unconditioned']):.2f}), correlation {np.mean(r['correlation_conditioned']):.3f} "
          f"({np.mean(r['correlation_unconditioned']):.3f}), MS-SSIM among samples {r['ms_ssim_among_samples']:.3f}, "
          f"to the real volume {r['ms_ssim_to_the_real_volume']:.3f}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--diffusion-checkpoint", default=None)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--per-volume", type=int, default=8)
    ap.add_argument("--autoguidance", type=float, default=None)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = vqldm.load_config(args.config)
    model = vqldm.load_model(cfg, checkpoint=args.diffusion_checkpoint)
    stride, view = model.pipeline.coarse_stride, model.pipeline.coarse_view
    norm = pipeline.Normalization.from_dict(model.pipeline.vq_ckpt["normalization"])
    files = pipeline.scan_data_dir(cfg, "val_data_dir").files[:args.volumes]
    kw = {"batch_size": args.per_volume, "autoguidance": args.autoguidance}
    rows, reals = [], []
    for i, f in enumerate(files):
        real = np.clip(norm.unit(read_volume(f).array), 0, 1)
        reals.append(real)
        target = coarse(real, stride, view)
        cond = model.sample(args.per_volume, seed=i, cond_volume=f, guidance=args.guidance, **kw).volumes
        free = model.sample(args.per_volume, seed=i, **kw).volumes
        rows.append(_row(f, real, target, cond, free, stride, view))
    allc = [p for r in rows for p in r["psnr_conditioned"]]
    allu = [p for r in rows for p in r["psnr_unconditioned"]]
    res = {"stride": stride, "per_volume": args.per_volume, "guidance": args.guidance,
           "autoguidance": args.autoguidance, "volumes": rows,
           "psnr_conditioned": {"mean": float(np.mean(allc)), "min": float(np.min(allc))},
           "psnr_unconditioned": {"mean": float(np.mean(allu)), "min": float(np.min(allu))},
           **{f"correlation_{k}": float(np.mean([c for r in rows for c in r[f"correlation_{k}"]]))
              for k in ("conditioned", "unconditioned")},
           "ms_ssim_among_samples_mean": float(np.mean([r["ms_ssim_among_samples"] for r in rows])),
           "ms_ssim_to_the_real_volume_mean": float(np.mean([r["ms_ssim_to_the_real_volume"] for r in rows])),
           "ms_ssim_among_real_volumes": ms_ssim_diversity(reals)["mean"]}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"coarse PSNR, conditioned: mean {res['psnr_conditioned']['mean']:.2f} dB, min "
          f"{res['psnr_conditioned']['min']:.2f}; unconditioned: mean {res['psnr_unconditioned']['mean']:.2f}")
    print(f"Pearson correlation of the views, conditioned {res['correlation_conditioned']:.3f}, unconditioned "
          f"{res['correlation_unconditioned']:.3f}")
    print(f"MS-SSIM among one volume's samples {res['ms_ssim_among_samples_mean']:.3f}, samples to their real "
          f"volume {res['ms_ssim_to_the_real_volume_mean']:.3f}; among real volumes {res['ms_ssim_among_real_volumes']:.3f}")


if __name__ == "__main__":
    main()
