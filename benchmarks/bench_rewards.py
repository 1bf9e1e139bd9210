"""Images per second of each reward on this machine at 512x512.

The CLIP-family rewards run a tiny random CLIP built here (so the figure is their pre- and
post-processing cost: PIL resize and crop, tokenising, batching) on random images, the OCR reward runs
the real rapidocr models on a rendered sign, ShapeEval its exact detector on tiny-world scenes at their
own 64x64. Pass `--clip DIR` to time a real CLIP / PickScore folder instead.

    python benchmarks/bench_rewards.py [--images 16] [--clip DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def render_signs(n: int) -> np.ndarray:
    """n white 512x512 images with the word OPEN drawn at 64 px."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(im).text((120, 220), "OPEN", fill="black", font=ImageFont.load_default(size=64))
    return np.stack([np.asarray(im)] * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--clip", default=None, help="a real CLIP-family model folder (default: a tiny random one)")
    args = ap.parse_args()
    from tests.test_clip_rewards import build_tiny_clip
    from udm_grpo.data.shapes import generate_records, render_batch
    from udm_grpo.rewards import build_reward

    n = args.images
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)
    test = generate_records("test")
    records = [test[i % 10] for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or str(build_tiny_clip(Path(tmp)))
        cases = {
            "shapeeval": ({}, [r["prompt"] for r in records], records),
            "clipscore": ({"model": clip, "device": "cpu"}, ["a photo of a cat"] * n, None),
            "pickscore": ({"model": clip, "processor": clip, "device": "cpu"}, ["a photo of a cat"] * n, None),
            "ocr": ({}, ['a sign that says "open"'] * n, None),
        }
        signs, scenes = render_signs(n), render_batch(records, rng)
        which = f"CLIP {clip}" if args.clip else "tiny random CLIP"
        print(f"rewards at 512x512 (ShapeEval at 64x64), {n} images ({which})")
        for name, (params, prompts, meta) in cases.items():
            reward = build_reward(name, params)
            batch = {"ocr": signs, "shapeeval": scenes}.get(name, images)
            reward(batch[:1], prompts[:1], None if meta is None else meta[:1])  # load models
            start = time.perf_counter()
            reward(batch, prompts, meta)
            seconds = time.perf_counter() - start
            print(f"  {name:10s} {n / seconds:8.1f} images/s")


class MeanPixel:
    """A reward that costs nothing: what is left of a call through the service is its transport."""

    def __call__(self, images, prompts, metadata):
        from udm_grpo.rewards.base import RewardOutput

        s = np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255
        return RewardOutput(s, {"mean": s})


def service_overhead(n: int = 64) -> None:
    """Seconds per batch of n images in process and through a loopback reward service."""
    import socket
    import threading

    import uvicorn

    from udm_grpo.data.shapes import generate_records, render_batch
    from udm_grpo.rewards import build_reward
    from udm_grpo.rewards.service import RemoteReward, create_app

    test = generate_records("test")
    records = [test[i % len(test)] for i in range(n)]
    small, prompts = render_batch(records, np.random.default_rng(0)), [r["prompt"] for r in records]
    large = small.repeat(8, axis=1).repeat(8, axis=2)  # the same scenes at 512x512
    token = "benchmark-token-0123456789"
    for label, reward, images in (("ShapeEval, 64x64", build_reward("shapeeval"), small),
                                  ("zero-cost reward, 512x512", MeanPixel(), large)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(reward, "bench", token), host="127.0.0.1", port=port,
                                               log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        with tempfile.NamedTemporaryFile("w", suffix=".token") as f:
            f.write(token)
            f.flush()
            remote = RemoteReward(f"http://127.0.0.1:{port}", f.name)
            remote(images[:2], prompts[:2], records[:2])
            start = time.perf_counter()
            reward(images, prompts, records)
            local = time.perf_counter() - start
            start = time.perf_counter()
            remote(images, prompts, records)
            served = time.perf_counter() - start
        server.should_exit = True
        print(f"  service, {label}, {n} images: in process {local:.3f} s, through the loopback service "
              f"{served:.3f} s (overhead {served - local:.3f} s per batch)")


if __name__ == "__main__":
    main()
    service_overhead()
