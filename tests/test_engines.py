"""DeepSpeed ZeRO and FSDP2 against DDP: 2 processes on CPU (gloo), the tiny random world.

Each engine must reproduce the single-process update (weights, gathered metrics, the skipped step) and
write the same checkpoint layout; resuming a DDP checkpoint under the engine must give the update DDP
gives (weights and AdamW moments restored). Engines that cannot run here are skipped with the engine's
own error message.
"""

import importlib.util

import pytest

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
    # The DDP checkpoint resumed under this engine: the 4th update equals DDP's own, so weights and the
    # AdamW moments were restored (fresh moments would move every weight by about lr instead).
    cont = launch(tmp_path / f"{engine}-resumed", 2, "default", engine, two["folder"])
    assert [r["step"] for r in cont["rows"]] == [4]
    assert _worst_relative(resumed["weights"], cont["weights"], two["weights"]) < 1e-3
