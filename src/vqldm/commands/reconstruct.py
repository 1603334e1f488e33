"""``vqldm reconstruct``: volumes of any size through the VQ-VAE, one training-patch window at a time.

Each volume is normalised as stage 1 was trained, padded to a multiple of the VQ-VAE's stride,
encoded window by window with the pre-quantisation latents Gaussian-blended and quantised once
(:func:`vqldm.sampling.window.encode_windowed`), decoded window by window, cropped back and
written with the input's spacing, unit and affine. Memory for the networks is one window's.
The helpers here (the stage-1 model of a run, reading an input on the training grid, the output
folder) serve ``vqldm edit`` too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqldm import __version__
from vqldm.autoencoder.model import total_stride
from vqldm.checkpoint import file_sha256
from vqldm.config import Config, latent_spatial, vqvae_from_network
from vqldm.data.io import VOLUME_SUFFIXES, Volume, list_volumes, read_volume, write_volume
from vqldm.data.pipeline import Normalization
from vqldm.data.units import VoxelGrid
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write_bytes, unique_stems
from vqldm.latents import load_vqvae
from vqldm.metrics.reconstruction import psnr
from vqldm.runtime import Runtime, make_runtime
from vqldm.sampling.window import SIGMA_SCALE, decode_windowed, encode_windowed, pad_to_multiple
from vqldm.visuals import mip_grid, save_png


@dataclass
class Stage1:
    """A frozen VQ-VAE and what windowed encoding and decoding need of its checkpoint."""

    vqvae: torch.nn.Module
    ckpt: dict
    path: Path
    rt: Runtime

    @property
    def stride(self) -> int:
        return total_stride(self.ckpt["network"])

    @property
    def patch(self) -> list[int]:
        return list(self.ckpt["data"]["patch_size"])

    @property
    def latent_patch(self) -> list[int]:
        return latent_spatial(vqvae_from_network(self.ckpt["network"]), self.patch)

    @property
    def grid(self) -> VoxelGrid:
        return VoxelGrid.from_meta(self.ckpt.get("data", {}))

    @property
    def intensity_range(self) -> list[float]:
        return list(self.ckpt["normalization"]["intensity_range"])

    def to_network(self, unit: np.ndarray) -> torch.Tensor:
        """A [0, 1] volume (X, Y, Z) -> the network range, (1, 1, X, Y, Z)."""
        lo, hi = self.intensity_range
        return torch.from_numpy(np.asarray(unit, np.float32) * (hi - lo) + lo)[None, None]

    def encode(self, unit: np.ndarray, overlap: float, progress: bool = False) -> torch.Tensor:
        """A [0, 1] volume whose sides are multiples of the stride -> its quantised latent (1, D, x, y, z)."""
        x = self.rt.to_device(self.to_network(unit))
        return encode_windowed(self.vqvae, x, self.patch, self.stride, overlap, self.rt.autocast, progress)

    def decode(self, z: torch.Tensor, overlap: float, progress: bool = False) -> torch.Tensor:
        """A quantised latent (B, D, x, y, z) -> volumes in [0, 1], (B, 1, X, Y, Z) on the CPU."""
        return decode_windowed(self.vqvae, z, self.latent_patch, self.stride, self.intensity_range, overlap,
                               self.rt.autocast, self.ckpt.get("intensity_calibration"), progress)


def load_stage1(cfg: Config, vqvae_checkpoint: str | None, rt: Runtime | None = None) -> Stage1:
    """``vqvae_checkpoint``, else ``vqvae.checkpoints.output_dir/best_model.pt``."""
    rt = rt or make_runtime(cfg)
    if vqvae_checkpoint:
        path, what = Path(vqvae_checkpoint), "--vqvae-checkpoint"
    else:
        path, what = Path(cfg.vqvae.checkpoints.output_dir) / "best_model.pt", "vqvae.checkpoints.output_dir"
    vqvae, ckpt = load_vqvae(path, rt, what=what)
    return Stage1(vqvae, ckpt, path, rt)


def read_input(path: Path, stage1: Stage1, what: str) -> tuple[Volume, np.ndarray]:
    """A volume and its [0, 1] normalisation (stage 1's method); refuses, in one line, a volume whose
    voxel spacing is not the training data's."""
    vol = read_volume(path)
    grid = stage1.grid
    if grid.unit == "unknown" and vol.unit != "unknown":
        grid = VoxelGrid(grid.spacing, vol.unit)  # a checkpoint that recorded no unit: compare numbers
    if not vol.grid.same_spacing(grid, rtol=1e-3):
        raise VqldmError(f"{what} {path}: voxel spacing {vol.grid.describe()} differs from the training data's "
                         f"{stage1.grid.describe()}; resample it to the training spacing first")
    return vol, Normalization.from_dict(stage1.ckpt["normalization"]).unit(vol.array)


def prepare_out(out: Path, patterns: tuple[str, ...], overwrite: bool) -> None:
    """Refuse a folder that holds earlier outputs (``patterns``) unless ``overwrite``, which moves them
    to ``previous_<time>/``; nothing is deleted."""
    existing = [p for pat in patterns for p in out.glob(pat)] if out.is_dir() else []
    if existing and not overwrite:
        raise VqldmError(f"--out {out}: already holds {len(existing)} earlier output file(s) "
                         f"({sorted(existing)[0].name} ...); choose another folder or pass --overwrite")
    if existing:
        archive_previous(out, patterns)
    out.mkdir(parents=True, exist_ok=True)


def write_record(path: Path, record: dict) -> None:
    atomic_write_bytes(path, json.dumps({"vqldm_version": __version__, **record}, indent=2).encode("utf-8"))


@dataclass
class ReconstructOptions:
    volumes: Path
    out_dir: Path
    vqvae_checkpoint: str | None = None
    overlap: float = 0.25  # share of a window its neighbour covers (rounded to the latent grid)
    overwrite: bool = False
    progress: bool = True


OUTPUTS = ("recon_*", "reconstruct.png", "reconstruct.json")


def reconstruct_one(stage1: Stage1, unit: np.ndarray, overlap: float, progress: bool = False) -> np.ndarray:
    """One [0, 1] volume of any size -> its windowed VQ-VAE reconstruction in [0, 1], same size."""
    x, size = pad_to_multiple(torch.from_numpy(np.asarray(unit, np.float32))[None, None], stage1.stride)
    z = stage1.encode(x[0, 0].numpy(), overlap, progress)
    rec = stage1.decode(z, overlap, progress)[0, 0]
    return rec[: size[0], : size[1], : size[2]].numpy()


def reconstruct_volumes(cfg: Config, opts: ReconstructOptions) -> dict:
    """Write ``recon_<name>.nii.gz`` per volume, ``reconstruct.png`` (input over reconstruction MIPs)
    and ``reconstruct.json`` (PSNR per volume, settings); returns the record."""
    if not 0 <= opts.overlap < 1:
        raise VqldmError(f"--overlap {opts.overlap}: must lie in [0, 1)")
    files = list_volumes(opts.volumes)
    if not files:
        raise VqldmError(f"--volumes: no volumes (.nii, .nii.gz, .tif, .tiff) in {opts.volumes}")
    stems = unique_stems(files, VOLUME_SUFFIXES, f"--volumes {opts.volumes}")
    stage1 = load_stage1(cfg, opts.vqvae_checkpoint)
    inputs = [read_input(f, stage1, "--volumes") for f in files]  # every file checked before any is written
    prepare_out(opts.out_dir, OUTPUTS, opts.overwrite)
    rows, shown, t0 = [], [], time.perf_counter()
    it = zip(files, stems, inputs)
    if opts.progress:
        from tqdm import tqdm

        it = tqdm(list(it), desc="reconstructing", unit="vol", leave=False)
    for f, stem, (vol, unit) in it:
        rec = reconstruct_one(stage1, unit, opts.overlap)
        name = f"recon_{stem}.nii.gz"
        write_volume(opts.out_dir / name, rec, vol.spacing, vol.unit, vol.affine)
        rows.append({"file": f.name, "output": name, "shape": list(rec.shape),
                     "psnr_db": float(psnr(torch.from_numpy(rec)[None], torch.from_numpy(unit)[None]))})
        if len(shown) < 4:
            shown.append((unit, rec))
    save_png(mip_grid([[u for u, _ in shown], [r for _, r in shown]]), opts.out_dir / "reconstruct.png")
    record = {"command": "reconstruct", "volumes": rows, "overlap": opts.overlap, "window": stage1.patch,
              "blend": f"gaussian (sigma_scale {SIGMA_SCALE}), pre-quantisation latents, quantised once",
              "vqvae_checkpoint": str(stage1.path), "vqvae_sha256": file_sha256(stage1.path),
              "device": stage1.rt.describe(), "seconds": time.perf_counter() - t0}
    write_record(opts.out_dir / "reconstruct.json", record)
    return record
