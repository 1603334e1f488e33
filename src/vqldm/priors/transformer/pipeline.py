"""A trained token prior and its stage 1, rebuilt from their checkpoints alone, turning seeded
Gumbel noise into code grids and volumes (``vqldm sample --prior transformer``), for a conditional prior
at the covariates :meth:`TokenPipeline.set_covariates` and the class and guidance weight
:meth:`TokenPipeline.set_class` set."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vqldm.checkpoint import inference_weights, load_checkpoint, rebuild
from vqldm.config import Config
from vqldm.data.labels import class_index
from vqldm.errors import VqldmError
from vqldm.latents import RecordedGrid, recorded_stage1
from vqldm.priors.diffusion.covariates import asked_values
from vqldm.priors.transformer.model import Vocabulary, build_transformer, start_tokens, to_grid, without_masks
from vqldm.priors.transformer.sampler import gumbel_noise, sample_tokens
from vqldm.runtime import Runtime, make_runtime
from vqldm.sampling.decode import decode_codes

log = logging.getLogger("vqldm")


@dataclass
class TokenPipeline(RecordedGrid):
    """The transformer and the VQ-VAE, ready to turn seeded noise into volumes; ``voxel_grid``,
    ``spacing`` and ``unit``: the training data's voxel grid, written into every sample."""

    model: torch.nn.Module
    vqvae: torch.nn.Module
    ckpt: dict
    vq_ckpt: dict
    rt: Runtime
    path: Path
    vq_path: Path
    vq_sha256: str | None = None
    sample_class: str | None = None  # set_class: the class to sample (None: the null class)
    guidance: float = 1.0  # set_class: the classifier-free guidance weight
    asked_covariates: dict | None = None  # set_covariates: --cond KEY=VALUE, the raw values asked for
    covariate_values: tuple | None = None  # ... normalised, with their presence: ((K,), (K,))

    @property
    def grid(self) -> list[int]:
        return list(self.ckpt["latent_grid"])

    @property
    def classes(self) -> list[str] | None:
        """The class names of a class-conditional prior (recorded in its checkpoint), else None."""
        return self.ckpt.get("classes")

    @property
    def covariates(self) -> dict[str, list[float]]:
        """The covariates of a prior trained with ``prior.covariates``: name -> training [min, max]."""
        return dict(self.ckpt.get("covariates") or {})

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.of(self.ckpt)

    @property
    def num_codes(self) -> int:
        """The codebook size, which is also the begin-of-sequence (null class) token."""
        return self.vocab.codes

    def set_covariates(self, asked: dict[str, float] | None) -> None:
        """Sample at these covariate values (``--cond KEY=VALUE``; a covariate left out is its null); a prior
        without covariates refuses any in one line."""
        if asked and not self.covariates:
            raise VqldmError(f"--cond {next(iter(asked))}: {self.path} was trained without prior.covariates")
        self.covariate_values = asked_values(asked or {}, self.covariates) if self.covariates else None
        self.asked_covariates = dict(asked or {}) or None

    def set_conditions(self, class_name: str | None = None, guidance: float = 1.0, cond: dict | None = None) -> None:
        """The covariates ``cond``, then the class and the weight (``--guidance`` needs a condition set first)."""
        self.set_covariates(cond)
        self.set_class(class_name, guidance)

    def set_class(self, name: str | None, guidance: float = 1.0) -> None:
        """Sample class ``name`` (with the covariates set before) with guidance ``guidance`` (a conditional prior
        without a class samples the null class); an unconditional prior refuses a class in one line, and
        guidance without any condition too."""
        if name is not None:
            class_index(self.classes, name)
        elif guidance != 1.0 and not self.asked_covariates:
            raise VqldmError("--guidance needs --class or --cond: it mixes a condition's logits with the "
                             "unconditional ones")
        self.sample_class, self.guidance = name, float(guidance)

    @property
    def start(self) -> int | torch.Tensor:
        """What precedes every sequence: the set class's start token, else the begin-of-sequence token; for a
        prior with covariates (1, 1 + K), then the asked covariates' tokens (the others' nulls)."""
        first = self.num_codes if self.sample_class is None else int(
            start_tokens(torch.tensor(class_index(self.classes, self.sample_class)), self.num_codes))
        return self.vocab.prefix(first, *(self.covariate_values or (None, None)))

    @property
    def null_start(self) -> int | torch.Tensor:
        """What precedes the fully unconditional stream: the null class, every covariate's null."""
        return self.vocab.prefix(self.num_codes)

    def data_records(self) -> tuple[dict, dict]:
        return self.ckpt.get("data", {}), self.vq_ckpt.get("data", {})

    def codes(self, indices: list[int], seed: int, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, cached: bool = True, progress: bool = False) -> torch.Tensor:
        """Code grids (B, x, y, z) for sample ``indices``; sample ``i`` is seeded by ``(seed, i)``."""
        order = torch.tensor(self.ckpt["ordering"]["order"], dtype=torch.long, device=self.rt.device)
        noise = gumbel_noise(indices, seed, len(order), self.num_codes)
        seq = sample_tokens(self.model, noise, self.start, temperature, top_k, top_p, cached=cached,
                            autocast=self.rt.autocast, desc="token sampling" if progress else None,
                            guidance=self.guidance, null_start=self.null_start)
        return to_grid(seq, order, self.grid)

    @torch.no_grad()
    def generate(self, indices: list[int], seed: int, batch_size: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, progress: bool = False) -> torch.Tensor:
        """Volumes (N, 1, X, Y, Z) in [0, 1] for sample ``indices``, in batches."""
        outs = []
        for start in range(0, len(indices), batch_size):
            grid = self.codes(indices[start:start + batch_size], seed, temperature, top_k, top_p, progress=progress)
            outs.append(decode_codes(self.vqvae, grid, self.vq_ckpt["normalization"]["intensity_range"],
                                     self.rt.autocast, self.vq_ckpt.get("intensity_calibration")))
        return torch.cat(outs) if outs else torch.zeros([0, 1])


def _model_from(ckpt: dict, path: Path, what: str, use_ema: bool, rt: Runtime) -> torch.nn.Module:
    state = inference_weights(ckpt, path, use_ema, "--prior-checkpoint")

    def make():
        if math.prod(ckpt["latent_grid"]) + len(ckpt.get("covariates") or {}) > int(ckpt["network"]["max_seq_len"]):
            raise ValueError(f"its code grid {ckpt['latent_grid']} is longer than its "
                             f"{ckpt['network']['max_seq_len']} positions")
        return build_transformer(ckpt["network"])

    return rt.frozen(rebuild(make, without_masks(state), what, path, "token prior"))


def load_token_pipeline(cfg: Config, prior_checkpoint: str | None = None, vqvae_checkpoint: str | None = None,
                        use_ema: bool = True, rt: Runtime | None = None) -> TokenPipeline:
    """The transformer of ``prior_checkpoint`` (default: ``prior.checkpoints.output_dir/best_model.pt``)
    and the stage-1 checkpoint it was trained on (or ``vqvae_checkpoint``, refused if its codebook differs)."""
    rt = rt or make_runtime(cfg)
    if prior_checkpoint:
        path, what = Path(prior_checkpoint), "--prior-checkpoint"
    else:
        path, what = Path(cfg.prior.checkpoints.output_dir) / "best_model.pt", "prior.checkpoints.output_dir"
    ckpt = load_checkpoint(path, kind="prior", what=what)
    model = _model_from(ckpt, path, what, use_ema, rt)
    vqvae, vq_ckpt, vq_path, vq_what, sha, mismatch = recorded_stage1(ckpt, path, vqvae_checkpoint, rt)
    if mismatch:
        # code indices mean nothing under another codebook: unlike a diffusion latent, no decoding "anyway"
        raise VqldmError(f"{vq_what}: {mismatch}; its code indices would mean other codes")
    return TokenPipeline(model, vqvae, ckpt, vq_ckpt, rt, path, vq_path, vq_sha256=sha)
