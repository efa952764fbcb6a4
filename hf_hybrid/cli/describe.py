"""``hf-hybrid inspect`` (the cost of a design) and ``hf-hybrid card`` (a checkpoint's model card)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import CLIError, add_trust_flag, parse_contexts, resolve_config


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..cost import estimate_cost

    config = resolve_config(args.target, trust_remote_code=args.trust_remote_code)
    report = estimate_cost(config, contexts=args.context, dtype_bytes=args.dtype_bytes)
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print(report.to_json())
    else:
        print(report.to_text())
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from ..card import write_model_card

    directory = Path(args.dir)
    if not directory.is_dir():
        raise CLIError(f"{directory} is not a directory")
    readme = directory / "README.md"
    if readme.exists() and not args.force:
        raise CLIError(f"{readme} exists; pass --force to replace it")
    config = resolve_config(str(directory), trust_remote_code=args.trust_remote_code)
    metrics = json.loads(args.metrics) if args.metrics else None
    path = write_model_card(config, directory, overwrite=args.force, metrics=metrics, model_id=args.model_id)
    print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    """Add ``inspect`` and ``card`` to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "inspect",
        help="parameters, cache bytes and FLOPs of a design",
        description="Cost of a design: total and active parameters, cache/state bytes per token and "
        "per sequence, FLOPs per token.",
    )
    p.add_argument(
        "target", metavar="CONFIG_OR_DIR", help="checkpoint dir, config.json, YAML, or a preset name"
    )
    p.add_argument(
        "--context",
        type=parse_contexts,
        default=(4096, 32768, 131072),
        help="comma-separated context lengths (default 4096,32768,131072; 32K style allowed)",
    )
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element (default 2: bf16)")
    p.add_argument("--plot", metavar="PNG", help="write cache memory vs context per layer type to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_trust_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("card", help="write README.md (model card) for a checkpoint directory")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing README.md")
    p.add_argument(
        "--metrics", default=None, help="JSON object of metrics to show, e.g. '{\"eval_ppl\": 12.3}'"
    )
    p.add_argument("--model-id", default=None, help="name used in the loading example (Hub repo id)")
    add_trust_flag(p)
    p.set_defaults(func=cmd_card)
