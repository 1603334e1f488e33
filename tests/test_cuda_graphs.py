"""CUDA graphs (issue 7): the recorded training step and sampling call compute what the eager ones do.

The graph tests need a CUDA GPU and are skipped without one; the checks of when graphs are used
run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from vqldm.config import config_from_dict, latent_shape
from vqldm.engine.trainer import GRAPH_WARMUP_STEPS, Trainer
from vqldm.errors import VqldmError
from vqldm.runtime import make_runtime

from conftest import tiny_config_dict

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(tmp_path, use_cuda: bool, graphs: bool, mixed: bool = False, cudnn_benchmark: bool = True, **training):
    d = tiny_config_dict(tmp_path, tmp_path / "data")
    d["device"].update(use_cuda=use_cuda, mixed_precision=mixed, cuda_graphs=graphs, compile=False,
                       cudnn_benchmark=cudnn_benchmark)
    d["vqvae"]["codebook"] = {"restart_window_steps": 1000, "init": "data"}
    for stage in ("vqvae", "diffusion"):
        d[stage]["training"].update(training)
    return config_from_dict(d)


def _stage1(cfg):
    from vqldm.data.pipeline import normalization_of
    from vqldm.autoencoder.task import VQVAETask

    torch.manual_seed(0)
    rt = make_runtime(cfg)
    task = VQVAETask(cfg, rt, normalization_of(cfg), (1.0, 1.0, 1.0))
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    return task, trainer


def _stage2(cfg):
    from vqldm.priors.diffusion.objective import scheduler_config
    from vqldm.priors.diffusion.unet import unet_net_config
    from vqldm.latents import LatentNorm
    from vqldm.priors.diffusion.task import DiffusionTask

    torch.manual_seed(0)
    rt = make_runtime(cfg)
    task = DiffusionTask(cfg, rt, None, unet_net_config(cfg), scheduler_config(cfg), LatentNorm(1.0),
                         {"latent_shape": latent_shape(cfg)}, None)
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    return task, trainer


def test_graph_blockers_name_each_reason(tmp_path):
    _, trainer = _stage1(_cfg(tmp_path, use_cuda=False, graphs=True))
    assert any("no CUDA GPU" in w for w in trainer.graph_blockers())
    assert trainer._graphed_step() is None  # CPU: the eager step

    cfg = _cfg(tmp_path, use_cuda=False, graphs=True, skip_nonfinite=True)
    _, trainer = _stage1(cfg)
    assert any("skip_nonfinite" in w for w in trainer.graph_blockers())

    d = tiny_config_dict(tmp_path, tmp_path / "data")
    d["vqvae"]["training"]["adversarial"] = {"enabled": True}
    _, trainer = _stage1(config_from_dict(d))
    assert any("optimizer" in w for w in trainer.graph_blockers())


def test_cuda_graphed_refuses_a_cpu_device():
    from vqldm.graphs import CudaGraphed

    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphed(lambda b: b, torch.device("cpu"))


# ------------------------------------------------------------------------------------ GPU only
@cuda
def test_graphed_stage1_training_follows_the_eager_trajectory(tmp_path, monkeypatch):
    """fp32, the same batches: parameters after the steps agree with the eager run's."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(1)
    batches = [{"image": torch.rand(2, 1, 32, 32, 32)} for _ in range(GRAPH_WARMUP_STEPS + 5)]
    params, losses = {}, {}
    for graphs in (False, True):
        task, trainer = _stage1(_cfg(tmp_path, use_cuda=True, graphs=graphs, cudnn_benchmark=False))
        losses[graphs] = [float(trainer.step(b)["total_loss"]) for b in batches]
        params[graphs] = [p.detach().clone() for p in task.model.parameters()]
        if graphs:
            assert trainer._graph and trainer._graph.replays == len(batches) - GRAPH_WARMUP_STEPS
            assert trainer.global_step == len(batches)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3, abs=1e-5)
    for a, b in zip(params[False], params[True]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@cuda
def test_graphed_stage2_step_draws_fresh_noise_and_trains(tmp_path):
    task, trainer = _stage2(_cfg(tmp_path, use_cuda=True, graphs=True, mixed=True, ema=True))
    batch = {"latent": torch.randn(2, *latent_shape(trainer.cfg)).pin_memory()}
    for _ in range(GRAPH_WARMUP_STEPS):
        trainer.step(batch)
    seen, weights, ema = [], [], []
    for _ in range(4):
        seen.append(float(trainer.step(batch)["loss"]))
        weights.append(next(task.model.parameters()).detach().clone())
        ema.append(next(trainer.ema.model.parameters()).detach().clone())
    assert trainer._graph.replays == 4
    assert len(set(seen)) == 4  # fresh noise and timesteps on every replay, same batch
    for i in range(3):  # the optimizer and the EMA run inside the graph
        assert not torch.equal(weights[i], weights[i + 1])
        assert not torch.equal(ema[i], ema[i + 1])


@cuda
def test_graphed_step_records_a_nonfinite_loss(tmp_path):
    _, trainer = _stage2(_cfg(tmp_path, use_cuda=True, graphs=True, mixed=True))
    good = {"latent": torch.randn(2, *latent_shape(trainer.cfg))}
    for _ in range(GRAPH_WARMUP_STEPS + 2):
        trainer.step(good)
    trainer.check_finite()
    bad = {"latent": torch.full_like(good["latent"], float("nan"))}
    trainer.step(bad)
    assert trainer._graph.replays >= 3
    with pytest.raises(VqldmError, match=f"non-finite loss at step {GRAPH_WARMUP_STEPS + 3} "):
        trainer.check_finite()


@cuda
def test_graphed_step_runs_another_batch_shape_eagerly(tmp_path):
    _, trainer = _stage2(_cfg(tmp_path, use_cuda=True, graphs=True, mixed=True))
    lat = latent_shape(trainer.cfg)
    for _ in range(GRAPH_WARMUP_STEPS + 1):
        trainer.step({"latent": torch.randn(2, *lat)})
    eager_before = trainer._graph.eager_calls
    out = trainer.step({"latent": torch.randn(1, *lat)})  # an epoch's smaller last batch
    assert torch.isfinite(out["loss"])
    assert trainer._graph.eager_calls == eager_before + 1 and trainer._graph.replays == 1


@cuda
def test_graphed_sampling_matches_eager(tmp_path):
    from dataclasses import replace

    from vqldm.priors.diffusion.pipeline import DiffusionPipeline
    from vqldm.autoencoder.model import build_vqvae, vqvae_net_config
    from vqldm.priors.diffusion.objective import scheduler_config
    from vqldm.priors.diffusion.unet import build_unet, unet_net_config

    cfg = _cfg(tmp_path, use_cuda=True, graphs=True)
    rt = make_runtime(cfg)
    torch.manual_seed(0)
    vq = rt.prepare_module(build_vqvae(vqvae_net_config(cfg))).eval()
    unet = rt.prepare_module(build_unet(unet_net_config(cfg))).eval()
    diff = {"scale_factor": 1.0, "scheduler": scheduler_config(cfg), "latent_shape": latent_shape(cfg),
            "network": unet_net_config(cfg)}
    vq_ckpt = {"network": vqvae_net_config(cfg), "normalization": {"intensity_range": [0.0, 1.0]}}
    out = {}
    for graphs in (False, True):
        pipe = DiffusionPipeline(unet, vq, diff, vq_ckpt, replace(rt, cuda_graphs=graphs), None, None)
        # 5 samples in batches of 2: the last batch has another shape
        out[graphs] = pipe.generate(list(range(5)), seed=3, steps=6, sampler="ddim", batch_size=2, snap=False)
    assert torch.allclose(out[True], out[False], atol=1e-4)
