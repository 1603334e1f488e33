"""Physical units end to end (issue 15, part 1): the unit and spacing read from the inputs travel
through every checkpoint into every written file, and each reader vqldm depends on (nibabel,
tifffile, MONAI ``LoadImage``; SimpleITK where installed) reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.transforms import LoadImage

from vqldm.config import config_from_dict
from vqldm.data import pipeline
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.data.pipeline import VolumeReader
from vqldm.data.units import VoxelGrid, grid_of, parse_unit
from vqldm.engine import setup

from conftest import run_cli, tiny_config_dict, with_updates, write_config

SPACING = (0.25, 0.5, 2.0)
FORMATS = {"nifti": "sample_0000.nii.gz", "tiff": "sample_0000.tif", "ome-tiff": "sample_0000.ome.tif"}


def _vol(shape=(6, 5, 4), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# ----------------------------------------------------------------------------------- unit names
@pytest.mark.parametrize("spelling, expected", [
    ("micron", ("micron", 1.0)), ("\u00b5m", ("micron", 1.0)), ("\u03bcm", ("micron", 1.0)), ("um", ("micron", 1.0)),
    ("\\u00B5m", ("micron", 1.0)), ("nm", ("micron", 1e-3)), ("mm", ("mm", 1.0)), ("cm", ("mm", 10.0)),
    ("m", ("meter", 1.0)), ("pixel", ("unknown", 1.0)), ("", ("unknown", 1.0)), (None, ("unknown", 1.0)),
])
def test_unit_spellings_map_to_nifti_names(spelling, expected):
    assert parse_unit(spelling) == expected


# ----------------------------------------------------------------------------------- vqldm round trips
@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.tif", "v.tiff", "v.ome.tif", "v.ome.tiff"])
@pytest.mark.parametrize("unit", ["micron", "mm", "meter", "unknown"])
def test_every_format_round_trips_spacing_and_unit(tmp_path, name, unit):
    arr = _vol()
    v = read_volume(write_volume(tmp_path / name, arr, SPACING, unit))
    np.testing.assert_array_equal(v.array, arr)
    assert v.spacing == pytest.approx(SPACING, rel=1e-6)
    assert v.unit == unit


def test_ome_tiff_bytes_depend_only_on_the_data(tmp_path):
    a = write_volume(tmp_path / "a.ome.tif", _vol(), SPACING, "micron").read_bytes()
    b = write_volume(tmp_path / "b.ome.tif", _vol(), SPACING, "micron").read_bytes()
    c = write_volume(tmp_path / "c.ome.tif", _vol(seed=1), SPACING, "micron").read_bytes()
    assert a == b and a != c


def test_nifti_affine_survives_a_round_trip(tmp_path):
    """Orientation and origin of a NIfTI input are kept (and rescaled to the spacing written)."""
    affine = np.array([[0, -0.5, 0, 10], [0.25, 0, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1.0]])
    v = read_volume(write_volume(tmp_path / "a.nii.gz", _vol(), SPACING, "mm", affine))
    np.testing.assert_allclose(v.affine, affine)
    np.testing.assert_allclose(nib.load(tmp_path / "a.nii.gz").get_qform(), affine, atol=1e-6)
    doubled = read_volume(write_volume(tmp_path / "b.nii.gz", _vol(), [2 * s for s in SPACING], "mm", v.affine))
    np.testing.assert_allclose(doubled.affine[:3, :3], 2 * affine[:3, :3])
    np.testing.assert_allclose(doubled.affine[:3, 3], affine[:3, 3])


def test_resized_grid_maps_voxel_centres_to_the_same_world_points():
    g = grid_of((1.0, 1.0, 1.0), "micron", np.diag([1.0, 1.0, 1.0, 1.0])).resized((32, 32, 16), (16, 16, 16))
    assert g.spacing == (2.0, 2.0, 1.0) and g.unit == "micron"
    a = np.asarray(g.affine)
    # new voxel 0 covers old voxels 0 and 1 along x: its centre lies at old coordinate 0.5
    np.testing.assert_allclose(a @ [0, 0, 0, 1], [0.5, 0.5, 0.0, 1.0])


def test_a_checkpoint_without_a_unit_reads_as_unknown():
    assert VoxelGrid.from_meta({"spacing": [1.0, 2.0, 3.0]}) == VoxelGrid((1.0, 2.0, 3.0), "unknown")
    assert VoxelGrid.from_meta({}, {"spacing": [1, 1, 1], "spacing_unit": "mm"}).unit == "mm"
    assert VoxelGrid.from_meta({}, {}) == VoxelGrid()


# ----------------------------------------------------------------------------------- files of other tools
def test_fiji_and_ome_files_of_other_tools_read_with_their_unit(tmp_path):
    zyx = _vol((4, 5, 6))
    tifffile.imwrite(tmp_path / "fiji.tif", zyx, imagej=True, resolution=(4.0, 2.0),
                     metadata={"spacing": 2.0, "unit": "\\u00B5m", "axes": "ZYX"})  # as Fiji writes µm
    v = read_volume(tmp_path / "fiji.tif")
    assert v.unit == "micron" and v.spacing == pytest.approx(SPACING)
    tifffile.imwrite(tmp_path / "nm.ome.tif", zyx, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 500.0,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "\u00b5m"})
    v = read_volume(tmp_path / "nm.ome.tif")
    assert v.unit == "micron" and v.spacing == pytest.approx(SPACING)
    tifffile.imwrite(tmp_path / "cm.tif", zyx, resolution=(40.0, 20.0), resolutionunit="CENTIMETER",
                     photometric="minisblack")
    v = read_volume(tmp_path / "cm.tif")
    assert v.unit == "mm" and v.spacing[:2] == pytest.approx(SPACING[:2])


# ----------------------------------------------------------------------------------- each reader
def _check_readers(folder: Path, spacing, unit: str) -> dict:
    """What nibabel, tifffile and MONAI LoadImage read from the files of ``folder`` (FORMATS);
    asserts each has ``spacing`` in ``unit``. Returns the numbers (for the record)."""
    seen = {}
    nii = nib.load(folder / FORMATS["nifti"])
    seen["nibabel"] = (nii.header.get_zooms()[:3], nii.header.get_xyzt_units()[0])
    assert seen["nibabel"][0] == pytest.approx(spacing, rel=1e-6) and seen["nibabel"][1] == unit
    with tifffile.TiffFile(folder / FORMATS["tiff"]) as tf:
        ij, page = tf.imagej_metadata, tf.pages[0]
        x, y = (den / num for num, den in (page.tags["XResolution"].value, page.tags["YResolution"].value))
        seen["tifffile ImageJ"] = ((x, y, ij["spacing"]), ij["unit"])
    assert seen["tifffile ImageJ"][0] == pytest.approx(spacing, rel=1e-6) and parse_unit(ij["unit"]) == (unit, 1.0)
    with tifffile.TiffFile(folder / FORMATS["ome-tiff"]) as tf:
        assert tf.is_ome
        px = tf.ome_metadata.split("<Pixels ", 1)[1].split(">", 1)[0]
        attrs = dict(kv.split("=", 1) for kv in px.split())
        size = tuple(float(attrs[f"PhysicalSize{a}"].strip('"')) for a in "XYZ")
        units = {attrs[f"PhysicalSize{a}Unit"].strip('"') for a in "XYZ"}
        seen["tifffile OME"] = (size, units)
    assert size == pytest.approx(spacing, rel=1e-6) and {parse_unit(u)[0] for u in units} == {unit}
    monai_nifti = LoadImage(image_only=True)(str(folder / FORMATS["nifti"]))
    assert monai_nifti.pixdim.tolist() == pytest.approx(spacing, rel=1e-6)
    seen["MONAI LoadImage (nibabel)"] = tuple(monai_nifti.pixdim.tolist())
    for fmt, name in FORMATS.items():
        img = LoadImage(reader=VolumeReader(), image_only=False)(str(folder / name))[0]
        assert img.pixdim.tolist() == pytest.approx(spacing, rel=1e-6) and img.meta["spacing_unit"] == unit
        seen[f"MONAI LoadImage (VolumeReader) {fmt}"] = (tuple(img.pixdim.tolist()), img.meta["spacing_unit"])
    return seen


def test_each_reader_reads_each_format_with_its_spacing_and_unit(tmp_path):
    for name in FORMATS.values():
        write_volume(tmp_path / name, _vol(), SPACING, "micron")
    _check_readers(tmp_path, SPACING, "micron")


def test_simpleitk_reads_nifti_and_ome_tiff_in_millimetres(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    write_volume(tmp_path / "a.nii.gz", _vol(), SPACING, "micron")
    write_volume(tmp_path / "a.ome.tif", _vol(), SPACING, "micron")
    assert sitk.ReadImage(str(tmp_path / "a.nii.gz")).GetSpacing() == pytest.approx([s * 1e-3 for s in SPACING])
    # ITK's TIFF reader takes X/Y from TIFF's own resolution unit and has no z spacing
    assert sitk.ReadImage(str(tmp_path / "a.ome.tif")).GetSpacing()[:2] == pytest.approx([s * 1e-3 for s in SPACING[:2]])


# ----------------------------------------------------------------------------------- one voxel size
def test_files_of_another_spacing_are_refused_with_one_line(tmp_path, capsys):
    d = tmp_path / "mixed"
    write_volume(d / "a.nii.gz", _vol((16, 16, 16)), SPACING, "micron")
    write_volume(d / "b.nii.gz", _vol((16, 16, 16)), (0.5, 0.5, 2.0), "micron")
    with pytest.raises(Exception) as e:
        pipeline.scan_volumes(d, "train_data_dir")
    msg = str(e.value)
    assert "b.nii.gz" in msg and "[0.5, 0.5, 2] micron" in msg and "[0.25, 0.5, 2] micron" in msg
    assert "a.nii.gz" in msg and "\n" not in msg
    cfg = tiny_config_dict(tmp_path, tmp_path, patch=(16, 16, 16))
    cfg["data"]["train_data_dir"] = cfg["data"]["val_data_dir"] = str(d)
    assert run_cli("--quiet", "check", "--config", write_config(tmp_path / "c.yaml", cfg)) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz: voxel spacing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_validation_files_of_another_spacing_are_refused(tmp_path):
    for split, spacing in (("train", SPACING), ("val", (1.0, 1.0, 1.0))):
        write_volume(tmp_path / split / "a.nii.gz", _vol((16, 16, 16)), spacing, "micron")
    cfg = config_from_dict(tiny_config_dict(tmp_path, tmp_path, patch=(16, 16, 16)))
    with pytest.raises(Exception, match=r"val/a.nii.gz: voxel spacing \[1, 1, 1\] micron differs"):
        setup.scan_data(cfg, progress=False)


# ----------------------------------------------------------------------------------- through the checkpoints
def _sample(config_path, out, fmt):
    return run_cli("--quiet", "sample", "--config", config_path, "-n", "1", "--scheduler", "ddim", "--steps", "2",
                   "--format", fmt, "--out", out)


def test_samples_in_every_format_carry_the_training_data_unit(trained_stage1, trained_stage2, data_dir, tmp_path):
    train = read_volume(list_volumes(data_dir / "train")[0])
    assert train.unit == "micron"
    for path in (trained_stage1["best"], trained_stage2["best"]):
        meta = torch.load(path, weights_only=True)["data"]
        assert meta["spacing"] == pytest.approx(train.spacing) and meta["spacing_unit"] == "micron"
    for fmt, name in FORMATS.items():
        assert _sample(trained_stage2["config_path"], tmp_path / fmt, fmt) == 0
        assert json.loads((tmp_path / fmt / "samples.json").read_text())["spacing_unit"] == "micron"
        (tmp_path / name).write_bytes((tmp_path / fmt / name).read_bytes())
    _check_readers(tmp_path, train.spacing, "micron")


def test_voxel_resize_records_and_writes_the_resized_spacing(tmp_path, data_dir):
    """32^3 volumes resized to 16^3: every checkpoint and sample has twice the files' spacing."""
    cfg = tiny_config_dict(tmp_path, data_dir, patch=(16, 16, 16))
    cfg = with_updates(cfg, data__voxel_resize=[16, 16, 16], diffusion__scale_factor_batches=4)
    path = write_config(tmp_path / "config.yaml", cfg)
    assert run_cli("--quiet", "train-vqvae", "--config", path) == 0
    assert run_cli("--quiet", "train-diffusion", "--config", path) == 0
    files = read_volume(list_volumes(data_dir / "train")[0])
    resized = [2 * s for s in files.spacing]
    for section in ("vqvae", "diffusion"):
        meta = torch.load(Path(cfg[section]["checkpoints"]["output_dir"]) / "best_model.pt", weights_only=True)["data"]
        assert meta["spacing"] == pytest.approx(resized) and meta["spacing_unit"] == "micron"
    assert _sample(path, tmp_path / "S", "nifti") == 0
    out = read_volume(tmp_path / "S" / "sample_0000.nii.gz")
    assert out.array.shape == (16, 16, 16)
    assert out.spacing == pytest.approx(resized) and out.unit == "micron"


def test_resample_spacing_trains_files_of_differing_spacing_at_one_voxel_size(tmp_path, capsys):
    """data.resample_spacing: files of 0.25 and 0.5 micron resampled to 0.5 micron; recorded as such."""
    for split in ("train", "val"):
        write_volume(tmp_path / split / "fine.nii.gz", _vol((32, 32, 16)), (0.25, 0.25, 0.5), "micron")
        write_volume(tmp_path / split / "coarse.nii.gz", _vol((16, 16, 16), seed=1), (0.5, 0.5, 0.5), "micron")
    cfg = tiny_config_dict(tmp_path, tmp_path, patch=(16, 16, 16))
    with pytest.raises(Exception, match="differs from"):
        setup.scan_data(config_from_dict(cfg), progress=False)
    cfg["data"]["resample_spacing"] = [0.5, 0.5, 0.5]
    train, _ = setup.scan_data(config_from_dict(cfg), progress=False)
    assert train.spacing == (0.5, 0.5, 0.5) and train.unit == "micron"
    val = pipeline.val_dataset(config_from_dict(cfg), train.files)
    assert [tuple(val.volumes[i]["image"].shape) for i in range(2)] == [(1, 16, 16, 16)] * 2
    path = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli("--quiet", "train-vqvae", "--config", path) == 0
    meta = torch.load(tmp_path / "vqvae_checkpoints" / "best_model.pt", weights_only=True)["data"]
    assert meta["spacing"] == [0.5, 0.5, 0.5] and meta["spacing_unit"] == "micron"
    write_volume(tmp_path / "val" / "mm.nii.gz", _vol((16, 16, 16)), (0.5, 0.5, 0.5), "mm")  # a unit is not resampled
    assert run_cli("--quiet", "check", "--config", path) == 2
    assert "mm.nii.gz: voxel spacing after data.resample_spacing [0.5, 0.5, 0.5] mm differs" in capsys.readouterr().err
