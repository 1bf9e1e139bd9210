"""`udm-grpo serve-reward`: serve a reward over HTTP (see `udm_grpo.rewards.service`)."""

from __future__ import annotations

import argparse

from .common import positive_int
from .score import parse_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", required=True, help="reward name (reward.name)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a reward keyword argument")
    p.add_argument("--token-file", required=True, help="file holding the shared token (>= 16 characters)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-batch", type=positive_int, default=64, help="most images per request")
    p.add_argument("--max-side", type=positive_int, default=2048, help="longest image side accepted")


def check_address(host: str, port: int) -> None:
    """UserError (one sentence) unless `host` resolves and `port` can be bound on its first address."""
    import errno
    import socket

    from ..errors import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"--host {host}: cannot be resolved ({reason}).") from None
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port} on {host} is in use.") from None
        raise UserError(f"--host {host}: cannot bind port {port} there ({e.strerror or type(e).__name__}).") from None


def run(args) -> int:
    from ..errors import UserError
    from ..rewards import build_reward, check_reward
    from ..rewards.service import create_app, read_token

    if not 1024 <= args.port <= 65535:
        raise UserError(f"--port must be in 1024-65535 (no privileged ports), got {args.port}.")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve-reward needs the 'serve' extra: pip install 'udm-grpo[serve]'.") from None
    token, params = read_token(args.token_file), parse_params(args.param)
    check_reward(args.reward, params)
    check_address(args.host, args.port)
    app = create_app(build_reward(args.reward, params), args.reward, token, args.max_batch, args.max_side)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
