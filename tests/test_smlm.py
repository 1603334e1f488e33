"""SMLM localisations in and out: tables, the nm grid, voxelize, points, and the round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, tiny_config_dict, write_config
from vqldm.errors import VqldmError
from vqldm.metrics.pointclouds import chamfer, compare_points, nn_distances, roundtrip
from vqldm.smlm.grid import Grid
from vqldm.smlm.points import point_count, volume_to_points
from vqldm.smlm.tables import read_table, table_bytes, write_table
from vqldm.smlm.voxelize import raw_density

SHAPE = (24, 24, 12)
FOV = (8000.0, 8000.0, 300.0)


@pytest.fixture(scope="module")
def synth_locs(tmp_path_factory):
    """Synthetic volumes with their ground-truth localisation tables (``vqldm synth --locs``)."""
    out = tmp_path_factory.mktemp("smlm") / "data"
    assert run_cli("--quiet", "synth", "--out", out, "--num-train", 3, "--num-val", 1,
                   "--shape", *SHAPE, "--locs") == 0
    return out


def _csv(path, text: str):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ tables
def test_csv_with_extra_and_quoted_columns(tmp_path):
    p = _csv(tmp_path / "t.csv", '"id","frame","x [nm]","y [nm]","z [nm]","uncertainty [nm]"\n'
                                  '1,5,10.5,20.25,-3.0,7\n2,6,11,21,4,8\n')
    np.testing.assert_allclose(read_table(p), [[10.5, 20.25, -3.0], [11, 21, 4]])


def test_written_table_reads_back(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 1000, (50, 3))
    back = read_table(write_table(tmp_path / "w.csv", pts))
    assert table_bytes(pts).startswith(b"x [nm],y [nm],z [nm]\n")
    np.testing.assert_allclose(back, pts, atol=1e-3)


@pytest.mark.parametrize("text, message", [
    ("x [nm],y [nm]\n1,2\n", "missing column(s) 'z [nm]'"),
    ("x,y,z\n1,2,3\n", "missing column(s) 'x [nm]'"),
    ("x [nm],y [nm],z [nm]\n", "holds no localisations"),
    ("x [nm],y [nm],z [nm]\n1,2,3\n4,nan,6\n", "NaN or infinite"),
    ("x [nm],y [nm],z [nm]\n1,2,inf\n", "NaN or infinite"),
    ("x [nm],y [nm],z [nm]\n1,2,abc\n", "not a numeric"),
])
def test_bad_csv_is_one_line_naming_the_file(tmp_path, text, message):
    p = _csv(tmp_path / "bad.csv", text)
    with pytest.raises(VqldmError) as e:
        read_table(p)
    assert str(p) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_hdf5_tables(tmp_path):
    import h5py

    pts = np.arange(30, dtype=np.float64).reshape(10, 3)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["locs"] = pts
        f["other"] = pts[:2]
        f.create_dataset("um", data=pts / 1000.0).attrs["unit"] = "um"
        rec = np.zeros(10, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("frame", "i4")])
        rec["x"], rec["y"], rec["z"] = pts.T
        f["rec"] = rec
    np.testing.assert_allclose(read_table(tmp_path / "a.h5", "locs"), pts)
    np.testing.assert_allclose(read_table(tmp_path / "a.h5", "um"), pts)
    np.testing.assert_allclose(read_table(tmp_path / "a.h5", "rec"), pts)
    with pytest.raises(VqldmError, match="no dataset 'nope'"):
        read_table(tmp_path / "a.h5", "nope")
    with pytest.raises(VqldmError, match="choose one with --key"):
        read_table(tmp_path / "a.h5")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5")
    with pytest.raises(VqldmError, match="not a readable HDF5"):
        read_table(tmp_path / "fake.h5")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(VqldmError, match="not a localisation table"):
        read_table(tmp_path / "t.txt")


# ------------------------------------------------------------------------------------ grid, voxels, points
def test_grid_maps_points_to_voxels_and_back_exactly():
    g = Grid.from_box([100.0, 200.0, 0.0], [900.0, 1000.0, 60.0], padding=[50, 50, 10], voxel_nm=[100, 100, 20])
    assert g.origin_nm == (50.0, 150.0, -10.0) and g.shape == (9, 9, 4)
    pts = np.array([[50.0, 150.0, -10.0], [949.9, 1049.9, 69.9]])
    np.testing.assert_allclose(g.to_nm(g.to_voxel(pts)), pts)
    assert g.inside(pts).all() and not g.inside(np.array([[949.9, 1049.9, 70.0]])).any()
    by_shape = Grid.from_box([0, 0, 0], FOV, shape=SHAPE)
    assert by_shape.voxel_nm == pytest.approx((8000 / 24, 8000 / 24, 25.0))


def test_voxelize_methods_keep_the_count():
    g = Grid.from_box([0, 0, 0], FOV, shape=SHAPE)
    pts = np.random.default_rng(1).uniform([0, 0, 0], FOV, (500, 3))
    assert raw_density(pts, g, "counts").sum() == 500
    assert raw_density(pts, g, "gaussian", [300.0, 300.0, 30.0]).sum() == pytest.approx(500)
    occ = raw_density(pts, g, "occupancy")
    assert set(np.unique(occ)) <= {0.0, 1.0} and occ.sum() <= 500


def test_points_follow_intensity_inside_their_voxels():
    g = Grid((0.0, 0.0, 0.0), (10.0, 10.0, 2.0), (4, 4, 2))
    vol = np.zeros(g.shape, np.float32)
    vol[1, 2, 0], vol[3, 0, 1] = 3.0, 1.0
    pts = volume_to_points(vol, g, point_count(vol, 10.0), np.random.default_rng(0))
    assert len(pts) == 40
    vox = np.floor(g.to_voxel(pts)).astype(int)
    hits = {tuple(v): int(n) for v, n in zip(*np.unique(vox, axis=0, return_counts=True))}
    assert hits == {(1, 2, 0): 30, (3, 0, 1): 10}


def test_roundtrip_reproduces_the_localisations(synth_locs, tmp_path):
    """synth --locs -> voxelize (counts) -> points: the issue's goals, table by table."""
    assert run_cli("--quiet", "voxelize", "--input", synth_locs / "locs" / "train", "--out", tmp_path / "v",
                   "--fov", *FOV, "--shape", *SHAPE, "--method", "counts", "--val-fraction", 0) == 0
    assert run_cli("--quiet", "points", "--volumes", tmp_path / "v" / "train", "--out", tmp_path / "p") == 0
    info = json.loads((tmp_path / "v" / "dataset_info.json").read_text())
    assert info["grid"]["voxel_nm"] == pytest.approx([8000 / 24, 8000 / 24, 25.0])
    import nibabel as nib  # the NIfTI affine places voxel centres where the nm grid does (in micrometres)

    aff = nib.load(next((tmp_path / "v" / "train").glob("*.nii.gz"))).affine
    assert aff[:3, 3] * 1000 == pytest.approx([8000 / 48, 8000 / 48, 12.5], abs=1e-3)
    for rel, rec in info["files"].items():
        truth = read_table(rec["source"])
        r = roundtrip(truth, read_table(tmp_path / "p" / rel.split("/")[1].replace(".nii.gz", ".csv")),
                      info["grid"]["voxel_nm"])
        assert abs(r["count_error"]) <= 0.05
        assert max(abs(v) for v in r["mean_offset_voxels"]) < 0.05
        assert r["chamfer_diagonals"] <= 0.5


def test_per_file_origin_is_undone(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i, off in enumerate(([10000.0, 20000.0, 500.0], [-3000.0, 0.0, 100.0])):
        write_table(src / f"r{i}.csv", off + rng.uniform([0, 0, 0], [2000, 2000, 200], (400, 3)))
    assert run_cli("--quiet", "voxelize", "--input", src, "--out", tmp_path / "v", "--per-file-origin",
                   "--fov", 2000, 2000, 200, "--voxel-size", 50, 50, 10, "--method", "counts",
                   "--val-fraction", 0) == 0
    assert run_cli("--quiet", "points", "--volumes", tmp_path / "v" / "train", "--out", tmp_path / "p") == 0
    for i in range(2):
        truth, back = read_table(src / f"r{i}.csv"), read_table(tmp_path / "p" / f"r{i}.csv")
        assert len(back) == len(truth)
        np.testing.assert_allclose(back.min(axis=0), truth.min(axis=0), atol=60)


# ------------------------------------------------------------------------------------ bad input, no partial output
def test_points_outside_the_field_are_refused_without_output(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_table(src / "a.csv", np.array([[10.0, 10.0, 10.0], [50.0, 50.0, 5.0]]))
    write_table(src / "b.csv", np.array([[10.0, 10.0, 10.0], [5000.0, 50.0, 5.0]]))
    capsys.readouterr()
    rc = run_cli("--quiet", "voxelize", "--input", src, "--out", tmp_path / "v", "--fov", 100, 100, 20,
                 "--shape", 4, 4, 2)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "b.csv" in err and "outside the field of view" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "v" / "dataset_info.json").exists() and not list((tmp_path / "v").rglob("*.nii.gz"))
    assert run_cli("--quiet", "voxelize", "--input", src, "--out", tmp_path / "v", "--fov", 100, 100, 20,
                   "--shape", 4, 4, 2, "--drop-outside", "--method", "counts") == 0
    info = json.loads((tmp_path / "v" / "dataset_info.json").read_text())
    assert sum(r["n_outside_dropped"] for r in info["files"].values()) == 1
    rc = run_cli("voxelize", "--input", src, "--out", tmp_path / "v", "--shape", 4, 4, 2)
    assert rc != 0 and "refusing to overwrite" in capsys.readouterr().err


def test_points_without_geometry_is_one_line(tmp_path, data_dir, capsys):
    rc = run_cli("points", "--volumes", data_dir / "val", "--out", tmp_path / "p")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--info" in err and str(data_dir / "val") in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------ point statistics
def test_point_statistics_separate_wrong_clouds():
    rng = np.random.default_rng(3)
    line = lambda n: np.stack([rng.uniform(0, 5000, n), 2500 + rng.normal(0, 10, n), rng.normal(150, 10, n)], 1)
    real = [line(int(rng.integers(900, 1100))) for _ in range(8)]
    good = [line(int(rng.integers(900, 1100))) for _ in range(4)]
    blob = [rng.uniform(0, 5000, (1000, 3)) * [1, 1, 0.06] for _ in range(4)]
    assert chamfer(real[0], real[0]) == 0.0 and nn_distances(real[0]).min() >= 0
    ok, bad = compare_points(real, good), compare_points(real, blob)
    assert ok["summary"]["within_2x_floor"], ok["statistics"]
    assert bad["statistics"]["chamfer"]["ratio"] > 3 * ok["statistics"]["chamfer"]["ratio"]
    assert "nn_distance" in bad["summary"]["failed"]


def test_evaluate_points_writes_metrics_report_and_picture(synth_locs, tmp_path, capsys):
    """`evaluate --points`: generated tables vs real ones (default: the val volumes through `points`)."""
    v = tmp_path / "v"
    assert run_cli("--quiet", "voxelize", "--input", synth_locs / "locs" / "train", "--out", v, "--fov", *FOV,
                   "--shape", *SHAPE, "--val-fraction", 0.0) == 0
    (v / "val").mkdir()
    for f in sorted((v / "train").glob("*.nii.gz"))[:2]:  # two held-out volumes on the same grid
        (v / "val" / f.name).write_bytes(f.read_bytes())
    assert run_cli("--quiet", "points", "--volumes", v / "train", "--out", tmp_path / "gen") == 0
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, v))
    assert run_cli("--quiet", "evaluate", "-c", cfg, "--points", tmp_path / "gen", "--out", tmp_path / "e") == 0
    res = json.loads((tmp_path / "e" / "points_metrics.json").read_text())
    assert res["n_real"] == 2 and res["n_generated"] == 3 and "via points" in res["real_source"]
    assert set(res["statistics"]) == {"n_localisations", "nn_distance", "chamfer"}
    assert (tmp_path / "e" / "points.png").stat().st_size > 0
    assert "| chamfer |" in (tmp_path / "e" / "points_report.md").read_text()
    rc = run_cli("evaluate", "-c", cfg, "--points", tmp_path / "nothing", "--out", tmp_path / "e2")
    assert rc != 0 and "--points" in capsys.readouterr().err


def test_a_voxelized_data_set_trains_and_samples_localisations(synth_locs, tmp_path, trained_stage2, capsys):
    """voxelize -> train both stages -> sample --format points: density kept, geometry exact, units in nm/micron."""
    import torch

    from vqldm.data.io import read_volume

    v = tmp_path / "v"
    assert run_cli("--quiet", "voxelize", "--input", synth_locs / "locs" / "train", "--out", v, "--fov", *FOV,
                   "--shape", 32, 32, 32, "--val-fraction", 0.34) == 0
    info = json.loads((v / "dataset_info.json").read_text())
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, v))
    capsys.readouterr()
    assert run_cli("--quiet", "check", "-c", cfg, "--json") == 0
    norm = json.loads(capsys.readouterr().out)["normalization"]
    assert norm["method"] == "fixed" and norm["smlm"]["counts_per_intensity"] == info["counts_per_intensity"]
    assert run_cli("--quiet", "train-vqvae", "-c", cfg) == 0
    assert run_cli("--quiet", "train-diffusion", "-c", cfg) == 0
    ckpt = torch.load(tmp_path / "vqvae_checkpoints" / "best_model.pt", weights_only=True, map_location="cpu")
    assert ckpt["normalization"]["method"] == "fixed"  # data.normalize: auto on a voxelize data set
    assert ckpt["data"]["smlm"]["counts_per_intensity"] == pytest.approx(info["counts_per_intensity"])
    assert ckpt["data"]["spacing_unit"] == "micron"
    assert run_cli("--quiet", "sample", "-c", cfg, "-n", 2, "--format", "points", "--out", tmp_path / "s") == 0
    grid = Grid.from_dict(info["grid"])
    for i in range(2):
        vol = read_volume(tmp_path / "s" / f"sample_{i:04d}.nii.gz")
        pts = read_table(tmp_path / "s" / f"sample_{i:04d}.csv", allow_empty=True)
        assert vol.unit == "micron" and vol.spacing == pytest.approx(grid.spacing_um)
        assert len(pts) == point_count(vol.array, info["counts_per_intensity"]) and grid.inside(pts).all()
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["smlm"]["grid"] == info["grid"]
    # a stage 1 trained on plain volumes has no density to restore: one line, no samples
    capsys.readouterr()
    rc = run_cli("--quiet", "sample", "-c", trained_stage2["config_path"], "-n", 1, "--format", "points",
                 "--out", tmp_path / "s2")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--format points" in err and "vqldm points --info" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "s2").glob("sample_*")) if (tmp_path / "s2").exists() else True


def test_synth_tables_stay_inside_the_field_after_rounding(monkeypatch):
    """Written tables keep 0.001 nm; no point may round onto the far edge of the field (outside the grid)."""
    import vqldm.synth.microtubules as mt

    real = mt._localisations

    def with_edge_point(rng, p, n):
        locs, info = real(rng, p, n)
        return np.concatenate([locs, [[7999.9999, 10.0, 299.99996]]]), info

    monkeypatch.setattr(mt, "_localisations", with_edge_point)
    g = Grid.from_box([0, 0, 0], mt.MicrotubuleParams().fov_nm, shape=SHAPE)
    _, truth, pts = mt.synth_volume_and_locs(SHAPE, np.random.default_rng(0))
    assert g.inside(np.round(pts, 3)).all() and len(pts) <= truth["n_localisations"]
    assert np.isclose(pts[:, 0], 7999.999, atol=1e-3).any()  # kept, a hair inside


def test_scale_rules(synth_locs, tmp_path, capsys):
    """peak keeps every intensity within [0, 1]; the p99.9 default lifts filaments, keeping the density."""
    from vqldm.data.io import read_volume

    def run(name, *extra):
        assert run_cli("--quiet", "voxelize", "--input", synth_locs / "locs" / "train", "--out", tmp_path / name,
                       "--fov", *FOV, "--shape", *SHAPE, "--val-fraction", 0, *extra) == 0
        info = json.loads((tmp_path / name / "dataset_info.json").read_text())
        vols = [read_volume(tmp_path / name / rel).array for rel in info["files"]]
        return info, vols

    peak, vp = run("peak", "--scale", "peak")
    p999, v9 = run("p999")
    fixed, _ = run("fixed", "--scale", 7.5)
    assert max(v.max() for v in vp) == pytest.approx(1.0) and peak["above_one_fraction"] == 0
    assert p999["scale_rule"] == "p99.9" and p999["counts_per_intensity"] < peak["counts_per_intensity"]
    assert max(v.max() for v in v9) > 1 and 0 < p999["above_one_fraction"] < 0.05
    assert np.mean([(v > 0.1).mean() for v in v9]) > np.mean([(v > 0.1).mean() for v in vp])
    for info, vols in ((peak, vp), (p999, v9)):  # either way the files restore every localisation
        counts = [r["n_localisations"] for r in info["files"].values()]
        assert [point_count(v, info["counts_per_intensity"]) for v in vols] == pytest.approx(counts, abs=1)
    assert fixed["counts_per_intensity"] == 7.5
    capsys.readouterr()
    assert run_cli("voxelize", "--input", synth_locs / "locs" / "train", "--out", tmp_path / "bad",
                   "--shape", *SHAPE, "--scale", "p0") != 0
    assert "--scale 'p0'" in capsys.readouterr().err


def test_output_names_never_collide(tmp_path, capsys):
    """a.1.nii.gz and a.2.nii.gz give a.1.csv and a.2.csv; a.nii beside a.nii.gz is refused before any write."""
    from vqldm.data.io import write_volume

    g = Grid((0.0, 0.0, 0.0), (10.0, 10.0, 10.0), (4, 4, 2))
    info = {"format": "vqldm-smlm-dataset", "grid": g.to_dict(), "method": "counts", "counts_per_intensity": 5.0}
    vols = tmp_path / "v"
    vols.mkdir()
    (vols / "dataset_info.json").write_text(json.dumps(info))
    for name in ("a.1.nii.gz", "a.2.nii.gz"):
        write_volume(vols / name, np.ones(g.shape, np.float32), g.spacing_um, "micron")
    assert run_cli("--quiet", "points", "--volumes", vols, "--out", tmp_path / "p") == 0
    assert sorted(p.name for p in (tmp_path / "p").glob("*.csv")) == ["a.1.csv", "a.2.csv"]
    write_volume(vols / "a.1.nii", np.ones(g.shape, np.float32), g.spacing_um, "micron")
    capsys.readouterr()
    assert run_cli("--quiet", "points", "--volumes", vols, "--out", tmp_path / "p2") != 0
    err = capsys.readouterr().err.strip()
    assert "a.1.nii and a.1.nii.gz" in err and len(err.splitlines()) == 1 and not (tmp_path / "p2").exists()


def test_a_broken_samples_json_is_one_line(tmp_path, capsys):
    from vqldm.data.io import write_volume

    write_volume(tmp_path / "sample_0000.nii.gz", np.ones((4, 4, 2), np.float32), (0.01, 0.01, 0.01), "micron")
    (tmp_path / "samples.json").write_text("{not json")
    assert run_cli("--quiet", "points", "--volumes", tmp_path, "--out", tmp_path / "p") != 0
    err = capsys.readouterr().err.strip()
    assert "samples.json: not a readable samples.json" in err and "internal error" not in err


def test_density_is_recorded_only_where_training_kept_it(synth_locs, tmp_path):
    """data.normalize per_volume throws the shared scale away, so the checkpoint must not claim it."""
    from vqldm.autoencoder.task import VQVAETask
    from vqldm.config import config_from_dict
    from vqldm.data.pipeline import normalization_of
    from vqldm.runtime import make_runtime

    v = tmp_path / "v"
    assert run_cli("--quiet", "voxelize", "--input", synth_locs / "locs" / "train", "--out", v, "--fov", *FOV,
                   "--shape", 32, 32, 32, "--val-fraction", 0.34) == 0
    for method, recorded in (("auto", True), ("fixed", True), ("per_volume", False)):
        d = tiny_config_dict(tmp_path, v)
        d["data"]["normalize"] = method
        cfg = config_from_dict(d, "test")
        task = VQVAETask(cfg, make_runtime(cfg), normalization_of(cfg), (1.0, 1.0, 1.0))
        assert (task.checkpoint_meta()["data"]["smlm"] is not None) == recorded, method
