"""Rank-0 TensorBoard writer: scalars and maximum-intensity-projection images."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from vqldm import distributed as dist
from vqldm.visuals import mip_grid, save_png


class Board:
    """SummaryWriter on rank 0, silent elsewhere. ``purge_step`` continues a resumed run's step axis."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.writer = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def mips(self, tag: str, rows: list[list[np.ndarray]], step: int, png_path: Path | None = None) -> None:
        """One grid image: ``rows[i][j]`` is a (1,X,Y,Z) or (X,Y,Z) volume in [0,1]."""
        if self.writer is None:
            return
        img = mip_grid(rows)
        self.writer.add_image(tag, img[None], step, dataformats="CHW")
        if png_path is not None:
            save_png(img, png_path)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def archive_previous(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    """Move files matching ``patterns`` into ``directory/previous_<time>/``; nothing is deleted."""
    found = [p for pat in patterns for p in directory.glob(pat) if p.is_file()]
    if not found:
        return None
    dest = directory / time.strftime("previous_%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = directory / (time.strftime("previous_%Y%m%d-%H%M%S") + f"_{n}")
    dest.mkdir(parents=True)
    for p in found:
        shutil.move(str(p), dest / p.name)
    return dest
