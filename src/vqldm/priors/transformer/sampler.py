"""Drawing code sequences from the token prior, one token at a time, with a key/value cache.

Each new token attends to the keys and values of the tokens before it. MONAI's own sampler runs the
whole prefix through the network for every token (O(N^2) token passes for N tokens); the cache keeps
each block's keys and values, so a token costs one token's pass. Both paths use the same MONAI
modules and weights, and :func:`sample_tokens` runs either (``cached=False`` is the reference).

Sampling is a pure function of its inputs: the randomness arrives as Gumbel noise, one (N, K) array
per sample drawn from that sample's own generator (:func:`gumbel_noise`), and a token is
``argmax(logits / temperature + noise)`` over the codes kept by top-k / top-p: an exact draw from the
tempered, truncated softmax (the Gumbel-max trick), independent of the batch a sample runs in.

Only the first K logits (the codes) are ever drawn from: the begin-of-sequence token and a
class-conditional model's class start tokens (indices >= K) are never emitted as codes. A class is
sampled by starting the sequence with its start token; with classifier-free guidance weight ``W`` the
sampler also runs the null (begin-of-sequence) stream, with a key/value cache of its own, and draws from
``null + W (cond - null)`` (:func:`guided_logits`) before temperature, top-k and top-p. A prior with
covariates starts each sequence with a prefix, the start token and one token per covariate; the sampler
prefills the prefix (into the cache too) and the null stream's prefix is the null class and every
covariate's null.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqldm.priors.diffusion.unet import guidance_mix
from vqldm.priors.transformer.model import as_prefix
from vqldm.runtime import sample_generator


def gumbel_noise(indices: list[int], seed: int, seq_len: int, num_codes: int) -> torch.Tensor:
    """(B, N, K) standard Gumbel noise; sample ``i``'s from a generator seeded by ``(seed, i)``."""
    out = []
    for i in indices:
        u = torch.rand(seq_len, num_codes, generator=sample_generator(seed, i), dtype=torch.float64)
        out.append(-torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-12))).float())
    return torch.stack(out)


def choose(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> torch.Tensor:
    """One token per row from (B, K) code logits and (B, K) Gumbel noise."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # codes after the first ones that reach top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return torch.argmax(logits + noise, dim=-1)


class _Cache:
    """Each block's keys and values for the positions generated so far, (B, heads, N, head dim), and
    its query/key/value projections fused into one matrix (one matmul per block and token)."""

    def __init__(self, model: nn.Module, batch: int, seq_len: int, device, dtype):
        attn = model.blocks[0].attn
        self.heads, self.dim_head = attn.num_heads, attn.dim_head
        shape = (batch, self.heads, seq_len, self.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.blocks]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.blocks]
        self.qkv = [_fused_qkv(block.attn) for block in model.blocks]


def _fused_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of MONAI ``SABlock``'s query, key and value projections as one linear map, with
    the outputs ordered query | key | value, each head by head (as ``input_rearrange`` splits them)."""
    if attn.use_combined_linear:
        return attn.qkv.weight, attn.qkv.bias
    weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    biases = [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]
    return weight, (torch.cat(biases) if biases[0] is not None else None)


def _cached_step(model: nn.Module, token: torch.Tensor, pos: int, cache: _Cache) -> torch.Tensor:
    """Code logits (B, V) after ``token`` (B,) at position ``pos``, given the cache of positions < pos."""
    b = token.shape[0]
    x = model.token_embeddings(token[:, None]) + model.position_embeddings.embedding.weight[pos]
    x = model.embedding_dropout(x)
    for block, k_cache, v_cache, (w, bias) in zip(model.blocks, cache.k, cache.v, cache.qkv):
        attn = block.attn
        qkv = F.linear(block.norm1(x), w, bias).view(b, 3, cache.heads, cache.dim_head)
        k_cache[:, :, pos] = qkv[:, 1]
        v_cache[:, :, pos] = qkv[:, 2]
        out = F.scaled_dot_product_attention(qkv[:, 0, :, None], k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                             scale=attn.scale)
        out = out.reshape(b, 1, cache.heads * cache.dim_head)
        if attn.include_fc:
            out = attn.out_proj(out)
        x = x + attn.drop_output(out)
        x = x + block.mlp(block.norm2(x))
    return model.to_logits(x)[:, 0]


def guided_logits(cond: torch.Tensor, null: torch.Tensor | None, w: float) -> torch.Tensor:
    """Classifier-free guidance on code logits, ``null + w (cond - null)`` as ``torch.lerp``: exactly the
    null logits at ``w = 0`` and exactly ``cond`` at ``w = 1`` (or where no null stream runs)."""
    return cond if null is None else guidance_mix(null, cond, w)


class _Stream:
    """One sequence being generated, (B, P + N) after its prefix (B, P) (the start token, then any covariate
    tokens), with its key/value cache."""

    def __init__(self, model: nn.Module, prefix: torch.Tensor, n: int, cached: bool):
        (b, self.p), device = prefix.shape, prefix.device
        self.model, self.seq = model, torch.empty((b, self.p + n), dtype=torch.long, device=device)
        self.seq[:, :self.p] = prefix
        self.cache = _Cache(model, b, self.p - 1 + n, device, torch.float32) if cached else None

    def logits(self, i: int, k: int) -> torch.Tensor:
        """The code logits (B, k) of code ``i`` (after the prefix and codes < i): never a start token's. The
        cached path runs the prefix into the cache first (at ``i = 0``)."""
        pos = self.p - 1 + i
        if self.cache is None:
            return self.model(self.seq[:, :pos + 1])[:, -1, :k]
        for q in range(self.p - 1 if i == 0 else 0):
            _cached_step(self.model, self.seq[:, q], q, self.cache)
        return _cached_step(self.model, self.seq[:, pos], pos, self.cache)[:, :k]


@torch.inference_mode()
def sample_tokens(model: nn.Module, noise: torch.Tensor, start: int | torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, cached: bool = True,
                  autocast=None, desc: str | None = None, guidance: float = 1.0,
                  null_start: int | torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) code sequences in prior order, from Gumbel ``noise`` (B, N, K). ``start``: the first token,
    one for all or one per sample (B,): the begin-of-sequence token (= K, the number of codes; a
    conditional model's null class) or a class's start token; or, for a prior with covariates, the whole
    prefix ((1, P) or (B, P): start and covariate tokens). A ``guidance`` other than 1 mixes in the null
    stream (:func:`guided_logits`), started by ``null_start`` (default: the begin-of-sequence token). The
    model must be in eval mode."""
    import contextlib

    b, n, k = noise.shape
    device = next(model.parameters()).device
    noise = noise.to(device)
    streams = [_Stream(model, as_prefix(start, b, device), n, cached)]
    if guidance != 1.0:
        streams.append(_Stream(model, as_prefix(k if null_start is None else null_start, b, device), n, cached))
    steps = range(n)
    if desc:
        from tqdm import tqdm

        steps = tqdm(steps, desc=desc, unit="token", leave=False, dynamic_ncols=True)
    for pos in steps:
        with (autocast or contextlib.nullcontext)():
            logits = [s.logits(pos, k) for s in streams]
        token = choose(guided_logits(logits[0], logits[1] if len(logits) > 1 else None, guidance), noise[:, pos],
                       temperature, top_k, top_p)
        for s in streams:
            s.seq[:, s.p + pos] = token
    return streams[0].seq[:, streams[0].p:]
