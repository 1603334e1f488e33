"""The typed configuration: the original VQ-LDM README's YAML schema, parsed once and validated.

A YAML file written for the original ``train_vqvae.py`` / ``train_diffusion.py`` scripts loads: keys
of theirs that vqldm names differently or has no behaviour for are translated first, each with a note
(:mod:`vqldm.upstream`; the notes travel as ``Config.migration``). vqldm adds keys of its own (codebook health, speed switches, sampling); every key has a
default, so none is required. ``load_config`` is the single entry point: it merges ``--set``
overrides, converts every section into a frozen dataclass (read-only once loaded), and runs the cross-field
checks, raising :class:`~vqldm.errors.VqldmError` with the dotted key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vqldm.errors import VqldmError
from vqldm.upstream import Note, known_names, translate

log = logging.getLogger("vqldm")

# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    use_cuda: bool = True  # use the GPU when one is present
    gpu_id: int = 0  # CUDA device index (ignored under torchrun: LOCAL_RANK decides)
    mixed_precision: bool = True  # AMP on CUDA: bf16 where supported, else fp16 + GradScaler
    cpu_bf16: bool = False  # bf16 autocast on a CPU with native bf16 (AVX-512 BF16 or AMX); fp32 on other CPUs
    channels_last: bool = True  # channels_last_3d memory format on CUDA (faster 3D convolutions)
    compile: bool = False  # torch.compile the networks on CUDA (never on CPU) for fused kernels; slow first minute
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels for fixed shapes
    cuda_graphs: bool = True  # record each training step (optimizer and EMA included) and the sampling UNet call once as CUDA graphs, then replay them (CUDA, single process, bf16/fp32)


NORMALIZE_METHODS = ("auto", "per_volume", "fixed")


@dataclass(frozen=True)
class DataConfig:
    train_data_dir: str = "data/microtubules/nifti/train"
    val_data_dir: str = "data/microtubules/nifti/val"
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])  # voxels (X, Y, Z)
    batch_size: int = 4  # default for both stages unless a stage's training.batch_size is set
    voxel_resize: list[int] | None = None  # resize every volume to this grid first (voxels)
    resample_spacing: list[float] | None = None  # resample every volume to this voxel size first (files' unit)
    cache_rate: float = 1.0  # fraction of loaded, normalised volumes kept in memory
    num_workers: int = 4  # DataLoader worker processes (0: load in the main process)
    augmentation: bool = True  # random flips and in-plane rot90 of training patches
    intensity_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [0,1] or [-1,1]
    clip_percentiles: list[float] | None = None  # e.g. [0.5, 99.9]: clip before scaling
    normalize: str = "auto"  # per_volume (min-max each volume), fixed (keep intensities, clip to [0,1]) or auto
    foreground_threshold: float = 0.1  # in [0,1] intensity units: what counts as filament
    foreground_crop_ratio: float = 0.75  # fraction of training patches centred on foreground
    patches_per_volume: int = 4  # random patches drawn from each volume per epoch
    max_val_patches: int = 64  # validation tiles kept (evenly chosen) across the val set
    skip_unreadable: bool = False  # skip corrupt files with a warning instead of stopping
    max_train_volumes: int | None = None  # use only the first N training volumes (by name); null: all
    max_val_volumes: int | None = None  # use only the first N validation volumes (by name); null: all
    labels_file: str | None = None  # class labels (CSV file,label or JSON {file: label}) and covariate columns
    class_folders: bool = False  # the data folders hold one subfolder per class (train/<class>/x.nii.gz)


@dataclass(frozen=True)
class WeightedLossConfig:
    foreground_weight: float = 100.0  # weight of voxels above threshold (sparse filaments)
    background_weight: float = 0.5
    threshold: float = 0.1  # in [0,1] intensity units
    base: str = "l1"  # l1 or mse


@dataclass(frozen=True)
class DiceLossConfig:
    smooth: float = 1e-5
    threshold: float = 0.1  # in [0,1] intensity units; the soft mask reaches 1 here


@dataclass(frozen=True)
class CombinedLossConfig:
    dice_weight: float = 1.0
    weighted_weight: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    reconstruction_loss_type: str = "combined"  # l1 | mse | weighted | dice | combined
    weighted: WeightedLossConfig = field(default_factory=WeightedLossConfig)
    dice: DiceLossConfig = field(default_factory=DiceLossConfig)
    combined: CombinedLossConfig = field(default_factory=CombinedLossConfig)
    quantization_weight: float = 1.0  # multiplies the VQ commitment loss


@dataclass(frozen=True)
class AdversarialConfig:
    enabled: bool = False  # VQ-GAN: add MONAI PatchDiscriminator + PatchAdversarialLoss
    weight: float = 0.01
    warmup_epochs: int = 5  # epochs of pure reconstruction before the adversarial term starts
    num_channels: int = 32
    num_layers: int = 3
    learning_rate: float = 1e-4


@dataclass(frozen=True)
class TrainingConfig:
    n_epochs: int = 100
    batch_size: int | None = None  # overrides data.batch_size for this stage
    learning_rate: float | None = None  # overrides the stage-level learning_rate
    val_interval: int = 1  # epochs between validations
    save_interval: int = 1  # epochs between latest_checkpoint.pt writes
    fast_dev_run: bool = False  # one epoch of fast_dev_run_batches batches: a smoke test
    fast_dev_run_batches: int = 2
    loss: LossConfig = field(default_factory=LossConfig)
    grad_clip_norm: float | None = 1.0  # max global gradient norm (null: no clipping)
    weight_decay: float = 0.0
    ema: bool = False  # keep an EMA of the weights (used for validation, best_model.pt)
    ema_decay: float = 0.999
    skip_nonfinite: bool = False  # skip batches with a NaN/inf loss instead of stopping
    lr_schedule: str = "constant"  # constant | cosine | linear: the learning rate after the warm-up
    warmup_steps: int = 0  # optimizer steps of linear warm-up from lr/warmup_steps to lr
    grad_accumulation_steps: int = 1  # micro-batches whose gradients add up to one optimizer step
    save_interval_steps: int | None = None  # also write latest_checkpoint.pt every this many optimizer steps
    max_steps: int | None = None  # stop (after writing latest_checkpoint.pt) once this many optimizer steps are done
    max_time_minutes: float | None = None  # stop (after writing latest_checkpoint.pt) once this run has trained this long
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str = ""
    resume_from: str | None = None  # a latest_checkpoint.pt, or latest: output_dir's own (start afresh if none)
    vqvae_path: str | None = None  # stage 2 only: the stage-1 checkpoint


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str = ""
    log_interval: int = 10  # optimizer steps between step-level scalars
    visualize_interval: int = 5  # epochs between MIP images
    num_visualize_samples: int = 2
    num_inference_steps: int = 50  # stage 2: DDIM steps for the generated preview


@dataclass(frozen=True)
class CodebookConfig:
    init: str = "data"  # normal | kaiming_uniform | data (seeded from the first encoder outputs)
    decay: float = 0.9  # EMA decay of the codebook (MONAI's default is 0.5)
    commitment_cost: float = 0.25
    dead_code_restart: bool = True  # re-seed codes unused over restart_window_steps
    restart_window_steps: int = 50
    restart_threshold: float = 1.0  # codes used fewer times than this in the window are dead


@dataclass(frozen=True)
class VQVAEConfig:
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    num_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    num_res_channels: list[int] | int = 256
    num_res_layers: int = 2
    num_embeddings: int = 256
    embedding_dim: int = 32
    # one stride-2 level per num_channels entry unless given: [stride, kernel, dilation, padding]
    downsample_parameters: list[list[int]] | None = None
    # [stride, kernel, dilation, padding, output_padding]
    upsample_parameters: list[list[int]] | None = None
    dropout: float = 0.0
    act: str = "RELU"
    output_act: str | None = None
    learning_rate: float = 1e-4
    # after training, fit a monotone map of decoded onto real training intensities (quantile matching),
    # stored in the checkpoints and applied wherever decoded volumes become intensities
    intensity_calibration: bool = False
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoints: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(output_dir="outputs/vq_ldm/vqvae_checkpoints")
    )
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_dir="outputs/vq_ldm/vqvae_logs"))


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "ddpm"  # ddpm (DDPM/DDIM sampling) | rflow (rectified flow)
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"  # epsilon | v_prediction (ddpm only)
    timestep_bias: float = 0.0  # training: timesteps drawn with density ~ t^bias (0: uniform; > 0: more noisy, layout steps)
    timestep_bias_epochs: int | None = None  # training: only the first N epochs draw with the bias, later ones uniformly (null: all)


@dataclass(frozen=True)
class AutoguidanceConfig:
    """Autoguidance (Karras et al., 2024): sampling extrapolates from an early snapshot of the same run."""

    guide_epoch: int = 0  # training: save the EMA weights at this epoch as guide_model.pt (0: no guide)
    weight: float = 1.0  # sampling: guide + weight (model - guide); 1 is plain sampling
    min_timestep: int = 0  # sampling: guide only at timesteps t >= this (the noisiest part of the chain)
    rescale: float = 0.0  # sampling: pull the guided output's per-sample std back towards the model's (0: off; 1: fully)


@dataclass(frozen=True)
class DiffusionConfig:
    spatial_dims: int = 3
    in_channels: int = 32
    out_channels: int = 32
    num_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True, True])
    num_head_channels: list[int] | int = field(default_factory=lambda: [0, 0, 32, 32])
    num_res_blocks: int | list[int] = 2
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000  # the original README's copy; must equal scheduler.num_train_timesteps
    learning_rate: float = 1e-4
    scale_factor: float | None = None  # null: 1/std of the latents, measured
    scale_factor_batches: int = 16  # training batches over which the latent std is measured
    latent_norm: str = "global"  # global: one 1/std (scale_factor) for all channels | channel: per-channel mean and 1/std
    latent_cache: bool = True  # encode the training set once when augmentation is off
    sampler: str | None = None  # sampling: ddim | ddpm | dpmpp_2m | rflow (null: ddim for a DDPM-trained model, rflow for rflow)
    snap_to_codebook: bool = True  # sampling: quantise the denoised latent before decoding
    clip_to_codebook_range: bool = True  # sampling: bound each predicted clean latent by the codebook's range
    # sampling: latent cells (x, y, z) denoised beyond each face and cropped off, so the kept edge cells see
    # the field go on as real volumes' edges do (docs/quality.md, round 12)
    sampling_margin: list[int] = field(default_factory=lambda: [0, 0, 0])
    # with classes, covariates or coarse_condition: the share of each training condition dropped to its null
    condition_drop_prob: float = 0.15
    coarse_condition: bool = False  # coarse-to-fine: condition on the volume's block means over the latent grid
    coarse_view: str = "volume"  # with coarse_condition: volume (3D block means) | projection (their mean along z)
    covariates: list[str] = field(default_factory=list)  # numeric columns of data.labels_file: cross-attention context
    self_condition: bool = False  # the UNet also sees its own clean-latent estimate (Chen et al., 2022)
    self_condition_min_timestep: int = 0  # with self_condition: feed the estimate only at t >= this (zeros below)
    autoguidance: AutoguidanceConfig = field(default_factory=AutoguidanceConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(ema=True, n_epochs=300))
    checkpoints: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(
            output_dir="outputs/vq_ldm/diffusion_checkpoints",
            vqvae_path="outputs/vq_ldm/vqvae_checkpoints/best_model.pt",
        )
    )
    logging: LoggingConfig = field(
        default_factory=lambda: LoggingConfig(log_dir="outputs/vq_ldm/diffusion_logs")
    )


@dataclass(frozen=True)
class PriorConfig:
    """The token prior: an autoregressive transformer (MONAI ``DecoderOnlyTransformer``) on the code indices."""

    ordering: str = "raster_scan"  # raster_scan | s_curve | random: the order in which tokens are generated
    attn_layers_dim: int = 256
    attn_layers_depth: int = 8
    attn_layers_heads: int = 8
    embedding_dropout_rate: float = 0.0
    learning_rate: float = 5e-4
    temperature: float = 1.0  # sampling: logits are divided by this (lower: more conservative samples)
    top_k: int | None = None  # sampling: keep the k likeliest codes (null: all)
    top_p: float | None = None  # sampling: keep the smallest set of codes holding this probability (null: all)
    # data.labels_file: the share of each training condition (class, covariate) dropped to its null token
    condition_drop_prob: float = 0.15
    covariates: list[str] = field(default_factory=list)  # numeric columns of data.labels_file: prepended tokens
    covariate_bins: int = 16  # with covariates: each one's normalised value is quantised to one of this many tokens
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(ema=True, n_epochs=100))
    checkpoints: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(
            output_dir="outputs/vq_ldm/prior_checkpoints",
            vqvae_path="outputs/vq_ldm/vqvae_checkpoints/best_model.pt",
        )
    )
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_dir="outputs/vq_ldm/prior_logs"))


@dataclass(frozen=True)
class Config:
    seed: int = 42
    device: DeviceConfig = field(default_factory=DeviceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    source: str | None = None  # the YAML file this came from (not a YAML key)
    migration: tuple[Note, ...] = ()  # what happened to each upstream-script key in it (not a YAML key)

    # ---- resolved values (the stage's training section overrides the shared ones) ----
    def batch_size(self, stage: str) -> int:
        t = self._stage(stage).training
        return t.batch_size if t.batch_size is not None else self.data.batch_size

    def learning_rate(self, stage: str) -> float:
        s = self._stage(stage)
        return s.training.learning_rate if s.training.learning_rate is not None else s.learning_rate

    def _stage(self, stage: str) -> VQVAEConfig | DiffusionConfig | PriorConfig:
        return {"vqvae": self.vqvae, "diffusion": self.diffusion, "prior": self.prior}[stage]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in _NON_KEYS:
            d.pop(k)
        return d

    def to_yaml(self) -> str:
        """The whole resolved config as YAML in vqldm's own keys (loads back to an equal config)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# parsing: dict -> dataclasses, with the key named in every error
# --------------------------------------------------------------------------------------------

_NON_KEYS = ("source", "migration")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except VqldmError:
                continue
        raise VqldmError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise VqldmError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise VqldmError(f"{key}: expected a mapping of keys, got {value!r}")
        return _from_dict(tp, value, key, default)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise VqldmError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise VqldmError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise VqldmError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise VqldmError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in the schema, not user input


def _from_dict(cls: type, data: dict, prefix: str = "", default: Any = None) -> Any:
    """``data`` over ``default`` (a section's own default, e.g. a stage-specific output_dir), else
    over ``cls()``: keys absent from ``data`` keep the default's values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _NON_KEYS]
    base = default if default is not None else cls()
    kwargs = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names + list(known_names(prefix)), n=1, cutoff=0.6)
            hint = f": did you mean '{close[0]}'?" if close else f" (valid keys: {', '.join(names)})"
            raise VqldmError(f"unknown config key '{dotted}'{hint}")
        kwargs[k] = _convert(v, hints[k], dotted, getattr(base, k))
    return dataclasses.replace(base, **kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise VqldmError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise VqldmError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise VqldmError(f"--set {key}: cannot parse value {raw!r} ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise VqldmError(f"--set {'.'.join(parts)}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VqldmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise VqldmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VqldmError(f"{path}: the top level must be a mapping of keys")
    return data


def config_from_dict(data: dict, source: str | None = None) -> Config:
    """Translate upstream-script keys, parse and validate: the result is read-only (its sections are
    frozen dataclasses) and carries the translation notes as ``migration``."""
    data, notes = translate(data)
    cfg = dataclasses.replace(_from_dict(Config, data), source=source, migration=tuple(notes))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None, announce: bool = True) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``--set``, validate.

    With ``announce``, each upstream-key note is logged once (info: translated; warning: no effect).
    The data folders are checked where they are read (:func:`vqldm.data.io.check_data_dirs`).
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = config_from_dict(data, source=str(path) if path else None)
    if announce:
        for note in cfg.migration:
            (log.warning if note.level == "warning" else log.info)("upstream key %s", note)
    return cfg


# --------------------------------------------------------------------------------------------
# derived shapes and cross-field validation
# --------------------------------------------------------------------------------------------


def downsample_parameters(v: VQVAEConfig) -> list[list[int]]:
    if v.downsample_parameters is not None:
        return v.downsample_parameters
    return [[2, 4, 1, 1] for _ in v.num_channels]


def upsample_parameters(v: VQVAEConfig) -> list[list[int]]:
    if v.upsample_parameters is not None:
        return v.upsample_parameters
    return [[2, 4, 1, 1, 0] for _ in v.num_channels]


def _conv_out(n: int, stride: int, kernel: int, dilation: int, padding: int) -> int:
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _convt_out(n: int, stride: int, kernel: int, dilation: int, padding: int, out_pad: int) -> int:
    if stride == 1:  # MONAI builds stride-1 upsampling layers as plain convolutions
        return _conv_out(n, 1, kernel, dilation, padding)
    return (n - 1) * stride - 2 * padding + dilation * (kernel - 1) + out_pad + 1


def latent_spatial(v: VQVAEConfig, patch: list[int]) -> list[int]:
    out = list(patch)
    for s, k, d, p in downsample_parameters(v):
        out = [_conv_out(n, s, k, d, p) for n in out]
    return out


def decoded_spatial(v: VQVAEConfig, latent: list[int]) -> list[int]:
    out = list(latent)
    for s, k, d, p, op in upsample_parameters(v):
        out = [_convt_out(n, s, k, d, p, op) for n in out]
    return out


def latent_shape(cfg: Config, patch: list[int] | None = None) -> list[int]:
    """Channels first: [embedding_dim, x, y, z] for ``patch`` (default: data.patch_size)."""
    return [cfg.vqvae.embedding_dim] + latent_spatial(cfg.vqvae, patch or cfg.data.patch_size)


def check_latent_for_unet(num_levels: int, spatial: list[int], what: str) -> None:
    factor = 2 ** (num_levels - 1)
    bad = [n for n in spatial if n % factor != 0 or n < factor]
    if bad:
        raise VqldmError(
            f"{what}: the latent spatial size {spatial} cannot be halved evenly by the UNet's "
            f"{num_levels - 1} downsamplings (diffusion.num_channels has {num_levels} entries, "
            f"so each latent size must be a multiple of {factor}); change data.patch_size, the VQ-VAE "
            f"downsample_parameters or diffusion.num_channels"
        )


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise VqldmError(msg)


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure names the keys involved."""
    _validate_data(cfg.data)
    _validate_vqvae(cfg.vqvae, cfg.data)
    for name in ("vqvae", "diffusion", "prior"):
        _validate_stage(name, getattr(cfg, name), cfg.learning_rate(name))
    _validate_unet(cfg.diffusion, cfg.vqvae, latent_spatial(cfg.vqvae, cfg.data.patch_size))
    _validate_margin(cfg.diffusion, latent_spatial(cfg.vqvae, cfg.data.patch_size))
    _validate_scheduler(cfg.diffusion)
    _require(not cfg.diffusion.covariates or bool(cfg.data.labels_file),
             "diffusion.covariates names columns of data.labels_file; set data.labels_file")
    _validate_prior(cfg.prior)
    _require(not cfg.prior.covariates or bool(cfg.data.labels_file),
             "prior.covariates names columns of data.labels_file; set data.labels_file")


def _validate_data(d: DataConfig) -> None:
    _require(len(d.patch_size) == 3 and all(n > 0 for n in d.patch_size),
             f"data.patch_size must be three positive sizes (X, Y, Z), got {d.patch_size}")
    if d.voxel_resize is not None:
        _require(len(d.voxel_resize) == 3 and all(n > 0 for n in d.voxel_resize),
                 f"data.voxel_resize must be three positive sizes or null, got {d.voxel_resize}")
    if d.resample_spacing is not None:
        _require(len(d.resample_spacing) == 3 and all(s > 0 for s in d.resample_spacing),
                 f"data.resample_spacing must be three positive voxel sizes or null, got {d.resample_spacing}")
        _require(d.voxel_resize is None, "data.resample_spacing and data.voxel_resize both set: choose one")
    _require(d.batch_size >= 1, "data.batch_size must be >= 1")
    _require(0.0 <= d.cache_rate <= 1.0, f"data.cache_rate must lie in [0, 1], got {d.cache_rate}")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0")
    _require(d.intensity_range in ([0.0, 1.0], [-1.0, 1.0]),
             f"data.intensity_range must be [0, 1] or [-1, 1], got {d.intensity_range}")
    _require(d.normalize in NORMALIZE_METHODS,
             f"data.normalize must be one of {', '.join(NORMALIZE_METHODS)}, got {d.normalize!r}")
    if d.clip_percentiles is not None:
        lo_hi = d.clip_percentiles
        _require(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 100,
                 f"data.clip_percentiles must be [low, high] within [0, 100], got {lo_hi}")
    _require(0.0 <= d.foreground_crop_ratio <= 1.0, "data.foreground_crop_ratio must lie in [0, 1]")
    _require(d.patches_per_volume >= 1, "data.patches_per_volume must be >= 1")
    _require(d.max_val_patches >= 1, "data.max_val_patches must be >= 1")
    for key in ("max_train_volumes", "max_val_volumes"):
        _require(getattr(d, key) is None or getattr(d, key) >= 1, f"data.{key} must be >= 1 or null")
    _require(0.0 < d.foreground_threshold < 1.0, "data.foreground_threshold must lie in (0, 1)")
    _require(d.labels_file is None or bool(str(d.labels_file).strip()), "data.labels_file must be a path or null")


def _validate_vqvae(v: VQVAEConfig, d: DataConfig) -> None:
    _require(v.spatial_dims == 3, f"vqvae.spatial_dims must be 3 (vqldm is volumetric), got {v.spatial_dims}")
    _require(v.in_channels == 1 and v.out_channels == 1,
             "vqvae.in_channels and vqvae.out_channels must be 1 (single-channel volumes)")
    _require(len(v.num_channels) >= 1, "vqvae.num_channels must not be empty")
    n = len(v.num_channels)
    if isinstance(v.num_res_channels, list):
        _require(len(v.num_res_channels) == n,
                 f"vqvae.num_res_channels has {len(v.num_res_channels)} entries but vqvae.num_channels has {n}")
    for key, params, width in (("downsample_parameters", downsample_parameters(v), 4),
                               ("upsample_parameters", upsample_parameters(v), 5)):
        _require(len(params) == n,
                 f"vqvae.{key} has {len(params)} entries but vqvae.num_channels has {n}; give one per level")
        for i, p in enumerate(params):
            _require(len(p) == width, f"vqvae.{key}[{i}] must have {width} integers, got {p}")
    _require(v.num_embeddings >= 2, "vqvae.num_embeddings must be >= 2")
    _require(v.embedding_dim >= 1, "vqvae.embedding_dim must be >= 1")
    cb = v.codebook
    _require(cb.init in ("normal", "kaiming_uniform", "data"),
             f"vqvae.codebook.init must be normal, kaiming_uniform or data, got {cb.init!r}")
    _require(0.0 < cb.decay < 1.0, f"vqvae.codebook.decay must lie in (0, 1), got {cb.decay}")
    _require(cb.restart_window_steps >= 1, "vqvae.codebook.restart_window_steps must be >= 1")

    lat = latent_spatial(v, d.patch_size)
    _require(all(x >= 1 for x in lat),
             f"data.patch_size {d.patch_size} is too small for vqvae.downsample_parameters (latent {lat})")
    dec = decoded_spatial(v, lat)
    _require(dec == list(d.patch_size),
             f"data.patch_size {d.patch_size} cannot be encoded and decoded back to the same shape by the "
             f"VQ-VAE (vqvae.downsample_parameters / upsample_parameters give latent {lat} -> {dec}); use "
             f"sizes divisible by the total stride")


def _validate_stage(section: str, stage: VQVAEConfig | DiffusionConfig | PriorConfig, lr: float) -> None:
    """What every trained stage's ``training`` and ``logging`` sections must satisfy."""
    t = stage.training
    _require(t.n_epochs >= 1, f"{section}.training.n_epochs must be >= 1")
    _require(t.val_interval >= 1, f"{section}.training.val_interval must be >= 1")
    _require(t.save_interval >= 1, f"{section}.training.save_interval must be >= 1")
    _require(t.fast_dev_run_batches >= 1, f"{section}.training.fast_dev_run_batches must be >= 1")
    if t.batch_size is not None:
        _require(t.batch_size >= 1, f"{section}.training.batch_size must be >= 1")
    _validate_schedule(section, t)
    _require(lr > 0 and math.isfinite(lr), f"{section}.learning_rate must be a positive number")
    _require(0.0 < t.ema_decay < 1.0, f"{section}.training.ema_decay must lie in (0, 1)")
    if t.grad_clip_norm is not None:
        _require(t.grad_clip_norm > 0, f"{section}.training.grad_clip_norm must be > 0 or null")
    _require(t.loss.reconstruction_loss_type in ("l1", "mse", "weighted", "dice", "combined"),
             f"{section}.training.loss.reconstruction_loss_type must be l1, mse, weighted, dice or "
             f"combined, got {t.loss.reconstruction_loss_type!r}")
    _require(t.loss.weighted.base in ("l1", "mse"),
             f"{section}.training.loss.weighted.base must be l1 or mse")
    lg = stage.logging
    _require(lg.log_interval >= 1, f"{section}.logging.log_interval must be >= 1")
    _require(lg.visualize_interval >= 1, f"{section}.logging.visualize_interval must be >= 1")
    _require(lg.num_visualize_samples >= 0, f"{section}.logging.num_visualize_samples must be >= 0")
    _require(lg.num_inference_steps >= 1, f"{section}.logging.num_inference_steps must be >= 1")
    _require(bool(stage.checkpoints.output_dir), f"{section}.checkpoints.output_dir must not be empty")
    _require(bool(lg.log_dir), f"{section}.logging.log_dir must not be empty")


LR_SCHEDULES = ("constant", "cosine", "linear")


def _validate_schedule(section: str, t: TrainingConfig) -> None:
    """The learning-rate schedule, accumulation and stop conditions of one stage."""
    key = f"{section}.training"
    _require(t.lr_schedule in LR_SCHEDULES,
             f"{key}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    _require(t.warmup_steps >= 0, f"{key}.warmup_steps must be >= 0")
    _require(t.grad_accumulation_steps >= 1, f"{key}.grad_accumulation_steps must be >= 1")
    if t.grad_accumulation_steps > 1:
        _require(not t.skip_nonfinite, f"{key}.grad_accumulation_steps > 1 and {key}.skip_nonfinite: choose one "
                                       f"(a skipped micro-batch would drop its whole accumulation window)")
        _require(not t.adversarial.enabled, f"{key}.grad_accumulation_steps > 1 is not supported with "
                                            f"{key}.adversarial.enabled (two optimizers share the generator's backward)")
    for name in ("save_interval_steps", "max_steps"):
        v = getattr(t, name)
        _require(v is None or v >= 1, f"{key}.{name} must be >= 1 or null, got {v}")
    if t.max_time_minutes is not None:
        _require(t.max_time_minutes > 0 and math.isfinite(t.max_time_minutes),
                 f"{key}.max_time_minutes must be > 0 or null, got {t.max_time_minutes}")


def _validate_unet(u: DiffusionConfig, v: VQVAEConfig, lat: list[int]) -> None:
    _require(u.spatial_dims == 3, f"diffusion.spatial_dims must be 3, got {u.spatial_dims}")
    # stage 2 models stage 1's latent
    for key in ("in_channels", "out_channels"):
        _require(getattr(u, key) == v.embedding_dim,
                 f"diffusion.{key} ({getattr(u, key)}) must equal vqvae.embedding_dim ({v.embedding_dim}): "
                 f"the diffusion UNet models the VQ-VAE latent")
    m = len(u.num_channels)
    _require(m >= 1, "diffusion.num_channels must not be empty")
    _require(len(u.attention_levels) == m,
             f"diffusion.attention_levels has {len(u.attention_levels)} entries but diffusion.num_channels has {m}")
    if isinstance(u.num_head_channels, list):
        _require(len(u.num_head_channels) == m,
                 f"diffusion.num_head_channels has {len(u.num_head_channels)} entries but "
                 f"diffusion.num_channels has {m}")
    if isinstance(u.num_res_blocks, list):
        _require(len(u.num_res_blocks) == m,
                 f"diffusion.num_res_blocks has {len(u.num_res_blocks)} entries but diffusion.num_channels has {m}")
    for i, c in enumerate(u.num_channels):
        _require(c % u.norm_num_groups == 0,
                 f"diffusion.num_channels[{i}] ({c}) must be a multiple of diffusion.norm_num_groups "
                 f"({u.norm_num_groups})")
    heads = u.num_head_channels if isinstance(u.num_head_channels, list) else [u.num_head_channels] * m
    for i, (att, h) in enumerate(zip(u.attention_levels, heads)):
        if att:
            _require(h > 0 and u.num_channels[i] % h == 0,
                     f"diffusion.num_head_channels[{i}] ({h}) must divide diffusion.num_channels[{i}] "
                     f"({u.num_channels[i]}) where attention_levels[{i}] is true")
    check_latent_for_unet(m, lat, "data.patch_size / diffusion.num_channels")
    # MONAI's middle block always has attention, with the deepest level's head size
    _require(heads[-1] > 0 and u.num_channels[-1] % heads[-1] == 0,
             f"diffusion.num_head_channels[-1] ({heads[-1]}) must be > 0 and divide diffusion.num_channels[-1] "
             f"({u.num_channels[-1]}): the UNet's middle block always uses attention")


def _validate_margin(u: DiffusionConfig, lat: list[int]) -> None:
    m = u.sampling_margin
    _require(len(m) == 3 and all(isinstance(n, int) and n >= 0 for n in m),
             f"diffusion.sampling_margin must be three latent cell counts >= 0 (x, y, z), got {m}")
    check_latent_for_unet(len(u.num_channels), [n + 2 * k for n, k in zip(lat, m)], "diffusion.sampling_margin")


def _validate_scheduler(u: DiffusionConfig) -> None:
    s = u.scheduler
    _require(s.type in ("ddpm", "rflow"), f"diffusion.scheduler.type must be ddpm or rflow, got {s.type!r}")
    _require(s.prediction_type in ("epsilon", "v_prediction"),
             f"diffusion.scheduler.prediction_type must be epsilon or v_prediction, got {s.prediction_type!r}")
    _require(s.schedule in ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"),
             f"diffusion.scheduler.schedule must be linear_beta, scaled_linear_beta, sigmoid_beta or cosine, "
             f"got {s.schedule!r}")
    _require(0 < s.beta_start < s.beta_end < 1,
             f"diffusion.scheduler.beta_start ({s.beta_start}) must be below beta_end ({s.beta_end}), both in (0, 1)")
    _require(s.num_train_timesteps >= 2, "diffusion.scheduler.num_train_timesteps must be >= 2")
    _require(math.isfinite(s.timestep_bias) and 0.0 <= s.timestep_bias <= 4.0,
             f"diffusion.scheduler.timestep_bias must lie in [0, 4] (0: uniform timesteps), got {s.timestep_bias}")
    _require(s.timestep_bias_epochs is None or (s.timestep_bias_epochs >= 1 and s.timestep_bias > 0.0),
             f"diffusion.scheduler.timestep_bias_epochs ({s.timestep_bias_epochs}) must be >= 1 and needs "
             f"diffusion.scheduler.timestep_bias > 0; null draws every epoch with the bias")
    _require(s.timestep_bias == 0.0 or s.type == "ddpm",
             "diffusion.scheduler.timestep_bias applies to ddpm training; rflow draws its own (logit-normal) timesteps")
    _require(not u.self_condition or s.type == "ddpm",
             "diffusion.self_condition applies to ddpm models (epsilon or v_prediction), not rflow")
    _require(0 <= u.self_condition_min_timestep < s.num_train_timesteps,
             f"diffusion.self_condition_min_timestep must lie in [0, {s.num_train_timesteps}), "
             f"got {u.self_condition_min_timestep}")
    # the original README carries the value twice; the scheduler's is the one used
    _require(u.num_train_timesteps == s.num_train_timesteps,
             f"diffusion.num_train_timesteps ({u.num_train_timesteps}) and diffusion.scheduler.num_train_timesteps "
             f"({s.num_train_timesteps}) disagree; set both to the same value")
    if u.scale_factor is not None:
        _require(u.scale_factor > 0 and math.isfinite(u.scale_factor), "diffusion.scale_factor must be > 0 or null")
    _require(u.scale_factor_batches >= 1, "diffusion.scale_factor_batches must be >= 1")
    if u.sampler is not None:
        fits = ("rflow",) if s.type == "rflow" else ("ddim", "ddpm", "dpmpp_2m")
        _require(u.sampler in fits, f"diffusion.sampler must be {' or '.join(fits)} for a diffusion.scheduler.type "
                                    f"{s.type} model, got {u.sampler!r}")
    _require(u.latent_norm in ("global", "channel"),
             f"diffusion.latent_norm must be global or channel, got {u.latent_norm!r}")
    _require(0.0 <= u.condition_drop_prob < 1.0,
             f"diffusion.condition_drop_prob must lie in [0, 1), got {u.condition_drop_prob}")
    _require(u.coarse_view in ("volume", "projection"),
             f"diffusion.coarse_view must be volume or projection, got {u.coarse_view!r}")
    _require(len(set(u.covariates)) == len(u.covariates) and all(str(c).strip() for c in u.covariates),
             f"diffusion.covariates must be distinct column names, got {u.covariates}")
    _validate_autoguidance(u)


def _validate_autoguidance(u: DiffusionConfig) -> None:
    a, n = u.autoguidance, u.training.n_epochs
    _require(0 <= a.guide_epoch < n,
             f"diffusion.autoguidance.guide_epoch must lie in [0, diffusion.training.n_epochs) = [0, {n}), got "
             f"{a.guide_epoch}: the guide is an early snapshot of the run (0: none)")
    _require(math.isfinite(a.weight) and a.weight >= 1.0,
             f"diffusion.autoguidance.weight must be >= 1 (1: no autoguidance), got {a.weight}")
    _require(0 <= a.min_timestep < u.scheduler.num_train_timesteps,
             f"diffusion.autoguidance.min_timestep must lie in [0, {u.scheduler.num_train_timesteps}) "
             f"(diffusion.scheduler.num_train_timesteps), got {a.min_timestep}")
    _require(math.isfinite(a.rescale) and 0.0 <= a.rescale <= 1.0,
             f"diffusion.autoguidance.rescale must lie in [0, 1] (0: off), got {a.rescale}")


ORDERINGS = ("raster_scan", "s_curve", "random")


def _validate_prior(p: PriorConfig) -> None:
    _require(p.ordering in ORDERINGS, f"prior.ordering must be one of {', '.join(ORDERINGS)}, got {p.ordering!r}")
    _require(p.attn_layers_dim >= 1 and p.attn_layers_depth >= 1 and p.attn_layers_heads >= 1,
             "prior.attn_layers_dim, attn_layers_depth and attn_layers_heads must be >= 1")
    _require(p.attn_layers_dim % p.attn_layers_heads == 0,
             f"prior.attn_layers_heads ({p.attn_layers_heads}) must divide prior.attn_layers_dim ({p.attn_layers_dim})")
    _require(0.0 <= p.embedding_dropout_rate < 1.0, "prior.embedding_dropout_rate must lie in [0, 1)")
    _require(p.temperature > 0 and math.isfinite(p.temperature), "prior.temperature must be > 0")
    if p.top_k is not None:
        _require(p.top_k >= 1, "prior.top_k must be >= 1 or null")
    if p.top_p is not None:
        _require(0.0 < p.top_p <= 1.0, "prior.top_p must lie in (0, 1] or null")
    _require(0.0 <= p.condition_drop_prob < 1.0,
             f"prior.condition_drop_prob must lie in [0, 1), got {p.condition_drop_prob}")
    _require(len(set(p.covariates)) == len(p.covariates) and all(str(c).strip() for c in p.covariates),
             f"prior.covariates must be distinct column names, got {p.covariates}")
    _require(isinstance(p.covariate_bins, int) and not isinstance(p.covariate_bins, bool) and p.covariate_bins >= 2,
             f"prior.covariate_bins must be an integer >= 2, got {p.covariate_bins!r}")


def vqvae_from_network(net: dict) -> VQVAEConfig:
    """A VQVAEConfig carrying a checkpoint's network geometry (for shape arithmetic)."""
    return VQVAEConfig(num_channels=list(net["channels"]), embedding_dim=net["embedding_dim"],
                       num_embeddings=net["num_embeddings"],
                       downsample_parameters=[list(p) for p in net["downsample_parameters"]],
                       upsample_parameters=[list(p) for p in net["upsample_parameters"]])
