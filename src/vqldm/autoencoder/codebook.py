"""Codebook health: usage over an epoch, perplexity, data initialisation and dead-code restart.

MONAI's EMA quantiser has no remedy for codebook collapse: a code that no encoder output is
nearest to never moves again. Following Dhariwal et al. (Jukebox, 2020) and Zeghidour et al.
(SoundStream, 2021), codes unused over a window of steps are re-seeded from current encoder
outputs. Counts are summed over ranks and new vectors are broadcast from rank 0, so every rank
keeps the same codebook.
"""

from __future__ import annotations

import math

import torch

from vqldm import distributed as dist


def flat_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, x, y, z) -> (B*x*y*z, C) float32."""
    return z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])


@torch.no_grad()
def _sample_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``flat`` drawn on rank 0 (with replacement if needed) and broadcast."""
    idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
    rows = flat[idx].clone()
    # a little noise so that restarted codes seeded from one vector do not stay identical
    rows += 1e-3 * rows.std().clamp_min(1e-6) * torch.randn_like(rows)
    return dist.broadcast(rows.contiguous(), src=0)


@torch.no_grad()
def init_from_data(quantizer, z: torch.Tensor) -> None:
    """Seed every code from encoder outputs of a real batch (instead of N(0,1) noise)."""
    flat = flat_latents(z)
    rows = _sample_rows(flat, quantizer.num_embeddings)
    quantizer.embedding.weight.data.copy_(rows)
    quantizer.ema_w.data.copy_(rows)
    quantizer.ema_cluster_size.data.fill_(1.0)


@torch.no_grad()
def restart_codes(quantizer, dead: torch.Tensor, z: torch.Tensor) -> int:
    """Re-seed the codes where ``dead`` is true from encoder outputs ``z``; returns the count."""
    n = int(dead.sum())
    if n == 0:
        return 0
    rows = _sample_rows(flat_latents(z), n)
    quantizer.embedding.weight.data[dead] = rows
    # EMA statistics consistent with a code that was just used once: embedding = ema_w / size
    quantizer.ema_w.data[dead] = rows
    quantizer.ema_cluster_size.data[dead] = 1.0
    return n


def code_counts(indices: torch.Tensor, k: int, device=None) -> torch.Tensor:
    """How often each of ``k`` codes occurs in ``indices`` (float64, on ``device``).

    ``index_add_`` rather than ``bincount``: CUDA bincount reads max() on the host, a sync per step.
    """
    idx = indices.reshape(-1).to(device or indices.device)
    counts = torch.zeros(k, dtype=torch.float64, device=idx.device)
    return counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """Fraction of codes used at least once, and exp(entropy) of the code distribution (0 if none)."""
    counts = counts.detach().double().cpu()
    total = float(counts.sum())
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).sum()) / counts.numel(), float(math.exp(-(p * p.log()).sum()))


class CodebookTracker:
    """Counts code use per epoch (usage, perplexity) and per restart window (dead codes)."""

    def __init__(self, num_embeddings: int, window_steps: int, threshold: float, device="cpu"):
        self.k = num_embeddings
        self.window_steps, self.threshold = window_steps, threshold
        # counts live on the training device: no host sync per step
        self.epoch_counts = torch.zeros(num_embeddings, dtype=torch.float64, device=device)
        self.window_counts = torch.zeros(num_embeddings, dtype=torch.float64, device=device)
        self.window_fill = 0

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        c = code_counts(indices, self.k, self.epoch_counts.device)
        c = dist.all_reduce_sum(c)
        self.epoch_counts += c
        self.window_counts += c
        self.window_fill += 1

    def window_full(self) -> bool:
        return self.window_fill >= self.window_steps

    def dead_codes(self) -> torch.Tensor:
        """Mask of codes used fewer than ``threshold`` times in the window; resets the window."""
        dead = self.window_counts < self.threshold
        self.window_counts.zero_()
        self.window_fill = 0
        return dead

    def epoch_stats(self, reset: bool = True) -> dict[str, float]:
        counts = self.epoch_counts.detach().cpu().clone()
        if reset:
            self.epoch_counts.zero_()
        usage, perplexity = usage_and_perplexity(counts)
        return {"usage": usage, "perplexity": perplexity, "used_codes": int((counts > 0).sum())}

    def state_dict(self) -> dict:
        return {"epoch_counts": self.epoch_counts.cpu().clone(), "window_counts": self.window_counts.cpu().clone(),
                "window_fill": self.window_fill}

    def load_state_dict(self, s: dict) -> None:
        self.epoch_counts.copy_(s["epoch_counts"])
        self.window_counts.copy_(s["window_counts"])
        self.window_fill = int(s["window_fill"])
