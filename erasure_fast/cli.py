"""Command line: ``erasure-fast demo | backends``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="erasure-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="DLA + erasure of a GELU-4L-shaped model on a deterministic batch")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--pos", type=int, default=128)
    demo.add_argument("--top", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"])
    sub.add_parser("backends", help="list the backends available here and why others are not")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.batch < 1 or not 2 <= args.pos <= 1024:
            parser.error("--batch must be >= 1 and --pos in [2, 1024] (GELU-4L's n_ctx)")
        from .demo import run_demo

        run_demo(batch=args.batch, pos=args.pos, backend=args.backend, top=args.top, seed=args.seed)
    elif args.command == "backends":
        from . import backends

        for name, info in backends().items():
            print(f"{name:7s} {'available' if info.available else 'unavailable'}: {info.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
