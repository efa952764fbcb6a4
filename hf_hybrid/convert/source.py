"""What every converter starts from (upcycle, DSA conversion, hybridize): the source checkpoint as an
hf_hybrid config or model (an hf_hybrid checkpoint, or a Llama / Qwen2 / Qwen3 / Mistral one imported on the
way), and the lineage a derived checkpoint records."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..card import source_name as card_source_name
from ..configuration_hybrid import HybridConfig
from .checkpoint import as_dtype


def source_config(src: str | os.PathLike) -> tuple[HybridConfig, bool]:
    """The ``HybridConfig`` of ``src`` (an hf_hybrid checkpoint, or one import_dense can import) and whether
    it is already hf_hybrid. Reads config and weight names only; raises ``ValueError`` /
    ``FileNotFoundError``."""
    from .import_dense import plan_import

    path = Path(src)
    if not path.is_dir():
        raise FileNotFoundError(f"{src} is not a directory (a checkpoint saved by transformers or hf_hybrid)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a transformers checkpoint")
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") == "hf_hybrid":
        return HybridConfig.from_pretrained(str(path)), True
    plan = plan_import(path)  # UnsupportedCheckpointError (a ValueError) for anything it cannot import
    return HybridConfig(**plan.config_kwargs), False


def load_source(src: str | os.PathLike, *, dtype: torch.dtype | str | None = None):
    """``(model, source_dtype)``: an hf_hybrid ``HybridForCausalLM`` of ``src`` (imported through a temporary
    directory when it is a Llama / Qwen2 / Qwen3 / Mistral checkpoint), in eval mode, cast to ``dtype`` when
    given; ``source_dtype`` is the dtype transformers' default loading gives it (``dtype="auto"``: the
    config's dtype, else the stored one)."""
    from ..modeling_hybrid import HybridForCausalLM
    from .import_dense import import_dense

    _, is_hybrid = source_config(src)
    if is_hybrid:
        model = HybridForCausalLM.from_pretrained(str(src), dtype="auto")
    else:
        with tempfile.TemporaryDirectory(prefix="hf-hybrid-import-") as tmp:
            imported = import_dense(src, Path(tmp) / "imported")
            model = HybridForCausalLM.from_pretrained(str(imported), dtype="auto")
    source_dtype = next(model.parameters()).dtype
    if dtype is not None:
        model = model.to(as_dtype(dtype))
    return model.eval(), source_dtype


def derived_lineage(
    parent: dict[str, Any], src: str | None, recipe: str, options: dict[str, Any]
) -> dict[str, Any]:
    """Lineage of a derived checkpoint: the root ``base_model`` (and architecture) of ``parent``, this
    ``recipe`` and its ``options``, and the recipes applied before it (``previous_recipes``)."""
    from .. import __version__

    lineage: dict[str, Any] = {}
    for key in ("base_model", "base_architecture", "base_model_type", "license"):
        if key in parent:
            lineage[key] = parent[key]
    if "base_model" not in lineage and src is not None:
        lineage["base_model"] = card_source_name(src)
    lineage["recipe"] = recipe
    previous = list(parent.get("previous_recipes") or [])
    if parent.get("recipe"):
        previous.append(parent["recipe"])
    if previous:
        lineage["previous_recipes"] = previous
    if src is not None:
        lineage["source"] = os.fspath(src)
    lineage["options"] = options
    lineage["hf_hybrid_version"] = __version__
    return lineage


__all__ = ["derived_lineage", "load_source", "source_config"]
