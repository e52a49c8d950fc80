"""The ``memrouter`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memrouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo on the embedded tiny checkpoints (CPU)")
    demo.add_argument("--local", action="store_true", help="the cache alone, in this process, no Ray")
    demo.add_argument("--out", default="memrouter-demo-out", help="folder for images and plots")
    demo.add_argument("--requests", type=int, default=24, help="number of requests to send")
    demo.add_argument("--config", type=Path, default=None,
                      help="serve config whose app args the demo uses (default: the checkout's serve_config.yaml)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.requests < 1:
            parser.error(f"demo --requests must be >= 1, got {args.requests}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            parser.error(f"demo --out {args.out}: exists and is not a folder")
        from deployments import demo_run

        try:
            config = demo_run.find_config(args.config)
            demo_run.load_app_args(config)  # a config without a memrouter app: one line, before anything starts
        except (OSError, ValueError) as exc:  # what find_config and load_app_args raise
            print(f"memrouter demo: {exc}", file=sys.stderr)
            return 2
        try:
            if args.local:
                return demo_run.run_local_demo(out_dir=args.out, n_requests=args.requests, config_path=config)
            return demo_run.run_demo(out_dir=args.out, n_requests=args.requests, config_path=config)
        except OSError as exc:  # a full disk or a read-only folder while building or writing: one line
            print(f"memrouter demo: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
