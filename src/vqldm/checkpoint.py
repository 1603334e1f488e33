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
import pickle
import re
from pathlib import Path

import torch

from vqldm import __version__
from vqldm.files import atomic_write
from vqldm.errors import VqldmError

FORMAT_VERSION = 1
# a checkpoint's "kind" names the task that wrote it; the two first tasks keep the kinds they have
# always written, so that every earlier checkpoint still loads
STORED_KIND = {"vqvae": "stage1", "diffusion": "stage2"}
DESCRIBED = {"stage1": "a stage-1 (VQ-VAE)", "stage2": "a stage-2 (diffusion)", "prior": "a token-prior (transformer)"}


def stored_kind(task: str) -> str:
    """The ``kind`` written into the checkpoints of ``task`` (an engine task's name)."""
    return STORED_KIND.get(task, task)


def _describe(kind) -> str:
    return DESCRIBED.get(kind, f"a {kind!r}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def header(task: str) -> dict:
    return {
        "vqldm_checkpoint": FORMAT_VERSION,
        "kind": stored_kind(task),
        "vqldm_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_atomic(obj: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous good file or the new one, never a torn file.
    The temp file (``.<name>.<random>.tmp``) is hidden and never ends in ``.pt``; a kill leaves it
    behind, and the next training run into the folder removes it.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_untrusted(path: str | Path, what: str = "checkpoint", map_location="cpu"):
    """``torch.load(weights_only=True)`` of any PyTorch file (vqldm's or another program's): only
    tensors and plain values load; every failure is one line naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise VqldmError(f"{what}: file not found: {path}")
    if path.stat().st_size == 0:
        raise VqldmError(f"{what}: {path} is an empty file, not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the cause stays attached for --debug
        raise VqldmError(f"{what}: {path} {_load_failure(e)}") from e


def load_checkpoint(path: str | Path, kind: str | None = None, what: str = "checkpoint",
                    map_location="cpu") -> dict:
    """Load a vqldm checkpoint with ``weights_only=True``; every failure names ``what`` and the path.

    ``kind``: the task (``"vqvae"``, ``"diffusion"``) whose checkpoint is expected.
    """
    ckpt = load_untrusted(path, what, map_location)
    if not isinstance(ckpt, dict) or "vqldm_checkpoint" not in ckpt:
        raise VqldmError(f"{what}: {path} is a PyTorch file but not a vqldm checkpoint (no vqldm header); "
                         f"give a best_model.pt or latest_checkpoint.pt written by vqldm")
    if kind is not None and ckpt.get("kind") != stored_kind(kind):
        raise VqldmError(f"{what}: {path} is {_describe(ckpt.get('kind'))} checkpoint, "
                         f"expected {_describe(stored_kind(kind))} one")
    return ckpt


def rebuild(make, state: dict, what: str, path, label: str):
    """``make()`` (a network built from a checkpoint's constructor arguments) with ``state`` loaded;
    a missing key, a wrong shape or bad arguments become one line naming ``what``, ``path`` and ``label``."""
    try:
        net = make()
        net.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise VqldmError(f"{what}: {path} does not hold a loadable {label} ({str(e).splitlines()[0][:200]})") from None
    return net


def inference_weights(ckpt: dict, path, use_ema: bool, flag: str) -> dict:
    """The weights a sampler uses: the snapshot's (EMA where EMA was on), or with ``use_ema`` off the
    raw ones, which only a ``latest_checkpoint.pt`` holds (``flag`` names the option to pass it with)."""
    if use_ema or not ckpt.get("ema"):
        return ckpt.get("state_dict", {})  # none at all: the load that follows names the file
    ts = ckpt.get("training_state")
    if ts is None:
        raise VqldmError(f"--no-ema: {path} holds only the EMA weights; the raw weights are in "
                         f"latest_checkpoint.pt (pass it with {flag})")
    return ts["model"]


# torch names the global a weights-only load refused in one of these forms, by version:
#   "Unsupported global: GLOBAL os.system was not an allowed global by default"
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _load_failure(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line: refused code, or a broken file."""
    text = str(e)
    found = _GLOBAL.search(text)
    if isinstance(e, pickle.UnpicklingError) and found:
        return (f"was refused for safety: it asks to import {found.group(1)}, which could run code when "
                f"loaded; a vqldm checkpoint holds only tensors and plain values. Not loaded; do not load it "
                f"with weights_only=False unless you trust its source")
    detail = " ".join(text.split())
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        # the generic weights_only preamble says nothing about this file: keep the specific part
        m = re.search(r"(WeightsUnpickler error:.*?)(?: Check the documentation|$)", detail)
        detail = m.group(1).strip() if m else "not a pickle"
    detail = detail.split(". ")[0]  # the first sentence names the problem; the rest is advice
    detail = f"{e.__class__.__name__}: {detail}" if detail else e.__class__.__name__
    return (f"is not a readable checkpoint (truncated, corrupt or not a PyTorch file: "
            f"{detail[:160].rstrip()})")


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
