"""URSA pretraining loss: cross-entropy on clean tokens at forward-noised states.

For clean tokens x1: Long[B, N], draw t ~ shift(0.999 U) per sample, x_t ~ p_t(. | x1), replace the
caption by the empty prompt with probability `caption_dropout`, and minimise

    L = -(1 / (B N)) sum_{b, n} log p_theta(x1[b, n] | x_t[b], c_b)

(mean over all image tokens, changed or not, no per-t weighting; optional label smoothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .categorical import draw_device
from .sampler import ImageLogitsModel
from .scheduler import KineticOptimalScheduler


def pretraining_loss(
    model: ImageLogitsModel,
    scheduler: KineticOptimalScheduler,
    text_ids: torch.Tensor,
    uncond_ids: torch.Tensor,
    x1: torch.Tensor,
    grid: tuple[int, int],
    generator: torch.Generator | None = None,
    caption_dropout: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns (loss, {"accuracy": top-1 accuracy on the clean tokens, "t_mean": mean t}).

    text_ids, uncond_ids: Long[B, L] (uncond = the tokenised empty prompt, broadcastable);
    x1: Long[B, N] codebook ids.
    """
    batch = x1.shape[0]
    t = scheduler.sample_train_t(batch, generator, x1.device)
    x_t = scheduler.add_noise(x1, t, generator)
    drop = torch.rand(batch, generator=generator, device=draw_device(generator, "cpu")).to(x1.device) < caption_dropout
    text = torch.where(drop[:, None], uncond_ids.expand_as(text_ids), text_ids)
    logits = model.image_logits(text, x_t, grid)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x1.flatten(), label_smoothing=label_smoothing)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == x1).float().mean().item()
    return loss, {"accuracy": accuracy, "t_mean": t.mean().item()}
