"""Stage 1 (issue 3): losses, codebook health, checkpoints, TensorBoard, resume and overwrite."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vqldm.config import LossConfig, config_from_dict
from vqldm.data.io import list_volumes, read_volume
from vqldm.data.pipeline import normalization_of, normalize_unit
from vqldm.runtime import Runtime, make_runtime
from vqldm.autoencoder.codebook import CodebookTracker, flat_latents, init_from_data, restart_codes
from vqldm.autoencoder.losses import RECONSTRUCTION_LOSSES, reconstruction_loss
from vqldm.autoencoder.model import build_vqvae, vqvae_net_config
from vqldm.latents import load_vqvae
from vqldm.autoencoder.task import VQVAETask
from vqldm.engine.trainer import StepContext
from vqldm.checkpoint import load_checkpoint

from conftest import copy_tree, run_cli, run_cli_subprocess, tiny_config_dict, write_config

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, compile=False, cuda_graphs=False)
LOSSES = ["l1", "mse", "weighted", "dice", "combined"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sparse_target(intensity_range=(0.0, 1.0)) -> torch.Tensor:
    """(2, 1, 16, 16, 16): a few bright one-voxel-thin filaments on black (< 1% foreground)."""
    t = torch.zeros(2, 1, 16, 16, 16)
    t[0, 0, :, 4, 7] = 1.0
    t[0, 0, 9, :, 3] = 0.7
    t[1, 0, 2:14, 11, 12] = 0.9
    t[1, 0, 5, 5, 1:15] = 1.0
    lo, hi = intensity_range
    return t * (hi - lo) + lo


def loss_fn(name, intensity_range=(0.0, 1.0)):
    return reconstruction_loss(LossConfig(reconstruction_loss_type=name), list(intensity_range))


# ----------------------------------------------------------------------------------- losses
def test_loss_registry_is_the_readme_menu():
    assert set(RECONSTRUCTION_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_finite(name):
    g = torch.Generator().manual_seed(0)
    rec = torch.rand(2, 1, 16, 16, 16, generator=g)
    value = loss_fn(name)(rec, sparse_target())
    assert value.ndim == 0 and torch.isfinite(value)
    assert float(value) >= 0


@pytest.mark.parametrize("intensity_range", [(0.0, 1.0), (-1.0, 1.0)])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_perfect_reconstruction_near_zero(name, intensity_range):
    t = sparse_target(intensity_range)
    value = float(loss_fn(name, intensity_range)(t.clone(), t))
    if name in ("l1", "mse", "weighted"):
        assert value == pytest.approx(0.0, abs=1e-7)
    else:  # soft Dice: a perfect reconstruction of a sparse target must score (almost) zero
        assert value < 0.05, f"{name} loss of a perfect reconstruction is {value:.3f}"


@pytest.mark.parametrize("intensity_range", [(0.0, 1.0), (-1.0, 1.0)])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_all_black_worse_than_truth(name, intensity_range):
    t = sparse_target(intensity_range)
    fn = loss_fn(name, intensity_range)
    black = torch.full_like(t, intensity_range[0])
    assert float(fn(black, t)) > float(fn(t.clone(), t)) + 1e-3


@pytest.mark.parametrize("name", ["dice", "combined"])
def test_dice_losses_separate_black_from_truth_clearly(name):
    """The FAQ-Q1 failure (all-black output) must cost much more than the truth, not ~5% more."""
    t = sparse_target()
    fn = loss_fn(name)
    black, truth = float(fn(torch.zeros_like(t), t)), float(fn(t.clone(), t))
    assert black - truth > 0.5, (black, truth)


def test_weighted_penalises_missing_foreground_more_than_l1():
    """Two reconstructions with the same L1 error: one drops the filaments, one adds faint haze.

    Plain L1 rates them equal; the weighted loss must rate the missing foreground far worse.
    """
    t = sparse_target()
    fg = t > 0.1
    missing = torch.zeros_like(t)  # all black: filaments lost
    haze = t.clone()
    c = float(t.sum()) / float((~fg).sum())  # spread the same total absolute error over background
    haze[~fg] += c
    l1, w = loss_fn("l1"), loss_fn("weighted")
    assert float(l1(missing, t)) == pytest.approx(float(l1(haze, t)), rel=1e-4)
    l1_ratio = float(l1(missing, t)) / float(l1(haze, t))
    w_ratio = float(w(missing, t)) / float(w(haze, t))
    assert w_ratio > 10 * l1_ratio, (w_ratio, l1_ratio)


def test_weighted_threshold_in_unit_intensity_for_minus_one_one():
    """In [-1, 1] data the background is -1; the foreground mask must still be the filaments."""
    t = sparse_target((-1.0, 1.0))
    w = loss_fn("weighted", (-1.0, 1.0))
    missing = torch.full_like(t, -1.0)
    haze = t.clone()
    fg = t > -0.8
    haze[~fg] += 2 * float((t[fg] + 1).sum()) / float((~fg).sum())
    assert float(w(missing, t)) > 10 * float(w(haze, t))


# ----------------------------------------------------------------------------------- codebook
def test_epoch_stats_uniform_perplexity():
    tr = CodebookTracker(num_embeddings=8, window_steps=100, threshold=1.0)
    tr.update(torch.tensor([0, 1, 2, 3] * 5))
    tr.update(torch.tensor([[0, 1], [2, 3]]))
    s = tr.epoch_stats()
    assert s["usage"] == pytest.approx(4 / 8)
    assert s["perplexity"] == pytest.approx(4.0)
    assert s["used_codes"] == 4
    # reset after the epoch
    assert tr.epoch_stats()["usage"] == 0.0


def test_epoch_stats_known_counts_and_epoch_not_batch():
    tr = CodebookTracker(num_embeddings=10, window_steps=100, threshold=1.0)
    tr.update(torch.tensor([0, 0, 0]))  # one batch uses code 0 only
    tr.update(torch.tensor([5]))  # the next uses code 5 only
    s = tr.epoch_stats(reset=False)
    assert s["usage"] == pytest.approx(2 / 10)  # over the epoch, not the last batch
    p = np.array([0.75, 0.25])
    assert s["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # all ten codes uniformly -> perplexity 10, usage 1
    tr.epoch_stats()
    tr.update(torch.arange(10).repeat(3))
    s = tr.epoch_stats()
    assert s["usage"] == pytest.approx(1.0) and s["perplexity"] == pytest.approx(10.0)


def test_tracker_window_and_dead_codes():
    tr = CodebookTracker(num_embeddings=6, window_steps=3, threshold=2.0)
    for _ in range(2):
        tr.update(torch.tensor([0, 0, 1, 2]))
        assert not tr.window_full()
    tr.update(torch.tensor([3]))
    assert tr.window_full()
    dead = tr.dead_codes()
    # counts over the window: code0=6, code1=3, code2=3, code3=1 (< 2), code4=code5=0
    assert dead.tolist() == [False, False, False, True, True, True]
    assert not tr.window_full()  # the window restarts
    state = tr.state_dict()
    tr2 = CodebookTracker(6, 3, 2.0)
    tr2.load_state_dict(state)
    assert torch.equal(tr2.window_counts, tr.window_counts) and tr2.window_fill == tr.window_fill


def _tiny_model(tmp_path, data_dir, **codebook):
    d = tiny_config_dict(tmp_path, data_dir)
    d["vqvae"]["codebook"].update(codebook)
    cfg = config_from_dict(d)
    torch.manual_seed(0)
    return cfg, build_vqvae(vqvae_net_config(cfg))


def _min_dist_to_rows(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.cdist(codes.double(), rows.double(), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values


def test_dead_code_restart_reseeds_and_codes_get_used(tmp_path, data_dir):
    _, model = _tiny_model(tmp_path, data_dir)
    q = model.quantizer.quantizer
    k = q.num_embeddings
    torch.manual_seed(1)
    z = torch.randn(2, 4, 8, 8, 8)  # encoder outputs (B, embedding_dim, x, y, z)
    flat = flat_latents(z)
    # a collapsed codebook: codes 0..3 near the data, codes 4.. far away and never chosen
    with torch.no_grad():
        emb = torch.randn(k, 4) * 0.1
        emb[4:] += 100.0
        q.embedding.weight.copy_(emb)
        q.ema_w.copy_(emb)
        q.ema_cluster_size.fill_(1.0)
    q.eval()
    tr = CodebookTracker(k, window_steps=4, threshold=1.0)
    for _ in range(4):
        _, _, idx = q(z)
        tr.update(idx)
    assert tr.window_full()
    dead = tr.dead_codes()
    assert dead[4:].all() and not dead[:4].any()
    n = restart_codes(q, dead, z)
    assert n == k - 4
    # re-seeded codes now sit on (close to) current encoder outputs; live codes are untouched
    d = _min_dist_to_rows(q.embedding.weight.data[dead], flat)
    assert float(d.max()) < 0.05 * float(flat.std()), d
    assert torch.equal(q.embedding.weight.data[:4], emb[:4])
    assert torch.allclose(q.ema_w.data[dead], q.embedding.weight.data[dead])
    # and they are chosen by the next batches, also after EMA updates in train mode
    q.train()
    for _ in range(3):
        q(z)
    q.eval()
    _, _, idx = q(z)
    used = torch.bincount(idx.reshape(-1), minlength=k) > 0
    assert int(used[dead].sum()) >= (k - 4) - 2, used
    assert torch.isfinite(q.embedding.weight).all()


def test_dead_code_restart_wired_into_stage1_task(tmp_path, data_dir):
    cfg, _ = _tiny_model(tmp_path, data_dir, restart_window_steps=2, init="normal")
    task = VQVAETask(cfg, make_runtime(cfg), normalization_of(cfg), (1.0, 1.0, 1.0))
    q = task.quantizer
    k = q.num_embeddings
    with torch.no_grad():
        q.embedding.weight.add_(100.0)  # every code far from the data ...
        q.embedding.weight[0] = 0.0  # ... except code 0
        q.ema_w.copy_(q.embedding.weight)
        q.ema_cluster_size.fill_(1.0)
    torch.manual_seed(2)
    z = torch.randn(2, 4, 8, 8, 8)
    for step in range(2):
        q.eval()
        _, _, idx = q(z)
        task.after_optimizer_step({"indices": idx, "z": z}, StepContext(0, step))
    assert task.restarted_epoch == k - 1 and task.restarted_total == k - 1
    d = _min_dist_to_rows(q.embedding.weight.data[1:], flat_latents(z))
    assert float(d.max()) < 0.05 * float(z.std())
    stats = task.on_train_epoch_end(1)
    assert stats["codebook_restarted"] == k - 1
    assert stats["codebook_usage"] == pytest.approx(1 / k)

    cfg_off, _ = _tiny_model(tmp_path, data_dir, restart_window_steps=2, init="normal", dead_code_restart=False)
    task = VQVAETask(cfg_off, make_runtime(cfg_off), normalization_of(cfg_off), (1.0, 1.0, 1.0))
    before = task.quantizer.embedding.weight.detach().clone()
    for step in range(2):
        task.quantizer.eval()
        _, _, idx = task.quantizer(z)
        task.after_optimizer_step({"indices": idx, "z": z}, StepContext(0, step))
    assert task.restarted_total == 0 and torch.equal(task.quantizer.embedding.weight, before)


def test_init_from_data_puts_codes_among_encoder_outputs(tmp_path, data_dir):
    _, model = _tiny_model(tmp_path, data_dir)
    q = model.quantizer.quantizer
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        z = model.encode(x)
    flat = flat_latents(z)
    assert float(_min_dist_to_rows(q.embedding.weight.data, flat).max()) > 0.05 * float(flat.std())
    torch.manual_seed(0)
    init_from_data(q, z)
    d = _min_dist_to_rows(q.embedding.weight.data, flat)
    assert float(d.max()) < 0.05 * float(flat.std())
    assert torch.allclose(q.ema_w, q.embedding.weight)


def test_stage1_task_data_init_on_first_step(tmp_path, data_dir):
    cfg, _ = _tiny_model(tmp_path, data_dir, init="data")
    task = VQVAETask(cfg, make_runtime(cfg), normalization_of(cfg), (1.0, 1.0, 1.0))
    assert not task.codebook_ready
    x = torch.rand(2, 1, 32, 32, 32)
    task.eval_mode()  # eval: the quantiser's EMA does not move the freshly seeded codes
    torch.manual_seed(0)
    out = task.training_step({"image": x}, StepContext(0, 0))
    # ready only once the step completes: a skipped (non-finite) first batch restores the codebook
    assert not task.codebook_ready
    task.after_optimizer_step(out, StepContext(0, 0))
    assert task.codebook_ready
    with torch.no_grad():
        flat = flat_latents(task.model.encode(x))
    d = _min_dist_to_rows(task.quantizer.embedding.weight.data, flat)
    assert float(d.max()) < 0.05 * float(flat.std())


@pytest.mark.parametrize("init", ["normal", "kaiming_uniform"])
def test_other_codebook_inits_ready_at_once(tmp_path, data_dir, init):
    cfg, _ = _tiny_model(tmp_path, data_dir, init=init)
    task = VQVAETask(cfg, make_runtime(cfg), normalization_of(cfg), (1.0, 1.0, 1.0))
    assert task.codebook_ready


# ----------------------------------------------------------------------------------- checkpoints
def _val_batch(data_dir) -> torch.Tensor:
    files = list_volumes(data_dir / "val")
    return torch.stack([torch.from_numpy(normalize_unit(read_volume(f).array))[None] for f in files])


def test_training_writes_weights_only_checkpoints(trained_stage1):
    for p in (trained_stage1["best"], trained_stage1["latest"]):
        assert p.is_file()
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        assert ckpt["kind"] == "stage1"
        assert "vqldm_version" in ckpt
        assert ckpt["network"]["num_embeddings"] == 16 and ckpt["network"]["embedding_dim"] == 4
        assert ckpt["network"]["channels"] == [8, 16]
        assert ckpt["normalization"]["intensity_range"] == [0.0, 1.0]
        assert ckpt["latent_shape"] == [4, 8, 8, 8]
        assert math.isfinite(ckpt["val_loss"])
    latest = torch.load(trained_stage1["latest"], map_location="cpu", weights_only=True)
    assert latest["epoch"] == 2 and latest["step"] == 4
    assert "training_state" in latest
    best = torch.load(trained_stage1["best"], map_location="cpu", weights_only=True)
    assert "training_state" not in best
    # written atomically: no temp files left behind
    assert not list(trained_stage1["out_dir"].glob("*.tmp"))


def test_load_vqvae_rebuilds_from_file_alone(trained_stage1, data_dir):
    model, ckpt = load_vqvae(trained_stage1["best"], CPU)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    sd = ckpt["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = _val_batch(data_dir)
    with torch.no_grad():
        rec, q_loss = model(x)
    assert rec.shape == x.shape
    assert torch.isfinite(rec).all() and torch.isfinite(q_loss).all()
    # the codebook in the file is the one used: quantised latents are codebook rows
    with torch.no_grad():
        e = model.encode_stage_2_inputs(x)
    codes = model.quantizer.quantizer.embedding.weight
    rows = e.movedim(1, -1).reshape(-1, e.shape[1])
    assert float(_min_dist_to_rows(rows, codes).max()) < 1e-5


def test_tensorboard_tags(trained_stage1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(trained_stage1["log_dir"].glob("events.out.tfevents.*"))
    assert events, f"no event file in {trained_stage1['log_dir']}"
    acc = EventAccumulator(str(trained_stage1["log_dir"]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/total_loss", "train/recon_loss", "train/quant_loss", "train/learning_rate",
                "train_epoch/total_loss", "train_epoch/recon_loss", "train_epoch/quant_loss",
                "train_epoch/codebook_usage", "train_epoch/codebook_perplexity",
                "val/loss", "val/psnr", "val/ssim", "val/dice"):
        assert tag in scalars, (tag, sorted(scalars))
    # per log_interval (1) steps: 2 epochs x 2 steps
    assert [e.step for e in acc.Scalars("train/total_loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("train_epoch/codebook_usage")] == [1, 2]
    usage = [e.value for e in acc.Scalars("train_epoch/codebook_usage")]
    assert all(0 < u <= 1 for u in usage)
    assert all(math.isfinite(e.value) for e in acc.Scalars("val/psnr"))
    images = acc.Tags()["images"]
    assert "vqvae/input_reconstruction_error" in images, images
    img = acc.Images("vqvae/input_reconstruction_error")[-1]
    assert img.width > 0 and img.height > 0


# ----------------------------------------------------------------------------------- resume / overwrite
def _state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _nested_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _nested_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_is_bit_identical(tmp_path, data_dir):
    base = tiny_config_dict(tmp_path / "a", data_dir)
    base["vqvae"]["training"]["n_epochs"] = 2
    cfg_a = write_config(tmp_path / "a.yaml", base)
    assert run_cli("--quiet", "train-vqvae", "--config", cfg_a) == 0
    latest_a = Path(base["vqvae"]["checkpoints"]["output_dir"]) / "latest_checkpoint.pt"
    assert run_cli("--quiet", "train-vqvae", "--config", cfg_a, "--set", "vqvae.training.n_epochs=3",
                   "--set", f"vqvae.checkpoints.resume_from={latest_a}") == 0

    full = tiny_config_dict(tmp_path / "c", data_dir)
    full["vqvae"]["training"]["n_epochs"] = 3
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", full)) == 0
    latest_c = Path(full["vqvae"]["checkpoints"]["output_dir"]) / "latest_checkpoint.pt"

    r = torch.load(latest_a, map_location="cpu", weights_only=True)
    u = torch.load(latest_c, map_location="cpu", weights_only=True)
    assert r["epoch"] == u["epoch"] == 3 and r["step"] == u["step"] == 6
    _state_equal(r["state_dict"], u["state_dict"], "state_dict")
    for key in ("embedding.weight", "ema_w", "ema_cluster_size"):
        assert any(k.endswith(key) for k in r["state_dict"]), key
    _state_equal(r["training_state"]["model"], u["training_state"]["model"], "training_state.model")
    _nested_equal(r["training_state"]["optimizers"], u["training_state"]["optimizers"], "optimizers")
    _nested_equal(r["training_state"]["task"], u["training_state"]["task"], "task")
    assert r["val_loss"] == u["val_loss"] and r["best_val_loss"] == u["best_val_loss"]


def test_fresh_run_refused_then_overwrite_archives(tmp_path, data_dir, trained_stage1, capsys):
    out = copy_tree(trained_stage1["out_dir"], tmp_path / "vqvae_checkpoints")
    copy_tree(trained_stage1["log_dir"], tmp_path / "vqvae_logs")
    old = {p.name: sha256(p) for p in (out / "best_model.pt", out / "latest_checkpoint.pt")}
    cfg = tiny_config_dict(tmp_path, data_dir)
    path = write_config(tmp_path / "c.yaml", cfg)

    rc = run_cli("--quiet", "train-vqvae", "--config", path)
    err = capsys.readouterr().err
    assert rc != 0
    assert "resume_from" in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: sha256(out / p.name) for p in map(Path, old)} == old  # untouched

    rc = run_cli("--quiet", "train-vqvae", "--config", path, "--overwrite")
    assert rc == 0, capsys.readouterr().err
    prev = [d for d in out.iterdir() if d.is_dir() and d.name.startswith("previous_")]
    assert len(prev) == 1
    assert {name: sha256(prev[0] / name) for name in old} == old  # moved, not deleted
    assert (out / "best_model.pt").is_file() and (out / "latest_checkpoint.pt").is_file()
    new = torch.load(out / "latest_checkpoint.pt", map_location="cpu", weights_only=True)
    assert new["epoch"] == 1
    log_prev = [d for d in (tmp_path / "vqvae_logs").iterdir() if d.is_dir() and d.name.startswith("previous_")]
    assert len(log_prev) == 1 and list(log_prev[0].glob("events.out.tfevents.*"))


def test_resume_from_best_model_refused(tmp_path, data_dir, trained_stage1, capsys):
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["vqvae"]["checkpoints"]["resume_from"] = str(trained_stage1["best"])
    rc = run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    err = capsys.readouterr().err
    assert rc != 0 and "resume_from" in err and "Traceback" not in err


def test_fast_dev_run(tmp_path, data_dir):
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["vqvae"]["training"].update({"n_epochs": 50, "fast_dev_run": True, "fast_dev_run_batches": 1})
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    latest = torch.load(tmp_path / "vqvae_checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert latest["epoch"] == 1 and latest["step"] == 1


def test_stage_overrides_reach_the_trainer(tmp_path, data_dir):
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["data"]["intensity_range"] = [-1.0, 1.0]
    cfg["vqvae"]["training"].update({"batch_size": 4, "learning_rate": 3e-4})
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    latest = torch.load(tmp_path / "vqvae_checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert latest["step"] == 1  # 4 patches in batches of 4 (training.batch_size beats data.batch_size 2)
    lr = latest["training_state"]["optimizers"]["vqvae"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(3e-4)
    assert latest["normalization"]["intensity_range"] == [-1.0, 1.0]


def test_subprocess_train_vqvae_end_to_end(tmp_path, data_dir):
    cfg = tiny_config_dict(tmp_path, data_dir)
    r = run_cli_subprocess("--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    best = tmp_path / "vqvae_checkpoints" / "best_model.pt"
    assert best.is_file()
    model, _ = load_vqvae(best, CPU)
    assert model.quantizer.quantizer.num_embeddings == 16


# ------------------------------------------------------------------------------ intensity calibration
def test_calibration_maps_the_decoded_distribution_onto_the_real_one():
    from vqldm.autoencoder.calibration import apply_calibration, fit_calibration

    rng = np.random.default_rng(0)
    real = rng.beta(0.3, 3.0, 200_000)  # sparse, bright tail
    decoded = 0.8 * real**1.3 + 0.01  # a smoothed, darker decoder
    table = fit_calibration(decoded, real)
    assert all(np.diff(table["x"]) >= 0) and all(np.diff(table["y"]) >= 0)
    mapped = apply_calibration(torch.from_numpy(decoded), table).numpy()
    for q in (0.5, 0.9, 0.99, 0.999):
        assert np.quantile(mapped, q) == pytest.approx(np.quantile(real, q), abs=2e-3)
    ordered = np.sort(decoded[:1000])
    assert np.all(np.diff(apply_calibration(torch.from_numpy(ordered), table).numpy()) >= 0)  # monotone
    assert torch.equal(apply_calibration(torch.ones(3), None), torch.ones(3))  # no table: unchanged


def test_calibration_in_chunks_equals_the_whole_map(monkeypatch):
    from vqldm.autoencoder import calibration as C

    rng = np.random.default_rng(1)
    table = C.fit_calibration(0.8 * rng.beta(0.3, 3.0, 50_000) ** 1.3, rng.beta(0.3, 3.0, 50_000))
    u = torch.from_numpy(rng.random((2, 1, 9, 7, 5)).astype(np.float32))
    whole = C.apply_calibration(u, table)
    monkeypatch.setattr(C, "CHUNK", 64)  # 630 voxels: ten chunks, the last one short
    chunked = C.apply_calibration(u, table)
    assert chunked.shape == u.shape and torch.equal(chunked, whole)
    assert torch.equal(C._interpolate(u.reshape(-1), torch.tensor(table["x"]), torch.tensor(table["y"])),
                       whole.reshape(-1))


@pytest.mark.parametrize("asked,native,expected", [(True, True, torch.bfloat16), (True, False, None),
                                                     (False, True, None)])
def test_cpu_bf16_only_where_asked_and_native(monkeypatch, asked, native, expected):
    from vqldm import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    cfg = config_from_dict({"device": {"use_cuda": False, "cpu_bf16": asked}})
    rt = runtime.make_runtime(cfg)
    assert rt.device.type == "cpu" and rt.amp_dtype == expected and not rt.needs_grad_scaler
    assert ("bf16 autocast" in rt.describe()) == (expected is not None)


def test_quantiser_runs_in_fp32_under_cpu_bf16_autocast():
    """MONAI's quantiser turns off CUDA autocast only: vqldm's calls must pick the same codes and make the
    same EMA codebook update under CPU bf16 autocast as in fp32."""
    import copy

    from vqldm.autoencoder.model import nearest_codes, quantize

    torch.manual_seed(0)
    model = build_vqvae(vqvae_net_config(config_from_dict({"vqvae": {"num_embeddings": 32}})))
    twin = copy.deepcopy(model)
    z = torch.randn(2, model.quantizer.quantizer.embedding_dim, 4, 4, 4) * 3.0
    model.train(), twin.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_bf, loss_bf, idx_bf = quantize(model, z.bfloat16())
        codes_bf = nearest_codes(model, z.bfloat16())
    q, loss, idx = quantize(twin, z.bfloat16().float())
    assert q_bf.dtype == torch.float32 and torch.equal(idx_bf, idx) and torch.equal(q_bf, q)
    assert torch.equal(loss_bf, loss) and torch.equal(codes_bf, nearest_codes(twin, z.bfloat16().float()))
    w, w_twin = model.quantizer.quantizer.embedding.weight, twin.quantizer.quantizer.embedding.weight
    assert w.dtype == torch.float32 and torch.equal(w, w_twin)  # the EMA update, bit for bit


def test_nearest_codes_in_slabs_equal_monai_quantize_on_the_whole(monkeypatch):
    from vqldm.autoencoder import model as M

    torch.manual_seed(1)
    vq = build_vqvae(vqvae_net_config(config_from_dict({"vqvae": {"num_embeddings": 32}}))).eval()
    z = torch.randn(2, vq.quantizer.quantizer.embedding_dim, 7, 5, 3) * 3.0
    whole = vq.quantizer.quantizer.quantize(z)[2]
    monkeypatch.setattr(M, "CODE_CHUNK", 40)  # 30 voxels per x-slice: slabs of one slice, 7 calls
    assert torch.equal(M.nearest_codes(vq, z), whole) and whole.shape == (2, 7, 5, 3)
    monkeypatch.setattr(M, "CODE_CHUNK", 100)  # slabs of 3 slices, the last one short
    assert torch.equal(M.nearest_codes(vq, z), whole)
    snapped = M.snap_to_codebook(vq, z)
    assert torch.equal(snapped, vq.quantizer.quantizer.embed(whole))


def test_train_vqvae_stores_the_calibration_and_decoding_applies_it(tmp_path, data_dir):
    from vqldm.autoencoder.calibration import apply_calibration

    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["vqvae"]["intensity_calibration"] = True
    assert run_cli("--quiet", "train-vqvae", "--config", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    best = load_checkpoint(tmp_path / "vqvae_checkpoints" / "best_model.pt", kind="vqvae")
    latest = load_checkpoint(tmp_path / "vqvae_checkpoints" / "latest_checkpoint.pt", kind="vqvae")
    table = best["intensity_calibration"]
    assert table == latest["intensity_calibration"] and len(table["x"]) == len(table["y"]) > 100
    assert table["y"][-1] == pytest.approx(1.0)  # the real training volumes reach 1 after min-max
    # evaluate's stage-1 reconstruction metrics read the table too (and still run)
    assert run_cli("--quiet", "evaluate", "--config", str(tmp_path / "c.yaml"), "--vqvae-checkpoint",
                   str(tmp_path / "vqvae_checkpoints" / "best_model.pt"), "--out", str(tmp_path / "E")) == 0
    u = torch.linspace(0, 1, 11)
    assert not torch.equal(apply_calibration(u, table), u)
