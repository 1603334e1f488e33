"""Rank-0 TensorBoard writer: scalars and maximum-intensity-projection images.

Two step axes share one log folder: tags under ``train/`` count optimizer steps (1, 2, ...), every
other tag (``train_epoch/``, ``val/``, images) counts finished epochs. A resumed run continues both:
:func:`continue_after` first makes the event files on disk end at the resume point, so that no
(tag, step) appears twice whatever reader TensorBoard uses (not every reader honours ``purge_step``).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from vqldm import distributed as dist
from vqldm.files import atomic_write, previous_dir
from vqldm.visuals import mip_grid, save_png

log = logging.getLogger("vqldm")

EVENTS = "events.out.tfevents.*"
STEP_AXIS_PREFIX = "train/"  # these tags count optimizer steps; all others count epochs


class Board:
    """SummaryWriter on rank 0, silent elsewhere. ``purge_step`` continues a resumed run's step axis.

    ``task`` ends the event file names (``events.out.tfevents.<...>.vqvae``), so a log folder shared
    by several tasks keeps their files apart (:func:`events_of`).
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, task: str | None = None):
        self.log_dir = Path(log_dir)
        self.writer = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            if purge_step is not None:
                _after_earlier_files(self.log_dir)
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step,
                                        filename_suffix=f".{task}" if task else "")

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


def _after_earlier_files(log_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order; a name starts with its creation second,
    then host, pid and a per-process counter. A resumed run's file created in the same second as an
    earlier one can sort before it (another pid, or the counter going from 9 to 10), and the curves
    would then be read out of order. Wait for the next second when that could happen (it only can
    when a run is resumed within a second of starting the previous one)."""
    fields = (p.name.split(".", 4) for p in log_dir.glob(EVENTS))
    seconds = [int(f[3]) for f in fields if len(f) == 5 and f[3].isdigit()]
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= 2:  # (a file from much further ahead comes from a skewed clock: no use waiting)
            time.sleep(wait)


# ---------------------------------------------------------------------------- resume: one step axis
def _records(data: bytes):
    """(start, end, payload) of each complete TFRecord in ``data``; stops at a torn tail."""
    pos, n = 0, len(data)
    while pos + 12 <= n:
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > n:
            return
        yield pos, end, data[pos + 12:pos + 12 + length]
        pos = end


def _keep_until(data: bytes, step: int, epoch: int) -> tuple[bytes, bool]:
    """The records of an event file that lie at or before the resume point, and whether any did not
    (a record past it, or a record torn by a kill)."""
    from tensorboard.compat.proto import event_pb2

    kept, changed, pos = [], False, 0
    for start, end, payload in _records(data):
        pos = end
        try:
            ev = event_pb2.Event.FromString(payload)
        except Exception:  # noqa: BLE001 - a damaged record: everything from here on is dropped
            changed = True
            break
        stale = any(ev.step > (step if v.tag.startswith(STEP_AXIS_PREFIX) else epoch) for v in ev.summary.value)
        if stale:
            changed = True
        else:
            kept.append(data[start:end])
    if pos != len(data):
        changed = True
    return b"".join(kept), changed


def events_of(task: str) -> str:
    """The glob of one task's event files: :class:`Board` ends their names with ``.<task>``."""
    return f"{EVENTS}.{task}"


def continue_after(log_dir: str | Path, step: int, epoch: int, pattern: str = EVENTS) -> Path | None:
    """Make the event files in ``log_dir`` end at a resume point (``step`` steps, ``epoch`` epochs).

    A run that stopped after its last checkpoint (kill, crash, non-finite loss) logged steps that
    the resumed run will log again. Each event file holding such records is copied byte for byte
    into ``log_dir/previous_<time>/`` and then replaced (atomically) by its records up to the resume
    point, untouched. Returns the archive folder, or None when nothing was past the resume point.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return None
    plans = []
    for f in sorted(log_dir.glob(pattern)):
        if not f.is_file():
            continue
        data = f.read_bytes()
        kept, changed = _keep_until(data, step, epoch)
        if changed:
            plans.append((f, kept))
    if not plans:
        return None
    dest = previous_dir(log_dir)
    for f, _ in plans:  # first a durable copy of every original ...
        shutil.copy2(f, dest / f.name)
        _fsync_file(dest / f.name)
    _fsync_dir(dest)
    for f, kept in plans:  # ... then each file is replaced by its kept records
        atomic_write(f, lambda out, kept=kept: out.write(kept))
    return dest


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every file system lets a folder be fsynced
        pass
