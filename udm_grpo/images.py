"""Image helpers: grids and PNG writing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, labels: list[str] | None = None,
              scale: int = 1) -> Image.Image:
    """uint8 [B, H, W, 3] -> one PIL image with `nrow` images per row (default ~sqrt(B)).

    `labels` (one per row) are written in a strip above each row.
    """
    b, h, w, _ = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    label_h = 12 if labels else 0
    hs, ws = h * scale, w * scale
    grid = Image.new("RGB", (nrow * (ws + pad) + pad, rows * (hs + pad + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        y = pad + r * (hs + pad + label_h)
        if labels and c == 0 and r < len(labels):
            draw.text((pad, y), labels[r][:80], fill=(0, 0, 0))
        tile = Image.fromarray(im)
        if scale != 1:
            tile = tile.resize((ws, hs), Image.NEAREST)
        grid.paste(tile, (pad + c * (ws + pad), y + label_h))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
