"""`images.decode_image`: the header's size is checked before pixels are decoded (huge images are refused at
once, in little memory, without PIL's decompression-bomb warning or error), unreadable data is one sentence,
and `udm-grpo score` refuses through it (--max-side, UDM_GRPO_MAX_IMAGE_SIDE)."""

import json
import resource
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from udm_grpo.cli import main
from udm_grpo.data.shapes import generate_records, render_batch
from udm_grpo.errors import UserError
from udm_grpo.images import MAX_IMAGE_SIDE, ImageTooLarge, decode_image


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """Real PNGs of 20000x20000 (over PIL's decompression-bomb error limit) and 12000x12000 (over its warning
    limit), bilevel so that each file is tens of kB."""
    folder = tmp_path_factory.mktemp("huge")
    paths = {}
    for side in (20000, 12000):
        paths[side] = folder / f"{side}.png"
        Image.new("1", (side, side)).save(paths[side])
    return paths


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("side", [20000, 12000])
def test_huge_images_are_refused_from_the_header(huge, side):
    path = huge[side]
    if side == 20000:  # what PIL alone does with these files
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)
    else:
        with pytest.warns(Image.DecompressionBombWarning), Image.open(path) as im:
            assert im.size == (side, side)
    for source in (path, path.read_bytes()):
        before, start = peak_mb(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageTooLarge) as e:
                decode_image(source, what="x.png")
        assert time.perf_counter() - start < 0.5 and peak_mb() - before < 100  # decoding would take >= 144 MB
        assert e.value.size == (side, side)
        assert str(e.value) == (f"x.png is {side}x{side} px, over the {MAX_IMAGE_SIDE} px limit on an image side "
                                "(--max-side or UDM_GRPO_MAX_IMAGE_SIDE).")


def test_an_image_at_the_cap_is_decoded_and_one_over_is_refused(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(decode_image(tmp_path / "a.png", max_side=64), pixels)
    grey = decode_image(str(tmp_path / "grey.png"), max_side=64)
    assert grey.dtype == np.uint8 and grey.shape == (48, 64, 3) and np.array_equal(grey[..., 2], pixels[..., 0])
    with pytest.raises(ImageTooLarge, match="is 64x48 px, over the 63 px limit"):
        decode_image(tmp_path / "a.png", max_side=63)
    monkeypatch.setenv("UDM_GRPO_MAX_IMAGE_SIDE", "63")
    with pytest.raises(ImageTooLarge, match="over the 63 px limit"):
        decode_image(tmp_path / "a.png")
    monkeypatch.setenv("UDM_GRPO_MAX_IMAGE_SIDE", "64")
    assert decode_image(tmp_path / "a.png").shape == (48, 64, 3)
    monkeypatch.setenv("UDM_GRPO_MAX_IMAGE_SIDE", "lots")
    with pytest.raises(UserError, match="UDM_GRPO_MAX_IMAGE_SIDE must be an integer >= 1, got 'lots'"):
        decode_image(tmp_path / "a.png")


def test_unreadable_data_is_one_sentence(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "a.gif")
    png = (tmp_path / "a.png").read_bytes()
    for data in (b"", b"not an image", png[:60], png[: len(png) // 2]):
        with pytest.raises(UserError, match=r"^b is not a readable image \(\w+\)\.$"):
            decode_image(data, what="b")
    with pytest.raises(UserError, match="not a readable image"):
        decode_image((tmp_path / "a.gif").read_bytes(), what="b", formats=("PNG", "JPEG"))
    assert decode_image((tmp_path / "a.gif").read_bytes()).shape == (8, 8, 3)
    with pytest.raises(UserError, match=r"cannot be read \(Is a directory\)"):
        decode_image(tmp_path)


def score(capsys, *args) -> tuple[int, list[str]]:
    code = main(["score", *map(str, args)])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_score_refuses_huge_images_and_honours_max_side(huge, tmp_path, capsys, monkeypatch):
    import udm_grpo.rewards as rewards

    records = generate_records("test")[:1]
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps(records[0]) + "\n")
    monkeypatch.setattr(rewards, "build_reward", lambda *a, **k: pytest.fail("the reward was built"))
    code, err = score(capsys, huge[20000], "--reward", "shapeeval", "--metadata", meta)
    assert code == 2 and len(err) == 1 and str(huge[20000]) in err[0] and "20000x20000 px" in err[0], err
    monkeypatch.undo()

    image = render_batch(records, np.random.default_rng(0))[0]  # 64x64
    Image.fromarray(image).save(tmp_path / "s.png")
    code, err = score(capsys, tmp_path / "s.png", "--reward", "shapeeval", "--metadata", meta, "--max-side", 63)
    assert code == 2 and len(err) == 1 and "s.png is 64x64 px, over the 63 px limit" in err[0]
    assert score(capsys, tmp_path / "s.png", "--reward", "shapeeval", "--metadata", meta, "--max-side", 64)[0] == 0
    monkeypatch.setenv("UDM_GRPO_MAX_IMAGE_SIDE", "32")
    assert score(capsys, tmp_path / "s.png", "--reward", "shapeeval", "--metadata", meta)[0] == 2
    assert main(["score", str(tmp_path / "s.png"), "--reward", "shapeeval", "--metadata", str(meta), "--max-side",
                 "0"]) == 2
    assert "--max-side" in capsys.readouterr().err
