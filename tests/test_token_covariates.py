"""Covariates for the token prior (issue 17): each covariate, normalised by its training range and quantised to
``prior.covariate_bins`` bins, is a token after the start token; dropped to its null in training (all conditions
together too), prefilled by the cached sampler, guided against the fully null stream, recorded and refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import labelled_config, run_cli, tiny_config_dict, write_config
from test_reliability import assert_clean_error, cli
from vqldm.checkpoint import load_checkpoint
from vqldm.config import config_from_dict
from vqldm.errors import VqldmError
from vqldm.priors.transformer.model import Vocabulary, build_transformer, transformer_net_config, with_bos
from vqldm.priors.transformer.sampler import gumbel_noise, sample_tokens
from vqldm.priors.transformer.task import TransformerTask, token_nll

CODES, CLASSES, COVS, BINS, N = 16, 3, 2, 4, 24
VOCAB = Vocabulary(CODES, CLASSES, COVS, BINS)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_transformer({"num_tokens": VOCAB.size, "max_seq_len": N + COVS, "attn_layers_dim": 32,
                              "attn_layers_depth": 2, "attn_layers_heads": 4, "embedding_dropout_rate": 0.0}).eval()


# ------------------------------------------------------------------------------ vocabulary
def test_covariates_add_bins_plus_one_tokens_each_and_one_position_each(tmp_path):
    cfg = config_from_dict(tiny_config_dict(tmp_path, tmp_path))  # prior.covariate_bins: 16 by default
    assert cfg.prior.covariates == [] and cfg.prior.covariate_bins == 16
    net = transformer_net_config(cfg, 16, 512, num_classes=3, num_covariates=2)
    assert net["num_tokens"] == 16 + 1 + 3 + 2 * 17 and net["max_seq_len"] == 514
    # without covariates nothing changes (the class-only and unconditional configs are pinned in test_token_conditional)
    assert transformer_net_config(cfg, 16, 512, num_classes=3) == {**net, "num_tokens": 20, "max_seq_len": 512}
    ckpt = {"network": net, "classes": ["a", "b", "c"], "covariates": {"x": [0, 1], "y": [2, 3]}, "covariate_bins": 16}
    assert Vocabulary.of(ckpt) == Vocabulary(16, 3, 2, 16)
    assert Vocabulary.of({"network": {"num_tokens": 20}, "classes": ["a", "b", "c"]}) == Vocabulary(16, 3)


def test_values_are_quantised_into_each_covariates_own_tokens_and_dropped_ones_are_its_null():
    first = CODES + 1 + CLASSES  # covariate 0: first .. first + BINS (null), covariate 1: after it
    values = torch.tensor([[0.0, 1.0], [0.26, 0.74], [-0.5, 1.5], [0.5, 0.5]])
    keep = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1]])
    tokens = VOCAB.covariate_tokens(values, keep)
    assert tokens.tolist() == [[first, first + 5 + 3], [first + 1, first + 5 + 2],  # 0.74 * 4 -> bin 2
                               [first, first + 5 + 3], [first + 4, first + 5 + 2]]  # clamped; dropped: the null
    assert tokens.max() < VOCAB.size
    prefix = VOCAB.prefix(torch.tensor([CODES, CODES + 2]), values[:2], keep[:2])
    assert prefix.tolist() == [[CODES] + tokens[0].tolist(), [CODES + 2] + tokens[1].tolist()]
    assert VOCAB.prefix(CODES).tolist() == [[CODES, first + 4, first + 9]]  # None: every covariate's null
    assert Vocabulary(CODES, CLASSES).prefix(CODES + 1) == CODES + 1  # no covariates: the start token alone


def test_the_loss_is_on_the_code_positions_only():
    model, seq = _model(), torch.randint(0, CODES, (2, N))
    prefix = VOCAB.prefix(torch.tensor([CODES, CODES + 1]), torch.rand(2, COVS), torch.ones(2, COVS))
    inputs = with_bos(seq, prefix)
    assert inputs.shape == (2, N + COVS) and torch.equal(inputs[:, :1 + COVS], prefix)
    with torch.no_grad():
        nll = token_nll(model, seq, prefix)
        want = F.cross_entropy(model(inputs)[:, COVS:].transpose(1, 2), seq, reduction="none")
    assert nll.shape == (2, N) and torch.allclose(nll, want)


# ------------------------------------------------------------------------------ sampling
def _prefixes():
    cond = VOCAB.prefix(CODES + 1 + 2, torch.tensor([0.3, 0.9]), torch.tensor([1.0, 0.0]))
    return cond, VOCAB.prefix(CODES)


@pytest.mark.parametrize("knobs", [{}, {"top_k": 4, "temperature": 0.8}])
def test_prefilled_sampling_is_cached_as_uncached_and_guidance_is_exact_at_zero_and_one(knobs):
    model, (cond, null) = _model(), _prefixes()
    noise = gumbel_noise([0, 1, 2], 5, N, CODES)
    plain = sample_tokens(model, noise, cond, **knobs)
    assert torch.equal(plain, sample_tokens(model, noise, cond, cached=False, **knobs))
    unguided = sample_tokens(model, noise, null, **knobs)
    assert not torch.equal(plain, unguided)  # the covariate token matters
    assert torch.equal(sample_tokens(model, noise, cond, guidance=0.0, null_start=null, **knobs), unguided)
    assert torch.equal(sample_tokens(model, noise, cond, guidance=1.0, null_start=null, cached=False, **knobs), plain)
    strong = sample_tokens(model, noise, cond, guidance=3.0, null_start=null, **knobs)
    assert torch.equal(strong, sample_tokens(model, noise, cond, guidance=3.0, null_start=null, cached=False, **knobs))
    assert not torch.equal(strong, plain)
    other = VOCAB.prefix(CODES + 1 + 2, torch.tensor([0.8, 0.9]), torch.tensor([1.0, 0.0]))
    assert not torch.equal(sample_tokens(model, noise, other, **knobs), plain)  # another bin, other samples


def test_one_forward_pass_per_token_prefix_included_and_codes_only_drawn():
    model, (cond, null) = _model(), _prefixes()
    calls = []
    model.to_logits.register_forward_hook(lambda *a: calls.append(1))
    noise = gumbel_noise([0, 1], 1, N, CODES)
    sample_tokens(model, noise, cond)
    assert len(calls) == N + COVS  # the prefix's covariate tokens into the cache, then one pass per code
    calls.clear()
    sample_tokens(model, noise, cond, guidance=2.0, null_start=null)
    assert len(calls) == 2 * (N + COVS)
    with torch.no_grad():
        model.to_logits.bias[CODES:] = 1e4
    assert sample_tokens(model, noise, cond, guidance=2.0, null_start=null).max() < CODES


# ------------------------------------------------------------------------------ training drop
def _task(classes: int, covariates: int, p: float):
    return SimpleNamespace(vocab=Vocabulary(CODES, classes, covariates, BINS), bos=CODES,
                           rt=SimpleNamespace(to_device=lambda x: x),
                           cfg=SimpleNamespace(prior=SimpleNamespace(condition_drop_prob=p)))


def test_each_condition_drops_to_its_null_and_all_together_with_the_same_probability():
    b, p = 40000, 0.2
    batch = {"label": torch.randint(0, 3, (b,)), "covariates": torch.rand(b, 1)}
    torch.manual_seed(0)
    out = TransformerTask.start_of(_task(3, 1, p), batch, drop=True)
    assert out.shape == (b, 2)
    class_null, cov_null = out[:, 0] == CODES, out[:, 1] == CODES + 1 + 3 + BINS
    # each alone (p) or all together (p): 1 - (1 - p)^2 each, p + (1 - p) p^2 both
    assert abs(class_null.float().mean() - 0.36) < 0.01 and abs(cov_null.float().mean() - 0.36) < 0.01
    assert abs((class_null & cov_null).float().mean() - (p + (1 - p) * p * p)) < 0.01
    kept = TransformerTask.start_of(_task(3, 1, p), batch, drop=False)
    assert torch.equal(kept, VOCAB.__class__(CODES, 3, 1, BINS).prefix(batch["label"] + CODES + 1,
                                                                       batch["covariates"], torch.ones(b, 1)))
    assert torch.equal(out[~class_null, 0], kept[~class_null, 0]) and torch.equal(out[~cov_null, 1], kept[~cov_null, 1])
    # one covariate alone: only its own drop; the start token is always the begin-of-sequence token
    only = TransformerTask.start_of(_task(0, 1, p), {"covariates": batch["covariates"]}, drop=True)
    assert (only[:, 0] == CODES).all() and abs((only[:, 1] == CODES + 1 + BINS).float().mean() - p) < 0.01


def test_a_class_only_model_draws_its_drops_exactly_as_before():
    labels = torch.randint(0, 3, (1000,))
    torch.manual_seed(7)
    out = TransformerTask.start_of(_task(3, 0, 0.3), {"label": labels}, drop=True)
    torch.manual_seed(7)  # the earlier code: one uniform per row, the null where it is below p
    before = torch.where(torch.rand(labels.shape) < 0.3, torch.full_like(labels, CODES), labels + CODES + 1)
    assert torch.equal(out, before)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("prior, message", [
    ({"covariate_bins": 1}, "prior.covariate_bins must be an integer >= 2, got 1"),
    ({"covariates": ["n", "n"]}, "prior.covariates must be distinct column names"),
    ({"covariates": ["n"]}, "prior.covariates names columns of data.labels_file; set data.labels_file"),
])
def test_covariate_options_are_checked_in_one_line(tmp_path, capsys, prior, message):
    cfg = tiny_config_dict(tmp_path, tmp_path)
    cfg["prior"].update(prior)
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, message)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def cov_run(tmp_path_factory, trained_stage1):
    """Three density levels and a 1-epoch token prior on their classes and n_filaments (8 bins)."""
    root = tmp_path_factory.mktemp("token_cov")
    cfg = labelled_config(root, trained_stage1["best"], "prior", num_val=3)
    cfg["prior"].update(covariates=["n_filaments"], covariate_bins=8)
    cfg["prior"]["logging"]["num_visualize_samples"] = 2
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-prior", "--config", cfg_path) == 0
    out = Path(cfg["prior"]["checkpoints"]["output_dir"])
    return {"root": root, "config": cfg, "config_path": cfg_path, "best": out / "best_model.pt",
            "latest": out / "latest_checkpoint.pt"}


def test_training_records_the_covariates_ranges_and_bins(cov_run):
    ckpt = load_checkpoint(cov_run["best"], kind="prior", what="test")
    assert ckpt["classes"] == ["level0", "level1", "level2"] and ckpt["covariate_bins"] == 8
    (lo, hi), = ckpt["covariates"].values()
    assert list(ckpt["covariates"]) == ["n_filaments"] and lo < hi
    assert ckpt["network"]["num_tokens"] == 16 + 1 + 3 + 9 and ckpt["network"]["max_seq_len"] == 512 + 1
    assert ckpt["state_dict"]["token_embeddings.weight"].shape[0] == 29


def test_sample_prefills_the_covariates_and_records_them(cov_run, tmp_path, caplog):
    ckpt = load_checkpoint(cov_run["best"], kind="prior", what="test")
    lo, hi = ckpt["covariates"]["n_filaments"]
    base = ["--quiet", "sample", "--config", cov_run["config_path"], "--prior", "transformer", "-n", 2, "--batch-size",
            2]
    assert run_cli(*base, "--out", tmp_path / "a", "--cond", f"n_filaments={hi}", "--class", "level1",
                   "--guidance", 2) == 0
    rec = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rec["covariates"] == {"asked": {"n_filaments": hi}, "training_range": {"n_filaments": [lo, hi]}}
    assert rec["covariate_bins"] == 8 and rec["class"] == "level1" and rec["guidance"] == 2.0
    assert rec["conditions"]["sample_0001"] == {"class": "level1", "covariates": {"n_filaments": hi}, "guidance": 2.0}
    with caplog.at_level(logging.WARNING, logger="vqldm"):  # --cond alone may guide; outside the range: a warning
        assert run_cli(*base, "--out", tmp_path / "b", "--cond", f"n_filaments={hi + 10}", "--guidance", 3) == 0
    assert "outside the training range" in caplog.text


def test_api_guidance_zero_is_the_fully_null_stream_and_one_the_conditional(cov_run):
    import vqldm

    model = vqldm.load_model(cov_run["config_path"], prior="transformer", device="cpu")
    null = model.sample(2, seed=4).volumes
    assert np.array_equal(model.sample(2, seed=4, cond={"n_filaments": 5.0}, class_name="level2",
                                      guidance=0.0).volumes, null)
    one = model.sample(2, seed=4, cond={"n_filaments": 5.0}).volumes
    pipe = model.pipeline
    pipe.set_covariates({"n_filaments": 5.0})
    pipe.set_class(None)
    assert pipe.start.tolist() == [[16, 16 + 1 + 3 + 0]]  # the null class, the lowest bin (5 is near the minimum)
    assert torch.equal(pipe.codes([0, 1], 4), pipe.codes([0, 1], 4, cached=False))
    assert one.shape == null.shape and np.isfinite(one).all()
    with pytest.raises(VqldmError, match="--cond thickness: unknown covariate; this model knows n_filaments"):
        model.sample(1, cond={"thickness": 1.0})


def test_refusals_are_one_line(cov_run, tmp_path, capsys):
    base = ["sample", "--config", cov_run["config_path"], "--prior", "transformer", "-n", 1]
    rc, _, err = cli(capsys, *base, "--cond", "thickness=2", "--out", tmp_path / "a")
    assert_clean_error(rc, err, "--cond thickness: unknown covariate; this model knows n_filaments")
    rc, _, err = cli(capsys, *base, "--guidance", 2, "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--guidance needs --class or --cond")
    cfg = json.loads(json.dumps(cov_run["config"]))
    cfg["prior"]["covariates"] = ["foreground_fraction"]
    cfg["prior"]["checkpoints"].update(output_dir=str(tmp_path / "out"), resume_from=str(cov_run["latest"]))
    cfg["prior"]["training"]["n_epochs"] = 2
    rc, _, err = cli(capsys, "train-prior", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, "was trained with covariates {'n_filaments'", "prior.covariates")
    cfg["prior"]["covariates"] = ["thickness"]
    rc, _, err = cli(capsys, "train-prior", "--config", write_config(tmp_path / "d.yaml", cfg))
    assert_clean_error(rc, err, "prior.covariates: 'thickness' is not a numeric column")


def test_score_reads_the_null_prefix_unless_given_another(cov_run):
    from vqldm.commands.score import token_nll_grid
    from vqldm.config import load_config
    from vqldm.data.io import list_volumes, read_volume
    from vqldm.priors.transformer.pipeline import load_token_pipeline

    pipe = load_token_pipeline(load_config(cov_run["config_path"], announce=False))
    vol = read_volume(list_volumes(cov_run["root"] / "data" / "val")[0]).array
    null = token_nll_grid(pipe, vol)
    assert pipe.null_start.tolist() == [[16, 16 + 1 + 3 + 8]]  # the null class, the covariate's null
    assert torch.equal(null, token_nll_grid(pipe, vol, pipe.null_start))
    pipe.set_covariates({"n_filaments": 30.0})
    asked = token_nll_grid(pipe, vol, pipe.start)
    assert asked.shape == null.shape == (8, 8, 8) and not torch.equal(asked, null)
