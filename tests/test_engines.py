"""DeepSpeed ZeRO and FSDP2 against DDP: 2 processes on CPU (gloo), the tiny random world.

Each engine must reproduce the single-process update (weights, gathered metrics, the skipped step), write
DDP's checkpoint (weights and AdamW moments gathered from the shards), and resume from it to the update
DDP makes from its own (weights and moments restored into the shards). Engines that cannot run here are
skipped with the engine's own error message.
"""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from .test_distributed import launch
from .test_pipeline import tiny_pipeline

ENGINES = ["deepspeed-2", "deepspeed-3", "fsdp"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process (DDP path) for 3 steps; two DDP processes for 3 steps, then one more from their checkpoint."""
    root = tmp_path_factory.mktemp("baseline")
    one = launch(root / "one", 1, "default")
    two = launch(root / "two", 2, "default")
    resumed = launch(root / "two-resumed", 2, "default", "ddp", two["folder"])
    return one, two, resumed


def _worst_relative(a: dict, b: dict, initial: dict) -> float:
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    return max((a[k] - b[k]).abs().max().item() for k in a) / moved


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_ddp_and_resumes_its_checkpoints(tmp_path, baseline, engine):
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'udm-grpo[deepspeed]')")
    one, two, resumed = baseline
    run = launch(tmp_path / engine, 2, "default", engine, check=False)
    if "error" in run:
        reason = [ln for ln in run["error"].splitlines() if "Error" in ln]
        pytest.skip(f"{engine} cannot run on this CPU: {reason[-1] if reason else run['error'][-300:]}")
    assert [r.get("train/skipped") for r in run["rows"]] == [None, "non-finite loss or gradient", None]
    for a, b in zip(one["rows"], run["rows"], strict=True):
        for key in ("reward/mean", "reward/std", "train/kl", "train/loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert [e["eval/images"] for e in run["evals"]] == [1, 1]  # the second process sampled a padded repeat
    for a, b in zip(one["evals"], run["evals"], strict=True):
        assert a["eval/brightness"] == pytest.approx(b["eval/brightness"], abs=1e-6)
    initial = tiny_pipeline().transformer.state_dict()
    assert run["weights"].keys() == one["weights"].keys()
    assert _worst_relative(one["weights"], run["weights"], initial) < 1e-3
    # The checkpoint is DDP's: the same files, the AdamW moments gathered from the shards included.
    opt_engine, opt_ddp = (load_file(str(r["folder"] / "optimizer.safetensors")) for r in (run, two))
    assert opt_engine.keys() == opt_ddp.keys()
    for key in opt_ddp:
        assert torch.allclose(opt_engine[key], opt_ddp[key], rtol=1e-3, atol=1e-9), key
    # Resumed under this engine, its own checkpoint gives the 4th update DDP gives from DDP's, so weights and
    # moments were restored into the shards (fresh moments would move every weight by about lr instead).
    cont = launch(tmp_path / f"{engine}-resumed", 2, "default", engine, run["folder"])
    assert [r["step"] for r in cont["rows"]] == [4]
    assert _worst_relative(resumed["weights"], cont["weights"], two["weights"]) < 1e-3
