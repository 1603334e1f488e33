"""The one training engine that runs both stages.

A stage is a :class:`Task`: it builds its batch losses (``training_step``) and validation metrics
(``validation_step``). The engine owns everything else: AMP and gradient scaling, clipping, EMA,
intervals, TensorBoard, checkpoints, resume, non-finite guards, seeding and rank-0 I/O.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data.utils import set_rnd

from vqldm.config import Config, save_resolved
from vqldm import distributed as dist
from vqldm.checkpoint import header, load_checkpoint, rng_state, save_atomic, set_rng_state
from vqldm.engine.ema import EMA
from vqldm.runtime import Runtime, epoch_seed, seed_everything
from vqldm.engine.tensorboard import Board, archive_previous
from vqldm.errors import VqldmError

log = logging.getLogger("vqldm")

BEST, LATEST = "best_model.pt", "latest_checkpoint.pt"


@dataclass
class OptimizerSpec:
    """One optimizer and the loss (a key of ``training_step``'s output) it minimises."""

    name: str
    optimizer: torch.optim.Optimizer
    loss_key: str
    params: list
    active_from_epoch: int = 0  # e.g. the adversarial warm-up


@dataclass
class StepContext:
    epoch: int
    step: int  # global optimizer steps taken before this one


class Task:
    """What a stage provides to the engine. Subclasses set ``model``, ``kind`` and ``stage_key``."""

    kind: str  # "stage1" | "stage2" (checkpoint kind)
    stage_key: str  # "vqvae" | "diffusion" (config section)
    model: torch.nn.Module  # the network that is checkpointed and averaged (EMA)
    train_forward: Any = None  # the callable used in training_step (may be DDP- or compile-wrapped)
    val_loss_key = "loss"

    def optimizers(self) -> list[OptimizerSpec]:
        raise NotImplementedError

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, out: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        return {}

    def validation_step(self, batch: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}

    def visualize(self, board: Board, model: torch.nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        pass

    def checkpoint_meta(self) -> dict:
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def train_mode(self) -> None:
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()


@dataclass
class FitResult:
    best_path: Path | None
    latest_path: Path | None
    best_val_loss: float
    epochs: int
    steps: int
    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0


class Trainer:
    def __init__(self, cfg: Config, task: Task, train_loader, val_loader, runtime: Runtime,
                 overwrite: bool = False, progress: bool = True, train_sampler=None):
        self.cfg, self.task, self.rt = cfg, task, runtime
        self.stage = getattr(cfg, task.stage_key)
        self.t = self.stage.training
        self.train_loader, self.val_loader, self.train_sampler = train_loader, val_loader, train_sampler
        self.out_dir = Path(self.stage.checkpoints.output_dir)
        self.log_dir = Path(self.stage.logging.log_dir)
        self.overwrite, self.progress = overwrite, progress and dist.is_main()
        self.specs = task.optimizers()
        self.scalers = {s.name: torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.needs_grad_scaler)
                        for s in self.specs}
        self.ema = EMA(task.model, self.t.ema_decay) if self.t.ema else None
        self.epoch = 0
        self.step = 0
        self.best = math.inf
        self.skipped = 0
        self.last_good: Path | None = None

    # ------------------------------------------------------------------ checkpoints
    def _eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.task.model

    def _snapshot(self, val_loss: float | None) -> dict:
        d = header(self.task.kind)
        d.update({
            "epoch": self.epoch, "step": self.step,
            "val_loss": None if val_loss is None else float(val_loss),
            "best_val_loss": None if not math.isfinite(self.best) else float(self.best),
            "ema": self.ema is not None,
            "config": self.cfg.to_dict(),
            "state_dict": self._eval_model().state_dict(),
        })
        d.update(self.task.checkpoint_meta())
        return d

    def _training_state(self) -> dict:
        return {
            "model": self.task.model.state_dict(),
            "optimizers": {s.name: s.optimizer.state_dict() for s in self.specs},
            "scalers": {k: v.state_dict() for k, v in self.scalers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "task": self.task.extra_state(),
            "skipped_batches": self.skipped,
        }

    def save_latest(self, val_loss: float | None) -> Path | None:
        if not dist.is_main():
            return None
        d = self._snapshot(val_loss)
        d["training_state"] = self._training_state()
        path = save_atomic(d, self.out_dir / LATEST)
        self.last_good = path
        return path

    def save_best(self, val_loss: float) -> Path | None:
        if not dist.is_main():
            return None
        return save_atomic(self._snapshot(val_loss), self.out_dir / BEST)

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path, kind=self.task.kind, what=f"{self.task.stage_key}.checkpoints.resume_from")
        ts = ckpt.get("training_state")
        if ts is None:
            raise VqldmError(f"{self.task.stage_key}.checkpoints.resume_from: {path} is an inference snapshot "
                             f"without training state; resume from {LATEST}")
        try:
            self.task.model.load_state_dict(ts["model"])
            for s in self.specs:
                s.optimizer.load_state_dict(ts["optimizers"][s.name])
            for k, sc in self.scalers.items():
                sc.load_state_dict(ts["scalers"][k])
            if self.ema is not None:
                if ts.get("ema") is not None:
                    self.ema.load_state_dict(ts["ema"])
                else:  # EMA switched on at resume: start it from the current weights
                    self.ema.model.load_state_dict(ts["model"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise VqldmError(f"{self.task.stage_key}.checkpoints.resume_from: {path} does not match this "
                             f"config's network ({str(e).splitlines()[0][:200]})") from None
        self.task.load_extra_state(ts.get("task", {}))
        set_rng_state(ts["rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best = ckpt["best_val_loss"] if ckpt.get("best_val_loss") is not None else math.inf
        self.skipped = int(ts.get("skipped_batches", 0))
        self.last_good = Path(path)
        log.info("resumed %s from %s at epoch %d, step %d", self.task.stage_key, path, self.epoch, self.step)

    def _prepare_output(self) -> None:
        """Refuse to clobber an earlier run; with --overwrite, archive it (nothing is deleted)."""
        if not dist.is_main():
            return
        existing = [p for p in (self.out_dir / BEST, self.out_dir / LATEST) if p.exists()]
        if existing and not self.overwrite:
            key = f"{self.task.stage_key}.checkpoints"
            raise VqldmError(
                f"{key}.output_dir: {self.out_dir} already holds {', '.join(p.name for p in existing)}; "
                f"set {key}.resume_from to continue that run, pass --overwrite to start afresh (the old "
                f"files are moved to a previous_* folder), or choose another output_dir")
        if existing:
            moved = archive_previous(self.out_dir, (BEST, LATEST, "config.yaml"))
            log.info("moved the earlier checkpoints to %s", moved)
            moved = archive_previous(self.log_dir, ("events.out.tfevents.*",))
            if moved:
                log.info("moved the earlier TensorBoard events to %s", moved)

    # ------------------------------------------------------------------ loop
    def _seed_epoch(self, epoch: int) -> None:
        s = epoch_seed(self.cfg.seed, epoch, dist.rank())
        seed_everything(s)
        set_rnd(self.train_loader.dataset, seed=s)  # MONAI random transforms in the main process
        if self.train_sampler is not None and hasattr(self.train_sampler, "set_epoch"):
            self.train_sampler.set_epoch(epoch)

    def _train_step(self, batch: dict) -> dict[str, float] | None:
        ctx = StepContext(self.epoch, self.step)
        with self.rt.autocast():
            out = self.task.training_step(batch, ctx)
        active = [s for s in self.specs if self.epoch >= s.active_from_epoch and s.loss_key in out]
        losses = torch.stack([out[s.loss_key].detach().float() for s in active])
        if not bool(torch.isfinite(losses).all()):
            if self.t.skip_nonfinite:
                self.skipped += 1
                for s in self.specs:
                    s.optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d (epoch %d): batch skipped (%d so far)",
                            self.step, self.epoch + 1, self.skipped)
                return None
            last = str(self.last_good) if self.last_good else "none written yet"
            raise VqldmError(
                f"non-finite loss at step {self.step} (epoch {self.epoch + 1}) of {self.task.stage_key}; "
                f"last good checkpoint: {last}. Lower the learning rate, check the data, or set "
                f"{self.task.stage_key}.training.skip_nonfinite: true to skip such batches")
        for s in active:
            s.optimizer.zero_grad(set_to_none=True)
            scaler = self.scalers[s.name]
            scaler.scale(out[s.loss_key]).backward()
            if self.t.grad_clip_norm is not None:
                scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(s.params, self.t.grad_clip_norm)
            scaler.step(s.optimizer)
            scaler.update()
        extra = self.task.after_optimizer_step(out, ctx)
        if self.ema is not None:
            self.ema.update(self.task.model)
        self.step += 1
        vals = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
        vals.update(extra)
        return vals

    @torch.no_grad()
    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        model = self._eval_model()
        self.task.eval_mode()
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(self.val_loader):
            if max_batches is not None and i >= max_batches:
                break
            n = len(next(iter(batch.values())))
            with self.rt.autocast():
                out = self.task.validation_step(batch, model)
            for k, v in out.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + float(v) * n
            count += n
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [count]) if keys else count[None]
        packed = dist.all_reduce_sum(packed)
        total = float(packed[-1])
        return {k: float(packed[i]) / max(total, 1.0) for i, k in enumerate(keys)}

    def fit(self) -> FitResult:
        t, lg = self.t, self.stage.logging
        resume = self.stage.checkpoints.resume_from
        if resume:
            self.resume(resume)
        else:
            self._prepare_output()
        dist.barrier()
        if dist.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, self.out_dir / "config.yaml")
        board = Board(self.log_dir, purge_step=self.step if resume else None)
        n_epochs = 1 if t.fast_dev_run else t.n_epochs
        max_batches = t.fast_dev_run_batches if t.fast_dev_run else None
        history: list[dict] = []
        png_dir = self.log_dir / "images"
        vis_batch = next(iter(self.val_loader)) if self.stage.logging.num_visualize_samples > 0 else None
        log.info("%s: %d epochs, %d train batches/epoch, %d val batches, on %s", self.task.stage_key, n_epochs,
                 len(self.train_loader), len(self.val_loader), self.rt.describe())
        val_loss = None
        try:
            while self.epoch < n_epochs:
                self._seed_epoch(self.epoch)
                self.task.train_mode()
                sums: dict[str, float] = {}
                n_steps = 0
                t0 = time.perf_counter()
                total = len(self.train_loader) if max_batches is None else min(max_batches, len(self.train_loader))
                bar = _progress(self.train_loader, total, f"{self.task.stage_key} {self.epoch + 1}/{n_epochs}",
                                self.progress)
                for i, batch in enumerate(bar):
                    if max_batches is not None and i >= max_batches:
                        break
                    vals = self._train_step(batch)
                    if vals is None:
                        continue
                    n_steps += 1
                    for k, v in vals.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if self.step % lg.log_interval == 0:
                        board.scalars(vals, self.step, prefix="train/")
                        board.scalar("train/learning_rate", self.specs[0].optimizer.param_groups[0]["lr"], self.step)
                    if self.progress:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in list(vals.items())[:4]}, refresh=False)
                self.epoch += 1
                epoch_vals = {k: v / max(n_steps, 1) for k, v in sums.items()}
                epoch_vals.update(self.task.on_train_epoch_end(self.epoch))
                epoch_vals["seconds"] = time.perf_counter() - t0
                board.scalars(epoch_vals, self.epoch, prefix="train_epoch/")
                board.scalar("train_epoch/learning_rate", self.specs[0].optimizer.param_groups[0]["lr"], self.epoch)
                record = {"epoch": self.epoch, "step": self.step, **{f"train/{k}": v for k, v in epoch_vals.items()}}
                last = self.epoch == n_epochs
                if self.epoch % t.val_interval == 0 or last:
                    metrics = self.validate(max_batches)
                    board.scalars(metrics, self.epoch, prefix="val/")
                    record.update({f"val/{k}": v for k, v in metrics.items()})
                    val_loss = metrics.get(self.task.val_loss_key, math.nan)
                    if math.isfinite(val_loss) and val_loss < self.best:
                        self.best = val_loss
                        self.save_best(val_loss)
                if vis_batch is not None and (self.epoch % lg.visualize_interval == 0 or last) and dist.is_main():
                    self.task.eval_mode()
                    self.task.visualize(board, self._eval_model(), vis_batch, self.epoch, png_dir)
                if self.epoch % t.save_interval == 0 or last:
                    self.save_latest(val_loss)
                board.flush()
                history.append(record)
                if dist.is_main():
                    log.info("epoch %d/%d: %s", self.epoch, n_epochs,
                             ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                       if k not in ("epoch", "step") and isinstance(v, float)))
        finally:
            board.close()
        if self.skipped:
            log.warning("%d batch(es) with a non-finite loss were skipped", self.skipped)
        best_path = self.out_dir / BEST if (self.out_dir / BEST).exists() else None
        return FitResult(best_path, self.out_dir / LATEST, self.best, self.epoch, self.step, history, self.skipped)


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
