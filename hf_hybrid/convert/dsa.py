"""Dense attention → DeepSeek Sparse Attention (DSA) by conversion plus continued training, as
DeepSeek-V3.2-Exp did (a dense warm-up that trains the indexer alone, then sparse training).

    hf-hybrid convert-dsa SRC DST --index-topk 256 [--index-heads 8] [--index-head-dim 64] [--layers 0,2]
                          [--selector indexer|structured] [--mode dense|dense_warmup|sparse] [--seed 0]

The chosen ``attention`` layers become ``dsa`` layers with ``dsa_base="attention"`` (GQA), or the chosen
``mla`` layers become ``dsa`` layers with ``dsa_base="mla"`` (DeepSeek-V3.2's layout). A DSA layer is its base
mixer plus ``indexer.*`` (``hf_hybrid/mixers/dsa.py``), so the conversion copies every weight under the same
name and adds fresh indexers, initialised by the model's own ``_init_weights`` (seeded by ``seed``). One
``dsa_base`` applies to every DSA layer of a model (it is one config field), so a selection that mixes
attention and MLA layers is refused; so are sliding-window layers (DSA attends over the whole causal past,
which would change their function).

Saved mode: ``dsa_mode="dense"`` by default. The indexer is untrained, so ``"sparse"`` would cut attention
with a random selection (a worse model than the source at any context beyond ``index_topk``), and
``"dense_warmup"`` is a training mode (its training loss is the indexer KL alone — a surprise for anyone who
loads the checkpoint to fine-tune it). ``"dense"`` computes exactly the source's function at every length and
leaves the choice to the training recipe, which sets the mode per stage (``recipes/dsa``: dense warm-up, then
sparse training; the recipe saves the final model in ``"sparse"`` mode). With ``index_topk`` ≥ the context,
``"sparse"`` also equals the source (tests check fp32 logits within 1e-5 for both bases).

The options are one :class:`DSAOptions` (the CLI and ``recipes/dsa`` build it; the functions also take its
fields as keyword arguments). :func:`set_dsa_mode` (``hf_hybrid.mixers.dsa.set_dsa_mode``, where the mode
lives; the same as ``model.dsa_mode(mode, index_topk=...)``) and :func:`set_collect_metrics` switch a loaded
model between stages and turn on the recall / attention-mass statistics of the DSA mixers: run-time state of
the layers, so the config, and what is saved, keeps the mode and top-k chosen here until the user sets other
ones (``save=True``); :func:`freeze_all_but_indexers` is the warm-up's freezing rule.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import source_name as card_source_name
from ..configuration_hybrid import FIELD_CHOICES, HybridConfig
from ..mixers.dsa import dsa_layers, set_dsa_mode
from .checkpoint import as_dtype, check_dst, check_layer_indices, write_checkpoint
from .source import derived_lineage, load_source, source_config

DSA_BASES = {"attention": "attention", "mla": "mla"}  # mixer type -> dsa_base
SELECTORS = FIELD_CHOICES["dsa_selector"]
MODES = FIELD_CHOICES["dsa_mode"]


@dataclass(frozen=True)
class DSAOptions:
    """What a DSA conversion does; :meth:`validate` raises ``ValueError`` for anything that cannot work.
    ``layers`` may be given as a list (kept as a tuple)."""

    index_topk: int  # k: keys each query attends to in sparse mode
    index_heads: int | None = None  # None: the config's index_n_heads
    index_head_dim: int | None = None  # None: the config's index_head_dim
    layers: tuple[int, ...] | None = None  # None: every full attention / MLA layer
    selector: str = "indexer"
    mode: str = "dense"  # the dsa_mode saved in the config (see the module docstring)
    seed: int = 0  # seed of the indexers' initialisation
    index_norm_eps: float | None = (
        None  # None: the config's; DeepSeek-V3.2 uses 1e-6 (set it to export there)
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    def validate(self) -> None:
        for name, value, allow_none in (
            ("index_topk", self.index_topk, False),
            ("index_heads", self.index_heads, True),
            ("index_head_dim", self.index_head_dim, True),
        ):
            if value is None and allow_none:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"convert-dsa: {name}={value!r} must be a positive integer")
        if self.selector not in SELECTORS:
            raise ValueError(
                f"convert-dsa: selector={self.selector!r} is not known; choose one of: {', '.join(SELECTORS)}"
            )
        if self.mode not in MODES:
            raise ValueError(
                f"convert-dsa: mode={self.mode!r} is not known; choose one of: {', '.join(MODES)}"
            )
        if self.layers is not None and not self.layers:
            raise ValueError(
                "convert-dsa: layers is empty; give layer indices or None for every attention/MLA layer"
            )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


def _options(opts: DSAOptions | None, kwargs: dict[str, Any], who: str) -> DSAOptions:
    """``opts``, or a ``DSAOptions`` built from keyword options (not both)."""
    if opts is None:
        return DSAOptions(**kwargs)
    if kwargs:
        raise TypeError(f"{who}: pass a DSAOptions or keyword options, not both")
    return opts


def check_convert(
    config: HybridConfig, opts: DSAOptions | None = None, **kwargs: Any
) -> tuple[list[int], str]:
    """Validate a conversion of ``config`` (options: a ``DSAOptions`` or its fields as keyword arguments);
    return ``(layers, dsa_base)``. Raises ``ValueError``; writes nothing."""
    opts = _options(opts, kwargs, "check_convert")
    opts.validate()
    layers = opts.layers
    types = config.mixer_types
    n = len(types)
    if "dsa" in types:
        have = [i for i, t in enumerate(types) if t == "dsa"]
        raise ValueError(
            f"convert-dsa: the source already has DSA layers ({have}); the index_* settings are global in "
            "HybridConfig, so convert-dsa starts from a model without DSA layers"
        )
    convertible = [i for i, t in enumerate(types) if t in DSA_BASES]
    if layers is None:
        if not convertible:
            sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
            extra = (
                f" (layers {sliding} are sliding-window attention, which DSA cannot replace exactly)"
                if sliding
                else ""
            )
            raise ValueError(
                "convert-dsa: the source has no full attention or MLA layers to convert "
                f"(mixer_types={types}){extra}"
            )
        layers = convertible
    else:
        layers = check_layer_indices(layers, n, what="convert-dsa: layers")
        wrong = [(i, types[i]) for i in layers if types[i] not in DSA_BASES]
        if wrong:
            raise ValueError(
                "convert-dsa: only full 'attention' and 'mla' layers can become DSA layers; "
                + ", ".join(f"layer {i} is {t!r}" for i, t in wrong)
                + (f"; convertible layers: {convertible}" if convertible else "")
            )
    bases = sorted({types[i] for i in layers})
    if len(bases) > 1:
        by_base = {b: [i for i in layers if types[i] == b] for b in bases}
        raise ValueError(
            f"convert-dsa: the chosen layers mix bases {by_base}; one dsa_base applies to every DSA "
            "layer of a model, so convert either the attention layers or the MLA layers (pass --layers)"
        )
    if bases[0] == "mla" and config.mla_rope_heads != 1:
        raise ValueError(
            f"convert-dsa: the MLA layers have mla_rope_heads={config.mla_rope_heads} (one rope key per kv "
            "head, from hf-hybrid mla); DSA on MLA needs one shared rope key (1): convert with "
            "--rope-keys shared"
        )
    return layers, DSA_BASES[bases[0]]


def converted_config(config: HybridConfig, layers: list[int], base: str, opts: DSAOptions) -> HybridConfig:
    """``config`` with ``layers`` turned into DSA layers (a new object); unset index sizes and eps keep the
    config defaults."""
    d = config.to_dict()
    d.pop("layer_types", None)  # derived from mixer_types
    d.update(
        mixer_types=["dsa" if i in layers else t for i, t in enumerate(config.mixer_types)],
        dsa_base=base,
        index_topk=opts.index_topk,
        dsa_selector=opts.selector,
        dsa_mode=opts.mode,
    )
    if opts.index_heads is not None:
        d["index_n_heads"] = opts.index_heads
    if opts.index_head_dim is not None:
        d["index_head_dim"] = opts.index_head_dim
    if opts.index_norm_eps is not None:
        d["index_norm_eps"] = opts.index_norm_eps
    new = HybridConfig.from_dict(d)
    new._attn_implementation = config._attn_implementation
    return new


def convert_model_to_dsa(model, opts: DSAOptions | None = None, **kwargs: Any):
    """Convert an in-memory ``HybridForCausalLM`` (left untouched): a new model with copies of every weight
    and fresh indexers from the model's ``_init_weights`` (``torch.manual_seed(opts.seed)`` around the build;
    the global RNG state is restored afterwards). Options: a ``DSAOptions`` or its fields as keyword
    arguments."""
    from ..modeling_hybrid import HybridForCausalLM

    opts = _options(opts, kwargs, "convert_model_to_dsa")
    chosen, base = check_convert(model.config, opts)
    new_config = converted_config(model.config, chosen, base, opts)
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        new = HybridForCausalLM(new_config)  # every weight initialised by _init_weights; indexers keep theirs
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = new.load_state_dict(state, strict=False)
    not_indexer = [k for k in result.missing_keys if ".indexer." not in k]
    if not_indexer or result.unexpected_keys:
        raise RuntimeError(f"internal error: converted model does not match the source: {result}")
    indexers = sorted({k.split(".indexer.")[0] for k in result.missing_keys})
    if len(indexers) != len(chosen):
        raise RuntimeError(f"internal error: expected fresh indexers in layers {chosen}, got {indexers}")
    new = new.to(device=param.device, dtype=param.dtype)
    new.train(model.training)
    new.config.hf_hybrid_lineage = derived_lineage(
        dict(model.config.hf_hybrid_lineage or {}),
        None,
        "convert-dsa",
        {
            "layers": chosen,
            "dsa_base": base,
            "index_topk": opts.index_topk,
            "index_n_heads": new_config.index_n_heads,
            "index_head_dim": new_config.index_head_dim,
            "selector": opts.selector,
            "mode": opts.mode,
            "seed": opts.seed,
        },
    )
    return new


def convert_to_dsa(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    opts: DSAOptions | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> Path:
    """Convert the checkpoint ``src`` (hf_hybrid, or Llama / Qwen2 / Qwen3 / Mistral imported on the way) to
    DSA and save it to ``dst`` in ``dtype`` (default: the source's; see the module docstring). Options: a
    ``DSAOptions`` or its fields as keyword arguments (``index_norm_eps=1e-6`` for a later ``deepseek_v32``
    export). Every check runs before anything is written. Returns ``dst``."""
    opts = _options(opts, kwargs, "convert_to_dsa")
    check_dst(dst)
    config, _ = source_config(src)
    check_convert(config, opts)
    out_dtype = as_dtype(dtype) if dtype is not None else None
    model, source_dtype = load_source(src, dtype=torch.float32)
    new = convert_model_to_dsa(model, opts)
    lineage = new.config.hf_hybrid_lineage
    lineage.setdefault("base_model", card_source_name(src))
    lineage["source"] = os.fspath(src)
    return write_checkpoint(new, dst, src=src, dtype=out_dtype or source_dtype)


# ------------------------------------------------------------------------------------------------------------
# stage helpers


dsa_mixers = dsa_layers  # every DSA mixer in a model (this module's name for it since the conversion landed)
# set_dsa_mode (imported from hf_hybrid.mixers.dsa, where the mode lives) switches a model between stages


def set_collect_metrics(model: nn.Module, on: bool = True) -> None:
    """Turn on (off) the recall@k / attention-mass statistics of every DSA layer
    (``layer_stats["dsa_recall"]``, ``layer_stats["dsa_mass"]``, one value per layer and forward)."""
    for m in dsa_layers(model):
        m.collect_metrics = on


def freeze_all_but_indexers(model: nn.Module) -> tuple[int, int]:
    """DeepSeek's dense warm-up: every parameter frozen (``requires_grad=False``) except the indexers'.
    Returns ``(trainable, frozen)`` parameter counts."""
    trainable = frozen = 0
    for name, p in model.named_parameters():
        on = ".indexer." in name
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
        frozen += 0 if on else p.numel()
    if trainable == 0:
        raise ValueError("freeze_all_but_indexers: the model has no indexer parameters")
    return trainable, frozen


def unfreeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


__all__ = [
    "DSAOptions",
    "convert_to_dsa",
    "convert_model_to_dsa",
    "check_convert",
    "converted_config",
    "set_dsa_mode",
    "set_collect_metrics",
    "freeze_all_but_indexers",
    "unfreeze_all",
    "dsa_mixers",
]
