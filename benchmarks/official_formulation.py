"""Ours vs the reference implementation's formulation of one UDM-GRPO iteration, on torch fake tensors (shapes and
dtypes, no storage): FLOPs per phase and per iteration, peak live bytes per phase, and ours / official.

    python benchmarks/official_formulation.py [--codebook K] [--engine zero2|ddp] [--fp32-log-softmax]
                                              [--no-entropy] [--json]

Setting: URSA-1.7B shape (`configs/shapes/ursa-1.7b-ibq512`, K = 131,072 is not confirmed: `--codebook`), 320
text + BOV + 32 x 32 image tokens, the paper's GenEval recipe per GPU (16 prompts x 8 images over 32 GPUs = 4
images: one rollout call of 4 over 10 steps, guidance 1, micro-batch 4 x 3 trained timesteps, kl_beta 0.05 with a
frozen bf16 reference, gradient checkpointing level 1, bf16). Ours is `udm_grpo.grpo.simulate.simulate_phases`;
the official formulation is `simulate_official` below, on the same `URSATransformer` weights. Ours' phases are
matched by name prefix (rollout, reference, old-policy, training, optimizer) and scaled per iteration as
`simulate_iteration` does; the official calls per iteration are 10 rollout steps, 2 x 3 reference passes, 3
training steps, 1 optimizer step.

How the official formulation is modelled (shared/docs/reference-behaviour.md; section numbers there):
- Engine held equal, the paper's (5.2, 5.6): DeepSpeed ZeRO-2 on 32 GPUs, bf16. A phase's bytes per GPU are
  what ZeRO-2 stores (`memory.engine_state`, as `train --check --simulate` composes them: bf16 weights, float32
  master and moment shards, gradient shards and the reduce bucket in the update, the bf16 reference) plus the
  transient bytes measured (activations, temporaries, buffers, path tables) with the forwards reading a bf16
  module. `--engine ddp`: float32 masters under autocast instead. Only the transient bytes and the FLOPs differ
  between the two formulations; "transient" is printed apart.
- Logits (1.6, 10.15): final norm + lm head at all S = L + 1 + N positions, a (B, S, K) table in the compute
  dtype, then the image rows [-(N+1):-1] are sliced out.
- Rollout step (3.4, 4.3): the forward, then one CTMC jump step (k < n - 1; counted for all 10 steps, though
  the last only draws: the jump's one distance product is ~1.4% of a step). The doc gives the tables, not the op
  order; modelled with the fewest tables it allows: x1 ~ softmax(logits) as a full bf16 table, drawn as
  torch.multinomial draws one sample (table / Exp(1) noise, argmax: one more table); distances to the whole
  codebook in float16 as |a|^2 + |b|^2 - 2ab (an addmm over the path-embedding width D, the VAE's
  `vq_embed_dim`, 256, not confirmed); p_t(.|x1) = softmax(-beta d) written in place into the image-logits
  buffer ("overwrites the logits buffer", 3.4); the gap max(0, d_t - d) table; their product in place, zero at
  x_t, R = its row sum; the jump target drawn from the product (its reshape copies: the slice is not contiguous).
- Reference (4.7, 9): a frozen bf16 copy run twice per micro-step (the double preprocess); each pass makes
  whole-sequence logits, a log-softmax table (B, N, K) in the logits' dtype and gathers the actions.
- No old-policy pass: old log-probs are never stored (4.3, 10.5) and the GenEval recipe reuses no rollout.
- Training step (4.6): whole-sequence logits with grad, log_softmax over the image rows in the logits' dtype
  (bf16, 4.6; float32 with --fp32-log-softmax), kept for backward; gather, float32 sequence mean, ratio
  exp(l - sg l), clip, k3 KL on sequence means, loss / GAS; the entropy metric over all S positions (4.6) as
  -sum softmax * log_softmax in bf16 under no_grad, freed before the backward (the reading that costs least;
  --no-entropy drops it). Advantages and reference log-probs are stand-ins of their shapes; no .item() metrics.
- Path tables: the fp16 path embedding and its unit rows and squared norms, resident (ours: simulate.py's).
- In neither side: the forward-process re-noising (add_noise: a (B, N, K) table per trained timestep in the
  reference, 3.5), VAE decode, rewards, the stored rollout states, allocator fragmentation, CUDA workspaces.
- Ours' sampler is simulate.py's, with its stand-ins (every token jumps: an upper bound; one row chunk counted
  and its FLOPs extrapolated to the others, "sampler (extrapolated)" below).
- FLOPs are simulate.py's `FlopCount` (torch's formulas): matrix products and attention only (softmax, exp and
  the draws are elementwise and not counted; simulate.py registers torch's SDPA formulas for the CPU attention
  kernel that fake CPU tensors run, so attention is counted on both sides). Consumers are told by shapes
  (`_category`): lm head, sampler (distances to the codebook), MLP, attention (SDPA) and attention projections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udm_grpo.grpo.simulate import PhaseFigures, build_policy_model, measure, simulate_phases, steady_adamw  # noqa: E402
from udm_grpo.models.transformer import URSAConfig, URSATransformer, rope_positions  # noqa: E402

GIB = 2**30
PREFIXES = ("rollout decode", "rollout", "reference", "old-policy", "training", "optimizer")
RECIPE = "geneval_ursa_1.7b"
PAPER_PROCESSES = 32  # 4 nodes x 8 GPUs: 128 images / 32 = 4 per GPU (reference-behaviour.md 4.9)


def shape_folder() -> Path:
    from udm_grpo.recipes import CONFIGS

    return CONFIGS / "shapes" / "ursa-1.7b-ibq512"


def kind(name: str) -> str:
    """The phase kind of a phase name: its prefix in PREFIXES (ValueError if none)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return prefix
    raise ValueError(f"phase {name!r} starts with none of {PREFIXES}")


class Recipe(NamedTuple):
    """One GPU's share of an iteration."""

    micro_batch: int
    rollout_batch: int
    rollout_calls: int
    steps: int
    grad_accum: int
    updates: int = 1
    reference: bool = True
    guidance: bool = False
    bf16: bool = True
    checkpointing: int = 1
    kl_beta: float = 0.05
    ratio_clip: float = 1e-4

    def calls(self, official: bool) -> dict[str, int]:
        """Calls per iteration by phase kind; the reference runs its reference pass twice per micro-step."""
        return {"rollout": self.steps * self.rollout_calls, "rollout decode": self.rollout_calls,
                "reference": self.grad_accum * (2 if official else 1),
                "old-policy": 0 if official else self.grad_accum, "training": self.grad_accum * self.updates,
                "optimizer": self.updates}


def paper_recipe() -> tuple[Recipe, object, str]:
    """(Recipe, run config, plan description) of the packaged GenEval recipe on the paper's 32 GPUs."""
    from udm_grpo.grpo.batching import plan_from_config
    from udm_grpo.recipes import run_config

    cfg = run_config(RECIPE)
    plan = plan_from_config(cfg, PAPER_PROCESSES)
    r = cfg.sampling.rollout
    rollout_batch = r.batch_size or plan.images_per_process
    recipe = Recipe(plan.micro_batch_size, rollout_batch, -(-plan.images_per_process // rollout_batch),
                    r.num_inference_steps, plan.grad_accum_steps, cfg.training.updates_per_rollout,
                    cfg.reward.kl_beta > 0 and cfg.model.lora is None, r.guidance_scale != 1.0, cfg.bf16,
                    cfg.model.gradient_checkpointing, cfg.reward.kl_beta, cfg.reward.ratio_clipping)
    return recipe, cfg, plan.describe()


# -- the official formulation ----------------------------------------------------------------------------------

def official_logits(model: URSATransformer, text_ids: torch.Tensor, image_ids: torch.Tensor,
                    grid: tuple[int, int]) -> torch.Tensor:
    """Float[B, L + 1 + N, K]: norm + lm head at every position of [text | BOV | image] (the reference's
    readout); its image logits are `[:, -(N+1):-1]`."""
    batch, text_len = text_ids.shape
    bov = text_ids.new_full((batch, 1), model.config.bov_token_id)
    ids = torch.cat([text_ids, bov, image_ids + model.image_offset], dim=1)
    return model(ids, rope_positions(text_len, grid, device=ids.device))


def official_log_probs(image_logits: torch.Tensor, actions: torch.Tensor,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float32[B, N]: a full log_softmax table over K (in the logits' dtype unless `dtype`), then the gather."""
    table = torch.log_softmax(image_logits, dim=-1, dtype=dtype)
    return table.gather(-1, actions.unsqueeze(-1)).squeeze(-1).float()


def draw_one(table: torch.Tensor) -> torch.Tensor:
    """Long[M]: one category per row of a non-negative table [M, K], as torch.multinomial draws one sample
    (argmax of table / Exp(1) noise; one more table)."""
    noise = torch.empty_like(table).exponential_()
    return torch.div(table, noise, out=noise).argmax(dim=-1)


def official_sampler_step(image_logits: torch.Tensor, x_t: torch.Tensor, emb: torch.Tensor, sq_norm: torch.Tensor,
                          beta: float, dbeta: float, dt: float) -> torch.Tensor:
    """Long[B, N]: one metric-path CTMC jump step on full (B*N, K) tables (see the module docstring);
    `image_logits` is the image view of the whole-sequence logits and is overwritten."""
    batch, n, k = image_logits.shape
    probs = torch.softmax(image_logits, dim=-1)
    x1 = draw_one(probs.view(-1, k))
    del probs
    d = torch.addmm(sq_norm[x1, None] + sq_norm[None, :], emb[x1], emb.t(), alpha=-2.0)  # (B*N, K) distances
    gap = (d.gather(1, x_t.reshape(-1, 1)) - d).clamp_min_(0.0)
    u = image_logits  # p_t(. | x1) = softmax(-beta d) in the logits buffer
    u.copy_(d.view(batch, n, k)).mul_(-beta)
    del d
    u.sub_(u.amax(dim=-1, keepdim=True)).exp_()
    u.div_(u.sum(dim=-1, keepdim=True))
    u.mul_(gap.view(batch, n, k)).mul_(dbeta)
    del gap
    u.scatter_(-1, x_t.unsqueeze(-1), 0.0)
    rate = u.sum(dim=-1, dtype=torch.float32)
    jumps = torch.rand(batch, n) < -torch.expm1(-dt * rate)
    target = draw_one(u.reshape(-1, k)).view(batch, n)
    return torch.where(jumps, target, x_t)


def simulate_official(config: URSAConfig, micro_batch: int, rollout_batch: int, text_tokens: int,
                      grid: tuple[int, int], path_dim: int, bf16: bool = True, gradient_checkpointing: int = 1,
                      reference: bool = True, accumulating: bool = True, grad_accum: int = 3,
                      kl_beta: float = 0.05, ratio_clip: float = 1e-4, entropy: bool = True,
                      log_softmax_dtype: torch.dtype | None = None, module_dtype: torch.dtype | None = None,
                      fake: bool = True, seed: int = 0) -> dict[str, PhaseFigures]:
    """The official formulation's phases for one process, as `simulate_phases` measures ours: "rollout step",
    "reference forward" (one of its passes), "training step", "optimizer step". `module_dtype`: the dtype of the
    policy module the forwards read (default float32 masters under autocast; bf16 for DeepSpeed's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(seed)
    figures: dict[str, PhaseFigures] = {}
    compute = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    n, k = grid[0] * grid[1], config.lm_head_size
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = build_policy_model(config, module_dtype or torch.float32, None, fake)
        model.set_gradient_checkpointing(gradient_checkpointing)
        optimizer = steady_adamw(list(model.parameters()))
        frozen = build_policy_model(config, compute, None, fake) if reference else None
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters()) if frozen else 0
        raw = torch.randn(k, path_dim, dtype=torch.float16)  # the scheduler's fp16 path.emb, and its unit rows
        emb = torch.nn.functional.normalize(raw.float(), dim=-1).half()
        sq_norm = (emb * emb).sum(-1)
        resident = sum(t.numel() * t.element_size() for t in (raw, emb, sq_norm))

        def phase(name, fn):
            flops, peak = measure(lambda counter: fn(), model, optimizer, frozen)
            if frozen_bytes:
                peak["param"], peak["reference"] = peak["param"] - frozen_bytes, frozen_bytes
            peak["pipeline"], peak["total"] = peak.get("pipeline", 0) + resident, peak["total"] + resident
            figures[name] = PhaseFigures(flops, peak)

        def tokens(rows):
            return torch.zeros(rows, text_tokens, dtype=torch.long), torch.randint(0, k, (rows, n))

        def rollout():
            model.eval()
            text, x_t = tokens(rollout_batch)
            with torch.no_grad():
                with autocast:
                    logits = official_logits(model, text, x_t, grid)
                official_sampler_step(logits[:, -(n + 1):-1], x_t, emb, sq_norm, beta=1.0, dbeta=1.0, dt=0.1)
            model.train()

        def reference_pass():
            text, states = tokens(micro_batch)
            with torch.no_grad(), autocast:
                logits = official_logits(frozen, text, states, grid)
                official_log_probs(logits[:, -(n + 1):-1], torch.randint(0, k, (micro_batch, n)),
                                   log_softmax_dtype).mean(1)

        def loss():
            text, states = tokens(micro_batch)
            advantages, ref = torch.randn(micro_batch), torch.randn(micro_batch)  # stand-ins
            with autocast:
                logits = official_logits(model, text, states, grid)
                seq = official_log_probs(logits[:, -(n + 1):-1], torch.randint(0, k, (micro_batch, n)),
                                         log_softmax_dtype).mean(1)
                ratio = torch.exp(seq - seq.detach())
                policy = -torch.minimum(advantages * ratio,
                                        advantages * ratio.clamp(1 - ratio_clip, 1 + ratio_clip)).mean()
                gap = ref - seq
                kl = (torch.exp(gap) - gap - 1).mean()
                if entropy:  # the logged entropy, over all S positions
                    with torch.no_grad():
                        probs = torch.softmax(logits, dim=-1)
                        (-(probs * torch.log_softmax(logits, dim=-1)).sum(-1)).mean()
                        del probs
            return (policy + kl_beta * kl) / grad_accum

        def train():
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if accumulating else None
            loss().backward()

        phase("rollout step", rollout)
        if frozen is not None:
            phase("reference forward", reference_pass)
        phase("training step", train)
        phase("optimizer step", optimizer.step)
    return figures


# -- FLOPs by consumer ---------------------------------------------------------------------------------------------

def _category(op: str, args: tuple, out: torch.Tensor | None, config: URSAConfig, path_dim: int) -> str:
    """What a counted op computes, told by its shapes: SDPA -> attention; a product over the path-embedding width
    (when no model size equals it) or into K columns otherwise -> the sampler's distances; over hidden into K, over
    K, or into (K, hidden) -> the lm head; touching the intermediate size -> MLP; the rest -> attention
    projections."""
    if "attention" in op:
        return "attention (SDPA)"
    k, h = config.lm_head_size, config.hidden_size
    model_sizes = {k, h, config.intermediate_size, config.head_dim, config.num_attention_heads * config.head_dim,
                   config.num_key_value_heads * config.head_dim}
    mats = [t for t in args if isinstance(t, torch.Tensor) and t.dim() >= 2][-2:]
    inner = mats[0].shape[-1] if len(mats) == 2 else None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    if inner == path_dim and path_dim not in model_sizes:
        return "sampler"
    if inner == k or (k in shape and inner == h) or sorted(shape[-2:]) == sorted((k, h)):
        return "lm head"
    if k in shape:
        return "sampler"
    if config.intermediate_size in {s for t in (*mats, out) if isinstance(t, torch.Tensor) for s in t.shape}:
        return "MLP"
    return "attention projections"


@contextlib.contextmanager
def counted_flops(config: URSAConfig, path_dim: int):
    """While active, each op every FlopCount counts is appended
    to the yielded list as (counter, category, flops), in order."""
    from torch.utils import flop_counter

    registry = flop_counter.flop_registry
    saved = dict(registry)
    events: list[tuple[object, str, int]] = []

    def recording(op, formula):
        def count(*args, out_val=None, **kwargs):
            flops = formula(*args, out_val=out_val, **kwargs)
            counter = sys._getframe(1).f_locals.get("self")  # FlopCount.__torch_dispatch__ calls the formula
            events.append((counter, _category(str(op), args, out_val, config, path_dim), int(flops)))
            return flops
        return count

    try:
        for op, formula in list(registry.items()):
            registry[op] = recording(op, formula)
        yield events
    finally:
        registry.clear()
        registry.update(saved)


def split_by_phase(events: list[tuple[object, str, int]],
                   phases: dict[str, PhaseFigures]) -> dict[str, Counter] | None:
    """The recorded events grouped by counter, in order, one counter per phase that counted anything; FLOPs a
    phase reports beyond its counted ops (simulate.py extrapolates the sampler's row chunks from one) go to
    "sampler (extrapolated)" in a rollout phase, "unattributed" elsewhere. None when they do not add up."""
    groups: dict[int, Counter] = {}
    for counter, category, flops in events:
        if flops:
            groups.setdefault(id(counter), Counter())[category] += flops
    tallies, out = iter(groups.values()), {}
    for name, fig in phases.items():
        tally = next(tallies, Counter()) if fig.flops else Counter()
        rest = fig.flops - sum(tally.values())
        if rest < 0:
            return None
        if rest:
            tally["sampler (extrapolated)" if kind(name) == "rollout" else "unattributed"] += rest
        out[name] = tally
    return out if next(tallies, None) is None else None
    return out


# -- the comparison --------------------------------------------------------------------------------------------

STATIC = ("param", "grad", "opt", "reference", "total")  # what the engine stores; the rest is transient


def transient(peak: dict[str, int]) -> int:
    """Bytes at a phase's peak outside the engine's stores: activations, temporaries, buffers, the path table."""
    return sum(v for c, v in peak.items() if c not in STATIC)


def compare(config: URSAConfig, recipe: Recipe, text_tokens: int, grid: tuple[int, int], path_dim: int,
            engine: str = "zero2", processes: int = PAPER_PROCESSES, entropy: bool = True,
            log_softmax_dtype: torch.dtype | None = None) -> dict:
    """Both sides simulated and scaled per iteration (a JSON-able dict). A phase's per-GPU bytes are what `engine`
    stores on one of `processes` GPUs (`memory.engine_state`, as `train --check --simulate` composes them) plus
    the transient bytes measured; the forwards read a bf16 module except under DDP (float32 masters)."""
    from udm_grpo.grpo.memory import Shape, engine_state

    module_dtype = torch.bfloat16 if recipe.bf16 and engine != "ddp" else None
    state = engine_state(Shape.from_config(config), engine, processes, recipe.bf16, None, recipe.reference)
    sides = {}
    for side in ("ours", "official"):
        start = time.perf_counter()
        with counted_flops(config, path_dim) as events:
            if side == "ours":
                phases = simulate_phases(config, recipe.micro_batch, recipe.rollout_batch, text_tokens, grid,
                                         bf16=recipe.bf16, gradient_checkpointing=recipe.checkpointing,
                                         guidance=recipe.guidance, reference=recipe.reference,
                                         old_policy=recipe.updates > 1, accumulating=recipe.grad_accum > 1,
                                         module_dtype=module_dtype)
            else:
                if recipe.guidance:
                    raise ValueError("the reference's recipes are CFG-free; guidance is not modelled for it")
                phases = simulate_official(config, recipe.micro_batch, recipe.rollout_batch, text_tokens, grid,
                                           path_dim, recipe.bf16, recipe.checkpointing, recipe.reference,
                                           recipe.grad_accum > 1, recipe.grad_accum, recipe.kl_beta,
                                           recipe.ratio_clip, entropy, log_softmax_dtype, module_dtype)
        calls = recipe.calls(official=side == "official")
        by_phase = split_by_phase(events, phases)
        consumers = Counter()
        for name, tally in (by_phase or {}).items():
            for category, flops in tally.items():
                consumers[category] += flops * calls[kind(name)]
        rows = {}
        for name, fig in phases.items():
            update = kind(name) in ("training", "optimizer")
            stored = {c: int(v[update]) for c, v in state.items() if v[update]}
            n_calls = calls[kind(name)]
            rows[name] = {"calls": n_calls, "flops_per_call": fig.flops, "flops": fig.flops * n_calls,
                          "measured_bytes": fig.peak_bytes, "engine_bytes": stored,
                          "transient_bytes": transient(fig.peak_bytes),
                          "peak_bytes": sum(stored.values()) + transient(fig.peak_bytes)}
        sides[side] = {"seconds": time.perf_counter() - start, "phases": rows,
                       "consumers": dict(consumers) if by_phase is not None else None}
    pairs = {}
    for prefix in PREFIXES:
        pair = {side: next((dict(v, name=n) for n, v in sides[side]["phases"].items() if kind(n) == prefix), None)
                for side in sides}
        if any(pair.values()):
            pairs[prefix] = pair
    totals = {}
    for side, data in sides.items():
        rows = data["phases"]
        peak = max(rows, key=lambda n, rows=rows: rows[n]["peak_bytes"])
        totals[side] = {"flops": sum(r["flops"] for r in rows.values()), "peak_bytes": rows[peak]["peak_bytes"],
                        "peak_phase": peak, "transient_bytes": max(r["transient_bytes"] for r in rows.values())}
    ratio = {key: totals["ours"][key] / totals["official"][key] for key in ("flops", "peak_bytes", "transient_bytes")}
    return {"codebook": config.lm_head_size, "text_tokens": text_tokens, "grid": list(grid), "path_dim": path_dim,
            "engine": engine, "processes": processes, "recipe": recipe._asdict(), "phases": pairs, "totals": totals,
            "ratio": ratio, "targets": {"peak_bytes": 0.5, "flops": 0.9},
            "consumers": {side: s["consumers"] for side, s in sides.items()},
            "seconds": {side: s["seconds"] for side, s in sides.items()}}


def _get(key: str, row: dict | None) -> float | None:
    return row[key] if row else None


def _verdict(value: float, target: float) -> str:
    return f"{value:.3f} vs target <= {target} ({'met' if value <= target else 'NOT met'})"


def _cells(a: float | None, b: float | None, scale: float, width: int) -> str:
    nums = "".join(f"{x / scale:{width}.2f}" if x is not None else f"{'-':>{width}s}" for x in (a, b))
    return nums + (f"{a / b:7.3f}" if a is not None and b else f"{'-':>7s}")


def render(result: dict) -> str:
    """The tables: per phase and per iteration, then the FLOPs per iteration by consumer."""
    where = f"{result['engine']} x {result['processes']}"
    lines = [f"{'phase':19s} {'calls':>13s} {'TFLOP per iteration':>26s}  {'GiB per GPU, ' + where:>28s}"
             f"  {'transient GiB':>26s}",
             f"{'':19s} {'ours / off':>13s} {'ours  official  ratio':>26s}  {'ours  official  ratio':>28s}"
             f"  {'ours  official  ratio':>26s}"]
    for pair in result["phases"].values():
        ours, off = pair["ours"], pair["official"]
        calls = f"{ours['calls'] if ours else 0} / {off['calls'] if off else 0}"
        lines.append(f"{(ours or off)['name']:19s} {calls:>13s}"
                     f" {_cells(_get('flops', ours), _get('flops', off), 1e12, 10)}"
                     f"  {_cells(_get('peak_bytes', ours), _get('peak_bytes', off), GIB, 11)}"
                     f"  {_cells(_get('transient_bytes', ours), _get('transient_bytes', off), GIB, 10)}")
    t, r = result["totals"], result["ratio"]
    lines.append(f"{'iteration':19s} {'':13s} {_cells(t['ours']['flops'], t['official']['flops'], 1e12, 10)}"
                 f"  {_cells(t['ours']['peak_bytes'], t['official']['peak_bytes'], GIB, 11)}"
                 f"  {_cells(t['ours']['transient_bytes'], t['official']['transient_bytes'], GIB, 10)}")
    lines += [f"ours / official: FLOPs {_verdict(r['flops'], result['targets']['flops'])}; peak per GPU "
              f"{_verdict(r['peak_bytes'], result['targets']['peak_bytes'])}; transient peak "
              f"{r['transient_bytes']:.3f}",
              f"peak phase: ours {t['ours']['peak_phase']}, official {t['official']['peak_phase']}"]
    for side in ("ours", "official"):
        name = t[side]["peak_phase"]
        row = next(pair[side] for pair in result["phases"].values() if pair[side] and pair[side]["name"] == name)
        parts = {**row["engine_bytes"], **{c: v for c, v in row["measured_bytes"].items() if c not in STATIC}}
        lines.append(f"  {side:8s} at its peak, GiB: " + ", ".join(f"{c} {v / GIB:.2f}" for c, v in parts.items()))
    ours, off = result["consumers"]["ours"], result["consumers"]["official"]
    if ours is None or off is None:
        lines.append("FLOPs by consumer: unavailable (the counted ops did not add up to the phases' FLOPs)")
        return "\n".join(lines)
    total = sum(ours.values())
    lines.append(f"{'FLOPs per iteration by consumer':32s} {'TFLOP: ours  official  ratio':>30s}  share of ours"
                 f"  ours - official")
    for category in sorted(set(ours) | set(off), key=lambda c: -ours.get(c, 0)):
        a, b = ours.get(category, 0), off.get(category, 0)
        lines.append(f"  {category:30s} {_cells(a, b, 1e12, 10)}  {a / total:12.1%}  {(a - b) / 1e12:15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codebook", type=int, default=None, help="K (lm_head_size; default the shape's 131,072, "
                    "not confirmed)")
    ap.add_argument("--shape", type=Path, default=None, help="a model folder's config files (default URSA-1.7B)")
    ap.add_argument("--engine", choices=("zero2", "ddp"), default="zero2",
                    help="what each GPU stores: the paper's DeepSpeed ZeRO-2 (default) or DDP, on 32 GPUs")
    ap.add_argument("--fp32-log-softmax", action="store_true", help="the official log-softmax tables in float32")
    ap.add_argument("--no-entropy", action="store_true", help="leave out the official entropy metric")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    args = ap.parse_args(argv)
    from udm_grpo.models.io import read_config
    from udm_grpo.models.pipeline import DEFAULT_PROMPT_LENGTH, token_grid
    from udm_grpo.models.vae import vae_geometry

    folder = args.shape or shape_folder()
    data, path = read_config(folder / "transformer", "transformer/")
    if args.codebook:
        data = {**data, "lm_head_size": args.codebook, "vocab_size": data["lm_vocab_size"] + args.codebook}
    config = URSAConfig.from_dict(data, str(path))
    index, _ = read_config(folder, "model", "model_index.json")
    text_tokens = int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH))
    path_dim = int(read_config(folder / "vae", "vae/")[0].get("vq_embed_dim", 256))
    recipe, cfg, plan = paper_recipe()
    stride, size = vae_geometry(folder / "vae")
    grid = token_grid(cfg.sampling.rollout.height, cfg.sampling.rollout.width, stride, size)
    result = compare(config, recipe, text_tokens, grid, path_dim, args.engine, PAPER_PROCESSES,
                     entropy=not args.no_entropy, log_softmax_dtype=torch.float32 if args.fp32_log_softmax else None)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{folder.name}: K = {config.lm_head_size:,}, {text_tokens} text + 1 + {grid[0] * grid[1]:,} image "
          f"tokens, path dim {path_dim}; {RECIPE} on {PAPER_PROCESSES} GPUs: {plan}; rollout batch "
          f"{recipe.rollout_batch} x {recipe.steps} steps; official log-softmax "
          f"{'float32' if args.fp32_log_softmax else 'in the logits dtype'}, entropy metric "
          f"{'off' if args.no_entropy else 'on'}; simulated in {result['seconds']['ours']:.0f} s (ours) + "
          f"{result['seconds']['official']:.0f} s (official)")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
