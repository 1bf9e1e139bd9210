"""`udm-grpo train --check --simulate --fit`: the plan predicted fastest among those whose simulated peak fits a GPU.

Searched, for the configured recipe and process count: `training.micro_batch_size` and `sampling.rollout.batch_size`
(divisors of a process's images), `model.gradient_checkpointing` (0-3), offload where an engine has it (DeepSpeed
ZeRO-2 with `training.offload_optimizer`, ZeRO-3 with it and `training.offload_param`, FSDP2 with
`training.offload_param`) beside the configured engine without offload, and, only when asked, LoRA on and off.

A candidate's transient bytes and FLOPs per phase come from simulations at the full shape with batch 1 and 2 (the
micro-batch for the update's phases, the rollout batch for the rollout's), extrapolated linearly, v(B) = v1 + (B - 1)
(v2 - v1): every tensor but the weights' casts is linear in the batch. The rollout phases are simulated per (LoRA,
module dtype), the update's also per checkpointing level. What the engine stores comes from `memory.engine_state`.
The winner is then simulated whole; if that does not fit, the next candidate is tried. (Fewer transformer blocks do
not extrapolate: the training step's peak moves from the logit tables to the saved activations as blocks are added.)

Predicted seconds per iteration: FLOPs / (peak FLOP/s x MFU), plus with offload the bytes moved over PCIe (25 GB/s:
gradients down and weights up once per update; with parameter offload, every forward's weights) and the CPU's AdamW
over the offloaded state (16 bytes a trainable parameter at 10 GB/s): rough figures, stated as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from .simulate import PHASES, Iteration, PhaseFigures, iteration_figures, simulate_phases

PHASES_TRAINED = tuple(p for p in PHASES if not p.startswith("rollout"))

PCIE_BYTES_PER_S = 25e9
CPU_ADAM_BYTES_PER_S = 10e9
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@dataclass(frozen=True)
class Candidate:
    """One plan: the iteration it runs, its predicted peak bytes per process and seconds per iteration."""

    iteration: Iteration
    peak_bytes: int
    peak_phase: str
    seconds: float

    def overrides(self, base: Iteration) -> list[str]:
        """KEY=VALUE overrides that turn the run config of `base` into this plan."""
        it, out = self.iteration, []
        if it.micro_batch != base.micro_batch:
            out.append(f"training.micro_batch_size={it.micro_batch}")
        if it.rollout_batch != base.rollout_batch:
            out.append(f"sampling.rollout.batch_size={it.rollout_batch}")
        if it.level != base.level:
            out.append(f"model.gradient_checkpointing={it.level}")
        if it.lora != base.lora:
            out.append(f"model.lora={json.dumps(it.lora, separators=(',', ':'))}" if it.lora else "model.lora=null")
        if it.engine != base.engine:
            engine = "deepspeed" if it.engine.startswith("zero") else it.engine
            out.append(f"training.engine={engine}")
            if engine == "deepspeed":
                out.append(f"training.zero_stage={it.engine[-1]}")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(it, key) != getattr(base, key):
                out.append(f"training.{key}={str(getattr(it, key)).lower()}")
        return out

    def describe(self) -> str:
        it = self.iteration
        offload = [k for k in ("offload_optimizer", "offload_param") if getattr(it, k)]
        return (f"{it.engine}{' + ' + ' + '.join(offload) if offload else ''}, micro-batch {it.micro_batch}, rollout "
                f"batch {it.rollout_batch}, checkpointing {it.level}{', LoRA' if it.lora else ''}: peak "
                f"{self.peak_bytes / 2**30:.2f} GiB in the {self.peak_phase}, predicted {self.seconds:.2f} s")


ROLLOUT = ("rollout step", "rollout decode")


class Scaling:
    """`simulate_phases` figures at any batch from simulations at batch 1 and 2 (module docstring), cached: the
    rollout phases per (LoRA, module dtype), the others also per checkpointing level."""

    def __init__(self):
        self._points: dict[str, dict[int, dict[str, PhaseFigures]]] = {}

    def _at(self, args: dict, names: tuple[str, ...], ignore: tuple[str, ...]) -> dict[int, dict[str, PhaseFigures]]:
        key = repr(({k: v for k, v in args.items() if k not in ignore}, names))
        if key not in self._points:
            self._points[key] = {b: simulate_phases(**{**args, "micro_batch": b, "rollout_batch": b, "only": names})
                                 for b in (1, 2)}
        return self._points[key]

    def phases(self, it: Iteration) -> dict[str, PhaseFigures]:
        args, batches = it.phase_args(), ("micro_batch", "rollout_batch")
        rollout = self._at(args, ROLLOUT, (*batches, "gradient_checkpointing"))
        trained = self._at(args, PHASES_TRAINED, batches)
        points, second = ({**rollout[b], **trained[b]} for b in (1, 2))
        out = {}
        for name in (p for p in PHASES if p in points):
            batch = it.rollout_batch if name in ROLLOUT else it.micro_batch
            one, two = points[name], second[name]

            def line(v1: float, v2: float, batch=batch) -> float:
                return v1 + (batch - 1) * (v2 - v1)

            out[name] = PhaseFigures(line(one.flops, two.flops), {
                k: line(one.peak_bytes.get(k, 0), two.peak_bytes.get(k, 0))
                for k in set(one.peak_bytes) | set(two.peak_bytes)})
        return out


def offload_seconds(it: Iteration, figures: dict) -> float:
    """The offload's rough extra time per iteration (module docstring)."""
    if not (it.offload_optimizer or it.offload_param):
        return 0.0
    c, t, w = (2 if it.bf16 else 4), figures["trainable_params"], it.processes
    moved = it.updates * (4 + c) * t / w
    if it.offload_param and it.engine == "zero3":
        calls = it.calls()
        forwards = sum(calls.get(p, 0) for p in ("rollout step", "reference forward", "old-policy forward"))
        moved += (forwards + 2 * calls["training step"]) * c * figures["params"] / w
    return moved / PCIE_BYTES_PER_S + it.updates * 16 * t / w / CPU_ADAM_BYTES_PER_S


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _engines(it: Iteration) -> list[tuple[str, bool, bool]]:
    """(engine, offload_optimizer, offload_param): the configured one, then the offloading ones."""
    options = [(it.engine, it.offload_optimizer, it.offload_param), ("zero2", True, False), ("zero3", True, False),
               ("zero3", True, True), ("fsdp", False, True)]
    return list(dict.fromkeys(options))


def candidates(it: Iteration, peak_flops: float, scaling: Scaling | None = None,
               lora: bool = False) -> list[Candidate]:
    """Every plan of the search space for `it` (module docstring), fastest first (ties: larger batches, less
    checkpointing, no offload). `peak_flops`: the GPU's FLOP/s times the MFU."""
    scaling = scaling or Scaling()
    loras = [it.lora] + ([x for x in (None, it.lora or DEFAULT_LORA) if x != it.lora] if lora else [])
    out = []
    for level in range(4):
        for adapters in loras:
            for engine, opt, par in _engines(it):
                base = replace(it, level=level, lora=adapters, engine=engine, offload_optimizer=opt,
                               offload_param=par)
                for micro in _divisors(it.images):
                    for rollout in _divisors(it.images):
                        v = replace(base, micro_batch=micro, rollout_batch=rollout)
                        figures = iteration_figures(v, scaling.phases(v))
                        seconds = figures["flops"]["total"] / peak_flops + offload_seconds(v, figures)
                        out.append(Candidate(v, figures["peak_bytes"]["total"], figures["peak_phase"], seconds))
    return sorted(out, key=lambda c: (round(c.seconds, 3), -c.iteration.micro_batch, -c.iteration.rollout_batch,
                                      c.iteration.level, c.iteration.offload_optimizer + c.iteration.offload_param))


def fit(it: Iteration, gpu_bytes: int, peak_flops: float, lora: bool = False) -> tuple[Candidate | None, dict | None,
                                                                                          Candidate]:
    """(the fastest plan that fits `gpu_bytes`, its whole simulation) or (None, None) when none does, and the plan
    with the smallest peak (for the refusal's sentence)."""
    ranked = candidates(it, peak_flops, lora=lora)
    smallest = min(ranked, key=lambda c: c.peak_bytes)
    for candidate in (c for c in ranked if c.peak_bytes <= gpu_bytes):
        whole = iteration_figures(candidate.iteration, simulate_phases(**candidate.iteration.phase_args()))
        if whole["peak_bytes"]["total"] <= gpu_bytes:
            return candidate, whole, smallest
    return None, None, smallest
