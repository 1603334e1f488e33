"""Durable files: atomic writes, new-file permissions, and archiving earlier outputs.

Nothing vqldm writes is ever torn by a kill (write to a temp file, fsync, rename), and no run
deletes what an earlier one wrote: it moves it into a ``previous_<time>/`` folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from vqldm.errors import VqldmError


def new_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file: 0o666 less the umask.

    ``tempfile.mkstemp`` creates 0o600 files; renamed into place they would keep that and lock
    colleagues out of a shared project folder.
    """
    try:  # Linux: read the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file)`` on a temp file in the same folder, fsync, rename over ``path``, fsync the folder.

    A kill at any moment leaves either the previous file or the new one, never a torn file. The
    temp file (``.<name>.<random>.tmp``) is hidden and removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def previous_dir(directory: Path) -> Path:
    """A new, empty ``directory/previous_<time>[_n]/``."""
    dest = directory / time.strftime("previous_%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = directory / (time.strftime("previous_%Y%m%d-%H%M%S") + f"_{n}")
    dest.mkdir(parents=True)
    return dest


def archive_previous(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    """Move files matching ``patterns`` into ``directory/previous_<time>/``; nothing is deleted."""
    found = [p for pat in patterns for p in sorted(directory.glob(pat)) if p.is_file()]
    if not found:
        return None
    dest = previous_dir(directory)
    for p in found:
        shutil.move(str(p), dest / p.name)
    return dest


def unique_stems(paths: list[Path], suffixes: tuple[str, ...], what: str) -> list[str]:
    """Each file's name without its known suffix (the longest that matches: ``a.1.nii.gz`` -> ``a.1``),
    refusing two files that would give one output name (``a.nii`` and ``a.nii.gz``)."""
    ordered = sorted(suffixes, key=len, reverse=True)
    stems = []
    for p in paths:
        name = p.name
        suffix = next((s for s in ordered if name.lower().endswith(s)), "")
        stems.append(name[: len(name) - len(suffix)] if suffix else name)
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        clash = [p.name for p, s in zip(paths, stems) if s == dup[0]]
        raise VqldmError(f"{what}: {' and '.join(clash)} would write the same output name {dup[0]!r}; rename one")
    return stems
