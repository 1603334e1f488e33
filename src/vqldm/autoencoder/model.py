"""The stage-1 network: MONAI's ``VQVAE``, built exactly as the config says, and its codebook operations."""

from __future__ import annotations

import math

import torch
from monai.networks.nets import VQVAE

from vqldm.config import Config, downsample_parameters, upsample_parameters


def vqvae_net_config(cfg: Config) -> dict:
    """The plain-value constructor arguments of the VQ-VAE; saved in every checkpoint."""
    v = cfg.vqvae
    res = v.num_res_channels
    return {
        "spatial_dims": v.spatial_dims,
        "in_channels": v.in_channels,
        "out_channels": v.out_channels,
        "channels": list(v.num_channels),
        "num_res_channels": list(res) if isinstance(res, list) else int(res),
        "num_res_layers": v.num_res_layers,
        "downsample_parameters": [list(p) for p in downsample_parameters(v)],
        "upsample_parameters": [list(p) for p in upsample_parameters(v)],
        "num_embeddings": v.num_embeddings,
        "embedding_dim": v.embedding_dim,
        "commitment_cost": v.codebook.commitment_cost,
        "decay": v.codebook.decay,
        "dropout": v.dropout,
        "act": v.act,
        "output_act": v.output_act,
    }


def build_vqvae(net: dict) -> VQVAE:
    kw = dict(net)
    kw["downsample_parameters"] = tuple(tuple(p) for p in kw["downsample_parameters"])
    kw["upsample_parameters"] = tuple(tuple(p) for p in kw["upsample_parameters"])
    kw["channels"] = tuple(kw["channels"])
    if isinstance(kw["num_res_channels"], list):
        kw["num_res_channels"] = tuple(kw["num_res_channels"])
    return VQVAE(**kw)


def total_stride(net: dict) -> int:
    """Image voxels per latent voxel along each axis, from a checkpoint's network."""
    return math.prod(p[0] for p in net["downsample_parameters"])


def reconstruct(model: VQVAE, x: torch.Tensor):
    """encode -> quantise -> decode: (reconstruction, commitment loss, code indices (B,x,y,z), encoding).

    Calls MONAI's EMA quantiser directly because ``VQVAE.forward`` drops the indices that codebook
    statistics need. In train mode this updates the codebook (EMA).
    """
    z = model.encode(x)
    quantized, q_loss, indices = quantize(model, z)
    return model.decode(quantized), q_loss, indices, z


def _fp32(z: torch.Tensor):
    """Autocast off on ``z``'s device: MONAI's quantiser turns off CUDA autocast only, and under CPU bf16
    autocast its distances and EMA sums would run in bf16 and pick or average codes wrongly."""
    return torch.autocast(z.device.type, enabled=False)


def quantize(model: VQVAE, z: torch.Tensor):
    """MONAI's EMA quantiser on ``z`` in fp32: (quantised, commitment loss, indices (B, x, y, z))."""
    with _fp32(z):
        return model.quantizer.quantizer(z.float())


CODE_CHUNK = 1 << 12  # latent voxels quantised at once: MONAI holds their distances and int64 one-hot codes, 16 bytes x codes each


def nearest_codes(model: VQVAE, z: torch.Tensor) -> torch.Tensor:
    """The index of the nearest codebook vector of every latent voxel, (B, x, y, z), in fp32. MONAI's
    ``quantize`` on slabs of about ``CODE_CHUNK`` voxels along x: whole, its distance matrix and int64
    one-hot codes dwarf the latent (about 450 MiB for a 96 x 96 x 12 latent over 256 codes)."""
    q = model.quantizer.quantizer
    per_x = z.shape[0] * math.prod(z.shape[3:])
    step = max(1, CODE_CHUNK // max(per_x, 1))
    with _fp32(z):
        return torch.cat([q.quantize(z[:, :, i:i + step].float())[2] for i in range(0, z.shape[2], step)], dim=1)


def quantized_latent(model: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """The stage-2 latent: quantised embeddings (B, embedding_dim, x, y, z). Model must be in eval mode."""
    if model.training:
        raise RuntimeError("quantized_latent needs the VQ-VAE in eval mode (train mode updates the codebook)")
    return quantize(model, model.encode(x))[0]


def codebook_range(model: VQVAE, scale: float = 1.0) -> tuple[float, float]:
    """(min, max) over all codebook entries times ``scale``: every quantised latent lies within."""
    w = model.quantizer.quantizer.embedding.weight.detach().float() * scale
    return float(w.min()), float(w.max())


def snap_to_codebook(model: VQVAE, z: torch.Tensor) -> torch.Tensor:
    """Nearest codebook vectors of a continuous latent (the quantised decode of VQ-LDM)."""
    return model.quantizer.quantizer.embed(nearest_codes(model, z)).to(z.dtype)
