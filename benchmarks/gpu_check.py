"""GPU check at the real shape, for a session that is lent a GPU: one UDM-GRPO iteration of a random-weight
URSA-1.7B (IBQ VAE at 512x512, 1,024 image tokens) with the paper's per-GPU batch in bf16, and the rewards'
throughput on random-weight models of their real shapes. Nothing is downloaded.

Training recipe (GenEval, on 8 GPUs): 16 prompts x 8 images / 8 GPUs = 16 images on this GPU (2 prompts x
G 8), 10 rollout steps, guidance 1, 3 trained steps, kl_beta 0.05 with a frozen bf16 reference, gradient
checkpointing level 1, micro-batch 4 (the reference's per-GPU batch on 32 GPUs). The reward is the mean
brightness (free), so the iteration times the model. One warm-up iteration, then one timed.

Figures, one line each (`name value unit`; lines starting with '#' describe the run): images/s, seconds
per phase (rollout, reward, states, update, total), peak memory, achieved TFLOP/s and model FLOPs
utilisation (2 x params x tokens per forward, backward = 2 forwards, plus attention; rollout, reference
and training passes; `hfu` also counts the gradient-checkpointing recompute; VAE and reward excluded),
then each reward's images/s. Exits 1 on any failure.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--shape 1.7b|tiny] [--skip-rewards] [--peak-tflops 989]

`--shape tiny` is a reduced shape that runs the same code on a CPU in well under a minute (its own test).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# URSA-1.7B-IBQ512 transformer/config.json as far as it is known (the Qwen3-1.7B backbone, URSA's code
# defaults). MUST be checked against the real config.json (docs reference-behaviour.md section 11, item 1):
# the IBQ codebook size K (= lm_head_size, vocab_size = lm_vocab_size + K) is NOT confirmed; 131,072 is a
# placeholder (`--codebook` changes it).
URSA_1_7B = {
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
    "lm_vocab_size": 151_669, "lm_head_size": 131_072, "bov_token_id": 151_652,
}
# IBQ VAE (vae/config.json, section 11 item 2, UNVERIFIED): 5 levels = stride 16, so 512 px -> 32 x 32 tokens.
IBQ_512 = {
    "block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2, "latent_channels": 256,
    "vq_embed_dim": 256, "norm_num_groups": 32, "spatial_stride": 16, "sample_size": 512,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10_000.0, "rms_norm_eps": 1e-6,
    "lm_vocab_size": 64, "lm_head_size": 64,
}
TINY_VAE = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4, "vq_embed_dim": 4,
            "norm_num_groups": 4, "spatial_stride": 4, "sample_size": 32}
SHAPES = {"1.7b": (URSA_1_7B, IBQ_512, 320), "tiny": (TINY, TINY_VAE, 16)}  # (transformer, vae, prompt length)
WORDS = ["a", "photo", "of", "two", "three", "red", "blue", "green", "dog", "cat", "cup", "car", "bench", "and",
         "right", "left", "above", "below"]
PROMPTS = ["a photo of a red dog", "a photo of two cats", "a photo of a blue cup and a car",
           "a photo of a bench left of a dog"]


def figure(name: str, value: float, unit: str = "") -> None:
    print(f"{name} {value:.4g} {unit}".rstrip(), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the model ------------------------------------------------------------------------------------
def build_pipeline(shape: str, device: torch.device, codebook: int | None):
    """Random-weight URSAPipeline of `shape` on `device`: transformer, IBQ VAE, metric-path scheduler with a
    random path embedding, a word-level tokenizer (left padding, the real prompt length)."""
    from udm_grpo.data.text_tokenizer import build_word_tokenizer
    from udm_grpo.diffusion.paths import MetricPath
    from udm_grpo.diffusion.scheduler import KineticOptimalScheduler
    from udm_grpo.models.pipeline import URSAPipeline
    from udm_grpo.models.transformer import URSAConfig, URSATransformer
    from udm_grpo.models.vq import AutoencoderVQ, VQConfig

    tcfg, vcfg, length = dict(SHAPES[shape][0]), dict(SHAPES[shape][1]), SHAPES[shape][2]
    if codebook:
        tcfg["lm_head_size"] = codebook
    k = tcfg["lm_head_size"]
    tok = build_word_tokenizer(WORDS, length)
    tcfg.setdefault("bov_token_id", tok.convert_tokens_to_ids("<bov>"))
    torch.manual_seed(0)
    levels = len(vcfg["block_out_channels"])
    vae_cfg = VQConfig.from_dict({**vcfg, "num_vq_embeddings": k, "down_block_types": ["DownEncoderBlock2D"] * levels,
                                  "up_block_types": ["UpDecoderBlock2D"] * levels}, source=f"{shape} vae")
    with torch.device(device):
        transformer = URSATransformer(URSAConfig(**tcfg, vocab_size=tcfg["lm_vocab_size"] + k))
        vae = AutoencoderVQ(vae_cfg).eval()
        emb = torch.randn(k, vcfg["vq_embed_dim"])
    scheduler = KineticOptimalScheduler(MetricPath(emb, alpha=0.9, c=3.0), shift=3.0, alpha=0.9, c=3.0)
    return URSAPipeline(transformer, vae, scheduler, tok, max_prompt_length=length, source=f"{shape} shape")


def forward_flops(cfg, n_text: int, n_img: int, recompute_level: int = 0) -> tuple[float, float]:
    """(FLOPs of one sample's forward, FLOPs recomputed by gradient checkpointing at `recompute_level`)."""
    h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    s = n_text + 1 + n_img
    qkv, out, mlp = h * (q + 2 * kv), q * h, 3 * h * cfg.intermediate_size
    per_layer = 2 * (qkv + out + mlp) * s + 4 * s * s * q  # matmuls + attention scores and values
    fwd = layers * per_layer + 2 * h * cfg.lm_head_size * n_img  # the head reads the image positions only
    redo = {0: 0, 1: 2 * mlp * s, 2: 2 * (mlp + qkv) * s, 3: per_layer}[recompute_level] * layers
    return float(fwd), float(redo)


class Brightness:
    """Synthetic reward: mean pixel value in [0, 1] (costs nothing, so the iteration times the model)."""

    def __call__(self, images, prompts, metadata):
        from udm_grpo.rewards.base import RewardOutput

        s = torch.as_tensor(np.asarray(images)).float().mean(dim=(1, 2, 3)) / 255
        return RewardOutput(scores=s, values={"brightness": s})


def train_check(args, device: torch.device) -> None:
    from accelerate import Accelerator

    from udm_grpo.config import load_config
    from udm_grpo.grpo.trainer import UDMGRPOTrainer

    start = time.perf_counter()
    pipe = build_pipeline(args.shape, device, args.codebook)
    sync(device)
    size = pipe.vae.config.sample_size
    grid = pipe.grid(size, size)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"# {args.shape} shape: transformer {n_params / 1e6:,.1f} M parameters (K = {pipe.scheduler.num_embeddings}),"
          f" {size}x{size} px -> {grid[0] * grid[1]} image tokens, prompt {pipe.max_prompt_length} tokens; built in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    bf16 = not args.fp32
    recipe = {
        "model.dtype": "bfloat16" if bf16 else "float32", "training.mixed_precision": "bf16" if bf16 else "no",
        "model.gradient_checkpointing": args.checkpointing, "sampling.num_prompts_per_step": args.prompts,
        "sampling.num_images_per_prompt": args.group, "sampling.train_steps": 3, "sampling.train_start": [0, 3],
        "sampling.rollout.num_inference_steps": 10, "sampling.rollout.guidance_scale": 1.0,
        "sampling.rollout.height": size, "sampling.rollout.width": size, "reward.kl_beta": 0.05,
        "training.micro_batch_size": args.micro_batch, "training.lr": 1e-6, "training.seed": 0,
        "experiment.eval_every": 0, "experiment.log_every": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        extra = {"experiment.output_dir": f"{tmp}/run", "data.train": f"{tmp}/prompts.txt",
                 "data.test": f"{tmp}/prompts.txt"}
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**recipe, **extra}.items()])
        acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.training.mixed_precision)
        trainer = UDMGRPOTrainer(cfg, pipeline=pipe, reward=Brightness(), accelerator=acc, progress=False)
        if trainer.acc.device.type != device.type:
            raise RuntimeError(f"the trainer runs on {trainer.acc.device}, not {device}")
        n = trainer.plan.images_per_process
        print(f"# recipe: {args.prompts} prompts x G {args.group} = {n} images per process, 10 rollout steps, "
              f"guidance 1, 3 trained steps, micro-batch {trainer.plan.micro_batch_size}, kl_beta 0.05, "
              f"checkpointing level {args.checkpointing}, {'bf16 autocast' if bf16 else 'float32'}, "
              "float32 master weights", flush=True)
        for attempt in ("warm-up", "timed"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            m = trainer.train_step()
            sync(device)
            wall = time.perf_counter() - start
            if "train/skipped" in m:
                raise RuntimeError(f"the {attempt} iteration skipped its update ({m['train/skipped']})")
            print(f"# {attempt} iteration: {wall:.2f} s, loss {m.get('train/loss', float('nan')):.4g}", flush=True)
    figure("train_images_per_s", n / wall, "images/s")
    for phase in ("rollout", "reward", "states", "update"):
        figure(f"time_{phase}_s", m[f"time/{phase}"], "s")
    figure("time_iteration_s", wall, "s")
    if device.type == "cuda":
        figure("peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, "GiB")
    else:
        import resource

        figure("peak_host_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB")
    fwd, redo = forward_flops(pipe.transformer.config, pipe.max_prompt_length, grid[0] * grid[1], args.checkpointing)
    trained = 3 * n  # (sample, step) pairs
    model_flops = 10 * n * fwd + trained * fwd + trained * 3 * fwd  # rollout + reference + policy fwd/bwd
    figure("model_tflops_per_iteration", model_flops / 1e12, "TFLOP")
    figure("achieved_tflops_per_s", model_flops / wall / 1e12, "TFLOP/s")
    figure("rollout_tflops_per_s", 10 * n * fwd / m["time/rollout"] / 1e12, "TFLOP/s")
    figure("mfu", model_flops / wall / (args.peak_tflops * 1e12), f"of {args.peak_tflops:g} TFLOP/s")
    figure("hfu", (model_flops + trained * redo) / wall / (args.peak_tflops * 1e12), "with recompute")


# ---- rewards at their real shapes, random weights -------------------------------------------------------
def _byte_symbols() -> list[str]:
    """GPT-2 byte-to-unicode symbols: a character-level CLIP vocabulary (no merges)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + i) for i, _ in enumerate(b for b in range(256) if b not in keep)]


def clip_parts(shape: str, name: str, folder: Path, device: torch.device):
    """(random CLIPModel, CLIPProcessor): ViT-H/14 (PickScore) or ViT-L/14 (CLIPScore, GenEval colours)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate([*syms, *(s + "</w>" for s in syms), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    if shape == "tiny":
        text, vision, proj, px = (32, 64, 2, 2), (32, 64, 2, 2, 8), 16, 32
    elif name == "vit-h":
        text, vision, proj, px = (1024, 4096, 24, 16), (1280, 5120, 32, 16, 14), 1024, 224
    else:
        text, vision, proj, px = (768, 3072, 12, 12), (1024, 4096, 24, 16, 14), 768, 224
    cfg = CLIPConfig(
        text_config={"vocab_size": 49_408, "hidden_size": text[0], "intermediate_size": text[1],
                     "num_hidden_layers": text[2], "num_attention_heads": text[3], "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": vision[0], "intermediate_size": vision[1], "num_hidden_layers": vision[2],
                       "num_attention_heads": vision[3], "patch_size": vision[4], "image_size": px},
        projection_dim=proj)
    with torch.device(device):
        model = CLIPModel(cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": px},
                                                                 crop_size={"height": px, "width": px}), tokenizer=tok)
    return model.to(device, dtype).eval(), processor


GENEVAL_RECORDS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "cup", "count": 1}],
     "prompt": "a photo of a cat and a cup"},
    {"tag": "counting", "include": [{"class": "car", "count": 3}], "exclude": [{"class": "car", "count": 4}],
     "prompt": "a photo of three cars"},
    {"tag": "colors", "include": [{"class": "bench", "count": 1, "color": "red"}], "prompt": "a photo of a red bench"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                  "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"},
    {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "blue"},
                                      {"class": "dog", "count": 1, "color": "green"}],
     "prompt": "a photo of a blue cup and a green dog"},
]


def detector_parts(shape: str, device: torch.device):
    """(random Mask2Former, its processor, labels): Swin-S backbone, 100 queries, 80 COCO-sized classes
    (mask2former-swin-small-coco-instance's shape) or a tiny one."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    names = ["person", "dog", "cat", "cup", "car", "bench"]
    labels = dict(enumerate(names + [f"object {i}" for i in range(80 - len(names))]))
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if shape == "tiny":
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64, window_size=4,
                              out_features=stages)
        cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                                num_attention_heads=2, num_queries=20, use_pretrained_backbone=False)
        processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    else:
        backbone = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], image_size=224,
                              window_size=7, out_features=stages)
        cfg = Mask2FormerConfig(backbone_config=backbone, num_queries=100, use_pretrained_backbone=False)
        processor = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333})
    cfg.id2label, cfg.label2id = labels, {v: k for k, v in labels.items()}
    with torch.device(device):
        model = Mask2FormerForUniversalSegmentation(cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return model.to(device, dtype).eval(), processor, labels


def reward_check(args, device: torch.device) -> None:
    from udm_grpo.rewards.clip_score import CLIPReward, PickScoreReward
    from udm_grpo.rewards.geneval import GenEvalReward

    px, n = (64, 8) if args.shape == "tiny" else (512, args.reward_images)
    images = np.random.default_rng(0).integers(0, 256, (n, px, px, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        rewards = {}
        clip = CLIPReward("random ViT-L/14", device=str(device))
        clip._model, clip._processor = clip_parts(args.shape, "vit-l", Path(tmp), device)
        rewards["clipscore"] = (clip, None)
        pick = PickScoreReward("random ViT-H/14", device=str(device))
        pick._model, pick._processor = clip_parts(args.shape, "vit-h", Path(tmp), device)
        rewards["pickscore"] = (pick, None)
        geneval = GenEvalReward(device=str(device))
        geneval._detector, geneval._processor, geneval.labels = detector_parts(args.shape, device)
        geneval._clip, geneval._clip_processor = clip._model, clip._processor  # colours: CLIP ViT-L/14
        rewards["geneval"] = (geneval, [GENEVAL_RECORDS[i % len(GENEVAL_RECORDS)] for i in range(n)])
        shapes = "tiny stand-ins" if args.shape == "tiny" else "CLIP ViT-L/14, PickScore ViT-H/14, Mask2Former Swin-S"
        print(f"# rewards: {n} random {px}x{px} images, random weights ({shapes}), "
              f"{'float16' if device.type == 'cuda' else 'float32'}", flush=True)
        for name, (reward, meta) in rewards.items():
            prompts = [r["prompt"] for r in meta] if meta else ["a photo of a red dog"] * n
            reward(images[:2], prompts[:2], None if meta is None else meta[:2])  # warm-up
            sync(device)
            start = time.perf_counter()
            out = reward(images, prompts, meta)
            sync(device)
            if not torch.isfinite(torch.as_tensor(out.scores)).all():
                raise RuntimeError(f"reward {name} returned non-finite scores")
            figure(f"reward_{name}_images_per_s", n / (time.perf_counter() - start), "images/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    ap.add_argument("--skip-rewards", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200/H100 SXM: 989)")
    ap.add_argument("--codebook", type=int, default=None, help="IBQ codebook size K (default: the shape's)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step on this process (default 2)")
    ap.add_argument("--group", type=int, default=8, help="group size G (default 8, GenEval)")
    ap.add_argument("--micro-batch", type=int, default=4, help="training micro-batch (default 4)")
    ap.add_argument("--checkpointing", type=int, default=1, choices=[0, 1, 2, 3])
    ap.add_argument("--reward-images", type=int, default=32)
    ap.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    args = ap.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: CUDA is not available here (use --device cpu --shape tiny)")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"# gpu_check on {name}, torch {torch.__version__}", flush=True)
        start = time.perf_counter()
        train_check(args, device)
        if not args.skip_rewards:
            reward_check(args, device)
        print(f"# all checks passed in {time.perf_counter() - start:.1f} s", flush=True)
        return 0
    except Exception:
        traceback.print_exc()
        print("# gpu_check FAILED", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
