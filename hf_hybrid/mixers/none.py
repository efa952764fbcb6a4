"""``mixer_types`` value ``"none"``: a layer without token mixing, ``x + mlp(norm(x))`` only (Nemotron-H's MLP
/ MoE blocks). It has no module and no input norm; transformers' layer type for such a layer is ``"moe"`` (its
cache layer holds nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..specs import MixerCost, register_mixer

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig

# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def no_mixer_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """An MLP-only layer: no token mixer and no input norm."""
    return MixerCost(0, 0)


register_mixer(
    "none",
    layer_type="moe",
    cost=no_mixer_cost,
    describe=lambda config: [
        ("MLP-only layers", str([i for i, m in enumerate(config.mixer_types) if m == "none"]))
    ],
)(None)
