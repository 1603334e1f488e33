"""Exponential moving average of a network's weights (Polyak averaging).

Trained (requires_grad) parameters are averaged. Frozen parameters and buffers, such as the
VQ codebook and its EMA statistics, follow their own update rules and are copied. The EMA copy is what
validation, ``best_model.pt`` and sampling use when ``training.ema`` is on.
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        averaged, copied = [], []
        for e, s in zip(self.model.parameters(), model.parameters()):
            # only what gradients train is averaged; state that has its own update rule (the VQ
            # codebook, moved by EMA statistics and dead-code restarts) is copied as it is
            (averaged if s.requires_grad and e.dtype.is_floating_point else copied).append((e, s.detach()))
        if averaged:
            torch._foreach_lerp_([e for e, _ in averaged], [s for _, s in averaged], 1.0 - self.decay)
        for e, s in copied:
            e.copy_(s)
        for e, s in zip(self.model.buffers(), model.buffers()):
            e.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
