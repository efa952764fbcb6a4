"""What every token mixer receives (``MixerContext``: a read-only ``BatchInfo`` and a ``LayerOutputs``
collector); the registry of mixer kinds is ``hf_hybrid.registry``.

A mixer is an ``nn.Module`` built as ``Mixer(config, layer_idx)`` whose forward is
``forward(hidden_states [B, T, H], ctx: MixerContext) -> [B, T, H]``. Everything a mixer needs about the
batch (padding, packing, positions, cache) is in ``ctx``; auxiliary losses go through ``ctx.add_aux``.

Optional methods the model looks for on a mixer (or MLP) module, all defaulting to "no":
- ``init_hybrid_weights(init, config)``: initialise special parameters (decays, dt biases, fused experts);
- ``aux_terms() -> dict[str, float]``: the ``ctx.add_aux`` names this module records in training now -> the
  coefficient each enters the objective with (the model averages a term over the layers recording it, then
  adds ``coefficient · term`` to its loss or attaches its gradient: ``hf_hybrid.aux_loss``). A term not
  declared here is reported in ``aux_terms`` but is not part of the objective;
- ``replaces_lm_loss() -> bool``: this module's terms are the whole objective now (DSA's dense warm-up);
- ``returns_attention_weights() -> bool``: hands eager attention probabilities to ``ctx.attentions``;
- ``runtime_mask() -> str | None``: the mask it reads, when that depends on run-time state (see the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# The registry lives in hf_hybrid/registry.py (one spec per kind: class, layer type, mask, cost, validation).
from ..specs import MIXER_REGISTRY, register_mixer  # noqa: F401  (re-exported: the mixers' import path)


def in_backward_recompute() -> bool:
    """True while autograd's engine is running a backward pass, i.e. when gradient checkpointing replays a
    layer's forward: statistics (router token counts) must not be counted a second time then."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True)
class BatchInfo:
    """What one forward's layers read about the batch; read-only (no layer changes what the next one sees).

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
    - ``cache``: the ``HybridCache`` or None (the object is shared and updated by the layers; the reference
      is fixed). ``past_length`` is P.
    - ``attn_kwargs``: extra keyword arguments for transformers' attention interface (flash varlen info).
    - ``output_router_logits``: MoE layers append their fp32 router logits [B·T, E] to ``router_logits``.
    - ``aux_weights``: auxiliary term name -> the weight its gradient is attached with in one layer
      (micro-batch weight × coefficient / number of layers recording it); empty when nothing is attached
      (eval mode, or the caller adds the terms to its loss itself: ``hf_hybrid.aux_loss``).
    - ``output_attentions``: attention mixers that can (eager) append their probabilities to ``attentions`` as
      ``(layer_idx, [B, h, T, S])``.
    - ``input_ids``: [B, T] token ids of this forward's new tokens, or None when the model was called with
      ``inputs_embeds`` (read by layers that route by token: ``moe_routing="hash"``).
    - ``mixer_io_layers``: layers whose mixer input (the normed hidden states) and output the decoder layers
      record in ``mixer_io`` (the model's ``output_mixer_io=``, for distillation and probing).
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
    output_router_logits: bool = False
    aux_weights: dict[str, float] = field(default_factory=dict)
    output_attentions: bool = False
    input_ids: torch.Tensor | None = None
    mixer_io_layers: frozenset[int] = frozenset()


@dataclass
class LayerOutputs:
    """What the layers of one forward record for the model's output (and for later layers of the same
    forward): auxiliary terms, statistics, router logits, attention probabilities, mixer inputs/outputs and
    DSA selections."""

    aux: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    router_logits: list[torch.Tensor] = field(default_factory=list)
    attentions: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    mixer_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # DSA top-k selections [B, T, k] of this forward by layer index, reused by "shared" DSA layers
    # (dsa_indexer_types). Keyed by layer so a recomputation (gradient checkpointing) reads the right one.
    dsa_topk: dict[int, torch.Tensor] = field(default_factory=dict)
    # Keys/values of this forward (cache + new tokens) by source layer, read by the layers that share them
    # (kv_source_layers): attention (k, v) [B, hkv, S, d]; MLA (c_kv [B, S, r], k_pe [B, S, R·dr]).
    shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def kv_from_source(self, layer_idx: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values layer ``source`` computed in this forward, for layer ``layer_idx`` that shares
        them (``HybridConfig.kv_source_layers``)."""
        kv = self.shared_kv.get(source)
        if kv is None:
            raise RuntimeError(
                f"layer {layer_idx} reads the keys/values of layer {source} (kv_source_layers), which "
                "computed none in this forward"
            )
        return kv

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Record an auxiliary loss term (already averaged for this layer); the model sums them per name."""
        self.aux.setdefault(name, []).append(value)

    def aux_count(self) -> dict[str, int]:
        """How many terms of each name are recorded so far (a layer attaches the ones it adds)."""
        return {name: len(values) for name, values in self.aux.items()}

    def add_stat(self, name: str, layer_idx: int, value: Any) -> None:
        """Record a detached per-layer statistic (e.g. expert load) for logging; never part of the loss."""
        self.stats.setdefault(name, {})[layer_idx] = value


class MixerContext:
    """Per-forward information shared by all layers: ``batch``, the read-only :class:`BatchInfo`, and
    ``outputs``, the :class:`LayerOutputs` collector.

    Layers read and record through the names of both, on the context itself (``ctx.padding_mask``,
    ``ctx.cache``, ``ctx.add_aux(...)``, ``ctx.router_logits.append(...)``); the batch's fields cannot be
    assigned. Built from the :class:`BatchInfo` fields as keyword arguments, or from ``batch=`` (and
    optionally ``outputs=``).
    """

    __slots__ = ("batch", "outputs")

    def __init__(
        self, *, batch: BatchInfo | None = None, outputs: LayerOutputs | None = None, **batch_fields: Any
    ):
        if batch is not None and batch_fields:
            raise TypeError("MixerContext: pass batch= or the BatchInfo fields, not both")
        self.batch = batch if batch is not None else BatchInfo(**batch_fields)
        self.outputs = outputs if outputs is not None else LayerOutputs()

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Record an auxiliary loss term (already averaged for this layer); the model sums them per name."""
        self.outputs.add_aux(name, value)

    def aux_count(self) -> dict[str, int]:
        """How many terms of each name are recorded so far (a layer attaches the ones it adds)."""
        return self.outputs.aux_count()

    def add_stat(self, name: str, layer_idx: int, value: Any) -> None:
        """Record a detached per-layer statistic (e.g. expert load) for logging; never part of the loss."""
        self.outputs.add_stat(name, layer_idx, value)

    def kv_from_source(self, layer_idx: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values layer ``source`` computed in this forward, for layer ``layer_idx`` that shares
        them (``HybridConfig.kv_source_layers``)."""
        return self.outputs.kv_from_source(layer_idx, source)

    def __repr__(self) -> str:
        return f"MixerContext(batch={self.batch!r}, outputs={self.outputs!r})"


def _forward_to(part: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``ctx.{part}.{name}``")


# The attribute names layers read (``ctx.padding_mask``) and collect into (``ctx.aux``), read-only properties
# forwarding to the two parts.
for _part, _cls in (("batch", BatchInfo), ("outputs", LayerOutputs)):
    for _field in fields(_cls):
        setattr(MixerContext, _field.name, _forward_to(_part, _field.name))
del _part, _cls, _field
