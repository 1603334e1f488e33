"""``vqldm import-checkpoint`` (issue 16): checkpoints of the upstream scripts become vqldm's, give the
same outputs as the original networks, and sample with ``vqldm sample``; bad files are one line.

The upstream-format files are written from the real GenerativeModels-era classes where the optional
``monai-generative`` package is installed (the ``test`` extra installs it); without it they are built
from MONAI core's networks in the documented old key layout (the VQ-VAE's is MONAI's own; the UNet's
attention layers are ``to_q/to_k/to_v/proj_attn`` and its upsampler's ``postconv`` is ``conv``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from vqldm.autoencoder.model import build_vqvae
from vqldm.checkpoint import file_sha256, load_checkpoint
from vqldm.priors.diffusion.unet import build_unet

from conftest import run_cli

with warnings.catch_warnings():  # the old package's deprecated autocast decorators
    warnings.simplefilter("ignore")
    try:
        from generative.networks.nets import DiffusionModelUNet as OldUNet
        from generative.networks.nets import VQVAE as OldVQVAE

        REAL_OLD_CLASSES = True
    except ImportError:
        REAL_OLD_CLASSES = False

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "vq_ldm_config_local.yaml"
TOL = 1e-5
VQ = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_channels=16, num_res_layers=1,
          downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)), upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
          num_embeddings=16, embedding_dim=4, act="RELU", output_act="RELU")  # as the upstream scripts build it
UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, attention_levels=(False, True), num_head_channels=(0, 32),
            num_res_blocks=1)  # num_res_blocks: train_diffusion.py's value where its config has none
CHANNELS = {"vqvae": (8, 16), "unet": (32, 64)}


class Smuggled:
    """Stands for any pickled object: a weights-only load must refuse it."""


def _old_layout(state: dict) -> dict:
    """MONAI core's UNet state dict in the GenerativeModels layout (the inverse of load_old_state_dict)."""
    out = {}
    for k, v in state.items():
        k = k.replace(".attn.out_proj.", ".proj_attn.").replace("postconv", "conv")
        for p in ("to_q", "to_k", "to_v"):
            k = k.replace(f".attn.{p}.", f".{p}.")
        out[k] = v
    return out


def original_networks():
    """(VQ-VAE, UNet, their state dicts as the upstream scripts saved them), in eval mode."""
    torch.manual_seed(7)
    if REAL_OLD_CLASSES:
        vq = OldVQVAE(num_channels=CHANNELS["vqvae"], **VQ)
        unet = OldUNet(num_channels=CHANNELS["unet"], **UNET)
        return vq.eval(), unet.eval(), vq.state_dict(), unet.state_dict()
    from monai.networks.nets import VQVAE, DiffusionModelUNet

    vq = VQVAE(channels=CHANNELS["vqvae"], **VQ)
    unet = DiffusionModelUNet(channels=CHANNELS["unet"], **UNET)
    return vq.eval(), unet.eval(), vq.state_dict(), _old_layout(unet.state_dict())


def upstream_config(tmp_path: Path, data_dir: Path) -> Path:
    """The VQ-LDM fixture with this test's network sizes (num_res_blocks absent, as train_diffusion.py allows)."""
    cfg = yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))
    cfg["data"].update(train_data_dir=str(data_dir / "train"), val_data_dir=str(data_dir / "val"),
                       voxel_size=[32, 32, 16], num_workers=0)
    v = cfg["vqvae"]
    v.update(num_channels=list(CHANNELS["vqvae"]), num_res_channels=16, num_res_layers=1, num_embeddings=16,
             embedding_dim=4, downsample_parameters=[[2, 4, 1, 1]] * 2, upsample_parameters=[[2, 4, 1, 1, 0]] * 2)
    u = cfg["diffusion"]
    u.update(in_channels=4, out_channels=4, num_channels=list(CHANNELS["unet"]), num_head_channels=[0, 32])
    u.pop("num_res_blocks")
    u["logging"]["num_inference_steps"] = 3
    path = tmp_path / "upstream.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def upstream_pair(tmp_path, data_dir):
    vq, unet, vq_state, unet_state = original_networks()
    a, b = tmp_path / "A.pt", tmp_path / "B.pt"
    torch.save({"epoch": 41, "vqvae_state_dict": vq_state,
                "optimizer_state_dict": torch.optim.Adam(vq.parameters()).state_dict(), "best_val_loss": 0.25}, a)
    torch.save({"epoch": 99, "unet_state_dict": unet_state,
                "optimizer_state_dict": torch.optim.Adam(unet.parameters()).state_dict(),
                "scale_factor": 1.7, "best_val_loss": 0.5}, b)
    return {"vq": vq, "unet": unet, "a": a, "b": b, "config": upstream_config(tmp_path, data_dir),
            "out": tmp_path / "imported"}


def _import(pair, *extra, a=None, b=None) -> int:
    args = ["--quiet", "import-checkpoint", "--config", pair["config"], "--vqvae-checkpoint", a or pair["a"],
            "--out", pair["out"], *extra]
    b = pair["b"] if b is None else b
    if b:
        args += ["--diffusion-checkpoint", b]
    return run_cli(*args)


def max_abs_diffs(pair) -> dict[str, float]:
    """Imported (rebuilt from the vqldm checkpoints alone) vs original networks on fixed test inputs."""
    vq_ckpt = load_checkpoint(pair["out"] / "vqvae_checkpoints" / "best_model.pt", kind="vqvae")
    diff_ckpt = load_checkpoint(pair["out"] / "diffusion_checkpoints" / "best_model.pt", kind="diffusion")
    vq = build_vqvae(vq_ckpt["network"])
    vq.load_state_dict(vq_ckpt["state_dict"])
    unet = build_unet(diff_ckpt["network"])
    unet.load_state_dict(diff_ckpt["state_dict"])
    vq.eval(), unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 16, generator=g)
    z = torch.randn(2, 4, 8, 8, 4, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        old_vq, new_vq = pair["vq"], vq
        return {
            "vqvae_latent": (old_vq.encode_stage_2_inputs(x) - new_vq.encode_stage_2_inputs(x)).abs().max().item(),
            "vqvae_reconstruction": (old_vq(x)[0] - new_vq(x)[0]).abs().max().item(),
            "vqvae_decode": (old_vq.decode_stage_2_outputs(z) - new_vq.decode_stage_2_outputs(z)).abs().max().item(),
            "unet": (pair["unet"](x=z, timesteps=t) - unet(x=z, timesteps=t)).abs().max().item(),
        }


def test_imported_pair_gives_the_original_outputs(upstream_pair, capsys):
    assert _import(upstream_pair) == 0, capsys.readouterr().err
    diffs = max_abs_diffs(upstream_pair)
    print(f"max abs diff (real old classes: {REAL_OLD_CLASSES}):", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    out = upstream_pair["out"]
    vq_ckpt = load_checkpoint(out / "vqvae_checkpoints" / "best_model.pt", kind="vqvae")
    assert vq_ckpt["network"]["act"] == vq_ckpt["network"]["output_act"] == "RELU"
    assert vq_ckpt["epoch"] == 41 and vq_ckpt["imported_from"]["script"] == "train_vqvae.py"
    diff_ckpt = load_checkpoint(out / "diffusion_checkpoints" / "best_model.pt", kind="diffusion")
    assert diff_ckpt["scale_factor"] == pytest.approx(1.7) and diff_ckpt["network"]["num_res_blocks"] == 1
    assert diff_ckpt["vqvae_sha256"] == file_sha256(out / "vqvae_checkpoints" / "best_model.pt")
    assert diff_ckpt["scheduler"]["type"] == "ddpm" and diff_ckpt["scheduler"]["prediction_type"] == "epsilon"
    written = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert written["vqvae"]["output_act"] == "RELU" and "voxel_size" not in written["data"]


def test_imported_pair_samples_with_the_written_config(upstream_pair, tmp_path, capsys):
    assert _import(upstream_pair) == 0
    capsys.readouterr()
    rc = run_cli("--quiet", "sample", "--config", upstream_pair["out"] / "config.yaml", "-n", "2", "--steps", "2",
                 "--out", tmp_path / "samples")
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "samples" / "sample_0001.nii.gz").is_file()


def test_stage1_alone_imports(upstream_pair):
    assert _import(upstream_pair, b="") == 0
    assert (upstream_pair["out"] / "vqvae_checkpoints" / "best_model.pt").is_file()
    assert not (upstream_pair["out"] / "diffusion_checkpoints").exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("vqldm: upstream key")]
    assert len(lines) == 1, err
    return lines[0]


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def bad_file(name: str, pair: dict, tmp: Path) -> tuple[str, Path, str]:
    """(which file it replaces, the bad file, what its one-line error must say)."""
    if name == "garbage":
        (tmp / "x.pt").write_bytes(b"not a checkpoint")
        return "a", tmp / "x.pt", "not a readable checkpoint"
    made = {
        "smuggled_object": ("a", {"vqvae_state_dict": Smuggled()}, "refused for safety"),
        "vqldm_checkpoint": ("a", {"vqldm_checkpoint": 1}, "already a vqldm checkpoint"),
        "conditional": ("b", {"model_state_dict": {}}, "conditional"),
        "no_unet": ("b", {"epoch": 1}, "no unet_state_dict"),
        "bad_scale": ("b", {**torch.load(pair["b"]), "scale_factor": -1.0}, "scale_factor"),
    }
    which, obj, must = made[name]
    return which, _save(tmp / f"{name}.pt", obj), must


BAD = ["garbage", "smuggled_object", "vqldm_checkpoint", "conditional", "no_unet", "bad_scale"]


@pytest.mark.parametrize("name", BAD)
def test_bad_upstream_file_is_one_line(name, upstream_pair, tmp_path, capsys):
    which, bad, must = bad_file(name, upstream_pair, tmp_path)
    rc = _import(upstream_pair, **{which: bad})
    assert rc != 0
    line = _one_line_error(capsys)
    assert str(bad) in line and must in line, line
    assert ("--vqvae-checkpoint" if which == "a" else "--diffusion-checkpoint") in line
    assert not upstream_pair["out"].exists()  # nothing written


@pytest.mark.parametrize("key,value,flag", [("vqvae.embedding_dim", 8, "--vqvae-checkpoint"),
                                            ("diffusion.num_res_blocks", 2, "--diffusion-checkpoint")])
def test_config_that_does_not_describe_the_network_is_one_line(key, value, flag, upstream_pair, capsys):
    extra = ["--set", f"{key}={value}"]
    if key == "vqvae.embedding_dim":
        extra += ["--set", "diffusion.in_channels=8", "--set", "diffusion.out_channels=8"]
    assert _import(upstream_pair, *extra) != 0
    line = _one_line_error(capsys)
    assert flag in line and str(upstream_pair["a" if flag == "--vqvae-checkpoint" else "b"]) in line
    assert not upstream_pair["out"].exists()


def test_existing_import_needs_overwrite(upstream_pair, capsys):
    assert _import(upstream_pair) == 0
    capsys.readouterr()
    assert _import(upstream_pair) != 0
    assert "--overwrite" in _one_line_error(capsys)
    assert _import(upstream_pair, "--overwrite") == 0
    assert list((upstream_pair["out"] / "vqvae_checkpoints").glob("previous_*/best_model.pt"))
