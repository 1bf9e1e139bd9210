"""CLIP-family rewards on transformers' `CLIPModel`: CLIPScore and PickScore.

    raw   = exp(logit_scale) * cos(text embedding, image embedding)   (value, logged)
    score = raw / max_score                                          (what GRPO optimises)

Images go through the model's own processor (resize and centre crop; PIL, no torchvision), prompts are
truncated to the text model's 77 positions. CLIPScore: `openai/clip-vit-large-patch14`, max_score 100.
PickScore: `yuvalkirstain/PickScore_v1` (a CLIP ViT-H/14) with the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, as PickScore's own inference code loads it, max_score 26.
`model` / `processor` take a hub id or a local folder. The model loads once, on the first call; on CUDA
it runs in float16 (`dtype`), in batches of `batch_size`, under inference mode.

HPSv2.1 is not offered: its checkpoint is an open_clip file that transformers cannot load, and
open_clip needs torchvision, which breaks beside CPU torch builds.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from .base import RewardOutput, check_batch, to_uint8_images

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIPReward:
    """CLIPScore by default; see the module docstring. `device` None = CUDA when available."""

    name = "clipscore"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 max_score: float = 100.0, device: str | None = None, dtype: str = "auto", batch_size: int = 32):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
        if not (batch_size >= 1 and max_score > 0):
            raise ValueError("batch_size must be >= 1 and max_score > 0")
        self.model_id, self.processor_id = model, processor or model
        self.max_score, self.batch_size, self.dtype = float(max_score), int(batch_size), dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model = self._processor = None

    def _load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        dtype = DTYPES.get(self.dtype) or (torch.float16 if self.device.type == "cuda" else torch.float32)
        for what, source in (("model", self.model_id), ("processor", self.processor_id)):
            try:
                if what == "model":
                    self._model = CLIPModel.from_pretrained(source).to(self.device, dtype).eval()
                else:
                    self._processor = CLIPProcessor.from_pretrained(source)
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"reward '{self.name}': cannot load the CLIP {what} from '{source}' ({first}); "
                                      f"give a local folder with reward.params.{what}.") from None

    @torch.inference_mode()
    def raw_scores(self, images, prompts: list[str]) -> torch.Tensor:
        """Float32[B]: exp(logit_scale) * cos(text_i, image_i) for uint8 images [B, H, W, 3]."""
        from PIL import Image

        if self._model is None:
            self._load()
        images = to_uint8_images(images)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            batch = self._processor(text=list(prompts[i:i + self.batch_size]),
                                    images=[Image.fromarray(im) for im in images[i:i + self.batch_size]],
                                    padding=True, truncation=True, max_length=77, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(self._model.dtype)
            result = self._model(**batch)
            img, txt = result.image_embeds.float(), result.text_embeds.float()
            cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
            out.append((self._model.logit_scale.float().exp() * cos).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        images = to_uint8_images(images)
        check_batch(images, prompts, metadata)
        raw = self.raw_scores(images, prompts) if len(images) else torch.zeros(0)
        return RewardOutput(raw / self.max_score, {self.name: raw})


class PickScoreReward(CLIPReward):
    """PickScore: score = raw / 26 (about 0.8-0.9 for good images), value = raw PickScore."""

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", max_score: float = 26.0,
                 device: str | None = None, dtype: str = "auto", batch_size: int = 32):
        super().__init__(model, processor, max_score, device, dtype, batch_size)
