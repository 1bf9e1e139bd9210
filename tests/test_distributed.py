"""Data-parallel training (DDP over gloo on CPU, launched by torchrun) against a single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from .test_pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, processes: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "tests.distributed_worker", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = out / "run" / "checkpoints" / (out / "run" / "checkpoints" / "latest").read_text().strip()
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"weights": load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")),
            "rows": rows, "folder": folder}


def test_two_processes_match_one(tmp_path):
    one, two = launch(tmp_path / "one", 1), launch(tmp_path / "two", 2)
    # Rewards are gathered from both processes: the logged statistics are those of all 8 images.
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("reward_mean", "reward_std", "kl", "loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    wa, wb = one["weights"], two["weights"]
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    initial = tiny_pipeline().transformer.state_dict()
    moved = max((wa[k] - initial[k]).abs().max().item() for k in wa)
    assert moved > 1e-3 and worst < 1e-3 * moved, (moved, worst)
    # Each process wrote its own RNG state into the checkpoint.
    assert {p.name for p in two["folder"].glob("rng*")} == {"rng.rank0.safetensors", "rng.rank1.safetensors"}
