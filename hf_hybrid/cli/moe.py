"""``hf-hybrid expert-load``: a per-layer MoE expert-load heatmap (``hf_hybrid.moe_training``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import CLIError, add_trust_flag


def cmd_expert_load(args: argparse.Namespace) -> int:
    """``hf-hybrid expert-load``: a heatmap from a load log (``--log``) or from running ``--model`` on
    ``--text``."""
    import torch

    from ..moe_training import load_metrics, measure_expert_load, plot_expert_load_heatmap, read_load_log

    if args.log:
        layers, load = read_load_log(args.log, step=args.step)
        source = Path(args.log).name
    else:
        if not args.text:
            raise CLIError("--model needs --text FILE to run through the model")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hf_hybrid  # noqa: F401  (registers the Auto classes)

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        text = Path(args.text).read_text()
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][
            : args.max_tokens
        ]
        totals = measure_expert_load(model, ids, seq_len=args.seq_len)
        if not totals:
            raise CLIError(f"{args.model} has no MoE layers")
        layers = sorted(totals)
        load = [(totals[i] / totals[i].sum().clamp_min(1)).tolist() for i in layers]
        source = f"{Path(args.model).name} on {Path(args.text).name} ({ids.numel()} tokens)"
        if args.save_json:
            Path(args.save_json).write_text(json.dumps({"layers": layers, "load": load}))
    path = plot_expert_load_heatmap(
        load, args.output, title=args.title or f"expert load / mean: {source}", layer_ids=layers
    )
    for i, row in zip(layers, load):
        m = load_metrics(torch.tensor(row))
        print(
            f"layer {i:3d}: max/mean "
            f"{m['load_max_over_mean']:.2f}  cv {m['load_cv']:.3f}  min/mean {m['load_min']:.2f}"
        )
    print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    """Add ``expert-load`` to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "expert-load",
        help="heatmap of MoE expert load per layer",
        description="Draw a per-layer expert-load heatmap from a JSON/JSONL load log (as written by "
        "ExpertLoadLoggingCallback) or by running a saved model directory on a text file.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", help="JSON or JSONL file of loads")
    src.add_argument("--model", help="saved hf_hybrid model directory (with its tokenizer)")
    p.add_argument("--text", help="text file to run through --model")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of --text to use (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window length for --model (default 512)")
    p.add_argument(
        "--step", type=int, default=None, help="with --log JSONL: the record at this training step"
    )
    p.add_argument("--save-json", default=None, help="with --model: also write the measured loads here")
    p.add_argument("--title", default=None)
    p.add_argument("-o", "--output", default="expert_load.png", help="PNG path (default expert_load.png)")
    add_trust_flag(p)
    p.set_defaults(func=cmd_expert_load)
