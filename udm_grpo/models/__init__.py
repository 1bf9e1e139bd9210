"""The URSA model and its folder layout: transformer, VQ tokenizers, the pipeline, weight and config I/O.

The modules are imported by name; this file imports nothing."""

__all__ = ["io", "patch_vq", "pipeline", "transformer", "vae", "vq"]
