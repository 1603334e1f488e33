"""The Python API (docs/api.md): its examples run as written, and it gives what the CLI gives."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vqldm
from vqldm.data.io import list_volumes, read_volume

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.S)


def test_the_docs_examples_run_in_order(tmp_path, monkeypatch):
    blocks = doc_blocks()
    assert len(blocks) >= 3
    notebook = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(notebook) < 20, "the notebook-style example must stay under 20 lines"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), ns)
    s = ns["samples"]
    assert s.volumes.shape == (3, 32, 32, 32) and s.volumes.dtype == np.float32
    real = read_volume(list_volumes(tmp_path / "data" / "synth_tiny" / "train")[0])
    assert np.allclose(s.spacing, real.spacing) and s.unit == real.unit == "micron"
    assert 0.0 <= s.volumes.min() and s.volumes.max() <= 1.0
    # the checkpoint loaded into plain MONAI decodes the latent like vqldm
    z = ns["latent"][None]
    with torch.no_grad():
        plain = ns["vqvae"].decode(z)
        ours = ns["ae"].network.decode(z)
    assert torch.equal(plain, ours)


def test_sample_equals_the_cli(tmp_path, trained_stage2, capsys):
    model = vqldm.load_model(trained_stage2["config_path"], device="cpu")
    s = model.sample(3, seed=5, steps=3, batch_size=2)
    assert run_cli("--quiet", "sample", "--config", trained_stage2["config_path"], "--num-samples", 3, "--seed", 5,
                   "--steps", 3, "--batch-size", 2, "--out", tmp_path / "cli") == 0
    files = list_volumes(tmp_path / "cli")
    assert len(files) == 3
    for f, v in zip(files, s.volumes):
        r = read_volume(f)
        assert np.array_equal(r.array, v)
        assert list(r.spacing) == list(s.spacing)
    assert model.spacing == tuple(s.spacing) and model.unit == s.unit
    written = s.save(tmp_path / "api")
    assert np.array_equal(read_volume(written[1]).array, s.volumes[1])


def test_token_prior_and_config_object(tmp_path, trained_stage1, data_dir):
    cfg = vqldm.load_config(trained_stage1["config_path"],
                            overrides=[f"prior.checkpoints.vqvae_path={trained_stage1['best']}",
                                       f"prior.checkpoints.output_dir={tmp_path / 'prior'}",
                                       f"prior.logging.log_dir={tmp_path / 'prior_logs'}"])
    res = vqldm.train(cfg, "prior")
    assert res.best_path.is_file() and res.epochs == 1
    model = vqldm.load_model(cfg, prior="transformer", device="cpu")
    a, b = model.sample(2, seed=1, top_k=4), model.sample(2, seed=1, top_k=4)
    assert a.volumes.shape == (2, 32, 32, 32) and np.array_equal(a.volumes, b.volumes)


@pytest.mark.parametrize("call, words", [
    (lambda: vqldm.load_model(prior="gan"), "prior 'gan'"),
    (lambda: vqldm.load_model(device="tpu"), "device 'tpu'"),
    (lambda: vqldm.train({}, "stage3"), "stage 'stage3'"),
    (lambda: vqldm.load_config({"vqvae": {"trainig": {}}}), "vqvae.trainig"),
    (lambda: vqldm.load_autoencoder("nowhere.pt"), "nowhere.pt"),
])
def test_bad_arguments_raise_one_line_errors(call, words):
    with pytest.raises(vqldm.VqldmError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_autoencoder_refuses_a_shape_it_cannot_encode(trained_stage1):
    ae = vqldm.load_autoencoder(trained_stage1["best"])
    with pytest.raises(vqldm.VqldmError, match=r"shape \[30, 32, 32\]"):
        ae.encode(np.zeros((30, 32, 32), np.float32))
