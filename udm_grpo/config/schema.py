"""The schema of a UDM-GRPO run: one dataclass per section, each leaf a field carrying its validation rule
and a one-line help text (`opt`); the defaults are the paper's URSA-1.7B recipe. Key names follow the official
UDM-GRPO configs where they exist. `loading.py` builds instances from YAML and overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from .rules import (
    BETAS,
    BOOL,
    INT_PAIR,
    MAPPING,
    MIXED_PRECISION,
    NONNEG_FLOAT,
    NONNEG_INT,
    NUMBERS,
    POS_FLOAT,
    POS_INT,
    REWARD_NAME,
    STRING,
    Rule,
    choice,
    float_rule,
    int_rule,
    optional,
)


def opt(default, rule: Rule, help_text: str = ""):
    """A dataclass field carrying its validation rule and a one-line help text."""
    meta = {"rule": rule, "help": help_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls):
    return field(default_factory=cls)


@dataclass
class ModelConfig:
    path: str | None = opt(None, optional(STRING), "pipeline folder (official URSA layout); null = the tiny world")
    lora: dict | None = opt(None, optional(MAPPING), "peft LoraConfig kwargs; null = full fine-tune")
    gradient_checkpointing: int = opt(1, int_rule(0, 3), "0 none, 1 MLP, 2 MLP+QKV, 3 whole layer")
    dtype: str = opt("bfloat16", choice("float32", "bfloat16"), "compute dtype: bfloat16 runs forwards under autocast "
                     "and stores the frozen reference in bf16; trained weights are always float32 masters")


@dataclass
class RolloutConfig:
    num_inference_steps: int = opt(10, POS_INT, "CTMC sampling steps per rollout (Reduced-Step: 10)")
    guidance_scale: float = opt(1.0, float_rule("a number >= 1", lambda v: v >= 1), "1 = CFG-free")
    guidance_trunc: float = opt(0.9, float_rule("a number in (0, 1]", lambda v: 0 < v <= 1), "CFG only while t < it")
    height: int = opt(512, POS_INT, "image height in pixels")
    width: int = opt(512, POS_INT, "image width in pixels")
    batch_size: int | None = opt(None, optional(POS_INT), "images per rollout forward per process; null = all")

    def options(self):
        """These settings as the sampler's `SamplingOptions`."""
        from ..diffusion.sampler import SamplingOptions

        return SamplingOptions(self.num_inference_steps, self.guidance_scale, self.guidance_trunc, self.height,
                               self.width, self.batch_size)


@dataclass
class SamplingConfig:
    num_prompts_per_step: int = opt(16, POS_INT, "prompts P per optimiser step (all processes together)")
    num_images_per_prompt: int = opt(8, int_rule(2), "group size G")
    train_steps: int = opt(3, POS_INT, "consecutive rollout steps trained per sample (Reduced-Step)")
    train_start: list = opt([0, 3], INT_PAIR, "first trained step ~ UniformInt[lo, hi)")
    forward_process: bool = opt(True, BOOL, "states re-noised from the final sample (false: rollout states)")
    clean_response: bool = opt(True, BOOL, "action = final clean sample (false: the step's own prediction)")
    dynamic_sampling: bool = opt(False, BOOL, "DAPO: train groups whose rewards differ; refill the step from the "
                                 "prompt stream (up to max_extra_rollouts), else fill with equal-reward groups")
    max_extra_rollouts: int | None = opt(None, optional(NONNEG_INT), "extra rollout images per step that dynamic "
                                         "sampling may draw; null = one more step's worth (P x G)")
    rollout: RolloutConfig = section(RolloutConfig)


@dataclass
class RewardConfig:
    name: str | list = opt("geneval", REWARD_NAME, "reward name, or a list of names summed with reward.weights")
    params: dict = opt({}, MAPPING, "keyword arguments of the reward (of a list: {name: {...}} per listed reward)")
    weights: list | None = opt(None, optional(NUMBERS), "weights of a list of rewards; null = all 1")
    normalize: bool = opt(False, BOOL, "standardise each listed reward's scores per call before the weighted sum")
    advantage_clipping: float | None = opt(5.0, optional(POS_FLOAT), "clip advantages to +-this; null = off")
    advantage_eps: float = opt(1e-4, POS_FLOAT, "A = (s - mean) / (std + eps)")
    scale_rewards: str = opt("group", choice("group", "batch", "none"), "advantage divisor: the group's std, the "
                             "batch's std, or none (Dr. GRPO)")
    per_prompt_stats: bool = opt(False, BOOL, "Flow-GRPO: centre (and scale) advantages on the prompt's scores of "
                                 "its last data.history groups as well as this one")
    ratio_clipping: float = opt(1e-4, float_rule("a number in (0, 1)", lambda v: 0 < v < 1), "PPO epsilon")
    ratio_clipping_high: float | None = opt(None, optional(POS_FLOAT), "upper PPO epsilon (DAPO clip-higher); null "
                                            "= ratio_clipping")
    importance_sampling_level: str = opt("sequence", choice("sequence", "token"), "ratio of sequence-mean "
                                         "log-probs (the reference, GSPO) or per-token ratios (PPO, GRPO)")
    loss_type: str = opt("grpo", choice("grpo", "dapo", "dr_grpo"), "loss normaliser: samples trained (grpo), "
                         "tokens trained (dapo: the same at a fixed image size), or the constant P x G x "
                         "train_steps (dr_grpo)")
    kl_beta: float = opt(0.05, NONNEG_FLOAT, "weight of the k3 KL to the reference; 0 = no reference")
    kl_mode: str = opt("sequence", choice("sequence", "token"), "k3 on sequence-mean or per-token log-probs")


@dataclass
class TrainingConfig:
    micro_batch_size: int | None = opt(None, optional(POS_INT), "samples per forward/backward; null = all")
    updates_per_rollout: int = opt(1, POS_INT, "optimiser updates per rollout (>1 stores old log-probs)")
    reuse_rollouts: int = opt(1, POS_INT, "train each step on the last R rollouts (older ones with importance "
                              "ratios against the policy that drew them); 1 = on-policy")
    max_staleness: int | None = opt(None, optional(POS_INT), "drop reused samples drawn more than this many "
                                    "optimiser updates ago; null = keep all R")
    max_steps: int = opt(10000, POS_INT, "optimiser steps")
    lr: float = opt(1e-6, POS_FLOAT, "AdamW learning rate (constant after the warm-up)")
    lr_warmup_steps: int = opt(0, NONNEG_INT, "linear learning-rate warm-up steps; 0 = none (the paper)")
    betas: list = opt([0.9, 0.95], BETAS, "AdamW betas")
    weight_decay: float = opt(0.01, NONNEG_FLOAT, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, optional(POS_FLOAT), "global gradient-norm clip; null = off")
    seed: int = opt(1337, NONNEG_INT, "base seed (per-rank streams derive from it)")
    mixed_precision: str = opt("bf16", MIXED_PRECISION, "accelerate's mixed precision; 'bf16' also makes "
                               "forwards bfloat16 (as model.dtype does)")
    max_nonfinite: int = opt(3, POS_INT, "stop after this many consecutive non-finite steps")
    engine: str = opt("auto", choice("auto", "ddp", "deepspeed", "fsdp"), "auto = what `accelerate launch "
                      "--config_file` selected (DeepSpeed, FSDP), else DDP")
    zero_stage: int | None = opt(None, optional(int_rule(1, 3)), "DeepSpeed ZeRO stage; null = the accelerate "
                                 "config's, else 2 (the paper)")
    offload_optimizer: bool = opt(False, BOOL, "DeepSpeed (any ZeRO stage): float32 masters, AdamW moments and "
                                  "the step on the CPU (DeepSpeed's CPUAdam)")
    offload_param: bool = opt(False, BOOL, "DeepSpeed ZeRO-3: parameters on the CPU; FSDP2: CPUOffloadPolicy "
                              "(sharded parameters, gradients and the AdamW step on the CPU)")


@dataclass
class ExperimentConfig:
    output_dir: str = opt("runs/udm-grpo", STRING, "run folder: resolved config, logs, samples, checkpoints")
    resume_from_checkpoint: str | None = opt(None, optional(STRING), "checkpoint folder or 'latest'; null = fresh")
    log_every: int = opt(5, POS_INT, "steps between metric log lines")
    eval_every: int = opt(100, NONNEG_INT, "steps between held-out evaluations; 0 = off")
    save_every: int = opt(100, NONNEG_INT, "steps between checkpoints; 0 = only at the end")
    num_eval_prompts: int = opt(64, POS_INT, "held-out prompts per evaluation")
    eval_images_per_prompt: int = opt(1, POS_INT, "images per held-out prompt")
    eval_images_per_tag: int | None = opt(None, optional(POS_INT), "tagged prompts: this many held-out images "
                                          "per tag instead (small tags repeat prompts); null = off")
    eval_num_inference_steps: int = opt(25, POS_INT, "sampling steps of the held-out evaluation")
    eval_guidance_scale: float = opt(1.0, float_rule("a number >= 1", lambda v: v >= 1), "guidance of the evaluation")
    keep_checkpoints: int | None = opt(3, optional(POS_INT), "keep the newest N checkpoints; null = all")
    wandb: bool = opt(False, BOOL, "also log to Weights & Biases")


@dataclass
class DataConfig:
    train: str | None = opt(None, optional(STRING), "training prompts (.txt/.jsonl or built-in set); null = default")
    test: str | None = opt(None, optional(STRING), "held-out prompts, never optimised; null = default")
    shuffle: bool = opt(True, BOOL, "shuffle training prompts each epoch")
    curriculum: bool = opt(False, BOOL, "draw prompts whose recent pass rate is 0 or 1 with weight "
                           "curriculum_floor (others and unseen prompts: 1)")
    curriculum_floor: float = opt(0.1, float_rule("a number in (0, 1]", lambda v: 0 < v <= 1),
                                  "curriculum weight of a prompt whose last data.history groups all passed or failed")
    history: int = opt(4, POS_INT, "groups remembered per prompt (curriculum, reward.per_prompt_stats)")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    reward: RewardConfig = section(RewardConfig)
    training: TrainingConfig = section(TrainingConfig)
    experiment: ExperimentConfig = section(ExperimentConfig)
    data: DataConfig = section(DataConfig)

    @property
    def bf16(self) -> bool:
        """Compute in bf16 (autocast forwards, a bf16 reference): `model.dtype: bfloat16` or bf16 mixed precision."""
        return self.model.dtype == "bfloat16" or self.training.mixed_precision == "bf16"


