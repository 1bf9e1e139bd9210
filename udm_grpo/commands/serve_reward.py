"""`udm-grpo serve-reward`: serve a reward over HTTP (see `udm_grpo.rewards.service`)."""

from __future__ import annotations

import argparse

from .score import parse_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", required=True, help="reward name (reward.name)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a reward keyword argument")
    p.add_argument("--token-file", required=True, help="file holding the shared token (>= 16 characters)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-batch", type=int, default=64, help="most images per request")
    p.add_argument("--max-side", type=int, default=2048, help="longest image side accepted")


def run(args) -> int:
    from ..errors import UserError
    from ..rewards import build_reward
    from ..rewards.service import create_app, read_token

    if not 1024 <= args.port <= 65535:
        raise UserError(f"--port must be in 1024-65535 (no privileged ports), got {args.port}.")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve-reward needs the 'serve' extra: pip install 'udm-grpo[serve]'.") from None
    app = create_app(build_reward(args.reward, parse_params(args.param)), args.reward, read_token(args.token_file),
                     args.max_batch, args.max_side)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
