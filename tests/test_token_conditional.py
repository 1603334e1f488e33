"""Class conditions for the token prior (issue 17): one start token per class after the null
(begin-of-sequence) token, the class dropped to the null in training, classifier-free guidance on the
logits (two key/value caches), ``vqldm sample --prior transformer --class/--guidance`` and its records."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import labelled_config, run_cli, tiny_config_dict, write_config
from vqldm.checkpoint import load_checkpoint
from vqldm.config import config_from_dict
from vqldm.data.labels import read_labels
from vqldm.errors import VqldmError
from vqldm.priors.transformer.model import Vocabulary, build_transformer, start_tokens, transformer_net_config, with_bos
from vqldm.priors.transformer.sampler import gumbel_noise, guided_logits, sample_tokens
from vqldm.priors.transformer.task import TransformerTask

CODES, CLASSES, N = 16, 3, 24


def _model(seed=0):
    torch.manual_seed(seed)
    return build_transformer({"num_tokens": CODES + 1 + CLASSES, "max_seq_len": N, "attn_layers_dim": 32,
                              "attn_layers_depth": 2, "attn_layers_heads": 4, "embedding_dropout_rate": 0.0}).eval()


# ------------------------------------------------------------------------------ tokens and guidance
def test_the_network_config_of_an_unconditional_prior_is_unchanged_and_classes_add_start_tokens(tmp_path):
    cfg = config_from_dict(tiny_config_dict(tmp_path, tmp_path))
    # exactly what every earlier checkpoint holds: old checkpoints load, new unconditional ones are the same
    assert transformer_net_config(cfg, 16, 512) == {"num_tokens": 17, "max_seq_len": 512, "attn_layers_dim": 16,
                                                    "attn_layers_depth": 1, "attn_layers_heads": 2,
                                                    "embedding_dropout_rate": 0.0}
    assert transformer_net_config(cfg, 16, 512, num_classes=3)["num_tokens"] == 20
    assert start_tokens(torch.tensor([0, 1, 2]), 16).tolist() == [17, 18, 19]
    seq = torch.randint(0, 16, (3, 5))
    assert with_bos(seq, 16)[:, 0].tolist() == [16] * 3
    assert with_bos(seq, torch.tensor([17, 16, 19]))[:, 0].tolist() == [17, 16, 19]
    assert torch.equal(with_bos(seq, 16)[:, 1:], seq[:, :-1])


def test_guidance_zero_is_the_null_and_one_the_conditional_logits_of_direct_forward_passes():
    model = _model()
    seq = torch.randint(0, CODES, (2, N))
    with torch.no_grad():
        cond = model(with_bos(seq, CODES + 1 + 2))[:, :, :CODES]
        null = model(with_bos(seq, CODES))[:, :, :CODES]
    assert not torch.equal(cond, null)  # the start token matters
    assert torch.equal(guided_logits(cond, null, 0.0), null)
    assert torch.equal(guided_logits(cond, null, 1.0), cond)
    assert torch.equal(guided_logits(cond, None, 3.0), cond)  # no null stream: the conditional logits
    assert torch.allclose(guided_logits(cond, null, 3.0), null + 3.0 * (cond - null), atol=1e-5)


@pytest.mark.parametrize("knobs", [{}, {"top_k": 4, "temperature": 0.8}])
def test_guided_sampling_is_exact_at_zero_and_one_and_cached_equals_uncached(knobs):
    model = _model()
    noise = gumbel_noise([0, 1, 2], 5, N, CODES)
    cls = CODES + 1 + 1
    null = sample_tokens(model, noise, CODES, **knobs)
    cond = sample_tokens(model, noise, cls, **knobs)
    assert not torch.equal(null, cond)
    assert torch.equal(sample_tokens(model, noise, cls, guidance=0.0, **knobs), null)
    assert torch.equal(sample_tokens(model, noise, cls, guidance=1.0, cached=False, **knobs), cond)
    strong = sample_tokens(model, noise, cls, guidance=3.0, **knobs)
    assert torch.equal(strong, sample_tokens(model, noise, cls, guidance=3.0, cached=False, **knobs))
    assert not torch.equal(strong, cond)
    # one start token per sample: each row is what its class alone gives
    mixed = sample_tokens(model, noise, torch.tensor([cls, CODES, cls]), **knobs)
    assert torch.equal(mixed[[0, 2]], cond[[0, 2]]) and torch.equal(mixed[1], null[1])


def test_one_forward_pass_per_token_at_guidance_one_and_two_above():
    model = _model()
    calls = []
    model.to_logits.register_forward_hook(lambda *a: calls.append(1))
    noise = gumbel_noise([0], 1, N, CODES)
    sample_tokens(model, noise, CODES + 1)
    assert len(calls) == N
    calls.clear()
    sample_tokens(model, noise, CODES + 1, guidance=2.0)
    assert len(calls) == 2 * N


def test_start_tokens_are_never_drawn_as_codes():
    model = _model()
    with torch.no_grad():  # the start tokens' logits far above every code's
        model.to_logits.bias[CODES:] = 1e4
    for cached in (True, False):
        seq = sample_tokens(model, gumbel_noise([0, 1], 2, N, CODES), CODES + 1, guidance=2.0, cached=cached)
        assert seq.max() < CODES


def test_condition_drop_replaces_classes_by_the_null_start_token_at_the_configured_rate():
    def task(p):
        return SimpleNamespace(classes=["a", "b", "c"], bos=CODES, vocab=Vocabulary(CODES, 3),
                               rt=SimpleNamespace(to_device=lambda x: x),
                               cfg=SimpleNamespace(prior=SimpleNamespace(condition_drop_prob=p)))

    labels = torch.randint(0, 3, (20000,))
    torch.manual_seed(0)
    out = TransformerTask.start_of(task(0.2), {"label": labels}, drop=True)
    dropped = out == CODES
    assert 0.18 < dropped.float().mean() < 0.22
    assert torch.equal(out[~dropped], labels[~dropped] + CODES + 1)
    assert torch.equal(TransformerTask.start_of(task(0.2), {"label": labels}, drop=False), labels + CODES + 1)
    assert torch.equal(TransformerTask.start_of(task(0.0), {"label": labels}, drop=True), labels + CODES + 1)
    uncond = SimpleNamespace(classes=None, bos=CODES, vocab=Vocabulary(CODES))
    assert TransformerTask.start_of(uncond, {}, drop=True) == CODES


def test_condition_drop_prob_is_checked_in_one_line(tmp_path, capsys):
    cfg = tiny_config_dict(tmp_path, tmp_path)
    cfg["prior"]["condition_drop_prob"] = 1.0
    assert run_cli("--quiet", "check", "--config", write_config(tmp_path / "c.yaml", cfg)) == 2
    err = capsys.readouterr().err
    assert "prior.condition_drop_prob must lie in [0, 1), got 1.0" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def token_run(tmp_path_factory, trained_stage1):
    """Three density levels (3 train, 6 val volumes) and a 1-epoch class-conditional token prior on them."""
    root = tmp_path_factory.mktemp("token_cond")
    cfg = labelled_config(root, trained_stage1["best"], "prior", num_val=6)
    cfg["data"]["max_val_patches"] = 6
    cfg["prior"]["logging"]["num_visualize_samples"] = 3
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-prior", "--config", cfg_path) == 0
    out = Path(cfg["prior"]["checkpoints"]["output_dir"])
    return {"root": root, "data": root / "data", "config": cfg, "config_path": cfg_path, "best": out / "best_model.pt",
            "latest": out / "latest_checkpoint.pt", "vqvae": trained_stage1["best"]}


def _sample(run, out, *extra) -> int:
    return run_cli("--quiet", "sample", "--config", run["config_path"], "--prior", "transformer", "-n", 3,
                   "--batch-size", 2, "--out", out, *extra)


def test_conditional_training_records_the_classes_and_one_start_token_each(token_run):
    ckpt = load_checkpoint(token_run["best"], kind="prior", what="test")
    assert ckpt["classes"] == ["level0", "level1", "level2"]
    assert ckpt["network"]["num_tokens"] == 16 + 1 + 3
    assert ckpt["state_dict"]["token_embeddings.weight"].shape[0] == 20
    assert ckpt["config"]["prior"]["condition_drop_prob"] == 0.15
    assert (Path(token_run["config"]["prior"]["logging"]["log_dir"]) / "images" / "generated_epoch0001.png").is_file()


def test_sample_records_the_class_and_guidance_like_the_diffusion_prior(token_run, tmp_path):
    assert _sample(token_run, tmp_path / "a", "--class", "level2", "--guidance", 2.0) == 0
    rec = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rec["prior"] == "transformer" and rec["classes"] == ["level0", "level1", "level2"]
    assert rec["class"] == "level2" and rec["guidance"] == 2.0
    assert rec["conditions"] == {f"sample_{i:04d}": {"class": "level2", "guidance": 2.0} for i in range(3)}
    assert _sample(token_run, tmp_path / "b") == 0  # no --class: the null class
    rec = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert rec["class"] is None and rec["guidance"] == 1.0


def test_class_refusals_are_one_line(token_run, trained_stage1, data_dir, tmp_path, capsys):
    from test_reliability import assert_clean_error, cli

    base = ["sample", "--config", token_run["config_path"], "--prior", "transformer", "-n", 1]
    rc, _, err = cli(capsys, *base, "--class", "level9", "--out", tmp_path / "a")
    assert_clean_error(rc, err, "--class level9: unknown class; this model knows level0, level1, level2")
    rc, _, err = cli(capsys, *base, "--guidance", 2, "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--guidance needs --class")
    # the class-only model has no covariate tokens: --cond is one line, before any sample
    rc, _, err = cli(capsys, *base, "--cond", "n_filaments=12", "--out", tmp_path / "d")
    assert_clean_error(rc, err, "--cond n_filaments", "was trained without prior.covariates")
    assert not list((tmp_path / "d").glob("sample_*"))
    uncond = tiny_config_dict(tmp_path / "u", data_dir)
    uncond["prior"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    uncond["prior"]["training"]["n_epochs"] = 1
    uncond["prior"]["logging"]["num_visualize_samples"] = 0
    uncond_cfg = write_config(tmp_path / "u.yaml", uncond)
    assert run_cli("--quiet", "train-prior", "--config", uncond_cfg) == 0
    assert "classes" not in load_checkpoint(tmp_path / "u" / "prior_checkpoints" / "best_model.pt", kind="prior")
    rc, _, err = cli(capsys, "sample", "--config", uncond_cfg, "--prior", "transformer", "-n", 1, "--class",
                     "level0", "--out", tmp_path / "c")
    assert_clean_error(rc, err, "--class level0: this model is unconditional")
    assert not list((tmp_path / "c").glob("sample_*"))


def test_api_guidance_zero_samples_exactly_the_null_class(token_run):
    import vqldm

    model = vqldm.load_model(token_run["config_path"], prior="transformer", device="cpu")
    null = model.sample(2, seed=4).volumes
    w0 = model.sample(2, seed=4, class_name="level1", guidance=0.0).volumes
    w1 = model.sample(2, seed=4, class_name="level1").volumes
    assert np.array_equal(w0, null) and w1.shape == null.shape and np.isfinite(w1).all()
    with pytest.raises(VqldmError, match="unknown class"):
        model.sample(1, class_name="nope")
    with pytest.raises(VqldmError, match="autoguidance, guide_checkpoint and cond_volume are the diffusion prior's"):
        model.sample(1, autoguidance=2.0)
    with pytest.raises(VqldmError, match="--cond n_filaments: .* was trained without prior.covariates"):
        model.sample(1, cond={"n_filaments": 12.0})


def test_a_resume_with_other_classes_is_refused(token_run, tmp_path, capsys):
    from test_reliability import assert_clean_error, cli

    other = tmp_path / "other.csv"  # the same files, other class names
    rename = {"level0": "low", "level1": "mid", "level2": "high"}
    other.write_text("".join(f"{n},{rename[c]}\n" for n, c in read_labels(token_run["data"] / "labels.csv").items()))
    cfg = json.loads(json.dumps(token_run["config"]))
    cfg["data"]["labels_file"] = str(other)
    cfg["prior"]["checkpoints"].update(output_dir=str(tmp_path / "out"), resume_from=str(token_run["latest"]))
    cfg["prior"]["training"]["n_epochs"] = 2
    rc, _, err = cli(capsys, "train-prior", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, "was trained with classes ['level0', 'level1', 'level2']")


def test_evaluate_judges_token_prior_class_folders_per_class(token_run, tmp_path):
    folders = [tmp_path / "level0", tmp_path / "level2"]
    for folder in folders:
        assert _sample(token_run, folder, "--class", folder.name) == 0
    assert run_cli("--quiet", "evaluate", "--config", token_run["config_path"], "--vqvae-checkpoint",
                   token_run["vqvae"], "--samples", folders[0], "--samples", folders[1], "--out", tmp_path / "ev") == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_class"]
    assert [e["class"] for e in res["folders"]] == ["level0", "level2"]
    assert all(e["n"] == 3 and e["n_real"] == 2 and 0.0 <= e["accuracy"] <= 1.0 for e in res["folders"])


def test_score_takes_a_conditional_prior_under_the_null_class(token_run):
    from vqldm.commands.score import token_nll_grid
    from vqldm.config import load_config
    from vqldm.data.io import list_volumes, read_volume
    from vqldm.priors.transformer.pipeline import load_token_pipeline

    pipe = load_token_pipeline(load_config(token_run["config_path"], announce=False))
    # score starts every sequence with num_codes: the begin-of-sequence token, i.e. the null class
    assert pipe.num_codes == 16 and pipe.classes == ["level0", "level1", "level2"]
    nll = token_nll_grid(pipe, read_volume(list_volumes(token_run["data"] / "val")[0]).array)
    assert nll.shape == (8, 8, 8) and torch.isfinite(nll).all() and nll.min() >= 0
