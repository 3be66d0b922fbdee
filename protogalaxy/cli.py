"""The ``protogalaxy`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from protogalaxy import __version__


def _verify_receipt(args: argparse.Namespace) -> int:
    from protogalaxy.crypto import Receipt, VerificationError, VerifyKey, verify_receipt

    try:
        key = VerifyKey.from_bytes(bytes.fromhex(args.global_key))
        receipt = Receipt.from_json(Path(args.receipt).read_bytes())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        verify_receipt(receipt, global_key=key, round=args.round)
    except VerificationError as exc:
        print(f"INVALID: {type(exc).__name__}: {exc}")
        return 1
    c = receipt.commitment
    print(
        f"OK: client {c.client_id} galaxy {c.galaxy_id} round {c.round} is included in "
        f"global root {receipt.head.head.root.hex()}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protogalaxy",
        description="Hierarchical, Byzantine-robust, verifiable federated learning.",
    )
    parser.add_argument(
        "--version", action="version", version=f"protogalaxy {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "verify-receipt", help="verify a client's two-level receipt (JSON)"
    )
    p.add_argument("receipt", help="path to the receipt JSON")
    p.add_argument(
        "--global-key", required=True, help="global aggregator public key, hex"
    )
    p.add_argument(
        "--round", type=int, default=None, help="the round the receipt must be for"
    )
    p.set_defaults(func=_verify_receipt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
