"""The stage-2 latent: frozen VQ-VAE encodings, their scale factor, and the latent cache.

Latents are the quantised embeddings (B, embedding_dim, x, y, z). The UNet sees them multiplied
by ``scale_factor`` = 1 / std, measured over many training batches (Rombach et al., 2022, sec. 4.3
and appendix G), so the diffusion prior N(0, I) matches their scale.
"""

from __future__ import annotations

import logging

import torch

from vqldm import distributed as dist
from vqldm.runtime import Runtime
from vqldm.stage1.model import quantized_latent

log = logging.getLogger("vqldm")

# whole-volume encoding for the cache is skipped above this many voxels per volume
MAX_CACHE_VOXELS = 256**3


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


class LatentCropDataset(torch.utils.data.Dataset):
    """Random latent-space crops of cached whole-volume latents, ``times`` per volume and epoch.

    A crop of the latent at a latent-grid offset is the encoding of the matching image patch up
    to the encoder's receptive field at the border; where the volume equals the patch size it is
    exact.
    """

    def __init__(self, latents: list[torch.Tensor], latent_size: list[int], times: int):
        self.latents, self.size, self.times = latents, list(latent_size), times

    def __len__(self):
        return len(self.latents) * self.times

    def __getitem__(self, i):
        z = self.latents[i % len(self.latents)]
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
