"""The token prior: orderings, the cached sampler, training on code indices, sampling, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_config_dict, write_config
from vqldm.checkpoint import load_checkpoint
from vqldm.data.io import list_volumes, read_volume
from vqldm.priors.transformer.model import build_transformer, to_grid, to_sequence, token_order
from vqldm.priors.transformer.sampler import choose, gumbel_noise, sample_tokens


def _model(num_codes=16, seq_len=40, dim=32, depth=2, heads=4, seed=0):
    torch.manual_seed(seed)
    return build_transformer({"num_tokens": num_codes + 1, "max_seq_len": seq_len, "attn_layers_dim": dim,
                              "attn_layers_depth": depth, "attn_layers_heads": heads,
                              "embedding_dropout_rate": 0.0}).eval()


# ------------------------------------------------------------------------------ orderings
@pytest.mark.parametrize("ordering", ["raster_scan", "s_curve", "random"])
def test_every_ordering_visits_each_position_once_and_round_trips(ordering):
    grid = [4, 3, 2]
    state = np.random.get_state()[1].copy()
    order = token_order(ordering, grid, seed=7)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global RNG is left alone
    assert sorted(order) == list(range(24))
    assert order == token_order(ordering, grid, seed=7)
    codes = torch.randint(0, 16, (2, 1, *grid))
    idx = torch.tensor(order)
    seq = to_sequence(codes, idx)
    assert seq[0, 0] == codes.reshape(2, -1)[0, order[0]]
    assert torch.equal(to_grid(seq, idx, grid), codes[:, 0])
    if ordering == "raster_scan":
        assert order == list(range(24))


# ------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("knobs", [{}, {"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.8}])
def test_cached_sampling_gives_the_same_tokens_as_uncached(knobs):
    model = _model()
    noise = gumbel_noise([0, 1, 2], seed=5, seq_len=40, num_codes=16)
    cached = sample_tokens(model, noise, start=16, cached=True, **knobs)
    plain = sample_tokens(model, noise, start=16, cached=False, **knobs)
    assert cached.shape == (3, 40) and cached.max() < 16  # never the begin-of-sequence token
    assert torch.equal(cached, plain)


def test_a_sample_does_not_depend_on_its_batch():
    model = _model()
    together = sample_tokens(model, gumbel_noise([0, 1, 2], 9, 40, 16), start=16)
    alone = sample_tokens(model, gumbel_noise([2], 9, 40, 16), start=16)
    assert torch.equal(together[2:], alone)
    assert not torch.equal(together[0], together[1])


def test_choose_draws_from_the_tempered_truncated_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    noise = gumbel_noise([0], 0, 20000, 4)[0]
    freq = torch.bincount(choose(logits, noise), minlength=4).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.01)
    hot = torch.bincount(choose(logits, noise, temperature=0.5), minlength=4).float() / 20000
    assert torch.allclose(hot, (logits[0] / 0.5).softmax(-1), atol=0.01)
    top2 = torch.bincount(choose(logits, noise, top_k=2), minlength=4)
    assert top2[2:].sum() == 0 and top2[:2].min() > 0
    # top_p 0.7: p = (0.64, 0.24, 0.09, 0.03) -> the first two hold 0.88 >= 0.7, so only they remain
    nucleus = torch.bincount(choose(logits, noise, top_p=0.7), minlength=4)
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0


# ------------------------------------------------------------------------------ training and sampling
@pytest.fixture(scope="module")
def trained_prior(tmp_path_factory, data_dir, trained_stage1) -> dict:
    root = tmp_path_factory.mktemp("prior_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["prior"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg["prior"]["training"]["n_epochs"] = 2
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-prior", "--config", str(cfg_path)) == 0
    out = root / "prior_checkpoints"
    return {"root": root, "config": cfg, "config_path": cfg_path, "best": out / "best_model.pt",
            "latest": out / "latest_checkpoint.pt", "log_dir": root / "prior_logs"}


def test_train_prior_writes_self_describing_checkpoints_and_logs(trained_prior, trained_stage1):
    ckpt = load_checkpoint(trained_prior["best"], kind="prior")
    assert ckpt["kind"] == "prior" and ckpt["ema"] is True
    assert ckpt["latent_grid"] == [8, 8, 8] and sorted(ckpt["ordering"]["order"]) == list(range(512))
    assert ckpt["network"]["num_tokens"] == 17 and ckpt["network"]["max_seq_len"] == 512
    assert ckpt["vqvae_path"] == str(trained_stage1["best"]) and len(ckpt["vqvae_sha256"]) == 64
    assert ckpt["data"]["spacing"] and ckpt["normalization"]["intensity_range"] == [0.0, 1.0]
    assert ckpt["data"]["spacing_unit"] == "micron"  # the synthetic data's unit, written into every sample
    # the weights load into a plain MONAI DecoderOnlyTransformer built from the checkpoint alone; only
    # MONAI's N x N causal-mask buffers are not stored (fused attention never reads them)
    from monai.networks.nets import DecoderOnlyTransformer

    plain = DecoderOnlyTransformer(**ckpt["network"])
    missing, unexpected = plain.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and missing and all(k.endswith("attn.causal_mask") for k in missing)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == sum(
        p.numel() for p in plain.parameters())  # weights only: no N^2 masks in the file
    latest = load_checkpoint(trained_prior["latest"], kind="prior")
    assert latest["epoch"] == 2 and "training_state" in latest
    assert list(trained_prior["log_dir"].glob("events.out.tfevents.*.prior"))
    assert (trained_prior["log_dir"] / "images" / "generated_epoch0002.png").is_file()


def test_prior_resume_is_exact(tmp_path, data_dir, trained_stage1):
    def run(root, epochs, resume=None):
        cfg = tiny_config_dict(root, data_dir)
        cfg["prior"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
        cfg["prior"]["training"]["n_epochs"] = epochs
        cfg["prior"]["logging"]["num_visualize_samples"] = 0
        if resume:
            cfg["prior"]["checkpoints"]["resume_from"] = str(resume)
        assert run_cli("--quiet", "train-prior", "--config", str(write_config(root / "c.yaml", cfg))) == 0
        return root / "prior_checkpoints" / "latest_checkpoint.pt"

    straight = load_checkpoint(run(tmp_path / "a", 2))
    first = run(tmp_path / "b", 1)
    resumed = load_checkpoint(run(tmp_path / "b", 2, resume=first))
    for k, v in straight["training_state"]["model"].items():
        assert torch.equal(v, resumed["training_state"]["model"][k]), k


def test_sample_with_the_token_prior_writes_the_same_files_for_the_same_seed(trained_prior, tmp_path):
    cfg = str(trained_prior["config_path"])
    for out in ("A", "B"):
        assert run_cli("--quiet", "sample", "--config", cfg, "--prior", "transformer", "-n", "3", "--batch-size", "2",
                       "--top-k", "8", "--out", str(tmp_path / out)) == 0
    files = list_volumes(tmp_path / "A")
    assert [f.name for f in files] == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    for f in files:
        assert f.read_bytes() == (tmp_path / "B" / f.name).read_bytes()
        v = read_volume(f)
        assert v.array.shape == (32, 32, 32) and 0.0 <= v.array.min() and v.array.max() <= 1.0
    record = json.loads((tmp_path / "A" / "samples.json").read_text())
    assert record["prior"] == "transformer" and record["top_k"] == 8 and record["temperature"] == 1.0
    assert (tmp_path / "A" / "preview.png").is_file()


def test_token_prior_bad_input_is_one_line(trained_prior, trained_stage1, trained_stage2, tmp_path, capsys):
    cfg = str(trained_prior["config_path"])
    cases = [
        (["--steps", "5"], "diffusion sampling options"),
        (["--temperature", "0"], "--temperature 0.0: must be > 0"),
        (["--top-p", "1.5"], "--top-p 1.5"),
        (["--prior-checkpoint", str(trained_stage2["best"])], "expected a token-prior (transformer) one"),
        (["--vqvae-checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        # another stage-1 file (its latest checkpoint): the codes would mean other vectors
        (["--vqvae-checkpoint", str(trained_stage1["latest"])], "is not the stage-1 checkpoint that"),
    ]
    for extra, msg in cases:
        assert run_cli("--quiet", "sample", "--config", cfg, "--prior", "transformer", "-n", "1",
                       "--out", str(tmp_path / "x"), *extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    bad = tiny_config_dict(tmp_path, tmp_path)
    bad["prior"]["ordering"] = "zigzag"
    assert run_cli("--quiet", "check", "--config", str(write_config(tmp_path / "bad.yaml", bad))) == 2
    assert "prior.ordering must be one of raster_scan, s_curve, random" in capsys.readouterr().err


def test_score_writes_a_likelihood_map_per_volume_and_the_scores(trained_prior, data_dir, tmp_path, capsys):
    from vqldm.data.io import write_volume

    cfg = str(trained_prior["config_path"])
    assert run_cli("--quiet", "score", "--config", cfg, "--volumes", str(data_dir / "val"),
                   "--out", str(tmp_path / "S")) == 0
    rows = json.loads((tmp_path / "S" / "scores.json").read_text())["volumes"]
    names = [f.name for f in list_volumes(data_dir / "val")]
    assert [r["file"] for r in rows] == names
    for r in rows:
        assert r["mean_nll_nats"] > 0 and r["bits_per_token"] == pytest.approx(r["mean_nll_nats"] / np.log(2))
        nll = read_volume(tmp_path / "S" / f"nll_{r['file'].split('.')[0]}.nii.gz")
        assert nll.array.shape == (32, 32, 32)  # the 8^3 token grid over the 32^3 volume
        assert nll.array.mean() == pytest.approx(r["mean_nll_nats"], rel=1e-4)  # each token covers 4^3 voxels
        assert nll.spacing == read_volume(data_dir / "val" / r["file"]).spacing
    assert (tmp_path / "S" / "scores.csv").read_text().startswith("file,mean_nll_nats,bits_per_token")
    # a volume of another size is refused with one line naming it
    write_volume(tmp_path / "odd" / "odd.nii.gz", np.zeros((16, 16, 16), np.float32))
    assert run_cli("--quiet", "score", "--config", cfg, "--volumes", str(tmp_path / "odd"),
                   "--out", str(tmp_path / "S2")) == 2
    err = capsys.readouterr().err
    assert "odd.nii.gz has shape [16, 16, 16]" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ two priors, one report
def _two_prior_folders(trained_prior, trained_stage2, tmp_path) -> tuple:
    tok, dif = tmp_path / "tok", tmp_path / "dif"
    assert run_cli("--quiet", "sample", "--config", str(trained_prior["config_path"]), "--prior", "transformer",
                   "-n", "2", "--out", str(tok)) == 0
    assert run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "-n", "2",
                   "--scheduler", "ddim", "--steps", "5", "--out", str(dif)) == 0
    return tok, dif


def test_evaluate_compares_two_priors_on_one_stage1_against_one_floor(trained_prior, trained_stage1, trained_stage2,
                                                                      tmp_path):
    tok, dif = _two_prior_folders(trained_prior, trained_stage2, tmp_path)
    base = ["--quiet", "evaluate", "--config", str(trained_stage2["config_path"]),
            "--vqvae-checkpoint", str(trained_stage1["best"])]
    assert run_cli(*base, "--out", str(tmp_path / "E"), "--samples", str(dif), "--samples", str(tok)) == 0
    comp = json.loads((tmp_path / "E" / "metrics.json").read_text())["comparison"]
    labels = [p["label"] for p in comp["priors"]]
    assert labels == ["diffusion (ddim, 5 steps)", "token prior (T 1.0)"]
    assert comp["priors"][1]["record"]["prior"] == "transformer"
    # the diffusion column equals what evaluating its folder alone gives: same held-out volumes, same floor
    assert run_cli(*base, "--out", str(tmp_path / "E1"), "--samples", str(dif)) == 0
    alone = json.loads((tmp_path / "E1" / "metrics.json").read_text())["stages"]["ratios"]
    assert set(comp["ratios"]) == set(alone)
    for name, r in comp["ratios"].items():
        assert set(r["samples"]) == set(labels) and set(r["limited_by"]) == set(labels)
        for row in ("real_train", "reconstruction"):
            assert r[row] == alone[name][row], (name, row)
        assert r["samples"][labels[0]] == alone[name]["samples"], name
        defined = {k: v for k, v in r["samples"].items() if v is not None}
        assert r["closest"] == (min(defined, key=defined.get) if defined else None)
        # each prior's bracket over redraws of its samples, as evaluating its folder alone gives it
        assert r["samples_interval"][labels[0]] == alone[name].get("samples_interval"), name
        for k, v in r["samples"].items():
            assert (r["samples_interval"][k] is None) == (v is None), (name, k)
    report = (tmp_path / "E" / "report.md").read_text()
    assert "Priors side by side" in report and all(f"| {lab} |" in report for lab in labels)
    for p in comp["priors"]:
        rate = p["generation"]["summary"]["redraw_pass_rate"]
        assert f"| {p['label']} | 2 | `{p['samples']}` |" in report and f"| {rate:.0%} |" in report
    assert "priors.png" in report and (tmp_path / "E" / "priors.png").is_file()
    for i in (1, 2):
        assert (tmp_path / "E" / f"prior_{i}" / "report.md").is_file()


def test_evaluate_refuses_samples_of_another_stage1(trained_prior, trained_stage1, trained_stage2, tmp_path, capsys):
    import shutil

    tok, dif = _two_prior_folders(trained_prior, trained_stage2, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(tok, other)
    rec = json.loads((other / "samples.json").read_text())
    rec["vqvae_sha256"] = "f" * 64
    (other / "samples.json").write_text(json.dumps(rec))
    base = ["--quiet", "evaluate", "--config", str(trained_stage2["config_path"]), "--out", str(tmp_path / "E")]
    cases = [([dif, other], f"--samples {other}: its samples came from another stage-1 checkpoint"),
             ([other, dif], f"--samples {dif}: its samples came from another stage-1 checkpoint"),
             ([other], "pass --vqvae-checkpoint"),
             ([dif, dif], "the same folder is given twice")]
    for folders, msg in cases:
        assert run_cli(*base, *[a for f in folders for a in ("--samples", str(f))]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (folders, err)
    (other / "samples.json").write_text("{not json")
    assert run_cli(*base, "--samples", str(dif), "--samples", str(other)) == 2
    assert "samples.json is not readable JSON" in capsys.readouterr().err
