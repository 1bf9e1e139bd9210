"""Prompt data: the tiny world's scenes and prompts, GenEval's vocabulary and generator, prompt files and streams, the
checks of `udm-grpo data check`.

The modules are imported by name; this file imports nothing."""

__all__ = ["check", "geneval_prompts", "prompts", "shapes", "text_tokenizer"]
