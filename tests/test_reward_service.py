"""The reward service on a real loopback server: scores equal in-process scores, 401 / 413 / 422,
random and malformed bodies never crash it nor get 200, concurrent clients, and the client's retries."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the reward service needs the 'serve' extra: pip install 'udm-grpo[serve]'")
httpx = pytest.importorskip("httpx", reason="the reward service needs the 'serve' extra")

from udm_grpo.data.shapes import generate_records, render_batch  # noqa: E402
from udm_grpo.errors import UserError  # noqa: E402
from udm_grpo.rewards import build_reward  # noqa: E402
from udm_grpo.rewards.service import RemoteReward, create_app  # noqa: E402

TOKEN = "a-test-token-of-32-characters-xx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    port = free_port()
    app = create_app(build_reward("shapeeval"), "shapeeval", TOKEN, max_batch=8, max_side=256, max_body=2**20)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def batch(n=4):
    records = generate_records("test")[:n]
    return render_batch(records, np.random.default_rng(0)), [r["prompt"] for r in records], records


def png(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def post(url, body, token=TOKEN, raw=None, path="/v1/score"):
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{url}{path}", content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=30)


def test_scores_equal_in_process(server, token_file):
    images, prompts, records = batch()
    remote = RemoteReward(server, token_file)(images, prompts, records)
    local = build_reward("shapeeval")(images, prompts, records)
    assert torch.equal(remote.scores, local.scores) and torch.equal(remote.values["strict"], local.values["strict"])
    assert httpx.get(f"{server}/health", timeout=10).json() == {"reward": "shapeeval"}


def test_status_codes(server):
    images, prompts, records = batch(2)
    good = {"images": [png(im) for im in images], "prompts": prompts, "metadata": records}
    assert post(server, good).status_code == 200
    assert post(server, good, path="/score").json() == post(server, good).json()  # the unversioned alias
    assert post(server, good, token="wrong").status_code == 401
    assert post(server, {**good, "images": good["images"] * 5, "prompts": prompts * 5,
                         "metadata": records * 5}).status_code == 413  # 10 images > max_batch 8
    assert post(server, None, raw=b"x" * (2**20 + 10)).status_code == 413
    big = np.zeros((300, 300, 3), np.uint8)
    assert post(server, {**good, "images": [png(big)] * 2}).status_code == 413
    bad = post(server, {**good, "metadata": [None, None]})  # ShapeEval needs GenEval metadata
    assert bad.status_code == 422 and bad.json()["detail"].startswith("metadata[0]: ShapeEval needs")
    assert post(server, {**good, "images": ["not base64!", good["images"][1]]}).status_code == 422


def test_random_and_malformed_bodies_never_succeed(server):
    rng = np.random.default_rng(0)
    images, prompts, records = batch(1)
    one = png(images[0])
    shapes = [lambda: rng.bytes(int(rng.integers(0, 200))), lambda: json.dumps(int(rng.integers(-9, 9))).encode(),
              lambda: json.dumps({"images": [one], "prompts": [int(rng.integers(9))]}).encode(),
              lambda: json.dumps({"images": one, "prompts": prompts}).encode(),
              lambda: json.dumps({"images": [one], "prompts": prompts, "metadata": [[1, 2]]}).encode(),
              lambda: json.dumps({"images": [one[: int(rng.integers(1, len(one) // 2))]], "prompts": prompts,
                                  "metadata": records}).encode(),
              lambda: json.dumps({"images": [one], "prompts": prompts,
                                  "metadata": [{"include": [{"class": 3}]}]}).encode(),
              lambda: json.dumps({"images": [], "prompts": []}).encode()]
    with httpx.Client(timeout=30) as client:
        for i in range(1000):
            body = shapes[i % len(shapes)]()
            r = client.post(f"{server}/score", content=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert 400 <= r.status_code < 500, (i, r.status_code, body[:200])
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_concurrent_clients(server, token_file):
    images, prompts, records = batch(3)
    expected = build_reward("shapeeval")(images, prompts, records).scores
    client = RemoteReward(server, token_file)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client(images, prompts, records).scores, range(8)))
    assert all(torch.equal(r, expected) for r in results)


def test_client_retries_then_reports(token_file, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise httpx.ConnectError("refused")

    monkeypatch.setattr(httpx, "post", failing)
    images, prompts, records = batch(1)
    with pytest.raises(UserError, match="cannot be reached"):
        RemoteReward("http://127.0.0.1:9", token_file, retries=2, backoff=0.0)(images, prompts, records)
    assert len(calls) == 3


def test_a_huge_png_is_413_from_its_header(server):
    from PIL import Image

    images, prompts, records = batch(1)
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 Mpx, ~50 kB; PIL refuses it as a bomb
    start = time.perf_counter()
    r = post(server, {"images": [base64.b64encode(buf.getvalue()).decode()], "prompts": prompts, "metadata": records})
    assert r.status_code == 413 and r.json()["detail"] == "item 0: the image is 20000x20000, over 256 px."
    assert time.perf_counter() - start < 2
    at_cap = np.zeros((256, 256, 3), np.uint8)
    assert post(server, {"images": [png(at_cap)], "prompts": prompts, "metadata": records}).status_code == 200


def test_deeply_nested_json_is_422(server):
    r = post(server, None, raw=b"[" * 100_000)
    assert r.status_code == 422 and r.json()["detail"] == "the body is not JSON (nested too deeply)."
    r = post(server, None, raw=b'{"images": ' + b"[" * 100_000)
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]


BAD_RECORDS = [  # each scored 200 with full marks before metadata was validated
    ({"tag": "counting", "include": [{"class": "circle", "count": -1}], "prompt": "a photo of a circle"},
     "include[0]: 'count' must be an integer >= 1."),
    ({"tag": "lots", "include": [], "prompt": "a photo of a circle"}, "tag 'lots' is not one of GenEval's tags"),
    ({"tag": "colors", "include": ["circle"], "prompt": "a photo of a circle"}, "include[0] must be a JSON object."),
]


@pytest.mark.parametrize("record, reason", BAD_RECORDS)
def test_schema_invalid_metadata_is_422_with_data_checks_sentence(server, tmp_path, capsys, record, reason):
    from udm_grpo.cli import main

    images, prompts, _ = batch(1)
    r = post(server, {"images": [png(images[0])], "prompts": prompts, "metadata": [record]})
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail.startswith(f"metadata[0]: {reason}"), detail
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main(["data", "check", str(path), "--task", "geneval"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].endswith(f"{path}:1: {detail.removeprefix('metadata[0]: ')}"), (err, detail)


def serve(capsys, *args) -> tuple[int, list[str]]:
    from udm_grpo.cli import main

    code = main(["serve-reward", "--reward", "shapeeval", *args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("flag", ["--max-batch", "--max-side"])
def test_serve_reward_refuses_zero_limits(token_file, capsys, flag):
    from udm_grpo.cli import main

    assert main(["serve-reward", "--reward", "shapeeval", "--token-file", token_file, flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_serve_reward_checks_host_port_and_token_before_building_the_reward(token_file, tmp_path, capsys,
                                                                             monkeypatch):
    import udm_grpo.rewards as rewards

    monkeypatch.setattr(rewards, "build_reward", lambda *a, **k: pytest.fail("the reward was built"))
    code, err = serve(capsys, "--token-file", token_file, "--host", "no.such.host.invalid")
    assert code == 2 and len(err) == 1 and "--host no.such.host.invalid: cannot be resolved (" in err[0], err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = serve(capsys, "--token-file", token_file, "--port", str(port))
    assert code == 2 and err == [f"udm-grpo serve-reward: error: --port {port} on 127.0.0.1 is in use."]
    code, err = serve(capsys, "--token-file", str(tmp_path))
    assert code == 2 and len(err) == 1 and f"token file {tmp_path} is a folder" in err[0]
