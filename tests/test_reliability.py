"""What vqldm promises when things go wrong: the reliability specification (issue 6).

Each group below opens with the promise it checks, in words a user can rely on; the tests are the
fine print. Everything runs on the CPU with tiny networks, ``num_workers`` 0 and one torch thread,
where training is deterministic, so "the same" means bit-identical. ``docs/reliability.md`` is the
prose version of this file.

Groups:

1. Exact resume: k epochs + resume to N == N uninterrupted epochs, TensorBoard axis included.
2. Crash safety: ``kill -9`` at any moment leaves only loadable checkpoints, never a torn one.
3. Non-finite losses: stop with a message naming the step and the last good checkpoint, or skip.
4. Bad input: one line naming the file or key, exit code 2, no traceback (``--debug`` shows it).
5. Safe loading: a checkpoint that carries code is refused and its code never runs.
6. No data lost: nothing earlier is overwritten or deleted without ``--overwrite``, and then it is archived.

Related tests elsewhere: ``test_stage1.py::test_resume_is_bit_identical`` /
``test_stage2.py::test_resume_is_bit_identical`` (the basic resume), ``test_data.py`` (each reader
error at the function level), ``test_config.py`` (config mistakes), ``test_synth.py`` (synth refuses
to overwrite at the function level).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import math
import os
import random
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from vqldm.checkpoint import load_checkpoint
from vqldm.errors import VqldmError
from vqldm.autoencoder.task import VQVAETask

from conftest import copy_tree, run_cli, tiny_config_dict, write_config

SRC = Path(__file__).resolve().parents[1] / "src" / "vqldm"
BEST, LATEST = "best_model.pt", "latest_checkpoint.pt"


# =================================================================================== helpers
def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def cli(capsys, *args) -> tuple[int, str, str]:
    """``vqldm ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = run_cli(*args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_error(rc: int, err: str, *names) -> str:
    """The user-error contract: exit code 2, exactly one ``vqldm: error:`` line that names every one
    of ``names`` (file, key, path), and no traceback. Returns the line."""
    assert rc == 2, f"exit code {rc}, expected 2 (a user error); stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("vqldm: error:")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert err.strip().splitlines()[-1] == lines[0], f"the error line must be the last thing printed:\n{err}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def stage1_cfg(root: Path, data_dir: Path, n_epochs: int = 1, **training) -> dict:
    cfg = tiny_config_dict(root, data_dir)
    cfg["vqvae"]["training"].update({"n_epochs": n_epochs, **training})
    return cfg


def stage2_cfg(root: Path, data_dir: Path, stage1_best: Path, n_epochs: int = 1, **training) -> dict:
    cfg = tiny_config_dict(root, data_dir)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(stage1_best)
    cfg["diffusion"]["training"].update({"n_epochs": n_epochs, **training})
    return cfg


def out_dir(cfg: dict, stage: str = "vqvae") -> Path:
    return Path(cfg[stage]["checkpoints"]["output_dir"])


def log_dir(cfg: dict, stage: str = "vqvae") -> Path:
    return Path(cfg[stage]["logging"]["log_dir"])


def assert_same(a, b, path: str = "") -> None:
    """Bit-identical nested checkpoint content (tensors with torch.equal, floats exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_checkpoint(resumed: Path, uninterrupted: Path, roots: tuple[Path, Path]) -> None:
    """Everything in the two files is identical except the creation time and the paths in the config."""
    r, u = load(resumed), load(uninterrupted)
    for d in (r, u):
        d.pop("created")
    cr, cu = r.pop("config"), u.pop("config")
    for c in (cr, cu):
        for stage in ("vqvae", "diffusion"):
            c[stage]["checkpoints"]["resume_from"] = None
    assert_same(_replace_str(cr, str(roots[0]), str(roots[1])), cu, "config")
    assert_same(r, u, resumed.name)


def _replace_str(obj, old: str, new: str):
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: _replace_str(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_str(v, old, new) for v in obj]
    return obj


def event_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("events.out.tfevents.*"))


def raw_events(directory: Path) -> list[tuple[str, int]]:
    """(tag, step) of every summary value in every event file directly in ``directory``, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in event_files(directory):
        for ev in EventFileLoader(str(f)).Load():
            out.extend((v.tag, int(ev.step)) for v in ev.summary.value)
    return out


def tensorboard_view(directory: Path) -> dict[str, list]:
    """What TensorBoard shows: tag -> [(step, value)] for scalars, [step] for images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    view = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    view.update({t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]})
    return view


def assert_one_step_axis(resumed_logs: Path, uninterrupted_logs: Path) -> None:
    """The resumed run's TensorBoard logs hold each (tag, step) once and read exactly like the
    uninterrupted run's: same tags, same steps, same values (wall-clock timings: same steps)."""
    raw = raw_events(resumed_logs)
    dups = sorted({x for x in raw if raw.count(x) > 1})
    assert not dups, f"duplicated (tag, step) in the event files: {dups[:10]}"
    resumed, uninterrupted = tensorboard_view(resumed_logs), tensorboard_view(uninterrupted_logs)
    assert resumed.keys() == uninterrupted.keys()
    for tag in resumed:
        r, u = resumed[tag], uninterrupted[tag]
        if tag.endswith("/seconds"):
            r, u = [s for s, _ in r], [s for s, _ in u]
        assert r == u, f"TensorBoard {tag}: resumed {r} vs uninterrupted {u}"


class CallCounter:
    """Poison the ``at``-th call of VQVAETask.training_step (1-based): its loss, or its input."""

    def __init__(self, monkeypatch, at: int | set[int], what: str = "loss"):
        self.at = {at} if isinstance(at, int) else set(at)
        self.what, self.calls = what, 0
        original = VQVAETask.training_step

        def training_step(task, batch, ctx):
            self.calls += 1
            poison = self.calls in self.at
            if poison and self.what == "input":
                batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
            out = original(task, batch, ctx)
            if poison and self.what == "loss":
                out = {k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in out.items()}
            return out

        monkeypatch.setattr(VQVAETask, "training_step", training_step)


# =================================================================================== 1. exact resume
"""Promise: stopping a run after k epochs and resuming it with
``--set <stage>.checkpoints.resume_from=<output_dir>/latest_checkpoint.pt`` up to N epochs gives
the same result as N epochs in one go - on the CPU with ``num_workers`` 0 and the same seed,
bit-identical: network weights, optimizer moments, EMA weights, codebook buffers, step and epoch
counters, RNG state, best score, best_model.pt. TensorBoard continues the same step axis: every
(tag, step) appears once, and the curves equal the uninterrupted run's."""


def test_stage1_resume_twice_equals_uninterrupted_with_ema(tmp_path, data_dir, capsys):
    extra = {"ema": True, "ema_decay": 0.9}
    a = stage1_cfg(tmp_path / "a", data_dir, n_epochs=1, **extra)
    cfg_a = write_config(tmp_path / "a.yaml", a)
    latest_a = out_dir(a) / LATEST
    assert cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a)[0] == 0
    for n in (2, 4):  # two resumes: 1 -> 2 -> 4 epochs
        rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a, "--set", f"vqvae.training.n_epochs={n}",
                         "--set", f"vqvae.checkpoints.resume_from={latest_a}")
        assert rc == 0, err
    u = stage1_cfg(tmp_path / "u", data_dir, n_epochs=4, **extra)
    assert cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "u.yaml", u))[0] == 0

    r = load(latest_a)
    assert r["epoch"] == 4 and r["step"] == 8 and r["ema"] is True
    assert r["training_state"]["ema"] is not None and r["training_state"]["optimizers"]["vqvae"]["state"]
    roots = (tmp_path / "a", tmp_path / "u")
    assert_same_checkpoint(latest_a, out_dir(u) / LATEST, roots)
    assert_same_checkpoint(out_dir(a) / BEST, out_dir(u) / BEST, roots)
    assert_one_step_axis(log_dir(a), log_dir(u))
    # the second resumed run's own event file starts right after the resume point (epoch 2, step 4)
    newest = max(event_files(log_dir(a)), key=lambda p: p.stat().st_mtime_ns)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    own = [(v.tag, int(ev.step)) for ev in EventFileLoader(str(newest)).Load() for v in ev.summary.value]
    assert min(s for t, s in own if t.startswith("train/")) == 5
    assert min(s for t, s in own if t.startswith("val/")) == 3


def stage2_resumed_and_uninterrupted(capsys, tmp_path: Path, a: dict, u: dict) -> tuple[Path, Path]:
    """Stage 2 trained with config ``a`` (1 epoch), resumed up to ``u``'s epochs, and ``u`` in one go;
    returns (a's config file, a's latest checkpoint)."""
    cfg_a = write_config(tmp_path / "a.yaml", a)
    latest_a = out_dir(a, "diffusion") / LATEST
    assert cli(capsys, "--quiet", "train-diffusion", "--config", cfg_a)[0] == 0
    n = u["diffusion"]["training"]["n_epochs"]
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", cfg_a, "--set", f"diffusion.training.n_epochs={n}",
                     "--set", f"diffusion.checkpoints.resume_from={latest_a}")
    assert rc == 0, err
    assert cli(capsys, "--quiet", "train-diffusion", "--config", write_config(tmp_path / "u.yaml", u))[0] == 0
    return cfg_a, latest_a


def test_stage2_resume_equals_uninterrupted(tmp_path, data_dir, trained_stage1, capsys):
    a = stage2_cfg(tmp_path / "a", data_dir, trained_stage1["best"], n_epochs=1)
    u = stage2_cfg(tmp_path / "u", data_dir, trained_stage1["best"], n_epochs=3)
    _, latest_a = stage2_resumed_and_uninterrupted(capsys, tmp_path, a, u)

    r = load(latest_a)
    assert r["epoch"] == 3 and r["step"] == 6 and r["training_state"]["ema"] is not None
    roots = (tmp_path / "a", tmp_path / "u")
    assert_same_checkpoint(latest_a, out_dir(u, "diffusion") / LATEST, roots)
    assert_same_checkpoint(out_dir(a, "diffusion") / BEST, out_dir(u, "diffusion") / BEST, roots)
    assert_one_step_axis(log_dir(a, "diffusion"), log_dir(u, "diffusion"))


def test_progress_bars_do_not_change_the_result(tmp_path, data_dir, capsys):
    """Resuming with or without ``--quiet`` (progress bars off or on) continues the same run: the
    display never draws from the random streams that pick patches and noise."""
    paths = {}
    for quiet in (True, False):
        c = stage1_cfg(tmp_path / str(quiet), data_dir, n_epochs=2)
        c["vqvae"]["logging"]["num_visualize_samples"] = 0
        rc, _, err = cli(capsys, *(["--quiet"] if quiet else []), "train-vqvae", "--config",
                         write_config(tmp_path / f"{quiet}.yaml", c))
        assert rc == 0, err
        paths[quiet] = out_dir(c) / LATEST
    assert_same_checkpoint(paths[False], paths[True], (tmp_path / "False", tmp_path / "True"))


def test_resume_keeps_the_checkpoint_learning_rate_and_says_so(tmp_path, data_dir, capsys, caplog):
    """The optimizer state is restored whole (that is what makes resume exact), so a learning rate
    changed in the config does not apply to a resumed run - and vqldm says so instead of ignoring it."""
    cfg = stage1_cfg(tmp_path, data_dir)
    cfg["vqvae"]["logging"]["num_visualize_samples"] = 0
    path = write_config(tmp_path / "c.yaml", cfg)
    assert cli(capsys, "--quiet", "train-vqvae", "--config", path)[0] == 0
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", path, "--set", "vqvae.training.n_epochs=2",
                     "--set", "vqvae.learning_rate=0.5",
                     "--set", f"vqvae.checkpoints.resume_from={out_dir(cfg) / LATEST}")
    assert rc == 0, err
    assert "keeps the checkpoint's learning rate 0.001; the config's 0.5 is not used" in caplog.text
    assert load(out_dir(cfg) / LATEST)["training_state"]["optimizers"]["vqvae"]["param_groups"][0]["lr"] == 1e-3


def test_a_resumed_event_file_is_read_after_the_earlier_ones(tmp_path):
    """TensorBoard reads event files in name order, and a name starts with the second it was made in.
    A resumed run's file sorts after the files it continues even when it starts in the same second."""
    from vqldm.engine.tensorboard import Board

    earlier = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.~.1.0.vqvae"  # "~" sorts after any host
    earlier.write_bytes(b"")
    board = Board(tmp_path, purge_step=3, task="vqvae")
    board.scalar("train/loss", 1.0, 3)
    board.close()
    names = [p.name for p in event_files(tmp_path)]
    assert len(names) == 2 and names[0] == earlier.name, names


def test_resume_after_a_crash_past_the_last_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    """A run dies in epoch 4 while its last checkpoint is from epoch 2 (save_interval 2): the events
    it logged for epoch 3 and step 7 are stale. The resumed run shows each step once, and equals an
    uninterrupted run; the stale events are kept, archived under previous_*/."""
    a = stage1_cfg(tmp_path / "a", data_dir, n_epochs=4, save_interval=2)
    a["vqvae"]["logging"]["num_visualize_samples"] = 0
    cfg_a = write_config(tmp_path / "a.yaml", a)
    poison = CallCounter(monkeypatch, at=7)  # the first batch of epoch 4
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a)
    assert_clean_error(rc, err, "non-finite loss", "step 7", str(out_dir(a) / LATEST))
    assert poison.calls == 7 and load(out_dir(a) / LATEST)["epoch"] == 2
    monkeypatch.undo()
    stale = tree_hashes(log_dir(a))

    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", cfg_a,
                     "--set", f"vqvae.checkpoints.resume_from={out_dir(a) / LATEST}")
    assert rc == 0, err
    u = stage1_cfg(tmp_path / "u", data_dir, n_epochs=4, save_interval=2)
    u["vqvae"]["logging"]["num_visualize_samples"] = 0
    assert cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "u.yaml", u))[0] == 0
    assert_same_checkpoint(out_dir(a) / LATEST, out_dir(u) / LATEST, (tmp_path / "a", tmp_path / "u"))
    assert_one_step_axis(log_dir(a), log_dir(u))
    archived = [d for d in log_dir(a).iterdir() if d.is_dir() and d.name.startswith("previous_")]
    assert len(archived) == 1
    assert {k: v for k, v in tree_hashes(archived[0]).items()} == stale  # the originals, byte for byte


# =================================================================================== 2. crash safety
"""Promise: ``kill -9`` (pre-emption, the OOM killer, a job hitting its time limit) at any moment never
leaves an unloadable ``best_model.pt`` or ``latest_checkpoint.pt``. Checkpoints are written to a
temp file in the same folder, fsynced, then renamed over the old one (and the folder fsynced): a
reader sees the previous good file or the new one, never a torn one. A temp file left by a kill is
not a checkpoint (hidden name, ``.tmp`` suffix), is never loaded, and the next run removes it.
Resuming after any number of kills still ends bit-identical to an uninterrupted run."""

# Each training run below is its own process, killed with SIGKILL. They are forked from one launcher
# process that has imported torch, MONAI and vqldm once, so a run starts in a fraction of a second
# instead of the ~4 s an import takes; a run then calls the CLI's main() exactly as `vqldm` does.
# A run may simulate a slow disk: fsync of a file sleeps first, widening the window between a
# checkpoint's write and its rename, so that a kill can be aimed inside it.
_LAUNCHER = r"""
import json, os, stat, sys, time, traceback
import torch, monai.transforms  # noqa: F401 - the slow imports, done once before forking
from torch.utils.tensorboard import SummaryWriter  # noqa: F401
import vqldm.autoencoder.train  # noqa: F401
from vqldm.cli import main

_fsync = os.fsync
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            delay = float(req["fsync_delay"])

            def fsync(fd):
                if delay and stat.S_ISREG(os.fstat(fd).st_mode):
                    time.sleep(delay)
                return _fsync(fd)

            os.fsync = fsync
            rc = main(req["args"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launcher:
    """Start training runs as forked processes; read their pid and, later, their exit status."""

    def __init__(self, script: Path):
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        self.buf = b""

    def _line(self, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the launcher died"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, args: list, log: Path, fsync_delay: float = 0.0) -> int:
        req = {"args": [str(a) for a in args], "log": str(log), "fsync_delay": fsync_delay}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._line(120)["pid"]

    def exit_status(self, timeout: float = 0.0) -> int | None:
        """The run's exit code (-9 after SIGKILL), or None while it still runs."""
        msg = self._line(timeout)
        return None if msg is None else msg["exit"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _tmp_files(d: Path, target: str | None = None) -> set[str]:
    names = {p.name for p in d.glob(".*.tmp")} if d.is_dir() else set()
    return {n for n in names if target is None or n.startswith(f".{target}.")}


def _checkpoint_state(d: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, epoch, step) of each checkpoint; fails if one does not load."""
    state = {}
    for name in (BEST, LATEST):
        p = d / name
        if p.exists():
            ckpt = load_checkpoint(p, kind="stage1", what="crash test")
            load(p)  # and plain weights_only loading
            if name == LATEST:
                assert ckpt["training_state"]["optimizers"]["vqvae"]["param_groups"], name
            state[name] = (p.stat().st_ino, int(ckpt["epoch"]), int(ckpt["step"]))
    return state


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended first; the exit status check below says so
        pass


def test_kill_9_at_many_moments_never_leaves_a_broken_checkpoint(tmp_path, data_dir):
    n_epochs = 24
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=n_epochs)
    cfg["vqvae"]["logging"]["num_visualize_samples"] = 0
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    out = out_dir(cfg)
    script = tmp_path / "launcher.py"
    script.write_text(_LAUNCHER)
    launcher = Launcher(script)
    rng = random.Random(1234)
    # when to kill: inside a best_model.pt write, inside a latest_checkpoint.pt write, and at random
    # moments after the run has written two checkpoints of its own (up to one epoch later: in the
    # training steps, validation, or the writing of either checkpoint)
    plan = [("inside", BEST), ("inside", LATEST), ("random", None), ("random", None), ("random", None),
            ("random", None), ("inside", LATEST)]
    kills, landed_inside = 0, 0
    try:
        for kind, target in plan:
            before = _checkpoint_state(out)
            before_tmp = _tmp_files(out)
            args = ["--quiet", "train-vqvae", "--config", cfg_path]
            if LATEST in before:
                args += ["--set", f"vqvae.checkpoints.resume_from={out / LATEST}"]
            elif BEST in before:
                args += ["--overwrite"]  # killed before its first latest_checkpoint.pt: start afresh, archiving
            log = tmp_path / f"run_{kills}.log"
            pid = launcher.start(args, log, fsync_delay=0.3 if kind == "inside" else 0.0)
            deadline, aimed, status = time.monotonic() + 120, None, None
            inode, renames = before.get(LATEST, (None,))[0], []  # times this run replaced latest
            while time.monotonic() < deadline:
                if kind == "inside":
                    new = _tmp_files(out, target) - before_tmp
                    if new:
                        inode = (out / target).stat().st_ino if (out / target).exists() else None
                        _kill(pid)
                        aimed = (new, inode)
                        break
                else:
                    try:
                        now = (out / LATEST).stat().st_ino
                    except FileNotFoundError:
                        now = None
                    if now is not None and now != inode:
                        inode = now
                        renames.append(time.monotonic())
                    if len(renames) == 2:  # then a random moment within about one more epoch
                        time.sleep(rng.uniform(0.0, 1.0) * (renames[1] - renames[0]))
                        _kill(pid)
                        break
                status = launcher.exit_status(timeout=0.0005 if kind == "inside" else 0.002)
                if status is not None:
                    break
            if status is None:
                status = launcher.exit_status(timeout=60)
            assert status == -signal.SIGKILL, f"run {kills} ended with {status} before the kill:\n" + \
                log.read_text()[-3000:]
            kills += 1

            after = _checkpoint_state(out)  # whatever exists loads, with weights_only=True
            for name, (_, epoch, step) in before.items():
                if name == BEST and LATEST not in before:
                    continue  # archived by --overwrite
                assert name in after, f"kill {kills}: the previous {name} is gone"
                assert after[name][1:] >= (epoch, step), f"kill {kills}: {name} went back in time"
            if kind == "inside":
                new, inode = aimed
                if new & _tmp_files(out, target):  # the kill landed between write and rename
                    landed_inside += 1
                    if inode is None:
                        assert target not in after, "an unfinished write became a checkpoint"
                    else:
                        assert after[target][0] == inode, f"{target} was replaced by an unfinished write"
    finally:
        launcher.close()
    assert kills >= 5
    assert landed_inside >= 2, "the kills aimed inside a checkpoint write did not land there"
    leftovers = _tmp_files(out)
    assert leftovers and not any(n.endswith(".pt") for n in leftovers)  # never named like a checkpoint

    # resume to the end: the temp files go, and the result equals an uninterrupted run
    rc = run_cli("--quiet", "train-vqvae", "--config", cfg_path,
                 "--set", f"vqvae.checkpoints.resume_from={out / LATEST}")
    assert rc == 0
    assert not _tmp_files(out)
    assert sorted(p.name for p in out.glob("*.pt")) == [BEST, LATEST]
    u = stage1_cfg(tmp_path / "u", data_dir, n_epochs=n_epochs)
    u["vqvae"]["logging"]["num_visualize_samples"] = 0
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(tmp_path / "u.yaml", u)) == 0
    assert_same_checkpoint(out / LATEST, out_dir(u) / LATEST, (tmp_path, tmp_path / "u"))
    assert_same_checkpoint(out / BEST, out_dir(u) / BEST, (tmp_path, tmp_path / "u"))
    assert_one_step_axis(log_dir(cfg), log_dir(u))


def test_checkpoints_get_the_usual_file_permissions(tmp_path, data_dir, trained_stage1):
    """The temp-file-and-rename dance must not leave checkpoints (or written volumes) readable by their
    owner only: colleagues sharing a project folder read them like any other file (the umask decides)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    usual = stat.S_IMODE(probe.stat().st_mode)
    volume = min((data_dir / "train").glob("*.nii.gz"))  # written by vqldm synth
    for p in (trained_stage1["best"], trained_stage1["latest"], trained_stage1["out_dir"] / "config.yaml", volume):
        assert stat.S_IMODE(p.stat().st_mode) == usual, (p, oct(stat.S_IMODE(p.stat().st_mode)), oct(usual))


# =================================================================================== 3. non-finite loss
"""Promise: a NaN or infinite training loss stops the run at once with one line that names the step
(as TensorBoard numbers it) and the last good checkpoint to resume from; exit code 2, no traceback.
With ``<stage>.training.skip_nonfinite: true`` such batches are skipped instead - no optimizer step,
no EMA update, no change to the codebook - each is logged, and the count is logged at the end and
stored in the checkpoint."""


def test_diverging_run_stops_naming_step_and_checkpoint(tmp_path, data_dir, capsys):
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=3)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg),
                     "--set", "vqvae.learning_rate=1e30")
    line = assert_clean_error(rc, err, "non-finite loss", "step 2", "vqvae", "skip_nonfinite")
    assert "none written yet" in line


def test_nan_stop_names_the_last_good_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=3)
    poison = CallCounter(monkeypatch, at=4)  # epoch 2, after epoch 1's checkpoint
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    line = assert_clean_error(rc, err, "non-finite loss", "step 4", "epoch 2", str(out_dir(cfg) / LATEST))
    assert f"resume_from={out_dir(cfg) / LATEST}" in line  # how to go on
    assert load(out_dir(cfg) / LATEST)["epoch"] == 1  # the checkpoint it names is intact
    # resumed as the message says, the same batch fails again; --debug shows the traceback
    poison.at = {poison.calls + 2}
    with pytest.raises(VqldmError, match="non-finite loss at step 4"):
        run_cli("--quiet", "--debug", "train-vqvae", "--config", tmp_path / "c.yaml",
                "--set", f"vqvae.checkpoints.resume_from={out_dir(cfg) / LATEST}")


@pytest.mark.parametrize("what", ["loss", "input"])
def test_skip_nonfinite_skips_counts_and_keeps_the_model_clean(tmp_path, data_dir, capsys, caplog, monkeypatch,
                                                               what):
    """A poisoned batch (a NaN loss, or a NaN input whose forward pass would feed the codebook's
    EMA update) is skipped without leaving any trace in the weights, buffers or EMA."""
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=2, skip_nonfinite=True, ema=True, ema_decay=0.9)
    cfg["vqvae"]["logging"]["num_visualize_samples"] = 0
    poison = CallCounter(monkeypatch, at={2, 4}, what=what)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert rc == 0, err
    assert poison.calls == 4  # 2 epochs x 2 batches, of which 2 skipped
    log = caplog.text
    assert "non-finite loss at step 2 (epoch 1): batch skipped (1 so far)" in log, log
    assert "non-finite loss at step 3 (epoch 2): batch skipped (2 so far)" in log, log
    assert "2 batch(es) with a non-finite loss were skipped" in log, log
    latest = load(out_dir(cfg) / LATEST)
    assert latest["step"] == 2 and latest["training_state"]["skipped_batches"] == 2
    for name, t in [*latest["state_dict"].items(), *latest["training_state"]["model"].items(),
                    *latest["training_state"]["ema"].items()]:
        if torch.is_tensor(t) and t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} holds NaN after a skipped batch"
    assert math.isfinite(latest["val_loss"])


# =================================================================================== 4. bad input
"""Promise: bad input never ends in a traceback. Each problem gets one line ``vqldm: error: ...``
that names the file, folder or config key at fault, and exit code 2; ``--debug`` shows the
traceback instead. Constant or all-zero volumes are not errors: they normalise to zeros and train
without NaN (with a warning naming them)."""


def _valid_nifti(data_dir: Path) -> bytes:
    return min((data_dir / "train").glob("*.nii.gz")).read_bytes()


def _ramp(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _bad_file(kind: str, folder: Path, data_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    good = _valid_nifti(data_dir)
    if kind == "truncated_nifti_gz":
        p = folder / "cut.nii.gz"
        p.write_bytes(good[: len(good) // 2])
    elif kind == "truncated_nifti":
        raw = nib.Nifti1Image(_ramp((32, 32, 32)), np.eye(4)).to_bytes()
        p = folder / "cut.nii"
        p.write_bytes(raw[: len(raw) // 3])
    elif kind == "garbage_nifti":
        p = folder / "noise.nii.gz"
        p.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "corrupt_tiff":
        p = folder / "noise.tif"
        p.write_bytes(b"II*\x00" + np.random.default_rng(1).bytes(4000))
    elif kind == "truncated_tiff":
        import io

        buf = io.BytesIO()
        tifffile.imwrite(buf, _ramp((32, 32, 32)))
        p = folder / "cut.tif"
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "nan_voxels":
        arr = _ramp((32, 32, 32))
        arr[5, 6, 7] = np.nan
        p = folder / "holes.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    elif kind == "inf_voxels":
        arr = _ramp((32, 32, 32))
        arr[0, 0, 0] = np.inf
        p = folder / "inf.tif"
        tifffile.imwrite(p, arr)
    elif kind == "2d_nifti":
        p = folder / "flat.nii.gz"
        nib.save(nib.Nifti1Image(_ramp((32, 32)), np.eye(4)), str(p))
    elif kind == "2d_tiff":
        p = folder / "flat.tif"
        tifffile.imwrite(p, _ramp((32, 32)))
    elif kind == "multichannel_nifti":
        p = folder / "rgb.nii.gz"
        nib.save(nib.Nifti1Image(_ramp((32, 32, 32, 3)), np.eye(4)), str(p))
    elif kind == "multichannel_tiff":
        p = folder / "twochannel.tif"
        tifffile.imwrite(p, _ramp((8, 2, 32, 32)), imagej=True, metadata={"axes": "ZCYX"})
    else:
        raise AssertionError(kind)
    return p


# what is wrong -> what the message says about it
BAD_FILES = {
    "truncated_nifti_gz": "cannot read volume", "truncated_nifti": "cannot read volume",
    "garbage_nifti": "cannot read volume", "corrupt_tiff": "cannot read volume", "truncated_tiff": "cannot read volume",
    "nan_voxels": "NaN or infinite voxels", "inf_voxels": "NaN or infinite voxels",
    "2d_nifti": "expected a 3D volume", "2d_tiff": "expected a 3D volume",
    "multichannel_nifti": "single-channel 3D volumes", "multichannel_tiff": "single-channel 3D volumes",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_volume_named_in_one_line(tmp_path, data_dir, capsys, kind):
    folder = copy_tree(data_dir / "train", tmp_path / "train")
    bad = _bad_file(kind, folder, data_dir)
    cfg = stage1_cfg(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(folder)
    path = write_config(tmp_path / "c.yaml", cfg)
    for command in ("train-vqvae", "check"):
        rc, _, err = cli(capsys, "--quiet", command, "--config", path)
        assert_clean_error(rc, err, bad, BAD_FILES[kind])
    assert not out_dir(cfg).exists() or not any(out_dir(cfg).glob("*.pt"))
    with pytest.raises(VqldmError, match=bad.name):  # --debug: the exception (and its traceback) surfaces
        run_cli("--quiet", "--debug", "train-vqvae", "--config", path)


def test_debug_shows_the_traceback_in_a_real_process(tmp_path, data_dir):
    folder = copy_tree(data_dir / "train", tmp_path / "train")
    bad = _bad_file("truncated_nifti_gz", folder, data_dir)
    cfg = stage1_cfg(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(folder)
    path = write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "vqldm", "--debug", "check", "--config", str(path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and bad.name in r.stderr
    # the underlying reader error is part of the traceback, not hidden by the friendly message
    assert "The above exception was the direct cause" in r.stderr or "During handling" in r.stderr, r.stderr


@pytest.mark.parametrize("case", ["empty_folder", "no_volume_files", "missing_folder"])
def test_folder_without_volumes_named(tmp_path, data_dir, capsys, case):
    folder = tmp_path / "train"
    if case != "missing_folder":
        folder.mkdir()
    if case == "no_volume_files":
        (folder / "notes.txt").write_text("not a volume")
        (folder / "image.png").write_bytes(b"\x89PNG")
    cfg = stage1_cfg(tmp_path, data_dir)
    cfg["data"]["train_data_dir"] = str(folder)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, "data.train_data_dir", folder)


def test_constant_and_all_zero_volumes_train_without_nan(tmp_path, data_dir, trained_stage1, capsys, caplog):
    from vqldm.data.io import read_volume, write_volume

    folder = tmp_path / "flat"
    write_volume(folder / "zeros.nii.gz", np.zeros((32, 32, 32), np.float32))
    write_volume(folder / "sevens.tif", np.full((32, 32, 32), 7.0, np.float32))
    mixed = copy_tree(data_dir / "train", tmp_path / "mixed")
    g = read_volume(mixed / "mt_0000.nii.gz").grid  # the same voxel size as the other files (else refused)
    write_volume(mixed / "zeros.nii.gz", np.zeros((32, 32, 32), np.float32), g.spacing, g.unit)
    write_volume(mixed / "sevens.nii.gz", np.full((32, 32, 32), 7.0, np.float32), g.spacing, g.unit)
    # stage 1 on nothing but constant volumes
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=2)
    cfg["data"].update({"train_data_dir": str(folder), "val_data_dir": str(folder)})
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert rc == 0, err
    warned = caplog.text
    assert "constant volume" in warned and "zeros.nii.gz" in warned and "sevens.tif" in warned, warned
    ckpt = load(out_dir(cfg) / LATEST)
    assert math.isfinite(ckpt["val_loss"])
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    # stage 2 on data where some volumes are constant
    c2 = stage2_cfg(tmp_path / "s2", data_dir, trained_stage1["best"], n_epochs=1)
    c2["data"]["train_data_dir"] = str(mixed)
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", write_config(tmp_path / "c2.yaml", c2))
    assert rc == 0, err
    ckpt = load(out_dir(c2, "diffusion") / LATEST)
    assert math.isfinite(ckpt["val_loss"]) and math.isfinite(ckpt["scale_factor"])


@pytest.fixture(scope="module")
def stage1_dim8(tmp_path_factory, data_dir) -> dict:
    """A stage-1 run with embedding_dim 8: a checkpoint from a different config."""
    root = tmp_path_factory.mktemp("dim8")
    cfg = stage1_cfg(root, data_dir, fast_dev_run=True, fast_dev_run_batches=1)
    cfg["vqvae"]["embedding_dim"] = 8
    cfg["diffusion"].update({"in_channels": 8, "out_channels": 8})  # a self-consistent config
    cfg["vqvae"]["logging"]["num_visualize_samples"] = 0
    assert run_cli("--quiet", "train-vqvae", "--config", write_config(root / "c.yaml", cfg)) == 0
    return {"best": out_dir(cfg) / BEST, "latest": out_dir(cfg) / LATEST}


def test_stage1_checkpoint_from_another_config(tmp_path, data_dir, trained_stage1, trained_stage2, stage1_dim8,
                                               capsys):
    # train-diffusion: embedding_dim 8 vs diffusion.in_channels 4
    c2 = stage2_cfg(tmp_path, data_dir, stage1_dim8["best"])
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", write_config(tmp_path / "c2.yaml", c2))
    assert_clean_error(rc, err, "diffusion.in_channels", "embedding_dim", stage1_dim8["best"])
    # sample: a stage-1 decoder that does not fit the trained UNet
    rc, _, err = cli(capsys, "--quiet", "sample", "--config", trained_stage2["config_path"], "-n", "1",
                     "--out", tmp_path / "samples", "--vqvae-checkpoint", stage1_dim8["best"])
    assert_clean_error(rc, err, "--vqvae-checkpoint", stage1_dim8["best"], "embedding_dim")
    # resume: a training state for another network
    c1 = stage1_cfg(tmp_path / "r", data_dir)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c1.yaml", c1),
                     "--set", f"vqvae.checkpoints.resume_from={stage1_dim8['latest']}")
    assert_clean_error(rc, err, "vqvae.checkpoints.resume_from", stage1_dim8["latest"], "does not match",
                       "embedding_dim 8 in the checkpoint vs 4 here")
    # resume stage 2 on another stage-1 model (same network, other weights): other latents, refused
    c2r = stage2_cfg(tmp_path / "r2", data_dir, trained_stage1["latest"])
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", write_config(tmp_path / "c2r.yaml", c2r),
                     "--set", f"diffusion.checkpoints.resume_from={trained_stage2['latest']}")
    assert_clean_error(rc, err, "diffusion.checkpoints.resume_from", trained_stage2["latest"],
                       "diffusion.checkpoints.vqvae_path", trained_stage1["latest"], "same stage-1 checkpoint")
    # a checkpoint of the other stage
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", tmp_path / "c1.yaml",
                     "--set", f"vqvae.checkpoints.resume_from={trained_stage2['latest']}")
    assert_clean_error(rc, err, "vqvae.checkpoints.resume_from", trained_stage2["latest"], "stage-2")


def _not_a_checkpoint(kind: str, folder: Path, real: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{kind}.pt"
    if kind == "random_bytes":
        p.write_bytes(np.random.default_rng(7).bytes(5000))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("model weights will go here\n")
    elif kind == "truncated":
        data = real.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "plain_dict":  # a valid torch file, but no vqldm header
        torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, p)
    else:
        raise AssertionError(kind)
    return p


NOT_CHECKPOINTS = ["random_bytes", "empty", "text", "truncated", "plain_dict"]
PLACES = ["vqvae_path", "diffusion_checkpoint", "vqvae_checkpoint", "resume_from", "evaluate"]


def _use_checkpoint(place: str, path: Path, tmp_path: Path, data_dir: Path, trained_stage1, trained_stage2):
    """CLI arguments that hand ``path`` to vqldm at ``place``; returns (args, the name the message must use)."""
    if place == "vqvae_path":
        cfg = write_config(tmp_path / "c2.yaml", stage2_cfg(tmp_path, data_dir, path))
        return ["train-diffusion", "--config", cfg], "diffusion.checkpoints.vqvae_path"
    if place == "diffusion_checkpoint":
        return ["sample", "--config", trained_stage2["config_path"], "-n", "1", "--out", tmp_path / "samples",
                "--diffusion-checkpoint", path], "--diffusion-checkpoint"
    if place == "vqvae_checkpoint":
        return ["sample", "--config", trained_stage2["config_path"], "-n", "1", "--out", tmp_path / "samples",
                "--vqvae-checkpoint", path], "--vqvae-checkpoint"
    if place == "resume_from":
        cfg = write_config(tmp_path / "c1.yaml", stage1_cfg(tmp_path, data_dir))
        return ["train-vqvae", "--config", cfg, "--set", f"vqvae.checkpoints.resume_from={path}"], \
            "vqvae.checkpoints.resume_from"
    if place == "evaluate":
        return ["evaluate", "--config", trained_stage1["config_path"], "--out", tmp_path / "eval",
                "--vqvae-checkpoint", path], "--vqvae-checkpoint"
    raise AssertionError(place)


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_not_a_vqldm_checkpoint_named(tmp_path, data_dir, trained_stage1, trained_stage2, capsys, kind):
    bad = _not_a_checkpoint(kind, tmp_path / "bad", trained_stage1["best"])
    for place in PLACES:
        args, key = _use_checkpoint(place, bad, tmp_path, data_dir, trained_stage1, trained_stage2)
        rc, _, err = cli(capsys, "--quiet", *args)
        line = assert_clean_error(rc, err, key, bad)
        assert "refused for safety" not in line  # a broken file is not called malicious
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").iterdir())


# =================================================================================== 5. safe loading
"""Promise: every checkpoint is loaded with ``torch.load(weights_only=True)``. A file that carries
a pickled object with code in it (the classic ``__reduce__`` trick) is refused with one line naming
the file and what it tried to import - and the code never runs, wherever the file is given:
``diffusion.checkpoints.vqvae_path``, ``--diffusion-checkpoint``, ``--vqvae-checkpoint``,
``resume_from`` of either stage, ``evaluate --vqvae-checkpoint``."""


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsPython:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious(kind: str, folder: Path, marker: Path, real: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"evil_{kind}.pt"
    if kind == "shell":
        torch.save({"payload": _RunsShell(marker)}, p)
    elif kind == "python":
        torch.save([_RunsPython(marker)], p)
    elif kind == "inside_real_checkpoint":  # a genuine checkpoint with a payload slipped in
        ckpt = load(real)
        ckpt["network"] = {**ckpt["network"], "hook": _RunsShell(marker)}
        torch.save(ckpt, p)
    return p


@pytest.mark.parametrize("kind", ["shell", "python", "inside_real_checkpoint"])
def test_malicious_checkpoint_refused_and_never_runs(tmp_path, data_dir, trained_stage1, trained_stage2, capsys,
                                                     kind):
    marker = tmp_path / "MARKER"
    evil = _malicious(kind, tmp_path / "evil", marker, trained_stage1["latest"])
    places = PLACES + ["diffusion_resume_from"]
    for place in places:
        if place == "diffusion_resume_from":
            c2 = stage2_cfg(tmp_path, data_dir, trained_stage1["best"])
            args = ["train-diffusion", "--config", write_config(tmp_path / "c2r.yaml", c2),
                    "--set", f"diffusion.checkpoints.resume_from={evil}"]
            key = "diffusion.checkpoints.resume_from"
        else:
            args, key = _use_checkpoint(place, evil, tmp_path, data_dir, trained_stage1, trained_stage2)
        rc, _, err = cli(capsys, "--quiet", *args)
        line = assert_clean_error(rc, err, key, evil, "refused for safety")
        assert ("system" in line) if kind != "python" else ("exec" in line)  # names what it tried to import
        assert not marker.exists(), f"the payload ran when given as {place}"
    with pytest.raises(VqldmError, match="refused for safety"):
        run_cli("--debug", "sample", "--config", trained_stage2["config_path"], "-n", "1", "--out",
                tmp_path / "s", "--diffusion-checkpoint", evil)
    assert not marker.exists()
    # the test is real: unsafe loading would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_every_load_in_the_source_is_weights_only():
    """Scan src/vqldm: each ``torch.load(...)`` passes ``weights_only=True``; no other unpickler
    (pickle/dill/joblib loads, ``np.load(allow_pickle=True)``, unsafe ``yaml.load``) is used."""
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
                for a in node.names:
                    if a.name in ("load", "loads", "Unpickler"):
                        problems.append(f"{f}:{node.lineno}: from {node.module} import {a.name}")
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{f.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)[:120]}"
            if fn.endswith("torch.load") or fn == "torch.load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(where)
            elif fn in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                        "joblib.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "marshal.loads"):
                problems.append(where)
            elif fn in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(where)
            elif fn == "yaml.load":
                loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
                if "Safe" not in loader:
                    problems.append(where)
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)
    # and the scan does find the one real call
    assert "weights_only=True" in (SRC / "checkpoint.py").read_text()


# =================================================================================== 6. no data lost
"""Promise: vqldm never deletes or overwrites earlier results on its own. Training into an
``output_dir`` that holds ``best_model.pt`` or ``latest_checkpoint.pt`` refuses with a message unless
it resumes that very run (``resume_from`` = its ``latest_checkpoint.pt``) or ``--overwrite`` is
given; ``--overwrite`` moves the old checkpoints, config and TensorBoard events to ``previous_*/``
byte for byte, and leaves every other file alone. ``vqldm sample`` into a folder holding samples and
``vqldm synth`` into a folder holding volumes refuse. (Stage 1's refuse-then-overwrite is also in
test_stage1.py::test_fresh_run_refused_then_overwrite_archives.)"""


def test_stage2_refuses_then_overwrite_archives_byte_identical(tmp_path, data_dir, trained_stage1,
                                                               trained_stage2, capsys):
    out = copy_tree(trained_stage2["out_dir"], tmp_path / "diffusion_checkpoints")
    logs = copy_tree(trained_stage2["log_dir"], tmp_path / "diffusion_logs")
    (out / "my_notes.txt").write_text("lr sweep 3: looked best")
    (out / "epoch_17_keep.pt").write_bytes(b"a file the user put here")
    before_out, before_logs = tree_hashes(out), tree_hashes(logs)
    cfg = stage2_cfg(tmp_path, data_dir, trained_stage1["best"])
    path = write_config(tmp_path / "c.yaml", cfg)
    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", path)
    assert_clean_error(rc, err, "diffusion.checkpoints.output_dir", out, "resume_from", "--overwrite")
    assert tree_hashes(out) == before_out and tree_hashes(logs) == before_logs

    rc, _, err = cli(capsys, "--quiet", "train-diffusion", "--config", path, "--overwrite")
    assert rc == 0, err
    (prev,) = [d for d in out.iterdir() if d.is_dir() and d.name.startswith("previous_")]
    moved = {BEST, LATEST, "config.yaml"}
    assert tree_hashes(prev) == {k: v for k, v in before_out.items() if k in moved}
    now = tree_hashes(out)
    for k, v in before_out.items():
        if k not in moved:
            assert now[k] == v, f"{k} changed"
    (lprev,) = [d for d in logs.iterdir() if d.is_dir() and d.name.startswith("previous_")]
    assert tree_hashes(lprev) == {k: v for k, v in before_logs.items() if k.startswith("events.out.tfevents")}
    assert load(out / LATEST)["epoch"] == 1

    # a second --overwrite archives again, into a new folder; the first archive is untouched
    first = tree_hashes(prev)
    assert cli(capsys, "--quiet", "train-diffusion", "--config", path, "--overwrite")[0] == 0
    assert len([d for d in out.iterdir() if d.name.startswith("previous_")]) == 2
    assert tree_hashes(prev) == first


def test_only_best_model_left_still_refuses(tmp_path, data_dir, trained_stage1, capsys):
    """A run killed in its first epoch after writing best_model.pt but before latest_checkpoint.pt."""
    out = tmp_path / "vqvae_checkpoints"
    out.mkdir()
    (out / BEST).write_bytes(trained_stage1["best"].read_bytes())
    cfg = stage1_cfg(tmp_path, data_dir)
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, "vqvae.checkpoints.output_dir", BEST, "--overwrite")
    assert sha256(out / BEST) == sha256(trained_stage1["best"])


def test_resume_from_another_run_does_not_clobber(tmp_path, data_dir, trained_stage1, capsys):
    """``resume_from`` continues *that* run; pointing it at another run's checkpoint while output_dir
    holds this run's checkpoints would silently replace them - refused unless --overwrite."""
    cfg = stage1_cfg(tmp_path, data_dir, n_epochs=3)
    path = write_config(tmp_path / "c.yaml", cfg)
    assert cli(capsys, "--quiet", "train-vqvae", "--config", path, "--set", "vqvae.training.n_epochs=1")[0] == 0
    before = tree_hashes(out_dir(cfg))
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", path,
                     "--set", f"vqvae.checkpoints.resume_from={trained_stage1['latest']}")
    assert_clean_error(rc, err, "vqvae.checkpoints.output_dir", out_dir(cfg), "--overwrite")
    assert tree_hashes(out_dir(cfg)) == before
    # with --overwrite: this run's files are archived, the other run continues here
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", path, "--overwrite",
                     "--set", f"vqvae.checkpoints.resume_from={trained_stage1['latest']}")
    assert rc == 0, err
    (prev,) = [d for d in out_dir(cfg).iterdir() if d.is_dir() and d.name.startswith("previous_")]
    assert tree_hashes(prev) == before
    assert load(out_dir(cfg) / LATEST)["epoch"] == 3
    # resuming in place (the usual case) needs no --overwrite and archives nothing
    rc, _, err = cli(capsys, "--quiet", "train-vqvae", "--config", path, "--set", "vqvae.training.n_epochs=4",
                     "--set", f"vqvae.checkpoints.resume_from={out_dir(cfg) / LATEST}")
    assert rc == 0, err
    assert len([d for d in out_dir(cfg).iterdir() if d.is_dir()]) == 1 and tree_hashes(prev) == before


def test_sample_refuses_a_folder_holding_samples(tmp_path, trained_stage2, capsys):
    out = tmp_path / "samples"
    args = ["--quiet", "sample", "--config", trained_stage2["config_path"], "-n", "1", "--steps", "2", "--out", out]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    before = tree_hashes(out)
    rc, _, err = cli(capsys, *args)
    assert_clean_error(rc, err, "--out", out, "--overwrite")
    assert tree_hashes(out) == before
    rc, _, err = cli(capsys, *args, "--format", "tiff")  # another format is no loophole
    assert_clean_error(rc, err, "--out", out)
    assert tree_hashes(out) == before


def test_synth_refuses_a_populated_folder(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["--quiet", "synth", "--out", out, "--num-train", "1", "--num-val", "1", "--shape", "16", "16", "16"]
    assert cli(capsys, *args)[0] == 0
    before = tree_hashes(out)
    rc, _, err = cli(capsys, *args, "--seed", "5")
    assert_clean_error(rc, err, out)
    assert tree_hashes(out) == before


def test_checkpoints_keep_their_on_disk_kinds_so_earlier_ones_load(tmp_path):
    """Tasks are named by their config section; their checkpoints keep the kinds round 1 wrote."""
    from vqldm.checkpoint import header, save_atomic

    assert header("vqvae")["kind"] == "stage1" and header("diffusion")["kind"] == "stage2"
    p = save_atomic({**header("diffusion"), "state_dict": {}}, tmp_path / "d.pt")
    round1 = save_atomic({"vqldm_checkpoint": 1, "kind": "stage2", "state_dict": {}}, tmp_path / "r1.pt")
    assert load_checkpoint(round1, kind="diffusion")["kind"] == "stage2"
    with pytest.raises(VqldmError, match=r"d\.pt is a stage-2 \(diffusion\) checkpoint, expected a stage-1 \(VQ-VAE\) one"):
        load_checkpoint(p, kind="vqvae", what="--vqvae-checkpoint")
