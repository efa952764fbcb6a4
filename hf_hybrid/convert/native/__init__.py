"""transformers' native families ↔ hf_hybrid, exactly: import a native checkpoint as an hf_hybrid model with
the same function, and export an hf_hybrid model back to the native family whose layout it fits (loadable by
plain transformers without hf_hybrid, so servable by any engine that serves that family).

Python API::

    from hf_hybrid.convert.native import import_native, export_native, native_to_hybrid_config

    model = import_native("path/to/qwen3_moe_dir", "out/hybrid")  # or import_native(native_model): in memory
    native = export_native("out/hybrid", "out/qwen3_moe", to="qwen3_moe")  # to=None: the family that fits
    cfg = native_to_hybrid_config("path/to/config_dir_or_native_config")  # what ``hf-hybrid inspect`` uses

Both refuse before writing anything: an unknown ``model_type``, a native option with no counterpart here
(named with its value), an hf_hybrid field or layer the target family cannot express (named with its value and
layer). Weights are read with safetensors only.

Adding a family (one file + one registry line):

1. ``hf_hybrid/convert/native/<file>.py`` defines ``FAMILIES = {model_type: NativeFamily(...)}`` (see
   ``base.py``): the config rules (``same``, ``rename``, ``native_fixed``, ``ours_fixed``, ``Custom``), the
   weight rules ``W`` — ``model_rules`` (absolute names), ``layer_rules`` (every layer), ``mixer_rules`` /
   ``mlp_rules`` keyed by ``HybridConfig.mixer_types[i]`` / ``mlp_types[i]``, with transforms as inverse pairs
   (``permute_rows``, ``add_constant``, ``split_rows``, ``zero_filled``) — and ``tiny_config`` (kwargs of a
   tiny native config; the shared test ``tests/test_native_families.py`` runs every registered family from
   it).
2. Add ``"model_type": "<file>"`` to :data:`FAMILY_MODULES` (``hf_hybrid/convert/families.py``).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...card import source_name as card_source_name
from ..checkpoint import (
    as_dtype,
    check_dst,
    copy_carried_files,
    source_license,
    weight_files,
    write_atomically,
)
from ..families import FAMILY_MODULES, TEXT_DECODER_OF  # the table of families lives in a leaf
from .base import NativeConversionError, NativeFamily, build_empty, fail, load_into

# Families whose layers hf_hybrid does not have yet: model_type -> the missing layer. Import (and inspect)
# refuse them naming that layer, before anything is read or written.
NEEDS_MISSING_LAYER: dict[str, str] = {
    "deepseek_v4": "DeepSeek-V4's compressed sparse attention",
    "qwen4_exp": "Qwen4-Exp's compressed indexed attention",
    "falcon_h1": "Falcon-H1's parallel attention + Mamba-2 block (both mixers on the same input)",
    "lfm2": "LFM2's gated short convolution",
    "lfm2_moe": "LFM2's gated short convolution",
    "lfm3": "LFM3's gated short convolution",
    "kolibri1_1": "Kolibri-1.1's pooled indexed attention",
}


def families() -> dict[str, NativeFamily]:
    """Every registered family, keyed by model_type (modules imported on first use)."""
    return {mt: get_family(mt) for mt in FAMILY_MODULES}


def get_family(model_type: str | None) -> NativeFamily:
    if model_type in NEEDS_MISSING_LAYER:
        fail(
            f"model_type={model_type!r} is not supported yet: it needs {NEEDS_MISSING_LAYER[model_type]}, "
            "a layer hf_hybrid does not have"
        )
    if model_type not in FAMILY_MODULES:
        spelled = str(model_type).lower().replace("-", "_")  # `--to Qwen3-Next`, `--to qwen3_5`
        close = [TEXT_DECODER_OF[spelled]] if spelled in TEXT_DECODER_OF else []  # a wrapper: its decoder
        close = close or difflib.get_close_matches(spelled, list(FAMILY_MODULES), n=1, cutoff=0.75)
        fail(
            f"model_type={model_type!r} is not a native family hf_hybrid can convert"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; supported: {', '.join(sorted(FAMILY_MODULES))}"
        )
    module = importlib.import_module(f"{__name__}.{FAMILY_MODULES[model_type]}")
    return module.FAMILIES[model_type]


def _read_native_config(src: str | os.PathLike | Any):
    """A native config object from a directory, a config.json path, or a config / model object."""
    from transformers import PretrainedConfig

    if isinstance(src, PretrainedConfig):
        return _text_decoder_config(src)
    if hasattr(src, "config") and isinstance(src.config, PretrainedConfig):
        return _text_decoder_config(src.config)
    path = Path(src)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent if path.name == "config.json" else path
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint")
        raw = json.loads(config_path.read_text())
        family = get_family(TEXT_DECODER_OF.get(raw.get("model_type"), raw.get("model_type")))
        config_class = family.config_class  # refuses a family the installed transformers lacks, by name
        if raw.get("model_type") in TEXT_DECODER_OF:
            from transformers import AutoConfig  # the wrapper: its text config, with the wrapper's tying

            return _text_decoder_config(AutoConfig.from_pretrained(str(path)))
        return config_class.from_pretrained(str(path))
    if path.is_file():  # some other JSON file holding a config dict
        raw = json.loads(path.read_text())
        family = get_family(raw.get("model_type"))
        return family.config_class.from_dict(raw)
    raise FileNotFoundError(f"{src} is neither a checkpoint directory nor a config file")


def _text_decoder_config(config):
    """A vision-language wrapper's text config (the decoder hf_hybrid converts); any other config as is.
    transformers ties ``lm_head`` to the embeddings by the wrapper's ``tie_word_embeddings``, not the text
    config's: the text config returned carries the wrapper's."""
    if getattr(config, "model_type", None) not in TEXT_DECODER_OF:
        return config
    text = config.get_text_config()
    tie = bool(getattr(config, "tie_word_embeddings", False))
    if bool(getattr(text, "tie_word_embeddings", False)) != tie:
        text = copy.deepcopy(text)  # never edit the caller's model's config
        text.tie_word_embeddings = tie
    return text


def native_to_hybrid_config(src: str | os.PathLike | Any):
    """The ``HybridConfig`` an import of ``src`` (directory, config.json, native config or model) would
    produce, from the config alone (no weights read)."""
    native = _read_native_config(src)
    return get_family(native.model_type).hybrid_config(native)


# ---- import ------------------------------------------------------------------------------------------------


def _state_without_tied(model, tied: bool) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if tied:
        state.pop("lm_head.weight", None)
    return state


def _owning(state: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor that shares storage with a tensor of ``source`` (a renamed weight, a
    split's view) cloned, so that the converted model owns its memory: a model converted in memory must not
    alias the model it came from (editing one would edit the other). Tensors a transform already produced
    are kept as they are (no second copy); a source read from disk is a temporary and needs none of this."""
    shared = {t.untyped_storage().data_ptr() for t in source.values() if t.device.type != "meta"}
    return {
        k: (v.detach().clone() if v.untyped_storage().data_ptr() in shared else v) for k, v in state.items()
    }


def import_native(
    src: str | os.PathLike | Any,
    dst: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    base_model: str | None = None,
):
    """Import a native transformers checkpoint (directory) or model object as an ``HybridForCausalLM`` with
    the same function. With ``dst``, also write it there (sharded safetensors, tokenizer and generation config
    carried over, the card's lineage naming the source family). Returns the hf_hybrid model (eval mode)."""
    from ... import __version__
    from ...modeling_hybrid import HybridForCausalLM

    src_dir = None if hasattr(src, "state_dict") else Path(src)
    if src_dir is not None and not src_dir.is_dir():
        raise FileNotFoundError(
            f"{src} is not a directory; import_native reads a local checkpoint saved by transformers"
        )
    dst_path = Path(dst) if dst is not None else None
    if dst_path is not None:
        check_dst(dst_path)

    native_cfg = _read_native_config(src)
    family = get_family(native_cfg.model_type)
    if src_dir is not None:
        wrapper = json.loads((src_dir / "config.json").read_text()).get("model_type")
        if wrapper in TEXT_DECODER_OF:
            print(
                f"note: {src} is a {wrapper} vision-language checkpoint; importing its {family.model_type} "
                f"text decoder (model.language_model.*) and dropping {family.wrapper_note}"
            )
    hybrid_cfg = family.hybrid_config(native_cfg)  # refuses unsupported options before any weight is read
    dtype = as_dtype(dtype)

    if src_dir is not None:
        weight_files(src_dir)  # refuses pickle-only checkpoints with a clear message
        native_model = family.model_class.from_pretrained(str(src_dir), dtype="auto", use_safetensors=True)
        source_name = base_model or card_source_name(src)
    else:
        native_model = src
        source_name = base_model or getattr(native_cfg, "name_or_path", None) or family.model_type
    state = _state_without_tied(native_model, hybrid_cfg.tie_word_embeddings)
    ours_state = family.convert_state(state, hybrid_cfg, native_cfg, to="ours")
    if src_dir is None:  # in memory: the import must not share storage with the caller's model
        ours_state = _owning(ours_state, state)
    if dtype is not None:
        ours_state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ours_state.items()}
    model_dtype = dtype or native_model.get_input_embeddings().weight.dtype

    lineage = {
        "base_model": source_name,
        "base_architecture": (getattr(native_cfg, "architectures", None) or [family.model_class.__name__])[0],
        "base_model_type": family.model_type,
        "recipe": "import",
        "dtype": str(model_dtype).replace("torch.", ""),
        "hf_hybrid_version": __version__,
    }
    if src_dir is not None and source_license(src_dir):
        lineage["license"] = source_license(src_dir)
    hybrid_cfg.hf_hybrid_lineage = lineage
    hybrid_cfg.dtype = model_dtype
    model = build_empty(HybridForCausalLM, hybrid_cfg)
    load_into(model, ours_state, what=f"import of {family.model_type}")
    model.eval()
    if dst_path is not None:
        model.config.name_or_path = dst_path.name

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            copy_carried_files(src_dir, tmp, overwrite=True)

        write_atomically(dst_path, write)
    return model


# ---- export ------------------------------------------------------------------------------------------------


def choose_family(hybrid_cfg, to: str | None = None) -> tuple[NativeFamily, Any]:
    """The target family and its native config: ``to`` if given, else the family the model was imported from,
    else the first registered family that expresses the config. Raises naming what has no counterpart."""
    if to is not None:
        family = get_family(to)
        return family, family.native_config(hybrid_cfg)
    lineage = hybrid_cfg.hf_hybrid_lineage or {}
    order = list(FAMILY_MODULES)
    if lineage.get("base_model_type") in FAMILY_MODULES:
        order.remove(lineage["base_model_type"])
        order.insert(0, lineage["base_model_type"])
    reasons: dict[str, list[str]] = {}
    for model_type in order:
        family = get_family(model_type)
        if not family.available:  # the installed transformers lacks it: it cannot be the target
            continue
        try:
            return family, family.native_config(hybrid_cfg)
        except NativeConversionError as err:
            reason = str(err).removeprefix(f"cannot export to {model_type}: ").removeprefix(f"{model_type}: ")
            reasons[model_type] = [line.strip() for line in reason.splitlines()]
    raise _no_family_error(hybrid_cfg, reasons)


def _no_family_error(hybrid_cfg, reasons: dict[str, list[str]]) -> NativeConversionError:
    """A short refusal (the two closest families with their first reason) whose ``details`` list every
    family's reasons (``hf-hybrid export --verbose`` prints them). Closest: fewest layers whose token mixer
    the family lacks, then fewest reasons, then registration order."""

    def distance(model_type: str) -> tuple[int, int]:
        kinds = getattr(get_family(model_type), "mixer_rules", None) or {}
        missing = (
            sum(t not in kinds for t in hybrid_cfg.mixer_types) if kinds else len(hybrid_cfg.mixer_types)
        )
        return missing, len(reasons[model_type])

    closest = sorted(reasons, key=distance)[:2]

    def first(t: str) -> str:
        text = "; ".join(reasons[t])
        return text if len(text) <= 110 else text[:107] + "..."

    lines = ["no native family expresses this model; the closest:"]
    lines += [f"  {t}: {first(t)}" for t in closest]
    lines.append("give --to FAMILY for that family's reasons, --verbose for every family's")
    err = NativeConversionError("\n".join(lines))
    err.details = [f"{t}: {'; '.join(r)}" for t, r in reasons.items()]
    return err


def export_native(
    src: str | os.PathLike | Any,
    dst: str | os.PathLike | None = None,
    *,
    to: str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Export an hf_hybrid model (directory or ``HybridForCausalLM``) to a native transformers family (``to``,
    or the one that fits). With ``dst``, write it through the native class's own ``save_pretrained``
    (transformers' on-disk names and dtypes), plus tokenizer / generation config and a card naming the
    lineage. Returns the native model (eval mode)."""
    from ...modeling_hybrid import HybridForCausalLM

    src_dir = None if hasattr(src, "state_dict") else Path(src)
    dst_path = Path(dst) if dst is not None else None
    if dst_path is not None:
        check_dst(dst_path)
    dtype = as_dtype(dtype)
    if src_dir is not None:
        if not (src_dir / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a checkpoint directory (no config.json)")
        raw = json.loads((src_dir / "config.json").read_text())
        if raw.get("model_type") != "hf_hybrid":
            fail(f"{src}: model_type={raw.get('model_type')!r}; export_native takes an hf_hybrid checkpoint")
        from ...configuration_hybrid import HybridConfig

        hybrid_cfg = HybridConfig.from_pretrained(str(src_dir))
        family, native_cfg = choose_family(hybrid_cfg, to)  # refuse before loading the weights
        model = HybridForCausalLM.from_pretrained(str(src_dir))
    else:
        model = src
        hybrid_cfg = model.config
        family, native_cfg = choose_family(hybrid_cfg, to)
    model_dtype = dtype or model.get_input_embeddings().weight.dtype
    state = _state_without_tied(model, hybrid_cfg.tie_word_embeddings)
    native_state = family.convert_state(state, hybrid_cfg, native_cfg, to="native")
    if src_dir is None:  # in memory: the export must not share storage with the caller's model
        native_state = _owning(native_state, state)
    native_cfg.dtype = model_dtype
    model_cfg = family.model_config(native_cfg)  # a vision-language wrapper's config around the decoder's
    if model_cfg is not native_cfg:  # the decoder inside a vision-language class
        print(
            f"note: {family.model_type} has no text-only model class; writing {family.model_class.__name__} "
            "with a placeholder vision tower (zero weights): the text decoder is exact, images are not "
            "understood"
        )
    model_cfg.dtype = model_dtype
    model_cfg.architectures = [family.model_class.__name__]
    native_model = build_empty(family.model_class, model_cfg)
    converted = set(native_state)
    native_state = family.complete_native_state(native_model, native_state)
    # what the family filled in (a placeholder vision tower), by module: the card names it
    filled = sorted({".".join(k.split(".")[:2]) for k in set(native_state) - converted})
    if dtype is not None:
        native_state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in native_state.items()}
    native_state = _keep_fp32(native_model, native_state)
    load_into(native_model, native_state, what=f"export to {family.model_type}")
    if family.prepare_native is not None:
        family.prepare_native(native_model)
    native_model.eval()
    if dst_path is not None:

        def write(tmp: Path) -> None:
            native_model.save_pretrained(tmp)
            _write_portable_config(tmp / "config.json", family)
            copy_carried_files(src_dir, tmp, overwrite=True)
            card = _export_card(hybrid_cfg, family, src, filled=filled)
            (tmp / "README.md").write_text(card, encoding="utf-8")

        write_atomically(dst_path, write)
    return native_model


def _write_portable_config(config_json: Path, family: NativeFamily) -> None:
    """Rewrite the written config with ``family.portable_config`` (derived fields left out, values spelled the
    way every release reads them) in transformers' own layout of config.json; read back by the config class,
    it must equal the config written."""
    text = config_json.read_text()
    raw = json.loads(text)
    portable = family.portable_config(copy.deepcopy(raw))
    if portable == raw:
        return
    config_class = type(family.model_config(family.config_class()))
    before = config_class.from_pretrained(config_json.parent).to_dict()
    config_json.write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    after = config_class.from_pretrained(config_json.parent).to_dict()
    # the keys only serving engines read (family.engine_keys) stay attributes the config class ignores
    for level_raw, level_portable, level_before, level_after in _levels(raw, portable, before, after):
        for key in set(level_portable) - set(level_raw):
            level_before.pop(key, None)
            level_after.pop(key, None)
    if after != before:
        config_json.write_text(text, encoding="utf-8")
        raise RuntimeError(f"internal error: {family.model_type}'s portable config reads differently")


def _levels(*configs: dict):
    """The top level of each config dict and, where all have one, their ``text_config``."""
    yield configs
    if all(isinstance(c.get("text_config"), dict) for c in configs):
        yield tuple(c["text_config"] for c in configs)


def _keep_fp32(native_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast the tensors transformers keeps in fp32 for this class (routers, correction biases) to fp32."""
    patterns = [
        *(getattr(native_model, "_keep_in_fp32_modules_strict", None) or ()),
        *(getattr(native_model, "_keep_in_fp32_modules", None) or ()),
    ]
    if not patterns:
        return state
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", name) for p in patterns):
            t = t.float()
        out[name] = t
    return out


def _export_card(hybrid_cfg, family: NativeFamily, src, *, filled: Sequence[str] = ()) -> str:
    """The exported directory's README.md; ``filled``: the modules (``model.vision_tower``, ...) the export
    filled with zeros around the decoder (a vision-language class's placeholder vision tower)."""
    lineage = dict(hybrid_cfg.hf_hybrid_lineage or {})
    from ...card import _hub_id, base_model_text

    base = _hub_id(lineage.get("base_model"))  # Hub metadata names a Hub model, never a local path
    lines = ["---", "library_name: transformers"]
    if base:
        lines.append(f"base_model: {json.dumps(str(base))}")
    if lineage.get("license"):
        lines.append(f"license: {lineage['license']}")
    lines += ["tags:", f"- {family.model_type}", "- hf-hybrid-export", "---", ""]
    lines.append(f"# {Path(str(src)).name if not hasattr(src, 'state_dict') else family.model_type}")
    lines.append("")
    cls = family.model_class.__name__
    loader = f"`{cls}.from_pretrained`" if filled else "`AutoModelForCausalLM.from_pretrained`"
    lines.append(
        f"A `{family.model_type}` checkpoint (`{cls}`), loadable with plain transformers ({loader}) and "
        "servable by any engine that serves this family. Exported by hf-hybrid from an hf_hybrid model with "
        "the same function."
    )
    lines.append("")
    if filled:
        modules = ", ".join(f"`{m}.*`" for m in filled)
        lines += [
            "## Vision tower: a placeholder",
            "",
            f"`{family.model_type}` is the text decoder of a vision-language checkpoint and transformers "
            f"has no text-only class for it, so this checkpoint is a `{cls}` whose vision tower is a "
            f"placeholder: every weight of {modules} is zero, from no trained model. The text decoder is "
            "exact; images are not understood. Use it for text only, or put a trained vision tower and "
            "projector in their place.",
            "",
        ]
    lines.append("## Lineage")
    lines.append("")
    if lineage:
        for key, value in lineage.items():
            if key in ("base_model", "source") and isinstance(value, str):
                value = base_model_text(value)  # a local path: its name only
            lines.append(f"- {key}: {value}")
    lines.append(f"- exported_to: {family.model_type}")
    lines.append("")
    return "\n".join(lines)


__all__ = [
    "FAMILY_MODULES",
    "NEEDS_MISSING_LAYER",
    "NativeConversionError",
    "NativeFamily",
    "choose_family",
    "export_native",
    "families",
    "get_family",
    "import_native",
    "native_to_hybrid_config",
]
