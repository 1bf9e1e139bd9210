"""Data-parallel training (DDP over gloo on CPU, launched by torchrun) against a single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .test_pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, processes: int, recipe: str, engine: str = "ddp", resume: Path | None = None,
           check: bool = True) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "tests.distributed_worker", str(out), recipe, engine, *([str(resume)] if resume else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # a hang fails
    if not check and done.returncode:
        return {"error": done.stderr}
    assert done.returncode == 0, done.stderr[-3000:]
    run = out / "run"
    folder = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    read = lambda name: [json.loads(x) for x in (run / name).read_text().splitlines()]  # noqa: E731
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():  # a LoRA run: the adapters
        weights = folder / "adapter" / "adapter_model.safetensors"
    return {"weights": load_file(str(weights)),
            "rows": read("metrics.jsonl"), "evals": read("eval.jsonl"), "folder": folder,
            "engine": json.loads((out / "engine.json").read_text())}


@pytest.mark.parametrize("recipe", ["default", "simplified", "variants"])
def test_two_processes_match_one(tmp_path, recipe):
    one, two = launch(tmp_path / "one", 1, recipe), launch(tmp_path / "two", 2, recipe)
    # Step 2 had a non-finite loss on the last process only: both layouts skipped it, and went on.
    for rows in (one["rows"], two["rows"]):
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert [r.get("train/skipped") for r in rows] == [None, "non-finite loss or gradient", None]
    # Rewards are gathered from both processes: the logged statistics are those of all 8 images.
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("reward/mean", "reward/std", "train/kl", "train/loss", "health/group_diversity"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    # One held-out prompt on two processes: the second has none, and the results agree.
    assert [e["eval/images"] for e in two["evals"]] == [1, 1]
    for a, b in zip(one["evals"], two["evals"], strict=True):
        assert a["eval/brightness"] == pytest.approx(b["eval/brightness"], abs=1e-6)
    wa, wb = one["weights"], two["weights"]
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    initial = tiny_pipeline().transformer.state_dict()
    moved = max((wa[k] - initial[k]).abs().max().item() for k in wa)
    assert moved > 1e-3 and worst < 1e-3 * moved, (moved, worst)
    # Each process wrote its own RNG state into the checkpoint.
    assert {p.name for p in two["folder"].glob("rng*")} == {"rng.rank0.safetensors", "rng.rank1.safetensors"}


def test_dynamic_sampling_on_two_processes(tmp_path):
    """Each process refills until it holds its share of groups whose rewards differ: the refills are whole groups
    per process, every process trains the same number of samples (no collective waits alone), and the counter
    adds the extra images of both."""
    two = launch(tmp_path / "two", 2, "dynamic")
    rows = [r for r in two["rows"] if "train/skipped" not in r]
    assert rows and all(r["train/extra_rollouts"] % 8 == 0 for r in rows)  # 2 processes x whole groups of 4
    assert any(r["train/extra_rollouts"] for r in two["rows"])
    assert two["rows"][-1]["progress/rollout_images"] == sum(8 + r.get("train/extra_rollouts", 0)
                                                             for r in two["rows"])
