"""Continuous covariates (filament density, localisation precision, z-thickness, ...) as the UNet's
cross-attention context.

Each covariate is a numeric column of the labels file (``diffusion.covariates``), normalised to [0, 1]
by its range over the training files; the range is recorded in the checkpoint (``covariates``), so
sampling normalises ``--cond KEY=VALUE`` the same way and warns outside it. Covariate ``k`` becomes one
context token: Fourier features of its value, a presence flag and a one-hot of ``k``. MONAI's
``DiffusionModelUNet`` (``with_conditioning``) attends to the tokens and learns their projections. A
dropped covariate (presence and features 0, the one-hot kept) is its null, so one network learns every
subset of covariates and classifier-free guidance has an unconditional prediction to mix with.
"""

from __future__ import annotations

import logging
import math

import torch

from vqldm.errors import VqldmError

log = logging.getLogger("vqldm")

FREQUENCIES = 3  # sin and cos of pi * 2^j * value, j < FREQUENCIES
_FIXED = 2 + 2 * FREQUENCIES  # the value, its Fourier features and the presence flag


def token_dim(n: int) -> int:
    """The context tokens' width (the UNet's ``cross_attention_dim``) for ``n`` covariates."""
    return _FIXED + n


def count_of(net: dict) -> int:
    """How many covariates a UNet's constructor arguments take (0: no cross-attention context)."""
    return int(net["cross_attention_dim"]) - _FIXED if net.get("with_conditioning") else 0


def covariate_context(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Context tokens (B, K, token_dim(K)) of normalised ``values`` (B, K), each present where ``keep``
    (B, K) is 1 and the null where it is 0."""
    b, k = values.shape
    v = values.float().unsqueeze(-1)
    f = torch.pi * (2.0 ** torch.arange(FREQUENCIES, device=v.device, dtype=v.dtype)) * v
    present = keep.to(v.dtype).unsqueeze(-1)
    feats = torch.cat([v, torch.sin(f), torch.cos(f)], dim=-1) * present
    which = torch.eye(k, device=v.device, dtype=v.dtype).expand(b, k, k)
    return torch.cat([feats, present, which], dim=-1)


def asked_values(asked: dict[str, float], ranges: dict[str, list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``--cond KEY=VALUE`` pairs as normalised values (K,) and presence (K,) over the model's covariates
    (``ranges``: name -> [min, max] in training, in order); a covariate not asked for is its null. An
    unknown name is one line; a value outside the training range is a warning (the model extrapolates)."""
    names = list(ranges)
    unknown = sorted(set(asked) - set(names))
    if unknown:
        raise VqldmError(f"--cond {unknown[0]}: unknown covariate; this model knows "
                         f"{', '.join(names) if names else 'none (trained without diffusion.covariates)'}")
    values, keep = torch.zeros(len(names)), torch.zeros(len(names))
    for k, name in enumerate(names):
        if name not in asked:
            continue
        v, (lo, hi) = float(asked[name]), ranges[name]
        if not math.isfinite(v):
            raise VqldmError(f"--cond {name}={asked[name]}: not a finite number")
        if not lo <= v <= hi:
            log.warning("--cond %s=%g lies outside the training range [%g, %g]: the model extrapolates", name, v,
                        lo, hi)
        values[k], keep[k] = (v - lo) / (hi - lo), 1.0
    return values, keep


def parse_cond(pairs: list[str] | None) -> dict[str, float]:
    """``KEY=VALUE`` options as ``{key: value}``; one line naming a malformed pair."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = None
        if not sep or not key.strip() or value is None:
            raise VqldmError(f"--cond {pair}: expected KEY=VALUE with a number, e.g. --cond n_filaments=12")
        if key.strip() in out:
            raise VqldmError(f"--cond {key.strip()}: given twice")
        out[key.strip()] = value
    return out
