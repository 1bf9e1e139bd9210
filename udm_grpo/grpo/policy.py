"""The trained policy: float32 master weights (full fine-tune or LoRA), the frozen reference, and the
training logits of a micro-batch.

With a bf16 compute dtype every forward runs under autocast; the weights the optimiser updates stay
float32 (bf16 weights would round away updates below about 2^-8 of a weight), the frozen reference is
stored in the compute dtype, and so is a LoRA policy's frozen base (peft keeps its adapters in float32).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..diffusion.sampler import guided_logits


@dataclass
class MicroBatch:
    """One unit of the objective: a slice of this process's samples at one trained step (time t) on a
    token grid (h, w).

    text / uncond: Long[b, L]; states: Long[b, N] (x_t fed to the model); actions: Long[b, N];
    advantages: Float[b]; ref_logp: Float[b, N] under the reference (None without KL);
    old_logp: Float[b, N] per-token log-probs under the policy that drew the sample (only when rollouts are
    reused: `training.updates_per_rollout` or `training.reuse_rollouts` > 1).
    """

    t: float
    grid: tuple[int, int]
    text: torch.Tensor
    uncond: torch.Tensor | None
    states: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None


class ImageLogits(torch.nn.Module):
    """Routes `image_logits` through `forward`, so DDP/FSDP wrappers see the call; the module (wrapped or not) is
    then itself a logits function of the sampler (`diffusion.sampler.LogitsFn`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text_ids, image_ids, grid):
        return self.model.image_logits(text_ids, image_ids, tuple(grid))


def build_policy(transformer, model_cfg, kl_beta: float, compute_dtype: torch.dtype):
    """(policy in train mode, frozen reference or None). LoRA (`model_cfg.lora`) wraps the transformer
    with peft and uses the adapter-disabled base as reference; otherwise the reference is a frozen copy
    when kl_beta > 0. Trainable parameters become float32."""
    transformer.set_gradient_checkpointing(model_cfg.gradient_checkpointing)
    reference = None
    if model_cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(transformer.to(compute_dtype), LoraConfig(**model_cfg.lora))
    else:
        model = transformer
        if kl_beta > 0:
            reference = copy.deepcopy(model).to(compute_dtype).requires_grad_(False).eval()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train(), reference


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The LoRA policy `model` computes its frozen base inside (the KL reference): peft's `disable_adapter()` for
    LoRA layers, but flipping only their `_disable_adapters` flag. peft's version also toggles the adapters'
    `requires_grad`, which sharded engines record when they wrap the model (FSDP2 builds its unsharded parameters
    from it, DeepSpeed its gradient hooks), so it is not touched here."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m._disable_adapters = flag


def micro_batch_logits(module: torch.nn.Module, m: MicroBatch, rollout_cfg) -> torch.Tensor:
    """Float[b, N, K] logits of `module` (an `ImageLogits`, possibly wrapped by DDP) at the micro-batch's
    states: the guided mixture u + s (c - u) when the rollout used guidance s at time t."""
    scale = rollout_cfg.guidance_scale if m.t < rollout_cfg.guidance_trunc else 1.0
    return guided_logits(module, m.text, m.states, m.grid, scale, m.uncond)
