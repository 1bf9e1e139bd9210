"""Fake-tensor simulation of the policy's phases (`udm_grpo.grpo.simulate`) against the same code run for real
at the tiny world's shape: the FLOPs are FlopCounterMode's on the real run, and the peaks MemTracker's."""

import json

import pytest

from udm_grpo.grpo.simulate import PHASES, simulate_phases
from udm_grpo.models.transformer import URSAConfig
from udm_grpo.tinyworld import SHIPPED_MODEL


@pytest.mark.parametrize("bf16, level", [(True, 1), (False, 0)])
def test_fake_phases_match_a_real_run(bf16, level):
    config = URSAConfig.from_dict(json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text()))
    args = dict(micro_batch=4, rollout_batch=8, text_tokens=16, grid=(8, 8), bf16=bf16, gradient_checkpointing=level)
    fake, real = simulate_phases(config, fake=True, **args), simulate_phases(config, fake=False, **args)
    assert list(fake) == list(real) == [p for p in PHASES if p not in ("reference forward", "old-policy forward")]
    for name in fake:
        assert fake[name].flops == real[name].flops, name
        for category in ("param", "opt"):
            assert fake[name].peak_bytes.get(category) == real[name].peak_bytes.get(category), (name, category)
    assert fake["training step"].flops > 0 and fake["optimizer step"].peak_bytes["opt"] >= 2 * 4 * 3_000_000
    for name in fake:  # issue 24's bar: within 5% (measured: equal, and 0.5% for the training step)
        assert fake[name].peak_bytes["total"] == pytest.approx(real[name].peak_bytes["total"], rel=0.05), name


def test_check_simulate_json_reports_the_iteration(capsys):
    from udm_grpo.cli import main

    args = ["train", "--check", "--simulate", "--json", "sampling.num_prompts_per_step=2",
            "sampling.num_images_per_prompt=4", "training.micro_batch_size=4"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "trainable_params", "flops", "peak_bytes", "peak_phase", "gpu_memory_bytes", "fits"} <= set(out)
    assert out["params"] == 3_286_528 and out["fits"] and out["gpu_memory_bytes"] == 80 * 2**30
    assert out["flops"]["total"] == pytest.approx(sum(v for k, v in out["flops"].items() if k != "total"))
    peaks = {name: phase["peak_bytes"]["total"] for name, phase in out["phases"].items()}
    assert out["peak_phase"] == max(peaks, key=peaks.get) and out["peak_bytes"]["total"] == max(peaks.values())
    # 8 images per step over micro-batches of 4: 2 micro-batches x train_steps per update; 10 sampling steps of one
    # rollout call of 8 images
    from udm_grpo import run_config

    cfg = run_config(overrides=args[4:])
    config = URSAConfig.from_dict(json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text()))
    single = simulate_phases(config, 4, 8, 16, (8, 8), cfg.bf16, cfg.model.gradient_checkpointing)
    assert out["flops"]["training step"] == pytest.approx(2 * cfg.sampling.train_steps * single["training step"].flops)
    assert out["flops"]["rollout forward"] == pytest.approx(cfg.sampling.rollout.num_inference_steps
                                                            * single["rollout forward"].flops)
    assert main([*args, "--gpu-memory", "0.01"]) == 1 and not json.loads(capsys.readouterr().out)["fits"]
    assert main([*args, "--gpu-memory", "tpu"]) == 2
    assert "preset: h200 141" in capsys.readouterr().err


def test_reference_and_accumulated_gradients_are_counted():
    """The frozen bf16 reference holds 2 bytes per parameter in every phase and its forward costs what the policy's
    no-grad forward of as many rows costs; an accumulating micro-batch starts with a full float32 gradient."""
    config = URSAConfig.from_dict(json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text()))
    params = 3_286_528
    sim = simulate_phases(config, 4, 4, 16, (8, 8), reference=True)
    real = simulate_phases(config, 4, 4, 16, (8, 8), reference=True, fake=False)
    for name, phase in sim.items():
        assert phase.peak_bytes["reference"] == 2 * params and phase.peak_bytes["param"] == 4 * params, name
        assert phase.flops == real[name].flops and phase.peak_bytes["reference"] == real[name].peak_bytes["reference"]
    assert sim["reference forward"].flops == sim["rollout forward"].flops  # 4 rows each
    assert real["training step"].peak_bytes["grad"] >= 4 * params  # a full float32 gradient is live
    assert sim["training step"].peak_bytes["grad"] >= 0.95 * 4 * params  # (fake: one small gradient is replaced)
    first = simulate_phases(config, 4, 4, 16, (8, 8), accumulating=False, fake=False)
    assert first["training step"].peak_bytes.get("grad", 0) < real["training step"].peak_bytes["grad"]


def test_codebook_override_moves_the_logit_tables(capsys):
    """--codebook K replaces the model's K: the lm head (and its logits) grow with K, nothing else changes."""
    from udm_grpo.cli import main

    base = ["train", "--check", "--simulate", "--json", "sampling.num_prompts_per_step=2",
            "sampling.num_images_per_prompt=4", "training.micro_batch_size=4"]
    assert main(base) == 0
    small = json.loads(capsys.readouterr().out)
    assert main([*base, "--codebook", "1024"]) == 0
    large = json.loads(capsys.readouterr().out)
    assert (small["codebook"], large["codebook"]) == (256, 1024)
    hidden = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())["hidden_size"]
    assert large["params"] - small["params"] == 2 * (1024 - 256) * hidden  # lm head and embedding rows: K x hidden
    assert large["flops"]["total"] > small["flops"]["total"]
    assert main(["train", "--check", "--codebook", "1024"]) == 2
    assert "--codebook and --json with --simulate" in capsys.readouterr().err


def test_reused_rollouts_add_the_old_policy_pass(capsys):
    """training.updates_per_rollout > 1 stores old log-probs: one more no-grad forward per micro-batch (as many rows
    as the reference forward, so the same FLOPs), and the training steps count once per update."""
    from udm_grpo.cli import main

    base = ["train", "--check", "--simulate", "--json", "sampling.num_prompts_per_step=2",
            "sampling.num_images_per_prompt=4", "training.micro_batch_size=4", "reward.kl_beta=0.05"]
    assert main(base) == 0
    once = json.loads(capsys.readouterr().out)
    assert main([*base, "training.updates_per_rollout=2"]) == 0
    twice = json.loads(capsys.readouterr().out)
    assert "old-policy forward" not in once["flops"]
    assert twice["flops"]["old-policy forward"] == pytest.approx(twice["flops"]["reference forward"])
    assert twice["flops"]["training step"] == pytest.approx(2 * once["flops"]["training step"])
