"""Peak host memory of one token-prior training step against the sequence length (CPU, fp32).

One step is what ``vqldm train-prior`` does per batch: the transformer exactly as vqldm builds it
(MONAI ``DecoderOnlyTransformer`` with PyTorch's fused scaled-dot-product attention, MONAI's N x N
mask buffers dropped), token cross-entropy, backward, AdamW. Each point runs in a fresh process and
reports the resident-memory high-water mark (``/proc/self/status`` VmHWM, the same figure as
``resource.getrusage(...).ru_maxrss``) above the resident memory just before the step (interpreter,
PyTorch and the model's weights), so ``step_mib`` is what the step itself adds: activations kept for
backward, gradients and the optimizer's two moments. A fit of ``step_mib`` per sample against L
and L^2 tells whether attention holds the L x L matrix (L^2 term) or not (linear).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/prior_memory.py --width 64 --depth 4 --heads 4 \\
        --codes 64 --lengths 512 1024 2048 4096 6912 --batch 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def one_point(width: int, depth: int, heads: int, codes: int, length: int, batch: int) -> dict:
    """One training step at sequence length ``length``, in this process; memory in MiB."""
    import torch
    import torch.nn.functional as F

    from vqldm.priors.transformer.model import build_transformer, with_bos

    torch.manual_seed(0)
    model = build_transformer({"num_tokens": codes + 1, "max_seq_len": length, "attn_layers_dim": width,
                               "attn_layers_depth": depth, "attn_layers_heads": heads,
                               "embedding_dropout_rate": 0.0})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = torch.randint(0, codes, (batch, length))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    logits = model(with_bos(seq, codes))
    F.cross_entropy(logits.float().transpose(1, 2), seq).backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"width": width, "depth": depth, "heads": heads, "codes": codes, "length": length, "batch": batch,
            "params": params, "before_mib": round(before, 1), "peak_mib": round(peak, 1),
            "step_mib": round(peak - before, 1), "seconds": round(seconds, 2)}


def fit(points: list[dict]) -> dict:
    """Least-squares step memory per sample = a + b L + c L^2 (MiB); c ~ 0 means no L x L matrix."""
    import numpy as np

    L = np.array([p["length"] for p in points], float)
    y = np.array([p["step_mib"] / p["batch"] for p in points], float)
    cols = [np.ones_like(L), L] + ([L**2] if len(L) >= 3 else [])
    coef = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)[0]
    out = {"a_mib": float(coef[0]), "b_mib_per_token": float(coef[1])}
    if len(coef) > 2:
        out["c_mib_per_token2"] = float(coef[2])
        out["share_of_L2_at_max"] = float(coef[2] * L.max() ** 2 / max(y.max(), 1e-9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--codes", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 6912])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the points and the fit here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single point, in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_point(args.width, args.depth, args.heads, args.codes, args.lengths[0], args.batch)))
        return
    points = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--one", "--width", str(args.width), "--depth", str(args.depth),
               "--heads", str(args.heads), "--codes", str(args.codes), "--lengths", str(length),
               "--batch", str(args.batch)]
        p = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(json.dumps(p), flush=True)
        points.append(p)
    result = {"points": points, "fit_per_sample": fit(points)}
    print(json.dumps(result["fit_per_sample"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
