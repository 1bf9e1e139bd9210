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

ScoreFn = Callable[[int, int, torch.Tensor | None], torch.Tensor]
"""`score_fn(k0, k1, rows) -> Float[M', k1 - k0]`: log-weights (-inf = no mass) of classes k0..k1-1
for the rows indexed by `rows` (Long[M']), or for every row when `rows` is None."""


def draw_device(generator: torch.Generator | None, default: torch.device | str) -> torch.device:
    """Device to draw random numbers on: the generator's when given (PyTorch requires the two to agree,
    e.g. a CUDA generator with `device=` omitted fails), else `default`. Move the draw afterwards."""
    return generator.device if generator is not None else torch.device(default)


def class_blocks(num_classes: int, chunk: int):
    for k0 in range(0, num_classes, chunk):
        yield k0, min(k0 + chunk, num_classes)


def chunked_categorical(
    score_fn: ScoreFn,
    rows: int,
    num_classes: int,
    chunk: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one class per row from softmax(scores). Returns Long[M].

    Pass 1 keeps, per row and block, the block max m_c and sum s_c = sum exp(s - m_c) (Float[M, C]).
    Pass 2 picks the block where u * Z falls, then re-scores only that block for those rows, so the
    second pass costs about one block per row. Rows whose scores are all -inf get class 0.
    """
    blocks = list(class_blocks(num_classes, chunk))
    if len(blocks) == 1:
        return _one_block(score_fn(0, num_classes, None).float(), generator, device)
    maxes, sums = block_masses(score_fn, rows, blocks, device)
    top = maxes.max(dim=1).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = sums * torch.exp((maxes - top[:, None]).double())  # exp(-inf) = 0 for empty blocks
    cum = mass.cumsum(dim=1)
    u = torch.rand(rows, generator=generator, device=draw_device(generator, device), dtype=torch.float64)
    target = u.to(device) * cum[:, -1]
    block = (cum < target[:, None]).sum(dim=1)
    nonempty = mass > 0
    last_nonempty = (len(blocks) - 1) - nonempty.flip(1).int().argmax(dim=1)
    block = torch.minimum(block, last_nonempty)  # rounding can leave the target past the last sum
    prefix = torch.where(block > 0, cum.gather(1, (block - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
    out = torch.zeros(rows, dtype=torch.long, device=device)
    for c, (k0, k1) in enumerate(blocks):
        sel = (block == c).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        scores = score_fn(k0, k1, sel).float()
        w = torch.exp(scores - top[sel, None]).double()
        cw = w.cumsum(dim=1)
        idx = (cw < (target[sel] - prefix[sel])[:, None]).sum(dim=1)
        last_pos = (k1 - k0 - 1) - (w > 0).flip(1).int().argmax(dim=1)
        out[sel] = torch.minimum(idx, last_pos) + k0
    return out


def block_masses(score_fn: ScoreFn, rows: int, blocks: list[tuple[int, int]], device) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Pass 1: per row and block, the block max m_c (Float[M, C]) and sum_k exp(s_k - m_c) (Float64[M, C])."""
    maxes = torch.empty(rows, len(blocks), device=device)
    sums = torch.empty(rows, len(blocks), dtype=torch.float64, device=device)
    for c, (k0, k1) in enumerate(blocks):
        s = score_fn(k0, k1, None).float()
        m = s.max(dim=1).values
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        maxes[:, c] = m
        sums[:, c] = torch.exp(s - safe[:, None]).sum(dim=1, dtype=torch.float64)
    return maxes, sums


def _one_block(s: torch.Tensor, generator: torch.Generator | None, device) -> torch.Tensor:
    """`chunked_categorical` when all classes fit one block: the same draws, bit for bit (the same float32
    exponentials summed and accumulated in float64, the same uniform), with the exponentials computed once
    and the inverse-CDF search done by `searchsorted` (the count of cumulative sums below the target)."""
    m = s.max(dim=1).values
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - safe[:, None])
    total = e.sum(dim=1, dtype=torch.float64)
    u = torch.rand(s.shape[0], generator=generator, device=draw_device(generator, device), dtype=torch.float64)
    target = u.to(device) * total
    cw = e.double().cumsum(dim=1)
    out = torch.searchsorted(cw, target[:, None]).squeeze(1)
    past = (out == s.shape[1]).nonzero().squeeze(1)  # rounding left the target past the last sum
    if past.numel():
        out[past] = (s.shape[1] - 1) - (e[past] > 0).flip(1).int().argmax(dim=1)
    return out


def sample_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 4096, row_chunk: int = 1024
) -> torch.Tensor:
    """x ~ Categorical(softmax(logits)) per row of Float[..., K]; returns Long[...].

    Works in float32 on blocks of (row_chunk x chunk), whatever the dtype of `logits`.
    """
    shape, num_classes = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, num_classes)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    for r0 in range(0, flat.shape[0], row_chunk):
        rows = flat[r0 : r0 + row_chunk]

        def score(k0, k1, idx, rows=rows):
            return (rows if idx is None else rows[idx])[:, k0:k1].float()

        n = rows.shape[0]
        out[r0 : r0 + row_chunk] = chunked_categorical(score, n, num_classes, chunk, generator, logits.device)
    return out.reshape(shape)
