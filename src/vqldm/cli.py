"""The ``vqldm`` command: argument parsing, and one hand-off per subcommand; no logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vqldm import __version__
from vqldm.errors import VqldmError

log = logging.getLogger("vqldm")

EPILOG = "Docs: README.md and docs/ in the vqldm repository. Use --debug to see tracebacks."


# ------------------------------------------------------------------------------------ helpers
def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="CFG",
                   help="YAML config in the original VQ-LDM README's schema (the upstream scripts' keys are "
                        "translated, see docs/migration.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set vqvae.training.n_epochs=5 (repeatable)")


def _add_checkpoints(p: argparse.ArgumentParser) -> None:
    """The trained pair's checkpoints, where they are not the config's (sample, export-bundle)."""
    p.add_argument("--diffusion-checkpoint", default=None,
                   help="stage-2 checkpoint (default: diffusion.checkpoints.output_dir/best_model.pt)")
    p.add_argument("--vqvae-checkpoint", default=None,
                   help="stage-1 checkpoint (default: the one recorded when stage 2 trained)")


def _load(args, check_paths: bool = True, announce: bool = True):
    """The config of ``--config`` and ``--set``; with ``check_paths``, its data folders checked too;
    with ``announce``, what became of each upstream-script key is logged."""
    from vqldm.config import load_config
    from vqldm.data.io import check_data_dirs

    cfg = load_config(args.config, args.overrides, announce=announce)
    if check_paths:
        check_data_dirs(cfg.data)
    return cfg


def _print_paths(title: str, items: dict[str, object]) -> None:
    print(title)
    for k, v in items.items():
        print(f"  {k:<22} {v}")


# ------------------------------------------------------------------------------------ commands
def cmd_synth(args) -> int:
    from vqldm.synth import write_dataset

    if (args.vary is None) != (args.levels is None):
        raise VqldmError("synth: --vary and --levels go together (e.g. --vary density --levels 3)")
    s = write_dataset(args.out, args.num_train, args.num_val, tuple(args.shape), args.seed, progress=not args.quiet,
                      locs=args.locs, levels=args.levels or 0, vary=args.vary or "density")
    lines = {
        "train": f"{Path(args.out) / 'train'} ({s['num_train']} volumes)",
        "val": f"{Path(args.out) / 'val'} ({s['num_val']} volumes)",
        "ground truth": s["ground_truth"],
        "foreground fraction": f"{s['mean_foreground_fraction']:.4f} (mean, voxels > 0.1)",
    }
    if args.locs:
        lines["localisations"] = f"{s['locs_dir']}/train, {s['locs_dir']}/val (x [nm],y [nm],z [nm])"
    kind = f"label ({args.levels} {args.vary} levels), " if args.levels else ""
    lines["labels"] = (f"{s['labels_file']} ({kind}n_filaments, persistence_nm, foreground_fraction per volume; "
                       f"data.labels_file)")
    _print_paths("synthetic microtubules written:", lines)
    return 0


def cmd_voxelize(args) -> int:
    from vqldm.commands.voxelize import VoxelizeOptions, summary_lines, voxelize_tables

    opts = VoxelizeOptions(inputs=args.input, out_dir=Path(args.out), method=args.method, sigma_nm=args.sigma_nm,
                           fov_nm=args.fov, origin_nm=args.origin, padding_nm=args.padding,
                           voxel_nm=args.voxel_size, shape=args.shape, per_file_origin=args.per_file_origin,
                           drop_outside=args.drop_outside, scale=args.scale, val_fraction=args.val_fraction,
                           seed=args.seed, key=args.key, progress=not args.quiet)
    info = voxelize_tables(opts)
    _print_paths(f"{len(info['files'])} localisation tables voxelised:", summary_lines(Path(args.out), info))
    return 0


def cmd_points(args) -> int:
    from vqldm.commands.points import PointsOptions, volumes_to_tables

    res = volumes_to_tables(PointsOptions(volumes=Path(args.volumes), out_dir=Path(args.out), info=args.info,
                                          n_points=args.points, threshold=args.threshold, seed=args.seed,
                                          progress=not args.quiet))
    n = sum(t["n_localisations"] for t in res["tables"])
    _print_paths(f"{len(res['tables'])} localisation tables written ({n} localisations):", {
        "tables": f"{args.out}/*.csv (x [nm],y [nm],z [nm])", "record": Path(args.out) / "points.json",
        "geometry from": res["source"]})
    return 0


def cmd_check(args) -> int:
    from vqldm.commands.check import check

    report = check(_load(args, check_paths=True, announce=False), progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        from vqldm.commands.check import format_report

        print(format_report(report))
    return 0


def cmd_config(args) -> int:
    cfg = _load(args, check_paths=False)
    if args.out:
        from vqldm.files import atomic_write_bytes

        atomic_write_bytes(Path(args.out), cfg.to_yaml().encode("utf-8"))
        _print_paths("config written in vqldm's keys:", {"config": args.out})
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_import_checkpoint(args) -> int:
    from vqldm.commands.import_checkpoint import ImportOptions, import_checkpoints

    opts = ImportOptions(config=args.config, overrides=tuple(args.overrides), out_dir=Path(args.out),
                         vqvae_checkpoint=Path(args.vqvae_checkpoint), overwrite=args.overwrite,
                         diffusion_checkpoint=Path(args.diffusion_checkpoint) if args.diffusion_checkpoint else None)
    written = import_checkpoints(opts)
    then = ("sample with", "sample") if "diffusion" in written else ("train stage 2 with", "train-diffusion")
    _print_paths("upstream checkpoints imported:", {
        **{f"{k} checkpoint": v for k, v in written.items() if k != "config"}, "config": written["config"],
        then[0]: f"vqldm {then[1]} --config {written['config']}" + (" --out samples" if then[1] == "sample" else "")})
    return 0


def cmd_train_vqvae(args) -> int:
    from vqldm.autoencoder.train import train_vqvae

    cfg = _load(args)
    res = train_vqvae(cfg, overwrite=args.overwrite, progress=not args.quiet)
    _finish_training("stage 1 (VQ-VAE)", cfg.vqvae, res)
    return 0


def cmd_train_diffusion(args) -> int:
    from vqldm.priors.diffusion.train import train_diffusion

    cfg = _load(args)
    res = train_diffusion(cfg, overwrite=args.overwrite, progress=not args.quiet)
    _finish_training("stage 2 (latent diffusion)", cfg.diffusion, res)
    return 0


def cmd_train_prior(args) -> int:
    from vqldm.priors.transformer.train import train_prior

    cfg = _load(args)
    res = train_prior(cfg, overwrite=args.overwrite, progress=not args.quiet)
    _finish_training("token prior (transformer)", cfg.prior, res)
    return 0


def _finish_training(title: str, stage, res) -> None:
    from vqldm import distributed as dist

    if dist.is_main():
        _print_paths(f"{title} finished: {res.epochs} epochs, {res.steps} steps", {
            "best checkpoint": res.best_path,
            "latest checkpoint": res.latest_path,
            "best val loss": f"{res.best_val_loss:.5g}",
            "TensorBoard": f"tensorboard --logdir {stage.logging.log_dir}",
        })
    dist.shutdown()


def cmd_sample(args) -> int:
    from vqldm.commands.sample import SampleOptions, sample_to_files
    from vqldm.priors.diffusion.covariates import parse_cond

    cfg = _load(args, check_paths=False)
    opts = SampleOptions(num_samples=args.num_samples, out_dir=Path(args.out), scheduler=args.scheduler,
                         steps=args.steps, seed=args.seed, batch_size=args.batch_size, fmt=args.format,
                         diffusion_checkpoint=args.diffusion_checkpoint, vqvae_checkpoint=args.vqvae_checkpoint,
                         shape=args.shape, snap=args.snap, use_ema=not args.no_ema, progress=not args.quiet,
                         overwrite=args.overwrite, prior=args.prior, prior_checkpoint=args.prior_checkpoint,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         class_name=args.class_name, guidance=args.guidance, autoguidance=args.autoguidance,
                         guide_checkpoint=args.guide_checkpoint, cond_volume=args.cond_volume,
                         cond=parse_cond(args.cond))
    res = sample_to_files(cfg, opts)
    from vqldm import distributed as dist

    if dist.is_main():
        _print_paths(f"{res['num_samples']} samples written:", {
            "volumes": f"{opts.out_dir}/sample_0000.{res['suffix']} ...",
            "preview": res["preview"], "record": res["record"]})
    dist.shutdown()
    return 0


def cmd_export_bundle(args) -> int:
    from vqldm.commands.bundle import export_bundle

    res = export_bundle(_load(args, check_paths=False), Path(args.out), args.diffusion_checkpoint,
                        args.vqvae_checkpoint, args.steps, args.seed, args.num_samples, args.overwrite)
    _print_paths("MONAI bundle written:", {
        "inference config": res["inference"], "metadata": res["metadata"],
        "models": ", ".join(str(m) for m in res["models"]),
        "run it": f"python -m monai.bundle run --config_file {res['inference']} --meta_file {res['metadata']} "
                  f"--bundle_root {args.out}"})
    return 0


def cmd_reconstruct(args) -> int:
    from vqldm.commands.reconstruct import ReconstructOptions, reconstruct_volumes

    cfg = _load(args, check_paths=False)
    opts = ReconstructOptions(volumes=Path(args.volumes), out_dir=Path(args.out),
                              vqvae_checkpoint=args.vqvae_checkpoint, overlap=args.overlap,
                              overwrite=args.overwrite, progress=not args.quiet)
    rec = reconstruct_volumes(cfg, opts)
    _print_paths(f"{len(rec['volumes'])} volumes reconstructed:", {
        "volumes": f"{opts.out_dir}/recon_*.nii.gz", "picture": opts.out_dir / "reconstruct.png",
        "record": opts.out_dir / "reconstruct.json"})
    return 0


def cmd_edit(args) -> int:
    from vqldm.commands import edit
    from vqldm.priors.diffusion.covariates import parse_cond

    cfg = _load(args, check_paths=False)
    opts = edit.EditOptions(out_dir=Path(args.out), steps=args.steps, seed=args.seed, snap=args.snap == "on",
                            overlap=args.overlap, diffusion_checkpoint=args.diffusion_checkpoint,
                            vqvae_checkpoint=args.vqvae_checkpoint, use_ema=not args.no_ema,
                            overwrite=args.overwrite, progress=not args.quiet, class_name=args.class_name,
                            guidance=args.guidance, autoguidance=args.autoguidance, cond=parse_cond(args.cond),
                            cond_volume=args.cond_volume)
    if args.edit == "interpolate":
        res = edit.interpolate(cfg, Path(args.a), Path(args.b), args.frames, opts, args.depth)
    elif args.edit == "sdedit":
        res = edit.sdedit(cfg, Path(args.input), args.strength, args.num_samples, opts)
    elif args.edit == "inpaint":
        res = edit.inpaint(cfg, Path(args.input), Path(args.mask), opts, edit.PaintOptions(args.feather, args.resample))
    else:
        res = edit.outpaint(cfg, Path(args.input), args.pad, opts, edit.PaintOptions(args.feather, args.resample))
    _print_paths(f"edit {args.edit} written:", res)
    return 0


def cmd_evaluate(args) -> int:
    from vqldm.commands.evaluate import evaluate

    cfg = _load(args, check_paths=False)
    if args.points:
        from vqldm.commands.evaluate_points import evaluate_points

        res = evaluate_points(cfg, Path(args.out), Path(args.points),
                              Path(args.real_points) if args.real_points else None, seed=cfg.seed)
        _print_paths("localisation evaluation written:", {"metrics": res["metrics_path"],
                                                          "report": res["report_path"]})
        if not args.samples:
            return 0
    res = evaluate(cfg, Path(args.out), samples=[Path(d) for d in args.samples or []] or None,
                   vqvae_checkpoint=args.vqvae_checkpoint, progress=not args.quiet)
    _print_paths("evaluation written:", {"metrics": res["metrics_path"], "report": res["report_path"]})
    return 0


def cmd_score(args) -> int:
    from vqldm.commands.score import score_volumes

    cfg = _load(args, check_paths=False)
    res = score_volumes(cfg, Path(args.volumes), Path(args.out), args.prior_checkpoint, progress=not args.quiet)
    _print_paths(f"{len(res['scores'])} volumes scored:", {"scores": res["csv"], "record": res["json"],
                                                          "maps": f"{args.out}/nll_*.nii.gz"})
    return 0


def cmd_demo(args) -> int:
    from vqldm.commands.demo import run_demo

    run_demo(Path(args.out), progress=not args.quiet, overwrite=args.overwrite, device=args.device,
             preset=args.preset)
    return 0


def cmd_benchmark(args) -> int:
    from vqldm.commands.benchmark import run_benchmark

    run_benchmark(smoke=args.smoke, device=args.device, only=args.only, sweep=args.sweep, compile_=not args.no_compile)
    return 0


# ------------------------------------------------------------------------------------ parser
def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write synthetic SMLM microtubule volumes (the built-in data set)",
                       description="Synthesise 3D SMLM-like microtubule volumes: worm-like-chain filaments, "
                                   "localisations with anisotropic precision, voxelised to [0,1] density. Writes "
                                   "OUT/train/*.nii.gz, OUT/val/*.nii.gz, OUT/ground_truth.json and OUT/labels.csv "
                                   "(each volume's filament count, mean persistence length and foreground "
                                   "fraction, for data.labels_file and diffusion.covariates).")
    s.add_argument("--out", required=True, help="output folder (must not already hold volumes)")
    s.add_argument("--num-train", type=int, default=16, help="training volumes (default 16)")
    s.add_argument("--num-val", type=int, default=4, help="validation volumes (default 4)")
    s.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default 64 64 64)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    s.add_argument("--locs", action="store_true",
                   help="also write each volume's ground-truth localisations (inside the field of view) as "
                        "OUT/locs/train/*.csv and OUT/locs/val/*.csv")
    s.add_argument("--vary", choices=["density", "stiffness"], default=None,
                   help="draw classes (volume i at level i mod N; OUT/labels.csv names each volume's level): "
                        "density varies the number of filaments per volume (3 levels: 4-6, 10-15, 25-35 "
                        "filaments), stiffness their persistence length (3 levels around 2, 9 and 40 um)")
    s.add_argument("--levels", type=int, default=None, metavar="N", help="with --vary: how many levels, 2 to 4 (e.g. 3)")
    s.set_defaults(func=cmd_synth)


def _add_voxelize(sub) -> None:
    s = sub.add_parser("voxelize", help="localisation tables (CSV x [nm],y [nm],z [nm] or HDF5) to volumes",
                       description="Voxelise SMLM localisation tables onto one grid defined in nm. Writes "
                                   "OUT/train/*.nii.gz and OUT/val/*.nii.gz (spacing in micron) and "
                                   "OUT/dataset_info.json (grid, method, density scale, per-file records). "
                                   "Intensities share one density scale across the data set, so "
                                   "`vqldm points` restores localisations at the real density.")
    s.add_argument("--input", required=True, help="a table, or a folder of *.csv / *.h5 / *.hdf5 tables")
    s.add_argument("--out", required=True, help="output folder (must not already hold a data set)")
    s.add_argument("--method", default="gaussian", choices=["occupancy", "counts", "gaussian"],
                   help="voxel value: any localisation (occupancy), localisations per voxel (counts) or "
                        "counts blurred by a Gaussian (gaussian; default)")
    s.add_argument("--sigma-nm", type=float, nargs="+", default=None, metavar="NM",
                   help="gaussian: blur sigma in nm, one value or x y z (default: 1.5 voxels per axis)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--voxel-size", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel size in nm")
    g.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="grid shape in voxels")
    s.add_argument("--fov", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="field of view in nm from --origin (default: the bounding box of all tables)")
    s.add_argument("--origin", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="corner of the field of view in nm (default: 0 0 0 with --fov, else the tables' minimum)")
    s.add_argument("--padding", type=float, nargs=3, default=[0.0, 0.0, 0.0], metavar=("X", "Y", "Z"),
                   help="margin in nm added on each side of the field of view (default 0 0 0)")
    s.add_argument("--per-file-origin", action="store_true",
                   help="shift each table so its own minimum is the origin (recorded; `vqldm points` undoes it)")
    s.add_argument("--drop-outside", action="store_true",
                   help="drop localisations outside the field of view (counted) instead of refusing the table")
    s.add_argument("--scale", default="p99.9", metavar="RULE",
                   help="localisations per unit intensity: pNN.N, a percentile of the data set's occupied voxels "
                        "(default p99.9: filaments at trainable intensities; the densest voxels keep values above 1, "
                        "which training clips), peak (all within [0, 1]) or a number")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of tables for val/ (default 0.2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    s.add_argument("--key", default=None, help="HDF5 dataset name (default: the file's only dataset)")
    s.set_defaults(func=cmd_voxelize)


def _add_points(sub) -> None:
    s = sub.add_parser("points", help="volumes (real or generated) back to localisation tables in nm",
                       description="Draw localisations from each volume in proportion to voxel intensity, with "
                                   "uniform sub-voxel jitter, on the grid of the data set's dataset_info.json "
                                   "(or a samples.json that recorded it). Writes OUT/<name>.csv (x [nm],y [nm],"
                                   "z [nm]) and OUT/points.json. The number of points per volume comes from "
                                   "the recorded density scale unless --points is given.")
    s.add_argument("--volumes", required=True, help="folder of volumes")
    s.add_argument("--out", required=True, help="output folder for the tables (earlier ones are archived)")
    s.add_argument("--info", default=None, help="the dataset_info.json of the data set (default: looked up)")
    s.add_argument("--points", type=int, default=None, metavar="N", help="a fixed number of points per volume")
    s.add_argument("--threshold", type=float, default=0.0, help="voxels at or below this are empty (default 0)")
    s.add_argument("--seed", type=int, default=0, help="volume i draws from seed (seed, i) (default 0)")
    s.set_defaults(func=cmd_points)


def _add_check(sub) -> None:
    s = sub.add_parser("check", help="validate a config and its data; print latent shape and parameter counts",
                       description="Validate the config and the data (file count, shapes, dtypes, spacing, "
                                   "intensity range); print the latent shape (embedding_dim, x, y, z) and the "
                                   "parameter counts of both networks.")
    _add_config(s)
    s.add_argument("--json", action="store_true", help="print one JSON object (holds latent_shape)")
    s.set_defaults(func=cmd_check)


def _add_config_cmd(sub) -> None:
    s = sub.add_parser("config", help="print a config (also one written for the upstream scripts) in vqldm's keys",
                       description="Load the config as every command does (the upstream scripts' keys translated, "
                                   "one line each on stderr; --set applied; validated) and print the whole resolved "
                                   "config in vqldm's own keys, or write it with --out. See docs/migration.md.")
    _add_config(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--print", action="store_true", help="print the resolved config as YAML on stdout")
    g.add_argument("--out", default=None, metavar="NEW.yaml", help="write the resolved config to this file")
    s.set_defaults(func=cmd_config)


def _add_import(sub) -> None:
    s = sub.add_parser("import-checkpoint", help="turn the upstream scripts' checkpoints into vqldm checkpoints",
                       description="Convert the checkpoints of the upstream train_vqvae.py ({epoch, vqvae_state_dict, "
                                   "...}) and train_diffusion.py ({..., unet_state_dict, scale_factor}) into vqldm's "
                                   "self-describing ones: OUT/vqvae_checkpoints/best_model.pt, "
                                   "OUT/diffusion_checkpoints/best_model.pt and OUT/config.yaml in vqldm's keys, which "
                                   "`vqldm sample --config OUT/config.yaml` uses as it is. The networks' arguments "
                                   "come from the upstream config; the files load with weights_only=True. See "
                                   "docs/migration.md.")
    _add_config(s)
    s.add_argument("--vqvae-checkpoint", required=True, metavar="A.pt", help="the upstream stage-1 checkpoint")
    s.add_argument("--diffusion-checkpoint", default=None, metavar="B.pt",
                   help="the upstream stage-2 checkpoint, trained on A.pt's VQ-VAE (optional)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import in DIR (its files are moved to previous_<time>/)")
    s.set_defaults(func=cmd_import_checkpoint)


def _add_train(sub) -> None:
    for name, fn, what, out in (
            ("train-vqvae", cmd_train_vqvae, "stage 1: train the VQ-VAE", "vqvae.checkpoints.output_dir"),
            ("train-diffusion", cmd_train_diffusion, "stage 2: train the latent diffusion UNet on the frozen VQ-VAE",
             "diffusion.checkpoints.output_dir"),
            ("train-prior", cmd_train_prior, "stage 2, token prior: train a transformer on the frozen VQ-VAE's code "
             "indices", "prior.checkpoints.output_dir")):
        s = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}. Writes best_model.pt and "
                           f"latest_checkpoint.pt under {out}, TensorBoard logs under the stage's logging.log_dir. "
                           f"Resume with --set {out.split('.')[0]}.checkpoints.resume_from=PATH (or =latest: this "
                           f"output_dir's own checkpoint, if any). The stage's training section sets the "
                           f"learning-rate schedule, gradient accumulation, step checkpoints and the max_steps / "
                           f"max_time_minutes stops. Works under torchrun for several GPUs.")
        _add_config(s)
        s.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output_dir that holds checkpoints (they are moved to previous_*/)")
        s.set_defaults(func=fn)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="generate new volumes from the trained networks",
                       description="Denoise fresh noise with the stage-2 UNet (EMA weights), or with --prior "
                                   "transformer draw code grids token by token from the token prior, and decode with "
                                   "the stage-1 VQ-VAE. Writes OUT/sample_0000.nii.gz ..., OUT/preview.png (MIP grid) "
                                   "and OUT/samples.json. Each file has the training data's voxel spacing and unit "
                                   "(after data.voxel_resize), as the checkpoints record them. The same seed gives "
                                   "the same files.")
    _add_config(s)
    s.add_argument("--num-samples", "-n", type=int, default=8, help="volumes to generate (default 8)")
    s.add_argument("--out", required=True, help="output folder")
    from vqldm.sampling.samplers import SAMPLERS

    s.add_argument("--scheduler", choices=sorted(SAMPLERS), default=None,
                   help="sampler (default: diffusion.sampler, else ddim for a DDPM-trained model and rflow for a "
                        "rectified-flow one); ddpm with fewer steps than training is ancestral DDIM (eta 1); dpmpp_2m: "
                        "DPM-Solver++(2M), deterministic, for few steps (5 to 10) on a DDPM-trained model")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: logging.num_inference_steps)")
    s.add_argument("--seed", type=int, default=0, help="sample i's noise is seeded by (seed, i) (default 0)")
    s.add_argument("--batch-size", type=int, default=8, help="volumes denoised at once (default 8)")
    s.add_argument("--format", choices=["nifti", "tiff", "ome-tiff", "points"], default="nifti",
                   help="output format: nifti (.nii.gz, xyzt_units), tiff (ImageJ .tif: unit, spacing, X/Y "
                        "resolution) or ome-tiff (.ome.tif: PhysicalSizeX/Y/Z and units); every file carries the "
                        "training data's voxel size in its unit; points: NIfTI plus sample_*.csv localisations "
                        "(x [nm],y [nm],z [nm]) at the training data's density (needs a stage 1 trained on a "
                        "`vqldm voxelize` data set) (default nifti)")
    _add_checkpoints(s)
    s.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="output volume size in voxels (default: the training patch size); beyond it the UNet "
                        "runs on overlapping training-size latent tiles blended every step (MultiDiffusion) and "
                        "the decoder on windows, so memory stays about one tile's")
    s.add_argument("--snap", choices=["on", "off"], default=None,
                   help="snap the denoised latent to the codebook before decoding (default: diffusion.snap_to_codebook)")
    s.add_argument("--no-ema", action="store_true", help="use the raw rather than the EMA weights")
    s.add_argument("--prior", choices=["diffusion", "transformer"], default="diffusion",
                   help="which trained prior samples the latent (default diffusion)")
    s.add_argument("--prior-checkpoint", default=None,
                   help="transformer: token-prior checkpoint (default: prior.checkpoints.output_dir/best_model.pt)")
    s.add_argument("--temperature", type=float, default=None,
                   help="transformer: divide the logits by this (default: prior.temperature)")
    s.add_argument("--top-k", type=int, default=None, help="transformer: keep the k likeliest codes (default: prior.top_k)")
    s.add_argument("--top-p", type=float, default=None,
                   help="transformer: keep the smallest set of codes holding this probability (default: prior.top_p)")
    _add_sample_conditions(s)
    s.add_argument("--overwrite", action="store_true", help="replace sample files already in --out")
    s.set_defaults(func=cmd_sample)


def _add_sample_conditions(s) -> None:
    """``vqldm sample``'s steering options: conditions and guidance (either prior), autoguidance (diffusion)."""
    s.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="class-conditional prior, diffusion or token (trained with data.labels_file or "
                        "data.class_folders): sample this class (default: the null class, unconditional); an "
                        "unconditional model refuses it")
    s.add_argument("--cond", action="append", default=None, metavar="KEY=VALUE",
                   help="prior trained with diffusion.covariates or prior.covariates: sample at this covariate "
                        "value, in the labels file's units (repeat for several; a covariate left out is unconstrained); a value "
                        "outside the training range is warned about")
    s.add_argument("--cond-volume", default=None, metavar="FILE",
                   help="coarse-to-fine model (trained with diffusion.coarse_condition): every sample matches this "
                        "volume's coarse view (its block means over the VQ-VAE's stride, or with coarse_view "
                        "projection their mean along z) and differs in the fine detail; a volume of the training "
                        "patch size, or for a projection model also an (X, Y, 1) image (default: unconditional)")
    s.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance with --class (either prior), --cond or --cond-volume: uncond + W "
                        "(cond - uncond), on the diffusion prior's predictions (uncond: every condition dropped) or "
                        "the token prior's logits; 0: unconditional, 1: conditional (default 1), above 1: stronger")
    s.add_argument("--autoguidance", type=float, default=None, metavar="W",
                   help="diffusion: guide + W (model - guide) at timesteps >= diffusion.autoguidance.min_timestep, "
                        "the guide being an early snapshot of the same run (guide_model.pt, kept when training with "
                        "diffusion.autoguidance.guide_epoch); 1: plain sampling "
                        "(default: diffusion.autoguidance.weight)")
    s.add_argument("--guide-checkpoint", default=None, metavar="PATH",
                   help="diffusion: the autoguidance guide, any diffusion checkpoint on the same stage 1 and data "
                        "(default: the guide_model.pt that the diffusion checkpoint's run kept)")


def _add_export_bundle(sub) -> None:
    s = sub.add_parser("export-bundle", help="the trained pair as a MONAI bundle that samples with MONAI alone",
                       description="Write a MONAI bundle (configs/inference.json, configs/metadata.json, models/*.pt "
                                   "plain state dicts) that `python -m monai.bundle run` runs with MONAI's own VQVAE, "
                                   "DiffusionModelUNet, DDIM scheduler and LatentDiffusionInferer, writing the "
                                   "volumes `vqldm sample --scheduler ddim` writes for the same seed and steps. "
                                   "Models with per-channel latent normalisation, an intensity calibration, "
                                   "snapping off or the rflow objective are refused (docs/bundle.md).")
    _add_config(s)
    s.add_argument("--out", required=True, help="bundle folder")
    _add_checkpoints(s)
    s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: logging.num_inference_steps)")
    s.add_argument("--seed", type=int, default=0, help="the bundle's default seed (default 0)")
    s.add_argument("--num-samples", "-n", type=int, default=4, help="the bundle's default number of volumes (default 4)")
    s.add_argument("--overwrite", action="store_true", help="move an earlier bundle in --out aside first")
    s.set_defaults(func=cmd_export_bundle)


def _add_reconstruct(sub) -> None:
    s = sub.add_parser("reconstruct", help="encode and decode volumes of any size with the VQ-VAE (sliding window)",
                       description="Encode and decode each volume with the stage-1 VQ-VAE one training-patch window "
                                   "at a time (MONAI sliding_window_inference): the windows' pre-quantisation latents "
                                   "are Gaussian-blended and quantised once, so neighbouring windows agree on every "
                                   "code, then decoded window by window and blended again. Volumes must have the "
                                   "training data's voxel spacing. Writes OUT/recon_<name>.nii.gz (the input's "
                                   "spacing, unit and affine), OUT/reconstruct.png (input over reconstruction MIPs) "
                                   "and OUT/reconstruct.json (PSNR per volume).")
    _add_config(s)
    s.add_argument("--volumes", required=True, help="folder of volumes (.nii, .nii.gz, .tif, .tiff, .ome.tif)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--vqvae-checkpoint", default=None,
                   help="stage-1 checkpoint (default: vqvae.checkpoints.output_dir/best_model.pt)")
    s.add_argument("--overlap", type=float, default=0.25,
                   help="share of a window that its neighbour covers, rounded to the latent grid (default 0.25)")
    s.add_argument("--overwrite", action="store_true", help="move earlier outputs in --out to previous_<time>/")
    s.set_defaults(func=cmd_reconstruct)


def _edit_common(s) -> None:
    _add_config(s)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps of the whole chain (default 50)")
    s.add_argument("--seed", type=int, default=0, help="seed of any noise the edit draws (default 0)")
    s.add_argument("--snap", choices=["on", "off"], default="on",
                   help="snap the edited latent to the codebook before decoding (default on)")
    s.add_argument("--overlap", type=float, default=0.25,
                   help="sliding-window overlap for encoding and decoding (default 0.25)")
    _add_checkpoints(s)
    s.add_argument("--no-ema", action="store_true", help="use the raw rather than the EMA weights")
    s.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="class-conditional model: edit towards this class (default: the null class, unconditional)")
    s.add_argument("--cond", action="append", default=None, metavar="KEY=VALUE",
                   help="model trained with diffusion.covariates: edit towards this covariate value (repeatable)")
    s.add_argument("--cond-volume", default=None, metavar="FILE",
                   help="coarse-to-fine model: the edit follows this patch-sized volume's coarse view (or projection)")
    s.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance with --class, --cond or --cond-volume: uncond + W (cond - uncond) "
                        "(default 1)")
    s.add_argument("--autoguidance", type=float, default=1.0, metavar="W",
                   help="autoguidance by the guide the run kept, at timesteps >= diffusion.autoguidance.min_timestep "
                        "(default 1: the model alone, whatever the config says)")
    s.add_argument("--overwrite", action="store_true", help="move earlier outputs in --out to previous_<time>/")
    s.set_defaults(func=cmd_edit)


def _add_edit(sub) -> None:
    s = sub.add_parser("edit", help="edit volumes with the diffusion prior: interpolate, sdedit, inpaint, outpaint",
                       description="Edit existing volumes with the trained diffusion prior (a model trained with "
                                   "the ddpm objective). Inputs must have the training data's voxel spacing and a "
                                   "shape the networks decode to. Each edit writes volumes with the input's "
                                   "spacing, unit and affine, a MIP picture and a JSON record. See docs/editing.md.")
    e = s.add_subparsers(dest="edit", metavar="EDIT")
    e.required = True
    i = e.add_parser("interpolate", help="frames between two volumes (DDIM inversion, slerp, regeneration)",
                     description="Encode A and B, invert each latent with deterministic DDIM to the timestep at "
                                 "--depth x T (1: all the way to its noise), slerp the two there and regenerate "
                                 "each frame from that timestep with the same DDIM chain; frame 0 is A's VQ-VAE "
                                 "reconstruction, frame N B's. Writes OUT/frame_0000.nii.gz ... frame_N, "
                                 "OUT/frame.png (A and B, then the frames in rows of five) and "
                                 "OUT/frame.json (depth, foreground fraction per frame, end-frame PSNR).")
    i.add_argument("--a", required=True, help="first volume")
    i.add_argument("--b", required=True, help="last volume (the same shape as --a)")
    i.add_argument("--frames", type=int, default=8, help="N: writes frames 0..N (default 8)")
    i.add_argument("--depth", type=float, default=None,
                   help="how far to invert, in (0, 1]: the share of the noise schedule (1: to pure noise; "
                        "smaller keeps the frames nearer the data) (default 0.4)")
    _edit_common(i)
    d = e.add_parser("sdedit", help="variants of a volume: noise its latent part way and denoise (SDEdit)",
                     description="Noise the input's latent to strength x T with seeded noise and denoise it with "
                                 "DDIM: a small strength keeps the input's layout, 1 draws a new sample. Writes "
                                 "OUT/sdedit_0000.nii.gz ..., OUT/sdedit.png (input and its reconstruction over "
                                 "the variants) and OUT/sdedit.json.")
    d.add_argument("--input", required=True, help="the volume to edit")
    d.add_argument("--strength", type=float, default=0.5, help="noise level in (0, 1] (default 0.5)")
    d.add_argument("--num-samples", "-n", type=int, default=4, help="variants to draw (default 4)")
    _edit_common(d)
    p = e.add_parser("inpaint", help="regenerate a masked region of a volume (RePaint on DDIM)",
                     description="Regenerate the voxels where --mask is nonzero: the mask is dilated to the latent "
                                 "grid, the latent is regenerated there (RePaint: the rest is pasted back at every "
                                 "step's noise level) and the decoded region is feathered back into the input over "
                                 "--feather voxels; every voxel outside the feathered mask keeps its input value. "
                                 "Writes OUT/inpaint_0000.nii.gz, OUT/inpaint.png (input | feathered mask | "
                                 "result) and OUT/inpaint.json.")
    p.add_argument("--input", required=True, help="the volume to edit")
    p.add_argument("--mask", required=True, help="a volume of the input's shape; nonzero voxels are regenerated")
    _paint_common(p)
    o = e.add_parser("outpaint", help="extend a volume beyond its borders (inpainting a padded volume)",
                     description="Pad the input by PX PY PZ voxels on both sides of each axis and generate the new "
                                 "border as inpaint does; the input's voxels more than --feather voxels inside its border are kept "
                                 "exactly. Writes "
                                 "OUT/outpaint_0000.nii.gz (the affine shifted to the new origin), OUT/outpaint.png "
                                 "and OUT/outpaint.json.")
    o.add_argument("--input", required=True, help="the volume to extend")
    o.add_argument("--pad", type=int, nargs=3, required=True, metavar=("PX", "PY", "PZ"),
                   help="voxels to add on each side of each axis (the result must be a shape the networks take)")
    _paint_common(o)


def _paint_common(s) -> None:
    s.add_argument("--feather", type=int, default=2, help="voxels over which the new region blends in (default 2)")
    s.add_argument("--resample", type=int, default=2, help="RePaint redos per step; 1: none (default 2)")
    _edit_common(s)


def _add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="stage-1 reconstruction metrics and generation statistics with a report",
                       description="Stage 1 on the validation set: PSNR, SSIM, foreground Dice, codebook usage and "
                                   "perplexity. With --samples: compare generated with real volumes (foreground "
                                   "fraction, filament length, components, orientation, intensities, segment "
                                   "straightness and length) against the real-vs-real floor, plus diversity and MMD, "
                                   "each ratio with its 5th-95th percentile over 100 bootstrap redraws of the samples "
                                   "and the share of redraws that pass; then the same for real training volumes and "
                                   "their stage-1 reconstructions, naming the stage that limits each statistic. "
                                   "Writes OUT/metrics.json, "
                                   "OUT/report.md and pictures (stages.png: real | reconstruction | sample). "
                                   "--samples given more than once (say, the diffusion and the token prior's samples "
                                   "of one stage 1) compares them side by side: one table of ratios to the same "
                                   "floor (real train | reconstructions | each folder, named from its "
                                   "samples.json), priors.png, and each folder's full report in OUT/prior_<i>/. "
                                   "Folders whose samples.json names another stage-1 checkpoint are refused. "
                                   "Folders of class-conditional samples (vqldm sample --class) are each judged "
                                   "against the held-out volumes of their class (data.labels_file), with the "
                                   "condition accuracy: metrics.json per_class, a Per class table, classes.png. "
                                   "With --points: compare generated with real localisation tables (counts per "
                                   "region, nearest-neighbour distances, Chamfer distance) against their floor; "
                                   "writes OUT/points_metrics.json, OUT/points_report.md and OUT/points.png "
                                   "(alone, --points skips the stage-1 part).")
    _add_config(s)
    s.add_argument("--out", required=True, help="output folder for metrics.json, report.md and pictures")
    s.add_argument("--samples", action="append", default=None, metavar="DIR",
                   help="folder of generated volumes to compare with the real ones; repeat it to compare "
                        "several priors on the same stage 1 side by side, or the folders of several classes")
    s.add_argument("--points", default=None, help="folder of generated localisation CSVs to compare with real ones")
    s.add_argument("--real-points", default=None,
                   help="folder of real localisation CSVs (default: data.val_data_dir's volumes through "
                        "`vqldm points`, with their dataset_info.json)")
    s.add_argument("--vqvae-checkpoint", default=None,
                   help="stage-1 checkpoint (default: diffusion.checkpoints.vqvae_path if it exists, "
                        "else vqvae.checkpoints.output_dir/best_model.pt)")
    s.set_defaults(func=cmd_evaluate)


def _add_score(sub) -> None:
    s = sub.add_parser("score", help="token-prior likelihood of each volume, with a per-voxel map (anomalies)",
                       description="Encode each volume to its code grid and score every code with the token "
                                   "prior: OUT/nll_<name>.nii.gz (negative log-likelihood in nats, each token's "
                                   "value over its block of voxels) and OUT/scores.csv / scores.json (mean nats "
                                   "and bits per token, 99th-percentile token). High scores mark regions unlike "
                                   "the training data. Volumes must have the prior's patch size.")
    _add_config(s)
    s.add_argument("--volumes", required=True, help="folder of volumes to score")
    s.add_argument("--out", required=True, help="output folder for the maps and scores")
    s.add_argument("--prior-checkpoint", default=None,
                   help="token-prior checkpoint (default: prior.checkpoints.output_dir/best_model.pt)")
    s.set_defaults(func=cmd_score)


def _add_demo(sub) -> None:
    s = sub.add_parser("demo", help="the whole pipeline on built-in synthetic microtubules (CPU: under 10 min)",
                       description="Synthesise microtubule volumes, train stage 1 and stage 2 with a CPU-sized "
                                   "config, sample, evaluate, and print where the volumes, pictures and metrics are.")
    s.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: GPU when present")
    s.add_argument("--overwrite", action="store_true", help="reuse an existing demo folder (old results are moved)")
    s.add_argument("--preset", choices=["demo", "microtubules"], default="demo",
                   help="demo: CPU-sized, 48x48x24 (default); microtubules: the 96x96x48 config, for a GPU")
    s.set_defaults(func=cmd_demo)


def _add_benchmark(sub) -> None:
    s = sub.add_parser("benchmark", help="speed: the reference loops vs vqldm's, side by side",
                       description="Time the original-README-style reference loops and vqldm's own for the same "
                                   "networks and batches; print one JSON line per metric with reference, vqldm and "
                                   "ratio (peak GPU memory too), including stage 2 at its fastest batch size and the "
                                   "few-step sampler (dpmpp_2m, 10 steps) against the reference's DDIM 50; then the "
                                   "engine's overhead over a bare loop, the "
                                   "data loader's patches/s against the stage-1 step's volumes/s, and the token "
                                   "prior's cached sampler against a full-prefix rerun per token.")
    s.add_argument("--smoke", action="store_true", help="CPU-sized networks (minutes on a CPU)")
    s.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    s.add_argument("--only", default="",
                   help="comma-separated parts to run (default all): stage1_train_volumes_per_s, "
                        "stage2_train_latents_per_s, stage2_best_batch_latents_per_s, sample_volumes_per_s, "
                        "few_step_sample_volumes_per_s, engine_overhead, data_pipeline, token_sampling_tokens_per_s")
    s.add_argument("--no-compile", action="store_true",
                   help="vqldm's side without torch.compile (device.compile's default; no compilation minute)")
    s.add_argument("--sweep", action="store_true",
                   help="on a GPU, also time vqldm's loops under each combination of the speed switches "
                        "(torch.compile, CUDA graphs, channels_last_3d): one 'sweep' line each")
    s.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqldm",
        description="3D VQ-latent diffusion on MONAI: stage 1 compresses volumes into a VQ-VAE codebook latent, "
                    "stage 2 learns that latent with a diffusion UNet; sampling decodes new volumes.",
        epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"vqldm {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_synth, _add_voxelize, _add_points, _add_check, _add_config_cmd, _add_train, _add_import,
                _add_sample, _add_reconstruct, _add_edit, _add_export_bundle, _add_evaluate, _add_score, _add_demo,
                _add_benchmark):
        add(sub)
    return p


def _user_error(exc: BaseException) -> VqldmError | None:
    """A VqldmError anywhere in the cause chain (MONAI wraps transform errors in RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, VqldmError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="vqldm: %(message)s", stream=sys.stderr)
    logging.getLogger("vqldm").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vqldm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into messages
        if args.debug:
            raise
        from vqldm import distributed as dist

        user = _user_error(e)
        if user is None and isinstance(e, OSError) and e.filename:
            # the file system refused (an existing file where a folder goes, no permission, disk full)
            user = VqldmError(f"{e.filename}: {e.strerror or e.__class__.__name__}")
        if user is not None:
            if dist.is_main():  # under torchrun every rank fails alike: say it once
                print(f"vqldm: error: {user}", file=sys.stderr)
            return 2
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"\nvqldm: internal error: {e.__class__.__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def console() -> None:
    """The ``vqldm`` command (console script and ``python -m vqldm``). A torchrun rank ends through
    :func:`vqldm.distributed.exit_process`: its process group is gone and its files are written."""
    code = main()
    from vqldm import distributed as dist

    if dist.launched_by_torchrun():
        dist.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
