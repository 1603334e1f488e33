"""The figures of docs/editing.md, measured on a trained run (CONFIG: both stages' checkpoints).

reconstruct: synthetic volumes four training patches wide (and 4 x 4 patches) at the training
voxel size, each reconstructed whole (one encoder/decoder call, where it fits) and by sliding
window (``vqldm reconstruct``'s path). Prints the PSNR of each against the input and the seam ratio
(:func:`vqldm.metrics.reconstruction.seam_ratio`: the mean step across window borders over that
across every other plane) of the windowed reconstruction, the whole one and the input at the same
planes; with few filaments per plane the input's own ratio strays from 1, so the three are compared.

invert: held-out volumes (``data.val_data_dir``) encoded, DDIM-inverted and regenerated with the same
chain (``--steps``); PSNR of the regenerated (snapped) volume against the VQ-VAE reconstruction.

interpolate: ``vqldm edit interpolate`` (``--depth``, default the command's) between the held-out volume
with the i-th lowest and the one with the i-th highest foreground fraction, ``--frames`` frames; the
share of consecutive frame pairs (steps) whose foreground fraction moves towards B's (or stays), the
share of PAIRS whose whole series is monotone (every step towards B, or back by at most
``--tolerance`` x the pair's difference |B - A|; default 1 %), each also over the pairs whose
fractions differ by >= 30 %, and the end frames' PSNR against the inputs' reconstructions.

sdedit: ``vqldm edit sdedit`` of held-out volumes at strengths 0.2 ... 1: PSNR of the variants against
the input's reconstruction and their share of the input's codes.

inpaint: ``vqldm edit inpaint`` of the central box (half the patch per axis) of held-out volumes:
the foreground fraction inside the box against the 5-95 % range of real volumes' (train and val)
in the same box, and the voxels changed outside the feathered mask (must be 0).

tiled: ``vqldm sample --shape`` of 4 x 4 training patches (tiled latent sampling, sliding-window
decoding): peak memory over one training-size sample's, each in a fresh process (2 DDIM steps; the
UNet on the whole latent for contrast), as live tensor bytes (the profiler's memory timeline on a CPU,
``max_memory_allocated`` on a GPU) with and beyond the loaded networks, and as resident set beyond
them; and the seam ratio at the tile borders of ``--n`` samples.

usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/edit_figures.py --config CONFIG \
           --part reconstruct|invert|interpolate|sdedit|inpaint|tiled [--n 8] [--steps 50] [--frames 8]
           [--depth D] [--tolerance 0.01]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from vqldm.commands.edit import EditOptions, PaintOptions, psnr_of, inpaint, interpolate, load_editor, sdedit
from vqldm.commands.reconstruct import load_stage1, reconstruct_one
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.config import load_config
from vqldm.latents import LatentNorm, encode
from vqldm.metrics.reconstruction import psnr, seam_ratio
from vqldm.sampling.decode import decode_latents
from vqldm.sampling.edit import ddim_from, ddim_invert
from vqldm.sampling.window import window_borders
from vqldm.synth.microtubules import MicrotubuleParams, synth_volume


def wide_volume(patch: list[int], tiles: list[int], seed: int) -> np.ndarray:
    """A synthetic volume ``tiles`` patches wide at the demo data's voxel size (8000 x 8000 x 300 nm
    per 48 x 48 x 24 patch), with filaments in proportion to its area."""
    shape = tuple(p * t for p, t in zip(patch, tiles))
    area = tiles[0] * tiles[1]
    p = MicrotubuleParams(fov_nm=(8000.0 * tiles[0], 8000.0 * tiles[1], 300.0 * tiles[2]),
                          n_filaments=(5 * area, 15 * area))
    return synth_volume(shape, np.random.default_rng(seed), p)[0]


def reconstruct_part(cfg, n: int, **_) -> dict:
    s1 = load_stage1(cfg, None)
    out = {}
    for tiles in ([4, 1, 1], [4, 4, 1]):
        rows = []
        for seed in range(n):
            vol = wide_volume(s1.patch, tiles, seed)
            x = torch.from_numpy(vol)[None, None]
            whole = decode_latents(s1.vqvae, encode(s1.vqvae, s1.to_network(vol), s1.rt), LatentNorm(1.0),
                                   s1.intensity_range, False, s1.rt.autocast, s1.ckpt.get("intensity_calibration"))
            win = torch.from_numpy(reconstruct_one(s1, vol, 0.25))[None, None]
            b = window_borders(list(vol.shape), s1.patch, s1.stride)
            rows.append([float(psnr(whole, x)), float(psnr(win, x)), seam_ratio(win[0, 0], b),
                         seam_ratio(whole[0, 0], b), seam_ratio(vol, b)])
        r = np.array(rows)
        out["x".join(map(str, tiles)) + " patches"] = {
            "shape": list(vol.shape), "volumes": n, "psnr_whole_db": r[:, 0].mean(), "psnr_window_db": r[:, 1].mean(),
            "psnr_window_minus_whole_db": (r[:, 1] - r[:, 0]).mean(),
            "max_abs_psnr_difference_db": np.abs(r[:, 1] - r[:, 0]).max(),
            "seam_ratio_window": r[:, 2].mean(), "seam_ratio_whole": r[:, 3].mean(), "seam_ratio_input": r[:, 4].mean()}
    return out


def invert_part(cfg, n: int, steps: int, **_) -> dict:
    ed = load_editor(cfg, EditOptions(out_dir=Path("."), steps=steps, progress=False))
    rows = []
    for f in list_volumes(cfg.data.val_data_dir)[:n]:
        _, unit, z0 = ed.latent(f, "volume")
        den = ed.pipe.denoiser()
        z = ddim_from(den, ddim_invert(den, z0, steps, ed.pipe.schedule), steps, ed.pipe.schedule)
        rows.append(psnr_of(ed.decode(z)[0], ed.decode(z0)[0]))
    return {"volumes": len(rows), "steps": steps, "psnr_vs_reconstruction_db": rows, "min_db": min(rows)}


def interpolate_part(cfg, n: int, steps: int, frames: int, depth: float | None = None, tolerance: float = 0.01,
                     **_) -> dict:
    files = list_volumes(cfg.data.val_data_dir)
    fg = [float((read_volume(f).array > 0.1).mean()) for f in files]
    order = np.argsort(fg)
    pairs, ends = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            a, b = files[order[i]], files[order[-1 - i]]
            opts = EditOptions(out_dir=Path(tmp) / str(i), steps=steps, progress=False)
            r = json.loads(Path(interpolate(cfg, a, b, frames, opts, depth)["record"]).read_text())
            ends += [r["psnr_frame0_vs_a_reconstruction_db"], r["psnr_last_frame_vs_b_reconstruction_db"]]
            pairs.append({"a": a.name, "b": b.name, "foreground_fraction": r["foreground_fraction"]})
            depth = r["depth"]
    return {"pairs": pairs, "frames": frames, "steps": steps, "depth": depth, **monotony(pairs, tolerance),
            "end_frame_psnr_min_db": min(ends)}


def monotony(pairs: list[dict], tolerance: float) -> dict:
    """Each pair's steps (frame to frame) towards B's foreground fraction, and whether its whole series
    is monotone: every step moves towards B or falls back by at most ``tolerance`` x |B - A| (the end
    frames' fractions). Adds ``relative_difference``, ``monotone_share`` and ``monotone`` to each pair."""
    moving = []
    for p in pairs:
        f = np.asarray(p["foreground_fraction"])
        d = np.diff(f) * np.sign(f[-1] - f[0])
        moving += list(d >= 0)
        p["relative_difference"] = float(abs(f[-1] - f[0]) / max(min(f[0], f[-1]), 1e-9))
        p["monotone_share"] = float((d >= 0).mean())
        p["monotone"] = bool((d >= -tolerance * abs(f[-1] - f[0])).all())
    distinct = [p for p in pairs if p["relative_difference"] >= 0.3]
    return {"monotone_share": float(np.mean(moving)),
            "monotone_share_pairs_differing_by_30pct": float(np.mean([p["monotone_share"] for p in distinct]))
            if distinct else None,
            "monotone_pairs_share": float(np.mean([p["monotone"] for p in pairs])), "monotone_tolerance": tolerance,
            "monotone_pairs_share_differing_by_30pct": float(np.mean([p["monotone"] for p in distinct]))
            if distinct else None}


def sdedit_part(cfg, n: int, steps: int, **_) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strength in (0.2, 0.4, 0.6, 0.8, 1.0):
            ps, cs = [], []
            for k, f in enumerate(list_volumes(cfg.data.val_data_dir)[:n]):
                opts = EditOptions(out_dir=Path(tmp) / f"{strength}_{k}", steps=steps, progress=False)
                r = json.loads(Path(sdedit(cfg, f, strength, 2, opts)["record"]).read_text())
                ps += r["psnr_vs_input_reconstruction_db"]
                cs += r["codes_as_input"]
            out[str(strength)] = {"psnr_vs_input_reconstruction_db": float(np.mean(ps)),
                                  "codes_as_input": float(np.mean(cs))}
    return out


def inpaint_part(cfg, n: int, steps: int, autoguidance: float = 1.0, **_) -> dict:
    """The central half of each held-out volume (a box of half the patch per axis) regenerated."""
    files = list_volumes(cfg.data.val_data_dir)
    shape = read_volume(files[0]).array.shape
    box = tuple(slice(s // 4, s // 4 + s // 2) for s in shape)
    real = [float((read_volume(f).array[box] > 0.1).mean()) for f in files + list_volumes(cfg.data.train_data_dir)]
    lo, hi = np.percentile(real, [5, 95])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mask = np.zeros(shape, np.float32)
        mask[box] = 1
        write_volume(Path(tmp) / "mask.nii.gz", mask)
        for k, f in enumerate(files[:n]):
            opts = EditOptions(out_dir=Path(tmp) / str(k), steps=steps, progress=False, autoguidance=autoguidance)
            r = json.loads(Path(inpaint(cfg, f, Path(tmp) / "mask.nii.gz", opts, PaintOptions())["record"]).read_text())
            rows.append([r["foreground_fraction_in_mask"], r["voxels_changed_outside_feather"]])
    fg = [r[0] for r in rows]
    return {"volumes": len(rows), "real_foreground_fraction_in_box_5_95": [lo, hi], "real_volumes": len(real),
            "inpainted_foreground_fraction_in_box": fg, "share_inside_5_95": float(np.mean([lo <= v <= hi for v in fg])),
            "voxels_changed_outside_feather_total": int(sum(r[1] for r in rows))}


PEAK = """
import json, os, resource, sys, tempfile, torch
torch.set_num_threads(1)
from vqldm.config import load_config
from vqldm.priors.diffusion.pipeline import load_pipeline
from vqldm.sampling.samplers import sample_latents
import vqldm.sampling.window, monai.inferers, tqdm  # imported before measuring: code is not sampling memory
pipe = load_pipeline(load_config(sys.argv[1]))
shape, mode, measure = [int(v) for v in sys.argv[2:5]], sys.argv[5], sys.argv[6]
def run():
    if mode == "whole":  # the UNet on the whole latent at once (what --shape did before tiling)
        z = sample_latents("ddim", pipe.denoiser(), pipe.noise([0], 0, pipe.latent_shape(shape)), 2, pipe.schedule)
    else:
        pipe.generate([0], 0, 2, "ddim", 1, True, shape)
if measure == "rss":  # resident set above the process's before: what the OS lends, allocator caches included
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4  # KiB
    before = rss()
    run()
    peak = {"beyond_networks": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
elif pipe.rt.is_cuda:  # live tensors: what a GPU's max_memory_allocated counts
    before = torch.cuda.memory_allocated()  # the loaded networks
    torch.cuda.reset_peak_memory_stats()
    run()
    top = torch.cuda.max_memory_allocated()
    peak = {"beyond_networks": (top - before) / 2**20, "with_networks": top / 2**20}
else:  # the same on the CPU: the profiler's timeline of live tensor bytes (the networks' weights at its start)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        run()
    path = os.path.join(tempfile.mkdtemp(), "timeline.json")
    p.export_memory_timeline(path, device="cpu")
    sizes = json.load(open(path))[1]
    top = max(sum(s) for s in sizes)
    peak = {"beyond_networks": (top - sum(sizes[0])) / 2**20, "with_networks": top / 2**20}
print(json.dumps(peak))
"""


def _peak_mib(config_path: str, shape: list[int], mode: str, measure: str) -> dict:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK, config_path, *map(str, shape), mode, measure],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def tiled_part(cfg, n: int, steps: int, config_path: str = "", **_) -> dict:
    """Peak memory of sampling one training-size volume and a 4 x 4-patch one (2 DDIM steps, each in a
    fresh process): live tensor bytes (the profiler's memory timeline on the CPU, ``max_memory_allocated``
    on a GPU) with and beyond the loaded networks, and the resident set beyond them. Then the seam ratio
    of ``n`` 4 x 4-patch samples at the tile borders."""
    patch = list(cfg.data.patch_size)
    big = [patch[0] * 4, patch[1] * 4, patch[2]]
    runs = [("one_tile", patch, "tiled"), ("4x4_tiled", big, "tiled"), ("4x4_whole_unet", big, "whole")]
    mem: dict = {}
    for measure in ("tensors", "rss"):
        for name, shape, mode in runs:
            for what, mib in _peak_mib(config_path, shape, mode, measure).items():
                mem.setdefault(f"{measure}_{what}", {})[name] = mib
    from vqldm.priors.diffusion.pipeline import load_pipeline

    pipe = load_pipeline(cfg)
    stride = big[0] // pipe.latent_shape(big)[1]
    lat_b = window_borders(pipe.latent_shape(big)[1:], list(pipe.diff_ckpt["latent_shape"])[1:], 1)
    borders = [[b * stride for b in axis] for axis in lat_b]
    vols = pipe.generate(list(range(n)), 0, steps, "ddim", 1, True, big) if n else []
    seams = [seam_ratio(v[0], borders) for v in vols]
    return {"shape": big, "peak_memory_mib": mem,
            "ratio_4x4_to_one_tile": {k: m["4x4_tiled"] / m["one_tile"] for k, m in mem.items()},
            "seam_ratio_samples": seams, "seam_ratio_mean": float(np.mean(seams)) if seams else None, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--part", choices=["reconstruct", "invert", "interpolate", "sdedit", "inpaint", "tiled"], required=True)
    ap.add_argument("--n", type=int, default=8, help="volumes (pairs) per figure (default 8)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--frames", type=int, default=8, help="interpolation frames (default 8)")
    ap.add_argument("--autoguidance", type=float, default=1.0, help="inpaint: autoguidance weight (default 1: none)")
    ap.add_argument("--depth", type=float, default=None, help="interpolate: inversion depth (default: the command's)")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="interpolate: a monotone pair's largest step back, x its difference (default 0.01)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    parts = {"reconstruct": reconstruct_part, "invert": invert_part, "interpolate": interpolate_part,
             "sdedit": sdedit_part, "inpaint": inpaint_part, "tiled": tiled_part}
    res = parts[args.part](cfg, args.n, steps=args.steps, frames=args.frames, config_path=args.config,
                           autoguidance=args.autoguidance, depth=args.depth, tolerance=args.tolerance)
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
