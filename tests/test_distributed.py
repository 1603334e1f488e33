"""Multi-process training and sampling under torchrun (issue 8): 2 CPU processes over gloo.

Every launch is a real ``torchrun --standalone --nproc_per_node 2`` in a subprocess (one thread per
process). The launches are shared through module fixtures, so the whole file costs a handful of
them:

* ``ddp_run``: ``vqldm train-vqvae`` (the console script) and ``python -m vqldm train-diffusion``;
* ``rank_dumps``: a script that trains both stages through the engine (forced dead-code restarts,
  a discriminator, EMA) and saves every rank's networks, codebook and optimizer state;
  the dump script also samples with DDPM;
* ``vqldm sample`` with DDIM;
* ``resumed``: one script that resumes at the same and at a different number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed

from vqldm.checkpoint import load_checkpoint
from vqldm.engine.setup import ShardSampler
from vqldm.commands.sample import shard_indices
from vqldm.synth import write_dataset

from conftest import run_cli, tiny_config_dict, with_updates, write_config

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

WORLD = 2
TIMEOUT = 240


# ----------------------------------------------------------------------------------- launching
def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores; torchrun would set 1 too, with a warning
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never inherit an outer launch
    return env


def torchrun(*args, cwd=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (``--standalone``: a free local port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           *[str(a) for a in args]]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=TIMEOUT, check=False)
    if p.returncode != 0:
        print("STDOUT:\n", p.stdout[-6000:], "\nSTDERR:\n", p.stderr[-6000:])
    return p


def vqldm_script() -> Path:
    """The installed ``vqldm`` console script (what ``$(which vqldm)`` names outside pyenv shims)."""
    p = Path(sysconfig.get_path("scripts")) / "vqldm"
    if not p.is_file():
        pytest.skip(f"no vqldm console script at {p}")
    return p


def event_files(log_dir) -> list[Path]:
    return sorted(Path(log_dir).glob("events.out.tfevents.*"))


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def state_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bit for bit) between two state dicts."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    """4 train and 3 validation volumes of 32^3: 3 validation tiles do not split evenly over 2 ranks."""
    out = tmp_path_factory.mktemp("synth3") / "data"
    write_dataset(out, 4, 3, (32, 32, 32), seed=5, progress=False)
    return out


def ddp_config(root, data) -> dict:
    cfg = tiny_config_dict(root, data)
    cfg["vqvae"]["training"]["n_epochs"] = 2
    cfg["diffusion"]["scale_factor_batches"] = 64
    cfg["data"]["max_val_patches"] = 3
    return cfg


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data3) -> dict:
    """Both stages trained by the CLI under torchrun, stage 1 via the console script, stage 2 via -m."""
    root = tmp_path_factory.mktemp("ddp_run")
    cfg = ddp_config(root, data3)
    cfg_path = write_config(root / "config.yaml", cfg)
    p1 = torchrun(vqldm_script(), "train-vqvae", "--config", cfg_path)
    p2 = torchrun("-m", "vqldm", "train-diffusion", "--config", cfg_path) if p1.returncode == 0 else None
    return {"root": root, "cfg": cfg, "cfg_path": cfg_path, "p1": p1, "p2": p2}


DUMP_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    from vqldm import distributed as dist
    from vqldm.config import load_config
    from vqldm.data import pipeline
    from vqldm.commands.sample import SampleOptions, sample_to_files
    from vqldm.autoencoder.train import build_vqvae_trainer
    from vqldm.priors.diffusion.train import build_diffusion_trainer

    cfg = load_config(sys.argv[1], [])
    out = Path(sys.argv[2])

    def opt_state(tr):
        return {f"{s.name}.{i}.{k}": v.clone() for s in tr.specs for i, st in s.optimizer.state_dict()["state"].items()
                for k, v in st.items() if torch.is_tensor(v)}

    tr = build_vqvae_trainer(cfg, progress=False)
    res = tr.fit()
    q = tr.task.quantizer
    sharded = tr.validate()  # this rank's ShardSampler shard, reduced over ranks
    tr.val_loader = pipeline.make_loader(tr.val_loader.dataset, 1, False, 0, False)
    whole = tr.validate()  # every rank reads the whole set: the reduced mean is the one-process mean
    torch.save({
        "model": {k: v.clone() for k, v in tr.task.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in tr.ema.model.state_dict().items()},
        "disc": {k: v.clone() for k, v in tr.task.disc.state_dict().items()},
        "codebook": {"embedding": q.embedding.weight.detach().clone(), "ema_w": q.ema_w.clone(),
                     "ema_cluster_size": q.ema_cluster_size.clone()},
        "optim": opt_state(tr),
        "tracker": tr.task.tracker.state_dict(),
        "restarted_total": tr.task.restarted_total, "steps": res.steps, "epochs": res.epochs,
        "val_sharded": sharded, "val_whole": whole, "n_val": len(tr.val_loader.dataset),
        "save_best": tr.save_best(1.0), "save_latest": tr.save_latest(1.0),
        "best_path": res.best_path, "latest_path": res.latest_path,
    }, out / f"stage1_rank{dist.rank()}.pt")
    dist.barrier()  # rank 0's best_model.pt is on disk before any rank reads it
    tr2 = build_diffusion_trainer(cfg, progress=False)
    res2 = tr2.fit()
    torch.save({
        "model": {k: v.clone() for k, v in tr2.task.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in tr2.ema.model.state_dict().items()},
        "optim": opt_state(tr2),
        "scale_factor": tr2.task.norm.to_meta()["scale_factor"], "steps": res2.steps,
        "save_best": tr2.save_best(1.0), "save_latest": tr2.save_latest(1.0),
    }, out / f"stage2_rank{dist.rank()}.pt")
    sample_to_files(cfg, SampleOptions(num_samples=5, batch_size=2, steps=3, seed=7, scheduler="ddpm",
                                       out_dir=out / "samples_ddpm", progress=False))
    dist.shutdown()
    dist.exit_process(0)  # as the vqldm command ends a torchrun rank
''')


@pytest.fixture(scope="module")
def rank_dumps(tmp_path_factory, data3) -> dict:
    """Both stages trained through the engine in 2 processes; every rank saves what it holds."""
    root = tmp_path_factory.mktemp("rank_dumps")
    cfg = ddp_config(root, data3)
    cfg = with_updates(cfg, data__batch_size=1, data__patches_per_volume=2,  # 4 steps per epoch
                       vqvae__codebook__restart_window_steps=1,  # a restart check after every step
                       vqvae__training__ema=True, vqvae__training__ema_decay=0.5,
                       vqvae__training__adversarial={"enabled": True, "warmup_epochs": 0, "num_channels": 8,
                                                     "num_layers": 2},
                       diffusion__training__n_epochs=1)
    cfg_path = write_config(root / "config.yaml", cfg)
    script = root / "dump.py"
    script.write_text(DUMP_SCRIPT)
    p = torchrun(script, cfg_path, root)
    assert p.returncode == 0, "the rank-dump run failed"
    dumps = {name: [torch.load(root / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
             for name in ("stage1", "stage2")}
    return {"root": root, "cfg": cfg, "cfg_path": cfg_path, "p": p, **dumps}


# ----------------------------------------------------------------------------------- unit: sharding
@pytest.mark.parametrize("n,world", [(3, 2), (2, 2), (7, 3), (1, 1), (5, 8)])
def test_validation_shards_cover_every_tile_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


@pytest.mark.parametrize("n,bs,world", [(5, 2, 2), (8, 8, 2), (9, 2, 3), (1, 4, 2), (16, 3, 4)])
def test_sample_shards_are_whole_single_process_batches(n, bs, world):
    shards = [shard_indices(n, bs, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    single_batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
    for r, s in enumerate(shards):
        mine = [s[i:i + bs] for i in range(0, len(s), bs)]  # how generate() batches a rank's indices
        assert mine == single_batches[r::world]


# ----------------------------------------------------------------------------------- CLI runs
def test_torchrun_trains_both_stages_with_one_set_of_files(ddp_run):
    cfg, p1, p2 = ddp_run["cfg"], ddp_run["p1"], ddp_run["p2"]
    assert p1.returncode == 0, "torchrun vqldm train-vqvae failed"
    assert p2 is not None and p2.returncode == 0, "torchrun -m vqldm train-diffusion failed"
    for stage, p in (("vqvae", p1), ("diffusion", p2)):
        out = Path(cfg[stage]["checkpoints"]["output_dir"])
        assert (out / "best_model.pt").is_file() and (out / "latest_checkpoint.pt").is_file()
        assert len(event_files(cfg[stage]["logging"]["log_dir"])) == 1
        assert not list(out.glob(".*.tmp"))
        # rank 0 alone prints the summary and the info lines; ranks > 0 log warnings only
        assert p.stdout.count("finished:") == 1
        assert p.stderr.count("distributed: rank 0 of 2") == 1 and "distributed: rank 1 of 2" not in p.stderr
        assert "Traceback" not in p.stderr and "destroy_process_group" not in p.stderr
    # effective batch size and learning rate are logged
    assert "batch 2 per rank x 2 rank(s) = effective batch 4, lr 0.001 (not scaled" in p1.stderr
    assert "batch 2 per rank x 2 rank(s) = effective batch 4, lr 0.001 (not scaled" in p2.stderr
    # rank-0-only pictures, written every epoch without deadlocking the other rank
    pngs = sorted(p.name for p in (Path(cfg["vqvae"]["logging"]["log_dir"]) / "images").glob("*.png"))
    assert pngs == ["recon_epoch0001.png", "recon_epoch0002.png"]
    ck1 = load_checkpoint(Path(cfg["vqvae"]["checkpoints"]["output_dir"]) / "latest_checkpoint.pt")
    assert ck1["epoch"] == 2
    ck2 = load_checkpoint(Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt")
    assert ck2["vqvae_sha256"] == sha(Path(cfg["vqvae"]["checkpoints"]["output_dir"]) / "best_model.pt")


def test_scale_factor_equals_single_process(ddp_run, tmp_path):
    """Rank 0 measures over the whole training set (not its shard) and broadcasts."""
    assert ddp_run["p2"] is not None and ddp_run["p2"].returncode == 0
    cfg = ddp_run["cfg"]
    single = with_updates(cfg, diffusion__checkpoints__output_dir=str(tmp_path / "d"),
                          diffusion__logging__log_dir=str(tmp_path / "l"), diffusion__training__n_epochs=1,
                          diffusion__logging__num_visualize_samples=0)
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", single)) == 0
    a = load_checkpoint(Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt")["scale_factor"]
    b = load_checkpoint(tmp_path / "d" / "best_model.pt")["scale_factor"]
    assert a == b


# ----------------------------------------------------------------------------------- rank equality
def test_ranks_hold_identical_vqvae_and_codebook(rank_dumps):
    r0, r1 = rank_dumps["stage1"]
    assert r0["steps"] == r1["steps"] == 8  # 2 epochs x (4 volumes x 2 patches / 2 ranks / batch 1)
    assert r0["restarted_total"] > 0, "the test must exercise dead-code restarts"
    assert r0["restarted_total"] == r1["restarted_total"]
    for part in ("model", "ema", "disc", "codebook", "optim", "tracker"):
        a, b = r0[part], r1[part]
        if part == "tracker":
            a = {k: v for k, v in a.items() if torch.is_tensor(v)}
            b = {k: v for k, v in b.items() if torch.is_tensor(v)}
        assert a, part
        assert state_equal(a, b) == [], f"{part} differs between ranks"
    # the codebook really moved (EMA updates and restarts), identically
    assert not torch.equal(r0["codebook"]["ema_cluster_size"], torch.ones_like(r0["codebook"]["ema_cluster_size"]))


def test_ranks_hold_identical_unet(rank_dumps):
    r0, r1 = rank_dumps["stage2"]
    assert r0["steps"] == r1["steps"] == 4
    assert r0["scale_factor"] == r1["scale_factor"]
    for part in ("model", "ema", "optim"):
        assert r0[part] and state_equal(r0[part], r1[part]) == [], f"{part} differs between ranks"


def test_rank0_alone_writes(rank_dumps):
    r0, r1 = rank_dumps["stage1"]
    assert r0["save_best"] is not None and r0["save_latest"] is not None
    assert r1["save_best"] is None and r1["save_latest"] is None
    s0, s1 = rank_dumps["stage2"]
    assert s0["save_best"] is not None and s1["save_best"] is None and s1["save_latest"] is None
    for stage in ("vqvae", "diffusion"):
        assert len(event_files(rank_dumps["cfg"][stage]["logging"]["log_dir"])) == 1


def test_sharded_validation_weighs_every_tile_once(rank_dumps):
    """3 tiles over 2 ranks: no padding, so the reduced metrics are the one-process metrics."""
    r0, r1 = rank_dumps["stage1"]
    assert r0["n_val"] == 3
    assert r0["val_sharded"] == r1["val_sharded"]  # every rank gets the same reduced values
    assert r0["val_sharded"].keys() == r0["val_whole"].keys()
    for k, v in r0["val_whole"].items():
        assert r0["val_sharded"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


# ----------------------------------------------------------------------------------- sampling
SAMPLE_ARGS = ["--num-samples", 5, "--batch-size", 2, "--steps", 3, "--seed", 7]  # batches {0,1} {2,3} {4}


def assert_same_samples(multi: Path, single: Path) -> None:
    names = sorted(x.name for x in multi.glob("sample_*"))
    assert names == [f"sample_{i:04d}.nii.gz" for i in range(5)]
    assert names == sorted(x.name for x in single.glob("sample_*"))
    # whole single-process batches per rank, one thread per process: the files are bit-identical
    for n in names:
        assert sha(multi / n) == sha(single / n), f"{multi.name}/{n} differs from the single-process file"
    rec = json.loads((multi / "samples.json").read_text())
    assert rec["world_size"] == 2 and rec["num_samples"] == 5
    assert (multi / "preview.png").is_file()


def test_sharded_sampling_equals_single_process_ddim(ddp_run, tmp_path):
    assert ddp_run["p2"] is not None and ddp_run["p2"].returncode == 0
    cfg_path = ddp_run["cfg_path"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    p = torchrun("-m", "vqldm", "--quiet", "sample", "--config", cfg_path, "--out", multi, "--scheduler", "ddim",
                 *SAMPLE_ARGS)
    assert p.returncode == 0, "torchrun vqldm sample failed"
    assert p.stdout.count("samples written") == 1  # rank 0 alone prints the summary
    assert run_cli("--quiet", "sample", "--config", cfg_path, "--out", single, "--scheduler", "ddim",
                   *SAMPLE_ARGS) == 0
    assert_same_samples(multi, single)


def test_sharded_sampling_equals_single_process_ddpm(rank_dumps, tmp_path):
    """DDPM draws fresh noise every step, seeded per batch: equal too, because batches are whole."""
    single = tmp_path / "single"
    assert run_cli("--quiet", "sample", "--config", rank_dumps["cfg_path"], "--out", single, "--scheduler", "ddpm",
                   *SAMPLE_ARGS) == 0
    assert_same_samples(rank_dumps["root"] / "samples_ddpm", single)


# ----------------------------------------------------------------------------------- resume
RESUME_SCRIPT = textwrap.dedent('''
    import sys

    import torch

    from vqldm import distributed as dist
    from vqldm.config import load_config
    from vqldm.autoencoder.train import build_vqvae_trainer
    from vqldm.priors.diffusion.train import build_diffusion_trainer

    # argv: straight.yaml first.yaml resumed.yaml from_one_vq.yaml from_one_df.yaml out_dir
    out = {}
    runs = (("straight", build_vqvae_trainer), ("first", build_vqvae_trainer), ("resumed", build_vqvae_trainer),
            ("from_one_vq", build_vqvae_trainer), ("from_one_df", build_diffusion_trainer))
    for (name, build), path in zip(runs, sys.argv[1:6]):
        tr = build(load_config(path, []), progress=False)
        res = tr.fit()
        out[name] = {"epochs": res.epochs, "steps": res.steps,
                     "model": {k: v.clone() for k, v in tr.task.model.state_dict().items()},
                     "scale_factor": tr.task.norm.to_meta()["scale_factor"] if tr.task.name == "diffusion" else None}
        dist.barrier()  # rank 0's checkpoint is on disk before the next run reads it
    torch.save(out, sys.argv[6] + f"/resume_rank{dist.rank()}.pt")
    dist.shutdown()
    dist.exit_process(0)  # as the vqldm command ends a torchrun rank
''')


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data3) -> dict:
    """One launch of 2 ranks: a straight 2-epoch run, a 1-epoch run and its resume (same world size),
    and the resume of a one-process run of each stage (1 -> 2 ranks)."""
    root = tmp_path_factory.mktemp("resume")
    base = ddp_config(root, data3)

    def stage1(name, **kw):
        return with_updates(base, vqvae__checkpoints__output_dir=str(root / name / "ck"),
                            vqvae__logging__log_dir=str(root / name / "logs"), **kw)

    # one process, in this process: both stages for 1 epoch
    one = with_updates(stage1("one", vqvae__training__n_epochs=1),
                       diffusion__checkpoints__output_dir=str(root / "one" / "df"),
                       diffusion__checkpoints__vqvae_path=str(root / "one" / "ck" / "best_model.pt"),
                       diffusion__logging__log_dir=str(root / "one" / "dflogs"), diffusion__training__n_epochs=1)
    one_path = write_config(root / "one.yaml", one)
    assert run_cli("--quiet", "train-vqvae", "--config", one_path) == 0
    assert run_cli("--quiet", "train-diffusion", "--config", one_path) == 0
    one_vq = load_checkpoint(root / "one" / "ck" / "latest_checkpoint.pt")  # before a resume overwrites them
    one_df = load_checkpoint(root / "one" / "df" / "latest_checkpoint.pt")

    first_latest = root / "first" / "ck" / "latest_checkpoint.pt"
    configs = [
        stage1("straight"),  # 2 epochs
        stage1("first", vqvae__training__n_epochs=1),
        stage1("first", vqvae__checkpoints__resume_from=str(first_latest)),  # to epoch 2, same folders
        # into a fresh output_dir: one/ck/best_model.pt stays the parent of the stage-2 run resumed next
        with_updates(one, vqvae__training__n_epochs=2,
                     vqvae__checkpoints__output_dir=str(root / "one_resumed" / "ck"),
                     vqvae__logging__log_dir=str(root / "one_resumed" / "logs"),
                     vqvae__checkpoints__resume_from=str(root / "one" / "ck" / "latest_checkpoint.pt")),
        with_updates(one, diffusion__training__n_epochs=2,
                     diffusion__scale_factor_batches=1,  # a fresh measurement would give another value
                     diffusion__checkpoints__resume_from=str(root / "one" / "df" / "latest_checkpoint.pt")),
    ]
    paths = [write_config(root / f"c{i}.yaml", c) for i, c in enumerate(configs)]
    script = root / "resume.py"
    script.write_text(RESUME_SCRIPT)
    p = torchrun(script, *paths, root)
    assert p.returncode == 0, "the resume run failed"
    ranks = [torch.load(root / f"resume_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"root": root, "ranks": ranks, "one_vq": one_vq, "one_df": one_df}


def test_resume_under_torchrun_is_exact_at_the_same_world_size(resumed):
    """1 epoch + resume for 1 more, both with 2 ranks == 2 epochs straight, bit for bit."""
    root = resumed["root"]
    a = load_checkpoint(root / "first" / "ck" / "latest_checkpoint.pt")
    b = load_checkpoint(root / "straight" / "ck" / "latest_checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 2
    for part in ("model",):
        assert state_equal(a["training_state"][part], b["training_state"][part]) == []
    assert state_equal(a["state_dict"], b["state_dict"]) == []
    assert a["val_loss"] == b["val_loss"]
    for r in resumed["ranks"]:
        assert state_equal(r["resumed"]["model"], r["straight"]["model"]) == []
    assert len(event_files(root / "first" / "logs")) == 2  # the first run's and the resumed run's


def test_resume_one_process_run_with_two_ranks(resumed):
    """A run started in one process continues under torchrun with 2 ranks (both stages)."""
    r0, r1 = resumed["ranks"]
    one_vq, one_df = resumed["one_vq"], resumed["one_df"]
    # 2 steps in the one-process epoch (4 volumes / batch 2), 1 per rank in the 2-rank epoch
    assert one_vq["step"] == one_df["step"] == 2
    assert r0["from_one_vq"]["epochs"] == 2 and r0["from_one_vq"]["steps"] == 3
    assert r0["from_one_df"]["epochs"] == 2 and r0["from_one_df"]["steps"] == 3
    for name in ("from_one_vq", "from_one_df"):
        assert state_equal(r0[name]["model"], r1[name]["model"]) == []
    # the scale factor is the resumed run's, not re-measured
    assert r0["from_one_df"]["scale_factor"] == r1["from_one_df"]["scale_factor"] == one_df["scale_factor"]
    latest = load_checkpoint(resumed["root"] / "one_resumed" / "ck" / "latest_checkpoint.pt")
    assert latest["epoch"] == 2 and latest["step"] == 3
    assert load_checkpoint(resumed["root"] / "one" / "df" / "latest_checkpoint.pt")["epoch"] == 2
    assert load_checkpoint(resumed["root"] / "one" / "df" / "best_model.pt")["scale_factor"] == one_df["scale_factor"]


@pytest.mark.parametrize("as_module", [True, False])
def test_a_torchrun_rank_exits_with_its_code_and_all_its_output(tmp_path, data3, as_module):
    """Under torchrun the command ends with os._exit (distributed.exit_process): stdout, even
    block-buffered into a pipe, still arrives whole, and the exit code is the command's."""
    cfg_path = write_config(tmp_path / "config.yaml", ddp_config(tmp_path, data3))
    env = _env()
    env.pop("PYTHONUNBUFFERED")
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "vqldm"] if as_module else [str(vqldm_script())]
    ok = subprocess.run([*cmd, "check", "--config", str(cfg_path), "--json"], capture_output=True, text=True,
                        env=env, timeout=TIMEOUT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["latent_shape"]
    bad = subprocess.run([*cmd, "check", "--config", str(cfg_path), "--set", "vqvae.num_embedings=3"],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert bad.returncode == 2
    assert "vqvae.num_embedings" in bad.stderr and "Traceback" not in bad.stderr


SLOW_SAVE_SCRIPT = textwrap.dedent('''
    import sys
    import time
    from pathlib import Path

    import vqldm.engine.trainer as trainer_module
    from vqldm import distributed as dist
    from vqldm.config import load_config
    from vqldm.autoencoder.train import build_vqvae_trainer

    write = trainer_module.save_atomic

    def slow_write(obj, path):  # rank 0's checkpoint writes take a while (a slow disk)
        time.sleep(1.5)
        return write(obj, path)

    trainer_module.save_atomic = slow_write
    cfg = load_config(sys.argv[1], [])
    build_vqvae_trainer(cfg, progress=False).fit()
    out = Path(cfg.vqvae.checkpoints.output_dir)
    seen = [name for name in ("best_model.pt", "latest_checkpoint.pt") if (out / name).is_file()]
    Path(sys.argv[2], f"seen_rank{dist.rank()}.txt").write_text(",".join(seen))
    dist.shutdown()
    dist.exit_process(0)
''')


def test_no_rank_leaves_fit_before_rank_0_has_written_its_checkpoints(tmp_path, data3):
    """Code after fit() on any rank (sampling in the same script) finds rank 0's files, however slow
    rank 0's disk is."""
    cfg = with_updates(ddp_config(tmp_path, data3), vqvae__training__n_epochs=1)
    cfg_path = write_config(tmp_path / "config.yaml", cfg)
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE_SCRIPT)
    p = torchrun(script, cfg_path, tmp_path)
    assert p.returncode == 0
    for r in range(WORLD):
        assert (tmp_path / f"seen_rank{r}.txt").read_text() == "best_model.pt,latest_checkpoint.pt"
