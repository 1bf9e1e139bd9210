"""GenEval reward for real images: Mask2Former instance segmentation + CLIP colour, GenEval's rules.

Detector: transformers' `Mask2FormerForUniversalSegmentation` trained on COCO (default
`facebook/mask2former-swin-small-coco-instance`, the architecture, backbone size and data of the
reference's mmdetection checkpoint). Its `id2label` names map to GenEval's 80 names; COCO's "mouse",
"remote" and "keyboard" are GenEval's "computer mouse", "tv remote" and "computer keyboard". With
`class_names` (a file with one GenEval name per line, e.g. GenEval's object_names.txt) every mapped name
must be one of them. Instances (binary masks, scores) are filtered as in GenEval: score > 0.3
(> 0.9 for the counting tag), at most 16 per class, highest first (`geneval_rules.filter_detections`).

`detector_backend: mmdet` runs the reference's own checkpoint instead: `mmdet_config` is its
mmdetection 3.x config file and `detector` its .pth (install mmcv 2.1 and mmdet 3.3; not in CI).

Colour: CLIP (default `openai/clip-vit-large-patch14`) zero-shot over GenEval's 10 colours, each colour's
text embedding the normalised mean of "a photo of a {c} {cls}", "a photo of a {c}-colored {cls}" and
"a photo of a {c} object" (cached per class), on the object's crop: the image composited through its mask
over grey #999, cut to its box. Only objects of classes that a clause asks a colour of are classified.

scores = (1 - w) * partial credit + w * strict 0/1 with w = `strict` (false = 0, true = 1), values =
{"strict": official GenEval correctness, "score": partial credit}; see `geneval_rules`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, UserError
from ..textfiles import iter_lines
from .base import GenEvalRecordsReward, RewardOutput, blend_strict, check_batch, strict_weight, to_uint8_images
from .geneval_rules import GENEVAL_COLORS, Detection, evaluate, filter_detections

COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GREY = 0x99


def object_crop(image: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """uint8 [h, w, 3]: `image` through the bool `mask` [H, W] over grey #999, cut to box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    composite = np.where(mask[..., None], image, np.uint8(GREY))
    return composite[y0:y1, x0:x1]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def mmdet_instances(result, labels: dict[int, str]) -> list[tuple[str, float, np.ndarray]]:
    """(class, score, bool mask) from an mmdetection 3.x `DetDataSample` (`pred_instances` with labels,
    scores and masks)."""
    pred = result.pred_instances
    as_numpy = lambda x: x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)  # noqa: E731
    masks = as_numpy(pred.masks).astype(bool)
    return [(labels[int(c)], float(s), m) for c, s, m in zip(as_numpy(pred.labels), as_numpy(pred.scores), masks)
            if m.any()]


class GenEvalReward(GenEvalRecordsReward):
    """See the module docstring. `device` None = CUDA when available (then float16); models load lazily."""

    name = "geneval"
    reward_name = "the GenEval reward"
    records_hint = "a .jsonl of GenEval records, e.g. from `udm-grpo data geneval`"

    def __init__(self, detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip: str = "openai/clip-vit-large-patch14", class_names: str | None = None,
                 device: str | None = None, batch_size: int = 8, strict: bool | float = False,
                 detector_backend: str = "transformers", mmdet_config: str | None = None):
        if detector_backend not in ("transformers", "mmdet"):
            raise ValueError(f"detector_backend must be 'transformers' or 'mmdet', got {detector_backend!r}")
        if detector_backend == "mmdet" and not mmdet_config:
            raise ValueError("detector_backend 'mmdet' needs mmdet_config (the mmdetection config file); "
                             "detector is then the checkpoint (.pth)")
        self.backend, self.mmdet_config = detector_backend, mmdet_config
        self.detector_id, self.clip_id, self.class_names = detector, clip, class_names
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.strict = int(batch_size), strict_weight(strict, "geneval")
        self._detector = self._clip = None
        self._colour_text: dict[str, torch.Tensor] = {}

    # ---- models ---------------------------------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.backend == "mmdet":
            self._load_mmdet()
        try:
            if self.backend == "transformers":
                model = Mask2FormerForUniversalSegmentation.from_pretrained(self.detector_id)
                self._processor = AutoImageProcessor.from_pretrained(self.detector_id)
                id2label = model.config.id2label
                self._detector = model.to(self.device, dtype).eval()
            else:
                id2label = dict(enumerate(self._mmdet.dataset_meta["classes"]))
            clip = CLIPModel.from_pretrained(self.clip_id)
            self._clip_processor = CLIPProcessor.from_pretrained(self.clip_id)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"reward 'geneval': cannot load its models ({first}); give local folders with "
                                  "reward.params.detector and reward.params.clip.") from None
        self.labels = {int(i): COCO_TO_GENEVAL.get(n, n) for i, n in id2label.items()}
        if self.class_names:
            known = {text for _, text in iter_lines(self.class_names, "class names file", ConfigError)}
            unknown = [n for n in self.labels.values() if n not in known]
            if unknown:
                raise ConfigError(f"reward 'geneval': the detector's class '{unknown[0]}' is not one of the names in "
                                  f"{self.class_names}.")
        self._clip = clip.to(self.device, dtype).eval()

    def _load_mmdet(self) -> None:
        """The reference's detector: the user's mmdetection (3.x) config and checkpoint."""
        try:
            from mmdet.apis import init_detector
        except ImportError:
            raise ConfigError("detector_backend 'mmdet' needs mmdetection 3.x and mmcv 2.1 (see the README); "
                              "they are not installed.") from None
        try:
            self._mmdet = init_detector(self.mmdet_config, self.detector_id, device=str(self.device))
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"reward 'geneval': cannot load the mmdetection detector {self.detector_id} with "
                                  f"config {self.mmdet_config} ({type(e).__name__}: {e}).") from None
        self._detector = self._mmdet

    @torch.inference_mode()
    def instances(self, images: np.ndarray) -> list[list[tuple[str, float, np.ndarray]]]:
        """Per image: (GenEval class, score, bool mask [H, W]) of every instance the detector returns."""
        from PIL import Image

        if self.backend == "mmdet":
            from mmdet.apis import inference_detector

            # mmdetection reads in-memory arrays as BGR (the reference passed RGB: a channel swap)
            results = inference_detector(self._mmdet, [im[..., ::-1].copy() for im in images])
            return [mmdet_instances(r, self.labels) for r in results]
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = images[i:i + self.batch_size]
            inputs = self._processor(images=[Image.fromarray(im) for im in batch], return_tensors="pt")
            inputs = {k: v.to(self.device, self._detector.dtype if v.is_floating_point() else v.dtype)
                      for k, v in inputs.items()}
            raw = self._detector(**inputs)
            results = self._processor.post_process_instance_segmentation(
                raw, threshold=0.0, target_sizes=[im.shape[:2] for im in batch], return_binary_maps=True)
            for res in results:
                masks = res["segmentation"]
                masks = masks.cpu().numpy().astype(bool) if masks is not None else np.zeros((0, 1, 1), bool)
                out.append([(self.labels[s["label_id"]], float(s["score"]), masks[j])
                            for j, s in enumerate(res["segments_info"]) if masks[j].any()])
        return out

    @torch.inference_mode()
    def colours(self, crops: list[np.ndarray], cls: str) -> list[str]:
        """GenEval colour names of object crops of class `cls` (CLIP zero-shot, templates averaged)."""
        from PIL import Image

        if cls not in self._colour_text:
            prompts = [t.format(c=c, cls=cls) for c in GENEVAL_COLORS for t in TEMPLATES]
            tokens = self._clip_processor(text=prompts, padding=True, return_tensors="pt").to(self.device)
            text = self._clip.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text).float()
            text = (text / text.norm(dim=-1, keepdim=True)).view(len(GENEVAL_COLORS), len(TEMPLATES), -1).mean(1)
            self._colour_text[cls] = text / text.norm(dim=-1, keepdim=True)
        pixels = self._clip_processor(images=[Image.fromarray(c) for c in crops], return_tensors="pt")["pixel_values"]
        image = self._clip.get_image_features(pixel_values=pixels.to(self.device, self._clip.dtype))
        image = getattr(image, "pooler_output", image).float()
        image = image / image.norm(dim=-1, keepdim=True)
        return [GENEVAL_COLORS[k] for k in (image @ self._colour_text[cls].T).argmax(-1).tolist()]

    # ---- scoring --------------------------------------------------------------------------------
    def detections(self, image: np.ndarray, record: dict,
                   instances: list[tuple[str, float, np.ndarray]]) -> list[Detection]:
        """GenEval's filtered detections of one image, with colours where a clause asks for one."""
        dets = filter_detections([Detection(c, None, box_of(m), s, m) for c, s, m in instances], record.get("tag"))
        coloured = {c["class"] for c in record.get("include", []) if "color" in c}
        for cls in coloured:
            mine = [d for d in dets if d.cls == cls]
            if mine:
                for d, colour in zip(mine, self.colours([object_crop(image, d.mask, d.box) for d in mine], cls)):
                    d.color = colour
        return dets

    def __call__(self, images, prompts: list[str], metadata: list[dict | None]) -> RewardOutput:
        images = to_uint8_images(images)
        check_batch(images, prompts, metadata)
        metadata = self.records(metadata, len(prompts))
        if self._detector is None:
            self._load()
        names = set(self.labels.values())
        for r in metadata:
            for clause in r.get("include", []) + r.get("exclude", []):
                if clause["class"] not in names:
                    raise UserError(f"the GenEval detector does not know the class {clause['class']!r} "
                                    f"(prompt {r.get('prompt', '')!r}).")
        scores, stricts = [], []
        for image, record, inst in zip(images, metadata, self.instances(images)):
            score, strict, _ = evaluate(record, self.detections(image, record, inst))
            scores.append(score)
            stricts.append(float(strict))
        score_t, strict_t = torch.tensor(scores, dtype=torch.float32), torch.tensor(stricts, dtype=torch.float32)
        return RewardOutput(blend_strict(score_t, strict_t, self.strict), {"strict": strict_t, "score": score_t})
