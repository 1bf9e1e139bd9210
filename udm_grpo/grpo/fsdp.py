"""The FSDP2 engine (`torch.distributed.fsdp.fully_shard`) behind `engine.Engine`'s API; see `engine` for the
checkpoint layout, LoRA and offload."""

from __future__ import annotations

import contextlib
import math

import torch

from .engine import Engine, adam_state, adamw, checked, group_settings, transformer_of


class FSDPEngine(Engine):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the whole policy.
    Parameters, gradients and optimizer state are sharded; forwards gather one block at a time."""

    sharded = True

    def setup(self, policy, micro_batch: int, compute_dtype: torch.dtype) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        offload = (CPUOffloadPolicy(pin_memory=self.acc.device.type == "cuda")
                   if self.training.offload_param else OffloadPolicy())
        for block in transformer_of(policy.model).model.layers:
            fully_shard(block, mp_policy=mp, offload_policy=offload)
        fully_shard(policy, mp_policy=mp, offload_policy=offload)
        self.offload_policy, self.offloaded = offload, isinstance(offload, CPUOffloadPolicy)
        t = self.training
        self.module = policy
        self.optimizer = adamw(self.params(), t.lr, t.betas, t.weight_decay)

    def micro_context(self, last: bool):
        # Gradients are reduce-scattered after every micro-batch: they stay sharded (less memory than
        # accumulating unsharded ones) and `zero_grad` clears them when an update is skipped midway.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.accum).backward()

    def grad_norm(self) -> float:
        max_norm = self.training.max_grad_norm or math.inf
        if not self.offloaded:
            norm = torch.nn.utils.clip_grad_norm_(self.params(), max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # Offloaded shards live on the CPU, which a GPU process group (NCCL) cannot reduce: this process's sum of
        # squares is all-reduced on the device, then the gradients are clipped as torch clips them.
        grads = [p.grad.to_local() for p in self.params() if p.grad is not None]
        local = sum((g.float().pow(2).sum() for g in grads), torch.zeros(()))
        norm = float(self.acc.reduce(local.to(self.acc.device), "sum").sqrt())
        if max_norm / (norm + 1e-6) < 1:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        return norm

    def _reshard(self) -> None:
        """Back to sharded parameters (a forward without backward leaves the root's gathered)."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def full_state(self):
        self._reshard()
        named = self.named_params()
        dev = self.acc.device  # gathered there: offloaded shards are on the CPU, which NCCL does not take
        weights = {n: p.to(dev).full_tensor().float().cpu() for n, p in named}
        moments, step = [], 0
        for _, p in named:
            s = self.optimizer.state.get(p, {})
            if not s:
                return weights, self.optimizer.state_dict()  # before the first step: no moments yet
            moments.append(tuple(s[k].to(dev).full_tensor().float().cpu() for k in ("exp_avg", "exp_avg_sq")))
            step = s["step"]
        return weights, adam_state(step, moments, group_settings(self.optimizer))

    def load_full_state(self, weights, optimizer) -> None:
        from torch.distributed.tensor import distribute_tensor

        def shard(value, like):  # scattered on the device, then moved to the shard's (the CPU when offloaded)
            out = distribute_tensor(value.to(self.acc.device, like.dtype), like.device_mesh, like.placements)
            return out.to(like.device)

        self._reshard()
        for i, (name, p) in enumerate(checked(self.named_params(), weights)):
            p.data.copy_(shard(weights[name], p))
            entry = optimizer["state"].get(i) or optimizer["state"].get(str(i))
            if entry:
                self.optimizer.state[p] = {"step": torch.as_tensor(float(entry["step"])),
                                           "exp_avg": shard(entry["exp_avg"], p),
                                           "exp_avg_sq": shard(entry["exp_avg_sq"], p)}
