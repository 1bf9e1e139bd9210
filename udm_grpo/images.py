"""Image helpers: decoding image files a user names or sends (with a size cap), captioned grids, PNG writing."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError

INK, PAPER = (0, 0, 0), (255, 255, 255)
MAX_IMAGE_SIDE = 4096  # default cap on an image side (px) for decode_image; env UDM_GRPO_MAX_IMAGE_SIDE overrides
MAX_SIDE_ENV = "UDM_GRPO_MAX_IMAGE_SIDE"
HEADER_BYTES = 1 << 20  # read to find the size of an image PIL refuses as a decompression bomb


@lru_cache(maxsize=8)
def caption_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at `size` px (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow, or no FreeType support
        return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return bottom - min(top, 0) + 2


def wrap_text(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` px wide (over-long words are split)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line, font=font) <= width:
            lines[-1] = line
            continue
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            cut = next((i for i in range(len(word) - 1, 1, -1) if draw.textlength(word[:i], font=font) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def make_grid(images: np.ndarray | Sequence[np.ndarray | None], nrow: int | None = None, pad: int = 2,
              labels: Sequence[str] | None = None, scale: int = 1, captions: Sequence[str] | None = None,
              font_size: int = 12) -> Image.Image:
    """uint8 [B, H, W, 3] (or a list of [H, W, 3] arrays, None for an empty cell) -> one PIL image with
    `nrow` images per row (default ~sqrt(B)).

    `labels` (one per row) are written in a strip above each row, `captions` (one per image) under each
    image; both are wrapped to the available width, and each strip is as tall as its wrapped text.
    """
    cells = list(images)
    shown = [im for im in cells if im is not None]
    if not shown:
        raise ValueError("make_grid needs at least one image.")
    h, w = shown[0].shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(len(cells))))
    rows = math.ceil(len(cells) / nrow)
    hs, ws = h * scale, w * scale
    font, label_font = caption_font(font_size), caption_font(font_size + 2)
    line_h, label_h = _line_height(font), _line_height(label_font)
    row_w = nrow * (ws + pad) - pad
    label_lines = [wrap_text(labels[r], label_font, row_w) if labels and r < len(labels) else []
                   for r in range(rows)]
    cap_lines = [wrap_text(captions[i], font, ws - 4) if captions and i < len(captions) and cells[i] is not None
                 else [] for i in range(len(cells))]
    row_h = []
    for r in range(rows):
        cap = max(len(c) for c in cap_lines[r * nrow:(r + 1) * nrow])
        row_h.append((len(label_lines[r]) * label_h, hs + (cap * line_h + 2 if cap else 0)))
    grid = Image.new("RGB", (row_w + 2 * pad, sum(a + b + pad for a, b in row_h) + pad), PAPER)
    draw = ImageDraw.Draw(grid)
    y = pad
    for r in range(rows):
        for k, line in enumerate(label_lines[r]):
            draw.text((pad, y + k * label_h), line, fill=INK, font=label_font)
        y += row_h[r][0]
        for c, i in enumerate(range(r * nrow, min((r + 1) * nrow, len(cells)))):
            if cells[i] is None:
                continue
            x = pad + c * (ws + pad)
            tile = Image.fromarray(np.asarray(cells[i]))
            grid.paste(tile.resize((ws, hs), Image.NEAREST) if scale != 1 else tile, (x, y))
            for k, line in enumerate(cap_lines[i]):
                draw.text((x, y + hs + 2 + k * line_h), line, fill=INK, font=font)
        y += row_h[r][1] + pad
    return grid


def grouped_grid(images: np.ndarray, groups: Sequence[tuple[str, Sequence[int]]],
                 captions: Sequence[str] | None = None, ncol: int = 8, scale: int = 2) -> Image.Image:
    """A grid of `images` in groups: each (label, image indices) starts a new row (wrapping after
    `ncol` tiles) whose label strip holds `label`; `captions` (one per image) go under their tiles."""
    ncol = max(1, min(ncol, max(len(idx) for _, idx in groups)))
    cells: list[np.ndarray | None] = []
    labels: list[str] = []
    caps: list[str] = []
    for label, idx in groups:
        idx = list(idx)
        nrows = max(1, math.ceil(len(idx) / ncol))
        labels += [label] + [""] * (nrows - 1)
        cells += [images[i] for i in idx] + [None] * (nrows * ncol - len(idx))
        caps += [captions[i] if captions else "" for i in idx] + [""] * (nrows * ncol - len(idx))
    return make_grid(cells, nrow=ncol, labels=labels, scale=scale, captions=caps if captions else None)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically (`outputs.atomic_file`: a failed write leaves nothing behind)."""
    from .outputs import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


class ImageTooLarge(UserError):
    """An image whose header gives a side over the cap; `size` = (width, height) from the header (None when PIL
    refused it as a decompression bomb and no plugin read the size without that check)."""

    def __init__(self, message: str, size: tuple[int, int] | None):
        super().__init__(message)
        self.size = size


def max_image_side() -> int:
    """The default cap on an image side: $UDM_GRPO_MAX_IMAGE_SIDE when set, else `MAX_IMAGE_SIDE`."""
    text = os.environ.get(MAX_SIDE_ENV, "").strip()
    if not text:
        return MAX_IMAGE_SIDE
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"environment variable {MAX_SIDE_ENV} must be an integer >= 1, got {text!r}.")
    return int(text)


def _header_size(source: io.BytesIO | Path) -> tuple[int, int] | None:
    """(width, height) that the first PIL plugin accepting the first `HEADER_BYTES` of `source` reads from them,
    without PIL's decompression-bomb check (which refuses before the size is known); None when none reads it."""
    if isinstance(source, Path):
        with source.open("rb") as f:
            head = f.read(HEADER_BYTES)
    else:
        head = source.getvalue()[:HEADER_BYTES]
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            ok = accept is None or accept(head[:16])
            if ok and not isinstance(ok, str):
                return factory(io.BytesIO(head), "").size
        except Exception:
            continue
    return None


def decode_image(data: bytes | str | Path, max_side: int | None = None, what: str = "image",
                 formats: Sequence[str] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] (RGB) of an image file (a path) or its encoded bytes.

    The header's size is checked before any pixel is decoded: a side over `max_side` (default
    `max_image_side()`) raises `ImageTooLarge`; anything PIL cannot decode (unknown format, truncated or
    corrupt data, a format outside `formats`, e.g. ("PNG", "JPEG")) raises UserError. Both are one sentence
    naming `what`; PIL's decompression-bomb warning and error never escape.
    """
    cap = max_image_side() if max_side is None else int(max_side)
    source = io.BytesIO(data) if isinstance(data, bytes) else Path(data)
    over = f"px limit on an image side (--max-side or {MAX_SIDE_ENV})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(source, formats=tuple(formats) if formats is not None else None)
            except Image.DecompressionBombError:
                size = _header_size(source)
                shown = f"{size[0]}x{size[1]} px" if size else f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
                raise ImageTooLarge(f"{what} is {shown}, over the {cap} {over}.", size) from None
            with im:
                if min(im.size) < 1:
                    raise UserError(f"{what} is an empty image ({im.size[0]}x{im.size[1]} px).")
                if max(im.size) > cap:
                    raise ImageTooLarge(f"{what} is {im.size[0]}x{im.size[1]} px, over the {cap} {over}.", im.size)
                return np.asarray(im.convert("RGB"))
    except UserError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise UserError(f"{what} cannot be read ({e.strerror}).") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ... on bad data
        raise UserError(f"{what} is not a readable image ({type(e).__name__}).") from None
