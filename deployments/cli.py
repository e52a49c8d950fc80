"""The ``memrouter`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memrouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo on the embedded tiny checkpoints (CPU)")
    demo.add_argument("--local", action="store_true", help="the cache alone, in this process, no Ray")
    demo.add_argument("--out", default="memrouter-demo-out", help="folder for images and plots")
    demo.add_argument("--requests", type=int, default=24, help="number of requests to send")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from deployments import demo_run

        if args.local:
            return demo_run.run_local_demo(out_dir=args.out, n_requests=args.requests)
        return demo_run.run_demo(out_dir=args.out, n_requests=args.requests)
    return 2


if __name__ == "__main__":
    sys.exit(main())
