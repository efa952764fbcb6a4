"""What every ``hf-hybrid`` subcommand shares: user errors, config resolution, argument types.

A handler raises one of ``USER_ERRORS`` for a bad input; ``hf_hybrid.cli.main`` prints it as one line and
exits with status 2. Library parsing helpers raise ``ValueError``; the argument types here turn that into
argparse's own error (usage line, status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# Raised by the library for bad inputs (paths, configs, unsupported checkpoints): reported without a
# traceback.
USER_ERRORS = (
    CLIError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def unreadable_weights_error(args: argparse.Namespace, err: BaseException) -> CLIError | None:
    """A ``CLIError`` naming the weight file behind a safetensors read error (a truncated download, a
    corrupted copy), else ``None``: the file is found by opening each ``*.safetensors`` file of the
    command's input directories."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return None
    if not isinstance(err, SafetensorError):
        return None
    dirs = [Path(p) for p in (getattr(args, a, None) for a in ("src", "model", "dir", "target")) if p]
    for directory in (d for d in dirs if d.is_dir()):
        for file in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as bad:
                reason = str(bad).splitlines()[0].rsplit(": ", 1)[-1][:60]
                return CLIError(f"{file} is truncated or corrupted ({reason}); save or download it again")
    reason = str(err).splitlines()[0].rsplit(": ", 1)[-1][:60]
    return CLIError(f"a weight file is truncated or corrupted ({reason}); save or download it again")


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CLIError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def config_kwargs_from_mapping(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``HybridConfig`` kwargs from a YAML/JSON mapping: plain kwargs, or a recipe's ``model:`` section; a
    ``preset`` key starts from that preset and the other keys override it."""
    from ..presets import preset_kwargs

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


def build_config(kwargs: dict[str, Any], *, source: str):
    """``HybridConfig(**kwargs)``; a value of the wrong type (``hidden_size: sixty``) is a ``CLIError`` naming
    the field, the value and the type its default has, not a TypeError from deep inside the validation."""
    from ..configuration_hybrid import HybridConfig

    try:
        return HybridConfig(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ValueError) and "Validation error" not in str(err):
            raise  # our own validation: already names the field, the value and what is allowed
        defaults = HybridConfig()
        for key, value in kwargs.items():
            default = getattr(defaults, key, None)
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and (isinstance(value, (str, bool)) or value is None):
                raise CLIError(
                    f"{source}: {key}={value!r} must be a number like its default {default!r}"
                ) from None
        raise CLIError(
            f"{source}: not valid HybridConfig arguments ({str(err).splitlines()[0][:120]})"
        ) from None


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code`` for a subcommand that loads a checkpoint directory; :func:`hf_hybrid.cli.run`
    enters :func:`hf_hybrid.registry.trust_remote_code` around the handler when it is given."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a checkpoint whose layers use a kind defined outside hf_hybrid import the module it "
        "recorded for that kind (this runs that module's code)",
    )


def resolve_config(spec: str, *, trust_remote_code: bool = False):
    """A ``HybridConfig`` from a directory, config.json, YAML file or preset name (see ``hf_hybrid.cli``).
    ``trust_remote_code``: a checkpoint whose layers use a kind defined outside hf_hybrid may import the
    module it recorded for that kind."""
    from ..configuration_hybrid import HybridConfig
    from ..presets import PRESETS

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CLIError(f"{spec} has no config.json")
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return build_config(
                config_kwargs_from_mapping(_read_yaml(path), source=str(path)), source=str(path)
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CLIError(f"{path}: not valid JSON ({err})") from None
        model_type = data.get("model_type", "hf_hybrid") if isinstance(data, dict) else None
        if model_type == "hf_hybrid":
            return HybridConfig.from_dict(data, trust_remote_code=trust_remote_code)
        from ..convert.import_dense import SUPPORTED, dense_to_hybrid_config
        from ..convert.native import (
            FAMILY_MODULES,
            NEEDS_MISSING_LAYER,
            TEXT_DECODER_OF,
            native_to_hybrid_config,
        )

        if model_type in SUPPORTED and path.name == "config.json":
            return dense_to_hybrid_config(path.parent)
        if model_type in FAMILY_MODULES or model_type in TEXT_DECODER_OF or model_type in NEEDS_MISSING_LAYER:
            return native_to_hybrid_config(path.parent if path.name == "config.json" else path)
        raise CLIError(
            f"{path}: model_type={model_type!r} is neither hf_hybrid nor importable "
            f"({', '.join(dict.fromkeys([*SUPPORTED, *FAMILY_MODULES]))})"
        )
    if spec in PRESETS:
        from ..presets import preset_config

        return preset_config(spec)
    raise CLIError(
        f"{spec!r} is not a directory, config file or preset (e.g. tiny-hybrid; all {len(PRESETS)}: "
        "hf_hybrid.presets.PRESETS)"
    )


def parse_contexts(text: str) -> tuple[int, ...]:
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


def options_kwargs(
    options_cls: type, args: argparse.Namespace, *, omit: Iterable[str] = (), **values: Any
) -> dict[str, Any]:
    """Keyword arguments for an options dataclass (``DSAOptions``, ...) from a subcommand's parsed ``args``:
    each field from the argument of the same name, or from ``values`` where the command line spells it
    otherwise (``renormalize=not args.no_renormalize``); ``omit``: fields the subcommand does not offer (they
    keep their defaults). A field with none of these is refused, so that a new option is never dropped
    silently."""
    fields = [f.name for f in dataclasses.fields(options_cls) if f.init]
    unknown = sorted((set(values) | set(omit)) - set(fields))
    if unknown:
        raise TypeError(f"{options_cls.__name__} has no field {', '.join(unknown)}; its fields: {fields}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name in values:
            kwargs[name] = values[name]
        elif hasattr(args, name):
            kwargs[name] = getattr(args, name)
        elif name not in omit:
            raise TypeError(
                f"{options_cls.__name__}.{name} is not an argument of this subcommand; add it to the parser "
                "or name it in omit"
            )
    return kwargs


def layers_arg(text: str) -> tuple[int, ...] | None:
    """``--layers 1,3,5`` as an argparse type (``hf_hybrid.convert.checkpoint.parse_layers``'s rule, here
    without importing the converters: parsing the command line loads no torch)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: expected comma-separated layer indices, e.g. 1,3,5"
        ) from None
