"""The policy's phases at any model shape without the memory: torch's fake tensors (shapes and dtypes, no
storage) run the real transformer code, `FlopCounterMode` counts FLOPs per op and `MemTracker` the live bytes
by category (parameters, buffers, gradients, optimizer state, activations, temporaries).

`simulate_phases(config, ...)` builds a random URSA transformer of `config`'s shape (fake unless `fake=False`,
which runs the same code for real: the tests compare the two) and runs, one process's view:

    rollout forward   one no-grad forward of `rollout_batch` images (doubled under guidance), compute dtype
    reference forward one no-grad forward of a micro-batch by the frozen reference (with `reference`)
    old-policy forward one no-grad forward of a micro-batch by the policy for the stored old log-probs (with
                      `old_policy`: rollouts reused for several updates)
    training step     forward + backward of one micro-batch: the action log-probs of `action_log_probs` (the
                      trainer's objective reads only these), gradient checkpointing as configured
    optimizer step    AdamW on the float32 master weights

in the steady state of every iteration after the first: the AdamW moments are live throughout (one step is
taken before the phases are measured).

Not simulated yet (issue 24 continues): the CTMC sampler's jump, the engines' sharding
and communication buffers, reward models, allocator fragmentation and CUDA workspaces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..models.transformer import URSAConfig, URSATransformer
from .memory import GPU_PRESETS
from .objective import action_log_probs

PHASES = ("rollout forward", "reference forward", "old-policy forward", "training step", "optimizer step")


@dataclass
class PhaseFigures:
    """One phase: `flops` counted by FlopCounterMode, `peak_bytes` the peak of live bytes by MemTracker
    category ("param", "buffer", "grad", "act", "temp", "opt", ...) and "total"."""

    flops: float
    peak_bytes: dict[str, int]


def _peak(tracker) -> dict[str, int]:
    snapshot = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snapshot.values()))
    out = {str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in per_device.items()}
    return {k: v for k, v in out.items() if v or k == "total"}


def simulate_phases(config: URSAConfig, micro_batch: int, rollout_batch: int, text_tokens: int,
                    grid: tuple[int, int], bf16: bool = True, gradient_checkpointing: int = 1,
                    guidance: bool = False, reference: bool = False, old_policy: bool = False,
                    accumulating: bool = True, fake: bool = True, seed: int = 0) -> dict[str, PhaseFigures]:
    """FLOPs and peak bytes of each phase for one process (see the module docstring). `reference`: a frozen copy in
    the compute dtype is live throughout ("reference" bytes, out of "param") and a "reference forward" phase
    gives a micro-batch's reference log-probs; `accumulating`: gradients of earlier micro-batches are live during
    the training step (every micro-batch of an update but the first)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    figures: dict[str, PhaseFigures] = {}
    compute = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    n, k = grid[0] * grid[1], config.lm_head_size
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = URSATransformer(config)
        model.set_gradient_checkpointing(gradient_checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
        for p in model.parameters():  # one step first: from the second iteration on the AdamW moments are live
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        frozen = _frozen_copy(config, compute) if reference else None
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters()) if frozen else 0

        def phase(name, fn):
            tracker = MemTracker()
            tracker.track_external(*(m for m in (model, optimizer, frozen) if m is not None))
            with tracker, FlopCounterMode(display=False) as counter:
                fn()
            peak = _peak(tracker)
            if frozen_bytes:  # tracked as parameters: named apart
                peak["param"], peak["reference"] = peak["param"] - frozen_bytes, frozen_bytes
            figures[name] = PhaseFigures(float(counter.get_total_flops()), peak)

        def tokens(rows):
            return torch.zeros(rows, text_tokens, dtype=torch.long), torch.randint(0, k, (rows, n))

        def forward(module, rows):
            module.eval()
            with torch.no_grad(), autocast:
                module.image_logits(*tokens(rows), grid)
            module.train()

        def train():
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if accumulating else None
            with autocast:
                logp = action_log_probs(model.image_logits(*tokens(micro_batch), grid),
                                        torch.randint(0, k, (micro_batch, n)))
            logp.mean().backward()

        phase("rollout forward", lambda: forward(model, rollout_batch * (2 if guidance else 1)))
        if frozen is not None:
            phase("reference forward", lambda: forward(frozen, micro_batch * (2 if guidance else 1)))
        if old_policy:
            phase("old-policy forward", lambda: forward(model, micro_batch * (2 if guidance else 1)))
        phase("training step", train)
        phase("optimizer step", optimizer.step)
    return figures


def _frozen_copy(config: URSAConfig, dtype: torch.dtype) -> URSATransformer:
    """A transformer of `config` built in `dtype` (`.to(dtype)` cannot swap fake parameters). Its parameters keep
    requires_grad (MemTracker hooks them) but it only runs under no_grad."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return URSATransformer(config)
    finally:
        torch.set_default_dtype(previous)


def gpu_memory_bytes(value: str) -> int:
    """`--gpu-memory`: GiB as a number, or a preset name of `GPU_PRESETS`; ValueError (one sentence) otherwise."""
    name = value.strip().lower()
    if name in GPU_PRESETS:
        return GPU_PRESETS[name] * 2**30
    try:
        gib = float(name)
    except ValueError:
        gib = -1.0
    if not gib > 0 or gib == float("inf"):
        raise ValueError(f"expected GiB (a positive number) or a preset: "
                         f"{', '.join(f'{k} {v}' for k, v in GPU_PRESETS.items())}; got {value!r}")
    return int(gib * 2**30)


def simulate_iteration(cfg, folder, index: dict, plan, codebook: int | None = None) -> dict:
    """One process's first training iteration of the run config `cfg` on the model in `folder` (config files
    only; `index` its model_index.json) under the batch `plan`, from `simulate_phases`: per phase its FLOPs per
    iteration (the rollout forward x sampling steps x rollout calls, the training step x micro-batches x updates)
    and peak bytes; "params", "flops" (phase -> float, "total"), "peak_bytes" (category -> int of the peak phase,
    "total"), "peak_phase". `codebook` replaces the model's codebook size K (lm_head_size; vocab_size follows)."""
    from ..models.io import read_config
    from ..models.pipeline import DEFAULT_PROMPT_LENGTH, token_grid
    from ..models.vae import vae_geometry

    data, path = read_config(folder / "transformer", "transformer/")
    if codebook:
        data = {**data, "lm_head_size": codebook, "vocab_size": data["lm_vocab_size"] + codebook}
    config = URSAConfig.from_dict(data, str(path))
    stride, size = vae_geometry(folder / "vae")
    r = cfg.sampling.rollout
    rollout_batch = r.batch_size or plan.images_per_process
    phases = simulate_phases(config, plan.micro_batch_size, rollout_batch,
                             int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH)),
                             token_grid(r.height, r.width, stride, size), cfg.bf16, cfg.model.gradient_checkpointing,
                             r.guidance_scale != 1.0, reference=cfg.reward.kl_beta > 0 and cfg.model.lora is None,
                             old_policy=cfg.training.updates_per_rollout > 1, accumulating=plan.grad_accum_steps > 1)
    calls = {"rollout forward": r.num_inference_steps * -(-plan.images_per_process // rollout_batch),
             "reference forward": plan.grad_accum_steps, "old-policy forward": plan.grad_accum_steps,
             "training step": plan.grad_accum_steps * cfg.training.updates_per_rollout,
             "optimizer step": cfg.training.updates_per_rollout}
    flops = {name: fig.flops * calls[name] for name, fig in phases.items()}
    peak_phase = max(phases, key=lambda name: phases[name].peak_bytes["total"])
    with torch.device("meta"):
        params = sum(p.numel() for p in URSATransformer(config).parameters())
    return {"params": params, "trainable_params": params, "codebook": config.lm_head_size,
            "flops": {**flops, "total": sum(flops.values())}, "peak_bytes": phases[peak_phase].peak_bytes,
            "peak_phase": peak_phase,
            "phases": {name: {"flops": flops[name], "peak_bytes": fig.peak_bytes} for name, fig in phases.items()}}
