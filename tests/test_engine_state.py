"""`memory.engine_state` against the engines themselves: 2 processes on CPU (gloo), the tiny random world, one
update in bf16 compute after a first one (full fine-tune, and LoRA under DDP and two sharded engines).

Each process measures what its engine holds (`distributed_worker.held_storages`, independent of engine_state):
the distinct storages, each counted once, of the masters (what the optimizer steps), the weights (the module's
other parameters; ZeRO-3's partitions), the gradients (`.grad`, DeepSpeed's flat buffers and buckets, DDP's
buckets), the AdamW state and the frozen reference, after the first optimizer step and `zero_grad` ("outside the
update"), and after each backward of that update and before its step. Outside the update each category must equal
engine_state's within 10% or `SLACK` bytes; during the update the sampled points only bound the engine's peak from
below, so they must not exceed it. Engines that cannot run here are skipped with the engine's message.
"""

import importlib.util
import json

import pytest

from udm_grpo.grpo.memory import Shape, engine_state

from .test_distributed import launch
from .test_pipeline import tiny_pipeline

KINDS = {"ddp": "ddp", "deepspeed-1": "zero1", "deepspeed-2": "zero2", "deepspeed-3": "zero3", "fsdp": "fsdp"}
CASES = [("bf16", engine) for engine in KINDS] + [("lora-bf16", e) for e in ("ddp", "deepspeed-3", "fsdp")]
STORED = ("masters", "weights", "optimizer", "gradients", "reference")
# Tiny-shape effects, in bytes: AdamW's step counters (4 bytes a parameter tensor, 25 of them), DeepSpeed's
# gradient-norm scalars, the alignment padding of DeepSpeed's flat buffers and of FSDP2's shards.
SLACK = 512


def measure(tmp_path, monkeypatch, recipe: str, engine: str) -> list[dict]:
    """Both processes' `state.rank<R>.json` from one real step of `engine`, or a skip with the engine's error."""
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'udm-grpo[deepspeed]')")
    monkeypatch.setenv("UDM_GRPO_ENGINE_STATE", "1")
    out = tmp_path / f"{recipe}-{engine}"
    run = launch(out, 2, recipe, engine, check=engine == "ddp")
    if "error" in run:
        reason = [ln for ln in run["error"].splitlines() if "Error" in ln]
        pytest.skip(f"{engine} cannot run on this CPU: {reason[-1] if reason else run['error'][-300:]}")
    return [json.loads((out / f"state.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(("recipe", "engine"), CASES)
def test_engine_state_is_what_the_engine_holds(tmp_path, monkeypatch, recipe, engine):
    ranks = measure(tmp_path, monkeypatch, recipe, engine)
    shape = Shape.from_config(tiny_pipeline().transformer.config)
    lora = recipe.startswith("lora")
    trained = ranks[0]["trained"]
    assert ranks[0]["total"] == shape.params + (trained if lora else 0) and (trained < shape.params) == lora
    model = engine_state(shape, KINDS[engine], 2, True, trained if lora else None, reference=not lora)
    rows = []
    for phase, index in (("outside", 0), ("update", 1)):
        got = {k: max(r[phase].get(k, 0) for r in ranks) for k in (*STORED, "gathered")}
        want = {k: float(model.get(k, (0, 0))[index]) for k in got}
        rows += [f"{engine} {recipe} {phase:7s} {k:9s} measured {got[k]:>13,} modelled {want[k]:>15,.0f}" for k in got]
        table = "\n".join(rows)
        if phase == "outside":
            for k in STORED:
                assert abs(got[k] - want[k]) <= max(0.1 * want[k], SLACK), f"{k} outside the update\n{table}"
            total, modelled = sum(got[k] for k in STORED), sum(want[k] for k in STORED)
            assert abs(total - modelled) <= max(0.1 * modelled, SLACK), table
        # The sampled points bound the update's peak from below; gathered parameters (ZeRO-3 keeps its parameters
        # under 1e5 elements whole, all of them at this shape; FSDP2's root unit) are transient in both phases.
        for k in got if phase == "update" else ("gathered",):
            assert got[k] <= 1.1 * want[k] + SLACK, f"{k} {phase}\n{table}"
    print("\n" + table)
