"""Timestep schedule and the CTMC Euler scheduler (diffusers-style `set_timesteps` / `step`).

Shift: a uniform s in [0, 1] maps to t = s / (s + lambda (1 - s)); lambda > 1 spends more steps at
high noise. Inference with n steps uses t_k = shift(k / n), k = 0..n-1, with dt_k = t_{k+1} - t_k;
the last step draws x1 directly from the model. Training draws s = 0.999 U, U ~ U[0, 1).

On disk (`scheduler/`): `scheduler_config.json` {_class_name, alpha, c, eps, shift} and
`scheduler_model.pth`, a torch file of {"path.emb": Float[K, D]} (read with weights_only=True).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..models.io import read_config
from .categorical import draw_device, sample_logits
from .paths import ProbPath, build_path

CONFIG_NAME = "scheduler_config.json"
WEIGHTS_NAME = "scheduler_model.pth"


def shift_time(s: torch.Tensor | float, shift: float) -> torch.Tensor:
    """t = s / (s + shift (1 - s)); shift_time(0) = 0, shift_time(1) = 1."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return s / (s + shift * (1 - s))


class KineticOptimalScheduler:
    """CTMC sampler over a probability path with kinetic-optimal jumps.

    Args:
        path: a `ProbPath` (`MetricPath` or `MixturePath`).
        shift: resolution-dependent time shift lambda.
    """

    def __init__(self, path: ProbPath, shift: float = 1.0, alpha=None, c: float = 3.0,
                 eps: float = 1e-5):
        if not (isinstance(shift, int | float) and shift > 0):
            raise ConfigError(f"scheduler: 'shift' must be a positive number, got {shift!r}.")
        self.path = path
        self.shift = float(shift)
        self.config = {"alpha": alpha, "c": c, "eps": eps, "shift": float(shift)}
        self.set_timesteps(25)

    @property
    def num_embeddings(self) -> int:
        return self.path.num_embeddings

    def set_timesteps(self, num_inference_steps: int) -> None:
        """timesteps = [0..n-1]; self.t[k] = shift(k / n) with self.t[n] = 1 (Float64[n + 1])."""
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        n = int(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = list(range(n))
        self.t = shift_time(torch.arange(n + 1, dtype=torch.float64) / n, self.shift)

    def t_of(self, k: int) -> float:
        return float(self.t[k])

    def sample_train_t(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps Float[B] on `device`: t = shift(0.999 U), U drawn on the generator's device
        (the CPU without one)."""
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=draw_device(generator, "cpu"))
        return shift_time(0.999 * u, self.shift).float().to(device or "cpu")

    def step(
        self,
        logits: torch.Tensor,
        k: int,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
        x1_hat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at timestep index k. logits: Float[B, N, K]; x_t: Long[B, N].

        Draws x1_hat ~ softmax(logits) (unless given), then: last step -> returns x1_hat itself;
        otherwise a CTMC jump from t_k over dt_k towards x1_hat. Returns (x_next, x1_hat).
        """
        if x1_hat is None:
            x1_hat = sample_logits(logits, generator)
        if k >= self.num_inference_steps - 1:
            return x1_hat, x1_hat
        t, dt = self.t_of(k), self.t_of(k + 1) - self.t_of(k)
        return self.path.jump(x_t, x1_hat, t, dt, generator), x1_hat

    def add_noise(self, x1: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.path.add_noise(x1, t, generator)

    def to(self, device) -> KineticOptimalScheduler:
        self.path = self.path.to(device)
        return self

    # ---- on-disk layout -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, num_embeddings: int | None = None) -> KineticOptimalScheduler:
        folder = Path(folder)
        cfg, cfg_file = read_config(folder, "scheduler/", CONFIG_NAME)
        alpha = cfg.get("alpha")
        for key, value in (("alpha", alpha), ("c", cfg.get("c", 3.0)), ("eps", cfg.get("eps", 1e-5)),
                           ("shift", cfg.get("shift", 1.0))):
            if value is None and key == "alpha":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{cfg_file}: field '{key}' must be a number, got {value!r}.")
        emb = None
        weights = folder / WEIGHTS_NAME
        if weights.is_file():
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # corrupt file, or a pickle that needs more than tensors
                raise CheckpointError(f"{weights}: cannot be read as a weight file ({type(e).__name__}: {e}).") from e
            if not isinstance(state, dict) or "path.emb" not in state:
                raise CheckpointError(f"{weights}: expected a dict with key 'path.emb'.")
            emb = state["path.emb"].float()
        elif alpha is not None:
            raise CheckpointError(f"{folder}: the metric path (alpha={alpha}) needs {WEIGHTS_NAME}.")
        k = emb.shape[0] if emb is not None else num_embeddings
        if k is None:
            raise CheckpointError(f"{folder}: cannot tell the codebook size (no {WEIGHTS_NAME}).")
        path = build_path(k, emb, alpha, float(cfg.get("c", 3.0)), float(cfg.get("eps", 1e-5)))
        return cls(path, shift=float(cfg.get("shift", 1.0)), alpha=alpha, c=cfg.get("c", 3.0),
                   eps=cfg.get("eps", 1e-5))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "KineticOptimalScheduler", **self.config}
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        if self.path.embedding is not None:
            torch.save({"path.emb": self.path.embedding.cpu().contiguous()}, folder / WEIGHTS_NAME)

    @property
    def path_embedding(self) -> torch.Tensor | None:
        """The path embedding as stored (before L2 normalisation); None for the mixture path."""
        return self.path.embedding
