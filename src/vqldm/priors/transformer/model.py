"""The token prior's network: MONAI's ``DecoderOnlyTransformer`` over a code grid read in a fixed order.

A volume's latent is a grid of code indices (x, y, z). The prior reads it as a sequence in the order
of MONAI's ``Ordering`` (raster scan, s-curve or random), after a begin-of-sequence token that is
one past the codebook (index ``num_embeddings``), and predicts each code from the ones before it
(Esser et al., 2021; Pinaya et al., 2022 for 3D medical volumes).

A class-conditional prior (``data.labels_file``) reads the class as that first token: the
begin-of-sequence token is the null class, and class ``k`` has a start token of its own,
``num_embeddings + 1 + k`` (:func:`start_tokens`).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import DecoderOnlyTransformer
from monai.utils.ordering import Ordering

from vqldm.config import Config


def transformer_net_config(cfg: Config, num_embeddings: int, seq_len: int, num_classes: int = 0) -> dict:
    """Plain-value constructor arguments of the transformer; saved in every prior checkpoint. With
    ``num_classes`` the vocabulary also holds one start token per class (after the null's)."""
    p = cfg.prior
    return {
        # the codes, the begin-of-sequence token (a conditional model's null class) and the classes' start tokens
        "num_tokens": num_embeddings + 1 + num_classes,
        "max_seq_len": seq_len,
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


def with_bos(seq: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """The model's input: the start token (the begin-of-sequence token, or one per row (B,): a class's),
    then all but the last code."""
    first = torch.as_tensor(start, dtype=seq.dtype, device=seq.device).expand(seq.shape[0])[:, None]
    return torch.cat([first, seq[:, :-1]], dim=1)
