"""Discrete flow matching: probability paths, the kinetic-optimal scheduler, the sampler (`SamplingOptions`,
`sample_tokens`), block-wise categorical draws and the pretraining loss.

The modules are imported by name; this file imports nothing."""

__all__ = ["categorical", "loss", "paths", "sampler", "scheduler"]
