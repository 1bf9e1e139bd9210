"""Fake-tensor simulation of the policy's phases (`udm_grpo.grpo.simulate`) against the same code run for real
at the tiny world's shape: the FLOPs are FlopCounterMode's on the real run, and the peaks MemTracker's."""

import json

import pytest

from udm_grpo.grpo.simulate import PHASES, simulate_phases
from udm_grpo.models.transformer import URSAConfig
from udm_grpo.tinyworld import SHIPPED_MODEL

VAE = json.loads((SHIPPED_MODEL / "vae" / "config.json").read_text())
MID = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
           head_dim=64, lm_vocab_size=1000, lm_head_size=4096, vocab_size=5096, bov_token_id=999)


@pytest.mark.parametrize("bf16, level, shape", [(True, 1, "tiny"), (False, 0, "tiny"), (True, 1, "mid")])
def test_fake_phases_match_a_real_run(bf16, level, shape):
    """The tiny world, and a mid shape (57M parameters, K = 4,096) run for real here."""
    tiny = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    config = URSAConfig.from_dict(tiny if shape == "tiny" else {**tiny, **MID})
    args = dict(micro_batch=4, rollout_batch=8, text_tokens=16, grid=(8, 8), bf16=bf16, gradient_checkpointing=level,
                vae=VAE if shape == "tiny" else {**VAE, "num_vq_embeddings": 4096}, old_policy=shape == "mid")
    fake, real = simulate_phases(config, fake=True, **args), simulate_phases(config, fake=False, **args)
    assert list(fake) == list(real) == [p for p in PHASES if p != "reference forward"
                                        and (shape == "mid" or p != "old-policy forward")]
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
    single = simulate_phases(config, 4, 8, 16, (8, 8), cfg.bf16, cfg.model.gradient_checkpointing, vae=VAE)
    assert out["flops"]["training step"] == pytest.approx(2 * cfg.sampling.train_steps * single["training step"].flops)
    assert out["flops"]["rollout step"] == pytest.approx(cfg.sampling.rollout.num_inference_steps
                                                         * single["rollout step"].flops)
    assert out["flops"]["rollout decode"] == single["rollout decode"].flops  # one rollout call
    assert main([*args, "--gpu-memory", "0.01"]) == 1 and not json.loads(capsys.readouterr().out)["fits"]
    assert main([*args, "--gpu-memory", "tpu"]) == 2
    assert "preset: h200 141" in capsys.readouterr().err


def test_reference_and_accumulated_gradients_are_counted():
    """The frozen bf16 reference holds 2 bytes per parameter in every phase and its forward costs what the policy's
    no-grad forward of as many rows costs; an accumulating micro-batch starts with a full float32 gradient."""
    config = URSAConfig.from_dict(json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text()))
    params = 3_286_528
    sim = simulate_phases(config, 4, 4, 16, (8, 8), reference=True, old_policy=True)
    real = simulate_phases(config, 4, 4, 16, (8, 8), reference=True, old_policy=True, fake=False)
    for name, phase in sim.items():
        assert phase.peak_bytes["reference"] == 2 * params and phase.peak_bytes["param"] == 4 * params, name
        assert phase.flops == real[name].flops and phase.peak_bytes["reference"] == real[name].peak_bytes["reference"]
    assert sim["reference forward"].flops == sim["old-policy forward"].flops  # 4 rows each
    for run in (real, sim):  # a full float32 gradient is live (at the peak one small gradient may be replaced)
        assert run["training step"].peak_bytes["grad"] >= 0.95 * 4 * params
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
    assert "--codebook, --json and --fit with --simulate" in capsys.readouterr().err


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
    assert main([*base, "training.reuse_rollouts=3"]) == 0  # three rollouts trained per step, one update
    reuse = json.loads(capsys.readouterr().out)
    assert reuse["flops"]["old-policy forward"] == pytest.approx(twice["flops"]["reference forward"])
    assert reuse["flops"]["training step"] == pytest.approx(3 * once["flops"]["training step"])


def _simulate(capsys, *overrides, processes=1):
    from udm_grpo.cli import main

    assert main(["train", "--check", "--simulate", "--json", "--processes", str(processes),
                 "sampling.num_prompts_per_step=2", "sampling.num_images_per_prompt=4",
                 "training.micro_batch_size=4", "sampling.dynamic_sampling=false", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_engines_store_what_they_shard(capsys):
    """The engine's stored bytes per phase (`memory.engine_state`) beside the measured transient bytes: DDP keeps
    its gradient buckets between updates only with several processes; FSDP2 shards masters, gradients and moments
    over the processes and gathers the root unit and two blocks in the compute dtype. (The tiny world computes in
    float32.)"""
    p = 3_286_528
    one, two = _simulate(capsys), _simulate(capsys, processes=2)
    assert "gradients" not in one["phases"]["rollout step"]["peak_bytes"]
    assert one["phases"]["training step"]["peak_bytes"]["gradients"] == 4 * p
    assert two["phases"]["rollout step"]["peak_bytes"]["gradients"] == 4 * p
    assert one["phases"]["rollout step"]["peak_bytes"]["optimizer"] == 8 * p
    fsdp = _simulate(capsys, "training.engine=fsdp", "training.micro_batch_size=2", processes=4)
    step = fsdp["phases"]["training step"]["peak_bytes"]
    assert fsdp["engine"] == "fsdp" and step["optimizer"] == 8 * p // 4 and step["masters"] == 4 * p // 4
    assert "weights" not in step and step["gathered"] > 0  # the float32 shards are the only stored weights
    assert fsdp["peak_bytes"]["total"] < one["peak_bytes"]["total"]
    config = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    root = (config["vocab_size"] + config["lm_head_size"]) * config["hidden_size"] + config["hidden_size"]
    block = (p - root) // config["num_hidden_layers"]
    bf16 = _simulate(capsys, "training.engine=fsdp", "training.micro_batch_size=2", "model.dtype=bfloat16",
                     processes=4)["phases"]["training step"]["peak_bytes"]
    for c, figures in ((4, step), (2, bf16)):  # gathered in c; the root's gradient in c and in float32 for reduction
        assert figures["gathered"] == c * (root + 2 * block) + (c + 4) * root and figures["masters"] == p


def test_lora_trains_adapters_over_a_frozen_base(capsys):
    """LoRA on q_proj and v_proj, rank r: r (d + H hd) + r (d + KV hd) adapter parameters per layer (peft's layout),
    float32 masters, gradients and moments for those only, the base in the compute dtype as the forwards' weights."""
    config = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    d, h, kv, hd, layers = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "head_dim", "num_hidden_layers"))
    r = 4
    sim = _simulate(capsys, f"model.lora={{r: {r}, lora_alpha: 8, target_modules: [q_proj, v_proj]}}")
    t = layers * (r * (d + h * hd) + r * (d + kv * hd))
    assert sim["trainable_params"] == t and sim["params"] == 3_286_528
    step = sim["phases"]["training step"]["peak_bytes"]
    assert step["optimizer"] == 8 * t and step["masters"] == 4 * t and step["gradients"] == 4 * t
    assert step["weights"] == 4 * sim["params"] and "reference" not in step  # the base with adapters disabled
    assert "reference forward" in sim["phases"]


def test_batch_scaling_matches_the_whole_simulation():
    """`fit.Scaling` extrapolates each phase from batch 1 and 2; at batch 4 (mid shape, 8 blocks) it equals the
    whole simulation within 2% (FLOPs exactly)."""
    from dataclasses import replace

    from udm_grpo.grpo.fit import Scaling
    from udm_grpo.grpo.simulate import Iteration

    tiny = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    it = Iteration(URSAConfig.from_dict({**tiny, **MID}), {**VAE, "num_vq_embeddings": 4096}, 16, (8, 8), "ddp", 1,
                   True, 1, False, True, None, 4, 4, 8, 2, 1, 4)
    scaled = Scaling().phases(it)
    whole = simulate_phases(**it.phase_args())
    assert list(scaled) == list(whole)
    for name in whole:
        assert scaled[name].flops == pytest.approx(whole[name].flops, rel=1e-9), name
        assert scaled[name].peak_bytes.get("act", 0) + scaled[name].peak_bytes.get("temp", 0) == pytest.approx(
            whole[name].peak_bytes.get("act", 0) + whole[name].peak_bytes.get("temp", 0), rel=0.02), name
    assert replace(it, micro_batch=2).calls()["training step"] == 8


def test_fit_finds_a_plan_that_the_check_confirms(capsys):
    """The overrides --fit prints make a config whose whole simulation fits the memory given; a memory no plan fits
    is refused in one sentence naming the smallest plan (exit 2)."""
    from udm_grpo.cli import main

    base = ["train", "--check", "--simulate", "sampling.num_prompts_per_step=2", "sampling.num_images_per_prompt=4",
            "training.micro_batch_size=8"]
    assert main([*base, "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    memory = 0.9 * before["peak_bytes"]["total"] / 2**30  # the configured plan does not fit this
    assert main([*base, "--fit", "--json", "--gpu-memory", f"{memory}"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["overrides"] and plan["peak_bytes"]["total"] <= memory * 2**30
    assert main([*base, *plan["overrides"], "--json", "--gpu-memory", f"{memory}"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"]["total"] == plan["peak_bytes"]["total"]
    assert main([*base, "--fit", "--gpu-memory", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "no plan fits 1 x 0.001 GiB (0.0009 GiB usable with --headroom 0.1): the smallest needs" in err
    assert "training.micro_batch_size=1" in err
    assert main(["train", "--check", "--fit"]) == 2  # --fit goes with --simulate


def test_more_checkpointing_keeps_less():
    """Each checkpointing level keeps less for the backward than the one before, and recomputes more (the counter
    of FLOPs must not hold the recomputed tensors)."""
    tiny = json.loads((SHIPPED_MODEL / "transformer" / "config.json").read_text())
    config = URSAConfig.from_dict({**tiny, **MID})
    runs = [simulate_phases(config, 4, 4, 16, (8, 8), gradient_checkpointing=level, only=("training step",))
            ["training step"] for level in range(4)]
    kept = [run.peak_bytes.get("act", 0) + run.peak_bytes.get("temp", 0) for run in runs]
    assert kept == sorted(kept, reverse=True) and kept[3] < kept[1], kept
    assert [run.flops for run in runs] == sorted(run.flops for run in runs), [run.flops for run in runs]


def test_a_model_folder_missing_a_shape_key_is_refused(tmp_path, capsys):
    """Config files only: a key that sets the model's size must be there (named with its file, exit 2); head_dim may
    be absent, as in the reference's config.json (Qwen3's default, as the loader takes it)."""
    import shutil

    from udm_grpo.cli import main

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, folder)
    config = folder / "transformer" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in data.items() if k != "head_dim"}))
    assert main(["train", "--check", f"model.path={folder}"]) == 0
    capsys.readouterr()
    config.write_text(json.dumps({k: v for k, v in data.items() if k != "lm_head_size"}))
    assert main(["train", "--check", f"model.path={folder}"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: key 'lm_head_size' is missing" in err and err.count("\n") == 1
