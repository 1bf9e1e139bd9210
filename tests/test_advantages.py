import numpy as np
import pytest
import torch

from udm_grpo.grpo.advantages import (
    expand_prompts,
    flat_from_groups,
    group_advantages,
    group_rows,
    group_stats,
)


def _numpy_adv(grouped: np.ndarray, eps=1e-4, clip=5.0, global_std=False) -> np.ndarray:
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std() if global_std else grouped.std(axis=1, keepdims=True)  # numpy std is ddof 0
    adv = (grouped - mean) / (std + eps)
    return np.clip(adv, -clip, clip) if clip is not None else adv


def test_flat_order_and_grouping_roundtrip():
    prompts = ["a", "b", "c"]
    flat_prompts = expand_prompts(prompts, 2)
    assert flat_prompts == ["a", "a", "b", "b", "c", "c"]
    flat = torch.arange(6.0)
    grouped = group_rows(flat, 2)
    assert grouped.tolist() == [[0, 1], [2, 3], [4, 5]]  # row j = prompt j's images
    assert torch.equal(flat_from_groups(grouped), flat)
    # reference (image-major) layout: index g * P + j
    ref_flat = torch.tensor([0.0, 2, 4, 1, 3, 5])
    assert torch.equal(group_rows(ref_flat, 2, order="image-major"), grouped)
    assert torch.equal(flat_from_groups(grouped, order="image-major"), ref_flat)
    with pytest.raises(ValueError):
        group_rows(torch.arange(5.0), 2)


def test_matches_numpy_per_group_and_shape_kept():
    rng = np.random.default_rng(0)
    grouped = rng.normal(size=(4, 8))
    expected = _numpy_adv(grouped)
    adv_2d = group_advantages(torch.tensor(grouped), 8)
    assert adv_2d.shape == (4, 8) and adv_2d.dtype == torch.float64
    np.testing.assert_allclose(adv_2d.numpy(), expected, rtol=1e-10, atol=1e-12)
    adv_flat = group_advantages(torch.tensor(grouped.reshape(-1), dtype=torch.float32), 8)
    assert adv_flat.shape == (32,) and adv_flat.dtype == torch.float32
    np.testing.assert_allclose(adv_flat.numpy(), expected.reshape(-1), rtol=1e-5, atol=1e-6)
    # each group has zero mean
    assert torch.allclose(adv_2d.mean(dim=1), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_zero_variance_group_gets_exactly_zero():
    scores = torch.tensor([[0.1] * 4, [0.0, 1.0, 0.0, 1.0], [1.0] * 4])
    adv = group_advantages(scores, 4)
    assert torch.all(adv[0] == 0) and torch.all(adv[2] == 0)
    assert torch.allclose(adv[1], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (0.5 + 1e-4))
    adv_g = group_advantages(scores, 4, scale="batch")
    assert torch.all(adv_g[0] == 0) and torch.all(adv_g[2] == 0)


def test_batch_scale_option():
    rng = np.random.default_rng(1)
    grouped = rng.normal(size=(3, 5)) * np.array([[0.1], [1.0], [10.0]])
    adv = group_advantages(grouped, 5, scale="batch", clip=None)
    np.testing.assert_allclose(adv.numpy(), _numpy_adv(grouped, clip=None, global_std=True), rtol=1e-10)
    per_group = group_advantages(grouped, 5, clip=None)
    assert not torch.allclose(adv, per_group)


def test_clipping():
    scores = torch.tensor([[0.0] * 15 + [1.0]])  # the outlier gets (1 - 1/16) / std ~ 3.87
    unclipped = group_advantages(scores, 16, clip=None)
    assert unclipped.max() > 3.5
    clipped = group_advantages(scores, 16, clip=2.0)
    assert clipped.max().item() == 2.0
    assert torch.allclose(clipped[clipped < 2.0], unclipped[unclipped < 2.0])
    grouped = np.random.default_rng(2).normal(size=(2, 8))
    np.testing.assert_allclose(group_advantages(grouped, 8, eps=1e-4, clip=0.5).numpy(), _numpy_adv(grouped, clip=0.5))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_group_stats():
    scores = torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, 4.0])  # prompt-major, G = 2
    stats = group_stats(scores, 2)
    assert stats["mean"] == pytest.approx(8.0 / 6)
    assert stats["std"] == pytest.approx(np.std(scores.numpy()))
    assert stats["group_std_mean"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert stats["zero_var_frac"] == pytest.approx(1 / 3)
    assert stats["min"] == 0.0 and stats["max"] == 4.0
    assert all(isinstance(v, float) for v in stats.values())
