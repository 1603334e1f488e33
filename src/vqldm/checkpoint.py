"""Self-describing checkpoints, written atomically and loaded safely.

A vqldm checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: a file that smuggles a pickled object with code in it is
refused before any of its code runs. Two kinds share one layout (EDM habit):

* ``best_model.pt``: the inference snapshot (EMA weights where EMA is on) plus everything needed
  to rebuild the network: network config, normalisation, scale factor, parent hash, version.
* ``latest_checkpoint.pt``: the same plus ``training_state`` (model, optimizers, scalers, EMA,
  epoch/step, RNG state, best score) for ``resume_from``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import torch

from vqldm import __version__
from vqldm.errors import VqldmError

FORMAT_VERSION = 1
KINDS = {"stage1": "a stage-1 (VQ-VAE)", "stage2": "a stage-2 (diffusion)"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def header(kind: str) -> dict:
    return {
        "vqldm_checkpoint": FORMAT_VERSION,
        "kind": kind,
        "vqldm_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_atomic(obj: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous good file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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


def load_checkpoint(path: str | Path, kind: str | None = None, what: str = "checkpoint",
                    map_location="cpu") -> dict:
    """Load a vqldm checkpoint with ``weights_only=True``; every failure names ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise VqldmError(f"{what}: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise VqldmError(f"{what}: {path} holds pickled Python objects beyond tensors and plain "
                             f"values; refused for safety (weights_only loading). Not a vqldm checkpoint") from None
        raise VqldmError(f"{what}: {path} is not a readable checkpoint ({msg[:160]})") from None
    except Exception as e:  # truncated zip, random bytes, wrong format
        raise VqldmError(f"{what}: {path} is not a readable checkpoint "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "vqldm_checkpoint" not in ckpt:
        raise VqldmError(f"{what}: {path} is not a vqldm checkpoint")
    if kind is not None and ckpt.get("kind") != kind:
        raise VqldmError(f"{what}: {path} is {KINDS.get(ckpt.get('kind'), repr(ckpt.get('kind')))} checkpoint, "
                         f"expected {KINDS[kind]} one")
    return ckpt


# ---- RNG state as tensors and plain values (numpy's state holds an ndarray) ----

def rng_state() -> dict:
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_plain(s):
    version, internal, gauss = s
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
