"""The ``hf-hybrid`` command.

    hf-hybrid inspect CONFIG_OR_DIR [--context 4096,32768,131072] [--dtype-bytes 2] [--plot out.png] [--json]
    hf-hybrid import SRC DST [--dtype bfloat16] [--base-model ORG/NAME]
    hf-hybrid export SRC DST [--to FAMILY] [--dtype bfloat16]
    hf-hybrid card DIR [--force]

``CONFIG_OR_DIR`` is a checkpoint directory (hf_hybrid, or a Llama / Qwen2 / Qwen3 / Mistral one: its cost once
imported), a ``config.json``, a YAML file of ``HybridConfig`` arguments (or a recipe YAML with a ``model:`` section,
optionally naming a ``preset:``), or a preset name from ``hf_hybrid.presets`` (``tiny-hybrid``, ``qwen3-next-like``...).

Plugins: a module that defines ``register_cli(subparsers)`` adds its subcommands; the parser it adds must set
``func`` (``parser.set_defaults(func=handler)``, ``handler(args) -> int | None``). Looked up, in order:
``hf_hybrid.moe_training`` (``expert-load``), ``hf_hybrid.convert.upcycle`` (``upcycle``), ``hf_hybrid.convert.dsa``
(``convert-dsa``), ``hf_hybrid.convert.hybridize`` (``hybridize``); a module that does not exist yet is skipped.

User errors (a bad path, an unsupported checkpoint, an invalid config) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLUGIN_MODULES = (
    "hf_hybrid.moe_training", "hf_hybrid.convert.upcycle", "hf_hybrid.convert.dsa", "hf_hybrid.convert.hybridize",
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# Raised by the library for bad inputs (paths, configs, unsupported checkpoints): reported without a traceback.
USER_ERRORS = (
    CLIError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CLIError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def config_kwargs_from_mapping(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``HybridConfig`` kwargs from a YAML/JSON mapping: plain kwargs, or a recipe's ``model:`` section; a ``preset``
    key starts from that preset and the other keys override it."""
    from .presets import preset_kwargs

    if not isinstance(data, dict):
        raise CLIError(f"{source}: expected a mapping of HybridConfig arguments")
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    data = dict(data)
    preset = data.pop("preset", None)
    kwargs = preset_kwargs(preset) if preset else {}
    if "mixer_types" in data:
        kwargs.pop("mixer_pattern", None)
    if "mlp_types" in data:
        kwargs.pop("mlp_pattern", None)
        kwargs.pop("first_k_dense", None)
    kwargs.update(data)
    return kwargs


def resolve_config(spec: str):
    """A ``HybridConfig`` from a directory, config.json, YAML file or preset name (see the module docstring)."""
    from .configuration_hybrid import HybridConfig
    from .presets import PRESETS

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CLIError(f"{spec} has no config.json")
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return HybridConfig(**config_kwargs_from_mapping(_read_yaml(path), source=str(path)))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CLIError(f"{path}: not valid JSON ({err})") from None
        model_type = data.get("model_type", "hf_hybrid") if isinstance(data, dict) else None
        if model_type == "hf_hybrid":
            return HybridConfig.from_dict(data)
        from .convert.import_dense import SUPPORTED, dense_to_hybrid_config
        from .convert.native import FAMILY_MODULES, TEXT_DECODER_OF, native_to_hybrid_config

        if model_type in SUPPORTED and path.name == "config.json":
            return dense_to_hybrid_config(path.parent)
        if model_type in FAMILY_MODULES or model_type in TEXT_DECODER_OF:
            return native_to_hybrid_config(path.parent if path.name == "config.json" else path)
        raise CLIError(
            f"{path}: model_type={model_type!r} is neither hf_hybrid nor importable "
            f"({', '.join([*SUPPORTED, *FAMILY_MODULES])})"
        )
    if spec in PRESETS:
        from .presets import preset_config

        return preset_config(spec)
    raise CLIError(f"{spec!r} is not a directory, config file or preset; presets: {', '.join(PRESETS)}")


def _parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(_expand_k(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--context {text!r}: expected comma-separated token counts, e.g. 4096,32K"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--context {text!r}: token counts must be positive")
    return values


def _expand_k(value: str) -> int:
    value = value.strip().upper()
    for suffix, scale in (("K", 1024), ("M", 1024 * 1024)):
        if value.endswith(suffix):
            return int(value[:-1]) * scale
    return int(value)


# ---- subcommands -----------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from .cost import estimate_cost

    config = resolve_config(args.target)
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


def cmd_import(args: argparse.Namespace) -> int:
    from .convert.import_dense import SUPPORTED, import_dense

    config_path = Path(args.src) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
    if model_type in SUPPORTED or model_type is None:
        dst = import_dense(args.src, args.dst, dtype=args.dtype, base_model=args.base_model)
    else:
        from .convert.native import import_native

        import_native(args.src, args.dst, dtype=args.dtype, base_model=args.base_model)
        dst = args.dst
    print(f"imported {args.src} -> {dst}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .convert.native import export_native

    native = export_native(args.src, args.dst, to=args.to, dtype=args.dtype)
    print(f"exported {args.src} -> {args.dst} ({native.config.model_type})")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .card import write_model_card

    directory = Path(args.dir)
    if not directory.is_dir():
        raise CLIError(f"{directory} is not a directory")
    readme = directory / "README.md"
    if readme.exists() and not args.force:
        raise CLIError(f"{readme} exists; pass --force to replace it")
    config = resolve_config(str(directory))
    metrics = json.loads(args.metrics) if args.metrics else None
    path = write_model_card(config, directory, overwrite=args.force, metrics=metrics, model_id=args.model_id)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-hybrid", description="Tools for hf_hybrid hybrid decoder models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
        type=_parse_contexts,
        default=(4096, 32768, 131072),
        help="comma-separated context lengths (default 4096,32768,131072; 32K style allowed)",
    )
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element (default 2: bf16)")
    p.add_argument("--plot", metavar="PNG", help="write cache memory vs context per layer type to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "import",
        help="import a Llama/Qwen2/Qwen3/Mistral or native-family (qwen3_moe, deepseek_v3, ...) checkpoint",
        description="Import a checkpoint saved by transformers (safetensors only) as an "
        "hf_hybrid checkpoint with identical logits.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="new output directory (must not exist or be empty)")
    p.add_argument(
        "--dtype",
        default=None,
        help="cast weights (float32, bfloat16, float16); default: the source config's dtype, else as stored",
    )
    p.add_argument("--base-model", default=None, help="name recorded as base model (e.g. the Hub id of SRC)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="export an hf_hybrid checkpoint to a native transformers family",
        description="Write an hf_hybrid checkpoint as a native transformers family (qwen3_moe, deepseek_v3, ...) "
        "with identical logits, loadable and servable without hf_hybrid. Refuses, writing nothing, when a layer "
        "or option has no counterpart in the family.",
    )
    p.add_argument("src", metavar="SRC", help="hf_hybrid checkpoint directory")
    p.add_argument("dst", metavar="DST", help="new output directory (must not exist or be empty)")
    p.add_argument("--to", default=None, metavar="FAMILY", help="target model_type (default: the family that fits)")
    p.add_argument("--dtype", default=None, help="cast weights (float32, bfloat16, float16); default: as saved")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("card", help="write README.md (model card) for a checkpoint directory")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing README.md")
    p.add_argument(
        "--metrics", default=None, help="JSON object of metrics to show, e.g. '{\"eval_ppl\": 12.3}'"
    )
    p.add_argument("--model-id", default=None, help="name used in the loading example (Hub repo id)")
    p.set_defaults(func=cmd_card)

    for module_name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # that plugin is not written yet
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"hf-hybrid {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
