"""The upstream project's YAML keys, translated into vqldm's before a config is parsed.

The VQ-LDM README that vqldm follows comes from the ``monai_diffusion`` scripts of the public
coarse2fine-pcgen project (``3d_vq_ldm/train_vqvae.py``, ``train_diffusion.py``; the conditional
``3d_diffusion/train_conditional_diffusion.py``). Their YAML files use keys the README's snippet does
not show. :func:`translate` turns a raw config mapping (plain dicts, no torch) into one in vqldm's keys
and says what it did, key by key: a key vqldm has the behaviour for is translated (an ``info``
note naming the vqldm key), a key it has no behaviour for is accepted and dropped (a ``warning``
note saying why it has no effect). A config for a model vqldm lacks (the upstream LDM's KL
``autoencoder:``) is refused with one line. Everything else is left for ``config.py``, which still
refuses typos with a suggestion. docs/migration.md lists every key.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass

from vqldm.errors import VqldmError


@dataclass(frozen=True)
class Note:
    """What happened to one upstream key: ``info`` (translated) or ``warning`` (no effect)."""

    level: str
    key: str
    text: str

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"


# Upstream key names by section, for the did-you-mean of a mistyped one (config.py asks).
UPSTREAM_NAMES = {
    "data": ("voxel_size", "pin_memory", "max_data_size_for_train", "max_data_size_for_val"),
    "data.augmentation": ("enabled", "use_patch_based", "use_center_crop_for_val", "invert_intensity",
                          "random_flip_prob", "random_rotate_prob"),
    "weighted": ("recon_loss_type",),
    "dice": ("sigmoid",),
    "combined": ("recon_weight", "recon_loss_type", "foreground_weight", "background_weight", "threshold",
                 "dice_smooth"),
    "diffusion": ("condition_channels", "condition_embed_dim", "projection_axis"),
}
AUGMENTATION_KEYS = UPSTREAM_NAMES["data.augmentation"]
CONDITION_KEYS = UPSTREAM_NAMES["diffusion"]
STAGES = ("vqvae", "diffusion", "prior")


def known_names(prefix: str) -> tuple[str, ...]:
    """Upstream key names of the section at dotted ``prefix`` (``vqvae.training.loss.combined`` -> combined's)."""
    if prefix in UPSTREAM_NAMES:
        return UPSTREAM_NAMES[prefix]
    parent, _, last = prefix.rpartition(".")
    return UPSTREAM_NAMES.get(last, ()) if parent.endswith("training.loss") else ()


class _Notes(list):
    def info(self, key: str, text: str) -> None:
        self.append(Note("info", key, text))

    def warn(self, key: str, text: str) -> None:
        self.append(Note("warning", key, text))


def translate(data: dict) -> tuple[dict, list[Note]]:
    """``data`` (a raw config mapping) in vqldm's keys, and a note per upstream key found.

    ``data`` itself is not changed. Raises :class:`VqldmError` for a config of a model vqldm lacks.
    """
    if "autoencoder" in data:
        raise VqldmError("autoencoder: this is an upstream LDM config for a KL autoencoder (AutoencoderKL); "
                         "vqldm has no KL autoencoder, it trains a VQ-VAE (the vqvae: section of a VQ-LDM config, "
                         "e.g. vq_ldm_config_local.yaml); see docs/migration.md")
    out = copy.deepcopy(data)
    notes = _Notes()
    if isinstance(out.get("data"), dict):
        _data(out["data"], notes)
    for stage in STAGES:
        loss = _get(out, stage, "training", "loss")
        if loss is not None:
            _loss(loss, f"{stage}.training.loss", notes)
    if isinstance(out.get("diffusion"), dict):
        _conditional(out, notes)
        _timesteps(out["diffusion"])
    if isinstance(out.get("sampling"), dict):
        _sampling(out, notes)
    return out, list(notes)


def _get(d: dict, *path: str):
    for p in path:
        if not isinstance(d, dict) or not isinstance(d.get(p), dict):
            return None
        d = d[p]
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _triple(value, key: str):
    """Upstream sizes may be one integer (isotropic) or [X, Y, Z]."""
    if _is_int(value):
        return [value] * 3
    if isinstance(value, list) and len(value) == 3 and all(_is_int(v) for v in value):
        return value
    raise VqldmError(f"{key}: expected one size or [X, Y, Z] in voxels, got {value!r}")


def _count(d: dict, key: str, dotted: str):
    v = d.pop(key)
    if v is not None and not (_is_int(v) and v >= 1):
        raise VqldmError(f"{dotted}: expected a number of volumes >= 1 or null, got {v!r}")
    return v


# ------------------------------------------------------------------------------------ data
def _data(d: dict, notes: _Notes) -> None:
    if "voxel_size" in d:
        size = _triple(d.pop("voxel_size"), "data.voxel_size")
        if "patch_size" in d:
            notes.warn("data.voxel_size", f"no effect: data.patch_size {d['patch_size']} is also set and wins")
        else:
            d["patch_size"] = size
            notes.info("data.voxel_size", f"-> data.patch_size {size} (the training patch, in voxels)")
    if _is_int(d.get("voxel_resize")):
        d["voxel_resize"] = _triple(d["voxel_resize"], "data.voxel_resize")
        notes.info("data.voxel_resize", f"-> data.voxel_resize {d['voxel_resize']} (one size: the same on each axis)")
    if "pin_memory" in d:
        d.pop("pin_memory")
        notes.warn("data.pin_memory", "no effect: vqldm pins host memory whenever it trains on CUDA")
    for old, new in (("max_data_size_for_train", "max_train_volumes"), ("max_data_size_for_val", "max_val_volumes")):
        if old in d:
            d[new] = _count(d, old, f"data.{old}")
            notes.info(f"data.{old}", f"-> data.{new} {d[new]} (the first volumes of the folder, by name)")
    if isinstance(d.get("augmentation"), dict):
        d["augmentation"] = _augmentation(d["augmentation"], notes)


def _augmentation(a: dict, notes: _Notes) -> bool:
    """The upstream augmentation mapping -> vqldm's one switch (random flips and in-plane rot90)."""
    for k in a:
        if k not in AUGMENTATION_KEYS:
            close = difflib.get_close_matches(str(k), AUGMENTATION_KEYS, n=1, cutoff=0.6)
            hint = f": did you mean '{close[0]}'?" if close else f" (valid keys: {', '.join(AUGMENTATION_KEYS)})"
            raise VqldmError(f"unknown config key 'data.augmentation.{k}'{hint}")
    key = "data.augmentation"
    for k, v in a.items():
        prob = k.endswith("_prob")
        if not (isinstance(v, bool) if not prob else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and 0 <= v <= 1)):
            raise VqldmError(f"{key}.{k}: expected {'a probability in [0, 1]' if prob else 'true or false'}, got {v!r}")
    flip, rot = a.get("random_flip_prob", 0), a.get("random_rotate_prob", 0)
    on = bool(a.get("enabled", False)) and (flip > 0 or rot > 0)
    why = ("the upstream scripts flipped or rotated only where random_flip_prob or random_rotate_prob is above 0"
           if a.get("enabled") and not on else "random flips on each axis and rot90 in the xy plane")
    notes.info(f"{key}.enabled", f"-> data.augmentation {str(on).lower()} ({why})")
    for k, p in (("random_flip_prob", flip), ("random_rotate_prob", rot)):
        if k in a and p not in (0, 0.5):
            notes.warn(f"{key}.{k}", f"{p}: vqldm flips and rotates with probability 0.5; the value only turns "
                                     f"augmentation on")
    if "use_patch_based" in a:
        notes.warn(f"{key}.use_patch_based", "no effect: vqldm always trains on random data.patch_size crops "
                                             "(data.foreground_crop_ratio of them centred on foreground)")
    if "use_center_crop_for_val" in a:
        notes.warn(f"{key}.use_center_crop_for_val", "no effect: vqldm validates on fixed tiles covering each "
                                                     "validation volume (data.max_val_patches)")
    if a.get("invert_intensity"):
        notes.warn(f"{key}.invert_intensity", "no effect: vqldm never inverts intensities; invert the volumes "
                                              "before training if filaments are dark")
    elif "invert_intensity" in a:
        notes.info(f"{key}.invert_intensity", "false: as vqldm, which never inverts intensities")
    return on


# ------------------------------------------------------------------------------------ losses
def notes_for(notes: list[Note], prefix: str) -> bool:
    """Whether any note so far is about a key under ``prefix``."""
    return any(n.key.startswith(prefix + ".") for n in notes)


COMBINED_TO_VQLDM = {  # upstream combined.<key> -> vqldm (block, key)
    "recon_weight": ("combined", "weighted_weight"),
    "recon_loss_type": ("weighted", "base"),
    "foreground_weight": ("weighted", "foreground_weight"),
    "background_weight": ("weighted", "background_weight"),
    "threshold": ("weighted", "threshold"),
    "dice_smooth": ("dice", "smooth"),
}


def _loss(loss: dict, prefix: str, notes: _Notes) -> None:
    weighted = loss.get("weighted") if isinstance(loss.get("weighted"), dict) else None
    dice = loss.get("dice") if isinstance(loss.get("dice"), dict) else None
    combined = loss.get("combined") if isinstance(loss.get("combined"), dict) else None
    if weighted is not None and "recon_loss_type" in weighted:
        weighted["base"] = weighted.pop("recon_loss_type")
        notes.info(f"{prefix}.weighted.recon_loss_type", f"-> {prefix}.weighted.base {weighted['base']!r}")
    if dice is not None and "sigmoid" in dice:
        if dice.pop("sigmoid"):
            notes.warn(f"{prefix}.dice.sigmoid", "no effect: vqldm's Dice takes a soft mask of the output "
                                                 "(linear up to dice.threshold), never a sigmoid")
        else:
            notes.info(f"{prefix}.dice.sigmoid", "false: as vqldm, whose Dice applies no sigmoid")
    upstream_combined = combined is not None and any(k in combined for k in COMBINED_TO_VQLDM)
    if "reconstruction_loss_type" not in loss and (upstream_combined or notes_for(notes, prefix)):
        loss["reconstruction_loss_type"] = "l1"
        notes.info(f"{prefix}.reconstruction_loss_type", "(absent) -> l1, the upstream scripts' default "
                                                         "(vqldm's is combined)")
    if not upstream_combined:
        return
    kind = loss["reconstruction_loss_type"]
    for k in [k for k in COMBINED_TO_VQLDM if k in combined]:
        value = combined.pop(k)
        block, name = COMBINED_TO_VQLDM[k]
        if kind != "combined":
            notes.warn(f"{prefix}.combined.{k}", f"no effect: the upstream scripts read it only when "
                                                 f"reconstruction_loss_type is combined (here {kind!r})")
            continue
        target = loss.setdefault(block, {})
        if name in target and target[name] != value and block != "combined":
            notes.warn(f"{prefix}.{block}.{name}", f"{target[name]!r} has no effect: with reconstruction_loss_type "
                                                   f"combined the upstream scripts read combined.{k} ({value!r})")
        target[name] = value
        notes.info(f"{prefix}.combined.{k}", f"-> {prefix}.{block}.{name} {value!r}")


# ------------------------------------------------------------------------------------ models
def _conditional(out: dict, notes: _Notes) -> None:
    """The conditional config's keys: vqldm has no projection-conditioned prior; it models the latent."""
    u = out["diffusion"]
    found = [k for k in CONDITION_KEYS if k in u]
    if not found:
        return
    for k in found:
        u.pop(k)
        notes.warn(f"diffusion.{k}", "no effect: vqldm has no projection-conditioned prior (the upstream "
                                     "conditional script fed a 2D projection of the volume as its condition); "
                                     "class conditions come from data.labels_file")
    emb = (_get(out, "vqvae") or {}).get("embedding_dim")
    for k in ("in_channels", "out_channels"):
        if k not in u or u[k] == emb:
            continue
        old = u.pop(k)
        if emb is not None:  # else vqldm's defaults of both agree
            u[k] = emb
        notes.info(f"diffusion.{k}", f"{old} -> vqvae.embedding_dim (the upstream conditional model diffused the "
                                     f"image; vqldm's UNet diffuses the VQ-VAE latent)")
    if "norm_num_groups" not in u:
        u["norm_num_groups"] = 8
        notes.info("diffusion.norm_num_groups", "(absent) -> 8, the value the upstream conditional script built "
                                                "its UNet with")


def _timesteps(u: dict) -> None:
    """vqldm keeps the README's two copies of the step count equal; a file that gives one (the upstream
    scripts read only the scheduler's) means it for both."""
    sched = u.get("scheduler") if isinstance(u.get("scheduler"), dict) else None
    if sched is not None and "num_train_timesteps" in sched and "num_train_timesteps" not in u:
        u["num_train_timesteps"] = sched["num_train_timesteps"]
    elif "num_train_timesteps" in u and (sched is None or "num_train_timesteps" not in sched):
        u.setdefault("scheduler", {})["num_train_timesteps"] = u["num_train_timesteps"]


SAMPLING_FLAGS = {"num_samples": "vqldm sample --num-samples", "output_dir": "vqldm sample --out",
                  "save_format": "vqldm sample --format", "pointcloud": "vqldm points"}


def _sampling(out: dict, notes: _Notes) -> None:
    """The upstream LDM's ``sampling:`` section: its step count is a config key here, the rest are flags."""
    s = out.pop("sampling")
    for k, v in s.items():
        if k == "num_inference_steps":
            logging_ = out.setdefault("diffusion", {}).setdefault("logging", {})
            if "num_inference_steps" in logging_:
                notes.warn("sampling.num_inference_steps", "no effect: diffusion.logging.num_inference_steps "
                                                           "is also set and wins")
            else:
                logging_["num_inference_steps"] = v
                notes.info("sampling.num_inference_steps", f"-> diffusion.logging.num_inference_steps {v} "
                                                           f"(vqldm sample's default step count)")
        else:
            flag = SAMPLING_FLAGS.get(k)
            notes.warn(f"sampling.{k}", f"no effect in a config: give it to {flag}" if flag else
                       "no effect: vqldm has no such sampling setting")
