"""URSAPipeline: the four components of an URSA checkpoint folder, and text -> image generation.

Folder layout (the official one, so a downloaded URSA-1.7B-IBQ512 loads unchanged):

    model_index.json   {"_class_name": "URSAPipeline", "transformer": [...], "vae": [...], ...}
    transformer/       config.json + diffusion_pytorch_model.safetensors (or legacy .bin)
    vae/               config.json + weights (AutoencoderVQ, or PatchVQ in the tiny world)
    scheduler/         scheduler_config.json + scheduler_model.pth {"path.emb": Float[K, D]}
    tokenizer/         anything transformers.AutoTokenizer loads offline

Remote-code shim files (`__transformer__.py` ...) are ignored: nothing from a checkpoint is executed.
`from_pretrained` also takes a hub id (`BAAI/URSA-1.7B-IBQ512`): the files above are fetched with
`huggingface_hub.snapshot_download` (or found in its cache alone when HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.text_tokenizer import encode_prompts
from ..diffusion.sampler import LogitsFn, SamplingOptions, Trajectory, sample_tokens
from ..diffusion.scheduler import KineticOptimalScheduler
from ..errors import CheckpointError, UserError
from .io import read_config, share_files
from .transformer import URSATransformer
from .vae import load_vae

COMPONENTS = ("transformer", "vae", "scheduler", "tokenizer")
DEFAULT_PROMPT_LENGTH = 320
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a hub snapshot needs: only the files the loaders read (no remote-code shims, no other variants).
_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin", "diffusion_pytorch_model*.json")
HUB_FILES = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
             "scheduler/scheduler_model.pth", "tokenizer/*",
             *(f"{c}/{w}" for c in ("transformer", "vae") for w in _WEIGHTS)]
HUB_IGNORE = ["*.py", "*.pyc"]


@dataclass
class PipelineOutput:
    """images: uint8 [B, H, W, 3] (numpy); ids: Long[B, h*w] codebook ids; trajectory when recorded;
    text_ids / uncond_ids: Long[B, L] the encoded prompts and empty prompts (None without guidance); grid: (h, w)."""

    images: np.ndarray
    ids: torch.Tensor
    trajectory: Trajectory | None = None
    text_ids: torch.Tensor | None = None
    uncond_ids: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded (the reference truncates)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class URSAPipeline:
    """Components: `transformer` (URSATransformer), `vae` (AutoencoderVQ / PatchVQ),
    `scheduler` (KineticOptimalScheduler), `tokenizer` (a transformers tokenizer)."""

    def __init__(self, transformer, vae, scheduler: KineticOptimalScheduler, tokenizer,
                 max_prompt_length: int = DEFAULT_PROMPT_LENGTH, source: str = "pipeline"):
        self.transformer, self.vae, self.scheduler, self.tokenizer = transformer, vae, scheduler, tokenizer
        self.max_prompt_length = int(max_prompt_length)
        self.check_invariants(source)

    # ---- invariants -------------------------------------------------------------------------------
    def check_invariants(self, source: str = "pipeline") -> None:
        """vocab_size = lm_vocab_size + K and K = lm_head_size = path rows = VQ codebook size."""
        cfg = self.transformer.config
        k_head, k_path, k_vq = cfg.lm_head_size, self.scheduler.num_embeddings, self.vae.num_embeddings
        if cfg.vocab_size != cfg.lm_vocab_size + k_head:
            raise CheckpointError(f"{source}: transformer vocab_size {cfg.vocab_size} != lm_vocab_size "
                                  f"{cfg.lm_vocab_size} + lm_head_size {k_head}.")
        if not k_head == k_path == k_vq:
            raise CheckpointError(f"{source}: codebook sizes disagree: transformer lm_head_size {k_head}, "
                                  f"scheduler path embedding {k_path} rows, vae num_vq_embeddings {k_vq}.")
        if len(self.tokenizer) > cfg.lm_vocab_size:
            raise CheckpointError(f"{source}: the tokenizer has {len(self.tokenizer)} tokens but the transformer's "
                                  f"lm_vocab_size is {cfg.lm_vocab_size}.")

    # ---- loading and saving -------------------------------------------------------------------
    @staticmethod
    def check_folder(folder: Path) -> dict:
        """The parsed model_index.json of a pipeline folder whose component folders all exist; else
        CheckpointError naming what is missing (no weights are read)."""
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such model folder.")
        index, _ = read_config(folder, "URSA pipeline", "model_index.json")
        for name in COMPONENTS:
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder}: missing the '{name}/' component folder.")
        return index

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, transformer: str | Path | None = None,
                        revision: str | None = None) -> URSAPipeline:
        """Load a folder in the official layout, or a hub id (`owner/name` that is not a path; `revision`
        picks a branch, tag or commit). `dtype` applies to the transformer (default float32);
        `transformer` names another transformer folder to use instead of `folder/transformer` (e.g. a
        training checkpoint's), checked against the other components like the folder's own."""
        from transformers import AutoTokenizer

        folder = resolve_model(folder, revision)
        index = cls.check_folder(folder)
        transformer = URSATransformer.from_pretrained(transformer or folder / "transformer", dtype=dtype, device=device)
        vae = load_vae(folder / "vae", device=device)
        scheduler = KineticOptimalScheduler.from_pretrained(folder / "scheduler", vae.num_embeddings)
        scheduler.to(device or "cpu")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        except Exception as e:  # transformers raises many types; the message names what is missing
            raise CheckpointError(f"{folder / 'tokenizer'}: cannot load the tokenizer ({e}).") from None
        length = index.get("_max_prompt_length", DEFAULT_PROMPT_LENGTH)
        return cls(transformer, vae, scheduler, tokenizer, max_prompt_length=length, source=str(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        self.vae.save_pretrained(folder / "vae")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        _portable_tokenizer_class(folder / "tokenizer" / "tokenizer_config.json")
        index = {
            "_class_name": "URSAPipeline",
            "_diffusers_version": "0.32.0",
            "_max_prompt_length": self.max_prompt_length,
            "transformer": ["__transformer__", "URSATransformer3DModel"],
            "vae": ["__vae__", type(self.vae).__name__],
            "scheduler": ["__scheduler__", "KineticOptimalScheduler"],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        share_files(folder)

    # ---- generation ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Long[B, max_prompt_length], left-padded, no special tokens."""
        return encode_prompts(self.tokenizer, prompts, self.max_prompt_length).to(self.device)

    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) tokens of a height x width image (default: the tokenizer's native size)."""
        size = getattr(getattr(self.vae, "config", None), "sample_size", None)
        return token_grid(height, width, self.vae.spatial_stride, size)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        """Long[B, h*w] -> uint8 [B, H, W, 3]."""
        return to_uint8(self.vae.decode(ids.view(-1, *grid)))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        options: SamplingOptions | None = None,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        record: bool = False,
        **overrides,
    ) -> PipelineOutput:
        """Prompts -> images with `options` (default `SamplingOptions()`, URSA's 25 steps and guidance 7) and
        `overrides` of its fields, e.g. `pipe("a red circle", num_inference_steps=4, guidance_scale=1.0)`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images_per_prompt < 1:
            raise UserError(f"the pipeline needs at least one prompt and num_images_per_prompt >= 1, got "
                            f"{len(prompts)} prompt(s) and num_images_per_prompt={num_images_per_prompt}.")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is not None:
                generator.manual_seed(seed)
        options = (options or SamplingOptions()).replace(**overrides)
        return self.generate(prompts, options, generator, record=record, negative_prompt=negative_prompt)

    @torch.no_grad()
    def generate(self, prompts: list[str], options: SamplingOptions, generator: torch.Generator | None = None,
                 logits: LogitsFn | None = None, record: bool = False, negative_prompt: str = "") -> PipelineOutput:
        """One image per entry of `prompts`: encode (left-padded), sample with `logits` (default this pipeline's
        `transformer.image_logits`; the trainer passes its policy's) in calls of `options.batch_size`, decode.
        With `record`, the trajectory of every call, joined."""
        grid = self.grid(options.height, options.width)
        text = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt] * len(prompts)) if options.guidance_scale != 1.0 else None
        size = options.batch_size or len(prompts)
        logits = self.transformer.image_logits if logits is None else logits
        ids, trajectories, images = [], [], []
        for i in range(0, len(prompts), size):
            sl = slice(i, i + size)
            result = sample_tokens(logits, self.scheduler, text[sl], grid, options,
                                   None if uncond is None else uncond[sl], generator, record)
            x, trajectory = result if record else (result, None)
            ids.append(x)
            trajectories.append(trajectory)
            images.append(self.decode(x, grid))
        return PipelineOutput(np.concatenate(images), torch.cat(ids),
                              Trajectory.concat(trajectories) if record else None, text, uncond, grid)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not only when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in ("1", "ON", "YES", "TRUE")


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that fetches `repo_id` with the installed huggingface_hub (`hf` since 0.34)."""
    import huggingface_hub

    version = tuple(int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    cli = "hf" if version >= (0, 34) else "huggingface-cli"
    rev = f" --revision {revision}" if revision else ""
    return f"{cli} download {repo_id}{rev} --local-dir DIR"


def token_grid(height: int | None, width: int | None, stride: int,
               sample_size: int | tuple[int, int] | list[int] | None = None) -> tuple[int, int]:
    """(height / stride, width / stride); a missing side is the native `sample_size` (default 512). UserError
    when a side is not a multiple of the stride."""
    size = sample_size or 512
    size = size[0] if isinstance(size, list | tuple) else size
    height, width = height or size, width or size
    if height % stride or width % stride:
        raise UserError(f"height and width must be multiples of the tokenizer stride {stride}, got {height}x{width}.")
    return height // stride, width // stride


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """`spec` as a folder; a hub id (`owner/name`, not an existing path) as its snapshot folder, fetching
    only `HUB_FILES` (never the remote-code shims), from the local cache alone when offline."""
    path = Path(spec)
    if path.exists() or not HUB_ID.match(str(spec)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, offline = str(spec), hub_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                      ignore_patterns=HUB_IGNORE, local_files_only=offline))
    except LocalEntryNotFoundError:
        if not offline:
            raise CheckpointError(f"{repo_id}: no such folder, and the Hugging Face hub cannot be reached nor has "
                                  f"a cached copy; run `{download_command(repo_id, revision)}` where it can and "
                                  "pass the folder.") from None
        raise CheckpointError(f"{repo_id}: no such folder, and this hub model is not in the Hugging Face cache "
                              f"(HF_HUB_OFFLINE is set); download it with `{download_command(repo_id, revision)}` "
                              "and pass the folder, or unset HF_HUB_OFFLINE.") from None
    except Exception as e:  # repository or revision not found, gated, incomplete cache, network errors
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(f"{repo_id}: no such folder, and fetching it from the Hugging Face hub failed "
                              f"({type(e).__name__}: {first}).") from None


def _portable_tokenizer_class(config_file: Path) -> None:
    """transformers 5 writes `tokenizer_class: TokenizersBackend`, a name 4.x cannot resolve; both load
    a tokenizer.json-backed tokenizer from `PreTrainedTokenizerFast`."""
    if not config_file.is_file():
        return
    config, _ = read_config(config_file.parent, "tokenizer/", config_file.name)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n")
