"""The figures of docs/editing.md, measured on a trained run (CONFIG: both stages' checkpoints).

reconstruct: synthetic volumes four training patches wide (and 4 x 4 patches) at the training
voxel size, each reconstructed whole (one encoder/decoder call, where it fits) and by sliding
window (``vqldm reconstruct``'s path). Prints the PSNR of each against the input and the seam ratio
(:func:`vqldm.metrics.reconstruction.seam_ratio`: the mean step across window borders over that
across every other plane) of the windowed reconstruction, the whole one and the input at the same
planes; with few filaments per plane the input's own ratio strays from 1, so the three are compared.

usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/edit_figures.py --config CONFIG --part reconstruct [--n 8]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from vqldm.commands.reconstruct import load_stage1, reconstruct_one
from vqldm.config import load_config
from vqldm.latents import LatentNorm, encode
from vqldm.metrics.reconstruction import psnr, seam_ratio
from vqldm.sampling.decode import decode_latents
from vqldm.sampling.window import window_borders
from vqldm.synth.microtubules import MicrotubuleParams, synth_volume


def wide_volume(patch: list[int], tiles: list[int], seed: int) -> np.ndarray:
    """A synthetic volume ``tiles`` patches wide at the demo data's voxel size (8000 x 8000 x 300 nm
    per 48 x 48 x 24 patch), with filaments in proportion to its area."""
    shape = tuple(p * t for p, t in zip(patch, tiles))
    area = tiles[0] * tiles[1]
    p = MicrotubuleParams(fov_nm=(8000.0 * tiles[0], 8000.0 * tiles[1], 300.0 * tiles[2]),
                          n_filaments=(5 * area, 15 * area))
    return synth_volume(shape, np.random.default_rng(seed), p)[0]


def reconstruct_part(cfg, n: int) -> dict:
    s1 = load_stage1(cfg, None)
    out = {}
    for tiles in ([4, 1, 1], [4, 4, 1]):
        rows = []
        for seed in range(n):
            vol = wide_volume(s1.patch, tiles, seed)
            x = torch.from_numpy(vol)[None, None]
            whole = decode_latents(s1.vqvae, encode(s1.vqvae, s1.to_network(vol), s1.rt), LatentNorm(1.0),
                                   s1.intensity_range, False, s1.rt.autocast, s1.ckpt.get("intensity_calibration"))
            win = torch.from_numpy(reconstruct_one(s1, vol, 0.25))[None, None]
            b = window_borders(list(vol.shape), s1.patch, s1.stride)
            rows.append([float(psnr(whole, x)), float(psnr(win, x)), seam_ratio(win[0, 0], b),
                         seam_ratio(whole[0, 0], b), seam_ratio(vol, b)])
        r = np.array(rows)
        out["x".join(map(str, tiles)) + " patches"] = {
            "shape": list(vol.shape), "volumes": n, "psnr_whole_db": r[:, 0].mean(), "psnr_window_db": r[:, 1].mean(),
            "psnr_window_minus_whole_db": (r[:, 1] - r[:, 0]).mean(),
            "max_abs_psnr_difference_db": np.abs(r[:, 1] - r[:, 0]).max(),
            "seam_ratio_window": r[:, 2].mean(), "seam_ratio_whole": r[:, 3].mean(), "seam_ratio_input": r[:, 4].mean()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--part", choices=["reconstruct"], required=True)
    ap.add_argument("--n", type=int, default=8, help="volumes per figure (default 8)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    res = {"reconstruct": reconstruct_part}[args.part](cfg, args.n)
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
