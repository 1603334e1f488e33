"""``vqldm benchmark``: the original README's training style vs vqldm's own loops, side by side.

The reference side trains and samples the way the original scripts do (MONAI networks in eager
mode, fp16 autocast + GradScaler, Adam, the UNet called step by step). The vqldm side runs the
real engine step (``Trainer._train_step`` of the stage tasks) and the real sampling pipeline
(``generate``) with the config's speed switches. Both run in this process on the same device, so
only their ratio is meant to be compared. One JSON line per metric.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from vqldm.config import config_from_dict

# The original README's networks (as in the shared reference loops) and a CPU-sized version.
SPECS = {
    "full": {
        "patch": 64, "stage1_batch": 4, "stage2_batch": 8, "sample_batch": 64, "sample_steps": 50,
        "ref_sample_batch": 4, "steps": 30, "warmup": 8,
        "vqvae": {"num_channels": [64, 128, 256], "num_res_channels": 256, "num_res_layers": 2,
                  "num_embeddings": 256, "embedding_dim": 32,
                  "downsample_parameters": [[2, 4, 1, 1], [2, 4, 1, 1], [1, 3, 1, 1]],
                  "upsample_parameters": [[1, 3, 1, 1, 0], [2, 4, 1, 1, 0], [2, 4, 1, 1, 0]],
                  "output_act": "RELU"},
        "diffusion": {"in_channels": 32, "out_channels": 32, "num_channels": [64, 128, 256, 512],
                      "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
                      "num_res_blocks": 2},
    },
    "smoke": {
        "patch": 32, "stage1_batch": 2, "stage2_batch": 4, "sample_batch": 4, "sample_steps": 5,
        "ref_sample_batch": 4, "steps": 3, "warmup": 1,
        "vqvae": {"num_channels": [16, 32], "num_res_channels": 32, "num_res_layers": 1,
                  "num_embeddings": 64, "embedding_dim": 8},
        "diffusion": {"in_channels": 8, "out_channels": 8, "num_channels": [32, 64],
                      "attention_levels": [False, True], "num_head_channels": [0, 32], "num_res_blocks": 1,
                      "norm_num_groups": 16},
    },
}


def _config(spec: dict, device: str):
    p = spec["patch"]
    return config_from_dict({
        # torch.compile on for the vqldm side: a long run amortises its start-up minute
        "device": {"use_cuda": device == "cuda", "compile": True},
        "data": {"patch_size": [p, p, p], "batch_size": spec["stage1_batch"], "num_workers": 0},
        "vqvae": {**spec["vqvae"], "training": {"ema": False}},
        "diffusion": {**spec["diffusion"], "training": {"batch_size": spec["stage2_batch"]}},
    }, check_paths=False)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, dev, n: int, warm: int) -> float:
    for _ in range(warm):
        fn()
    _sync(dev)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def _ref_amp(dev):
    return torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")


# ------------------------------------------------------------------------------ reference loops
def ref_stage1(cfg, spec, dev):
    from vqldm.stage1.model import build_vqvae, vqvae_net_config

    torch.manual_seed(0)
    m = build_vqvae(vqvae_net_config(cfg)).to(dev)
    x = torch.rand(spec["stage1_batch"], 1, *cfg.data.patch_size, device=dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with _ref_amp(dev):
            rec, ql = m(x)
            loss = F.l1_loss(rec.float(), x) + ql
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def ref_stage2(cfg, spec, dev):
    from monai.networks.schedulers import DDPMScheduler

    from vqldm.stage2.model import build_unet, unet_net_config

    torch.manual_seed(0)
    m = build_unet(unet_net_config(cfg)).to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195)
    from vqldm.config import latent_shape

    z = torch.randn(spec["stage2_batch"], *latent_shape(cfg), device=dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with _ref_amp(dev):
            noise = torch.randn_like(z)
            t = torch.randint(0, 1000, (z.shape[0],), device=dev)
            loss = F.mse_loss(m(x=sched.add_noise(z, noise, t), timesteps=t).float(), noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def ref_sample(cfg, spec, dev):
    from monai.networks.schedulers import DDIMScheduler

    from vqldm.config import latent_shape
    from vqldm.stage1.model import build_vqvae, vqvae_net_config
    from vqldm.stage2.model import build_unet, unet_net_config

    vq = build_vqvae(vqvae_net_config(cfg)).to(dev).eval()
    unet = build_unet(unet_net_config(cfg)).to(dev).eval()
    n = spec["ref_sample_batch"]

    @torch.no_grad()
    def run():
        sch = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195,
                            clip_sample=False)
        sch.set_timesteps(num_inference_steps=spec["sample_steps"])
        z = torch.randn(n, *latent_shape(cfg), device=dev)
        for t in sch.timesteps:
            with _ref_amp(dev):
                eps = unet(x=z, timesteps=torch.full((n,), int(t), device=dev, dtype=torch.long))
            z, _ = sch.step(eps.float(), t, z)
        with _ref_amp(dev):
            vq.decode(z)
    return run, n


# ------------------------------------------------------------------------------ vqldm loops
def vq_stage1(cfg, spec, rt):
    from vqldm.data.pipeline import normalization_of
    from vqldm.engine.setup import wrap_for_training
    from vqldm.engine.trainer import Trainer
    from vqldm.stage1.task import Stage1Task

    torch.manual_seed(0)
    task = Stage1Task(cfg, rt, normalization_of(cfg), (1.0, 1.0, 1.0))
    task.train_forward = wrap_for_training(task.train_forward, rt)
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    batch = {"image": torch.rand(spec["stage1_batch"], 1, *cfg.data.patch_size).pin_memory()
             if rt.is_cuda else torch.rand(spec["stage1_batch"], 1, *cfg.data.patch_size)}
    return lambda: trainer._train_step(batch)


def vq_stage2(cfg, spec, rt):
    from vqldm.config import latent_shape
    from vqldm.engine.setup import wrap_for_training
    from vqldm.engine.trainer import Trainer
    from vqldm.stage2.model import scheduler_config, unet_net_config
    from vqldm.stage2.task import Stage2Task

    torch.manual_seed(0)
    lat = latent_shape(cfg)
    task = Stage2Task(cfg, rt, None, unet_net_config(cfg), scheduler_config(cfg), 1.0,
                      {"latent_shape": lat}, None, lambda x: x)
    task.train_forward = wrap_for_training(task.model, rt, cuda_graphs=rt.cuda_graphs)
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    batch = {"latent": torch.randn(spec["stage2_batch"], *lat)}
    return lambda: trainer._train_step(batch)


def vq_sample(cfg, spec, rt):
    from vqldm.config import latent_shape
    from vqldm.generate.pipeline import Generator, generate
    from vqldm.stage1.model import build_vqvae, vqvae_net_config
    from vqldm.stage2.model import build_unet, scheduler_config, unet_net_config

    vq_net, unet_net = vqvae_net_config(cfg), unet_net_config(cfg)
    vq = rt.prepare_module(build_vqvae(vq_net)).eval()
    unet = rt.prepare_module(build_unet(unet_net, flash_attention=rt.is_cuda)).eval()
    diff_ckpt = {"scale_factor": 1.0, "scheduler": scheduler_config(cfg), "latent_shape": latent_shape(cfg),
                 "network": unet_net}
    vq_ckpt = {"network": vq_net, "normalization": {"intensity_range": [0.0, 1.0]}}
    gen = Generator(unet, vq, diff_ckpt, vq_ckpt, rt, None, None)
    n = spec["sample_batch"]
    return (lambda: generate(gen, list(range(n)), seed=0, steps=spec["sample_steps"], kind="ddim",
                             batch_size=n, snap=True)), n


# ------------------------------------------------------------------------------ driver
def _emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def run_benchmark(smoke: bool = False, device: str | None = None, only: str = "") -> list[dict]:
    from vqldm.runtime import make_runtime

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from vqldm.errors import VqldmError

        raise VqldmError("--device cuda: no CUDA GPU is visible")
    spec = SPECS["smoke" if smoke else "full"]
    cfg = _config(spec, device)
    rt = make_runtime(cfg)
    dev = rt.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    wanted = set(filter(None, only.split(",")))
    n, warm = spec["steps"], spec["warmup"]
    rows = []
    _emit(what="device", device=name, torch=torch.__version__, runtime=rt.describe(),
          spec="smoke" if smoke else "full")

    def row(metric, ref, mine, unit, **extra):
        r = {"metric": metric, "device": name, "reference": ref, "vqldm": mine,
             "ratio": (mine / ref) if ref else None, "unit": unit, **extra}
        rows.append(r)
        _emit(**r)

    def guarded(fn):
        try:
            fn()
        except Exception as e:  # one failed metric must not lose the others
            _emit(what=fn.__name__, error=f"{e.__class__.__name__}: {str(e)[:300]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def side_by_side(metric, ref_step, vq_step, batch, unit, vq_warm, **extra):
        """Median step time of each side (and peak memory on CUDA), one row each."""
        _peak_reset(dev)
        t_ref = _median_time(ref_step, dev, n, warm)
        m_ref = _peak(dev)
        _peak_reset(dev)
        t_vq = _median_time(vq_step, dev, n, warm + vq_warm)
        m_vq = _peak(dev)
        row(metric, batch / t_ref, batch / t_vq, unit, batch=batch, **extra)
        if m_ref is not None:
            row(metric.split("_")[0] + "_peak_memory_gib", m_ref, m_vq, "GiB")

    def stage1():
        side_by_side("stage1_train_volumes_per_s", ref_stage1(cfg, spec, dev), vq_stage1(cfg, spec, rt),
                     spec["stage1_batch"], "volumes/s", 3 if rt.compile else 0, patch=spec["patch"],
                     reference_style="eager fp16 autocast + GradScaler, Adam, L1")

    def stage2():
        # CUDA-graph capture needs a few extra warm-up steps
        side_by_side("stage2_train_latents_per_s", ref_stage2(cfg, spec, dev), vq_stage2(cfg, spec, rt),
                     spec["stage2_batch"], "latents/s", 3 if rt.is_cuda else 0,
                     reference_style="eager fp16 autocast + GradScaler, Adam")

    def sample():
        run_ref, n_ref = ref_sample(cfg, spec, dev)
        _peak_reset(dev)
        t_ref = _median_time(run_ref, dev, 1 if smoke else 3, 1)
        m_ref = _peak(dev)
        run_vq, n_vq = vq_sample(cfg, spec, rt)
        _peak_reset(dev)
        t_vq = _median_time(run_vq, dev, 1 if smoke else 3, 2 if rt.is_cuda else 1)
        m_vq = _peak(dev)
        row("sample_volumes_per_s", n_ref / t_ref, n_vq / t_vq, "volumes/s", steps=spec["sample_steps"],
            scheduler="ddim", decode_included=True, reference_batch=n_ref, vqldm_batch=n_vq)
        if m_ref is not None:
            row("sample_peak_memory_gib", m_ref, m_vq, "GiB")

    for metric, fn in (("stage1_train_volumes_per_s", stage1), ("stage2_train_latents_per_s", stage2),
                       ("sample_volumes_per_s", sample)):
        if not wanted or metric in wanted:
            guarded(fn)
    return rows
