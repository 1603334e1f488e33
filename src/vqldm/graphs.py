"""CUDA graphs: record a whole GPU step once, then replay it with one launch.

The stage-2 UNet on a 16^3 latent is bound by kernel-launch overhead: its step launches over a
thousand small kernels, and the GPU idles between them while Python issues the next. A CUDA graph
records those launches once and replays them all with a single call, so the GPU runs back to back.

:class:`CudaGraphed` wraps a function of a dict of tensors (a training step with its backward pass,
optimizer, clipping and EMA, or a sampling call of the UNet). The first ``warmup`` calls run
eagerly (cuDNN picks its kernels, torch.compile compiles, the optimizer creates its state); the
next call records the graph. Every later call with inputs of the same shapes copies them into the
graph's input buffers and replays it. Inputs of another shape (the last, smaller batch of an epoch)
run eagerly, so the answer never depends on whether a graph was used.

What the function may do, since a replay runs no Python: no host synchronisation (``.item()``,
``bool(tensor)``), no Python decision on tensor values, no random numbers drawn on the CPU
(``torch.rand*`` on the GPU is fine: each replay draws fresh ones), no reassigning tensors it means to
carry to the next step (update them in place). Its outputs are the graph's own buffers: the next call
overwrites them, so keep what must outlive it (``clone``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("vqldm")

Inputs = dict[str, torch.Tensor]


def _signature(inputs: Inputs) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))


class CudaGraphed:
    """``fn(inputs) -> outputs`` replayed from a CUDA graph for each input signature (up to ``max_graphs``)."""

    def __init__(self, fn: Callable[[Inputs], Any], device: torch.device, warmup: int = 3, max_graphs: int = 2,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "step"):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.fn, self.device, self.warmup, self.max_graphs = fn, device, warmup, max_graphs
        self.prepare = prepare or (lambda x: x.to(device, non_blocking=True))
        self.name = name
        self._seen: dict[tuple, int] = {}  # signature -> eager calls so far
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Inputs, Any]] = {}
        self._stream = torch.cuda.Stream(device)
        self.replays = 0
        self.eager_calls = 0

    def _run_on_side_stream(self, fn, *args):
        # graphs are recorded on a side stream; warm-up runs there too, so that per-stream state
        # (cuBLAS workspaces) exists before recording
        s = self._stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            out = fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(s)
        return out

    def __call__(self, inputs: Inputs):
        sig = _signature(inputs)
        entry = self._graphs.get(sig)
        if entry is not None:
            graph, static_in, static_out = entry
            for k, v in inputs.items():
                static_in[k].copy_(v, non_blocking=True)
            graph.replay()
            self.replays += 1
            return static_out
        n = self._seen.get(sig, 0)
        prepared = {k: self.prepare(v) for k, v in inputs.items()}
        if n < self.warmup or len(self._graphs) >= self.max_graphs:
            self._seen[sig] = n + 1
            self.eager_calls += 1
            return self._run_on_side_stream(self.fn, prepared)
        return self._record(sig, prepared)

    def _record(self, sig: tuple, prepared: Inputs):
        static_in = {k: v.clone() for k, v in prepared.items()}  # clone keeps the memory format
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate while this thread records
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        self._graphs[sig] = (graph, static_in, static_out)
        log.debug("CUDA graph recorded for %s %s", self.name, [s[1] for s in sig])
        graph.replay()  # recording runs nothing: this is the call's actual work
        self.replays += 1
        return static_out
