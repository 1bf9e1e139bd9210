"""OCR reward: does the image show the text the prompt quotes?

    target     = the text between the first pair of double quotes of the prompt
    normalise  = lowercase, all whitespace removed
    recognised = everything the engine reads in the image, concatenated in reading order
    dist       = 0 if target is a substring of recognised, else min(Levenshtein(recognised, target), len(target))
    score      = 1 - dist / len(target)          (in [0, 1]; also logged as value `ocr`)
    exact      = 1 if dist == 0                  (value `ocr_exact`, the evaluation's exact-match rate)

Engines: `rapidocr` (default; PP-OCR detection and recognition models ship inside its wheel, so it runs
offline on a CPU) and `tesseract` (the `tesseract` program via pytesseract). Prompts must quote a target:
`check_prompts` finds the first that does not, so a prompt file is refused when it is loaded.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from ..errors import ConfigError, UserError
from .base import RewardOutput, check_batch, to_uint8_images

_QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt: str) -> str | None:
    """The normalised text between the first pair of double quotes, or None when there is none (or it is blank)."""
    m = _QUOTED.search(prompt)
    target = normalise(m.group(1)) if m else ""
    return target or None


def normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def ocr_distance(recognised: str, target: str) -> int:
    """0 when `target` occurs in `recognised` (both normalised), else the capped Levenshtein distance."""
    from rapidfuzz.distance import Levenshtein

    if target in recognised:
        return 0
    return min(Levenshtein.distance(recognised, target), len(target))


class OCRReward:
    """See the module docstring. `engine`: 'rapidocr' or 'tesseract'; `tesseract_config` is passed to
    tesseract (default: page segmentation mode 6, one block of text)."""

    name = "ocr"

    def __init__(self, engine: str = "rapidocr", tesseract_config: str = "--psm 6"):
        if engine not in ("rapidocr", "tesseract"):
            raise ValueError(f"engine must be 'rapidocr' or 'tesseract', got {engine!r}")
        self.engine, self.tesseract_config = engine, tesseract_config
        self._reader = None

    @staticmethod
    def check_prompts(prompts: list[str]) -> tuple[int, str] | None:
        """(index, reason) of the first prompt without a quoted target, or None."""
        for i, p in enumerate(prompts):
            if ocr_target(p) is None:
                return i, 'quotes no text for the OCR reward to find (e.g. a sign that says "open")'
        return None

    def _load(self) -> None:
        try:
            if self.engine == "rapidocr":
                from rapidocr import RapidOCR

                logging.getLogger("RapidOCR").setLevel(logging.ERROR)  # not a warning per image without text
                engine = RapidOCR()
                self._reader = lambda im: " ".join(engine(im).txts or ())
            else:
                import pytesseract

                pytesseract.get_tesseract_version()  # fails early when the program is missing
                self._reader = lambda im: pytesseract.image_to_string(im, config=self.tesseract_config)
        except ImportError:
            extra = "pip install 'udm-grpo[ocr]'" if self.engine == "rapidocr" else "pip install pytesseract"
            raise ConfigError(f"the OCR reward's engine '{self.engine}' is not installed; {extra}.") from None
        except Exception as e:  # pytesseract raises its own TesseractNotFoundError
            raise ConfigError(f"the OCR reward's engine '{self.engine}' cannot start ({type(e).__name__}); "
                              "install the tesseract program (e.g. apt-get install tesseract-ocr).") from None

    def read(self, image: np.ndarray) -> str:
        """The normalised text the engine reads in one uint8 [H, W, 3] image ('' when it reads none)."""
        from PIL import Image

        if self._reader is None:
            self._load()
        return normalise(self._reader(Image.fromarray(image)))

    def __call__(self, images, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        images = to_uint8_images(images)
        check_batch(images, prompts, metadata)
        bad = self.check_prompts(prompts)
        if bad is not None:
            raise UserError(f"prompt {bad[0] + 1} ({prompts[bad[0]]!r}) {bad[1]}.")
        scores, exact = [], []
        for image, prompt in zip(images, prompts):
            target = ocr_target(prompt)
            dist = ocr_distance(self.read(image), target)
            scores.append(1.0 - dist / len(target))
            exact.append(float(dist == 0))
        s = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(s, {"ocr": s, "ocr_exact": torch.tensor(exact, dtype=torch.float32)})
