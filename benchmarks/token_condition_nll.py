"""How much a conditional token prior reads its condition: each real volume's likelihood under its own
condition against the null.

For every volume of ``--real`` the token prior's mean negative log-likelihood (bits per token) is taken
after its own condition (the class of the labels file's ``label`` column for a class-conditional prior,
the ``--covariate`` value for a prior with ``prior.covariates``), after the null (the unconditional
likelihood, as ``vqldm score``) and, with ``--at V``, after covariate value V for every volume. A prior
that uses its condition gives a lower NLL under the volume's own condition than under the null, and
different NLLs under different values.

usage: python benchmarks/token_condition_nll.py --config CFG [--set KEY=VALUE ...] --prior-checkpoint P
       --real DIR --labels LABELS [--covariate NAME --at V ...] --out FILE
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from vqldm.commands.score import token_nll_grid
from vqldm.config import load_config
from vqldm.data.io import list_volumes, read_volume
from vqldm.data.labels import LABEL, read_table
from vqldm.priors.transformer.model import start_tokens
from vqldm.priors.transformer.pipeline import load_token_pipeline


def _prefix(pipe, row: dict, covariate: str | None, value: float | None = None):
    """The prefix of a volume's own class (if the prior has classes) and covariate ``value`` (default: its own)."""
    first = pipe.num_codes
    if pipe.classes:
        first = int(start_tokens(torch.tensor(pipe.classes.index(row[LABEL])), pipe.num_codes))
    if not pipe.covariates:
        return first
    lo, hi = pipe.covariates[covariate]
    v = float(row[covariate]) if value is None else value
    return pipe.vocab.prefix(first, torch.tensor([(v - lo) / (hi - lo)]), torch.ones(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--config", "--prior-checkpoint", "--real", "--labels", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--covariate", default=None)
    ap.add_argument("--at", type=float, action="append", default=[])
    args = ap.parse_args()
    pipe = load_token_pipeline(load_config(args.config, args.set, announce=False), args.prior_checkpoint)
    table = read_table(args.labels)
    bits = {"own": [], "null": [], **{f"at {v:g}": [] for v in args.at}}
    for f in list_volumes(args.real):
        vol, row = read_volume(f).array, table.rows[table.key_of(f)]
        bits["own"].append(token_nll_grid(pipe, vol, _prefix(pipe, row, args.covariate)).mean().item())
        bits["null"].append(token_nll_grid(pipe, vol).mean().item())
        for v in args.at:
            bits[f"at {v:g}"].append(token_nll_grid(pipe, vol, _prefix(pipe, row, args.covariate, v)).mean().item())
    b = {k: np.array(v) / math.log(2) for k, v in bits.items()}
    res = {"prior_checkpoint": args.prior_checkpoint, "real": args.real, "n": len(b["own"]),
           "bits_per_token": {k: float(v.mean()) for k, v in b.items()},
           "own_below_null": int((b["own"] < b["null"]).sum())}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
