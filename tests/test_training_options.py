"""The training options of issue 19: a learning-rate schedule with warm-up, gradient accumulation,
checkpoints every N steps, ``resume_from: latest``, and stops after N steps or a time budget.

Every option keeps exact resume (docs/reliability.md): a run stopped mid-epoch and resumed ends
bit-identical to the same run in one go, TensorBoard curves included.
"""

from __future__ import annotations

import pytest
import torch

from vqldm.config import load_config
from vqldm.engine.trainer import Trainer, accumulation_window, lr_factor

from conftest import copy_tree, with_updates, write_config
from test_reliability import (BEST, LATEST, assert_clean_error, assert_one_step_axis, assert_same_checkpoint, cli,
                              load, log_dir, out_dir, stage1_cfg, stage2_cfg)


def test_lr_factor_warmup_then_cosine_or_linear_to_zero():
    assert [lr_factor("constant", 4, s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("cosine", 2, 2, 12) == 1.0 and lr_factor("linear", 2, 2, 12) == 1.0
    assert lr_factor("cosine", 2, 7, 12) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor("linear", 2, 7, 12) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 12, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("linear", 0, 99, 12) == 0.0


def test_accumulation_windows_cover_an_epoch_and_weigh_a_short_last_window():
    w = [accumulation_window(i, 5, 2) for i in range(5)]
    assert [(a, b) for a, b, _ in w] == [(True, False), (False, True), (True, False), (False, True), (True, True)]
    assert [s for *_, s in w] == [0.5, 0.5, 0.5, 0.5, 1.0]


class LinearTask:
    """The smallest engine task: a linear layer fitted by mean squared error."""

    name, val_loss_key, graph_safe = "vqvae", "loss", False

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)

    def optimizers(self):
        from vqldm.engine.trainer import OptimizerSpec

        params = list(self.model.parameters())
        return [OptimizerSpec("vqvae", torch.optim.SGD(params, lr=0.1), "loss", params)]

    def training_step(self, batch, ctx):
        return {"loss": ((self.model(batch["x"]) - batch["y"]) ** 2).mean()}

    def after_optimizer_step(self, out, ctx):
        pass

    def checkpoint_meta(self):
        return {}


def _trainer(tmp_path, accumulation: int, schedule: str = "constant", warmup: int = 0) -> Trainer:
    from vqldm.runtime import make_runtime

    cfg = load_config(None, ["device.use_cuda=false", f"vqvae.checkpoints.output_dir={tmp_path}",
                             f"vqvae.training.grad_accumulation_steps={accumulation}", "vqvae.training.grad_clip_norm=null",
                             f"vqvae.training.lr_schedule={schedule}", f"vqvae.training.warmup_steps={warmup}"])
    return Trainer(cfg, LinearTask(), [], [], make_runtime(cfg), progress=False)


def test_accumulated_micro_batches_step_like_the_whole_batch(tmp_path):
    """Four micro-batches of one, accumulated, give the gradient step of one batch of four: the engine
    divides each loss by its window's size and steps the optimizer once, at the window's end."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
    whole = _trainer(tmp_path / "w", 1)
    whole.step({"x": x, "y": y})
    acc = _trainer(tmp_path / "a", 4)
    for i in range(4):
        acc._window = accumulation_window(i, 4, 4)
        acc.step({"x": x[i:i + 1], "y": y[i:i + 1]})
        assert acc.global_step == (1 if i == 3 else 0)  # one optimizer step for the window
    for a, b in zip(acc.task.model.parameters(), whole.task.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7), (a, b)
    assert not torch.equal(acc.task.model.weight, LinearTask().model.weight)  # it did train


def test_the_schedule_sets_the_rate_of_each_step(tmp_path):
    t = _trainer(tmp_path, 1, "linear", warmup=2)
    t._horizon = 4
    seen = []
    for _ in range(4):
        t.step({"x": torch.ones(1, 3), "y": torch.ones(1, 1)})
        seen.append(t.specs[0].optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.05])
    assert t.specs[0].optimizer.param_groups[0]["initial_lr"] == 0.1


def _options(**training):
    """Stage 1 with four micro-batches an epoch, EMA on, the given training options."""
    return {"ema": True, "ema_decay": 0.9, **training}


def test_exact_resume_across_warmup_and_accumulation_boundaries(tmp_path, data_dir, capsys):
    """Stopped by max_steps in the middle of an epoch (and of the warm-up), resumed to another stop at an
    epoch's end, then to the end: bit-identical to the uninterrupted run. Batch 1 x 4 volumes = 4
    micro-batches an epoch in windows of 3 (the second window is short); warm-up 3 of 6 steps; cosine."""
    opts = _options(grad_accumulation_steps=3, warmup_steps=3, lr_schedule="cosine")
    a = stage1_cfg(tmp_path / "a", data_dir, n_epochs=3, **opts)
    a["data"]["batch_size"] = 1
    cfg_a = write_config(tmp_path / "a.yaml", a)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a, "--set", "vqvae.training.max_steps=1")
    assert rc == 0, err
    r = load(out_dir(a) / LATEST)
    assert (r["epoch"], r["step"], r["training_state"]["position"]["batch"]) == (0, 1, 3)  # mid-epoch, mid-warm-up
    assert r["training_state"]["optimizers"]["vqvae"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 3)
    assert not (out_dir(a) / BEST).exists()  # a stop is not a validation
    for more in ("vqvae.training.max_steps=4", "vqvae.training.max_steps=null"):
        rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a, "--set", more,
                         "--set", "vqvae.checkpoints.resume_from=latest")
        assert rc == 0, err
        if more.endswith("=4"):
            r = load(out_dir(a) / LATEST)
            assert (r["epoch"], r["step"], r["training_state"]["position"]["batch"]) == (2, 4, 0)
    u = stage1_cfg(tmp_path / "u", data_dir, n_epochs=3, **opts)
    u["data"]["batch_size"] = 1
    assert cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "u.yaml", u))[0] == 0
    assert load(out_dir(u) / LATEST)["step"] == 6
    roots = (tmp_path / "a", tmp_path / "u")
    assert_same_checkpoint(out_dir(a) / LATEST, out_dir(u) / LATEST, roots)
    assert_same_checkpoint(out_dir(a) / BEST, out_dir(u) / BEST, roots)
    assert_one_step_axis(log_dir(a), log_dir(u))


def test_time_budget_stops_with_a_checkpoint_and_latest_resumes_exactly(tmp_path, data_dir, capsys, caplog):
    a = stage1_cfg(tmp_path / "a", data_dir, n_epochs=2, save_interval_steps=3)
    a["data"]["batch_size"] = 1
    cfg_a = write_config(tmp_path / "a.yaml", a)
    rc, _, err = cli(capsys, "train-vqvae", "--config", cfg_a, "--set", "vqvae.training.max_time_minutes=1e-9")
    assert rc == 0, err
    assert "max_time_minutes 1e-09 reached" in caplog.text
    assert load(out_dir(a) / LATEST)["step"] == 1  # the first step already used the budget
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a, "--set", "vqvae.checkpoints.resume_from=latest")
    assert rc == 0, err
    u = stage1_cfg(tmp_path / "u", data_dir, n_epochs=2, save_interval_steps=3)
    u["data"]["batch_size"] = 1
    assert cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "u.yaml", u))[0] == 0
    roots = (tmp_path / "a", tmp_path / "u")
    assert_same_checkpoint(out_dir(a) / LATEST, out_dir(u) / LATEST, roots)
    assert_one_step_axis(log_dir(a), log_dir(u))


def test_checkpoints_every_n_steps_as_well_as_every_epoch(tmp_path, data_dir, capsys, monkeypatch):
    written = []
    original = Trainer.save_latest

    def save_latest(self, val_loss):
        written.append((self.epoch, self.global_step, self._position))
        return original(self, val_loss)

    monkeypatch.setattr(Trainer, "save_latest", save_latest)
    c = stage1_cfg(tmp_path, data_dir, n_epochs=2, save_interval_steps=3, save_interval=2)
    c["data"]["batch_size"] = 1
    assert cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", c))[0] == 0
    # 4 steps an epoch: step 3 (mid-epoch 1), step 6 (mid-epoch 2), and epoch 2's end (save_interval 2)
    assert written == [(0, 3, 3), (1, 6, 2), (2, 8, 0)]


def test_resume_from_latest_without_a_checkpoint_starts_afresh(tmp_path, data_dir, capsys):
    c = stage1_cfg(tmp_path, data_dir, n_epochs=1)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", c),
                     "--set", "vqvae.checkpoints.resume_from=latest")
    assert rc == 0, err
    assert load(out_dir(c) / LATEST)["epoch"] == 1


@pytest.mark.parametrize("setting, key", [
    ("vqvae.training.lr_schedule=step", "vqvae.training.lr_schedule"),
    ("vqvae.training.grad_accumulation_steps=0", "vqvae.training.grad_accumulation_steps"),
    ("vqvae.training.max_steps=0", "vqvae.training.max_steps"),
    ("vqvae.training.max_time_minutes=-1", "vqvae.training.max_time_minutes"),
    ("diffusion.training.save_interval_steps=0", "diffusion.training.save_interval_steps"),
])
def test_bad_training_options_named_in_one_line(tmp_path, data_dir, capsys, setting, key):
    c = stage1_cfg(tmp_path, data_dir)
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "c.yaml", c), "--set", setting)
    assert_clean_error(rc, err, key)


def test_accumulation_refuses_skip_nonfinite_in_one_line(tmp_path, data_dir, capsys):
    c = stage1_cfg(tmp_path, data_dir, grad_accumulation_steps=2, skip_nonfinite=True)
    rc, _, err = cli(capsys, "train-vqvae", "--config", write_config(tmp_path / "c.yaml", c))
    assert_clean_error(rc, err, "vqvae.training.grad_accumulation_steps", "skip_nonfinite")


def test_stage2_mid_epoch_resume_continues_the_noise_stream(tmp_path, data_dir, trained_stage1, capsys):
    """Stage 2 draws its noise and timesteps from the global RNG: a mid-epoch resume re-reads the epoch's
    first batches (data streams) and then restores the checkpoint's RNG state, so the noise goes on as in
    one run."""
    runs = {}
    for name, stops in (("a", ["diffusion.training.max_steps=3", "diffusion.training.max_steps=null"]), ("u", [None])):
        c = stage2_cfg(tmp_path / name, data_dir, trained_stage1["best"], n_epochs=2, warmup_steps=2,
                       lr_schedule="linear")
        c["data"]["batch_size"] = 1
        path = write_config(tmp_path / f"{name}.yaml", c)
        for i, stop in enumerate(stops):
            extra = (["--set", stop] if stop else []) + (["--set", "diffusion.checkpoints.resume_from=latest"] if i else [])
            rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", path, *extra)
            assert rc == 0, err
            if i == 0 and stop:
                assert load(out_dir(c, "diffusion") / LATEST)["training_state"]["position"]["batch"] == 3
        runs[name] = c
    roots = (tmp_path / "a", tmp_path / "u")
    a, u = (out_dir(runs[n], "diffusion") for n in ("a", "u"))
    assert_same_checkpoint(a / LATEST, u / LATEST, roots)
    assert_same_checkpoint(a / BEST, u / BEST, roots)
    assert_one_step_axis(log_dir(runs["a"], "diffusion"), log_dir(runs["u"], "diffusion"))


@pytest.mark.parametrize("source_best", ["kept", "missing"])
def test_resuming_into_a_new_folder_leaves_a_best_model_there(tmp_path, data_dir, trained_stage2, capsys, monkeypatch,
                                                              source_best):
    """Resumed into a new output_dir for more epochs, a run whose validation never beats the resumed best
    used to leave only latest_checkpoint.pt there, and `vqldm sample` on the folder failed. The resumed
    run's best_model.pt now comes along; where it is gone, the first validation here writes one."""
    src = copy_tree(trained_stage2["out_dir"], tmp_path / "earlier")
    if source_best == "missing":
        (src / BEST).unlink()
    monkeypatch.setattr(Trainer, "validate", lambda self, max_batches=None: {"loss": 1e9})  # never better
    c = with_updates(trained_stage2["config"], diffusion__checkpoints__output_dir=str(tmp_path / "more"),
                     diffusion__checkpoints__resume_from=str(src / LATEST), diffusion__training__n_epochs=2)
    path = write_config(tmp_path / "c.yaml", c)
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", path)
    assert rc == 0, err
    best = tmp_path / "more" / BEST
    if source_best == "kept":
        assert best.read_bytes() == (src / BEST).read_bytes()
    else:
        assert load(best)["val_loss"] == 1e9 and load(best)["epoch"] == 2
    rc, _, err = cli(capsys, "--quiet", "sample", "--config", path, "--num-samples", "1", "--out", tmp_path / "s")
    assert rc == 0, err
