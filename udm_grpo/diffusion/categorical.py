"""Memory-lean categorical draws over large vocabularies.

A draw from softmax(s) over K classes, where the scores s are produced block by block, so that no
more than one (rows x chunk) float block is alive at a time. Two passes over the blocks:

1. a streaming log-sum-exp, m = max_k s_k and Z = sum_k exp(s_k - m);
2. inverse-CDF search: with u ~ U(0, 1), return the first k whose running sum of exp(s_k - m)
   reaches u * Z.

Only one uniform per row is drawn (the naive `torch.multinomial` route draws one per class), which
is what makes the two passes as fast as the single full-table pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScoreFn = Callable[[int, int], torch.Tensor]
"""`score_fn(k0, k1) -> Float[M, k1 - k0]`: log-weights of classes k0..k1-1 for every row (-inf = 0)."""


def _blocks(num_classes: int, chunk: int):
    for k0 in range(0, num_classes, chunk):
        yield k0, min(k0 + chunk, num_classes)


def chunked_logsumexp(score_fn: ScoreFn, rows: int, num_classes: int, chunk: int, device) -> tuple:
    """Streaming (m, Z) with log sum_k exp(s_k) = m + log Z; m: Float[M], Z: Float64[M]."""
    m = torch.full((rows,), float("-inf"), device=device)
    z = torch.zeros(rows, dtype=torch.float64, device=device)
    for k0, k1 in _blocks(num_classes, chunk):
        s = score_fn(k0, k1).float()
        new_m = torch.maximum(m, s.max(dim=1).values)
        safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
        scale = torch.exp((m - safe_m).double()).nan_to_num(0.0)
        z = z * scale + torch.exp(s - safe_m[:, None]).sum(dim=1, dtype=torch.float64)
        m = new_m
    return m, z


def chunked_categorical(
    score_fn: ScoreFn,
    rows: int,
    num_classes: int,
    chunk: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one class per row from softmax(scores). Returns Long[M].

    Rows whose scores are all -inf have no mass; they get class 0 (callers never ask for those).
    """
    m, z = chunked_logsumexp(score_fn, rows, num_classes, chunk, device)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    u = torch.rand(rows, generator=generator, device=device, dtype=torch.float64)
    target = u * z
    out = torch.full((rows,), -1, dtype=torch.long, device=device)
    last_positive = torch.zeros(rows, dtype=torch.long, device=device)
    acc = torch.zeros(rows, dtype=torch.float64, device=device)
    for k0, k1 in _blocks(num_classes, chunk):
        w = torch.exp(score_fn(k0, k1).float() - safe_m[:, None]).double()
        cum = torch.cumsum(w, dim=1) + acc[:, None]
        idx = (cum < target[:, None]).sum(dim=1)
        hit = (idx < (k1 - k0)) & (out < 0)
        out = torch.where(hit, idx + k0, out)
        pos = w > 0
        has_pos = pos.any(dim=1)
        last_in_block = (k1 - k0 - 1) - pos.flip(1).int().argmax(dim=1)
        last_positive = torch.where(has_pos, last_in_block + k0, last_positive)
        acc = cum[:, -1]
    # Rounding can leave u * Z a hair above the final running sum: take the last class with mass.
    return torch.where(out < 0, last_positive, out)


def sample_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 8192, row_chunk: int = 4096
) -> torch.Tensor:
    """x ~ Categorical(softmax(logits)) per row of Float[..., K]; returns Long[...].

    Works in float32 on blocks of (row_chunk x chunk), whatever the dtype of `logits`.
    """
    shape, num_classes = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, num_classes)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    for r0 in range(0, flat.shape[0], row_chunk):
        rows = flat[r0 : r0 + row_chunk]
        out[r0 : r0 + row_chunk] = chunked_categorical(
            lambda k0, k1, rows=rows: rows[:, k0:k1].float(), rows.shape[0], num_classes, chunk, generator,
            logits.device,
        )
    return out.reshape(shape)
