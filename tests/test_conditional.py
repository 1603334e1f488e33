"""Class-conditional diffusion (issue 17, first slice): labels files, the UNet's class embedding,
classifier-free guidance, ``vqldm sample --class/--guidance`` and ``vqldm synth --vary density``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import labelled_prior, run_cli, tiny_config_dict, write_config
from vqldm.checkpoint import load_checkpoint
from vqldm.data.labels import LabelledDataset, class_index, class_labels, read_labels, read_table
from vqldm.errors import VqldmError
from vqldm.priors.diffusion.task import DiffusionTask
from vqldm.priors.diffusion.conditions import Asked, Slots, guided
from vqldm.priors.diffusion.unet import as_denoiser, build_unet, guidance_mix

NET = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "channels": [16, 32],
       "attention_levels": [False, False], "num_head_channels": [0, 8], "num_res_blocks": 1,
       "norm_num_groups": 8, "num_class_embeds": 4}


# ---------------------------------------------------------------------------------- labels files
def _files(tmp_path, names):
    return [tmp_path / n for n in names]


def test_csv_and_json_labels_give_the_same_classes(tmp_path):
    (tmp_path / "a.csv").write_text("file,label\nx.nii.gz,b\ny.nii.gz,a\nsub/z.nii.gz,b\n")
    (tmp_path / "a.json").write_text(json.dumps({"x.nii.gz": "b", "y.nii.gz": {"label": "a"}, "sub/z.nii.gz": "b"}))
    assert read_labels(tmp_path / "a.csv") == read_labels(tmp_path / "a.json") == {
        "x.nii.gz": "b", "y.nii.gz": "a", "sub/z.nii.gz": "b"}
    for f in ("a.csv", "a.json"):
        lab = class_labels(tmp_path / f, _files(tmp_path, ["x.nii.gz", "y.nii.gz"]), _files(tmp_path, ["sub/z.nii.gz"]))
        assert lab.classes == ["a", "b"] and lab.train == [1, 0] and lab.val == [1] and lab.null == 2
    with pytest.raises(VqldmError, match="without a label, e.g. z.nii.gz"):  # sub/z names that file only
        class_labels(tmp_path / "a.csv", _files(tmp_path, ["x.nii.gz", "y.nii.gz"]), _files(tmp_path, ["z.nii.gz"]))


def test_path_keys_tell_a_train_and_a_val_file_of_one_name_apart_and_covariates_are_normalised(tmp_path):
    (tmp_path / "l.csv").write_text("file,label,density\ntrain/x.nii.gz,a,2\ntrain/y.nii.gz,b,6\n"
                                    "val/x.nii.gz,b,8\ny.nii.gz,a,4\n")
    train, val = _files(tmp_path, ["train/x.nii.gz", "train/y.nii.gz"]), _files(tmp_path, ["val/x.nii.gz", "val/y.nii.gz"])
    t = read_table(tmp_path / "l.csv")
    assert t.columns == ["label", "density"] and t.key_of(val[1]) == "y.nii.gz" and t.key_of(train[1]) == "train/y.nii.gz"
    lab = class_labels(tmp_path / "l.csv", train, val, covariates=["density"])
    assert lab.train == [0, 1] and lab.val == [1, 0]
    assert lab.covariates == {"density": [2.0, 6.0]}  # the training range
    assert lab.train_values == [[0.0], [1.0]] and lab.val_values == [[1.5], [0.5]]
    with pytest.raises(VqldmError, match="'thickness' is not a numeric column"):
        class_labels(tmp_path / "l.csv", train, val, covariates=["thickness"])
    (tmp_path / "bad.csv").write_text("file,density\ntrain/x.nii.gz,2\ntrain/y.nii.gz,lots\nval/x.nii.gz,1\n"
                                      "val/y.nii.gz,1\n")
    with pytest.raises(VqldmError, match="train/y.nii.gz: density 'lots' is not a finite number"):
        class_labels(tmp_path / "bad.csv", train, val, covariates=["density"])
    (tmp_path / "flat.csv").write_text("file,density\nx.nii.gz,3\ny.nii.gz,3\n")
    with pytest.raises(VqldmError, match="takes one value"):
        class_labels(tmp_path / "flat.csv", train, val, covariates=["density"])
    with pytest.raises(VqldmError, match="no label column"):
        class_labels(tmp_path / "flat.csv", train, val)


def test_class_subfolders_are_the_classes(tmp_path):
    from vqldm.data.io import list_volumes

    for split, cls, n in [("train", "dense", 2), ("train", "sparse", 1), ("val", "dense", 1), ("val", "sparse", 1)]:
        (tmp_path / split / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / split / cls / f"v{i}.nii.gz").write_bytes(b"")
    train, val = list_volumes(tmp_path / "train", nested=True), list_volumes(tmp_path / "val", nested=True)
    assert [f"{f.parent.name}/{f.name}" for f in train] == ["dense/v0.nii.gz", "dense/v1.nii.gz", "sparse/v0.nii.gz"]
    assert list_volumes(tmp_path / "train") == []
    lab = class_labels(None, train, val, folders=True)
    assert lab.classes == ["dense", "sparse"] and lab.train == [0, 0, 1] and lab.val == [0, 1]
    (tmp_path / "l.csv").write_text("v0.nii.gz,a\nv1.nii.gz,b\n")
    with pytest.raises(VqldmError, match="has a label column, but data.class_folders"):
        class_labels(tmp_path / "l.csv", train, val, folders=True)
    with pytest.raises(VqldmError, match="at least two class subfolders"):
        class_labels(None, train[:2], val[:1], folders=True)


@pytest.mark.parametrize("text, match", [
    ("file,label\nx.nii.gz,a\n", "without a label, e.g. y.nii.gz"),
    ("x.nii.gz,a\ny.nii.gz,b\ngone.nii.gz,a\n", "a label for gone.nii.gz, which is in neither data folder"),
    ("x.nii.gz,a\ny.nii.gz,a\n", "at least two classes"),
    ("x.nii.gz,a,extra\n", "is not `file,label`"),
    ("file,label,n\nx.nii.gz,a\n", "is not `file,label,n`"),
    ("file,label,label\nx.nii.gz,a,b\n", "distinct, named columns"),
])
def test_bad_labels_files_are_refused_in_one_line(tmp_path, text, match):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(VqldmError, match=match) as e:
        class_labels(tmp_path / "l.csv", _files(tmp_path, ["x.nii.gz", "y.nii.gz"]), [])
    assert "\n" not in str(e.value)


def test_a_label_for_a_file_left_out_by_a_volume_limit_is_not_an_error(tmp_path):
    (tmp_path / "l.csv").write_text("x.nii.gz,a\ny.nii.gz,b\nz.nii.gz,a\n")
    used, all_files = _files(tmp_path, ["x.nii.gz", "y.nii.gz"]), _files(tmp_path, ["x.nii.gz", "y.nii.gz", "z.nii.gz"])
    assert class_labels(tmp_path / "l.csv", used, [], existing=all_files).train == [0, 1]
    with pytest.raises(VqldmError, match="a label for z.nii.gz"):
        class_labels(tmp_path / "l.csv", used, [])


def test_class_names_at_sampling():
    assert class_index(["a", "b"], "b") == 1
    with pytest.raises(VqldmError, match="unknown class; this model knows a, b"):
        class_index(["a", "b"], "c")
    with pytest.raises(VqldmError, match="this model is unconditional"):
        class_index(None, "a")


def test_labelled_dataset_gives_each_item_its_volumes_class():
    base = [{"latent": torch.zeros(1)} for _ in range(6)]  # 3 volumes x 2 crops, item i from volume i % 3
    ds = LabelledDataset(base, [2, 0, 1])
    assert [int(ds[i]["label"]) for i in range(6)] == [2, 0, 1, 2, 0, 1]


# ------------------------------------------------------------------------------------- guidance
def _unet():
    torch.manual_seed(0)
    net = build_unet(NET).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution: give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def test_guidance_zero_is_the_unconditional_and_one_the_conditional_prediction():
    net = _unet()
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        cond = net(x=x, timesteps=t, class_labels=torch.tensor([1, 1]))
        uncond = net(x=x, timesteps=t, class_labels=torch.tensor([3, 3]))  # 3 classes + the null, index 3
        assert not torch.allclose(cond, uncond)  # the class embedding matters
        den, slots = as_denoiser(net), Slots.of(NET)
        assert slots == Slots(3, 0, 0)
        assert torch.equal(guided(den, slots, Asked(label=1), 0.0)(x, t), uncond)
        assert torch.equal(guided(den, slots, Asked(label=1), 1.0)(x, t), cond)
        assert torch.equal(guided(den, slots, None, 1.0)(x, t), uncond)
        w3 = guided(den, slots, Asked(label=1), 3.0)(x, t)
    assert torch.allclose(w3, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert not torch.allclose(w3, cond)
    # the mix itself is exact at both ends, whatever the values
    a, b = torch.randn(1000) * 1e3, torch.randn(1000)
    assert torch.equal(guidance_mix(a, b, 0.0), a) and torch.equal(guidance_mix(a, b, 1.0), b)


def test_condition_drop_replaces_labels_by_the_null_at_the_configured_rate():
    def task(p):
        return SimpleNamespace(classes=["a", "b", "c"], slots=Slots(3, 0, 0), extra_channels=0,
                               rt=SimpleNamespace(to_device=lambda x: x),
                               cfg=SimpleNamespace(diffusion=SimpleNamespace(condition_drop_prob=p)))

    labels = torch.randint(0, 3, (20000,))
    torch.manual_seed(0)
    out = DiffusionTask.condition_of(task(0.2), {"label": labels}, drop=True)["class_labels"]
    dropped = out == 3
    assert 0.18 < dropped.float().mean() < 0.22
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(DiffusionTask.condition_of(task(0.2), {"label": labels}, drop=False)["class_labels"], labels)
    assert torch.equal(DiffusionTask.condition_of(task(0.0), {"label": labels}, drop=True)["class_labels"], labels)


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, trained_stage1):
    """``vqldm synth --vary density --levels 3`` and a 1-epoch class-conditional stage 2 on it."""
    return labelled_prior(tmp_path_factory.mktemp("cond_run"), trained_stage1["best"])  # 1 epoch


def test_synth_writes_density_levels_and_their_labels(labelled_run):
    data = labelled_run["data"]
    gt = json.loads((data / "ground_truth.json").read_text())
    rows = [r.split(",") for r in (data / "labels.csv").read_text().splitlines()]
    assert rows[0] == ["file", "label", "n_filaments", "persistence_nm", "foreground_fraction"]
    want = [[f"{s}/mt_{i:04d}.nii.gz", f"level{i}", str(gt[s][f"mt_{i:04d}.nii.gz"]["n_filaments"])]
            for s in ("train", "val") for i in range(3)]
    assert [r[:3] for r in rows[1:]] == want
    truth = [gt[s][f"mt_{i:04d}.nii.gz"] for s in ("train", "val") for i in range(3)]
    assert [float(r[3]) for r in rows[1:]] == pytest.approx([sum(t["persistence_nm"]) / len(t["persistence_nm"])
                                                             for t in truth], abs=0.06)
    assert [float(r[4]) for r in rows[1:]] == pytest.approx([t["foreground_fraction"] for t in truth], rel=1e-5)
    assert [gt["levels"][f"level{k}"]["n_filaments"] for k in range(3)] == [[4, 6], [10, 15], [25, 35]]
    counts = [gt["train"][f"mt_{i:04d}.nii.gz"]["n_filaments"] for i in range(3)]
    assert 4 <= counts[0] <= 6 and 10 <= counts[1] <= 15 and 25 <= counts[2] <= 35


def test_synth_varies_stiffness_in_levels_and_labels_each_volume(tmp_path):
    from vqldm.synth import write_dataset
    from vqldm.synth.microtubules import MicrotubuleParams, stiffness_levels

    lv = stiffness_levels(MicrotubuleParams(), 3)
    assert [round(v.persistence_nm[0] / 0.85) for v in lv.values()] == [2000, 8944, 40000]
    s = write_dataset(tmp_path / "d", 3, 0, (32, 32, 16), seed=0, progress=False, levels=3, vary="stiffness")
    gt = json.loads(Path(s["ground_truth"]).read_text())
    assert gt["varied"] == "stiffness"
    table = read_table(s["labels_file"])
    for i, (name, level) in enumerate(lv.items()):
        t = gt["train"][f"mt_{i:04d}.nii.gz"]
        lo, hi = level.persistence_nm
        assert all(lo <= v <= hi for v in t["persistence_nm"])
        row = table.rows[f"train/mt_{i:04d}.nii.gz"]
        assert row["label"] == name and lo <= float(row["persistence_nm"]) <= hi
    with pytest.raises(VqldmError, match="--vary thickness: choose density or stiffness"):
        write_dataset(tmp_path / "e", 1, 0, (32, 32, 16), seed=0, progress=False, levels=2, vary="thickness")


def test_too_many_density_levels_are_refused_in_one_line():
    from vqldm.synth.microtubules import MicrotubuleParams, density_levels

    assert len(density_levels(MicrotubuleParams(), 4)) == 4
    with pytest.raises(VqldmError, match="ranges would overlap"):
        density_levels(MicrotubuleParams(), 12)
    with pytest.raises(VqldmError, match="at least 2"):
        density_levels(MicrotubuleParams(), 1)


def test_the_checkpoint_records_the_classes_and_the_class_embedding(labelled_run):
    ckpt = load_checkpoint(labelled_run["best"], kind="diffusion", what="test")
    assert ckpt["classes"] == ["level0", "level1", "level2"]
    assert ckpt["network"]["num_class_embeds"] == 4


def test_sample_records_class_and_guidance(labelled_run, tmp_path):
    args = ["--quiet", "sample", "--config", labelled_run["config_path"], "-n", 2, "--steps", 3, "--batch-size", 2]
    assert run_cli(*args, "--out", tmp_path / "a", "--class", "level2", "--guidance", 2.0) == 0
    rec = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rec["class"] == "level2" and rec["guidance"] == 2.0 and rec["classes"] == ["level0", "level1", "level2"]
    assert rec["conditions"]["sample_0001"] == {"class": "level2", "guidance": 2.0}
    assert run_cli(*args, "--out", tmp_path / "b") == 0  # no --class: the null class
    assert json.loads((tmp_path / "b" / "samples.json").read_text())["class"] is None


def test_unknown_class_and_unconditional_model_are_refused(labelled_run, trained_stage2, tmp_path, capsys):
    assert run_cli("sample", "--config", labelled_run["config_path"], "-n", 1, "--steps", 2,
                   "--out", tmp_path / "a", "--class", "level9") != 0
    assert "unknown class; this model knows level0, level1, level2" in capsys.readouterr().err
    assert run_cli("sample", "--config", trained_stage2["config_path"], "-n", 1, "--steps", 2,
                   "--out", tmp_path / "b", "--class", "level0") != 0
    err = capsys.readouterr().err
    assert "this model is unconditional" in err and len(err.strip().splitlines()) == 1


def test_training_refuses_a_file_without_a_label(labelled_run, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nmt_0000.nii.gz,level0\nmt_0001.nii.gz,level1\n")
    cfg = tiny_config_dict(tmp_path, labelled_run["data"])
    cfg["data"]["labels_file"] = str(labels)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = labelled_run["config"]["diffusion"]["checkpoints"]["vqvae_path"]
    assert run_cli("train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) != 0
    assert "without a label, e.g. mt_0002.nii.gz" in capsys.readouterr().err


def test_on_the_fly_patches_carry_their_labels_too(labelled_run, tmp_path):
    cfg = tiny_config_dict(tmp_path, labelled_run["data"])
    cfg["data"]["labels_file"] = labelled_run["config"]["data"]["labels_file"]
    cfg["data"]["augmentation"] = True  # no latent cache: MONAI transforms, patches encoded each batch
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = labelled_run["config"]["diffusion"]["checkpoints"]["vqvae_path"]
    cfg["diffusion"]["training"]["n_epochs"] = 1
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    best = Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt"
    assert load_checkpoint(best, kind="diffusion", what="test")["classes"] == ["level0", "level1", "level2"]


def test_api_guidance_zero_samples_exactly_the_null_class(labelled_run):
    import numpy as np

    import vqldm

    model = vqldm.load_model(labelled_run["config_path"], device="cpu")
    kw = {"seed": 4, "sampler": "ddim", "steps": 3, "batch_size": 2}
    null = model.sample(2, **kw).volumes
    w0 = model.sample(2, class_name="level1", guidance=0.0, **kw).volumes
    w1 = model.sample(2, class_name="level1", guidance=1.0, **kw).volumes
    assert np.array_equal(w0, null) and w1.shape == null.shape and np.isfinite(w1).all()
    with pytest.raises(VqldmError, match="unknown class"):
        model.sample(1, class_name="nope", **kw)


def test_real_density_levels_are_told_apart_by_simple_statistics(tmp_path):
    """The levels must be separable in real volumes, or no condition-accuracy goal could be met: nearest
    centroid on (foreground fraction, mean intensity), leave one out, 10 volumes per level."""
    import numpy as np

    from vqldm.data.io import list_volumes, read_volume
    from vqldm.synth import write_dataset

    s = write_dataset(tmp_path / "d", 30, 0, (64, 64, 32), seed=1, progress=False, levels=3)
    labels = read_table(s["labels_file"])
    feats, y = [], []
    for f in list_volumes(tmp_path / "d" / "train"):
        v = read_volume(f).array
        feats.append([(v > 0.1).mean(), v.mean()])
        y.append(int(labels.class_of(f)[-1]))
    z, y = np.array(feats), np.array(y)
    z = (z - z.mean(0)) / z.std(0)
    hits = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        centres = np.array([z[rest & (y == k)].mean(0) for k in range(3)])
        hits += int(np.argmin(((centres - z[i]) ** 2).sum(1)) == y[i])
    assert hits / len(y) >= 0.9


def test_conditional_resume_equals_uninterrupted_and_other_classes_are_refused(labelled_run, trained_stage1,
                                                                              tmp_path, capsys):
    from test_reliability import (BEST, LATEST, assert_same_checkpoint, cli, out_dir, stage2_cfg,
                                  stage2_resumed_and_uninterrupted)

    def cfg(name, n):
        c = stage2_cfg(tmp_path / name, labelled_run["data"], trained_stage1["best"], n_epochs=n)
        c["data"]["labels_file"] = labelled_run["config"]["data"]["labels_file"]
        return c

    a, u = cfg("a", 1), cfg("u", 3)
    cfg_a, latest_a = stage2_resumed_and_uninterrupted(capsys, tmp_path, a, u)
    roots = (tmp_path / "a", tmp_path / "u")
    assert_same_checkpoint(latest_a, out_dir(u, "diffusion") / LATEST, roots)
    assert_same_checkpoint(out_dir(a, "diffusion") / BEST, out_dir(u, "diffusion") / BEST, roots)

    other = tmp_path / "other.csv"  # the same files, other class names
    other.write_text("mt_0000.nii.gz,low\nmt_0001.nii.gz,mid\nmt_0002.nii.gz,high\n")
    rc, _, err = cli(capsys, "train-diffusion", "--config", cfg_a, "--set", "diffusion.training.n_epochs=4",
                     "--set", f"diffusion.checkpoints.resume_from={latest_a}", "--set", f"data.labels_file={other}")
    assert rc != 0 and "was trained with classes ['level0', 'level1', 'level2']" in err


# ---------------------------------------------------------------------------------- evaluation per class
def test_condition_classifier_separates_dense_from_sparse_volumes():
    import numpy as np

    from vqldm.metrics.conditions import ConditionClassifier

    rng = np.random.default_rng(0)

    def vols(fg, n):
        return [(rng.random((8, 8, 8)) < fg).astype(np.float32) * 0.8 for _ in range(n)]

    clf = ConditionClassifier.fit({"sparse": vols(0.02, 5), "dense": vols(0.3, 5)})
    assert clf.classes == ["dense", "sparse"] and clf.leave_one_out == 1.0
    assert clf.predict(vols(0.3, 3) + vols(0.02, 2)) == ["dense"] * 3 + ["sparse"] * 2
    acc, counts = clf.accuracy(vols(0.3, 4), "sparse")
    assert acc == 0.0 and counts == {"dense": 4, "sparse": 0}


def test_evaluate_judges_each_class_folder_against_the_real_volumes_of_its_class(labelled_run, tmp_path):
    import numpy as np

    from vqldm.commands.sample import read_samples
    from vqldm.data.io import list_volumes, read_volume
    from vqldm.metrics.conditions import ConditionClassifier

    data = tmp_path / "data"  # more held-out volumes than the shared run has: two per class at least
    assert run_cli("--quiet", "synth", "--out", data, "--num-train", 3, "--num-val", 6, "--shape", 32, 32, 32,
                   "--vary", "density", "--levels", 3, "--seed", 5) == 0
    cfg = json.loads(json.dumps(labelled_run["config"]))
    cfg["data"].update(train_data_dir=str(data / "train"), val_data_dir=str(data / "val"),
                       labels_file=str(data / "labels.csv"))
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    folders = []
    for cls in ("level0", "level2"):
        folders.append(tmp_path / cls)
        assert run_cli("--quiet", "sample", "--config", labelled_run["config_path"], "-n", 3, "--steps", 2,
                       "--class", cls, "--out", folders[-1]) == 0
    assert run_cli("--quiet", "evaluate", "--config", cfg_path, "--samples", folders[0], "--samples", folders[1],
                   "--out", tmp_path / "ev") == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_class"]
    labels = read_table(data / "labels.csv")
    by_class = {}
    for f in list_volumes(data / "train"):
        by_class.setdefault(labels.class_of(f), []).append(np.clip(read_volume(f).array, 0, 1))
    clf = ConditionClassifier.fit(by_class)
    assert [e["class"] for e in res["folders"]] == ["level0", "level2"]
    for e, folder in zip(res["folders"], folders):
        want = sum(1 for f in list_volumes(data / "val") if labels.class_of(f) == e["class"])
        assert e["n_real"] == want >= 2
        assert e["accuracy"] == clf.accuracy(read_samples(folder), e["class"])[0]
        assert sum(e["classified_as"].values()) == e["n"] == 3
        assert {"foreground_fraction", "segment_straightness", "mmd"} <= set(e["ratios"])
    assert (tmp_path / "ev" / "classes.png").is_file()
    assert "## Per class" in (tmp_path / "ev" / "report.md").read_text()


def test_per_class_evaluation_needs_labels_and_refuses_mixed_folders(labelled_run, tmp_path, capsys):
    from test_reliability import assert_clean_error, cli

    from vqldm.commands.evaluate_classes import is_conditional

    with pytest.raises(VqldmError, match="some folders hold samples of one class"):
        is_conditional([{"class": "level0"}, {"prior": "diffusion"}])
    assert not is_conditional([{"prior": "diffusion"}]) and is_conditional([{"class": "level1"}])
    assert run_cli("--quiet", "sample", "--config", labelled_run["config_path"], "-n", 1, "--steps", 2,
                   "--class", "level1", "--out", tmp_path / "s") == 0
    cfg = json.loads(json.dumps(labelled_run["config"]))
    cfg["data"]["labels_file"] = None
    rc, _, err = cli(capsys, "evaluate", "--config", write_config(tmp_path / "c.yaml", cfg), "--samples",
                     tmp_path / "s", "--out", tmp_path / "ev")
    assert_clean_error(rc, err, "data.labels_file")


def test_edit_takes_a_class_and_records_it(labelled_run, tmp_path, capsys):
    from test_reliability import assert_clean_error, cli

    from vqldm.data.io import list_volumes

    vol = list_volumes(labelled_run["data"] / "val")[0]
    args = ["edit", "sdedit", "--config", labelled_run["config_path"], "--input", vol, "--strength", 0.5, "-n", 1,
            "--steps", 4]
    rc, _, err = cli(capsys, "--quiet", *args, "--class", "level2", "--guidance", 2, "--out", tmp_path / "a")
    assert rc == 0, err
    records = [json.loads(p.read_text()) for p in (tmp_path / "a").glob("*.json")]
    assert records and all(r["class"] == "level2" and r["guidance"] == 2.0 for r in records)
    rc, _, err = cli(capsys, *args, "--class", "level9", "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--class level9", "unknown class")
