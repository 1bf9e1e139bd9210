"""A reward behind HTTP, for rewards whose models live on other GPUs or machines (extra `serve`).

Protocol (JSON only; nothing is unpickled or evaluated):

    POST /v1/score  Authorization: Bearer TOKEN   (also at /score, the unversioned alias)
                    {"images": [base64 PNG or JPEG, one size], "prompts": [str], "metadata": [object | null]}
               200  {"scores": [float], "values": {name: [float]}}
    GET  /health    {"reward": NAME}

Bad requests are always 4xx with one sentence in "detail": 401 a missing or wrong token; 413 a body over
`max_body` bytes, more than `max_batch` images or an image side over `max_side` (read from the image header,
before decoding pixels); 422 anything malformed (JSON nested too deeply included), metadata records that the
reward's `check_records` hook refuses (checked before the reward is called: for ShapeEval and GenEval the
rules of `udm-grpo data check`, e.g. "metadata[3]: include[0]: 'count' must be an integer >= 1."), or what
the reward refuses. `RemoteReward` is the client (reward name `remote`): PNG-encoded images, a
timeout, retries with exponential backoff on connection errors and 5xx only, non-finite scores refused.
"""

import base64
import binascii
import hmac
import io
import json
import math
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import RewardOutput, check_batch, to_uint8_images


def read_token(path: str | Path) -> str:
    from ..textfiles import read_text

    token = read_text(path, "token file").strip()
    if len(token) < 16:
        raise UserError(f"token file {path} must hold a token of at least 16 characters.")
    return token


class BadRequest(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_request(body: bytes, max_batch: int, max_side: int) -> tuple[np.ndarray, list[str], list]:
    """(uint8 images [B, H, W, 3], prompts, metadata) of a /score body; BadRequest otherwise."""
    from ..images import ImageTooLarge, decode_image

    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest(422, "the body is not JSON (nested too deeply).") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(422, "the body is not JSON.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("prompts"), list):
        raise BadRequest(422, "the body must be an object with lists 'images' and 'prompts'.")
    images, prompts = data["images"], data["prompts"]
    metadata = data.get("metadata", [None] * len(prompts))
    if not images or len(images) > max_batch:
        raise BadRequest(413 if images else 422, f"send 1 to {max_batch} images, got {len(images)}.")
    if not isinstance(metadata, list) or not len(images) == len(prompts) == len(metadata):
        raise BadRequest(422, "'images', 'prompts' and 'metadata' must be lists of the same length.")
    for i, (p, m) in enumerate(zip(prompts, metadata)):
        if not isinstance(p, str) or not (m is None or isinstance(m, dict)):
            raise BadRequest(422, f"item {i}: the prompt must be a string and the metadata an object or null.")
    arrays = []
    for i, item in enumerate(images):
        unreadable = BadRequest(422, f"item {i}: not a base64 PNG or JPEG image.")
        try:
            raw = base64.b64decode(item, validate=True)
        except (TypeError, binascii.Error, ValueError):
            raise unreadable from None
        try:
            arrays.append(decode_image(raw, max_side, f"item {i}", formats=("PNG", "JPEG")))
        except ImageTooLarge as e:
            size = f"{e.size[0]}x{e.size[1]}" if e.size else "too large"
            raise BadRequest(413, f"item {i}: the image is {size}, over {max_side} px.") from None
        except UserError:
            raise unreadable from None
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest(422, "all images of a request must have one size.")
    return np.stack(arrays), prompts, metadata


def check_request(body: bytes, reward, max_batch: int, max_side: int) -> tuple[np.ndarray, list[str], list]:
    """`decode_request`, then the reward's `check_records` hook on the metadata (see `records_problem`); any
    failure is a BadRequest, whatever a malformed body makes the decoders raise."""
    from . import records_problem

    try:
        images, prompts, metadata = decode_request(body, max_batch, max_side)
        bad = records_problem(reward, metadata)
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(422, f"the request cannot be read ({type(e).__name__}).") from None
    if bad:
        raise BadRequest(422, f"metadata[{bad[0]}]: {bad[1]}")
    return images, prompts, metadata


def create_app(reward, name: str, token: str, max_batch: int = 64, max_side: int = 2048,
               max_body: int = 64 * 2**20):
    """A FastAPI app serving `reward` (one request scores at a time)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app, lock = FastAPI(title=f"udm-grpo reward service: {name}"), threading.Lock()

    @app.get("/health")
    def health() -> dict:
        return {"reward": name}

    @app.post("/v1/score")
    @app.post("/score")
    async def score(request: Request):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"detail": "missing or wrong token."}, status_code=401)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return JSONResponse({"detail": f"the body is over {max_body} bytes."}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return JSONResponse({"detail": f"the body is over {max_body} bytes."}, status_code=413)
        try:
            images, prompts, metadata = check_request(body, reward, max_batch, max_side)
            with lock:
                out = reward(images, prompts, metadata)
        except BadRequest as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        except UserError as e:
            return JSONResponse({"detail": (str(e) or type(e).__name__).splitlines()[0]}, status_code=422)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return JSONResponse({"detail": f"reward '{name}' cannot score this request: {first}"}, status_code=422)
        return {"scores": out.scores.tolist(), "values": {k: v.tolist() for k, v in out.values.items()}}

    return app


class RemoteReward:
    """Client of a reward service; see the module docstring."""

    name = "remote"

    def __init__(self, url: str, token_file: str, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0):
        self.url, self.token = url.rstrip("/"), read_token(token_file)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)

    def __call__(self, images, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        import httpx
        from PIL import Image

        images = to_uint8_images(images)
        check_batch(images, prompts, metadata)
        encoded = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        body = {"images": encoded, "prompts": list(prompts),
                "metadata": list(metadata) if metadata is not None else [None] * len(prompts)}
        headers = {"Authorization": f"Bearer {self.token}"}
        for attempt in range(self.retries + 1):
            try:
                response = httpx.post(f"{self.url}/v1/score", json=body, headers=headers, timeout=self.timeout)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise UserError(f"reward service {self.url} cannot be reached ({type(e).__name__}).") from None
            else:
                if response.status_code < 500:
                    break
                if attempt == self.retries:
                    raise UserError(f"reward service {self.url} failed ({response.status_code}).")
            time.sleep(self.backoff * 2**attempt)
        if response.status_code != 200:
            raise UserError(f"reward service {self.url} refused the request ({response.status_code}): "
                            f"{response.json().get('detail', '')}")
        data = response.json()
        scores = [float(s) for s in data["scores"]]
        if len(scores) != len(prompts) or not all(math.isfinite(s) for s in scores):
            raise UserError(f"reward service {self.url} returned {len(scores)} scores for {len(prompts)} images, "
                            "or non-finite ones.")
        return RewardOutput(scores, data.get("values", {}))
