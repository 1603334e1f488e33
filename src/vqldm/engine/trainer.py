"""The one training engine that runs both stages.

A stage is a :class:`Task`: it builds its batch losses (``training_step``) and validation metrics
(``validation_step``). The engine owns everything else: AMP and gradient scaling, clipping, EMA,
intervals, TensorBoard, checkpoints, resume, non-finite guards, seeding and rank-0 I/O.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data.utils import set_rnd

from vqldm.config import Config
from vqldm import distributed as dist
from vqldm.checkpoint import file_sha256, header, load_checkpoint, rng_state, save_atomic, set_rng_state
from vqldm.engine.ema import EMA
from vqldm.engine.tensorboard import Board, continue_after, events_of
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write, atomic_write_bytes
from vqldm.runtime import Runtime, epoch_seed, seed_everything

log = logging.getLogger("vqldm")

BEST, LATEST = "best_model.pt", "latest_checkpoint.pt"
GRAPH_WARMUP_STEPS = 3  # eager steps (cuDNN autotuning, compilation, optimizer state) before recording


@dataclass
class OptimizerSpec:
    """One optimizer and the loss (a key of ``training_step``'s output) it minimises."""

    name: str
    optimizer: torch.optim.Optimizer
    loss_key: str
    params: list
    active_from_epoch: int = 0  # e.g. the adversarial warm-up


def make_optimizer(params, lr: float, weight_decay: float, rt: Runtime) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch for all parameters), capturable so that a CUDA
    graph can record its step (its step counter lives on the GPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=rt.is_cuda, capturable=rt.is_cuda)


def lr_factor(schedule: str, warmup: int, step: int, total: int | None) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the configured one: a linear
    warm-up over ``warmup`` steps, then constant, or down to 0 at ``total`` (cosine or linear)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def accumulation_window(i: int, total: int, k: int) -> tuple[bool, bool, float]:
    """Micro-batch ``i`` of an epoch's ``total``: whether it opens and closes its window of ``k``, and the
    share of the window's mean loss it carries (an epoch's last window may be shorter)."""
    start = (i // k) * k
    size = min(k, total - start)
    return i == start, i == start + size - 1, 1.0 / size


def resume_path(stage, task: str) -> str | None:
    """``<task>.checkpoints.resume_from`` resolved: ``latest`` is output_dir's own latest_checkpoint.pt,
    or None (a fresh start) where that folder has none yet."""
    given = stage.checkpoints.resume_from
    if given != "latest":
        return given
    here = Path(stage.checkpoints.output_dir) / LATEST
    if here.is_file():
        return str(here)
    log.info("%s.checkpoints.resume_from: latest, but %s holds no %s yet: starting afresh", task,
             stage.checkpoints.output_dir, LATEST)
    return None


@dataclass
class StepContext:
    epoch: int
    step: int  # global optimizer steps taken before this one


class Task:
    """What a stage or prior provides to the engine. Subclasses set ``name`` and ``model``.

    ``name`` is the task's one identity: its config section (whose ``training``, ``checkpoints``
    and ``logging`` the engine reads), its checkpoints' kind and its TensorBoard files' suffix.
    """

    name: str  # e.g. "vqvae" | "diffusion"
    model: torch.nn.Module  # the network that is checkpointed and averaged (EMA)
    train_forward: Any = None  # the callable used in training_step (may be DDP- or compile-wrapped)
    val_loss_key = "loss"  # the validation metric that picks best_model.pt
    # whether training_step is GPU work alone (no host sync, no CPU randomness, no Python decision on
    # tensor values), so that the engine may replay the whole step from a CUDA graph
    graph_safe = False

    def optimizers(self) -> list[OptimizerSpec]:
        raise NotImplementedError

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, out: dict[str, torch.Tensor], ctx: StepContext) -> None:
        """Host-side work after each optimizer step; ``out`` is the step's detached outputs."""

    def validation_step(self, batch: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}

    def visualize(self, board: Board, model: torch.nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        pass

    def checkpoint_meta(self) -> dict:
        return {}

    def snapshot_epochs(self) -> dict[int, str]:
        """Epochs at whose end the evaluated (EMA) weights are also kept under a file name of their own,
        a self-describing checkpoint like best_model.pt (the diffusion prior's autoguidance guide)."""
        return {}

    def check_resume(self, ckpt: dict, path: Path, key: str) -> None:
        """Refuse (a VqldmError naming ``key`` and ``path``) a checkpoint this task must not continue from."""

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
        self.stage = getattr(cfg, task.name)
        self.train_cfg = self.stage.training
        self.train_loader, self.val_loader, self.train_sampler = train_loader, val_loader, train_sampler
        self.out_dir = Path(self.stage.checkpoints.output_dir)
        self.log_dir = Path(self.stage.logging.log_dir)
        self.overwrite, self.progress = overwrite, progress and dist.is_main()
        self.specs = task.optimizers()
        self.scalers = {s.name: torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.needs_grad_scaler)
                        for s in self.specs}
        self.ema = EMA(task.model, self.train_cfg.ema_decay) if self.train_cfg.ema else None
        self.epoch = 0
        self.global_step = 0
        self.best = math.inf
        self.skipped = 0
        self.last_good: Path | None = None
        self.last_good_at: tuple[int, int] | None = None  # (epoch, step) of last_good
        self._volatile: list[torch.Tensor] | None = None  # see _volatile_tensors
        self._first_bad: torch.Tensor | None = None  # device scalar: first non-finite step, or -1
        self._step_dev: torch.Tensor | None = None
        self._graph = None  # CudaGraphed step, False where graphs cannot be used (see graph_blockers)
        self._graph_ema_outside = False
        self._val_loss: float | None = None  # the last validation's, recorded in latest_checkpoint.pt
        self._snapshots: dict[str, dict] = {}  # snapshot files written by this run: name -> epoch, sha256
        for s in self.specs:  # the configured rate, which the schedule scales (kept in the optimizer state)
            for g in s.optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self._window = (True, True, 1.0)  # this micro-batch opens / closes its accumulation window; loss share
        self._horizon: int | None = None  # optimizer steps the learning-rate schedule spans
        self._position = 0  # micro-batches of the current epoch already trained on
        self._sums: dict[str, torch.Tensor] = {}  # the current epoch's summed step losses
        self._n_steps = 0
        self._resume_at: dict | None = None  # a mid-epoch checkpoint's position, consumed by the next epoch
        self._t0 = time.monotonic()
        self._stopped: str | None = None  # why the run stopped early (max_steps, max_time_minutes)

    # ------------------------------------------------------------------ checkpoints
    def _eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.task.model

    def _snapshot(self, val_loss: float | None) -> dict:
        d = header(self.task.name)
        d.update({
            "epoch": self.epoch, "step": self.global_step,
            "val_loss": None if val_loss is None else float(val_loss),
            "best_val_loss": None if not math.isfinite(self.best) else float(self.best),
            "ema": self.ema is not None,
            "snapshots": {k: dict(v) for k, v in self._snapshots.items()},
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
            # where in the epoch this checkpoint was written (0: at its end), with the epoch's losses so far
            "position": {"batch": self._position, "n_steps": self._n_steps,
                         "sums": {k: float(v) for k, v in self._sums.items()}},
        }

    def save_latest(self, val_loss: float | None) -> Path | None:
        if not dist.is_main():
            return None
        d = self._snapshot(val_loss)
        d["training_state"] = self._training_state()
        path = save_atomic(d, self.out_dir / LATEST)
        self.last_good, self.last_good_at = path, (self.epoch, self.global_step)
        return path

    def save_best(self, val_loss: float) -> Path | None:
        if not dist.is_main():
            return None
        return save_atomic(self._snapshot(val_loss), self.out_dir / BEST)

    def save_snapshot(self, name: str) -> None:
        """Keep this epoch's evaluated weights as ``name`` (a task's :meth:`Task.snapshot_epochs`); every
        later checkpoint records the file's epoch and sha256, so a reader can tell it is this run's."""
        if not dist.is_main():
            return
        path = save_atomic(self._snapshot(self._val_loss), self.out_dir / name)
        self._snapshots[name] = {"epoch": self.epoch, "sha256": file_sha256(path)}
        log.info("%s: kept the epoch-%d weights as %s", self.task.name, self.epoch, path)

    def resume(self, path: str | Path) -> None:
        key = f"{self.task.name}.checkpoints.resume_from"
        ckpt = load_checkpoint(path, kind=self.task.name, what=key)
        ts = ckpt.get("training_state")
        if ts is None:
            raise VqldmError(f"{key}: {path} is an inference snapshot without training state; resume from {LATEST}")
        self.task.check_resume(ckpt, Path(path), key)
        try:
            self._load_weights(ts, key)
        except (RuntimeError, KeyError, ValueError) as e:
            raise VqldmError(f"{key}: {path} does not match this config's network "
                             f"({_mismatch(e, ckpt.get('network'), self.task.checkpoint_meta().get('network'))})"
                             ) from e
        self.task.load_extra_state(ts.get("task", {}))
        set_rng_state(ts["rng"])
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best = ckpt["best_val_loss"] if ckpt.get("best_val_loss") is not None else math.inf
        self.skipped = int(ts.get("skipped_batches", 0))
        self._snapshots = dict(ckpt.get("snapshots") or {})
        self.last_good, self.last_good_at = Path(path), (self.epoch, self.global_step)
        pos = ts.get("position") or {}
        if pos.get("batch"):
            self._resume_at = {**pos, "rng": ts["rng"]}
        log.info("resumed %s from %s at epoch %d, step %d", self.task.name, path, self.epoch, self.global_step)

    def _load_weights(self, ts: dict, key: str) -> None:
        """Model, optimizers, scalers and EMA from a checkpoint's training state."""
        self.task.model.load_state_dict(ts["model"])
        for s in self.specs:
            asked = [g["initial_lr"] for g in s.optimizer.param_groups]
            s.optimizer.load_state_dict(ts["optimizers"][s.name])
            for g in s.optimizer.param_groups:  # a checkpoint written before schedules existed
                g.setdefault("initial_lr", g["lr"])
            kept = [g["initial_lr"] for g in s.optimizer.param_groups]
            if kept != asked:  # exact resume restores the optimizer whole, hyperparameters included
                log.warning("%s: the %s optimizer keeps the checkpoint's learning rate %s; the config's %s "
                            "is not used when resuming", key, s.name, _fmt(kept), _fmt(asked))
        for k, sc in self.scalers.items():
            sc.load_state_dict(ts["scalers"][k])
        if self.ema is not None:
            if ts.get("ema") is not None:
                self.ema.load_state_dict(ts["ema"])
            else:  # EMA switched on at resume: start it from the current weights
                self.ema.model.load_state_dict(ts["model"])

    def _continues_here(self, resume: str | Path) -> bool:
        """Whether ``resume`` is this output_dir's own latest_checkpoint.pt (resuming in place)."""
        here = self.out_dir / LATEST
        try:
            return here.exists() and os.path.samefile(resume, here)
        except OSError:
            return False

    def _prepare_output(self, resume: str | Path | None = None) -> None:
        """Refuse to clobber an earlier run; with --overwrite, archive it (nothing is deleted).

        Resuming in place (``resume_from`` is this output_dir's latest_checkpoint.pt) continues that
        run. Resuming another run's checkpoint into an output_dir that holds checkpoints would
        replace them, so it needs --overwrite like a fresh start. A fresh start also moves aside the
        TensorBoard events of an earlier run that wrote no checkpoint, so its curves start clean.
        """
        if not dist.is_main():
            return
        key = f"{self.task.name}.checkpoints"
        if resume and self._continues_here(resume):
            return
        kept = (BEST, LATEST, *self.task.snapshot_epochs().values())
        existing = [self.out_dir / n for n in kept if (self.out_dir / n).exists()]
        if existing and not self.overwrite:
            names = ", ".join(p.name for p in existing)
            if resume:
                raise VqldmError(
                    f"{key}.output_dir: {self.out_dir} already holds {names} of another run; {key}.resume_from "
                    f"({resume}) is not its {LATEST}, so resuming would replace them. Resume into an empty "
                    f"output_dir, or pass --overwrite to move them to a previous_* folder first")
            raise VqldmError(
                f"{key}.output_dir: {self.out_dir} already holds {names}; set {key}.resume_from to continue "
                f"that run, pass --overwrite to start afresh (the old files are moved to a previous_* folder), "
                f"or choose another output_dir")
        if existing:
            moved = archive_previous(self.out_dir, (*kept, "config.yaml"))
            log.info("moved the earlier checkpoints to %s", moved)
        if existing or not resume:
            moved = archive_previous(self.log_dir, (events_of(self.task.name),))
            if moved:
                log.info("moved the earlier TensorBoard events to %s", moved)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of checkpoint writes that a kill interrupted: never checkpoints, only disk space."""
        if not dist.is_main() or not self.out_dir.is_dir():
            return
        names = (BEST, LATEST, *self.task.snapshot_epochs().values())
        stale = [p for name in names for p in self.out_dir.glob(f".{name}.*.tmp") if p.is_file()]
        for p in stale:
            p.unlink()
        if stale:
            log.info("removed %d unfinished checkpoint temp file(s) left in %s by an interrupted run",
                     len(stale), self.out_dir)

    def _write_config(self) -> None:
        """The resolved config next to the checkpoints, written atomically like them."""
        atomic_write_bytes(self.out_dir / "config.yaml", self.cfg.to_yaml().encode("utf-8"))

    # ------------------------------------------------------------------ loop
    def _seed_epoch(self, epoch: int) -> None:
        s = epoch_seed(self.cfg.seed, epoch, dist.rank())
        seed_everything(s)
        set_rnd(self.train_loader.dataset, seed=s)  # MONAI random transforms in the main process
        if self.train_sampler is not None and hasattr(self.train_sampler, "set_epoch"):
            self.train_sampler.set_epoch(epoch)

    def _raise_nonfinite(self, step: int) -> None:
        """``step``: optimizer steps taken before the bad batch (0-based); the message numbers steps
        from 1 like TensorBoard's train/ axis, so the step it names is the first one missing there."""
        stage = self.task.name
        if self.last_good is not None:
            e, s = self.last_good_at
            last = (f"last good checkpoint: {self.last_good} (epoch {e}, step {s}); resume from it with "
                    f"--set {stage}.checkpoints.resume_from={self.last_good}")
        else:
            last = "last good checkpoint: none written yet"
        raise VqldmError(
            f"non-finite loss at step {step + 1} (epoch {self.epoch + 1}) of {stage}; {last}. Lower the "
            f"learning rate, check the data, or set {stage}.training.skip_nonfinite: true to skip such batches")

    def _volatile_tensors(self) -> list[torch.Tensor]:
        """Tensors of the trained networks that change outside the optimizer: buffers (the codebook's
        EMA statistics, norm running stats) and frozen parameters (the EMA codebook). A forward pass
        on a bad batch can write NaN into them before its loss is seen, so a skipped batch restores them."""
        if self._volatile is None:
            trained = {id(p) for s in self.specs for p in s.params}
            mods = [m for m in vars(self.task).values() if isinstance(m, torch.nn.Module)]
            mods = [m for m in mods if any(id(p) in trained for p in m.parameters())]
            seen, vol = set(), []
            for m in mods:
                for t in [*m.buffers(), *(p for p in m.parameters() if id(p) not in trained)]:
                    if id(t) not in seen:
                        seen.add(id(t))
                        vol.append(t)
            self._volatile = vol
        return self._volatile

    def _watch_finite(self, finite: torch.Tensor, advance: bool = True) -> None:
        """Remember the first non-finite step on the device, without a host sync per step.

        ``check_finite`` reads it at log steps and before every checkpoint, so a bad step stops
        the run before anything it touched is saved. Updated in place, so a CUDA graph replay
        carries it from step to step.
        """
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
            self._step_dev = torch.full((), self.global_step, dtype=torch.long, device=finite.device)
        self._first_bad.copy_(torch.where((~finite) & (self._first_bad < 0), self._step_dev, self._first_bad))
        if advance:
            self._step_dev += 1

    def check_finite(self) -> None:
        if self._first_bad is None:
            return
        bad = self._first_bad
        if dist.is_dist():  # every rank stops together, or the others hang in their next collective
            bad = dist.all_reduce_max(bad.clone().reshape(1))[0]
        if int(bad) >= 0:
            self._raise_nonfinite(int(bad))

    # ------------------------------------------------------------------ one step
    def graph_blockers(self) -> list[str]:
        """Why this run cannot replay its training step from a CUDA graph (empty: it can)."""
        why = []
        if not (self.rt.is_cuda and self.rt.cuda_graphs):
            why.append("device.cuda_graphs is off or no CUDA GPU is used")
        if dist.is_dist():
            why.append("distributed training (DDP) runs eagerly")
        if self.rt.needs_grad_scaler:
            why.append("fp16 with a GradScaler needs a host decision per step (bf16 does not)")
        if self.train_cfg.skip_nonfinite:
            why.append(f"{self.task.name}.training.skip_nonfinite needs a host decision per step")
        if len(self.specs) != 1 or self.specs[0].active_from_epoch:
            why.append("more than one optimizer (the adversarial discriminator)")
        if not self.task.graph_safe:
            why.append(f"the {self.task.name} task is not graph-safe")
        t = self.train_cfg
        if t.grad_accumulation_steps > 1:
            why.append(f"{self.task.name}.training.grad_accumulation_steps > 1 runs eagerly")
        if t.lr_schedule != "constant" or t.warmup_steps:
            why.append("a learning-rate schedule changes the rate a recorded optimizer step would keep")
        return why

    def _task_has_after_step(self) -> bool:
        return type(self.task).after_optimizer_step is not Task.after_optimizer_step

    def _forward(self, batch: dict, ctx: StepContext):
        """The task's losses, the optimizers active now, and whether their losses are finite (on device)."""
        with self.rt.autocast():
            out = self.task.training_step(batch, ctx)
        active = [s for s in self.specs if self.epoch >= s.active_from_epoch and s.loss_key in out]
        finite = torch.isfinite(torch.stack([out[s.loss_key].detach().float() for s in active])).all()
        return out, active, finite

    def _device_step(self, batch: dict, ctx: StepContext, with_ema: bool) -> dict[str, torch.Tensor]:
        """Forward, backward, clipping, optimizer (and EMA): GPU work only, no host sync, so that
        a CUDA graph can record it. Not used with skip_nonfinite (see :meth:`step`)."""
        out, active, finite = self._forward(batch, ctx)
        self._watch_finite(finite, advance=self._window[1])
        self._optimize(out, active)
        if with_ema and self.ema is not None:
            self.ema.update(self.task.model)
        return _detached(out)

    def _finish(self, out: dict[str, torch.Tensor], ctx: StepContext, ema: bool) -> dict[str, torch.Tensor]:
        """The host side of a step's end: the task's hook (after every micro-batch), and where the step closes
        its accumulation window the EMA (unless the graph ran it) and the count."""
        self.task.after_optimizer_step(out, ctx)
        if not self._window[1]:
            return _scalars(out)
        if ema and self.ema is not None:
            self.ema.update(self.task.model)
        self.global_step += 1
        return _scalars(out)

    def _optimize(self, out: dict[str, torch.Tensor], active: list[OptimizerSpec]) -> None:
        first, last, share = self._window
        for s in active:
            if first:
                s.optimizer.zero_grad(set_to_none=True)
            scaler = self.scalers[s.name]
            loss = out[s.loss_key] if share == 1.0 else out[s.loss_key] * share
            scaler.scale(loss).backward()
            if not last:  # gradients add up over the window; the optimizer steps at its end
                continue
            if self.train_cfg.grad_clip_norm is not None:
                scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(s.params, self.train_cfg.grad_clip_norm)
            scaler.step(s.optimizer)
            scaler.update()

    def _graphed_step(self):
        """The step replayed from a CUDA graph, built on first use (None where not possible)."""
        if self._graph is None:
            blockers = self.graph_blockers()
            if blockers:
                self._graph = False
                if self.rt.is_cuda and self.rt.cuda_graphs:
                    log.info("CUDA graphs off for the %s step: %s", self.task.name, "; ".join(blockers))
            else:
                from vqldm.graphs import CudaGraphed

                # EMA goes into the graph unless the task changes the model after the optimizer step
                # (stage 1's codebook restarts): the EMA must see that change, as in the eager order
                with_ema = not self._task_has_after_step()
                self._graph_ema_outside = not with_ema
                self._graph = CudaGraphed(
                    lambda b: self._device_step(b, StepContext(self.epoch, self.global_step), with_ema),
                    self.rt.device, warmup=GRAPH_WARMUP_STEPS, prepare=self.rt.to_device,
                    name=f"{self.task.name} training step")
        return self._graph or None

    def step(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """One optimisation step on ``batch``; returns the step's scalars as device tensors (no host
        sync), or None where ``skip_nonfinite`` skipped the batch."""
        ctx = StepContext(self.epoch, self.global_step)
        self._apply_lr()
        graphed = self._graphed_step()
        if graphed is not None:
            out = graphed({k: v for k, v in batch.items() if torch.is_tensor(v)})
            # the hook reads ``out`` before the next replay overwrites it; the logged values are copied
            return {k: v.clone() for k, v in self._finish(out, ctx, ema=self._graph_ema_outside).items()}
        if not self.train_cfg.skip_nonfinite:
            return self._finish(self._device_step(batch, ctx, with_ema=False), ctx, ema=True)
        saved = [t.detach().clone() for t in self._volatile_tensors()]
        out, active, finite = self._forward(batch, ctx)
        # skipping needs the answer now: one host sync per step
        bad = (~finite).float().reshape(1)
        if dist.is_dist():  # every rank skips the same batch, or DDP's gradient all-reduce hangs
            dist.all_reduce_max(bad)
        if bool(bad.item()):
            self.skipped += 1
            for s in self.specs:
                s.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # undo what the forward pass wrote into buffers
                for t, v in zip(self._volatile_tensors(), saved):
                    t.copy_(v)
            # numbered like TensorBoard's train/ axis: the step this batch would have been
            log.warning("non-finite loss at step %d (epoch %d): batch skipped (%d so far)",
                        self.global_step + 1, self.epoch + 1, self.skipped)
            return None
        self._optimize(out, active)
        return self._finish(_detached(out), ctx, ema=True)

    def _apply_lr(self) -> None:
        """Each optimizer's rate for this step: its configured rate times the schedule's factor, a function
        of the step count alone (nothing else to checkpoint, so resume stays exact)."""
        t = self.train_cfg
        f = lr_factor(t.lr_schedule, t.warmup_steps, self.global_step, self._horizon)
        for s in self.specs:
            for g in s.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f

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
        resume = resume_path(self.stage, self.task.name)
        if resume:
            self.resume(resume)
        self._open_run(resume)
        self._carry_best(resume)
        self._carry_snapshots(resume)
        # train/ tags count steps, the others epochs; after continue_after nothing on disk lies past
        # either, so purging from the larger + 1 drops nothing and only guards older logs
        board = Board(self.log_dir, purge_step=max(self.global_step, self.epoch) + 1 if resume else None,
                      task=self.task.name)
        n_epochs = 1 if self.train_cfg.fast_dev_run else self.train_cfg.n_epochs
        max_batches = self.train_cfg.fast_dev_run_batches if self.train_cfg.fast_dev_run else None
        self._horizon = n_epochs * -(-self._batches_per_epoch(max_batches) // self.train_cfg.grad_accumulation_steps)
        # pictures are rank 0's alone, so only rank 0 draws a batch for them
        vis_batch = (next(iter(self.val_loader))
                     if self.stage.logging.num_visualize_samples > 0 and dist.is_main() else None)
        log.info("%s: %d epochs, %d train batches/epoch, %d val batches, on %s", self.task.name, n_epochs,
                 len(self.train_loader), len(self.val_loader), self.rt.describe())
        history: list[dict] = []
        self._t0 = time.monotonic()
        self._stopped = self._stop_reason(clock=False)  # a resumed run that already reached max_steps
        try:
            while self.epoch < n_epochs and not self._stopped:
                record = self._train_epoch(board, n_epochs, max_batches)
                if record is None:  # stopped mid-epoch, latest_checkpoint.pt written
                    break
                self._end_epoch(board, record, n_epochs, max_batches, vis_batch)
                history.append(record)
        finally:
            board.close()
        return self._fit_result(history)

    def _fit_result(self, history: list[dict]) -> FitResult:
        if self._stopped:
            log.info("%s stopped early (%s) at epoch %d, step %d; continue with --set %s.checkpoints.resume_from="
                     "latest", self.task.name, self._stopped, self.epoch, self.global_step, self.task.name)
        if self.skipped:
            log.warning("%d batch(es) with a non-finite loss were skipped", self.skipped)
        # no rank returns before rank 0 has written the last checkpoints: code that goes on to read
        # them (sampling after training in one script) would otherwise race rank 0's writes
        dist.barrier()
        if not dist.is_main():  # rank 0 writes the files; other ranks report none
            return FitResult(None, None, self.best, self.epoch, self.global_step, history, self.skipped)
        best_path = self.out_dir / BEST if (self.out_dir / BEST).exists() else None
        latest = self.out_dir / LATEST if (self.out_dir / LATEST).exists() else None
        return FitResult(best_path, latest, self.best, self.epoch, self.global_step, history, self.skipped)

    def _carry_best(self, resume: str | None) -> None:
        """Resuming another folder's run here: its best_model.pt comes along, so this folder holds the best
        model even when no validation here beats it. Where that file is missing or is not the resumed run's
        best (another score), the best score restarts, so the first validation here writes one."""
        if not resume or not dist.is_main() or (self.out_dir / BEST).exists():
            return
        src = Path(resume).parent / BEST
        try:
            theirs = load_checkpoint(src, kind=self.task.name) if src.is_file() else None
        except VqldmError:
            theirs = None
        if theirs is not None and math.isfinite(self.best) and theirs.get("val_loss") == self.best:
            atomic_write(self.out_dir / BEST, lambda f: f.write(src.read_bytes()))
            log.info("copied the resumed run's %s (val loss %.5g) from %s", BEST, self.best, src.parent)
            return
        if math.isfinite(self.best):
            log.warning("%s: no %s of the resumed run beside %s; the next validation writes one here", self.out_dir,
                        BEST, resume)
        self.best = math.inf

    def _carry_snapshots(self, resume: str | None) -> None:
        """Resuming another folder's run here: the snapshot files its checkpoint records come along (the
        same bytes, checked by sha256), so this folder's checkpoints do not point at files it lacks."""
        if not resume or not dist.is_main():
            return
        for name, rec in self._snapshots.items():
            src, dst = Path(resume).parent / name, self.out_dir / name
            if dst.exists() or not src.is_file():
                continue
            if file_sha256(src) != rec.get("sha256"):
                log.warning("%s beside %s is not the file the resumed run recorded; not copied", name, resume)
                continue
            atomic_write(dst, lambda f, src=src: f.write(src.read_bytes()))
            log.info("copied the resumed run's %s (epoch %s) from %s", name, rec.get("epoch"), src.parent)

    def _stop_reason(self, clock: bool = True) -> str | None:
        """Why the run stops now (``max_steps`` or, with ``clock``, ``max_time_minutes`` reached), or None;
        every rank agrees."""
        t = self.train_cfg
        if t.max_steps is not None and self.global_step >= t.max_steps:
            return f"{self.task.name}.training.max_steps {t.max_steps} reached"
        if t.max_time_minutes is None or not clock:
            return None
        over = (time.monotonic() - self._t0) / 60.0 >= t.max_time_minutes
        if dist.is_dist():  # clocks differ: rank 0 decides for all
            over = dist.broadcast_object(over)
        return f"{self.task.name}.training.max_time_minutes {t.max_time_minutes:g} reached" if over else None

    def _open_run(self, resume: str | Path | None) -> None:
        """The output folder checked (rank 0 decides, every rank stops on its verdict), stale temp files
        removed, the event files cut at the resume point, the resolved config written."""
        problem = None
        if dist.is_main():
            try:
                self._prepare_output(resume)
            except VqldmError as e:
                problem = str(e)
        problem = dist.broadcast_object(problem)
        if problem:
            raise VqldmError(problem)
        if dist.is_main():
            self._remove_stale_temp_files()
            if resume:  # events logged after the checkpoint (by a run that died) are archived, not repeated
                moved = continue_after(self.log_dir, self.global_step, self.epoch, events_of(self.task.name))
                if moved:
                    log.info("TensorBoard: the events logged after the resume point (epoch %d, step %d) by the "
                             "interrupted run were moved to %s; the curves continue from there", self.epoch,
                             self.global_step, moved)
        dist.barrier()
        if dist.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()

    def _batches_per_epoch(self, max_batches: int | None) -> int:
        n = len(self.train_loader)
        return n if max_batches is None else min(max_batches, n)

    def _train_epoch(self, board: Board, n_epochs: int, max_batches: int | None) -> dict | None:
        """One pass over the training loader; returns the epoch's record (mean losses, seconds), or None
        where the run stopped mid-epoch (``max_steps``, ``max_time_minutes``)."""
        self._seed_epoch(self.epoch)
        self.task.train_mode()
        t0 = time.perf_counter()
        total = self._batches_per_epoch(max_batches)
        skip = self._take_position()
        bar = _progress(self.train_loader, total, f"{self.task.name} {self.epoch + 1}/{n_epochs}", self.progress)
        for i, batch in enumerate(bar):
            if i >= total:
                break
            if i < skip:  # trained on before the mid-epoch checkpoint this run resumed from
                if i == skip - 1:  # the data streams are where they were; the checkpoint's RNG state goes on
                    set_rng_state(self._resume_rng)
                continue
            self._window = accumulation_window(i, total, self.train_cfg.grad_accumulation_steps)
            vals = self.step(batch)
            self._position = i + 1
            if vals is None:
                continue
            self._n_steps += 1
            for k, v in vals.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            if self._window[1]:
                self._log_step(board, bar, vals)
                if i + 1 < total and self._between_steps(board):
                    return None
        self.check_finite()
        self.epoch += 1
        epoch_vals = {k: float(v) / max(self._n_steps, 1) for k, v in self._sums.items()}
        self._position, self._sums, self._n_steps = 0, {}, 0
        epoch_vals.update(self.task.on_train_epoch_end(self.epoch))
        epoch_vals["seconds"] = time.perf_counter() - t0
        board.scalars(epoch_vals, self.epoch, prefix="train_epoch/")
        board.scalar("train_epoch/learning_rate", self.specs[0].optimizer.param_groups[0]["lr"], self.epoch)
        return {"epoch": self.epoch, "step": self.global_step, **{f"train/{k}": v for k, v in epoch_vals.items()}}

    def _take_position(self) -> int:
        """Micro-batches of this epoch a resumed mid-epoch checkpoint already trained on (0: none), with
        the epoch's summed losses so far restored."""
        pos, self._resume_at = self._resume_at, None
        if not pos:
            return 0
        self._resume_rng = pos["rng"]
        self._n_steps = int(pos["n_steps"])
        self._sums = {k: torch.tensor(v, dtype=torch.float32, device=self.rt.device) for k, v in pos["sums"].items()}
        return int(pos["batch"])

    def _log_step(self, board: Board, bar, vals: dict[str, torch.Tensor]) -> None:
        if self.global_step % self.stage.logging.log_interval != 0:
            return
        self.check_finite()  # with the logging below, the only per-step host syncs
        vals = {k: float(v) for k, v in vals.items()}
        board.scalars(vals, self.global_step, prefix="train/")
        board.scalar("train/learning_rate", self.specs[0].optimizer.param_groups[0]["lr"], self.global_step)
        if self.progress:
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(vals.items())[:4]}, refresh=False)

    def _between_steps(self, board: Board) -> bool:
        """Mid-epoch, after an optimizer step: latest_checkpoint.pt every ``save_interval_steps``, and
        the stop (with that checkpoint) once ``max_steps`` or ``max_time_minutes`` is reached."""
        self._stopped = self._stop_reason()
        n = self.train_cfg.save_interval_steps
        if self._stopped or (n and self.global_step % n == 0):
            self.check_finite()
            board.flush()  # the events up to here reach the disk before the checkpoint that ends them
            self.save_latest(self._val_loss)
        return bool(self._stopped)

    def _end_epoch(self, board: Board, record: dict, n_epochs: int, max_batches: int | None, vis_batch) -> None:
        """Validation, best_model.pt, pictures and latest_checkpoint.pt, each at its interval."""
        lg = self.stage.logging
        last = self.epoch == n_epochs
        if self.epoch % self.train_cfg.val_interval == 0 or last:
            metrics = self.validate(max_batches)
            board.scalars(metrics, self.epoch, prefix="val/")
            record.update({f"val/{k}": v for k, v in metrics.items()})
            self._val_loss = metrics.get(self.task.val_loss_key, math.nan)
            if math.isfinite(self._val_loss) and self._val_loss < self.best:
                self.best = self._val_loss
                self.save_best(self._val_loss)
        snapshot = self.task.snapshot_epochs().get(self.epoch)
        if snapshot:
            self.save_snapshot(snapshot)
        if vis_batch is not None and (self.epoch % lg.visualize_interval == 0 or last) and dist.is_main():
            self.task.eval_mode()
            self.task.visualize(board, self._eval_model(), vis_batch, self.epoch, self.log_dir / "images")
        board.flush()  # this epoch's events reach the disk before the checkpoint that ends them
        self._stopped = self._stop_reason()
        n = self.train_cfg.save_interval_steps
        if self.epoch % self.train_cfg.save_interval == 0 or last or self._stopped or (n and self.global_step % n == 0):
            self.save_latest(self._val_loss)
        if dist.is_main():
            log.info("epoch %d/%d: %s", self.epoch, n_epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                               if k not in ("epoch", "step") and isinstance(v, float)))


def _detached(out: dict) -> dict[str, torch.Tensor]:
    """A step's outputs without autograd history: scalars as float32, other tensors as they are."""
    return {k: (v.detach().float() if v.ndim == 0 else v.detach()) for k, v in out.items() if torch.is_tensor(v)}


def _scalars(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step's logged values: its 0-d tensors (losses)."""
    return {k: v for k, v in out.items() if v.ndim == 0}


def _mismatch(e: BaseException, theirs: dict | None, ours: dict | None) -> str:
    """Why a state dict did not load: the differing network keys, else torch's first useful line."""
    theirs, ours = theirs or {}, ours or {}
    diff = [f"{k} {theirs.get(k)!r} in the checkpoint vs {ours.get(k)!r} here"
            for k in sorted(set(theirs) | set(ours), key=str) if theirs.get(k) != ours.get(k)]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = "; ".join(diff) if diff else next(
        (ln for ln in lines if not ln.startswith("Error(s) in loading")), lines[0] if lines else repr(e))
    return detail[:300]


def _fmt(values: list[float]) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    # the plain console bar: tqdm.auto's asyncio variant calls iter() on the loader when it is built and
    # again when iterated, and each DataLoader iterator draws a seed from the torch RNG, so the bar
    # (on unless --quiet) would change which patches and noise the run trains on
    from tqdm.std import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
