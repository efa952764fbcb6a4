"""Import a dense checkpoint saved by transformers (Llama, Qwen2, Qwen3, Mistral) as an hf_hybrid checkpoint.

The result is function-preserving (same logits; tests check fp32 max abs ≤ 1e-5): every layer becomes an
``attention`` (or ``sliding_attention``) mixer with a ``dense`` SwiGLU MLP, and weights are renamed by the
native dense family's tables (``hf_hybrid.convert.native.dense``, the same ones its export uses):
``model.layers.{i}.self_attn.*`` → ``model.layers.{i}.mixer.*`` (MLP and norm names are the same in both).

Safety: weights are read with safetensors only; pickle-based ``.bin`` / ``.pt`` checkpoints are refused
(loading them would run arbitrary code). Every check (config, architecture, weight names and shapes) runs
before anything is written, and the output appears atomically (written beside ``dst`` and renamed), so a
refused or failed import leaves no ``dst`` behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..card import source_name as card_source_name
from .checkpoint import UnsupportedCheckpointError, as_dtype, carried_files, write_atomically
from .checkpoint import fail as _fail
from .checkpoint import source_license as _source_license
from .checkpoint import weight_files as _weight_files
from .native.dense import SUPPORTED, dense_config_kwargs

# Sparse MoE sources: import their dense sibling and upcycle instead.
_MOE_TYPES = {
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "olmoe",
    "granitemoe",
    "dbrx",
    "jamba",
    "minimax",
    "phimoe",
    "gpt_oss",
    "llama4",
    "ernie4_5_moe",
    "glm4_moe",
    "dots1",
}


@dataclass
class ImportPlan:
    """Everything ``import_dense`` will do, computed and checked before anything is written."""

    src: Path
    model_type: str
    config_kwargs: dict[str, Any]
    weight_files: list[Path]
    key_map: dict[str, str]  # source tensor name -> hf_hybrid name
    dtype: torch.dtype
    carried_files: list[Path] = field(default_factory=list)


def _source_config(src: Path, raw: dict[str, Any]):
    """The source config parsed by transformers' own class for its model_type (no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    from .families import FAMILY_MODULES

    if model_type in FAMILY_MODULES and model_type not in SUPPORTED:
        _fail(
            f"{src}: model_type={model_type!r} is a native family: import it with "
            "hf_hybrid.convert.native.import_native (or `hf-hybrid import`, which picks the right importer)"
        )
    if model_type in _MOE_TYPES:
        _fail(
            f"{src} is a sparse mixture-of-experts model (model_type={model_type!r}); import_dense takes "
            f"dense models ({', '.join(SUPPORTED)}). Import a dense model and upcycle it to MoE instead"
        )
    if model_type not in SUPPORTED:
        _fail(
            f"{src}: model_type={model_type!r} is not supported; import_dense takes: {', '.join(SUPPORTED)}"
        )
    return CONFIG_MAPPING[model_type].from_pretrained(str(src))


def _key_map(src: Path, model_type: str, names: list[str], ours, native) -> dict[str, str]:
    """Source tensor name -> hf_hybrid name, by the native dense family's weight tables
    (``hf_hybrid.convert.native.dense``: ``self_attn.*`` -> ``mixer.*``, everything else keeps its name;
    rotary buffers dropped)."""
    from .native import get_family
    from .native.base import NativeConversionError

    if ours.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]  # tied: transformers ignores a saved copy too
    try:
        return get_family(model_type).name_map(names, ours, native)
    except NativeConversionError as err:
        _fail(f"{src}: the weights do not match a {SUPPORTED[model_type]} of this config — {err}")


def _read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()), sl.get_dtype(), path)
    return shapes


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def plan_import(src_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> ImportPlan:
    """Read and check a source checkpoint; raise ``UnsupportedCheckpointError`` / ``FileNotFoundError`` with a
    clear message for anything that cannot be imported exactly. Writes nothing."""
    from ..configuration_hybrid import HybridConfig
    from ..modeling_hybrid import HybridForCausalLM

    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src_dir} is not a directory; import_dense reads a local checkpoint saved by transformers "
            "(download a Hub model first, e.g. with `hf download`)"
        )
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a transformers checkpoint")
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type == "hf_hybrid":
        _fail(f"{src} is already an hf_hybrid checkpoint")
    cfg = _source_config(src, raw)
    weight_files = _weight_files(src)
    kwargs = dense_config_kwargs(src, model_type, cfg, raw)
    try:
        ours = HybridConfig(**kwargs)
    except ValueError as err:
        _fail(f"{src}: its config does not map onto HybridConfig: {err}")

    shapes = _read_shapes(weight_files)
    key_map = _key_map(src, model_type, list(shapes), ours, cfg)

    with torch.device("meta"):
        expected = HybridForCausalLM(HybridConfig(**kwargs)).state_dict()
    if kwargs["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    got = set(key_map.values())
    missing, unexpected = sorted(set(expected) - got), sorted(got - set(expected))
    if missing or unexpected:
        inverse = {v: k for k, v in key_map.items()}
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensor(s) hf_hybrid has no place for: "
                f"{', '.join(inverse[u] for u in unexpected[:5])}"
            )
        _fail(
            f"{src}: the weights do not match a {SUPPORTED[model_type]} of this config — " + "; ".join(parts)
        )
    for name, mapped in key_map.items():
        shape = shapes[name][0]
        if tuple(expected[mapped].shape) != shape:
            _fail(
                f"{src}: {name} has shape {shape}, expected {tuple(expected[mapped].shape)} from config.json"
            )

    if dtype is None:
        # transformers' rule for from_pretrained(dtype="auto"), its default: the config's dtype when it names
        # one, else the dtype the weights are stored in. (A checkpoint may say float32 and store bf16: loading
        # it by default gives float32 weights, so the import must too, or its default load would differ from
        # the source's.)
        declared = raw.get("dtype") or raw.get("torch_dtype")
        if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
            dtype = getattr(torch, declared)
            if not dtype.is_floating_point:
                _fail(f"{src}: config.json dtype={declared!r} is not a floating type hf_hybrid can load")
        else:
            embed_name = next(k for k, v in key_map.items() if v == "model.embed_tokens.weight")
            st_dtype = shapes[embed_name][1]
            if st_dtype not in _SAFETENSORS_DTYPES:
                _fail(f"{src}: embedding dtype {st_dtype} is not a floating type hf_hybrid can load")
            dtype = _SAFETENSORS_DTYPES[st_dtype]
    else:
        dtype = as_dtype(dtype)
    carried = carried_files(src)
    return ImportPlan(src, model_type, kwargs, weight_files, key_map, dtype, carried)


def dense_to_hybrid_config(src_dir: str | os.PathLike):
    """The ``HybridConfig`` an import of ``src_dir`` would produce, from its config.json alone (no weights
    read)."""
    from ..configuration_hybrid import HybridConfig

    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a transformers checkpoint")
    raw = json.loads(config_path.read_text())
    return HybridConfig(**dense_config_kwargs(src, raw.get("model_type"), _source_config(src, raw), raw))


def import_dense(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    base_model: str | None = None,
) -> Path:
    """Import the transformers checkpoint in ``src_dir`` into a new hf_hybrid checkpoint ``dst_dir``.

    ``dtype``: cast floating weights (default: transformers' ``dtype="auto"`` rule — the dtype config.json
    names, else the one the weights are stored in). ``base_model``: the name
    recorded as lineage and in the card (default: ``src_dir`` as given; pass the Hub id when you know it).
    ``dst_dir`` must not exist or be empty. Returns ``dst_dir``."""
    from .. import __version__
    from ..configuration_hybrid import HybridConfig
    from ..modeling_hybrid import HybridForCausalLM

    dst = Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new output directory")
    plan = plan_import(src_dir, dtype=dtype)
    raw = json.loads((plan.src / "config.json").read_text())
    lineage = {
        "base_model": base_model or card_source_name(src_dir),
        "base_architecture": (raw.get("architectures") or [SUPPORTED[plan.model_type]])[0],
        "base_model_type": plan.model_type,
        "recipe": "import",
        "dtype": str(plan.dtype).replace("torch.", ""),
        "hf_hybrid_version": __version__,
    }
    license_ = _source_license(plan.src)
    if license_:
        lineage["license"] = license_
    config = HybridConfig(**plan.config_kwargs, hf_hybrid_lineage=lineage)
    config.dtype = plan.dtype
    config.name_or_path = dst.name  # the card's title

    # Build on meta (no memory, no random init) and assign the source tensors.
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    state = {}
    for path in plan.weight_files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in plan.key_map:
                    tensor = f.get_tensor(name)
                    state[plan.key_map[name]] = (
                        tensor.to(plan.dtype) if tensor.is_floating_point() else tensor
                    )
    result = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise RuntimeError(f"internal error: load_state_dict left {result}")  # plan_import checked this
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device after import: {leftover[:5]}")
    model.eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for path in plan.carried_files:
            shutil.copy2(path, tmp / path.name)

    return write_atomically(dst, write)


__all__ = [
    "import_dense",
    "plan_import",
    "dense_to_hybrid_config",
    "ImportPlan",
    "UnsupportedCheckpointError",
    "SUPPORTED",
]
