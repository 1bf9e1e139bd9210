import json

import pytest
import torch

from udm_grpo.data.shapes import all_prompts
from udm_grpo.data.text_tokenizer import build_word_tokenizer, encode_prompts, tiny_world_vocabulary
from udm_grpo.errors import UserError

MAX_LEN = 16  # the tiny world's default max_prompt_length


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(tiny_world_vocabulary(), MAX_LEN)


def test_vocabulary_and_special_tokens(tok):
    vocab = tiny_world_vocabulary()
    assert vocab == sorted(set(vocab)) and {"photo", "circles", "left", "orange", "four"} <= set(vocab)
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<unk>", "<bov>")] == [0, 1, 2]
    assert tok.pad_token_id == 0 and tok.unk_token_id == 1 and len(tok) == len(vocab) + 3
    assert tok.padding_side == "left" and tok.model_max_length == MAX_LEN


def test_every_prompt_round_trips_without_truncation(tok):
    prompts = all_prompts()
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert max(len(row) for row in ids) <= MAX_LEN
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.batch_decode(ids) == prompts
    enc = encode_prompts(tok, prompts, MAX_LEN)
    assert all(tok.decode(row, skip_special_tokens=True) == p for row, p in zip(enc.tolist(), prompts))


def test_encode_prompts_left_pads_and_truncates(tok):
    out = encode_prompts(tok, ["a photo of a red circle", "", "A PHOTO of a zebra"], 8)
    assert out.dtype == torch.long and out.shape == (3, 8)
    words = [tok.convert_tokens_to_ids(w) for w in "a photo of a red circle".split()]
    assert out[0].tolist() == [0, 0] + words
    assert out[1].tolist() == [0] * 8
    assert out[2, -1].item() == 1 and out[2, -2].item() == tok.convert_tokens_to_ids("a")
    long = encode_prompts(tok, ["a photo of a red circle left of a blue square"], 4)
    assert long[0].tolist() == words[:4]  # truncation keeps the beginning; no BOS/EOS


def test_save_and_autotokenizer_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["padding_side"] == "left" and config["model_max_length"] == MAX_LEN
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    prompts = all_prompts()[::7]
    assert torch.equal(encode_prompts(loaded, prompts, MAX_LEN), encode_prompts(tok, prompts, MAX_LEN))
    assert loaded.convert_tokens_to_ids("<bov>") == 2 and loaded.padding_side == "left"


def test_errors():
    class NoPad:
        pad_token_id = None

    with pytest.raises(UserError, match="pad token"):
        encode_prompts(NoPad(), ["x"], 4)
    with pytest.raises(UserError):
        build_word_tokenizer(["a"], 0)
