import math

import numpy as np
import pytest
import torch

from udm_grpo.grpo.objective import action_log_probs, grpo_loss, token_entropy


def _reference_logp(logits, actions):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, actions[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_action_log_probs_matches_log_softmax(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 3).to(dtype).requires_grad_()
    actions = torch.randint(0, 11, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)

    out = action_log_probs(logits, actions, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    (out * weights).sum().backward()
    grad = logits.grad.clone()
    assert grad.dtype == dtype

    logits.grad = None
    ref = _reference_logp(logits, actions)
    (ref * weights).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad.float(), logits.grad.float(), atol=tol)


def test_action_log_probs_on_non_viewable_slice():
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 9, 6, generator=g, requires_grad=True)
    logits = full[:, 3:8]  # like the shifted image logits of a text+image sequence
    actions = torch.randint(0, 6, (2, 5), generator=g)
    out = action_log_probs(logits, actions, chunk=2)
    out.sum().backward()
    grad = full.grad.clone()
    full.grad = None
    _reference_logp(full[:, 3:8], actions).sum().backward()
    assert torch.allclose(out, _reference_logp(full[:, 3:8], actions).detach(), atol=1e-6)
    assert torch.allclose(grad, full.grad, atol=1e-6)


def test_action_log_probs_saves_no_float_copy_of_logits():
    logits = torch.randn(2, 16, 32).to(torch.bfloat16).requires_grad_()
    actions = torch.randint(0, 32, (2, 16))
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = action_log_probs(logits, actions, chunk=4)
    big = [s for s in saved if s[1] >= logits.numel()]
    assert big == [(torch.bfloat16, logits.numel())]  # only the logits themselves, no fp32 [B, N, K] copy
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g, requires_grad=True)
    h = token_entropy(logits, chunk=3)
    p = torch.softmax(logits.detach(), -1)
    assert not h.requires_grad
    assert torch.allclose(h, -(p * p.log()).sum(-1), atol=1e-6)
    uniform = token_entropy(torch.zeros(1, 2, 16, dtype=torch.bfloat16))
    assert torch.allclose(uniform, torch.full((1, 2), math.log(16)))


def _linear_policy(seed=0, batch=4, tokens=5, dim=6, classes=8):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, classes, generator=g, requires_grad=True)
    feats = torch.randn(batch, tokens, dim, generator=g)
    actions = torch.randint(0, classes, (batch, tokens), generator=g)
    adv = torch.randn(batch, generator=g)
    return weight, feats, actions, adv


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    weight, feats, actions, adv = _linear_policy()
    logp = action_log_probs(feats @ weight, actions)
    loss, m = grpo_loss(logp, adv, None, None, ratio_clip=1e-4, kl_beta=0.05)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["clip_frac"] == 0.0 and m["kl"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    (grad,) = torch.autograd.grad(loss, weight)

    seq = _reference_logp(feats @ weight, actions).mean(1)
    (expected,) = torch.autograd.grad(-(adv * seq).mean(), weight)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert m["logp_mean"] == pytest.approx(seq.mean().item(), abs=1e-6)


def test_old_logp_ratio_and_clipping():
    weight, feats, actions, _ = _linear_policy(seed=3)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logits = (feats @ weight).detach().requires_grad_()
    logp = action_log_probs(logits, actions)
    eps = 0.1
    # sample 0: r = e^0.5 > 1 + eps with A > 0 -> clipped; sample 1: r = e^-0.5 with A > 0 -> not clipped;
    # sample 2: r = e^-0.5 < 1 - eps with A < 0 -> clipped; sample 3: r = e^0.01 inside the trust region.
    shift = torch.tensor([0.5, -0.5, -0.5, 0.01])
    old = logp.detach() - shift[:, None]  # per-token old log-probs whose sequence means are seq - shift
    loss, m = grpo_loss(logp, adv, old, None, ratio_clip=eps, kl_beta=0.0)
    ratio = torch.exp(shift)
    assert m["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(ratio.max().item(), rel=1e-5)
    assert m["clip_frac"] == 0.5
    expected = -torch.minimum(adv * ratio, adv * ratio.clamp(1 - eps, 1 + eps)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    per_sample = logits.grad.abs().sum(dim=(1, 2))
    assert per_sample[0] == 0 and per_sample[2] == 0
    assert per_sample[1] > 0 and per_sample[3] > 0
    # gradient of the unclipped samples is -A_b r_b grad l_b / B (correct precedence: r depends on l)
    logits.grad = None
    seq_live = _reference_logp(logits, actions).mean(1)
    (-(adv * ratio * seq_live)[[1, 3]].sum() / 4).backward()
    expected_grad = logits.grad.clone()
    logits.grad = None
    grpo_loss(action_log_probs(logits, actions), adv, old, None, ratio_clip=eps, kl_beta=0.0)[0].backward()
    assert torch.allclose(logits.grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_k3_kl(mode):
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        logp = torch.log_softmax(torch.randn(6, 10, 5, generator=g), -1)[..., 0]
        ref = torch.log_softmax(torch.randn(6, 10, 5, generator=g), -1)[..., 0]
        adv = torch.randn(6, generator=g)
        _, m = grpo_loss(logp, adv, None, ref, ratio_clip=1e-4, kl_beta=0.05, kl_mode=mode)
        assert m["kl"] > 0
    logp = logp.clone().requires_grad_()
    loss, m = grpo_loss(logp, adv, None, logp.detach().clone(), ratio_clip=1e-4, kl_beta=0.05, kl_mode=mode)
    assert m["kl"] == 0.0
    # the KL term adds beta * mean_b KL_b with the formula of the chosen mode
    d_seq = ref.mean(1) - logp.detach().mean(1)
    d_tok = ref - logp.detach()
    kl = (d_seq.exp() - d_seq - 1) if mode == "sequence" else (d_tok.exp() - d_tok - 1).mean(1)
    with_kl, m = grpo_loss(logp, adv, None, ref, ratio_clip=1e-4, kl_beta=0.05, kl_mode=mode)
    without, _ = grpo_loss(logp, adv, None, None, ratio_clip=1e-4, kl_beta=0.05, kl_mode=mode)
    assert m["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert (with_kl - without).item() == pytest.approx(0.05 * kl.mean().item(), rel=1e-4)


def test_kl_term_removed_with_zero_beta_or_no_ref():
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 4, generator=g).requires_grad_()
    ref = torch.randn(3, 4, generator=g)
    adv = torch.randn(3, generator=g)
    base, _ = grpo_loss(logp, adv, None, None, ratio_clip=1e-4, kl_beta=0.05)
    zero_beta, m = grpo_loss(logp, adv, None, ref, ratio_clip=1e-4, kl_beta=0.0)
    assert zero_beta.item() == base.item() and m["kl"] > 0  # still reported
    (g1,) = torch.autograd.grad(base, logp)
    (g2,) = torch.autograd.grad(zero_beta, logp)
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError):
        grpo_loss(logp, adv, None, ref, ratio_clip=1e-4, kl_beta=0.05, kl_mode="per_token")


def test_clip_higher_is_asymmetric():
    """[1 - eps, 1 + eps_high]: with A > 0 a ratio between 1 + eps and 1 + eps_high still has a gradient."""
    weight, feats, actions, _ = _linear_policy(seed=5)
    logits = (feats @ weight).detach().requires_grad_()
    logp = action_log_probs(logits, actions)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    shift = torch.tensor([0.22, 0.3, -0.15, -0.3])  # r = e^shift: 1.246, 1.35, 0.86, 0.74
    old = logp.detach() - shift[:, None]
    loss, m = grpo_loss(logp, adv, old, None, ratio_clip=0.2, kl_beta=0.0, ratio_clip_high=0.28)
    r = np.exp(shift.numpy())
    expected = -np.minimum(adv.numpy() * r, adv.numpy() * np.clip(r, 0.8, 1.28)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["clip_frac"] == 0.5  # sample 1 (A > 0, r = 1.35 > 1.28) and sample 3 (A < 0, r = 0.74 < 0.8)
    loss.backward()
    moved = logits.grad.abs().sum(dim=(1, 2)) > 0
    assert moved.tolist() == [True, False, True, False]
    assert grpo_loss(logp, adv, old, None, ratio_clip=0.2, kl_beta=0.0)[1]["clip_frac"] == 0.75  # symmetric: 0 too


def test_token_level_ratios_against_numpy():
    """Per-token ratios r_bn = exp(logp_bn - old_bn), clipped per token, averaged over tokens, summed over samples
    and divided by the normaliser; on-policy both levels give the same gradient, -sum_b A_b grad l_b / D."""
    weight, feats, actions, _ = _linear_policy(seed=6)
    logits = (feats @ weight).detach().requires_grad_()
    logp = action_log_probs(logits, actions)
    adv = torch.tensor([0.7, -1.2, 0.4, 1.5])
    shift = torch.linspace(-0.4, 0.4, logp.numel()).view_as(logp)
    old = logp.detach() - shift
    loss, m = grpo_loss(logp, adv, old, None, ratio_clip=0.2, kl_beta=0.0, level="token", normaliser=10.0)
    r, a = np.exp(shift.numpy()), adv.numpy()[:, None]
    clipped = ((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8))
    expected = -np.minimum(a * r, a * np.clip(r, 0.8, 1.2)).mean(1).sum() / 10.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(clipped.mean())
    grads = []
    for level in ("sequence", "token"):
        logits.grad = None
        grpo_loss(action_log_probs(logits, actions), adv, None, None, kl_beta=0.0, level=level, normaliser=3.0)[
            0].backward()
        grads.append(logits.grad.clone())
    logits.grad = None
    (-(adv * _reference_logp(logits, actions).mean(1)).sum() / 3.0).backward()
    assert torch.allclose(grads[0], logits.grad, atol=1e-6) and torch.allclose(grads[1], logits.grad, atol=1e-6)
