"""Health signals against reward hacking: the curves.png panels and the end-of-run verdict's warnings."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from udm_grpo.commands.verdict import ends, verdict
from udm_grpo.grpo.logger import flip_profile, plot_curves, rolling_mean, smoothing_window


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def health_rows(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, n + 1):
        t = s / n
        row = {"step": s, "reward/mean": 0.3 + 0.4 * t + rng.normal(0, 0.02), "train/kl": 0.01 * t,
               "health/flip_rate": 0.2 - 0.1 * t, "health/codebook_entropy": 5.0 - t,
               "health/group_diversity": 0.4 - 0.1 * t, "reward/zero_var_frac": 0.1 * t,
               "train/zero_std_fraction": 0.05 * t, "train/extra_rollouts": s % 3,
               "reward/blobs": 1.9 + t, "reward/named": 1.85}
        row.update({f"health/flip/k{k:02d}": (k + 1) * (1 + t) / 100 for k in range(8)})
        rows.append(row)
    return rows


def eval_rows() -> list[dict]:
    rows = []
    for step, (strict, blobs) in zip((0, 20, 40), [(0.5, 1.9), (0.6, 2.5), (0.7, 3.9)]):
        row = {"step": step, "eval/blobs": blobs, "eval/named": 1.85, "eval/ci95/blobs": 0.1, "eval/ci95/named": 0.0}
        for name, v in (("strict", strict), ("score", 0.8), ("clean", 0.9)):
            row[f"eval/{name}"], row[f"eval/ci95/{name}"] = v, 0.05
        rows.append(row)
    return rows


# ---- curves.png ------------------------------------------------------------------------------------
def test_rolling_mean_matches_a_trailing_window():
    values = list(np.random.default_rng(0).random(25))
    for window in (1, 3, 7):
        want = [np.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        assert np.allclose(rolling_mean(values, window), want)
    assert [smoothing_window(n) for n in (1, 29, 30, 200)] == [3, 3, 3, 20]


def panels(tmp_path, monkeypatch) -> dict:
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    out = plot_curves(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return {ax.get_title(): ax for ax in figures[-1].axes}


def test_health_panels_smooth_each_series_and_profile_the_flips(tmp_path, monkeypatch):
    rows = health_rows()
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", eval_rows())
    axes = panels(tmp_path, monkeypatch)
    assert set(axes) == {"train reward per step", "held-out eval", "KL to the reference", "token flip rate",
                         "flip rate per sampling step", "codebook entropy (final samples)", "within-group diversity",
                         "zero-variance groups", "extra rollouts", "blobs drawn vs objects named"}
    raw, smooth = axes["train reward per step"].lines
    values = [r["reward/mean"] for r in rows]
    w = 4  # 40 steps: max(3, 40 // 10)
    want = np.convolve(values, np.ones(w), "full")[: len(values)] / np.minimum(np.arange(1, 41), w)
    assert list(raw.get_ydata()) == values and np.allclose(smooth.get_ydata(), want)
    assert raw.get_alpha() < 1 and smooth.get_linewidth() > raw.get_linewidth()
    assert len(axes["held-out eval"].containers) == 3  # strict, score, clean with error bars
    first, last = axes["flip rate per sampling step"].lines
    assert list(first.get_xdata()) == list(range(8))
    # 10% of 40 rows = the first and the last 4
    assert np.allclose(first.get_ydata(), [(k + 1) * np.mean([1 + s / 40 for s in (1, 2, 3, 4)]) / 100
                                           for k in range(8)])
    assert np.allclose(last.get_ydata(), [(k + 1) * np.mean([1 + s / 40 for s in (37, 38, 39, 40)]) / 100
                                          for k in range(8)])
    shapes = axes["blobs drawn vs objects named"]
    assert len(shapes.containers) == 2 and len(shapes.lines) >= 4  # train blobs, named (raw + mean); held-out
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes.values())


def test_absent_health_keys_leave_their_panels_out(tmp_path, monkeypatch):
    rows = [{"step": s, "reward/mean": 0.5, "health/flip/k00": 0.1, "health/flip/k01": None} for s in range(1, 4)]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    axes = panels(tmp_path, monkeypatch)  # no eval.jsonl, no KL, per-k flips without the mean
    assert list(axes) == ["train reward per step", "held-out eval", "KL to the reference",
                          "flip rate per sampling step"]
    assert len(axes["train reward per step"].lines) == 1  # 3 points: no rolling mean of them
    assert [t.get_text() for t in axes["held-out eval"].texts] == ["no data"]
    assert flip_profile(rows) == {"first": ([0], [0.1]), "last": ([0], [0.1])}
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1}, {"other": 2}])
    assert list(panels(tmp_path, monkeypatch)) == ["train reward per step", "held-out eval", "KL to the reference"]


# ---- the verdict's warnings --------------------------------------------------------------------------
RECORDS = [{"prompt": "p", "tag": t} for t in ("a", "b") for _ in range(8)]


def evals(**after) -> tuple[dict, dict]:
    """Before / after held-out rows (overall keys): strict, score, clean, blobs, named with 95% half-widths."""
    before = {"strict": 0.5, "score": 0.8, "clean": 0.9, "blobs": 1.9, "named": 1.85}
    first = {f"eval/{k}": v for k, v in before.items()}
    last = {f"eval/{k}": after.get(k, v) for k, v in before.items()}
    for row in (first, last):
        row.update({"eval/ci95/strict": 0.05, "eval/ci95/score": 0.03, "eval/ci95/clean": 0.03,
                    "eval/ci95/blobs": 0.1, "eval/ci95/named": 0.0, "eval/reward": 0.5, "eval/images": 16})
    return first, last


def warnings(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("warning:")]


def test_ends_is_a_two_sample_interval():
    values = list(np.random.default_rng(1).normal(0, 1, 30))
    a, b, h, w = ends(values)
    first, last = np.array(values[:10]), np.array(values[-10:])
    assert w == 10 and (a, b) == (pytest.approx(first.mean()), pytest.approx(last.mean()))
    assert h == pytest.approx(1.959964 * math.sqrt(first.var(ddof=1) / 10 + last.var(ddof=1) / 10))
    assert ends(values[:7])[3] == 3 and ends(values[:3]) is None


def test_hacking_is_named_with_its_numbers(tmp_path):
    """The train reward rises while held-out partial credit falls and the policy draws twice the shapes named."""
    first, last = evals(strict=0.7, score=0.6, blobs=3.9)
    text = verdict(first, last, RECORDS, 40, 2.0, tmp_path, True, metrics=health_rows())
    (line,) = warnings(text)  # one line names every figure that moved the bad way
    assert line.startswith("warning: reward hacking? the train reward rose ")
    assert "means of the first and last 10 steps)" in line
    assert "held-out score fell 0.800 -> 0.600, blobs rose 1.900 -> 3.900 (each beyond the noise" in line
    assert "more shapes than named" in line and "reward.params.exact=true" in line
    assert "named " not in text.splitlines()[2]  # the constant `named` is no before/after column
    assert "  shapes drawn per image: 1.90 -> 3.90 (+-0.10) for 1.85 named." in text


def test_excess_shapes_are_flagged_without_a_reward_trend(tmp_path):
    flat = [{**r, "reward/mean": 0.5} for r in health_rows()]
    first, last = evals(blobs=2.5)
    (line,) = warnings(verdict(first, last, RECORDS, 40, 2.0, tmp_path, True, metrics=flat))
    assert line.startswith("warning: held-out images draw 2.50 shapes per image for 1.85 named (+35%; before "
                           "training 1.90, +3%)") and "reward.params.exact=true" in line
    assert not warnings(verdict(*evals(blobs=2.2), RECORDS, 40, 2.0, tmp_path, True, metrics=flat))  # +19%


def test_a_healthy_run_gets_no_warning(tmp_path):
    first, last = evals(strict=0.7, score=0.9, clean=0.92, blobs=1.88)
    assert not warnings(verdict(first, last, RECORDS, 40, 2.0, tmp_path, True, metrics=health_rows()))
    # fewer than named at first: drawing the missing shapes is no hacking
    first, last = evals(strict=0.7, blobs=1.85)
    first["eval/blobs"] = 1.2
    assert not warnings(verdict(first, last, RECORDS, 40, 2.0, tmp_path, True, metrics=health_rows()))
    # a falling figure without a rising train reward is no hacking either
    flat = [{**r, "reward/mean": 0.5 + 0.01 * (-1) ** r["step"]} for r in health_rows()]
    assert not warnings(verdict(*evals(score=0.6), RECORDS, 40, 2.0, tmp_path, True, metrics=flat))


def test_diversity_collapse(tmp_path):
    rows = health_rows()
    for r in rows:
        t = r["step"] / 40
        r.update({"reward/mean": 0.5, "health/group_diversity": 0.5 * (1 - 0.9 * t),
                  "health/codebook_entropy": 5.0 * (1 - 0.8 * t)})
    write_jsonl(tmp_path / "metrics.jsonl", rows)  # read from the run folder when not given
    lines = warnings(verdict(*evals(), RECORDS, 40, 2.0, tmp_path, True))
    assert len(lines) == 2 and all(ln.startswith("warning: diversity collapse: ") for ln in lines)
    d = [0.5 * (1 - 0.9 * s / 40) for s in range(1, 41)]
    assert f"diversity (mean pairwise Hamming fraction) fell from {np.mean(d[:10]):.3f} (first 10 steps) to " \
           f"{np.mean(d[-10:]):.3f} (last 10)" in lines[0]
    assert "codebook entropy of the samples fell from" in lines[1] and " nats" in lines[1]
    (tmp_path / "metrics.jsonl").write_text("not json\n")  # an unreadable log costs the warnings, not the verdict
    assert not warnings(verdict(*evals(), RECORDS, 40, 2.0, tmp_path, True))
