"""The latent every prior learns: a frozen stage-1 checkpoint, its encodings, the latent cache and
the scale factor.

Latents are the quantised embeddings (B, embedding_dim, x, y, z). A diffusion prior sees them
multiplied by ``scale_factor`` = 1 / std, measured over many training batches (Rombach et al.,
2022, sec. 4.3 and appendix G), so that its N(0, I) prior matches their scale.
"""

from __future__ import annotations

import logging
import math

import torch

from vqldm import distributed as dist
from vqldm.autoencoder.model import build_vqvae, quantized_latent, vqvae_net_config
from vqldm.checkpoint import load_checkpoint
from vqldm.config import Config
from vqldm.data.pipeline import to_unit
from vqldm.errors import VqldmError
from vqldm.runtime import Runtime

log = logging.getLogger("vqldm")

# whole-volume encoding for the cache is skipped above this many voxels per volume
MAX_CACHE_VOXELS = 256**3


def load_vqvae(path, rt: Runtime, what: str = "stage-1 checkpoint"):
    """Rebuild a frozen VQ-VAE from a stage-1 checkpoint alone; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path, kind="vqvae", what=what)
    try:
        model = build_vqvae(ckpt["network"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise VqldmError(f"{what}: {path} does not hold a loadable VQ-VAE ({str(e).splitlines()[0][:200]})") from None
    model = rt.prepare_module(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ckpt


def warn_config_differs(cfg: Config, net: dict, path) -> None:
    """The checkpoint wins over the config file's vqvae section, with a warning naming the keys."""
    mine = vqvae_net_config(cfg)
    diff = [k for k in mine if k in net and mine[k] != net[k] and k not in ("decay", "commitment_cost")]
    if diff:
        log.warning("the stage-1 checkpoint %s was trained with a different vqvae config (%s); using the "
                    "checkpoint's values", path, ", ".join(f"vqvae.{k}: config {mine[k]} vs checkpoint {net[k]}"
                                                         for k in diff))


def total_stride(net: dict) -> int:
    """Image voxels per latent voxel along each axis, from a checkpoint's network."""
    return math.prod(p[0] for p in net["downsample_parameters"])


@torch.no_grad()
def encode(vqvae: torch.nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    with rt.autocast():
        z = quantized_latent(vqvae, rt.to_device(x))
    return z.float()


def _pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    pads = []
    for n in reversed(x.shape[2:]):
        pads += [0, (-n) % m]
    return torch.nn.functional.pad(x, pads) if any(pads) else x


@torch.no_grad()
def encode_volumes(vqvae, volumes, rt: Runtime, stride: int, progress: bool = False) -> list[torch.Tensor]:
    """Encode each whole (normalised, padded) volume once; latents are kept on the CPU."""
    out = []
    it = range(len(volumes))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="encoding latents", unit="vol", leave=False)
    for i in it:
        x = torch.as_tensor(volumes[i]["image"]).as_subclass(torch.Tensor).float()[None]
        out.append(encode(vqvae, _pad_to_multiple(x, stride), rt)[0].cpu())
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


class LatentCropDataset(torch.utils.data.Dataset):
    """Random latent-space crops of cached whole-volume latents, ``times`` per volume and epoch.

    A crop of the latent at a latent-grid offset is the encoding of the matching image patch up
    to the encoder's receptive field at the border; where the volume equals the patch size it is
    exact. With ``fg_masks``, a share ``fg_ratio`` of the crops is centred on a foreground latent
    voxel, as stage 1's image crops are (``data.foreground_crop_ratio``).
    """

    def __init__(self, latents: list[torch.Tensor], latent_size: list[int], times: int,
                 fg_masks: list[torch.Tensor] | None = None, fg_ratio: float = 0.0):
        self.latents, self.size, self.times = latents, list(latent_size), times
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
        return {"latent": z[:, sx:sx + x, sy:sy + y, sz:sz + w].contiguous()}


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
