"""``vqldm check``: the config and the data, validated before any compute is spent."""

from __future__ import annotations

from vqldm.autoencoder.model import build_vqvae, vqvae_net_config
from vqldm.config import Config, latent_shape
from vqldm.data.labels import dataset_labels
from vqldm.data.pipeline import normalize_method
from vqldm.engine.setup import scan_data
from vqldm.priors.diffusion.unet import build_unet, unet_net_config
from vqldm.smlm.dataset import info_for_volumes


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conditions(cfg: Config, train, val) -> dict | None:
    """The diffusion prior's conditions from the labels file or class subfolders, checked as training checks
    them: each class's volume count per split, each covariate's training range; None: unconditional."""
    labels = dataset_labels(cfg, train.files, val.files, list(cfg.diffusion.covariates))
    if labels is None:
        return None
    return {"source": "class subfolders" if cfg.data.class_folders else cfg.data.labels_file,
            "classes": {c: [labels.train.count(k), labels.val.count(k)] for k, c in enumerate(labels.classes)},
            "covariates": labels.covariates}


def check(cfg: Config, progress: bool = False) -> dict:
    """Validate data and networks; return a JSON-serialisable report."""
    data = {}
    keys = ("train_data_dir", "val_data_dir")
    scanned = scan_data(cfg, progress)
    conditions = _conditions(cfg, *scanned)
    for key, s in zip(keys, scanned):  # one voxel size in both folders, else one line
        shapes = sorted(set(s.shapes))
        data[key] = {
            "path": getattr(cfg.data, key), "files": len(s.files), "shapes": [list(x) for x in shapes],
            "dtype_after_load": "float32", "spacing": list(s.spacing), "spacing_unit": s.unit,
            "intensity_min": s.min, "intensity_max": s.max, "skipped_unreadable": s.skipped, "constant_volumes": s.constant,
            "smaller_than_patch": sum(1 for x in s.shapes if any(a < b for a, b in zip(x, cfg.data.patch_size))),
        }
    vq = build_vqvae(vqvae_net_config(cfg))
    c = conditions or {"classes": {}, "covariates": {}}
    unet = build_unet(unet_net_config(cfg, len(c["classes"]), len(c["covariates"])))
    return {
        "config": cfg.source,
        "patch_size": list(cfg.data.patch_size),
        "latent_shape": latent_shape(cfg),
        "vqvae_parameters": _param_count(vq),
        "diffusion_parameters": _param_count(unet),
        "batch_size": {"vqvae": cfg.batch_size("vqvae"), "diffusion": cfg.batch_size("diffusion")},
        "learning_rate": {"vqvae": cfg.learning_rate("vqvae"), "diffusion": cfg.learning_rate("diffusion")},
        "data": data,
        "conditions": conditions,
        "normalization": {"method": normalize_method(cfg),
                          "smlm": info_for_volumes(cfg.data.train_data_dir, cfg.data.voxel_resize)},
        "upstream_keys": [{"level": n.level, "key": n.key, "text": n.text} for n in cfg.migration],
    }


def _normalization_line(n: dict) -> str:
    if not n["smlm"]:
        return n["method"]
    g = n["smlm"]["grid"]
    return (f"{n['method']}; a vqldm voxelize data set: {n['smlm']['counts_per_intensity']:.4g} localisations per "
            f"unit intensity, grid {g['shape']} of {[round(v, 2) for v in g['voxel_nm']]} nm")


def _conditions_line(c: dict) -> str:
    parts = [f"{len(c['classes'])} classes ({', '.join(f'{k}: {a} train / {b} val' for k, (a, b) in c['classes'].items())})"
             ] if c["classes"] else []
    parts += [f"covariate {k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in c["covariates"].items()]
    return f"{'; '.join(parts)} (from {c['source']})"


def format_report(r: dict) -> str:
    lines = [f"config OK: {r['config']}"]
    if r["upstream_keys"]:
        lines.append(f"  upstream-script keys ({len(r['upstream_keys'])}; vqldm config --print shows the result "
                     f"in vqldm's keys):")
        lines += [f"    {'warning' if n['level'] == 'warning' else 'translated'}: {n['key']}: {n['text']}"
                  for n in r["upstream_keys"]]
    lines += [f"  patch size        {r['patch_size']}",
              f"  latent shape      {r['latent_shape']}  (embedding_dim, x, y, z)",
              f"  VQ-VAE            {r['vqvae_parameters']:,} parameters",
              f"  diffusion UNet    {r['diffusion_parameters']:,} parameters",
              f"  normalisation     {_normalization_line(r['normalization'])}"]
    if r["conditions"]:
        lines.append(f"  conditions        {_conditions_line(r['conditions'])}")
    for key, d in r["data"].items():
        lines.append(f"  data.{key:<15} {d['files']} volumes in {d['path']}; shapes {d['shapes']}; "
                     f"spacing {d['spacing']} {d['spacing_unit']}; intensities [{d['intensity_min']:.4g}, {d['intensity_max']:.4g}]")
        if d["smaller_than_patch"]:
            lines.append(f"    {d['smaller_than_patch']} volume(s) smaller than the patch: they are zero-padded")
        if d["constant_volumes"]:
            lines.append(f"    constant volumes (normalise to zeros): {', '.join(d['constant_volumes'][:5])}")
        if d["skipped_unreadable"]:
            lines.append(f"    skipped unreadable: {len(d['skipped_unreadable'])}")
    return "\n".join(lines)
