"""ShapeEval: GenEval rules with an exact rule-based detector for the tiny world.

Detector, per image:
1. every pixel takes the nearest of {background} + palette (RGB L2); a palette label is kept only
   within `colour_threshold` of its colour, everything else counts as background;
2. 4-connected components of the foreground; a component holding two or more substantial colours
   (each >= max(min_area, 25 %) of it) may be split into its per-colour components (see 3.);
3. components smaller than `min_area` pixels or thinner than `min_side` are ignored (specks); each
   kept one is classified by the best IoU between its (hole-filled) mask and the class templates drawn
   in its bounding box (`shapes.shape_mask`: square ~1.0 fill, circle ~pi/4, triangle ~1/2), scaled
   down for boxes more elongated than 4:5; components whose fit is below `min_iou` are not objects
   (an inverted or sideways triangle fits every template at about 0.5). A split into colours is kept
   only when every piece fits and the pieces fit better than the whole;
4. plausibility: the tiny world draws every shape, apex-up triangles included, in a square box of
   MIN_SIZE-MAX_SIZE (10-20) px, never touching another. Whatever its class, a component whose box
   has a side over `max_side` (26 = 1.3 MAX_SIZE) or min / max side under `min_aspect` (0.6) fits
   nothing (fit 0; not an object, and no valid piece of a split): a 28x14 rectangle is no square, a
   2:1 ellipse no circle, a tall or flat triangle no triangle, a 40x40 blob nothing. An elongated
   same-colour blob is rejected, not counted as the squares it could hold.
Detections carry class, colour, box (x0, y0, x1, y1), the full-size mask and score 1.0. As the scores
all tie, `detect` returns them in the rank that GenEval's top-`count` selection uses: by mask area,
largest first (a real detector's confidence tends to follow size), ties by box top, then left.
On clean renders this is exact; the thresholds absorb the edge blur of patch-codebook (VQ)
reconstructions (1,200 reconstructed scenes of the shipped model: boxes of correctly detected
shapes 5-22 px, min / max side >= 0.67; strict accuracy no lower than without the limits of 4.).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from ..data.check import world_vocabulary
from ..data.shapes import BACKGROUND, CLASSES, COLORS, MAX_SIZE, TAGS, shape_mask
from ..errors import UserError
from .base import GenEvalRecordsReward, RewardOutput, blend_strict, check_batch, strict_weight, to_uint8_images
from .geneval_rules import Detection, evaluate

_NAMES = list(COLORS)
_PALETTE = np.array([BACKGROUND] + [COLORS[c] for c in _NAMES], dtype=np.float32)  # [1 + C, 3]
MAX_SIDE = round(1.3 * MAX_SIZE)  # longest plausible box side (px)
MIN_ASPECT = 0.6  # least plausible min / max box side
CLEAN_PURITY = 0.9  # a clean shape's share of its main colour (the census only, not the rules)


@lru_cache(maxsize=4096)
def _template(cls: str, h: int, w: int) -> np.ndarray:
    return shape_mask(cls, h, w)


@lru_cache(maxsize=8)
def _lut(colour_threshold: float) -> np.ndarray:
    """int8 [64**3]: the label of every 6-bit-per-channel RGB cell (evaluated at the cell centre)."""
    v = np.arange(64, dtype=np.float32) * 4 + 1.5
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    d = ((rgb[:, None, :] - _PALETTE) ** 2).sum(-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > colour_threshold**2] = 0
    return lab.astype(np.int8)


def colour_labels(images: np.ndarray, colour_threshold: float = 70.0) -> np.ndarray:
    """uint8 [B, H, W, 3] -> int8 [B, H, W]: 0 background / unknown, k = 1 + index into COLORS.

    Nearest of background + palette, kept when within `colour_threshold` (RGB L2) of it; colours
    are quantised to 6 bits per channel (a lookup table), which moves the threshold by < 3.5.
    """
    q = (images >> 2).astype(np.int32)
    return _lut(float(colour_threshold))[(q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    holes, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    return mask | ~np.isin(holes, border)


def _classify(mask: np.ndarray) -> tuple[str, float]:
    """(class, fit): fit = best template IoU, scaled down when the box is more elongated than 4:5
    (tiny-world shapes are drawn in square boxes)."""
    h, w = mask.shape
    best, best_iou = CLASSES[0], -1.0
    for cls in CLASSES:
        t = _template(cls, h, w)
        iou = float((mask & t).sum() / (mask | t).sum())
        if iou > best_iou:
            best, best_iou = cls, iou
    return best, best_iou * min(1.0, min(h, w) / max(h, w) / 0.8)


def _candidate(sub: np.ndarray, sl: tuple[slice, slice], colour: int, shape: tuple[int, int],
               limits: tuple[int, int, int, float]) -> tuple[Detection, float] | None:
    """A detection and its template fit from the bool mask `sub` of the image window `sl`; None for a
    speck (under `min_area` pixels or `min_side` thick), fit 0 for an implausible box (longer than
    `max_side`, or min / max side under `min_aspect`); limits = (min_area, min_side, max_side, min_aspect)."""
    min_area, min_side, max_side, min_aspect = limits
    ys, xs = np.nonzero(sub)
    if len(ys) < min_area:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    short, long = sorted((int(y1 - y0), int(x1 - x0)))
    if short < min_side:
        return None
    cls, iou = _classify(_fill_holes(sub[y0:y1, x0:x1]))
    if long > max_side or short < min_aspect * long:
        iou = 0.0
    oy, ox = sl[0].start, sl[1].start
    full = np.zeros(shape, dtype=bool)
    full[sl] = sub
    box = (float(ox + x0), float(oy + y0), float(ox + x1), float(oy + y1))
    return Detection(cls, _NAMES[colour - 1], box, 1.0, full), iou


def detect(image: np.ndarray, labels: np.ndarray | None = None, min_area: int = 12, min_side: int = 4,
           max_side: int = MAX_SIDE, min_aspect: float = MIN_ASPECT, min_iou: float = 0.6,
           colour_threshold: float = 70.0, census: dict | None = None) -> list[Detection]:
    """Detections of one uint8 [H, W, 3] image, largest first (pass precomputed `colour_labels` to skip
    step 1). `census`, when given, counts what was drawn: "blobs" = foreground components that are not
    specks, and "clean" = those that are one clean shape: detected whole (not split: the world never draws
    touching shapes) and at least `CLEAN_PURITY` of one colour. The rest are fused, multi-coloured, ragged
    or implausible blobs."""
    lab = colour_labels(image[None], colour_threshold)[0] if labels is None else labels
    comps, _ = ndimage.label(lab > 0)
    limits = (min_area, min_side, max_side, min_aspect)
    dets: list[Detection] = []
    for k, sl in enumerate(ndimage.find_objects(comps), 1):
        if sl is None:
            continue
        sub = comps[sl] == k
        area = int(sub.sum())
        if area < min_area:
            continue
        counts = np.bincount(lab[sl][sub].astype(np.intp), minlength=len(_PALETTE))
        counts[0] = 0
        whole = _candidate(sub, sl, int(counts.argmax()), lab.shape, limits)
        major = [c for c in range(1, len(_PALETTE)) if counts[c] >= max(min_area, 0.25 * area)]
        if len(major) >= 2:  # touching shapes of different colours, or one shape with a colour fringe?
            pieces = []
            for c in major:
                split, m = ndimage.label(sub & (lab[sl] == c))
                pieces += [_candidate(split == p, sl, c, lab.shape, limits) for p in range(1, m + 1)]
            kept = [p for p in pieces if p is not None]
            if kept and all(iou >= min_iou for _, iou in kept) and (
                    whole is None or np.mean([iou for _, iou in kept]) > whole[1]):
                dets += [d for d, _ in kept]
                _count(census, 1, 0)
                continue
        if whole is not None and whole[1] >= min_iou:
            dets.append(whole[0])
        _count(census, whole is not None,
               whole is not None and whole[1] >= min_iou and counts.max() >= CLEAN_PURITY * counts.sum())
    dets.sort(key=lambda d: (-int(d.mask.sum()) if d.mask is not None else 0, d.box[1], d.box[0]))  # GenEval rank
    return dets


def _count(census: dict | None, blobs: int, clean: int) -> None:
    if census is not None:
        census["blobs"] = census.get("blobs", 0) + int(blobs)
        census["clean"] = census.get("clean", 0) + int(clean)


def named_objects(record: dict) -> int:
    """The number of objects a GenEval record names: the sum of its include counts."""
    return sum(int(clause["count"]) for clause in record.get("include", []))


def score_images(images, records: list[dict], **kwargs) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(scores float[B], strict bool[B], details per image) for uint8 images [B, H, W, 3] (numpy or torch).
    Details: `evaluate`'s, plus the image's census "blobs" and "clean" (see `detect`) and "named" (the
    objects its record names, `named_objects`)."""
    images = to_uint8_images(images)
    records = ShapeEvalReward.records(records, len(records))
    if len(images) != len(records):
        raise UserError(f"ShapeEval got {len(images)} images for {len(records)} records.")
    labels = colour_labels(images, kwargs.get("colour_threshold", 70.0)) if len(images) else []
    scores, stricts, details = np.zeros(len(records)), np.zeros(len(records), dtype=bool), []
    for i, (image, lab, rec) in enumerate(zip(images, labels, records)):
        census = {"blobs": 0, "clean": 0}
        scores[i], stricts[i], info = evaluate(rec, detect(image, lab, census=census, **kwargs))
        details.append({**info, **census, "named": named_objects(rec)})
    return scores, stricts, details


class ShapeEvalReward(GenEvalRecordsReward):
    """Reward protocol: scores = (1 - w) * partial-credit GenEval score + w * strict 0/1 - c * (1 - clean)
    - e * max(0, blobs - named),
    with w = `strict` (false = 0: the score alone; true = 1: strict alone), c = `clean` and clean = the
    image's fraction of drawn blobs that are clean shapes (1 when it draws none; see `detect`'s census), and
    e = `extra`, a cost per blob drawn beyond the objects named.
    With `exact`, strict also needs the image to draw no more than its record names: its non-speck blobs
    (the census "blobs") must number the objects named (the sum of the include counts), so extra shapes,
    which GenEval's at-least rule accepts, fail; partial credit stays GenEval's. values = {"strict": GenEval's
    0/1 (whatever `exact` says, so held-out figures compare across rewards), "exact": strict with no more blobs
    than named, "score": partial credit, "clean": clean, "blobs": blobs drawn, "named": objects named}.
    Metadata records are required."""

    reward_name = "ShapeEval"
    records_hint = "the tiny world's records, e.g. shapes:train, or a .jsonl of GenEval records over its classes"
    vocabulary = staticmethod(world_vocabulary)

    def __init__(self, strict: bool | float = False, clean: float = 0.0, exact: bool = False, extra: float = 0.0,
                 min_area: int = 12,
                 min_side: int = 4, max_side: int = MAX_SIDE, min_aspect: float = MIN_ASPECT, min_iou: float = 0.6,
                 colour_threshold: float = 70.0) -> None:
        self.strict = strict_weight(strict, "shapeeval")
        if isinstance(clean, bool) or not isinstance(clean, (int, float)) or clean < 0:
            raise UserError(f"the shapeeval reward's parameter 'clean' must be a weight >= 0, got {clean!r}.")
        if not isinstance(exact, bool):
            raise UserError(f"the shapeeval reward's parameter 'exact' must be true or false, got {exact!r}.")
        if isinstance(extra, bool) or not isinstance(extra, (int, float)) or extra < 0:
            raise UserError(f"the shapeeval reward's parameter 'extra' must be a weight >= 0, got {extra!r}.")
        self.clean, self.exact, self.extra = float(clean), exact, float(extra)
        self.pass_value = "exact" if exact else "strict"  # what the curriculum counts as a pass
        self.detector_kwargs = {"min_area": min_area, "min_side": min_side, "max_side": max_side,
                                "min_aspect": min_aspect, "min_iou": min_iou, "colour_threshold": colour_threshold}

    def __call__(self, images, prompts: list[str], metadata: list[dict | None]) -> RewardOutput:
        images = to_uint8_images(images)
        check_batch(images, prompts, metadata)
        scores, stricts, details = score_images(
            images, list(metadata) if metadata is not None else [None] * len(prompts), **self.detector_kwargs)
        score_t, strict_t = torch.from_numpy(scores).float(), torch.from_numpy(stricts).float()
        clean = torch.tensor([d["clean"] / d["blobs"] if d["blobs"] else 1.0 for d in details])
        blobs = torch.tensor([float(d["blobs"]) for d in details])
        named = torch.tensor([float(d["named"]) for d in details])
        exact_t = strict_t * (blobs == named).float()
        scores = blend_strict(score_t, exact_t if self.exact else strict_t, self.strict) - self.clean * (1 - clean) \
            - self.extra * (blobs - named).clamp(min=0)
        return RewardOutput(scores, {"strict": strict_t, "exact": exact_t, "score": score_t, "clean": clean,
                                     "blobs": blobs, "named": named})


def evaluate_images(images, records: list[dict], **kwargs) -> dict:
    """ShapeEval summary: {"per_tag": {tag: {"strict", "score", "n", "strict_ci95", "score_ci95"}},
    "overall": {the same keys, "strict_images", "score_images", "clean_fraction", "clean_ci95", "blobs",
    "blobs_per_image", "blobs_per_image_ci95", "named_per_image"}}.
    Overall strict / score are the mean over tags (as GenEval's overall score); *_images are the means over
    all images; clean_fraction = clean shapes / non-speck blobs drawn (see `detect`'s census); blobs = those
    blobs in all, blobs_per_image their mean per image against named_per_image, the mean number of objects the
    records name (more drawn than named is what GenEval's at-least rule lets pass); *_ci95 are 95%
    half-widths (`udm_grpo.stats`; for clean_fraction, blobs are treated as independent)."""
    from ..stats import half_width, mean_of_groups_half_width

    scores, stricts, details = score_images(images, records, **kwargs)
    tags = [r.get("tag", "untagged") for r in records]
    per_tag = {}
    for tag in sorted(set(tags), key=lambda t: (TAGS.index(t) if t in TAGS else len(TAGS), t)):
        idx = [i for i, t in enumerate(tags) if t == tag]
        per_tag[tag] = {"strict": float(stricts[idx].mean()), "score": float(scores[idx].mean()), "n": len(idx),
                        "strict_ci95": half_width(stricts[idx]), "score_ci95": half_width(scores[idx])}
    rows = list(per_tag.values())
    overall = {"n": len(records)}
    for key in ("strict", "score"):
        overall[key] = float(np.mean([r[key] for r in rows])) if rows else 0.0
        overall[f"{key}_ci95"] = mean_of_groups_half_width([r[f"{key}_ci95"] for r in rows])
    overall["strict_images"] = float(stricts.mean()) if len(records) else 0.0
    overall["score_images"] = float(scores.mean()) if len(records) else 0.0
    blobs, clean = sum(d["blobs"] for d in details), sum(d["clean"] for d in details)
    overall["clean_fraction"] = clean / blobs if blobs else 0.0
    overall["clean_ci95"] = half_width(np.r_[np.ones(clean), np.zeros(blobs - clean)]) if blobs else 0.0
    overall["blobs"] = blobs
    per_image = np.array([d["blobs"] for d in details], dtype=np.float64)
    overall["blobs_per_image"] = float(per_image.mean()) if len(records) else 0.0
    overall["blobs_per_image_ci95"] = half_width(per_image) if len(records) else 0.0
    overall["named_per_image"] = float(np.mean([d["named"] for d in details])) if len(records) else 0.0
    return {"per_tag": per_tag, "overall": overall}
