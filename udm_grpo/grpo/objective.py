"""UDM-GRPO objective: action log-probs, token entropy and the clipped policy loss with a k3 KL penalty.

Per sample b with N image tokens, action a (Long[N]: the final clean sample for UDM-GRPO) and state x_t:

    l_b     = (1/N) sum_n log p_theta(a_n | x_t, c)               (sequence-mean log-prob)
    old     = stopgrad(log p_theta)  (on-policy: every ratio is 1 in value)
            | the per-token log-probs of the policy that drew the sample (reused rollouts)
    r_b     = exp((1/N) sum_n [log p_theta - old]_n)      ("sequence" level: the reference's ratio of sequence
                                                          means, GSPO's length-normalised sequence ratio)
    r_b,n   = exp([log p_theta - old]_n)                  ("token" level: PPO/GRPO per-token ratios)
    L_pg,b  = -min(A_b r, A_b clip(r, 1 - eps, 1 + eps_high))   (per token: averaged over n)
    KL_b    = exp(d) - d - 1 with d = l_ref,b - l_b      ("sequence", the paper's k3 on sequence means)
            | mean_n [exp(d_n) - d_n - 1], d_n per token    ("token", per-token k3)
    L       = sum_b (L_pg,b + beta KL_b) / D              (D = B by default; the trainer passes its normaliser)

eps_high > eps is DAPO's clip-higher. On-policy the gradient is exactly -sum_b A_b grad l_b / D (REINFORCE
with group-normalised advantages) at either level. Unlike the reference code, r = exp(l - l_old) is computed
with the intended precedence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

KLMode = Literal["sequence", "token"]
Level = Literal["sequence", "token"]
_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of float32 per chunk


def _chunk_rows(num_classes: int, chunk: int | None) -> int:
    if chunk is None:
        return max(1, _CHUNK_ELEMENTS // max(1, num_classes))
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    return chunk


def _row_blocks(logits: torch.Tensor, rows: int) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Yield (view Float[r, K], start, end) over the B*N rows of logits [B, N, K] without copying it."""
    batch, length, classes = logits.shape
    try:
        flat = logits.view(batch * length, classes)
    except RuntimeError:  # non-viewable slice (e.g. logits[:, L:-1]): walk each sample separately
        flat = None
    if flat is not None:
        for s in range(0, batch * length, rows):
            yield flat[s : s + rows], s, min(s + rows, batch * length)
        return
    for b in range(batch):
        for s in range(0, length, rows):
            e = min(s + rows, length)
            yield logits[b, s:e], b * length + s, b * length + e


class _ActionLogProb(torch.autograd.Function):
    """log softmax(logits)[action] with chunked fp32 math; backward recomputes softmax per chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, actions: torch.Tensor, rows: int) -> torch.Tensor:
        batch, length, _ = logits.shape
        flat_actions = actions.reshape(-1, 1)
        out = torch.empty(batch * length, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for block, s, e in _row_blocks(logits, rows):
            block = block.float()
            lse[s:e] = torch.logsumexp(block, dim=-1)
            out[s:e] = block.gather(-1, flat_actions[s:e]).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(logits, flat_actions, lse)
        ctx.rows = rows
        return out.view(batch, length)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, flat_actions, lse = ctx.saved_tensors
        batch, length, classes = logits.shape
        grad = torch.empty((batch * length, classes), dtype=logits.dtype, device=logits.device)
        go = grad_out.reshape(-1, 1).float()
        for block, s, e in _row_blocks(logits, ctx.rows):
            g = torch.exp(block.float() - lse[s:e, None])  # softmax
            g.mul_(-go[s:e])
            g.scatter_add_(-1, flat_actions[s:e], go[s:e])  # d/dz = go * (onehot - softmax)
            grad[s:e] = g
        return grad.view(batch, length, classes), None, None


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Per-token log p(action): Float[B, N] (float32) from logits Float[B, N, K] (any float dtype), actions Long[B, N].

    Equals log_softmax(logits.float(), -1).gather(-1, actions) but works over chunks of `chunk` rows
    (default: ~16M elements per chunk) so no second [B, N, K] float tensor is created in forward; the
    backward recomputes the softmax chunk by chunk and writes the gradient in the logits' dtype.
    Gradients flow to `logits`.
    """
    if logits.dim() != 3 or actions.shape != logits.shape[:2]:
        shapes = f"{list(logits.shape)} and {list(actions.shape)}"
        raise ValueError(f"expected logits [B, N, K] and actions [B, N], got {shapes}")
    rows = _chunk_rows(logits.shape[-1], chunk)
    return _ActionLogProb.apply(logits, actions.long(), rows)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Per-position entropy H = -sum_k p_k log p_k of softmax(logits): Float[B, N] from Float[B, N, K] (no grad).

    Pass image-position logits only, so text positions do not dilute the metric.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, N, K], got {list(logits.shape)}")
    batch, length, classes = logits.shape
    out = torch.empty(batch * length, dtype=torch.float32, device=logits.device)
    for block, s, e in _row_blocks(logits.detach(), _chunk_rows(classes, chunk)):
        logp = torch.log_softmax(block.float(), dim=-1)
        out[s:e] = -(logp.exp() * logp).sum(-1)
    return out.view(batch, length)


def _k3(d: torch.Tensor) -> torch.Tensor:
    """k3 estimator exp(d) - d - 1 >= 0 with d = log p_ref - log p_theta (expm1 for accuracy near 0)."""
    return torch.expm1(d) - d


def grpo_loss(
    logp_tokens: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp_tokens: torch.Tensor | None = None,
    ratio_clip: float = 1e-4,
    kl_beta: float = 0.05,
    kl_mode: KLMode = "sequence",
    ratio_clip_high: float | None = None,
    level: Level = "sequence",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO loss (scalar) and metrics (python floats).

    logp_tokens: Float[B, N] per-token policy log-probs of the actions (with grad);
    advantages: Float[B]; old_logp: Float[B, N] per-token log-probs under the policy that drew the sample, or
    None (on-policy: the ratio is 1 in value); ref_logp_tokens: Float[B, N] reference log-probs or None (no KL).
    The clip range is [1 - ratio_clip, 1 + ratio_clip_high] (`ratio_clip_high` None = `ratio_clip`); `level` picks
    the sequence or per-token ratio (module docstring); the loss is sum_b L_b / `normaliser` (None = B, the mean).
    The KL term is skipped when ref is None or kl_beta == 0 (it is still reported when ref is given).
    Metrics (means over the B samples): loss, policy_loss, kl, ratio_mean, ratio_max, clip_frac (the share of
    ratios, per sample or per token, where the clipped branch binds: A > 0 and r > 1 + eps_high, or A < 0 and
    r < 1 - eps; they get no policy gradient), logp_mean (mean of l).
    """
    if logp_tokens.dim() != 2:
        raise ValueError(f"logp_tokens must be [B, N], got {list(logp_tokens.shape)}")
    batch = logp_tokens.shape[0]
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must be [{batch}], got {list(advantages.shape)}")
    for name, other in (("old_logp", old_logp), ("ref_logp_tokens", ref_logp_tokens)):
        if other is not None and other.shape != logp_tokens.shape:
            raise ValueError(f"{name} must be {list(logp_tokens.shape)} per-token log-probs, got {list(other.shape)}")
    if kl_mode not in ("sequence", "token"):
        raise ValueError(f"kl_mode must be 'sequence' or 'token', got {kl_mode!r}")
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    high = ratio_clip if ratio_clip_high is None else ratio_clip_high
    if not (ratio_clip > 0 and high > 0):
        raise ValueError(f"ratio clipping must be positive, got {ratio_clip} and {high}")

    logp_tokens = logp_tokens.float()
    seq = logp_tokens.mean(dim=1)  # l_b
    adv = advantages.detach().to(seq)
    anchor = logp_tokens.detach() if old_logp is None else old_logp.detach().float()
    log_ratio = (logp_tokens - anchor).mean(1) if level == "sequence" else logp_tokens - anchor
    ratio = torch.exp(log_ratio)  # Float[B] or Float[B, N]
    a = adv if level == "sequence" else adv[:, None]
    lo, hi = 1.0 - ratio_clip, 1.0 + high
    clipped = ((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo))
    # == min(A r, A clip(r)) in value; the clipped branch is constant, so those ratios get no gradient
    surrogate = torch.where(clipped, a * ratio.clamp(lo, hi), a * ratio)
    per_sample = -(surrogate if level == "sequence" else surrogate.mean(1))
    policy_loss = per_sample.mean()

    kl_value = 0.0
    if ref_logp_tokens is not None:
        ref = ref_logp_tokens.detach().float()
        kl = _k3(ref.mean(dim=1) - seq) if kl_mode == "sequence" else _k3(ref - logp_tokens).mean(dim=1)
        kl_value = kl.mean().item()
        if kl_beta > 0:
            per_sample = per_sample + kl_beta * kl
    loss = per_sample.sum() / (batch if normaliser is None else normaliser)

    with torch.no_grad():
        metrics = {
            "loss": per_sample.mean().item(),
            "policy_loss": policy_loss.item(),
            "kl": kl_value,
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
            "clip_frac": clipped.float().mean().item(),
            "logp_mean": seq.mean().item(),
        }
    return loss, metrics
