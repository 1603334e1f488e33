"""Exponential moving average of a network's weights (Polyak averaging).

Float parameters and buffers are averaged; integer buffers are copied. The EMA copy is what
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
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        floats = [(e, s) for e, s in zip(ema_p, src_p) if e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [s for _, s in floats], 1.0 - self.decay)
        for e, s in zip(self.model.buffers(), model.buffers()):
            if e.dtype.is_floating_point:
                e.lerp_(s, 1.0 - self.decay)
            else:
                e.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
