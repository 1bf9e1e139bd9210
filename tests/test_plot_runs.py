"""benchmarks/plot_runs.py: the rolling mean against numpy, and a figure from two small run folders."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from .benchmark_scripts import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "plot_runs.py"


def test_rolling_mean_matches_a_trailing_window():
    rolling_mean = load_benchmark("plot_runs").rolling_mean
    values = list(np.random.default_rng(0).random(12))
    got = rolling_mean(values, 4)
    want = [np.mean(values[max(0, i - 3) : i + 1]) for i in range(12)]
    assert np.allclose(got, want) and got[0] == values[0]


def _run(folder: Path, rewards: list[float], strict: list[float]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward/mean": r}) + "\n"
                                                  for i, r in enumerate(rewards)))
    (folder / "eval.jsonl").write_text("".join(json.dumps({"step": 10 * i, "eval/strict": s, "eval/ci95/strict": 0.05})
                                               + "\n" for i, s in enumerate(strict)))
    return folder


def test_writes_a_png_and_refuses_an_empty_run(tmp_path):
    a = _run(tmp_path / "a", [0.4, 0.5, 0.6], [0.2, 0.3])
    b = _run(tmp_path / "b", [0.4, 0.3, 0.1], [0.2, 0.05])
    out = tmp_path / "cmp.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--labels", "udm", "naive", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds no train metrics" in done.stderr and not (tmp_path / "x.png").exists()
