"""Image helpers: captioned grids and PNG writing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK, PAPER = (0, 0, 0), (255, 255, 255)


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
    """Write atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
