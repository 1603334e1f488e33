"""What a diffusion UNet is conditioned on, and classifier-free guidance over all of it at once.

A UNet takes up to three kinds of condition, each with a learned or zero null: a class (the class
embedding, ``data.labels_file`` or ``data.class_folders``), a coarse view (two more input channels,
``diffusion.coarse_condition``) and covariates (cross-attention context tokens, ``diffusion.covariates``).
In training each one is dropped to its null with probability ``diffusion.condition_drop_prob``; a UNet
with more than one also drops all of them together with that probability, so it learns every subset and
the fully unconditional prediction. Sampling asks for any subset; ``guided`` mixes the prediction under
what was asked with the fully null one (Ho & Salimans, 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqldm.priors.diffusion.coarse import coarse_concat
from vqldm.priors.diffusion.covariates import count_of, covariate_context
from vqldm.priors.diffusion.unet import guidance_mix, self_condition_channels
from vqldm.sampling.self_condition import carried


@dataclass(frozen=True)
class Slots:
    """The conditions a UNet takes, read from its constructor arguments."""

    null_class: int | None  # the learned null's class index; None: no class embedding
    extra_channels: int  # coarse-to-fine: the view and its presence flag (2), else 0
    covariates: int  # covariate tokens (0: no cross-attention context)

    @classmethod
    def of(cls, net: dict) -> "Slots":
        classes = net.get("num_class_embeds")
        extra = net["in_channels"] - net["out_channels"] - self_condition_channels(net)
        return cls(None if not classes else int(classes) - 1, extra, count_of(net))

    @property
    def count(self) -> int:
        return (self.null_class is not None) + (self.extra_channels > 0) + self.covariates


@dataclass(frozen=True)
class Asked:
    """What one sampling run asks for: a class index, a coarse view (1, 1, x, y, z), covariate values (K,)
    normalised with their presence (K,); None (or presence 0): that condition's null."""

    label: int | None = None
    coarse: torch.Tensor | None = None
    values: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def given(self) -> bool:
        return self.label is not None or self.coarse is not None or bool(self.keep is not None and self.keep.any())


def unet_args(slots: Slots, x: torch.Tensor, asked: Asked | None) -> dict:
    """The UNet's conditioning arguments for a batch like ``x``: what ``asked`` gives (None: all nulls)."""
    b, dev, out = x.shape[0], x.device, {}
    a = asked or Asked()
    if slots.null_class is not None:
        k = slots.null_class if a.label is None else a.label
        out["class_labels"] = torch.full((b,), int(k), dtype=torch.long, device=dev)
    if slots.extra_channels:
        present = a.coarse is not None
        view = a.coarse.to(dev).expand(b, *a.coarse.shape[1:]) if present else x.new_zeros((b, 1, *x.shape[2:]))
        out["concat"] = coarse_concat(view, torch.full((b,), float(present), device=dev))
    if slots.covariates:
        n = slots.covariates
        values = torch.zeros(n) if a.values is None else a.values
        keep = torch.zeros(n) if a.keep is None else a.keep
        out["context"] = covariate_context(values.to(dev).expand(b, n), keep.to(dev).expand(b, n))
    return out


def guided(denoiser, slots: Slots, asked: Asked | None, w: float = 1.0):
    """The samplers' call under ``asked`` with guidance ``w``: ``null + w (cond - null)``, exactly the null
    prediction at 0 and exactly the conditional one at 1 (then the only UNet call)."""
    def call(x, t, condition=None):
        own = carried(condition)  # a self-conditioned UNet's estimate rides along unchanged, to both calls
        cond = denoiser(x, t, {**unet_args(slots, x, asked), **own})
        if w == 1.0 or asked is None or not asked.given:
            return cond
        return guidance_mix(denoiser(x, t, {**unet_args(slots, x, None), **own}), cond, w)
    return call


def condition_keeps(shapes: list[tuple], p: float, device) -> list[torch.Tensor]:
    """Presence draws, one tensor of each shape ((B,) per class or coarse view, (B, K) for K covariates):
    each condition dropped with probability ``p``, and where there is more than one, all of them together
    with ``p`` too. ``p`` 0 draws nothing."""
    if p <= 0:
        return [torch.ones(s, dtype=torch.bool, device=device) for s in shapes]
    keeps = [torch.rand(s, device=device) >= p for s in shapes]
    if sum(s[1] if len(s) > 1 else 1 for s in shapes) > 1:
        joint = torch.rand(shapes[0][0], device=device) >= p
        keeps = [kp & (joint if kp.ndim == 1 else joint[:, None]) for kp in keeps]
    return keeps


def training_args(slots: Slots, labels: torch.Tensor | None, coarse: torch.Tensor | None,
                  values: torch.Tensor | None, p: float) -> dict:
    """A training batch's conditioning arguments (class indices (B,), coarse views (B, 1, x, y, z), covariate
    values (B, K); None where the UNet takes none), dropped as the module says. Draws on the device:
    graph-safe, resumed exactly."""
    given = {"class_labels": labels, "concat": coarse, "context": values}
    given = {k: v for k, v in given.items() if v is not None}
    shapes = [tuple(v.shape[:2]) if k == "context" else (v.shape[0],) for k, v in given.items()]
    out = {}
    for (k, v), keep in zip(given.items(), condition_keeps(shapes, p, next(iter(given.values())).device)):
        if k == "class_labels":
            out[k] = torch.where(keep, v, torch.full_like(v, slots.null_class))
        elif k == "concat":
            out[k] = coarse_concat(v, keep.float())
        else:
            out[k] = covariate_context(v, keep.float())
    return out
