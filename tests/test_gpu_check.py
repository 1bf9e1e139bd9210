"""benchmarks/gpu_check.py at its tiny shape on the CPU: every figure is printed, once, and positive."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
FIGURES = ["train_images_per_s", "time_rollout_s", "time_reward_s", "time_states_s", "time_update_s",
           "time_iteration_s", "peak_host_rss_gib", "model_tflops_per_iteration", "achieved_tflops_per_s",
           "rollout_tflops_per_s", "mfu", "hfu", "reward_clipscore_images_per_s", "reward_pickscore_images_per_s",
           "reward_geneval_images_per_s"]


def test_tiny_shape_on_cpu_prints_every_figure():
    # A fresh process: the check builds its own accelerate state (bf16), which is process-wide.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [ln.split() for ln in done.stdout.splitlines() if ln and not ln.startswith("#")]
    values = {parts[0]: float(parts[1]) for parts in lines}
    assert len(values) == len(lines)  # one line per figure
    assert sorted(values) == sorted(FIGURES)
    assert all(v > 0 for name, v in values.items() if name != "time_reward_s"), values
    assert values["time_reward_s"] >= 0  # the synthetic reward may take less than the clock's resolution
    assert "# all checks passed" in done.stdout


def test_failure_exits_non_zero():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--shape", "tiny"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "gpu_check FAILED" in done.stdout
