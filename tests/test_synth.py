"""Tests for the synthetic microtubule generator (vqldm.synth)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vqldm.errors import VqldmError
from vqldm.synth import MicrotubuleParams, nifti_bytes, synth_volume, voxel_size_nm, write_dataset

SHAPES = [(32, 32, 32), (48, 48, 24), (64, 64, 64), (96, 96, 48)]


@pytest.mark.parametrize("shape", SHAPES)
def test_volume_range_and_foreground(shape):
    for seed in range(6):
        vol, truth = synth_volume(shape, np.random.default_rng(seed))
        assert vol.shape == shape and vol.dtype == np.float32
        assert np.isfinite(vol).all()
        assert vol.min() >= 0.0 and vol.max() <= 1.0
        assert vol.max() >= 0.99
        fg = float(np.mean(vol > 0.1))
        assert 0.0005 <= fg <= 0.25, (shape, seed, fg)
        assert truth["foreground_fraction"] == pytest.approx(fg)
        assert truth["voxel_size_nm"] == pytest.approx(list(voxel_size_nm(shape)))
        json.dumps(truth)  # plain values only


def test_voxel_size_from_fov():
    assert voxel_size_nm((96, 96, 48)) == pytest.approx((8000 / 96, 8000 / 96, 6.25))
    p = MicrotubuleParams(fov_nm=(4000.0, 2000.0, 500.0))
    assert voxel_size_nm((40, 20, 50), p) == pytest.approx((100.0, 100.0, 10.0))


def test_truth_contents():
    vol, truth = synth_volume((64, 64, 64), np.random.default_rng(3))
    p = MicrotubuleParams()
    n = truth["n_filaments"]
    assert p.n_filaments[0] <= n <= p.n_filaments[1]
    assert len(truth["lengths_nm"]) == len(truth["persistence_nm"]) == n
    assert all(p.length_nm[0] <= v <= p.length_nm[1] + p.step_nm for v in truth["lengths_nm"])
    assert all(p.persistence_nm[0] <= v <= p.persistence_nm[1] for v in truth["persistence_nm"])
    assert truth["n_localisations"] == sum(truth["n_localisations_per_filament"]) + truth["n_background"]
    assert truth["n_background"] < 0.1 * truth["n_localisations"]


def test_same_seed_identical_different_seed_differs():
    a, ta = synth_volume((48, 48, 24), np.random.default_rng(11))
    b, tb = synth_volume((48, 48, 24), np.random.default_rng(11))
    c, _ = synth_volume((48, 48, 24), np.random.default_rng(12))
    assert a.tobytes() == b.tobytes() and ta == tb
    assert not np.array_equal(a, c)


def test_filaments_are_thin_curves():
    """Filaments are thin curves in xy (~2 voxels at half maximum), not blobs, on an empty background."""
    from skimage.morphology import skeletonize

    p = MicrotubuleParams(n_filaments=(1, 1), length_nm=(6000.0, 6000.0))
    widths = []
    for seed in range(4):
        vol, _ = synth_volume((64, 64, 64), np.random.default_rng(seed), p)
        mip = vol.max(axis=2)
        fg = mip > 0.1
        skeleton = int(skeletonize(fg).sum())
        assert skeleton >= 10  # a 6 um filament spans many 125 nm voxels
        half_max = fg & (mip > 0.5 * ndimage.maximum_filter(mip, size=7))
        widths.append(half_max.sum() / skeleton)
        # A few long pieces (labelling gaps, leaving and re-entering the field) hold nearly all
        # the foreground; background localisations give at most a few isolated specks.
        lab, _ = ndimage.label(fg, structure=np.ones((3, 3)))
        sizes = np.bincount(lab.ravel())[1:]
        assert (sizes >= 10).sum() <= 4
        assert sizes[sizes >= 10].sum() >= 0.95 * fg.sum()
        assert fg.mean() < 0.1
    assert 1.0 <= np.mean(widths) <= 3.0, widths


def test_each_filament_visible():
    """Every filament crossing the field lights voxels along most of its in-field path."""
    from vqldm.synth import microtubules as mt

    p = MicrotubuleParams()
    for shape in [(32, 32, 32), (64, 64, 64), (96, 96, 48)]:
        vox = np.asarray(voxel_size_nm(shape, p))
        for seed in range(4):
            vol, truth = synth_volume(shape, np.random.default_rng(seed), p)
            # Replay the generator's first draws to recover the centre lines.
            rng = np.random.default_rng(seed)
            n = int(rng.integers(p.n_filaments[0], p.n_filaments[1] + 1))
            verts, n_seg = mt._chains(rng, p, n)[:2]
            near = ndimage.maximum_filter(vol, size=3)
            for i in range(n):
                idx = np.floor(verts[i, : n_seg[i] + 1] / vox).astype(int)
                idx = idx[np.all((idx >= 0) & (idx < shape), axis=1)]
                if len(idx) * p.step_nm < 500:  # only clips a corner of the field
                    continue
                assert (near[tuple(idx.T)] > 0.1).mean() >= 0.5, (shape, seed, i)


def test_speed():
    rng = np.random.default_rng(0)
    for shape in [(64, 64, 64), (96, 96, 48)]:
        synth_volume(shape, rng)
        t0 = time.perf_counter()
        for _ in range(3):
            synth_volume(shape, rng)
        assert (time.perf_counter() - t0) / 3 < 0.5


def test_params_validation():
    with pytest.raises(VqldmError, match="length_nm"):
        MicrotubuleParams(length_nm=(5000.0, 1000.0))
    with pytest.raises(VqldmError, match="bogus"):
        MicrotubuleParams.from_dict({"bogus": 1})
    p = MicrotubuleParams.from_dict({"n_filaments": [2, 4]})
    assert p.n_filaments == (2, 4) and p == MicrotubuleParams(n_filaments=(2, 4))
    with pytest.raises(VqldmError, match="shape"):
        synth_volume((32, 32), np.random.default_rng(0))


def test_nifti_bytes_deterministic():
    vol, _ = synth_volume((32, 32, 32), np.random.default_rng(5))
    a = nifti_bytes(vol, (250.0, 250.0, 9.375))
    b = nifti_bytes(vol.copy(), (250.0, 250.0, 9.375))
    assert a == b


def test_write_dataset_files(tmp_path):
    shape = (48, 48, 24)
    p = MicrotubuleParams(n_filaments=(3, 6))
    s1 = write_dataset(tmp_path / "a", 3, 2, shape, seed=42, params=p, progress=False)
    write_dataset(tmp_path / "b", 2, 1, shape, seed=42, params=p, progress=False)
    write_dataset(tmp_path / "c", 1, 0, shape, seed=43, params=p, progress=False)
    assert s1["num_train"] == 3 and s1["num_val"] == 2
    assert len(s1["train_files"]) == 3 and len(s1["val_files"]) == 2
    assert 0.0005 <= s1["mean_foreground_fraction"] <= 0.25

    # Same seed -> byte-identical files, independent of how many volumes were written.
    for split, names in [("train", ["mt_0000.nii.gz", "mt_0001.nii.gz"]), ("val", ["mt_0000.nii.gz"])]:
        for name in names:
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    # train and val volumes differ, and a different seed gives different volumes.
    ta = (tmp_path / "a" / "train" / "mt_0000.nii.gz").read_bytes()
    assert ta != (tmp_path / "a" / "val" / "mt_0000.nii.gz").read_bytes()
    assert ta != (tmp_path / "c" / "train" / "mt_0000.nii.gz").read_bytes()
    assert not list((tmp_path / "a").rglob("*.tmp"))

    img = nib.load(str(tmp_path / "a" / "train" / "mt_0001.nii.gz"))
    data = np.asarray(img.dataobj)
    assert data.shape == shape and data.dtype == np.float32
    assert data.min() >= 0 and data.max() == pytest.approx(1.0, abs=1e-3)
    vox = voxel_size_nm(shape, p)
    assert img.header.get_xyzt_units()[0] == "micron"
    assert np.allclose(img.header.get_zooms()[:3], np.asarray(vox) * 1e-3)
    assert np.allclose(img.affine, np.diag([v * 1e-3 for v in vox] + [1.0]))
    # The file holds exactly what synth_volume returns for that (seed, split, index).
    gt = json.loads((tmp_path / "a" / "ground_truth.json").read_text())
    assert gt["seed"] == 42 and gt["shape"] == list(shape)
    assert gt["voxel_size_nm"] == pytest.approx(list(vox))
    assert gt["params"] == json.loads(json.dumps(asdict(p)))
    assert sorted(gt["train"]) == ["mt_0000.nii.gz", "mt_0001.nii.gz", "mt_0002.nii.gz"]
    assert sorted(gt["val"]) == ["mt_0000.nii.gz", "mt_0001.nii.gz"]
    t = gt["train"]["mt_0001.nii.gz"]
    assert {"n_filaments", "lengths_nm", "persistence_nm", "n_localisations", "voxel_size_nm"} <= set(t)
    assert len(t["lengths_nm"]) == t["n_filaments"]
    assert t["foreground_fraction"] == pytest.approx(float(np.mean(data > 0.1)))
    gt_b = json.loads((tmp_path / "b" / "ground_truth.json").read_text())
    assert gt_b["train"]["mt_0001.nii.gz"] == t


def test_write_dataset_refuses_overwrite(tmp_path):
    shape = (32, 32, 32)
    write_dataset(tmp_path / "d", 1, 1, shape, seed=0, progress=False)
    before = {f: f.read_bytes() for f in (tmp_path / "d").rglob("*") if f.is_file()}
    with pytest.raises(VqldmError, match=str(tmp_path / "d" / "train")):
        write_dataset(tmp_path / "d", 1, 1, shape, seed=1, progress=False)
    # Only val holds volumes: still refused, naming val.
    for f in (tmp_path / "d" / "train").glob("*.nii.gz"):
        f.rename(tmp_path / f.name)
    with pytest.raises(VqldmError, match=str(tmp_path / "d" / "val")):
        write_dataset(tmp_path / "d", 1, 1, shape, seed=1, progress=False)
    assert (tmp_path / "d" / "val" / "mt_0000.nii.gz").read_bytes() == before[tmp_path / "d" / "val" / "mt_0000.nii.gz"]
    # Volumes gone but ground truth left: refused rather than silently replaced.
    (tmp_path / "d" / "val" / "mt_0000.nii.gz").unlink()
    with pytest.raises(VqldmError, match="ground_truth.json"):
        write_dataset(tmp_path / "d", 1, 1, shape, seed=1, progress=False)


def test_write_dataset_anisotropic_and_progress(tmp_path, capsys):
    s = write_dataset(tmp_path / "e", 2, 0, (40, 24, 12), seed=3, progress=True)
    assert s["num_val"] == 0 and s["val_files"] == []
    img = nib.load(s["train_files"][1])
    assert img.shape == (40, 24, 12)
    assert np.allclose(img.header.get_zooms()[:3], [0.2, 8.0 / 24, 0.025])
