import pytest

from udm_grpo.config import (
    Config,
    config_from_dict,
    config_to_dict,
    describe_schema,
    load_config,
    save_resolved,
    validate_config,
)
from udm_grpo.errors import ConfigError
from udm_grpo.grpo.batching import plan_batches, plan_from_config


def test_defaults_are_the_paper_recipe():
    cfg = load_config(None, [])
    s, r, t = cfg.sampling, cfg.reward, cfg.training
    assert (s.num_prompts_per_step, s.num_images_per_prompt, s.train_steps, s.train_start) == (16, 8, 3, [0, 3])
    assert s.forward_process and s.clean_response
    assert (s.rollout.num_inference_steps, s.rollout.guidance_scale) == (10, 1.0)
    assert (r.advantage_clipping, r.ratio_clipping, r.kl_beta) == (5.0, 1e-4, 0.05)
    assert (r.kl_mode, r.scale_rewards, r.loss_type) == ("sequence", "group", "grpo")
    assert r.importance_sampling_level == "sequence"
    assert (r.ratio_clipping_high, t.reuse_rollouts, s.dynamic_sampling, r.per_prompt_stats) == (None, 1, False, False)
    assert (t.lr, t.betas, t.weight_decay, t.max_grad_norm, t.seed) == (1e-6, [0.9, 0.95], 0.01, 1.0, 1337)
    assert cfg.model.path is None and cfg.model.lora is None
    assert config_to_dict(cfg) == config_to_dict(Config())
    assert len(describe_schema()) > 40


def test_reward_params_of_another_shape_replace_the_default(tmp_path):
    """A value whose shape differs from the layer below (a list over the default mapping) replaces it, so
    validation names the key instead of the merge failing with a traceback."""
    path = tmp_path / "run.yaml"
    path.write_text("reward:\n  name: [shapeeval, clipscore]\n  params: [{strict: 0.5}, {}]\n")
    with pytest.raises(ConfigError, match=r"config key 'reward.params' must be a mapping, got \[.*run.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="config key 'reward.params' must be a mapping.*override"):
        load_config(None, ["reward.params=[{strict: 0.5},{}]"])
    cfg = load_config(None, ["reward.name=[shapeeval,clipscore]", "reward.params.shapeeval.strict=0.5"])
    assert cfg.reward.params == {"shapeeval": {"strict": 0.5}}


def test_a_layer_naming_another_reward_drops_the_params_below(tmp_path):
    """Reward parameters belong to the reward named: the tiny-world layer's ShapeEval parameters do not leak
    into a file or override that names another reward (and are kept by one that names the same)."""
    base = tmp_path / "base.yaml"
    base.write_text("reward:\n  name: shapeeval\n  params: {strict: true, clean: 0.5}\n")
    paper = tmp_path / "paper.yaml"
    paper.write_text("reward:\n  name: geneval\n  params: {}\n")
    assert load_config([base, paper]).reward.params == {}
    assert load_config([base], ["reward.name=pickscore"]).reward.params == {}
    composed = load_config([base], ["reward.name=[shapeeval,clipscore]", "reward.weights=[1,0.5]"]).reward
    assert composed.params == {} and composed.weights == [1, 0.5]
    same = load_config([base], ["reward.name=shapeeval", "reward.params.clean=0"]).reward
    assert same.params == {"strict": True, "clean": 0}


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "sampling:\n  num_images_per_prompt: 4\n  rollout:\n    num_inference_steps: 8\n    height: 64\n"
        "reward:\n  name: shapeeval\n  params: {strict: true}\n"
        "training:\n  lr: 3e-5\n  micro_batch_size: 8\n"
        "experiment:\n  output_dir: ${data.train}_run\n"
        "data:\n  train: shapes\n"
        "model:\n"  # empty section = defaults
    )
    cfg = load_config(path, ["training.lr=1e-4", "reward.params.extra=2", "sampling.train_start=[1,2]"])
    assert cfg.sampling.num_images_per_prompt == 4
    assert cfg.sampling.rollout.num_inference_steps == 8 and cfg.sampling.rollout.height == 64
    assert cfg.sampling.rollout.width == 512  # default kept
    assert cfg.training.lr == 1e-4 and isinstance(cfg.training.lr, float)
    assert cfg.training.micro_batch_size == 8
    assert cfg.reward.params == {"strict": True, "extra": 2}
    assert cfg.sampling.train_start == [1, 2]
    assert cfg.experiment.output_dir == "shapes_run"  # plain interpolation is resolved
    assert cfg.model.gradient_checkpointing == 1


def test_save_resolved_roundtrip(tmp_path):
    cfg = load_config(None, ["sampling.num_images_per_prompt=4", "model.lora={r: 8, lora_alpha: 16}"])
    out = tmp_path / "sub" / "config.yaml"
    save_resolved(cfg, out)
    again = load_config(out, [])
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.model.lora == {"r": 8, "lora_alpha": 16}


def test_validate_config_and_from_dict():
    cfg = Config()
    cfg.sampling.train_steps = 0
    with pytest.raises(ConfigError, match="sampling.train_steps"):
        validate_config(cfg)
    assert config_from_dict({"reward": {"kl_beta": 0}}).reward.kl_beta == 0.0


BAD_OVERRIDES = [
    (["sampling.trian_steps=3"], "'sampling.trian_steps'.*did you mean 'sampling.train_steps'"),
    (["samplng.train_steps=3"], "'samplng'.*did you mean 'sampling'"),
    (["training.batch_size=4"], "'training.batch_size'.*training.micro_batch_size"),
    (["sampling.train_steps=-1"], "'sampling.train_steps' must be a positive integer, got -1"),
    (["sampling.train_steps=abc"], "'sampling.train_steps' must be a positive integer, got 'abc'"),
    (["sampling.train_steps=2.5"], "'sampling.train_steps' must be a positive integer"),
    (["sampling.num_images_per_prompt=1"], "'sampling.num_images_per_prompt' must be an integer >= 2"),
    (["sampling.train_start=[3,1]"], "'sampling.train_start' must be \\[lo, hi\\) with lo < hi"),
    (["sampling.train_start=[0]"], "'sampling.train_start' must be a list of two"),
    (["sampling.train_start=[0,9]"], "'sampling.train_start'.*'sampling.rollout.num_inference_steps' is 10"),
    (["sampling.train_steps=12"], "'sampling.train_steps' 12 exceeds 'sampling.rollout.num_inference_steps' 10"),
    (["sampling.rollout.num_inference_steps=4"], "'sampling.rollout.num_inference_steps' is 4"),
    (["sampling.rollout.guidance_scale=0.5"], "'sampling.rollout.guidance_scale' must be a number >= 1"),
    (["sampling.forward_process=yes please"], "'sampling.forward_process' must be true or false"),
    (["reward.kl_mode=per_token"], "'reward.kl_mode' must be one of 'sequence', 'token', got 'per_token'"),
    (["reward.kl_beta=-0.1"], "'reward.kl_beta' must be a non-negative number"),
    (["reward.ratio_clipping=0"], "'reward.ratio_clipping' must be a number in \\(0, 1\\)"),
    (["reward.advantage_clipping=.nan"], "'reward.advantage_clipping' must be a positive number or null"),
    (["training.mixed_precision=fp16"], "'training.mixed_precision' must be one of 'no', 'bf16', got 'fp16'"),
    (["training.betas=[0.9,1.5]"], "'training.betas' must be a list of two numbers in \\[0, 1\\)"),
    (["training.lr=0"], "'training.lr' must be a positive number, got 0"),
    (["model.gradient_checkpointing=4"], "'model.gradient_checkpointing' must be an integer in \\[0, 3\\]"),
    (["model.dtype=float16"], "'model.dtype' must be one of 'float32', 'bfloat16'"),
    (["model.lora=8"], "'model.lora' must be a mapping or null, got 8"),
    (["sampling=3"], "'sampling'.*must be a mapping of keys"),
    (["training.max_nonfinite=0"], "'training.max_nonfinite' must be a positive integer"),
    (["experiment.log_every=0"], "'experiment.log_every' must be a positive integer"),
    (["experiment.output_dir=${eval:'1+1'}"], "'experiment.output_dir'.*'\\$\\{eval:...\\}' resolver"),
    (["experiment.output_dir=${nope.key}"], "'experiment.output_dir'.*could not be resolved"),
    (["sampling.train_steps"], "override 'sampling.train_steps' must look like key=value"),
]


@pytest.mark.parametrize("overrides, pattern", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_overrides(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?"))
    if "=" in overrides[0] and "resolver" not in pattern and "resolved" not in pattern:
        assert overrides[0].split("=")[0].split(".")[0] in message


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  train_steps: 3\n  rollout: [1,\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("reward:\n  kl_bet: 0.1\n")
    with pytest.raises(ConfigError, match=r"'reward.kl_bet' in '.*typo.yaml' is unknown; did you mean 'reward.kl_beta"):
        load_config(typo)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("training:\n  seed: -3\n")
    with pytest.raises(ConfigError, match=r"'training.seed' must be a non-negative integer, got -3 \(set in '.*wrong"):
        load_config(wrong)
    dup = tmp_path / "dup.yaml"
    dup.write_text("training:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="dup.yaml' is not valid YAML at line 3"):
        load_config(dup)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(top)
    # a later override fixes a bad file value; the origin points at the override when it is the culprit
    assert load_config(wrong, ["training.seed=5"]).training.seed == 5
    with pytest.raises(ConfigError, match="set by override 'training.seed=-1'"):
        load_config(None, ["training.seed=-1"])


def test_batch_planner_paper_numbers():
    plan = plan_batches(16, 8, 32, 4, 3)
    assert (plan.images_per_step, plan.images_per_process, plan.micro_batches_per_process) == (128, 4, 1)
    assert plan.grad_accum_steps == 3 and plan.pairs_per_update == 384
    assert "128 images/step" in plan.describe() and "3 accumulation steps" in plan.describe()
    assert "\n" not in plan.describe()
    whole = plan_batches(16, 16, 32, None, 3)  # None = all of a process's images at once
    assert whole.micro_batch_size == 8 and whole.grad_accum_steps == 3
    single = plan_batches(16, 8, 8, 4, 3)  # one node: 16 per process in 4 micro-batches
    assert single.images_per_process == 16 and single.grad_accum_steps == 12
    assert plan_from_config(load_config(None, ["training.micro_batch_size=4"]), 32) == plan


def test_batch_planner_mismatch_messages():
    with pytest.raises(ConfigError) as info:
        plan_batches(16, 8, 3, None, 3)
    assert str(info.value).startswith(
        "16 prompts x 8 images = 128 images cannot be split over 3 processes; "
        "use a prompt count divisible by 3 such as 15 or 18"
    )
    with pytest.raises(ConfigError, match="divisible by 5 such as 5 or 10"):
        plan_batches(6, 4, 10, None, 3)  # 4 images per prompt share a factor 2 with 10 processes
    with pytest.raises(ConfigError, match="training.micro_batch_size 3 does not divide the 4 images .* such as 2 or 4"):
        plan_batches(16, 8, 32, 3, 3)
    with pytest.raises(ConfigError, match="training.micro_batch_size must be a positive integer"):
        plan_batches(16, 8, 32, 0, 3)


def test_a_config_built_in_code_is_checked_like_one_from_yaml(tmp_path):
    """The trainer's start check re-validates the Config it is given: the same sentence as from an override."""
    from udm_grpo.grpo.trainer import UDMGRPOTrainer

    with pytest.raises(ConfigError) as from_yaml:
        load_config(None, ["sampling.train_steps=20"])
    cfg = Config()
    cfg.sampling.train_steps = 20
    with pytest.raises(ConfigError) as in_code:
        UDMGRPOTrainer(cfg, progress=False)
    assert str(in_code.value) == str(from_yaml.value) and "'sampling.train_steps' 20 exceeds" in str(in_code.value)
    cfg = Config()
    cfg.training.lr = -1.0
    with pytest.raises(ConfigError, match="'training.lr' must be a positive number, got -1.0"):
        UDMGRPOTrainer(cfg, progress=False)
