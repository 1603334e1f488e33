"""Volume I/O and the MONAI data pipeline (issue 2, item 4)."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.data.utils import set_rnd

from vqldm.config import config_from_dict
from vqldm.data import pipeline
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.errors import VqldmError

from conftest import run_cli, tiny_config_dict, write_config


def _cfg(tmp_path, data_dir, patch=(16, 16, 16), **data_updates):
    d = tiny_config_dict(tmp_path, data_dir, patch=patch)
    d["data"].update(data_updates)
    if "patch_size" not in data_updates:
        d["data"]["patch_size"] = list(patch)
    return config_from_dict(d)


def _item(x):
    """A train-dataset item: MONAI returns a list of samples for RandCropByPosNegLabeld."""
    if isinstance(x, list):
        assert len(x) == 1
        x = x[0]
    return x["image"]


def _ramp(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape).astype(np.float32) * 7.0 - 2.0


# ----------------------------------------------------------------------------------- I/O
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip(tmp_path, suffix):
    arr = _ramp((10, 12, 6))
    path = write_volume(tmp_path / f"vol{suffix}", arr, spacing=(0.5, 0.75, 2.0))
    v = read_volume(path)
    assert v.array.shape == (10, 12, 6)
    assert v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, arr)
    assert v.spacing == pytest.approx((0.5, 0.75, 2.0))
    assert v.path == path


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_tiff_round_trip(tmp_path, suffix):
    arr = _ramp((10, 12, 6), seed=1)
    path = write_volume(tmp_path / f"vol{suffix}", arr, spacing=(0.25, 0.5, 2.0))
    v = read_volume(path)
    assert v.array.shape == (10, 12, 6)  # (X, Y, Z), not the TIFF's (Z, Y, X)
    np.testing.assert_array_equal(v.array, arr)
    assert v.spacing == pytest.approx((0.25, 0.5, 2.0), rel=1e-4)


def test_plain_tiff_stack_is_zyx(tmp_path):
    """A TIFF stack written by another tool (Z, Y, X pages, no metadata) reads as (X, Y, Z)."""
    zyx = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, zyx, photometric="minisblack")
    v = read_volume(path)
    assert v.array.shape == (6, 5, 4)
    np.testing.assert_array_equal(v.array, zyx.transpose(2, 1, 0).astype(np.float32))
    assert v.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_list_volumes_finds_all_formats(tmp_path):
    for name in ("a.nii.gz", "b.nii", "c.tif", "d.tiff"):
        write_volume(tmp_path / name, np.zeros((4, 4, 4)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_volumes(tmp_path)] == ["a.nii.gz", "b.nii", "c.tif", "d.tiff"]


def _valid_bytes(tmp_path, suffix):
    p = write_volume(tmp_path / f"ok{suffix}", _ramp((16, 16, 16)))
    data = p.read_bytes()
    p.unlink()
    return data


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".tif"])
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_file_named(tmp_path, suffix, kind):
    good = _valid_bytes(tmp_path, suffix)
    bad = tmp_path / f"broken_{kind}{suffix}"
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(len(good)))
    with pytest.raises(VqldmError) as ei:
        read_volume(bad)
    assert bad.name in str(ei.value)


def test_gzip_with_garbage_payload_named(tmp_path):
    bad = tmp_path / "payload.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(VqldmError, match="payload.nii.gz"):
        read_volume(bad)


def test_2d_files_refused(tmp_path):
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(p))
    with pytest.raises(VqldmError, match="flat.nii.gz"):
        read_volume(p)
    t = tmp_path / "flat.tif"
    tifffile.imwrite(t, np.zeros((16, 16), np.float32))
    with pytest.raises(VqldmError, match="flat.tif"):
        read_volume(t)


def test_4d_singleton_accepted(tmp_path):
    arr = _ramp((8, 9, 10, 1))
    p = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    v = read_volume(p)
    assert v.array.shape == (8, 9, 10)
    np.testing.assert_array_equal(v.array, arr[..., 0])


def test_multichannel_refused(tmp_path):
    p = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(_ramp((8, 9, 10, 3)), np.eye(4)), str(p))
    with pytest.raises(VqldmError, match="rgb.nii.gz"):
        read_volume(p)
    t = tmp_path / "twochannel.tif"
    tifffile.imwrite(t, _ramp((4, 2, 8, 8)), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(VqldmError, match="twochannel.tif"):
        read_volume(t)


def test_nan_voxels_refused(tmp_path):
    arr = _ramp((8, 8, 8))
    arr[3, 4, 5] = np.nan
    arr[0, 0, 0] = np.inf
    p = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    with pytest.raises(VqldmError, match="holes.nii.gz"):
        read_volume(p)


def test_missing_file_named(tmp_path):
    with pytest.raises(VqldmError, match="absent.nii.gz"):
        read_volume(tmp_path / "absent.nii.gz")


# ----------------------------------------------------------------------------------- normalisation
def test_constant_volume_normalises_to_zeros():
    out = pipeline.normalize_unit(np.full((8, 8, 8), 5.0, np.float32))
    assert np.isfinite(out).all() and np.all(out == 0)
    out = pipeline.normalize_unit(np.zeros((8, 8, 8), np.float32))
    assert np.isfinite(out).all() and np.all(out == 0)


def test_normalize_unit_range():
    out = pipeline.normalize_unit(_ramp((8, 8, 8)))
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)


def test_constant_volume_through_pipeline(tmp_path, data_dir):
    d = tmp_path / "vols"
    write_volume(d / "const.nii.gz", np.full((16, 16, 16), 3.0))
    cfg = _cfg(tmp_path, data_dir, max_val_patches=64)
    val = pipeline.val_dataset(cfg, list_volumes(d))
    x = val[0]["image"]
    assert torch.isfinite(x).all() and torch.all(x == 0)
    train = pipeline.train_dataset(cfg, list_volumes(d))
    x = _item(train[0])
    assert torch.isfinite(x).all() and torch.all(x == 0)


def test_intensity_range_minus_one_one(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, intensity_range=[-1.0, 1.0], max_val_patches=64)
    files = list_volumes(data_dir / "train")
    val = pipeline.val_dataset(cfg, files)
    xs = torch.stack([val[i]["image"] for i in range(len(val))])
    assert xs.min() >= -1.0 and xs.max() <= 1.0
    assert xs.min() == pytest.approx(-1.0) and xs.max() == pytest.approx(1.0)
    train = pipeline.train_dataset(cfg, files)
    for i in range(len(train)):
        x = _item(train[i])
        assert x.min() >= -1.0 and x.max() <= 1.0
    assert pipeline.normalization_of(cfg).to_dict()["intensity_range"] == [-1.0, 1.0]


def test_unit_range_default(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, max_val_patches=64)
    val = pipeline.val_dataset(cfg, list_volumes(data_dir / "val"))
    xs = torch.stack([val[i]["image"] for i in range(len(val))])
    assert xs.min() >= 0.0 and xs.max() <= 1.0 and xs.max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- patches
def test_train_patches_have_patch_size(tmp_path, data_dir):
    for aug in (False, True):
        cfg = _cfg(tmp_path, data_dir, patch=(16, 16, 8), augmentation=aug, patches_per_volume=3)
        ds = pipeline.train_dataset(cfg, list_volumes(data_dir / "train"))
        assert len(ds) == 4 * 3
        for i in range(len(ds)):
            x = _item(ds[i])
            assert tuple(x.shape) == (1, 16, 16, 8)
            assert x.dtype == torch.float32


def _sparse_volumes(directory):
    """Very sparse volumes (a few thin lines, well under 1% of voxels) of 48^3."""
    shape = (48, 48, 48)
    for k in range(2):
        v = np.zeros(shape, np.float32)
        v[:, 6 + k, 5] = 1.0  # a filament along x near a corner
        v[40 - k, :, 42] = 0.8  # one along y near the opposite corner
        v[20, 30, 10:30] = 0.6  # a short one along z
        write_volume(directory / f"sparse_{k}.nii.gz", v)
    return list_volumes(directory)


def _mean_fg_fraction(tmp_path, data_dir, files, ratio, draws=60):
    cfg = _cfg(tmp_path, data_dir, foreground_crop_ratio=ratio, patches_per_volume=draws // 2,
               augmentation=False)
    ds = pipeline.train_dataset(cfg, files)
    set_rnd(ds, seed=123)
    fr = [float((_item(ds[i]) > cfg.data.foreground_threshold).float().mean()) for i in range(len(ds))]
    return np.array(fr)


def test_foreground_biased_sampling(tmp_path, data_dir):
    files = _sparse_volumes(tmp_path / "sparse")
    fg1 = _mean_fg_fraction(tmp_path, data_dir, files, 1.0)
    fg0 = _mean_fg_fraction(tmp_path, data_dir, files, 0.0)
    assert np.all(fg1 > 0), "every foreground-centred patch must contain foreground"
    assert fg1.mean() > 3 * fg0.mean(), (fg1.mean(), fg0.mean())
    assert (fg1 > 0).mean() > (fg0 > 0).mean()


def test_volume_smaller_than_patch_is_padded(tmp_path, data_dir):
    d = tmp_path / "small"
    write_volume(d / "tiny.nii.gz", _ramp((10, 12, 6)))
    cfg = _cfg(tmp_path, data_dir, patch=(16, 16, 16), max_val_patches=64)
    ds = pipeline.train_dataset(cfg, list_volumes(d))
    x = _item(ds[0])
    assert tuple(x.shape) == (1, 16, 16, 16)
    val = pipeline.val_dataset(cfg, list_volumes(d))
    assert len(val) == 1
    v = val[0]["image"]
    assert tuple(v.shape) == (1, 16, 16, 16)
    # the original voxels survive (normalised) and the rest is padding
    assert float(v.max()) == pytest.approx(1.0)
    assert int((v != 0).sum()) <= 10 * 12 * 6


def test_validation_tiles_deterministic_and_cover(tmp_path, data_dir):
    d = tmp_path / "odd"
    arrs = [_ramp((40, 36, 20), seed=s) for s in range(2)]
    for i, a in enumerate(arrs):
        write_volume(d / f"odd_{i}.nii.gz", a)
    cfg = _cfg(tmp_path, data_dir, patch=(16, 16, 16), max_val_patches=1000)
    files = list_volumes(d)
    a = pipeline.val_dataset(cfg, files)
    b = pipeline.val_dataset(cfg, files)
    assert a.tiles == b.tiles and len(a) == len(b) > 0
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert tuple(a[i]["image"].shape) == (1, 16, 16, 16)
    # every voxel of every volume lies in some tile, and each tile holds the volume's values there
    for vi, arr in enumerate(arrs):
        covered = np.zeros(arr.shape, bool)
        unit = pipeline.normalize_unit(arr)
        for k, (i, sx, sy, sz) in enumerate(a.tiles):
            if i != vi:
                continue
            covered[sx:sx + 16, sy:sy + 16, sz:sz + 16] = True
            np.testing.assert_allclose(a[k]["image"][0].numpy(), unit[sx:sx + 16, sy:sy + 16, sz:sz + 16],
                                       atol=1e-6)
        assert covered.all(), f"volume {vi}: {int((~covered).sum())} voxels in no validation tile"


def test_validation_tile_cap_keeps_every_volume(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, patch=(16, 16, 16), max_val_patches=4)
    val = pipeline.val_dataset(cfg, list_volumes(data_dir / "train"))
    assert len(val) == 4
    assert {t[0] for t in val.tiles} == {0, 1, 2, 3}


def test_voxel_resize_changes_grid(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, patch=(16, 16, 16), voxel_resize=[16, 16, 24], max_val_patches=64)
    files = list_volumes(data_dir / "val")
    val = pipeline.val_dataset(cfg, files)
    assert tuple(val.volumes[0]["image"].shape) == (1, 16, 16, 24)
    assert len(val) == 2 * 2  # two tiles along z per volume
    ds = pipeline.train_dataset(cfg, files)
    assert tuple(_item(ds[0]).shape) == (1, 16, 16, 16)
    x = torch.stack([val[i]["image"] for i in range(len(val))])
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


# ----------------------------------------------------------------------------------- unreadable files
def _mixed_dir(tmp_path, data_dir):
    d = tmp_path / "mixed"
    d.mkdir()
    for f in list_volumes(data_dir / "train")[:2]:
        (d / f.name).write_bytes(f.read_bytes())
    good = (data_dir / "train" / "mt_0000.nii.gz").read_bytes()
    (d / "zz_corrupt.nii.gz").write_bytes(good[: len(good) // 3])
    return d


def test_scan_stops_on_corrupt_file(tmp_path, data_dir):
    d = _mixed_dir(tmp_path, data_dir)
    with pytest.raises(VqldmError, match="zz_corrupt.nii.gz"):
        pipeline.scan_volumes(d, "train_data_dir")


def test_skip_unreadable_warns_and_skips(tmp_path, data_dir, caplog):
    d = _mixed_dir(tmp_path, data_dir)
    with caplog.at_level(logging.WARNING, logger="vqldm"):
        s = pipeline.scan_volumes(d, "train_data_dir", skip_unreadable=True)
    assert [f.name for f in s.files] == ["mt_0000.nii.gz", "mt_0001.nii.gz"]
    assert len(s.skipped) == 1 and "zz_corrupt.nii.gz" in s.skipped[0]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("zz_corrupt.nii.gz" in r.getMessage() for r in warnings)


def test_cli_corrupt_file_named_or_skipped(tmp_path, data_dir, capsys):
    d = _mixed_dir(tmp_path, data_dir)
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(d)
    path = write_config(tmp_path / "c.yaml", cfg)
    rc = run_cli("check", "--config", path, "--json")
    out = capsys.readouterr()
    assert rc != 0
    assert "zz_corrupt.nii.gz" in out.err and "Traceback" not in out.err
    rc = run_cli("train-vqvae", "--config", path)
    out = capsys.readouterr()
    assert rc != 0
    assert "zz_corrupt.nii.gz" in out.err and "Traceback" not in out.err
    assert not (tmp_path / "vqvae_checkpoints" / "best_model.pt").exists()
    rc = run_cli("check", "--config", path, "--json", "--set", "data.skip_unreadable=true")
    out = capsys.readouterr()
    assert rc == 0, out.err
    import json

    rep = json.loads(out.out)["data"]["train_data_dir"]
    assert rep["files"] == 2 and len(rep["skipped_unreadable"]) == 1


def test_cli_nan_volume_named(tmp_path, data_dir, capsys):
    d = tmp_path / "nan"
    arr = _ramp((32, 32, 32))
    arr[1, 2, 3] = np.nan
    d.mkdir()
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(d / "has_nan.nii.gz"))
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["data"]["val_data_dir"] = str(d)
    rc = run_cli("check", "--config", write_config(tmp_path / "c.yaml", cfg), "--json")
    out = capsys.readouterr()
    assert rc != 0 and "has_nan.nii.gz" in out.err and "Traceback" not in out.err


def test_train_vqvae_skips_unreadable_when_asked(tmp_path, data_dir, caplog):
    d = _mixed_dir(tmp_path, data_dir)
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(d)
    cfg["data"]["skip_unreadable"] = True
    cfg["vqvae"]["training"].update({"fast_dev_run": True, "fast_dev_run_batches": 1})
    with caplog.at_level(logging.WARNING, logger="vqldm"):
        rc = run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert rc == 0
    assert (tmp_path / "vqvae_checkpoints" / "latest_checkpoint.pt").is_file()
    assert any("zz_corrupt.nii.gz" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_train_vqvae_pads_small_volumes(tmp_path, data_dir):
    d = tmp_path / "small"
    for i in range(2):
        write_volume(d / f"s{i}.nii.gz", _ramp((20, 24, 12), seed=i))
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(d)
    cfg["data"]["val_data_dir"] = str(d)
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    assert (tmp_path / "vqvae_checkpoints" / "best_model.pt").is_file()
