"""Word-level text tokenizer of the tiny world, and prompt encoding shared with real (Qwen3) tokenizers.

The tokenizer is a `tokenizers` WordLevel model (lowercase normaliser, whitespace pre-tokenizer)
wrapped in `transformers.PreTrainedTokenizerFast`, so `save_pretrained` writes a standard
tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads offline.
Special tokens: "<pad>" = 0, "<unk>" = 1, "<bov>" = 2 (begin of vision); words follow from id 3.
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bov>")
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits out


def tiny_world_vocabulary() -> list[str]:
    """Every word the tiny-world prompt grammar can produce (both splits), sorted."""
    from .shapes import all_prompts

    return sorted({w for p in all_prompts() for w in _WORD.findall(p.lower())})


def build_word_tokenizer(words: list[str], max_length: int):
    """A left-padding `PreTrainedTokenizerFast` over `words` (split like the pre-tokenizer, lowercased,
    deduplicated in order) with model_max_length = max_length."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if max_length < 1:
        raise UserError(f"tokenizer max_length must be >= 1, got {max_length}.")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        for piece in _WORD.findall(word.lower()):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left", truncation_side="right", model_max_length=max_length)
    fast.add_special_tokens({"additional_special_tokens": ["<bov>"]})
    return fast


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Long[B, max_length]: token ids without BOS/EOS, truncated to max_length (at the tokenizer's
    truncation side, right by default) and left-padded with the tokenizer's pad token."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UserError("the text tokenizer has no pad token; prompts are left-padded to a fixed length.")
    enc = tokenizer(list(prompts), add_special_tokens=False, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    out = torch.full((len(ids), max_length), int(pad), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            out[i, max_length - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out


def unknown_words(tokenizer, prompts: list[str]) -> list[str]:
    """The words of `prompts` that `tokenizer` maps to its unknown token, once each in order of appearance.

    Empty for tokenizers without an unknown token or without offsets (a byte-level BPE never has unknown words).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
    found: dict[str, None] = {}
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        for i, (a, b) in zip(ids, offsets):
            if i == unk:
                found.setdefault(prompt[a:b], None)
    return list(found)
