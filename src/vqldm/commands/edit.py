"""``vqldm edit``: edit existing volumes with the trained diffusion prior.

- ``interpolate``: encode A and B, invert each latent with deterministic DDIM to the timestep at
  ``depth`` x T (1: all the way to its noise), slerp the two there, regenerate every frame from that
  timestep with the same DDIM chain, snap to the codebook and decode; frame 0 gives back A's VQ-VAE
  reconstruction and frame N B's.
- ``sdedit``: noise the input's latent to ``strength`` x T with seeded noise and denoise it with DDIM
  (Meng et al., 2022): small strengths keep the input's layout, 1 draws a fresh sample.
- ``inpaint``: regenerate the masked region (RePaint on a DDIM chain; the mask dilated to the latent
  grid, the result feathered back in voxel space); every voxel outside the feathered mask is kept.
- ``outpaint``: pad the input and inpaint the new border.

Latents are encoded and decoded through :mod:`vqldm.sampling.window` (one window where the input is
the training patch); on a latent larger than the training latent the UNet runs on blended tiles
(:func:`vqldm.sampling.window.tiled_denoiser`), as ``vqldm sample --shape`` does. Every file carries the input's voxel spacing,
unit and affine; ``<edit>.png`` shows the MIPs and ``<edit>.json`` records the settings and figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqldm.autoencoder.model import nearest_codes
from vqldm.checkpoint import file_sha256
from vqldm.commands.reconstruct import Stage1, prepare_out, read_input, write_record
from vqldm.config import Config, check_latent_for_unet, decoded_spatial, latent_spatial, vqvae_from_network
from vqldm.data.io import Volume, write_volume
from vqldm.errors import VqldmError
from vqldm.metrics.reconstruction import psnr
from vqldm.priors.diffusion.pipeline import DiffusionPipeline, load_pipeline
from vqldm.runtime import sample_generator
from vqldm.sampling.edit import ddim_from, interpolate_latents, noise_to, repaint, sdedit_start
from vqldm.visuals import mip_grid, save_png


@dataclass
class EditOptions:
    out_dir: Path
    steps: int = 50  # DDIM steps of the whole chain (an edit runs some or all of them)
    seed: int = 0
    snap: bool = True  # snap the edited latent to the codebook before decoding
    overlap: float = 0.25  # sliding-window overlap for encoding and decoding
    diffusion_checkpoint: str | None = None
    vqvae_checkpoint: str | None = None
    use_ema: bool = True
    overwrite: bool = False
    progress: bool = True
    class_name: str | None = None  # class-conditional model: the class to edit towards (None: the null class)
    guidance: float = 1.0  # classifier-free guidance weight with class_name
    autoguidance: float = 1.0  # autoguidance weight (1: the model alone; the guide its run kept otherwise)
    cond: dict | None = None  # a model with covariates: {name: value} to edit towards (--cond KEY=VALUE)
    cond_volume: str | None = None  # a coarse-to-fine model: the volume whose coarse view the edit follows


@dataclass
class Editor:
    """The diffusion pipeline and its stage 1, and what every edit does with them."""

    pipe: DiffusionPipeline
    stage1: Stage1
    opts: EditOptions

    def latent(self, path: Path, what: str) -> tuple[Volume, np.ndarray, torch.Tensor]:
        """The volume at ``path``, its [0, 1] normalisation and its normalised latent (1, D, x, y, z)."""
        vol, unit = read_input(path, self.stage1, what)
        check_shape(self.pipe, list(vol.array.shape), f"{what} {path}")
        return vol, unit, self.pipe.norm.normalize(self.stage1.encode(unit, self.opts.overlap))

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Normalised latents (B, D, ...) -> volumes in [0, 1], (B, X, Y, Z)."""
        z = self.pipe.norm.denormalize(z)
        if self.opts.snap:
            from vqldm.autoencoder.model import snap_to_codebook

            z = snap_to_codebook(self.pipe.vqvae, z)
        return self.stage1.decode(z, self.opts.overlap)[:, 0].numpy()

    def denoiser(self, z: torch.Tensor):
        """The UNet call for latents like ``z``: whole up to the training latent, tiled beyond."""
        tiled, train = self.pipe.tiled(list(z.shape[1:]))
        if not tiled:
            return self.pipe.denoiser()
        if self.pipe.coarse is not None:
            raise VqldmError("--cond-volume: the coarse view covers one training patch, and this edit's volume is "
                             "larger; edit a patch-sized volume, or omit --cond-volume")
        from vqldm.sampling.window import tiled_denoiser

        return tiled_denoiser(self.pipe.plain_denoiser(), train, self.opts.overlap)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the nearest code of every latent voxel, (B, x, y, z)."""
        return nearest_codes(self.pipe.vqvae, self.pipe.norm.denormalize(z))

    def desc(self, what: str) -> str | None:
        return what if self.opts.progress else None

    def record(self) -> dict:
        p = self.pipe
        return {"steps": self.opts.steps, "seed": self.opts.seed, "snap_to_codebook": self.opts.snap,
                "sampler": "ddim (eta 0, no clipping)", "ema": self.opts.use_ema and bool(p.diff_ckpt.get("ema")),
                "diffusion_checkpoint": str(p.diff_path), "diffusion_sha256": file_sha256(p.diff_path),
                "vqvae_checkpoint": str(p.vq_path), "vqvae_sha256": p.vq_sha256, "device": p.rt.describe(),
                **self.conditions(), "autoguidance": p.autoguidance_record()}

    def conditions(self) -> dict:
        """What the edit's JSON record says of the conditions (a conditional model only)."""
        p, o, out = self.pipe, self.opts, {}
        if p.classes:
            out["class"] = o.class_name
        if p.covariates:
            out["covariates"] = dict(o.cond or {})
        if p.coarse_stride:
            out["cond_volume"] = None if p.coarse_path is None else str(p.coarse_path)
        return {**out, "guidance": o.guidance} if out else {}


def check_shape(pipe: DiffusionPipeline, shape: list[int], what: str) -> None:
    """Refuse, in one line, a volume shape the VQ-VAE cannot decode back to or the UNet cannot take."""
    vq = vqvae_from_network(pipe.vq_ckpt["network"])
    lat = latent_spatial(vq, shape)
    if decoded_spatial(vq, lat) != list(shape):
        raise VqldmError(f"{what}: shape {shape} is not one the VQ-VAE decodes to (latent {lat} decodes to "
                         f"{decoded_spatial(vq, lat)}); crop or pad it to a multiple of the stride")
    check_latent_for_unet(len(pipe.diff_ckpt["network"]["channels"]), lat, f"{what}: shape {shape}")


def load_editor(cfg: Config, opts: EditOptions) -> Editor:
    if not 0 <= opts.overlap < 1:
        raise VqldmError(f"--overlap {opts.overlap}: must lie in [0, 1)")
    pipe = load_pipeline(cfg, opts.diffusion_checkpoint, opts.vqvae_checkpoint, opts.use_ema)
    if pipe.schedule["type"] != "ddpm":
        raise VqldmError(f"vqldm edit inverts DDIM chains: {pipe.diff_path} was trained with the "
                         f"{pipe.schedule['type']} objective, not ddpm")
    if not 1 <= opts.steps <= pipe.schedule["num_train_timesteps"]:
        raise VqldmError(f"--steps {opts.steps}: must lie in [1, {pipe.schedule['num_train_timesteps']}]")
    pipe.set_conditions(opts.class_name, opts.guidance, opts.cond, opts.cond_volume)  # one line for bad ones
    ag = cfg.diffusion.autoguidance
    pipe.set_autoguidance(opts.autoguidance, ag.min_timestep, rescale=ag.rescale)
    return Editor(pipe, Stage1(pipe.vqvae, pipe.vq_ckpt, pipe.vq_path, pipe.rt), opts)


def _write(ed: Editor, name: str, vols: np.ndarray, like: Volume, picture_rows: list[list[np.ndarray]],
           record: dict) -> dict:
    """``<name>_<i>.nii.gz`` per volume, ``<name>.png`` and ``<name>.json``; returns the paths."""
    out = ed.opts.out_dir
    for i, v in enumerate(vols):
        write_volume(out / f"{name}_{i:04d}.nii.gz", v, like.spacing, like.unit, like.affine)
    save_png(mip_grid(picture_rows), out / f"{name}.png")
    write_record(out / f"{name}.json", {"command": f"edit {name}", **record, **ed.record()})
    return {"volumes": f"{out}/{name}_0000.nii.gz ... ({len(vols)})", "picture": out / f"{name}.png",
            "record": out / f"{name}.json"}


INTERPOLATE_DEPTH = 0.4  # how far interpolation inverts by default (chosen by measurement: docs/editing.md)


def foreground(vols: np.ndarray, threshold: float) -> list[float]:
    return [float((v > threshold).mean()) for v in vols]


def interpolate(cfg: Config, a: Path, b: Path, frames: int, opts: EditOptions, depth: float | None = None) -> dict:
    """Frames 0..``frames`` between A and B: DDIM-invert both to ``depth`` x T (None:
    :data:`INTERPOLATE_DEPTH`), slerp there, regenerate, decode."""
    depth = INTERPOLATE_DEPTH if depth is None else depth
    if frames < 1:
        raise VqldmError(f"--frames {frames}: must be >= 1")
    if not 0 < depth <= 1:
        raise VqldmError(f"--depth {depth}: must lie in (0, 1]")
    ed = load_editor(cfg, opts)
    va, ua, za = ed.latent(a, "--a")
    vb, ub, zb = ed.latent(b, "--b")
    if va.array.shape != vb.array.shape:
        raise VqldmError(f"--b {b}: shape {list(vb.array.shape)} differs from --a's {list(va.array.shape)}")
    prepare_out(opts.out_dir, ("frame_*", "frame.png", "frame.json"), opts.overwrite)
    t0 = time.perf_counter()
    first, start = sdedit_start(opts.steps, ed.pipe.schedule, depth, "--depth")
    z = interpolate_latents(ed.denoiser(za), za, zb, frames, opts.steps, ed.pipe.schedule, depth,
                            autocast=ed.pipe.rt.autocast, progress=opts.progress)
    vols, rec = ed.decode(z), ed.decode(torch.cat([za, zb]))  # the end frames should give back rec
    same = (ed.codes(z[[0, -1]]) == ed.codes(torch.cat([za, zb]))).flatten(1).float().mean(1)
    thr = float(ed.stage1.ckpt.get("data", {}).get("foreground_threshold", 0.1))
    record = {"a": str(a), "b": str(b), "frames": frames, "depth": depth, "start_timestep": start,
              "steps_run": opts.steps - first, "foreground_fraction": foreground(vols, thr),
              "foreground_threshold": thr, "psnr_frame0_vs_a_reconstruction_db": psnr_of(vols[0], rec[0]),
              "psnr_last_frame_vs_b_reconstruction_db": psnr_of(vols[-1], rec[1]),
              "codes_frame0_as_a": float(same[0]), "codes_last_frame_as_b": float(same[1]),
              "seconds": time.perf_counter() - t0}
    rows = [[ua, ub]] + [list(vols[i:i + 5]) for i in range(0, len(vols), 5)]
    return _write(ed, "frame", vols, va, rows, record)


def psnr_of(x: np.ndarray, y: np.ndarray) -> float:
    return float(psnr(torch.from_numpy(x)[None], torch.from_numpy(y)[None]))


def sdedit(cfg: Config, source: Path, strength: float, num: int, opts: EditOptions) -> dict:
    """``num`` variants of the input: its latent noised to ``strength`` x T (noise seeded by (seed, i))
    and denoised with DDIM."""
    if num < 1:
        raise VqldmError(f"--num-samples {num}: must be >= 1")
    if not 0 < strength <= 1:
        raise VqldmError(f"--strength {strength}: must lie in (0, 1]")
    ed = load_editor(cfg, opts)
    first, t = sdedit_start(opts.steps, ed.pipe.schedule, strength)
    vol, unit, z0 = ed.latent(source, "--input")
    prepare_out(opts.out_dir, ("sdedit_*", "sdedit.png", "sdedit.json"), opts.overwrite)
    t0 = time.perf_counter()
    gens = [sample_generator(opts.seed, i) for i in range(num)]
    x = torch.cat([noise_to(z0, t, ed.pipe.schedule, g) for g in gens])
    z = ddim_from(ed.denoiser(z0), x, opts.steps, ed.pipe.schedule, first, autocast=ed.pipe.rt.autocast,
                  desc=ed.desc("SDEdit denoising"))
    vols, rec = ed.decode(z), ed.decode(z0)[0]
    same = (ed.codes(z) == ed.codes(z0)).flatten(1).float().mean(1)
    record = {"input": str(source), "strength": strength, "start_timestep": t, "steps_run": opts.steps - first,
              "num_samples": num, "psnr_vs_input_reconstruction_db": [psnr_of(v, rec) for v in vols],
              "codes_as_input": [float(c) for c in same],
              "seconds": time.perf_counter() - t0}
    return _write(ed, "sdedit", vols, vol, [[unit, rec], list(vols)], record)


# ---------------------------------------------------------------------------- inpaint and outpaint
def latent_mask(mask: np.ndarray, stride: int) -> torch.Tensor:
    """A voxel mask (X, Y, Z) dilated to the latent grid: a latent voxel is masked where any voxel of
    its block is, (1, 1, x, y, z) float."""
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    return torch.nn.functional.max_pool3d(m, stride, stride) if stride > 1 else m


def feather(mask: np.ndarray, width: int) -> np.ndarray:
    """Blending weight in voxel space: 1 on the mask, falling linearly to 0 over ``width`` voxels
    (Euclidean distance) outside it; exactly 0 beyond."""
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~np.asarray(mask, bool))
    return np.clip(1.0 - d / (width + 1), 0.0, 1.0).astype(np.float32)


def to_raw(unit: np.ndarray, raw: np.ndarray, method: str) -> np.ndarray:
    """[0, 1] values back to the input's intensity scale (per-volume min-max undone; fixed: as is)."""
    if method == "fixed":
        return unit
    lo, hi = float(raw.min()), float(raw.max())
    return lo + unit * (hi - lo)


@dataclass
class PaintOptions:
    feather: int = 2  # voxels over which the regenerated region blends into the input
    resample: int = 2  # RePaint's redos per step (1: none)


def paint(ed: Editor, vol: Volume, raw: np.ndarray, mask: np.ndarray, po: PaintOptions, name: str,
          record: dict) -> dict:
    """Regenerate ``mask`` of ``raw`` (the input's intensities, already at the output's shape) and blend
    it back: outside the feathered mask every voxel keeps its input value exactly."""
    from vqldm.data.pipeline import Normalization

    if po.feather < 0 or po.resample < 1:
        raise VqldmError(f"--feather {po.feather} / --resample {po.resample}: need feather >= 0, resample >= 1")
    norm = Normalization.from_dict(ed.stage1.ckpt["normalization"])
    check_shape(ed.pipe, list(raw.shape), f"--input {vol.path}")
    z0 = ed.pipe.norm.normalize(ed.stage1.encode(norm.unit(raw), ed.opts.overlap))
    prepare_out(ed.opts.out_dir, (f"{name}_*", f"{name}.png", f"{name}.json"), ed.opts.overwrite)
    t0, m = time.perf_counter(), latent_mask(mask, ed.stage1.stride).to(z0.device)
    noise = ed.pipe.noise([0], ed.opts.seed, list(z0.shape[1:]))
    g = torch.Generator(device=z0.device).manual_seed(int(ed.opts.seed) * 7919)
    z = repaint(ed.denoiser(z0), z0, m, noise, ed.opts.steps, ed.pipe.schedule, g, resample=po.resample,
                autocast=ed.pipe.rt.autocast, desc=ed.desc(f"{name} (RePaint)"))
    w = feather(mask, po.feather)
    gen = to_raw(ed.decode(z)[0], raw, norm.method)
    out = np.where(w > 0, (1 - w) * raw + w * gen, raw).astype(np.float32)
    thr = float(ed.stage1.ckpt.get("data", {}).get("foreground_threshold", 0.1))
    unit_out = norm.unit(out)
    record = {**record, "feather_voxels": po.feather, "resample": po.resample, "masked_voxels": int(mask.sum()),
              "latent_voxels_regenerated": int(m.sum()),
              "foreground_fraction_in_mask": float((unit_out[mask] > thr).mean()),
              "voxels_changed_outside_feather": int((out != raw)[w == 0].sum()),
              "seconds": time.perf_counter() - t0}
    return _write(ed, name, out[None], vol, [[norm.unit(raw), w, unit_out]], record)


def inpaint(cfg: Config, source: Path, mask_path: Path, opts: EditOptions, po: PaintOptions) -> dict:
    """Regenerate the voxels of ``mask_path`` (nonzero: regenerate) in ``source``."""
    from vqldm.data.io import read_volume

    ed = load_editor(cfg, opts)
    vol, _ = read_input(source, ed.stage1, "--input")
    mask = read_volume(mask_path).array > 0
    if mask.shape != vol.array.shape:
        raise VqldmError(f"--mask {mask_path}: shape {list(mask.shape)} differs from --input's "
                         f"{list(vol.array.shape)}")
    if not mask.any():
        raise VqldmError(f"--mask {mask_path}: the mask is empty (no nonzero voxel): nothing to inpaint")
    return paint(ed, vol, vol.array, mask, po, "inpaint", {"input": str(source), "mask": str(mask_path)})


def outpaint(cfg: Config, source: Path, pad: list[int], opts: EditOptions, po: PaintOptions) -> dict:
    """Extend ``source`` by ``pad`` voxels on both sides of each axis and generate the new border."""
    if len(pad) != 3 or min(pad) < 0 or max(pad) == 0:
        raise VqldmError(f"--pad {pad}: three voxel counts >= 0, not all 0")
    ed = load_editor(cfg, opts)
    vol, _ = read_input(source, ed.stage1, "--input")
    raw = np.pad(vol.array, [(p, p) for p in pad], mode="constant", constant_values=float(vol.array.min()))
    mask = np.ones(raw.shape, bool)
    mask[tuple(slice(p, p + n) for p, n in zip(pad, vol.array.shape))] = False
    affine = None if vol.affine is None else _shifted(vol.affine, pad)
    grown = Volume(raw, vol.spacing, vol.path, vol.unit, affine)
    return paint(ed, grown, raw, mask, po, "outpaint", {"input": str(source), "pad": list(pad)})


def _shifted(affine: np.ndarray, pad: list[int]) -> np.ndarray:
    """The affine of a volume grown by ``pad`` voxels before each axis: voxel 0 moves ``pad`` voxels back."""
    a = np.array(affine, float)
    a[:3, 3] -= a[:3, :3] @ np.asarray(pad, float)
    return a
