"""Prompt sources, tag balancing, the resumable prompt stream and the held-out evaluation set."""

import os
from collections import Counter
from types import SimpleNamespace

import pytest

from udm_grpo.data import prompts
from udm_grpo.data.prompts import PromptStream, balance_tags, load_prompts, shard, shard_range
from udm_grpo.errors import UserError
from udm_grpo.grpo.evaluation import eval_records

RECORDS = [{"prompt": f"p{i}", "tag": t} for i, t in enumerate("aaaaabbc")]


def test_balance_tags_cycles_small_tags_and_truncates_large_ones():
    full = balance_tags(RECORDS)
    assert Counter(r["tag"] for r in full) == {"a": 5, "b": 5, "c": 5}
    assert [r["prompt"] for r in full if r["tag"] == "b"] == ["p5", "p6", "p5", "p6", "p5"]
    three = balance_tags(RECORDS, 3)
    assert [r["prompt"] for r in three] == ["p0", "p1", "p2", "p5", "p6", "p5", "p7", "p7", "p7"]


def test_shapes_train_is_tag_balanced_and_disjoint_from_test():
    train, test = load_prompts("shapes:train"), load_prompts("shapes:test")
    assert len(set(Counter(r["tag"] for r in train).values())) == 1
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_prompt_files_and_their_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n a blue square \n")
    assert [r["prompt"] for r in load_prompts(str(txt))] == ["a red circle", "a blue square"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: each line must be a JSON object with a string 'prompt'"):
        load_prompts(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="splits are"):
        load_prompts("shapes:val")


def test_stream_resumes_exactly_and_reshuffles_each_epoch():
    a = PromptStream(RECORDS, seed=3)
    first = [r["prompt"] for r in a.next(11)]
    assert sorted(first[:8]) == sorted(r["prompt"] for r in RECORDS)  # an epoch is a permutation
    b = PromptStream(RECORDS, seed=3)
    b.load_state(a.state())
    assert [r["prompt"] for r in a.next(13)] == [r["prompt"] for r in b.next(13)]
    assert [r["prompt"] for r in PromptStream(RECORDS, 0, shuffle=False).next(3)] == ["p0", "p1", "p2"]


def test_eval_records_per_tag_or_per_prompt():
    e = SimpleNamespace(eval_images_per_tag=2, num_eval_prompts=3, eval_images_per_prompt=2)
    assert Counter(r["tag"] for r in eval_records(RECORDS, e)) == {"a": 2, "b": 2, "c": 2}
    untagged = [{"prompt": "x"}, {"prompt": "y"}]
    assert [r["prompt"] for r in eval_records(untagged, e)] == ["x", "x", "y", "y"]
    e.eval_images_per_tag = None
    assert [r["prompt"] for r in eval_records(RECORDS, e)] == ["p0", "p0", "p1", "p1", "p2", "p2"]


def test_streamed_records_keep_their_line_numbers(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\n  \n{"prompt": "b"}\n\n{"prompt": "c"}')
    assert [r["prompt"] for r in load_prompts(str(path))] == ["a", "b", "c"]
    monkeypatch.setattr(prompts, "iter_lines", None)  # locations come from the load, not a second read
    assert [prompts.prompt_location(str(path), i) for i in range(4)] == [
        f"{path}:1", f"{path}:4", f"{path}:6", f"{path} prompt 4"]
    monkeypatch.undo()
    path.write_text('\n{"prompt": "a"}\n')  # a changed file is read again
    os.utime(path, ns=(0, 0))
    assert prompts.prompt_location(str(path), 0) == f"{path}:2"
    assert prompts.prompt_location("shapes:test", 2) == "shapes:test prompt 3"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not UTF-8 text"):
        load_prompts(str(path))


@pytest.mark.parametrize("n, world", [(0, 1), (10, 1), (10, 3), (7, 8), (100, 7)])
def test_shards_cover_every_item_once_and_differ_by_at_most_one(n, world):
    items = [f"p{i}" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all([items[i] for i in shard_range(n, r, world)] == parts[r] for r in range(world))
    assert parts[0][:2] == items[0:2 * world:world]  # interleaved


def test_shard_refuses_bad_ranks():
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            shard([1, 2, 3], rank, world)
