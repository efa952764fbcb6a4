"""The ``hf-hybrid`` command.

    hf-hybrid inspect CONFIG_OR_DIR [--context 4096,32768,131072] [--dtype-bytes 2] [--plot out.png] [--json]
    hf-hybrid card DIR [--force]
    hf-hybrid import SRC DST [--dtype bfloat16] [--base-model ORG/NAME]
    hf-hybrid export SRC DST [--to FAMILY] [--dtype bfloat16]
    hf-hybrid upcycle SRC DST --num-experts E --top-k K [...]        (hf_hybrid.convert.upcycle)
    hf-hybrid convert-dsa SRC DST --index-topk K [...]               (hf_hybrid.convert.dsa)
    hf-hybrid hybridize SRC DST --pattern "3:1 gated_deltanet:attention" [...]  (hf_hybrid.convert.hybridize)
    hf-hybrid mla SRC DST (--lossless | --kv-lora-rank R --rope-dims DR [...])  (hf_hybrid.convert.mla)
    hf-hybrid expert-load (--log LOADS.jsonl | --model DIR --text FILE) [-o out.png]  (hf_hybrid.moe_training)

``CONFIG_OR_DIR`` is a checkpoint directory (hf_hybrid, or a Llama / Qwen2 / Qwen3 / Mistral one: its cost
once imported), a ``config.json``, a YAML file of ``HybridConfig`` arguments (or a recipe YAML with a
``model:`` section, optionally naming a ``preset:``), or a preset name from ``hf_hybrid.presets``
(``tiny-hybrid``, ``qwen3-next-like``...).

This package is the only place that parses arguments: the library takes keyword arguments and raises
``ValueError`` & co. for bad inputs. One module per group of subcommands, each with ``add_parsers(sub)``
and its handlers (``handler(args) -> int``, set as ``func``): ``describe`` (inspect, card), ``convert``
(import, export, upcycle, convert-dsa, hybridize, mla), ``moe`` (expert-load); ``_common`` holds the user
errors, config resolution and the shared argument types. A new subcommand is a handler plus its parser in one
of them (or a new module that :func:`build_parser` calls).

User errors (a bad path, an unsupported checkpoint, an invalid config) print one line and exit with status 2.

Building the parser imports no torch or transformers (handlers import what they need when they run), and the
``hf-hybrid`` script (``hf_hybrid_cli.py``) parses the command line before ``import hf_hybrid`` registers the
model family, so ``--help`` and argument errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import convert, describe, moe
from ._common import (
    USER_ERRORS,
    CLIError,
    config_kwargs_from_mapping,
    resolve_config,
    unreadable_weights_error,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-hybrid", description="Tools for hf_hybrid hybrid decoder models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="errors in full (e.g. every native family's reasons)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    describe.add_parsers(sub)
    convert.add_parsers(sub)
    moe.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the handler of parsed arguments. A user error is reported in short lines on stderr (what was
    refused, why, what to do; each at most ``MAX_LINE`` characters; the rest with ``--verbose``), status 2."""
    try:
        try:
            code = _call(args)
        except Exception as err:
            user_error = unreadable_weights_error(args, err)  # a truncated or corrupted safetensors file
            if user_error is None:
                raise
            raise user_error from err
    except USER_ERRORS as err:
        if args.debug:
            raise
        print("\n".join(error_lines(args.command, err, verbose=args.verbose)), file=sys.stderr)
        return 2
    return int(code or 0)


def _call(args: argparse.Namespace) -> int | None:
    """The handler, inside the ``--trust-remote-code`` opt-in when the subcommand has the flag and it was
    given (every library call that loads a checkpoint then may import a kind's recorded module)."""
    if not getattr(args, "trust_remote_code", False):
        return args.func(args)
    from ..registry import trust_remote_code

    with trust_remote_code(True):
        return args.func(args)


MAX_LINE = 160


def error_lines(command: str, err: BaseException, *, verbose: bool = False) -> list[str]:
    """The lines ``hf-hybrid COMMAND`` prints for a user error: the message (first line prefixed) wrapped at
    ``MAX_LINE`` characters, and with ``--verbose`` the error's ``details`` too (e.g. every native family's
    reasons)."""
    import textwrap

    lines = str(err).splitlines() or [type(err).__name__]
    lines[0] = f"hf-hybrid {command}: error: {lines[0]}"
    if verbose:
        lines += [f"  {d}" for d in getattr(err, "details", None) or []]
    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        out += textwrap.wrap(line, MAX_LINE, subsequent_indent=indent + "  ", break_on_hyphens=False) or [""]
    return out


__all__ = [
    "CLIError",
    "USER_ERRORS",
    "build_parser",
    "config_kwargs_from_mapping",
    "error_lines",
    "main",
    "resolve_config",
    "run",
]
