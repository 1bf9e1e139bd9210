"""One real UDM-GRPO iteration at the real URSA-1.7B shape on the CPU, through the CLI (issue 24, item 5).

NOT IN CI: at the 1.7B shape (2.26 B parameters with K = 131,072) it takes minutes per training step on a CPU
and about 20 GB of RAM (expected peak of `train`: 4.2 GiB of bf16 weights + about 10 GiB of activations + the
runtime, and 8.4 GiB of float32 weights while loading, before the LoRA policy casts them to bf16) and about
5 GB of disk (4.2 GiB of bf16 transformer weights); run it on a machine with nothing else running:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_shape_rehearsal.py [--shape FOLDER] [--codebook K]
        [--workdir DIR] [--keep] [KEY=VALUE ...]

A small shape (hidden 256, 2 layers, K 4,096, VAE channels 32) runs end to end in about a minute:

    .venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import real_shape_rehearsal as r; \
        from pathlib import Path; r.small_shape(Path('/tmp/small-shape'))"
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_shape_rehearsal.py --shape /tmp/small-shape

What it does and measures:
1. build: a random-weight URSA pipeline at the shape of a config folder (default
   `udm_grpo/configs/shapes/ursa-1.7b-ibq512/`, K = 131,072 unless `--codebook K`) saved in the official layout
   (`URSAPipeline.save_pretrained`: model_index.json, transformer/ and vae/ safetensors in bf16 (the loaders
   cast to the dtype asked for), scheduler/ with its float32 `path.emb` [K, D] = the VQ codebook, tokenizer/ a
   byte-level BPE tokenizer (the Qwen tokenizer's format, 256 byte tokens; prompts are padded to the same
   320 tokens, so the shapes are the real ones) that loads offline). The transformer is built on the meta
   device, materialised in bf16 and filled in chunks, so the build holds one bf16 copy (about 4.5 GB).
2. simulate: `udm-grpo train --check --simulate --json` with the run's overrides on the saved folder (the
   prediction: peak bytes per phase, on fake tensors).
3. train: `udm-grpo train` with LoRA (r 8 on q_proj, v_proj), bf16 compute, 1 prompt x 2 images, 2 rollout
   steps, 1 trained step, the ShapeEval reward (rule-based, no model), no evaluation, `--steps 1`; then
   `--resume latest --steps 2` for one more step.
4. sample: `udm-grpo sample --checkpoint RUN` of one image (2 sampling steps); reported as 'not available' when
   the CLI refuses a LoRA checkpoint.
Printed: wall time of each phase, the trainer's own phase times (`time/*` of metrics.jsonl), the peak RSS of
each subprocess (`os.wait4`'s ru_maxrss: the kernel's high-water mark of that process), and the simulation's
peak beside the measured one. The simulation counts tensors only (weights, gradients, optimizer state,
activations, logit tables); the measured RSS also holds the Python / torch runtime, the VAE on the CPU, the
reward, the prompts, and transient copies while weights are loaded and checkpoints are written.
Extra `KEY=VALUE` arguments are added to the train and simulate overrides (e.g. model.gradient_checkpointing=1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from udm_grpo.models.io import read_config  # noqa: E402

DEFAULT_SHAPE = Path(__file__).resolve().parents[1] / "udm_grpo" / "configs" / "shapes" / "ursa-1.7b-ibq512"
GIB = 2**30
CHUNK = 1 << 24  # elements filled per random draw (32 MiB in bf16)
PROMPT = "a photo of a red circle"
RANDOM_NOTE = "Random weights at this shape (benchmarks/real_shape_rehearsal.py); for rehearsals only."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's; <|endoftext|> pads


def byte_tokenizer(max_length: int):
    """A byte-level BPE tokenizer in the format of Qwen's (tokenizer.json; 256 byte tokens, no merges, Qwen's
    special tokens, <|endoftext|> as the left pad), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS[0], padding_side="left",
                                   truncation_side="right", model_max_length=max_length)


def shape_configs(shape: Path, codebook: int | None = None) -> tuple[dict, dict, dict, dict]:
    """(transformer config, vae config, scheduler config, model_index) of a shape folder, with K = `codebook`
    when given (lm_head_size, vocab_size = lm_vocab_size + K, num_vq_embeddings); `_note`s dropped."""
    from udm_grpo.diffusion.scheduler import CONFIG_NAME

    transformer, _ = read_config(shape / "transformer", "transformer/")
    vae, _ = read_config(shape / "vae", "vae/")
    scheduler, _ = read_config(shape / "scheduler", "scheduler/", CONFIG_NAME)
    index, _ = read_config(shape, "URSA pipeline", "model_index.json")
    if codebook:
        transformer = {**transformer, "lm_head_size": codebook, "vocab_size": transformer["lm_vocab_size"] + codebook}
        vae = {**vae, "num_vq_embeddings": codebook}
    drop = lambda d: {k: v for k, v in d.items() if k != "_note"}  # noqa: E731
    return drop(transformer), drop(vae), drop(scheduler), drop(index)


def fill_normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """t ~ N(0, std) in place, CHUNK elements at a time (no full-size float32 temporary)."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        flat[start:start + CHUNK].normal_(0.0, std, generator=generator)


def random_transformer(data: dict, dtype: torch.dtype, seed: int):
    """URSATransformer of config dict `data` in `dtype`, built on meta and filled in chunks: linear and embedding
    weights ~ N(0, 0.02), norm weights 1 (the project's `reset_parameters` rule)."""
    from torch import nn

    from udm_grpo.models.transformer import RMSNorm, URSAConfig, URSATransformer

    config = URSAConfig.from_dict(data, "transformer/config.json")
    with torch.device("meta"):
        model = URSATransformer(config)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    filled = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                fill_normal_(module.weight, 0.02, g)
                filled.add(module.weight)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
                filled.add(module.weight)
    left = [n for n, p in model.named_parameters() if p not in filled]
    assert not left, f"parameters without a fill rule: {left[:3]}"
    model._set_rope_buffer()  # to_empty left the (non-persistent) buffer uninitialised
    return model.eval()


def build_pipeline(shape: Path, out: Path, codebook: int | None = None, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0) -> dict:
    """A random-weight URSA pipeline at the shape of the config folder `shape`, saved to `out` in the official
    layout with its transformer and VAE weights in `dtype`. Returns {"params", "vae_params", "codebook",
    "seconds", "bytes" (on disk)}."""
    from udm_grpo.diffusion.paths import build_path
    from udm_grpo.diffusion.scheduler import KineticOptimalScheduler
    from udm_grpo.models.pipeline import DEFAULT_PROMPT_LENGTH, URSAPipeline
    from udm_grpo.models.vq import AutoencoderVQ, VQConfig

    start = time.perf_counter()
    t_cfg, v_cfg, s_cfg, index = shape_configs(Path(shape), codebook)
    if v_cfg.get("_class_name", "AutoencoderVQ") != "AutoencoderVQ":
        raise SystemExit(f"{shape}/vae/config.json: only AutoencoderVQ shapes are built, got {v_cfg['_class_name']!r}.")
    length = int(index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH))
    transformer = random_transformer({**t_cfg, "_note": RANDOM_NOTE}, dtype, seed)
    torch.manual_seed(seed)
    vae = AutoencoderVQ(VQConfig.from_dict({**v_cfg, "_note": RANDOM_NOTE}, "vae/config.json")).eval()  # torch's init
    vae.to(dtype)
    emb = vae.codebook.detach().float().clone()  # the path embedding is the VQ codebook, as in a real checkpoint
    alpha = s_cfg.get("alpha")
    c, eps, shift = s_cfg.get("c", 3.0), s_cfg.get("eps", 1e-5), s_cfg.get("shift", 1.0)
    path = build_path(emb.shape[0], emb if alpha is not None else None, alpha, float(c), float(eps))
    scheduler = KineticOptimalScheduler(path, shift=float(shift), alpha=alpha, c=c, eps=eps)
    pipe = URSAPipeline(transformer, vae, scheduler, byte_tokenizer(length), max_prompt_length=length,
                        source=str(shape))  # checks vocab_size = lm_vocab_size + K and the three K's
    pipe.save_pretrained(out)
    params = sum(p.numel() for p in transformer.parameters())
    vae_params = sum(p.numel() for p in vae.parameters())
    del pipe, transformer, vae, scheduler, path, emb
    gc.collect()
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"params": params, "vae_params": vae_params, "codebook": t_cfg["lm_head_size"],
            "seconds": time.perf_counter() - start, "bytes": size}


def small_shape(dst: Path, src: Path = DEFAULT_SHAPE, hidden: int = 256, layers: int = 2, codebook: int = 4096,
                vae_channels: int = 32, lm_vocab_size: int | None = None) -> Path:
    """A copy of the shape folder `src` at a small size (to validate this script in minutes): transformer hidden
    `hidden` (4 heads, 2 KV heads, head_dim hidden / 4, intermediate 3 x hidden), `layers` layers, K = `codebook`;
    the VAE's levels kept (same stride and grid) with `vae_channels` channels; `lm_vocab_size` if given."""
    t_cfg, v_cfg, s_cfg, index = shape_configs(src, codebook)
    t_cfg.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=hidden // 4)
    if lm_vocab_size:
        t_cfg.update(lm_vocab_size=lm_vocab_size, bov_token_id=lm_vocab_size - 1)
    t_cfg["vocab_size"] = t_cfg["lm_vocab_size"] + codebook
    groups = min(v_cfg.get("norm_num_groups", 32), vae_channels)
    v_cfg.update(block_out_channels=[vae_channels] * len(v_cfg["block_out_channels"]), layers_per_block=1,
                 latent_channels=vae_channels // 2, vq_embed_dim=vae_channels // 2, norm_num_groups=groups)
    for name, data in (("transformer/config.json", t_cfg), ("vae/config.json", v_cfg),
                       ("scheduler/scheduler_config.json", s_cfg), ("model_index.json", index)):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(json.dumps(data, indent=2) + "\n")
    (dst / "tokenizer").mkdir(exist_ok=True)
    return dst


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere)."""
    try:
        kib = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
        return int(kib.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def run_cli(args: list[str], log: Path, env: dict) -> dict:
    """`python -m udm_grpo ARGS` with its output in `log`: {"rc", "seconds", "rss" (peak bytes), "output"}."""
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "udm_grpo", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]  # progress bars: their last state
    return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024,
            "output": "\n".join(line for line in lines if line.strip())}


def show(title: str, result: dict, tail: int = 12) -> None:
    print(f"\n== {title}: {result['seconds']:.1f} s wall, peak RSS {result['rss'] / GIB:.2f} GiB, "
          f"exit {result['rc']}")
    for line in result["output"].splitlines()[-tail:]:
        print(f"   | {line}")
    sys.stdout.flush()


def step_times(run: Path, step: int) -> dict:
    """The `time/*` metrics of `step` in the run's metrics.jsonl ({} if that step was not logged)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    row = next((r for r in reversed(rows) if r.get("step") == step), {})
    return {k[5:]: v for k, v in row.items() if k.startswith("time/")} | (
        {"skipped": row["train/skipped"]} if "train/skipped" in row else {})


def fmt_times(times: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" if isinstance(v, int | float) else f"{k} {v}" for k, v in times.items()) \
        or "(no time/* keys logged)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", type=Path, default=DEFAULT_SHAPE, help="shape config folder (default: URSA-1.7B)")
    ap.add_argument("--codebook", type=int, default=None, help="codebook size K (default: the shape folder's)")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the model, the run and the logs "
                    "(default: a temporary folder); must be empty or absent")
    ap.add_argument("--keep", action="store_true", help="keep the model, the run and the logs")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more train overrides")
    args = ap.parse_args()
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        ap.error(f"--workdir {args.workdir} is not empty.")
    created = args.workdir is None or not args.workdir.exists()
    work = Path(tempfile.mkdtemp(prefix="udm-rehearsal-")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    model, run, sample = work / "model", work / "run", work / "sample.png"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        return rehearse(args, work, model, run, sample, env)
    finally:
        if args.keep:
            print(f"\nkept: {work}")
        else:
            for path in (model, run, sample):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            for log in work.glob("*.log"):
                log.unlink()
            if created:
                shutil.rmtree(work, ignore_errors=True)


def rehearse(args, work: Path, model: Path, run: Path, sample: Path, env: dict) -> int:
    print(f"shape {args.shape}; work folder {work}; {torch.get_num_threads()} torch threads", flush=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    built = build_pipeline(args.shape, model, args.codebook)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n== build + save: {built['seconds']:.1f} s wall, peak RSS of this process {rss1 / GIB:.2f} GiB "
          f"(at start {rss0 / GIB:.2f}, after the build {current_rss() / GIB:.2f}); transformer "
          f"{built['params'] / 1e9:.3f} B params, VAE {built['vae_params'] / 1e6:.1f} M, K = {built['codebook']:,}; "
          f"{built['bytes'] / GIB:.2f} GiB on disk", flush=True)

    size = json.loads((model / "vae" / "config.json").read_text())["sample_size"]  # the native image size
    height, width = size if isinstance(size, list) else (size, size)
    overrides = [
        f"model.path={model}", "model.lora={r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}",
        "model.dtype=bfloat16", "sampling.num_prompts_per_step=1", "sampling.num_images_per_prompt=2",
        "sampling.train_steps=1", "sampling.train_start=[0, 1]", "sampling.rollout.num_inference_steps=2",
        f"sampling.rollout.height={height}", f"sampling.rollout.width={width}", "training.micro_batch_size=2",
        "experiment.eval_every=0", "experiment.save_every=0", "experiment.log_every=1", *args.overrides]
    print("\noverrides: " + " ".join(f"'{o}'" if " " in o else o for o in overrides), flush=True)

    sim = run_cli(["train", "--check", "--simulate", "--json", *overrides], work / "simulate.log", env)
    prediction = None
    try:  # --json exits 1 when the peak does not fit --gpu-memory; the figures are printed either way
        prediction = json.loads(sim["output"][sim["output"].index("{"):])
    except ValueError:
        show("simulate (failed)", sim, 40)
    if prediction is not None:
        print(f"\n== simulate: {sim['seconds']:.1f} s wall, peak RSS {sim['rss'] / GIB:.2f} GiB")
        for name, phase in prediction["phases"].items():
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in phase["peak_bytes"].items() if k != "total")
            print(f"   {name:18s} {phase['flops'] / 1e12:8.2f} TFLOP  peak {phase['peak_bytes']['total'] / GIB:6.2f}"
                  f" GiB ({parts})")
        print(f"   predicted peak {prediction['peak_bytes']['total'] / GIB:.2f} GiB in '{prediction['peak_phase']}'; "
              f"{prediction['params'] / 1e9:.3f} B params, {prediction['trainable_params']:,} trainable", flush=True)

    train = run_cli(["train", "-o", str(run), "--steps", "1", *overrides], work / "train.log", env)
    show("train step 1 (load, step, save)", train)
    if train["rc"] != 0:
        print("train failed; see the output above.")
        return 1
    print(f"   trainer phases (metrics.jsonl): {fmt_times(step_times(run, 1))}")
    resume = run_cli(["train", "-o", str(run), "--resume", "latest", "--steps", "2"], work / "resume.log", env)
    show("resume, step 2 (load, restore, step, save)", resume)
    if resume["rc"] != 0:
        print("resume failed; see the output above.")
        return 1
    print(f"   trainer phases (metrics.jsonl): {fmt_times(step_times(run, 2))}")
    smp = run_cli(["sample", "--checkpoint", str(run), "-n", "1", "--sampling-steps", "2", "-o", str(sample), PROMPT],
                  work / "sample.log", env)
    if smp["rc"] == 0 and sample.is_file():
        show("sample --checkpoint RUN (1 image)", smp, 4)
        sample_line = f"{smp['seconds']:.1f} s, peak RSS {smp['rss'] / GIB:.2f} GiB"
    elif smp["rc"] == 2:  # a refusal (one sentence), e.g. a LoRA checkpoint the sample command cannot read yet
        reason = smp["output"].splitlines()[-1] if smp["output"] else "no message"
        print(f"\n== sample --checkpoint RUN: not available ({reason})")
        sample_line = "not available"
    else:
        show("sample --checkpoint RUN (failed)", smp, 40)
        sample_line = f"failed (exit {smp['rc']})"

    print("\n== summary (wall s, peak RSS GiB)")
    print(f"   build + save pipeline  {built['seconds']:7.1f}   {rss1 / GIB:6.2f} (this process)")
    if prediction is not None:
        print(f"   simulate               {sim['seconds']:7.1f}   {sim['rss'] / GIB:6.2f}")
    for name, res in (("train step 1", train), ("resume step 2", resume)):
        print(f"   {name:22s} {res['seconds']:7.1f}   {res['rss'] / GIB:6.2f}")
    print(f"   sample                 {sample_line}")
    if prediction is not None:
        peak = prediction["peak_bytes"]["total"]
        print(f"   simulated peak {peak / GIB:.2f} GiB ('{prediction['peak_phase']}') vs measured train RSS "
              f"{train['rss'] / GIB:.2f} GiB: measured / simulated = {train['rss'] / peak:.2f}. The simulation counts "
              "tensors only (weights, gradients, optimizer state, activations, logit tables, sampler blocks); the RSS "
              "adds the Python/torch runtime, the VAE and reward on the CPU, and the copies made while loading "
              "weights and writing checkpoints.")
    return 0 if smp["rc"] in (0, 2) else 1


if __name__ == "__main__":
    raise SystemExit(main())
