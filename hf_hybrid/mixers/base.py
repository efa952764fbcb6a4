"""What every token mixer receives, and the registry that maps config strings to mixer classes.

A mixer is an ``nn.Module`` built as ``Mixer(config, layer_idx)`` whose forward is
``forward(hidden_states [B, T, H], ctx: MixerContext) -> [B, T, H]``. Everything a mixer needs about the
batch (padding, packing, positions, cache) is in ``ctx``; auxiliary losses go through ``ctx.add_aux``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MIXER_REGISTRY: dict[str, type[nn.Module]] = {}


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: ``@register_mixer("gated_deltanet")`` makes the class buildable from the config."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIXER_REGISTRY and MIXER_REGISTRY[name] is not cls:
            raise ValueError(f"mixer {name!r} is registered twice ({MIXER_REGISTRY[name]} and {cls})")
        MIXER_REGISTRY[name] = cls
        return cls

    return wrap


@dataclass
class MixerContext:
    """Per-forward information shared by all layers.

    Shapes: B batch, T new tokens in this forward, P tokens already in the cache.

    - ``padding_mask``: [B, T] bool, True for real tokens of *this* forward; None when there is no padding.
      Recurrent mixers must zero padded positions before the conv and keep the state unchanged across them.
    - ``attention_mask_2d``: the user's [B, P + T] mask (or None), for mixers that build their own masks.
    - ``masks``: transformers' attention masks keyed by transformers layer type
      (``"full_attention"``, ``"sliding_attention"``), built by ``masking_utils`` for the chosen backend.
    - ``position_ids``: [B, T] absolute positions (restart at 0 for each packed document).
    - ``cu_seqlens``: [N + 1] int32 document boundaries when several documents are packed into one row
      (then B == 1), else None. ``max_seqlen`` is the longest document.
    - ``rope``: callable ``rope(dim) -> (cos, sin)`` each [B, T, dim] for a rotary dimension ``dim``
      (cached per forward, so MLA/DSA can ask for their own rope sizes).
    - ``cache``: the ``HybridCache`` or None. ``past_length`` is P.
    - ``attn_kwargs``: extra keyword arguments for transformers' attention interface (flash varlen info).
    """

    padding_mask: torch.Tensor | None
    attention_mask_2d: torch.Tensor | None
    masks: dict[str, Any]
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    cache: Any
    past_length: int
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    # DSA top-k selections [B, T, k] of this forward by layer index, reused by "shared" DSA layers
    # (dsa_indexer_types). Keyed by layer so a recomputation (gradient checkpointing) reads the right one.
    dsa_topk: dict[int, torch.Tensor] = field(default_factory=dict)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Record an auxiliary loss term (already averaged for this layer); the model sums them per name."""
        self.aux.setdefault(name, []).append(value)

    def add_stat(self, name: str, layer_idx: int, value: Any) -> None:
        """Record a detached per-layer statistic (e.g. expert load) for logging; never part of the loss."""
        self.stats.setdefault(name, {})[layer_idx] = value
