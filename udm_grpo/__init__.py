"""udm-grpo: UDM-GRPO fine-tuning of uniform discrete diffusion (URSA) text-to-image models."""

__version__ = "0.1.0"

__all__ = ["URSAPipeline", "__version__"]


def __getattr__(name: str):
    # Lazy so that `udm-grpo --help` does not import torch.
    if name == "URSAPipeline":
        from .models.pipeline import URSAPipeline

        return URSAPipeline
    raise AttributeError(name)
