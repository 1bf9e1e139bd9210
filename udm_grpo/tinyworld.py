"""The tiny world: build a shapes-world URSA pipeline from scratch and pretrain it with the URSA loss.

`build_pipeline` renders training scenes, fits the patch tokenizer (its codebook is also the
metric path's embedding), builds the word tokenizer and a fresh URSA transformer. `pretrain`
trains it with `pretraining_loss` on rendered (scene, prompt) pairs, evaluating ShapeEval on the
test split every `eval_every` steps. Everything is seeded: the same config gives the same model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import choice, float_rule, int_rule, opt, section
from .config.rules import BOOL, NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT
from .data.shapes import BACKGROUND, COLORS, generate_records, render, sample_records
from .data.text_tokenizer import build_word_tokenizer, tiny_world_vocabulary
from .diffusion.loss import pretraining_loss
from .diffusion.paths import MetricPath
from .diffusion.sampler import SamplingOptions
from .diffusion.scheduler import KineticOptimalScheduler
from .models.patch_vq import PatchVQ
from .models.pipeline import URSAPipeline
from .models.transformer import URSAConfig, URSATransformer

SHIPPED_MODEL = Path(__file__).parent / "assets" / "tiny-world"


TINY_WORLD_SAMPLING = SamplingOptions(num_inference_steps=20, guidance_scale=1.0, guidance_trunc=0.9)
"""The tiny world's sampling (sample, eval shapes, the trainer's held-out eval): 20 steps, CFG-free."""


@dataclass
class SamplingDefaults:
    """The `sampling` section of a pretrain config: `TINY_WORLD_SAMPLING`'s settings, as YAML keys."""

    num_inference_steps: int = opt(TINY_WORLD_SAMPLING.num_inference_steps, POS_INT, "CTMC sampling steps")
    guidance_scale: float = opt(TINY_WORLD_SAMPLING.guidance_scale, float_rule("a number >= 1", lambda v: v >= 1),
                                "1 = CFG-free")
    guidance_trunc: float = opt(TINY_WORLD_SAMPLING.guidance_trunc,
                                float_rule("a number in (0, 1]", lambda v: 0 < v <= 1), "CFG only while t < it")

    def options(self) -> SamplingOptions:
        return TINY_WORLD_SAMPLING.replace(**vars(self))


@dataclass
class TinyWorldConfig:
    """`udm-grpo pretrain` settings: data, tokenizers, model size, metric path and optimisation."""

    seed: int = opt(0, NONNEG_INT, "seed of everything (data, tokenizer fit, init, noise)")
    image_size: int = opt(64, POS_INT, "image side in pixels")
    patch_size: int = opt(8, POS_INT, "patch tokenizer stride")
    codebook_size: int = opt(256, int_rule(2), "patch codebook entries K")
    tokenizer_images: int = opt(3000, POS_INT, "rendered scenes used to fit the codebook")
    tokenizer_colour_groups: bool = opt(True, BOOL, "give each palette colour its own codebook entries "
                                        "(no mixed-colour patches; see PatchVQ)")
    max_prompt_length: int = opt(16, POS_INT, "text tokens (left-padded)")
    hidden_size: int = opt(256, POS_INT, "transformer width")
    intermediate_size: int = opt(768, POS_INT, "SwiGLU width")
    num_hidden_layers: int = opt(4, POS_INT, "transformer depth")
    num_attention_heads: int = opt(4, POS_INT, "query heads")
    num_key_value_heads: int = opt(2, POS_INT, "key/value heads (GQA)")
    head_dim: int = opt(64, POS_INT, "per-head width")
    path_alpha: float = opt(0.9, POS_FLOAT, "metric path alpha")
    path_c: float = opt(10.0, POS_FLOAT, "metric path c (URSA: 3 for its IBQ codebook)")
    shift: float = opt(1.0, POS_FLOAT, "timestep shift lambda")
    steps: int = opt(6000, POS_INT, "optimiser steps")
    batch_size: int = opt(32, POS_INT, "scenes per step")
    lr: float = opt(1e-3, POS_FLOAT, "peak AdamW learning rate (warm-up, then cosine to 10%)")
    warmup_steps: int = opt(200, NONNEG_INT, "linear warm-up steps")
    weight_decay: float = opt(0.01, NONNEG_FLOAT, "AdamW weight decay")
    caption_dropout: float = opt(0.1, float_rule("a number in [0, 1]", lambda v: 0 <= v <= 1), "CFG dropout")
    eval_every: int = opt(2000, POS_INT, "steps between ShapeEval evaluations")
    eval_prompts: int = opt(96, POS_INT, "test-split prompts per evaluation")
    save_dtype: str = opt("float16", choice("float32", "float16", "bfloat16"), "transformer weights on disk")
    final_images_per_tag: int = opt(64, NONNEG_INT, "test images per tag of the final base_eval.json (0: skip)")
    sampling: SamplingDefaults = section(SamplingDefaults)


def _render_records(records: list[dict], rng: np.random.Generator) -> torch.Tensor:
    """Float[B, 3, H, W] in [-1, 1]."""
    images = np.stack([render(r, rng) for r in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def build_pipeline(cfg: TinyWorldConfig) -> URSAPipeline:
    """Fresh tiny-world pipeline: fitted PatchVQ, word tokenizer, untrained transformer, metric path."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train = generate_records("train", None, cfg.seed)
    picks = rng.integers(0, len(train), cfg.tokenizer_images)
    images = _render_records([train[i] for i in picks], rng)
    groups = [list(BACKGROUND), *map(list, COLORS.values())] if cfg.tokenizer_colour_groups else None
    vae = PatchVQ.fit(images, cfg.codebook_size, patch_size=cfg.patch_size, seed=cfg.seed, colour_groups=groups)
    tokenizer = build_word_tokenizer(tiny_world_vocabulary(), cfg.max_prompt_length)
    text_vocab = len(tokenizer)
    tcfg = URSAConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        num_hidden_layers=cfg.num_hidden_layers, head_dim=cfg.head_dim, rope_theta=10_000.0,
        lm_vocab_size=text_vocab, lm_head_size=cfg.codebook_size, vocab_size=text_vocab + cfg.codebook_size,
        bov_token_id=tokenizer.convert_tokens_to_ids("<bov>"), max_window_layers=cfg.num_hidden_layers,
    )
    transformer = URSATransformer(tcfg)
    path = MetricPath(vae.codebook.detach().clone(), alpha=cfg.path_alpha, c=cfg.path_c)
    scheduler = KineticOptimalScheduler(path, shift=cfg.shift, alpha=cfg.path_alpha, c=cfg.path_c)
    return URSAPipeline(transformer, vae, scheduler, tokenizer, max_prompt_length=cfg.max_prompt_length)


def evaluate_shapes(pipe: URSAPipeline, records: list[dict], images_per_prompt: int = 1, seed: int = 0,
                    sampling: SamplingOptions = TINY_WORLD_SAMPLING, batch_size: int = 64, progress: bool = False):
    """Sample images for GenEval-schema records and score them with ShapeEval.

    Returns (summary dict from `evaluate_images`, uint8 images [len(records) * n, H, W, 3]).
    """
    from tqdm.auto import tqdm

    from .rewards.shapeeval import evaluate_images

    expanded = [r for r in records for _ in range(images_per_prompt)]
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    chunks = []
    for i in tqdm(range(0, len(expanded), batch_size), desc="eval", disable=not progress, leave=False):
        batch = expanded[i : i + batch_size]
        chunks.append(pipe.generate([r["prompt"] for r in batch], sampling, gen).images)
    images = np.concatenate(chunks)
    return evaluate_images(images, expanded), images


def pretrain(pipe: URSAPipeline, cfg: TinyWorldConfig, log=print, progress: bool = True) -> list[dict]:
    """Train `pipe.transformer` in place with the URSA pretraining loss. Returns the eval history."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    test = generate_records("test", None, cfg.seed)
    eval_records = [test[i] for i in np.random.default_rng(0).permutation(len(test))[: cfg.eval_prompts]]
    model, grid = pipe.transformer, pipe.grid(cfg.image_size, cfg.image_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    uncond = pipe.encode_prompt([""])
    history, start = [], time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        batch = sample_records("train", cfg.batch_size, rng, balance_tags=True)
        with torch.no_grad():
            x1 = pipe.vae.encode(_render_records(batch, rng)).flatten(1)
        text = pipe.encode_prompt([r["prompt"] for r in batch])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, metrics = pretraining_loss(model, pipe.scheduler, text, uncond, x1, grid, gen, cfg.caption_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{metrics['accuracy']:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            summary, _ = evaluate_shapes(pipe, eval_records, sampling=cfg.sampling.options(), seed=0)
            model.train()
            entry = {"step": step + 1, "loss": loss.item(), "seconds": round(time.time() - start, 1),
                     "strict": summary["overall"]["strict"], "score": summary["overall"]["score"]}
            history.append(entry)
            log(json.dumps(entry))
    model.eval()
    return history


def record_base_eval(pipe: URSAPipeline, sampling: SamplingOptions, images_per_tag: int = 64) -> dict:
    """The accuracy recorded with a model (`base_eval.json`) on the test split at seed 0: "full" with
    `images_per_tag` images per tag and "quick" with 16 (what the tests re-check; also the trainer's
    held-out set). Small tags repeat their prompts (see `data.prompts.balance_tags`). Each records torch's CPU
    kernel level (`cpu_capability`, e.g. "AVX2") and the CPU's vendor (`cpu_vendor`): the draws depend on both
    (the same level draws differently on Intel and AMD CPUs), so another machine gives other (equally valid)
    figures; `ATEN_CPU_CAPABILITY=avx2` selects that level on a CPU that has it."""
    from .data.prompts import balance_tags

    out = {}
    level = torch.backends.cpu.get_cpu_capability()
    for name, n in (("full", images_per_tag), ("quick", 16)):
        summary, _ = evaluate_shapes(pipe, balance_tags(generate_records("test"), n), 1, 0, sampling, progress=True)
        out[name] = {"split": "test", "images_per_tag": n, "seed": 0, "sampling": sampling.steps_and_guidance,
                     "cpu_capability": level, "cpu_vendor": cpu_vendor(), **summary}
    return out


def cpu_vendor() -> str:
    """The CPU vendor id ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo, else `platform.processor()`."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
