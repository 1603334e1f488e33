"""The latent every prior learns: a frozen stage-1 checkpoint, its encodings, the latent cache and
the latent normalisation.

Latents are the quantised embeddings (B, embedding_dim, x, y, z). A diffusion prior sees them
normalised (:class:`LatentNorm`): multiplied by ``scale_factor`` = 1 / std, measured over many
training batches (Rombach et al., 2022, sec. 4.3 and appendix G), so that its N(0, I) prior matches
their scale; or, with ``diffusion.latent_norm: channel``, each channel shifted by its own mean and
scaled by its own 1 / std (the channels of a small codebook differ in spread several-fold).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vqldm import distributed as dist
from vqldm.autoencoder.model import build_vqvae, codebook_range, nearest_codes, quantized_latent, vqvae_net_config
from vqldm.checkpoint import file_sha256, load_checkpoint, rebuild
from vqldm.config import Config, latent_spatial, vqvae_from_network
from vqldm.data import pipeline
from vqldm.data.pipeline import to_unit
from vqldm.data.units import VoxelGrid
from vqldm.errors import VqldmError
from vqldm.runtime import Runtime

log = logging.getLogger("vqldm")

# whole-volume encoding for the cache is skipped above this many voxels per volume
MAX_CACHE_VOXELS = 256**3


def load_vqvae(path, rt: Runtime, what: str = "stage-1 checkpoint"):
    """Rebuild a frozen VQ-VAE from a stage-1 checkpoint alone; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path, kind="vqvae", what=what)
    model = rebuild(lambda: build_vqvae(ckpt["network"]), ckpt.get("state_dict", {}), what, path, "VQ-VAE")
    return rt.frozen(model), ckpt


def recorded_stage1(ckpt: dict, path, vqvae_checkpoint: str | None, rt: Runtime):
    """The stage-1 checkpoint a prior checkpoint (``ckpt`` at ``path``) was trained on, or
    ``vqvae_checkpoint`` where given: (model, its checkpoint, its path, how to name it, whether it is
    the very file the prior was trained on, by sha256, and a sentence saying so when it is not)."""
    if vqvae_checkpoint:
        vq_path, vq_what = Path(vqvae_checkpoint), "--vqvae-checkpoint"
    elif ckpt.get("vqvae_path"):
        vq_path, vq_what = Path(ckpt["vqvae_path"]), f"the stage-1 checkpoint recorded in {path}"
    else:
        raise VqldmError(f"{path} records no stage-1 checkpoint (vqvae_path); pass one with --vqvae-checkpoint")
    vqvae, vq_ckpt = load_vqvae(vq_path, rt, what=vq_what)
    sha = file_sha256(vq_path)
    mismatch = None
    if sha != ckpt.get("vqvae_sha256"):
        mismatch = (f"{vq_path} is not the stage-1 checkpoint that {path} was trained on "
                    f"(sha256 {sha[:12]} vs {str(ckpt.get('vqvae_sha256'))[:12]})")
    return vqvae, vq_ckpt, vq_path, vq_what, sha, mismatch


def warn_config_differs(cfg: Config, net: dict, path) -> None:
    """The checkpoint wins over the config file's vqvae section, with a warning naming the keys."""
    mine = vqvae_net_config(cfg)
    diff = [k for k in mine if k in net and mine[k] != net[k] and k not in ("decay", "commitment_cost")]
    if diff:
        log.warning("the stage-1 checkpoint %s was trained with a different vqvae config (%s); using the "
                    "checkpoint's values", path, ", ".join(f"vqvae.{k}: config {mine[k]} vs checkpoint {net[k]}"
                                                         for k in diff))


@torch.no_grad()
def encode(vqvae: torch.nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    with rt.autocast():
        z = quantized_latent(vqvae, rt.to_device(x))
    return z.float()


@torch.no_grad()
def encode_indices(vqvae: torch.nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The code index of every latent voxel, (B, 1, x, y, z) int64: what a token prior learns."""
    with rt.autocast():
        z = vqvae.encode(rt.to_device(x))
    return nearest_codes(vqvae, z)[:, None].long()


def check_same_stage1(ckpt: dict, meta: dict, path, key: str, section: str) -> None:
    """A prior learns one stage-1 model's latents: refuse to continue one trained on another file."""
    theirs, mine = ckpt.get("vqvae_sha256"), meta.get("vqvae_sha256")
    if theirs and mine and theirs != mine:
        raise VqldmError(
            f"{key}: {path} was trained on the stage-1 checkpoint {ckpt.get('vqvae_path')} (sha256 {theirs[:12]}), "
            f"but {section}.checkpoints.vqvae_path is {meta.get('vqvae_path')} (sha256 {mine[:12]}); resume with "
            f"the same stage-1 checkpoint, or start afresh")


def _pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    pads = []
    for n in reversed(x.shape[2:]):
        pads += [0, (-n) % m]
    return torch.nn.functional.pad(x, pads) if any(pads) else x


@torch.no_grad()
def encode_volumes(vqvae, volumes, rt: Runtime, stride: int, progress: bool = False,
                   encoder=encode) -> list[torch.Tensor]:
    """Encode each whole (normalised, padded) volume once with ``encoder`` (:func:`encode` for
    embeddings, :func:`encode_indices` for code indices); results are kept on the CPU."""
    out = []
    it = range(len(volumes))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="encoding latents", unit="vol", leave=False)
    for i in it:
        x = torch.as_tensor(volumes[i]["image"]).as_subclass(torch.Tensor).float()[None]
        out.append(encoder(vqvae, _pad_to_multiple(x, stride), rt)[0].cpu())
    return out


def foreground_masks(volumes, latents: list[torch.Tensor], intensity_range, threshold: float,
                     stride: int) -> list[torch.Tensor]:
    """Per volume, the latent voxels whose image block holds foreground (image > threshold in [0,1])."""
    masks = []
    for i, z in enumerate(latents):
        x = torch.as_tensor(volumes[i]["image"]).as_subclass(torch.Tensor).float()[None]
        fg = (to_unit(_pad_to_multiple(x, stride), intensity_range) > threshold).float()
        m = torch.nn.functional.max_pool3d(fg, kernel_size=stride, stride=stride) if stride > 1 else fg
        if list(m.shape[2:]) != list(z.shape[1:]):  # unusual downsampling layouts: match the latent grid
            m = torch.nn.functional.interpolate(m, size=list(z.shape[1:]), mode="nearest")
        masks.append(m[0, 0] > 0)
    return masks


def block_means(image_unit: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 1, X, Y, Z) volumes in [0, 1] -> the mean of each latent voxel's image block, (B, 1, x, y, z):
    the coarse view (downsampled by the VQ-VAE's stride) that a coarse-to-fine prior is conditioned on."""
    return torch.nn.functional.avg_pool3d(_pad_to_multiple(image_unit.float(), stride), stride)


class LatentCropDataset(torch.utils.data.Dataset):
    """Random latent-space crops of cached whole-volume latents, ``times`` per volume and epoch.

    A crop of the latent at a latent-grid offset is the encoding of the matching image patch up
    to the encoder's receptive field at the border; where the volume equals the patch size it is
    exact. With ``fg_masks``, a share ``fg_ratio`` of the crops is centred on a foreground latent
    voxel, as stage 1's image crops are (``data.foreground_crop_ratio``).
    """

    def __init__(self, latents: list[torch.Tensor], latent_size: list[int], times: int,
                 fg_masks: list[torch.Tensor] | None = None, fg_ratio: float = 0.0, key: str = "latent",
                 extra: dict[str, list[torch.Tensor]] | None = None):
        self.latents, self.size, self.times, self.key = latents, list(latent_size), times, key
        self.extra = extra or {}  # more per-volume maps on the latent grid, cropped at the same offsets
        self.fg = [m.nonzero() for m in fg_masks] if fg_masks is not None else None
        self.fg_ratio = fg_ratio

    def __len__(self):
        return len(self.latents) * self.times

    def _fg_starts(self, k: int, z: torch.Tensor) -> list[int] | None:
        """Start of a crop centred on a random foreground voxel, or None (then a uniform crop)."""
        if self.fg is None or self.fg_ratio <= 0 or list(z.shape[1:]) == self.size:
            return None  # the latent is the crop: no extra random draw, so such runs stay as they were
        if float(torch.rand(())) >= self.fg_ratio or len(self.fg[k]) == 0:
            return None
        c = self.fg[k][int(torch.randint(0, len(self.fg[k]), ()))]
        return [min(max(int(ci) - s // 2, 0), n - s) for ci, n, s in zip(c, z.shape[1:], self.size)]

    def __getitem__(self, i):
        k = i % len(self.latents)
        z = self.latents[k]
        starts = self._fg_starts(k, z)
        if starts is None:
            starts = [int(torch.randint(0, n - s + 1, ()).item()) for n, s in zip(z.shape[1:], self.size)]
        sx, sy, sz = starts
        x, y, w = self.size
        out = {self.key: z[:, sx:sx + x, sy:sy + y, sz:sz + w].contiguous()}
        for name, maps in self.extra.items():
            out[name] = maps[k][:, sx:sx + x, sy:sy + y, sz:sz + w].contiguous()
        return out


class TensorDictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


@torch.no_grad()
def measure_scale_factor(batches, get_latent, n_batches: int) -> float:
    """1 / std of latents over ``n_batches`` batches, computed on rank 0 and broadcast.

    Only rank 0 iterates ``batches`` (give it a loader over the whole training set, not a shard);
    every rank must call this function.
    """
    if dist.is_main():
        s = torch.zeros((), dtype=torch.float64)
        s2 = torch.zeros((), dtype=torch.float64)
        n = 0
        for i, batch in enumerate(batches):
            if i >= n_batches:
                break
            z = get_latent(batch).double()
            s += z.sum().cpu()
            s2 += (z * z).sum().cpu()
            n += z.numel()
        if n == 0:
            value = 1.0
        else:
            var = float(s2 / n - (s / n) ** 2)
            value = 1.0 / max(var, 1e-12) ** 0.5
    else:
        value = 0.0
    # the other ranks wait here while rank 0 measures; all of them then hold rank 0's value, bit for bit
    t = torch.tensor([value], dtype=torch.float64)
    return float(dist.broadcast(t, src=0).item())


# ---------------------------------------------------------------------------- a prior's training data
def frozen_stage1(cfg: Config, section: str, rt: Runtime):
    """The frozen VQ-VAE of ``<section>.checkpoints.vqvae_path``, its checkpoint, and the latent grid
    (x, y, z) of ``data.patch_size``."""
    vq_path = getattr(cfg, section).checkpoints.vqvae_path
    if not vq_path:
        raise VqldmError(f"{section}.checkpoints.vqvae_path: no stage-1 checkpoint given")
    vqvae, ckpt = load_vqvae(vq_path, rt, what=f"{section}.checkpoints.vqvae_path")
    warn_config_differs(cfg, ckpt["network"], vq_path)
    return vqvae, ckpt, latent_spatial(vqvae_from_network(ckpt["network"]), cfg.data.patch_size)


def stage1_normalization(cfg: Config, vq_ckpt: dict) -> pipeline.Normalization:
    """The data normalisation the stage-1 checkpoint was trained with (it wins over the config's)."""
    rng = vq_ckpt["normalization"]["intensity_range"]
    if list(rng) != list(cfg.data.intensity_range):
        log.warning("data.intensity_range %s differs from the stage-1 checkpoint's %s; using the checkpoint's",
                    cfg.data.intensity_range, rng)
    return pipeline.normalization_of(cfg, vq_ckpt["normalization"])


def encoded_tiles(cfg: Config, section: str, files, norm, vqvae, rt: Runtime, encoder=encode):
    """The validation tiles (deterministic) and their encodings, (T, ...) on the CPU."""
    tiles = pipeline.val_dataset(cfg, files, norm)
    loader = pipeline.make_loader(tiles, cfg.batch_size(section), False, 0, rt.is_cuda)
    return torch.cat([encoder(vqvae, b["image"], rt).cpu() for b in loader]), tiles


def real_tiles(tiles, norm, n: int) -> torch.Tensor | None:
    """The first ``n`` validation tiles in [0, 1], for the real row of a prior's pictures."""
    if not n:
        return None
    return norm.to_unit(torch.stack([tiles[i]["image"] for i in range(min(n, len(tiles)))])).clamp(0, 1)


def train_items(cfg: Config, section: str, files, norm, vqvae, rt: Runtime, lat_spatial: list[int], stride: int,
                progress: bool, encoder=encode, key: str = "latent", latent_cache: bool = True,
                coarse: bool = False):
    """A prior's training items: cached whole-volume encodings (crops under ``key``; with ``coarse``, the
    matching :func:`block_means` under ``coarse``) where an item's encoding cannot change between epochs
    (``latent_cache`` on, augmentation off), else image patches encoded on the fly. Returns (dataset,
    whether it is the cache)."""
    use_cache = latent_cache and not cfg.data.augmentation
    if use_cache:
        vols = pipeline.val_dataset(cfg, files, norm).volumes  # deterministic load/normalise/pad
        if any(math.prod(vols[i]["image"].shape[1:]) > MAX_CACHE_VOXELS for i in range(len(vols))):
            use_cache = False
            log.info("latent cache: volumes above %d voxels; encoding on the fly instead", MAX_CACHE_VOXELS)
    if not use_cache:
        why = "data.augmentation is on" if cfg.data.augmentation else f"{section}.latent_cache is off"
        log.info("latents encoded on the fly each batch (%s)", why)
        return pipeline.train_dataset(cfg, files, norm=norm), False
    cached = encode_volumes(vqvae, vols, rt, stride, progress and dist.is_main(), encoder)
    masks = foreground_masks(vols, cached, norm.intensity_range, cfg.data.foreground_threshold, stride)
    log.info("latent cache: encoded %d training volumes once; training on cached latents", len(cached))
    extra = {"coarse": [block_means(_unit_volume(vols[i]["image"], norm), stride)[0] for i in range(len(vols))]
             } if coarse else None  # the same padding as the cached latents, so the grids coincide
    return LatentCropDataset(cached, lat_spatial, cfg.data.patches_per_volume, masks,
                             cfg.data.foreground_crop_ratio, key, extra), True


def _unit_volume(image, norm) -> torch.Tensor:
    """A normalised (1, X, Y, Z) volume as (1, 1, X, Y, Z) in [0, 1]."""
    return norm.to_unit(torch.as_tensor(image).as_subclass(torch.Tensor).float()[None]).clamp(0, 1)


class RecordedGrid:
    """A sampling pipeline's ``voxel_grid``, ``spacing`` and ``unit``: the training data's voxel grid as
    its checkpoints record it (the prior's ``data``, else stage 1's), written into every sample."""

    def data_records(self) -> tuple[dict, dict]:
        """The ``data`` entries of the prior's and the stage-1 checkpoint."""
        raise NotImplementedError

    @property
    def voxel_grid(self) -> VoxelGrid:
        return VoxelGrid.from_meta(*self.data_records())

    @property
    def spacing(self) -> list[float]:
        return list(self.voxel_grid.spacing)

    @property
    def unit(self) -> str:
        return self.voxel_grid.unit


def stage1_meta(cfg: Config, section: str, vq_ckpt: dict, grid: VoxelGrid, lat_shape: list[int], cached: bool) -> dict:
    """What a prior's checkpoints record of the stage 1 they learned (its hash is rank 0's, broadcast)
    and of its training data's voxel grid (spacing after ``data.voxel_resize``, unit, affine)."""
    vq_path = getattr(cfg, section).checkpoints.vqvae_path
    sha = file_sha256(vq_path) if dist.is_main() else ""
    return {
        "latent_shape": lat_shape,
        "vqvae_sha256": dist.broadcast_object(sha),
        "vqvae_path": str(vq_path),
        "vqvae_network": vq_ckpt["network"],
        "normalization": vq_ckpt["normalization"],
        "intensity_calibration": vq_ckpt.get("intensity_calibration"),
        "data": {"patch_size": list(cfg.data.patch_size), **grid.to_meta()},
        "latent_source": "cache" if cached else "on_the_fly",
    }


# ---------------------------------------------------------------------------- latent normalisation
@dataclass(frozen=True)
class LatentNorm:
    """How a diffusion prior sees the latent: ``(z - shift) * scale``, per channel (lists) or with one
    global ``scale`` (a float, no shift: the original README's scale factor)."""

    scale: float | list[float]
    shift: list[float] | None = None

    def _per_channel(self, v, like: torch.Tensor):
        if isinstance(v, list):
            return torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.ndim - 2)))
        return v

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return z * self.scale
        return (z - self._per_channel(self.shift, z)) * self._per_channel(self.scale, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return z / self.scale
        return z / self._per_channel(self.scale, z) + self._per_channel(self.shift, z)

    def codebook_range(self, vqvae: torch.nn.Module) -> tuple[float, float]:
        """(min, max) over every normalised codebook vector: every normalised latent lies within."""
        if self.shift is None:
            return codebook_range(vqvae, self.scale)
        w = vqvae.quantizer.quantizer.embedding.weight.detach().float().cpu()  # (K, C)
        w = (w - torch.tensor(self.shift)) * torch.tensor(self.scale)
        return float(w.min()), float(w.max())

    def to_meta(self) -> dict:
        """The checkpoint fields: ``scale_factor`` always (the global one, or the mean per-channel one
        for readers that know only it), ``latent_shift`` / ``latent_scale`` when per channel."""
        if self.shift is None:
            return {"scale_factor": float(self.scale)}
        return {"scale_factor": float(sum(self.scale) / len(self.scale)), "latent_shift": list(self.shift),
                "latent_scale": list(self.scale)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "LatentNorm":
        if ckpt.get("latent_scale") is not None:
            return cls([float(v) for v in ckpt["latent_scale"]], [float(v) for v in ckpt["latent_shift"]])
        return cls(float(ckpt["scale_factor"]))


@torch.no_grad()
def measure_channel_norm(batches, get_latent, n_batches: int) -> LatentNorm:
    """Per-channel mean and 1/std over ``n_batches`` batches, on rank 0 and broadcast (every rank
    must call it; only rank 0 iterates ``batches``)."""
    if dist.is_main():
        s = s2 = None
        n = 0
        for i, batch in enumerate(batches):
            if i >= n_batches:
                break
            z = get_latent(batch).double().transpose(0, 1).flatten(1).cpu()  # (C, B*x*y*z)
            s = z.sum(1) if s is None else s + z.sum(1)
            s2 = (z * z).sum(1) if s2 is None else s2 + (z * z).sum(1)
            n += z.shape[1]
        mean = s / max(n, 1)
        std = (s2 / max(n, 1) - mean**2).clamp_min(1e-24).sqrt()
        packed = torch.stack([mean, 1.0 / std])
    else:
        packed = None
    packed = dist.broadcast_object(packed)
    return LatentNorm([float(v) for v in packed[1]], [float(v) for v in packed[0]])
