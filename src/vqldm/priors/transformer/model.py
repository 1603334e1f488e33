"""The token prior's network: MONAI's ``DecoderOnlyTransformer`` over a code grid read in a fixed order.

A volume's latent is a grid of code indices (x, y, z). The prior reads it as a sequence in the order
of MONAI's ``Ordering`` (raster scan, s-curve or random), after a begin-of-sequence token that is
one past the codebook (index ``num_embeddings``), and predicts each code from the ones before it
(Esser et al., 2021; Pinaya et al., 2022 for 3D medical volumes).

A class-conditional prior (``data.labels_file``) reads the class as that first token: the
begin-of-sequence token is the null class, and class ``k`` has a start token of its own,
``num_embeddings + 1 + k`` (:func:`start_tokens`).

A prior with covariates (``prior.covariates``: numeric columns of the labels file) reads them as tokens
after the start token: each value, normalised to [0, 1] by its training range, is quantised to one of
``prior.covariate_bins`` bins, and covariate ``j`` has ``bins + 1`` tokens of its own after the class start
tokens (the last one its null). The sequence is ``[start, cov_1, ..., cov_K, code_1, ..., code_N-1]`` and
predicts ``code_1 ... code_N`` (:class:`Vocabulary`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import DecoderOnlyTransformer
from monai.utils.ordering import Ordering

from vqldm.config import Config


def transformer_net_config(cfg: Config, num_embeddings: int, seq_len: int, num_classes: int = 0,
                           num_covariates: int = 0) -> dict:
    """Plain-value constructor arguments of the transformer; saved in every prior checkpoint. With
    ``num_classes`` the vocabulary also holds one start token per class (after the null's), with
    ``num_covariates`` each covariate's ``prior.covariate_bins + 1`` tokens, and the sequence grows by one
    token per covariate."""
    p = cfg.prior
    vocab = Vocabulary(num_embeddings, num_classes, num_covariates, p.covariate_bins if num_covariates else 0)
    return {
        # the codes, the begin-of-sequence token (a conditional model's null class), the classes' start tokens
        # and the covariates' tokens
        "num_tokens": vocab.size,
        "max_seq_len": seq_len + num_covariates,
        "attn_layers_dim": p.attn_layers_dim,
        "attn_layers_depth": p.attn_layers_depth,
        "attn_layers_heads": p.attn_layers_heads,
        "embedding_dropout_rate": p.embedding_dropout_rate,
    }


def build_transformer(net: dict) -> DecoderOnlyTransformer:
    """The network of ``net`` (constructor arguments), with PyTorch's fused scaled-dot-product
    attention, which never holds the N x N attention matrix (about 4x faster on a CPU at 864 tokens,
    and what lets long token grids fit); it changes the kernel, not the weights.

    MONAI also keeps an N x N float causal mask per block as a saved buffer (1.5 GB for 8 blocks at
    the microtubule config's 6912 tokens). Fused attention and the cached sampler never read it, so
    it is dropped and not saved: load a vqldm state dict into a plain MONAI network with
    ``strict=False`` (the masks are the only missing keys).
    """
    model = DecoderOnlyTransformer(**net, use_flash_attention=True)
    for block in model.blocks:
        del block.attn.causal_mask
        block.attn.register_buffer("causal_mask", torch.empty(0), persistent=False)
    return model


def without_masks(state: dict) -> dict:
    """A state dict without MONAI's causal-mask buffers (see :func:`build_transformer`)."""
    return {k: v for k, v in state.items() if not k.endswith("attn.causal_mask")}


def token_order(ordering: str, grid: list[int], seed: int) -> list[int]:
    """The sequence order of a code grid's flattened (C-order) positions; a random ordering is drawn
    from ``seed`` (MONAI draws it from numpy's global RNG, which is left as it was)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        order = Ordering(ordering_type=ordering, spatial_dims=3, dimensions=(1, *grid)).get_sequence_ordering()
    finally:
        np.random.set_state(state)
    return [int(i) for i in order]


def to_sequence(grid: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, 1, x, y, z) or (B, x, y, z) code grid -> (B, N) sequence in prior order."""
    return grid.reshape(grid.shape[0], -1)[:, order]


def to_grid(seq: torch.Tensor, order: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """(B, N) sequence in prior order -> (B, x, y, z) code grid."""
    flat = torch.empty_like(seq)
    flat[:, order] = seq
    return flat.reshape(seq.shape[0], *grid)


def start_tokens(labels: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The start token of each class index in ``labels`` (B,): class ``k`` is ``num_codes + 1 + k``. The
    null class is the begin-of-sequence token, ``num_codes``."""
    return labels.long() + (num_codes + 1)


def as_prefix(start: int | torch.Tensor, batch: int, device) -> torch.Tensor:
    """(batch, P) the tokens before the codes: a start token (an int or one per row (B,)) or whole prefixes
    ((B, P) or (1, P): the start token, then the covariate tokens)."""
    first = torch.as_tensor(start, dtype=torch.long, device=device)
    return (first.reshape(-1, 1) if first.ndim < 2 else first).expand(batch, -1)


def with_bos(seq: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """The model's input: the start token (the begin-of-sequence token, or one per row (B,): a class's) or
    the prefix (B, P) of a prior with covariates (:func:`as_prefix`), then all but the last code."""
    return torch.cat([as_prefix(start, seq.shape[0], seq.device).to(seq.dtype), seq[:, :-1]], dim=1)


@dataclass(frozen=True)
class Vocabulary:
    """The token prior's vocabulary: ``codes`` code indices, the begin-of-sequence token (= ``codes``, the
    null class), ``classes`` class start tokens, and ``bins + 1`` tokens for each of ``covariates``
    covariates (bin ``b`` of covariate ``j``: ``first_covariate + j (bins + 1) + b``; ``b = bins``: its null)."""

    codes: int
    classes: int = 0
    covariates: int = 0
    bins: int = 0

    @classmethod
    def of(cls, ckpt: dict) -> "Vocabulary":
        """The vocabulary of a checkpoint (or task meta with its ``network``): its classes and covariates."""
        c, k = len(ckpt.get("classes") or []), len(ckpt.get("covariates") or {})
        bins = int(ckpt.get("covariate_bins") or 0)
        return cls(int(ckpt["network"]["num_tokens"]) - 1 - c - k * (bins + 1), c, k, bins)

    @property
    def bos(self) -> int:
        return self.codes

    @property
    def size(self) -> int:
        return self.codes + 1 + self.classes + self.covariates * (self.bins + 1)

    def covariate_tokens(self, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, K) tokens of normalised covariate ``values`` (B, K) in [0, 1] (clamped) where ``keep`` (B, K),
        else each covariate's null token."""
        first = self.codes + 1 + self.classes + (self.bins + 1) * torch.arange(self.covariates, device=values.device)
        bins = (values.float() * self.bins).floor().clamp(0, self.bins - 1).long()
        return first + torch.where(keep.bool(), bins, torch.full_like(bins, self.bins))

    def prefix(self, start: int | torch.Tensor, values: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> int | torch.Tensor:
        """What precedes the codes: ``start`` (an int or (B,)) alone without covariates, else (B, 1 + K) (or
        (1, 1 + K)): the start token, then the covariate tokens of ``values`` / ``keep`` ((B, K) or (K,); None:
        every covariate's null)."""
        if not self.covariates:
            return start
        device = values.device if values is not None else torch.as_tensor(start).device
        if values is None:
            values = keep = torch.zeros(self.covariates, device=device)
        tokens = self.covariate_tokens(values.reshape(-1, self.covariates), keep.reshape(-1, self.covariates))
        first = torch.as_tensor(start, dtype=torch.long, device=device).reshape(-1, 1)
        return torch.cat([as_prefix(first, max(len(first), len(tokens)), device),
                          tokens.expand(max(len(first), len(tokens)), -1)], dim=1)
