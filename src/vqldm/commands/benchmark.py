"""``vqldm benchmark``: the original README's training style vs vqldm's own loops, side by side.

The reference side trains and samples the way the original scripts do (MONAI networks in eager
mode, fp16 autocast + GradScaler, Adam, the UNet called step by step). The vqldm side runs the
real engine step (``Trainer.step`` of the stage tasks) and the real sampling pipeline
(``DiffusionPipeline.generate``) with the config's speed switches. Both run in this process on the same device, so
only their ratio is meant to be compared. One JSON line per metric, then two checks of vqldm alone:
the engine's overhead over a bare loop of the same task, and whether the data loader keeps up with
the stage-1 step. ``--sweep`` (GPU) adds one line per setting of the speed switches.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F

from vqldm.autoencoder.model import build_vqvae, vqvae_net_config
from vqldm.autoencoder.task import VQVAETask
from vqldm.config import config_from_dict, latent_shape
from vqldm.data import pipeline
from vqldm.data.pipeline import normalization_of
from vqldm.engine.setup import wrap_for_training
from vqldm.engine.trainer import StepContext, Trainer, make_optimizer
from vqldm.latents import LatentNorm
from vqldm.errors import VqldmError
from vqldm.priors.diffusion.objective import scheduler_config
from vqldm.priors.diffusion.pipeline import DiffusionPipeline
from vqldm.priors.diffusion.task import DiffusionTask
from vqldm.priors.diffusion.unet import build_unet, unet_net_config
from vqldm.priors.transformer.model import build_transformer
from vqldm.priors.transformer.sampler import gumbel_noise, sample_tokens
from vqldm.runtime import make_runtime
from vqldm.synth import write_dataset

# The original README's networks (as in the shared reference loops) and a CPU-sized version.
SPECS = {
    "full": {
        "patch": 64, "stage1_batch": 4, "stage2_batch": 8, "sample_batch": 64, "sample_steps": 50,
        # the few-step sampler's row, and the batch sizes the best-batch stage-2 row tries (until memory runs out)
        "few_step": {"sampler": "dpmpp_2m", "steps": 10}, "stage2_batches": [8, 16, 32, 64, 128, 256],
        "ref_sample_batch": 4, "steps": 30, "warmup": 8, "workers": 4, "loader_batches": 40,
        "vqvae": {"num_channels": [64, 128, 256], "num_res_channels": 256, "num_res_layers": 2,
                  "num_embeddings": 256, "embedding_dim": 32,
                  "downsample_parameters": [[2, 4, 1, 1], [2, 4, 1, 1], [1, 3, 1, 1]],
                  "upsample_parameters": [[1, 3, 1, 1, 0], [2, 4, 1, 1, 0], [2, 4, 1, 1, 0]],
                  "output_act": "RELU"},
        "diffusion": {"in_channels": 32, "out_channels": 32, "num_channels": [64, 128, 256, 512],
                      "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
                      "num_res_blocks": 2},
        # the demo config's token prior: 12 x 12 x 6 = 864 tokens over 64 codes, sampled 8 at a time (--batch-size)
        "prior": {"tokens": 864, "codes": 64, "dim": 64, "depth": 4, "heads": 4, "batch": 8},
    },
    "smoke": {
        "patch": 32, "stage1_batch": 2, "stage2_batch": 4, "sample_batch": 4, "sample_steps": 5,
        "few_step": {"sampler": "dpmpp_2m", "steps": 2}, "stage2_batches": [4, 8],
        "ref_sample_batch": 4, "steps": 3, "warmup": 1, "workers": 0, "loader_batches": 10,
        "vqvae": {"num_channels": [16, 32], "num_res_channels": 32, "num_res_layers": 1,
                  "num_embeddings": 64, "embedding_dim": 8},
        "diffusion": {"in_channels": 8, "out_channels": 8, "num_channels": [32, 64],
                      "attention_levels": [False, True], "num_head_channels": [0, 32], "num_res_blocks": 1,
                      "norm_num_groups": 16},
        "prior": {"tokens": 64, "codes": 16, "dim": 32, "depth": 2, "heads": 4, "batch": 1},
    },
}


def _config(spec: dict, device: str, compile_: bool = True):
    p = spec["patch"]
    return config_from_dict({
        # torch.compile on by default for the vqldm side: a long run amortises its start-up minute
        "device": {"use_cuda": device == "cuda", "compile": compile_},
        "data": {"patch_size": [p, p, p], "batch_size": spec["stage1_batch"], "num_workers": 0},
        "vqvae": {**spec["vqvae"], "training": {"ema": False}},
        "diffusion": {**spec["diffusion"], "training": {"batch_size": spec["stage2_batch"]}},
    })


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
        torch.cuda.reset_peak_memory_stats(dev)


def _release(dev) -> None:
    """Free what earlier measurements left (reference cycles hold networks and CUDA-graph pools)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def _ref_amp(dev):
    return torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")


# ------------------------------------------------------------------------------ reference loops
def ref_stage1(cfg, spec, dev):
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

    torch.manual_seed(0)
    m = build_unet(unet_net_config(cfg)).to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195)
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
    return run


# ------------------------------------------------------------------------------ vqldm loops
def _host_batch(x: torch.Tensor, rt) -> torch.Tensor:
    """A batch as the training loader hands it over: in pinned memory on CUDA (``pin_memory``)."""
    return x.pin_memory() if rt.is_cuda else x


def vq_stage1(cfg, spec, rt):
    torch.manual_seed(0)
    task = VQVAETask(cfg, rt, normalization_of(cfg), (1.0, 1.0, 1.0))
    task.train_forward = wrap_for_training(task.train_forward, rt)
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    batch = {"image": _host_batch(torch.rand(spec["stage1_batch"], 1, *cfg.data.patch_size), rt)}
    return _with(lambda: trainer.step(batch), trainer=trainer, batch=batch)


def vq_stage2(cfg, spec, rt, batch: int | None = None):
    torch.manual_seed(0)
    batch_size = batch or spec["stage2_batch"]
    lat = latent_shape(cfg)
    task = DiffusionTask(cfg, rt, None, unet_net_config(cfg), scheduler_config(cfg), LatentNorm(1.0),
                         {"latent_shape": lat}, None)
    task.train_forward = wrap_for_training(task.model, rt)
    trainer = Trainer(cfg, task, None, None, rt, progress=False)
    task.train_mode()
    batch = {"latent": _host_batch(torch.randn(batch_size, *lat), rt)}
    return _with(lambda: trainer.step(batch), trainer=trainer, batch=batch)


def vq_sample(cfg, spec, rt, sampler: str = "ddim", steps: int | None = None):
    vq_net, unet_net = vqvae_net_config(cfg), unet_net_config(cfg)
    vq = rt.prepare_module(build_vqvae(vq_net)).eval()
    unet = rt.prepare_module(build_unet(unet_net, flash_attention=rt.is_cuda)).eval()
    diff_ckpt = {"scale_factor": 1.0, "scheduler": scheduler_config(cfg), "latent_shape": latent_shape(cfg),
                 "network": unet_net}
    vq_ckpt = {"network": vq_net, "normalization": {"intensity_range": [0.0, 1.0]}}
    pipe = DiffusionPipeline(unet, vq, diff_ckpt, vq_ckpt, rt, None, None)
    n = spec["sample_batch"]
    return lambda: pipe.generate(list(range(n)), seed=0, steps=steps or spec["sample_steps"], sampler=sampler,
                                 batch_size=n, snap=True)


def bare_steps(cfg, spec, rt, engine_step_fn):
    """The same task, network and batch as ``engine_step_fn``'s engine step (``vq_stage1`` or
    ``vq_stage2``), run as a hand-written loop would:
    forward and loss (the task's ``training_step``), backward, optimizer step. Nothing else: no
    clipping, non-finite watch, codebook tracking or restarts, EMA, CUDA graphs."""
    engine_step = engine_step_fn(cfg, spec, dataclasses.replace(rt, cuda_graphs=False))
    trainer = engine_step.trainer
    task, batch = trainer.task, engine_step.batch
    spec0 = trainer.specs[0]
    opt = make_optimizer(spec0.params, 1e-4, 0.0, rt)
    ctx = StepContext(0, 0)

    def step():
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            out = task.training_step(batch, ctx)
        out[spec0.loss_key].backward()
        opt.step()
        if hasattr(task, "codebook_ready"):  # stage 1 seeds its codebook from data once, as in the engine
            task.codebook_ready = True
    return step


def _with(fn, **attrs):
    """``fn`` with attributes attached (a step closure carries its trainer and batch for ``bare_steps``)."""
    for k, v in attrs.items():
        setattr(fn, k, v)
    return fn


def data_loader_rate(cfg, spec, n_batches: int) -> tuple[float, int]:
    """Patches per second that the stage-1 training loader delivers (MONAI transforms, foreground
    crops, augmentation, ``data.num_workers`` workers) from synthetic volumes of twice the patch."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="vqldm_bench_") as tmp:
        shape = [2 * p for p in cfg.data.patch_size]
        write_dataset(Path(tmp), num_train=8, num_val=0, shape=shape, seed=0, progress=False)
        files = sorted((Path(tmp) / "train").glob("*.nii.gz"))
        dcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augmentation=True, num_workers=spec["workers"]))
        ds = pipeline.train_dataset(dcfg, files)
        loader = pipeline.make_loader(ds, cfg.data.batch_size, True, dcfg.data.num_workers, torch.cuda.is_available())
        got, t0, it = 0, None, iter(loader)
        for i in range(n_batches + 1):
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                b = next(it)
            if i == 0:  # the first batch includes worker start-up
                t0 = time.perf_counter()
                continue
            got += b["image"].shape[0]
        return got / (time.perf_counter() - t0), dcfg.data.num_workers


# Speed switches timed by --sweep besides the main row's (compile + CUDA graphs + channels_last_3d):
# (name, compile, cuda_graphs, channels_last). Uncompiled variants cost no compilation time; stage 1
# also times compile without graphs (its graph is the main row's, so the compile cache answers).
SWEEP = [
    ("eager", False, False, True),
    ("graphs", False, True, True),
    ("graphs_no_channels_last", False, True, False),
]
SWEEP_STAGE1 = SWEEP + [("compile_no_graphs", True, False, True)]


# ------------------------------------------------------------------------------ driver
# what --only can name, in the order they run
PARTS = ("stage1_train_volumes_per_s", "stage2_train_latents_per_s", "stage2_best_batch_latents_per_s",
         "sample_volumes_per_s", "few_step_sample_volumes_per_s", "engine_overhead", "data_pipeline",
         "token_sampling_tokens_per_s")


def _emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


class _Bench:
    """One benchmark run: its device, spec and config, the rows it has emitted, and its parts."""

    def __init__(self, spec: dict, cfg, smoke: bool, sweep: bool):
        self.spec, self.cfg, self.sweep = spec, cfg, sweep
        self.rt = make_runtime(cfg)
        self.dev = self.rt.device
        self.name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        self.n, self.warm = spec["steps"], spec["warmup"]
        # compilation and CUDA-graph recording happen in the first steps: keep them out of the timing
        self.extra_warm = 4 if self.rt.is_cuda else 0
        self.rows: list[dict] = []
        self.stage1_step_s: list[float] = []  # vqldm's stage-1 step time, once measured: the data check reuses it
        self.ref_s: dict[str, tuple] = {}  # metric -> the reference's (seconds, peak GiB): later rows reuse them
        _emit(what="device", device=self.name, torch=torch.__version__, runtime=self.rt.describe(),
              spec="smoke" if smoke else "full")

    def row(self, metric, ref, mine, unit, **extra) -> None:
        r = {"metric": metric, "device": self.name, "reference": ref, "vqldm": mine,
             "ratio": (mine / ref) if ref else None, "unit": unit, **extra}
        self.rows.append(r)
        _emit(**r)

    def guarded(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # one failed metric must not lose the others
            _emit(what=fn.__name__, error=f"{e.__class__.__name__}: {str(e)[:300]}")
        _release(self.dev)

    def measure(self, build, runs: int, warm_runs: int):
        """Build one side's step and time it: (median seconds, peak GiB or None).

        Peak memory counts only what this side allocates (network, optimizer state, activations,
        CUDA-graph pools): it is measured above what was allocated before the side was built, and
        the other side is freed first, so neither is charged for the other's tensors.
        """
        dev = self.dev
        _release(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        _peak_reset(dev)
        step = build()
        t = _median_time(step, dev, runs, warm_runs)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if dev.type == "cuda" else None
        del step
        _release(dev)
        return t, peak

    def side_by_side(self, metric, ref_build, vq_build, batch, unit, vq_warm, **extra) -> float:
        """Median step time of each side (and peak memory on CUDA), one row each; returns vqldm's."""
        t_ref, m_ref = self.ref_s[metric] = self.measure(ref_build, self.n, self.warm)
        t_vq, m_vq = self.measure(vq_build, self.n, self.warm + vq_warm)
        self.row(metric, batch / t_ref, batch / t_vq, unit, batch=batch, **extra)
        if m_ref is not None:
            self.row(metric.split("_")[0] + "_peak_memory_gib", m_ref, m_vq, "GiB")
        return t_vq

    def variants(self, metric, build, batch, unit, timed_runs, warm_runs, which=SWEEP, **extra) -> None:
        """--sweep: vqldm's step under other combinations of the speed switches, one row each."""
        if not (self.sweep and self.rt.is_cuda):
            return
        for variant, comp, graphs, cl in which:
            vrt = dataclasses.replace(self.rt, compile=comp, cuda_graphs=graphs, channels_last=cl)
            try:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                t, peak = self.measure(lambda: build(vrt), timed_runs, warm_runs)
                _emit(what="sweep", metric=metric, variant=variant, device=self.name, vqldm=batch / t, unit=unit,
                      peak_gib=peak, seconds_with_warmup=time.perf_counter() - t0, **extra)
            except Exception as e:  # one failed variant must not lose the others
                _emit(what="sweep", metric=metric, variant=variant, error=f"{e.__class__.__name__}: {str(e)[:300]}")

    # ---- the parts, in PARTS order
    def stage1(self) -> None:
        cfg, spec, rt = self.cfg, self.spec, self.rt
        self.stage1_step_s.append(self.side_by_side(
            "stage1_train_volumes_per_s", lambda: ref_stage1(cfg, spec, self.dev), lambda: vq_stage1(cfg, spec, rt),
            spec["stage1_batch"], "volumes/s", self.extra_warm, patch=spec["patch"],
            reference_style="eager fp16 autocast + GradScaler, Adam, L1"))
        self.variants("stage1_train_volumes_per_s", lambda r: vq_stage1(cfg, spec, r), spec["stage1_batch"],
                      "volumes/s", self.n, self.warm + self.extra_warm, SWEEP_STAGE1)

    def stage2(self) -> None:
        cfg, spec, rt = self.cfg, self.spec, self.rt
        self.side_by_side("stage2_train_latents_per_s", lambda: ref_stage2(cfg, spec, self.dev),
                          lambda: vq_stage2(cfg, spec, rt), spec["stage2_batch"], "latents/s", self.extra_warm,
                          reference_style="eager fp16 autocast + GradScaler, Adam")
        self.variants("stage2_train_latents_per_s", lambda r: vq_stage2(cfg, spec, r), spec["stage2_batch"],
                      "latents/s", self.n, self.warm + self.extra_warm)

    def sample(self) -> None:
        cfg, spec, rt = self.cfg, self.spec, self.rt
        n_ref, n_vq = spec["ref_sample_batch"], spec["sample_batch"]
        runs = 1 if spec is SPECS["smoke"] else 3
        t_ref, m_ref = self.ref_s["sample_volumes_per_s"] = self.measure(lambda: ref_sample(cfg, spec, self.dev), runs, 1)
        t_vq, m_vq = self.measure(lambda: vq_sample(cfg, spec, rt), runs, 2 if rt.is_cuda else 1)
        self.row("sample_volumes_per_s", n_ref / t_ref, n_vq / t_vq, "volumes/s", steps=spec["sample_steps"],
                 scheduler="ddim", decode_included=True, reference_batch=n_ref, vqldm_batch=n_vq)
        if m_ref is not None:
            self.row("sample_peak_memory_gib", m_ref, m_vq, "GiB", reference_batch=n_ref, vqldm_batch=n_vq)
        self.variants("sample_volumes_per_s", lambda r: vq_sample(cfg, spec, r), n_vq, "volumes/s", runs, 2,
                      steps=spec["sample_steps"], decode_included=True)

    def reference(self, metric: str, build, runs: int, warm_runs: int) -> tuple:
        """The reference side of ``metric`` as an earlier row measured it, or measured now."""
        if metric not in self.ref_s:
            self.ref_s[metric] = self.measure(build, runs, warm_runs)
        return self.ref_s[metric]

    def stage2_best_batch(self) -> None:
        """vqldm's stage-2 step at each batch in ``stage2_batches`` until memory runs out; one row for the fastest
        (latents/s), against the reference loop at its own batch (the stage-2 row's)."""
        cfg, spec, rt = self.cfg, self.spec, self.rt
        t_ref, _ = self.reference("stage2_train_latents_per_s", lambda: ref_stage2(cfg, spec, self.dev), self.n,
                                  self.warm)
        rates, peaks = {}, {}
        for b in spec["stage2_batches"]:
            try:
                t, peaks[b] = self.measure(lambda b=b: vq_stage2(cfg, spec, rt, batch=b), self.n, self.warm + self.extra_warm)
            except torch.cuda.OutOfMemoryError:
                _release(self.dev)
                break
            rates[b] = b / t
        best = max(rates, key=rates.get)
        self.row("stage2_best_batch_latents_per_s", spec["stage2_batch"] / t_ref, rates[best], "latents/s",
                 batch=best, reference_batch=spec["stage2_batch"], latents_per_s_by_batch=rates,
                 **({"peak_gib": peaks[best]} if peaks[best] is not None else {}),
                 note="throughput only: a larger batch changes the optimisation (same lr, fewer steps per epoch)")

    def few_step_sample(self) -> None:
        """The few-step sampler (``spec["few_step"]``) through the `vqldm sample` path, decode included, against
        the reference loop's DDIM (the sampling row's reference, ``sample_steps`` steps)."""
        cfg, spec, rt = self.cfg, self.spec, self.rt
        fs, n_ref, n_vq = spec["few_step"], spec["ref_sample_batch"], spec["sample_batch"]
        runs = 1 if spec is SPECS["smoke"] else 3
        t_ref, _ = self.reference("sample_volumes_per_s", lambda: ref_sample(cfg, spec, self.dev), runs, 1)
        t_vq, m_vq = self.measure(lambda: vq_sample(cfg, spec, rt, fs["sampler"], fs["steps"]), runs,
                                  2 if rt.is_cuda else 1)
        self.row("few_step_sample_volumes_per_s", n_ref / t_ref, n_vq / t_vq, "volumes/s", steps=fs["steps"],
                 scheduler=fs["sampler"], reference_steps=spec["sample_steps"], reference_scheduler="ddim",
                 decode_included=True, reference_batch=n_ref, vqldm_batch=n_vq,
                 **({"peak_gib_per_volume": m_vq / n_vq} if m_vq is not None else {}))

    def engine_overhead(self) -> None:
        """The engine's cost over a bare loop of the same task, network and batch (graphs off on
        both sides, so only the engine's own work differs)."""
        cfg, spec, rt = self.cfg, self.spec, self.rt
        runs = max(self.n, 30)  # a few per cent is the question: more steps than the speed rows
        warm = self.warm + self.extra_warm
        for stage, step_fn, batch in (("stage1", vq_stage1, spec["stage1_batch"]),
                                      ("stage2", vq_stage2, spec["stage2_batch"])):
            t_bare, _ = self.measure(lambda: bare_steps(cfg, spec, rt, step_fn), runs, warm)
            t_eng, _ = self.measure(lambda: step_fn(cfg, spec, dataclasses.replace(rt, cuda_graphs=False)), runs, warm)
            _emit(what="engine_overhead", stage=stage, device=self.name, bare_steps_per_s=1 / t_bare,
                  engine_steps_per_s=1 / t_eng, overhead=t_eng / t_bare - 1, batch=batch,
                  engine_extras="gradient clipping, non-finite watch"
                  + (", codebook tracking + dead-code restart" if stage == "stage1" else ", weight EMA"))

    def token_sampling(self) -> None:
        """The token prior's sampler with its key/value cache against the reference that reruns the
        whole prefix for every token (MONAI's own sampler does), on the same weights and noise."""
        q = self.spec["prior"]
        torch.manual_seed(0)
        model = build_transformer({"num_tokens": q["codes"] + 1, "max_seq_len": q["tokens"],
                                   "attn_layers_dim": q["dim"], "attn_layers_depth": q["depth"],
                                   "attn_layers_heads": q["heads"], "embedding_dropout_rate": 0.0})
        model = self.rt.prepare_module(model).eval()
        noise = gumbel_noise(list(range(q["batch"])), 0, q["tokens"], q["codes"])
        out = {}

        def run(cached: bool):
            out[cached] = sample_tokens(model, noise, q["codes"], cached=cached, autocast=self.rt.autocast)

        t_ref, _ = self.measure(lambda: lambda: run(False), 1, 0)
        t_vq, _ = self.measure(lambda: lambda: run(True), 1, 1)
        n = q["tokens"] * q["batch"]
        self.row("token_sampling_tokens_per_s", n / t_ref, n / t_vq, "tokens/s", tokens=q["tokens"], batch=q["batch"],
                 reference_style="whole prefix rerun per token (MONAI's sampler)", vqldm_style="key/value cache",
                 same_tokens=bool(torch.equal(out[True], out[False])))

    def data_pipeline(self) -> None:
        """Is the data pipeline off the critical path? Loader patches/s against the step's volumes/s."""
        cfg, spec, rt = self.cfg, self.spec, self.rt
        t_step = self.stage1_step_s[0] if self.stage1_step_s else self.measure(
            lambda: vq_stage1(cfg, spec, rt), self.n, self.warm + self.extra_warm)[0]
        rate, workers = data_loader_rate(cfg, spec, spec["loader_batches"])
        consume = spec["stage1_batch"] / t_step
        _emit(what="data_pipeline", device=self.name, loader_patches_per_s=rate, step_volumes_per_s=consume,
              headroom=rate / consume, num_workers=workers, patch=spec["patch"], augmentation=True)


def run_benchmark(smoke: bool = False, device: str | None = None, only: str = "", sweep: bool = False,
                  compile_: bool = True) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise VqldmError("--device cuda: no CUDA GPU is visible")
    wanted = set(filter(None, only.split(",")))
    unknown = sorted(wanted - set(PARTS))
    if unknown:
        raise VqldmError(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    spec = SPECS["smoke" if smoke else "full"]
    bench = _Bench(spec, _config(spec, device, compile_), smoke, sweep)
    parts = {"stage1_train_volumes_per_s": bench.stage1, "stage2_train_latents_per_s": bench.stage2,
             "stage2_best_batch_latents_per_s": bench.stage2_best_batch, "sample_volumes_per_s": bench.sample,
             "few_step_sample_volumes_per_s": bench.few_step_sample, "engine_overhead": bench.engine_overhead,
             "data_pipeline": bench.data_pipeline, "token_sampling_tokens_per_s": bench.token_sampling}
    for part in PARTS:
        if not wanted or part in wanted:
            bench.guarded(parts[part])
    return bench.rows
