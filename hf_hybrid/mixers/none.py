"""``mixer_types`` value ``"none"``: a layer without token mixing, ``x + mlp(norm(x))`` only (Nemotron-H's MLP
/ MoE blocks). It has no module and no input norm; transformers' layer type for such a layer is ``"moe"`` (its
cache layer holds nothing)."""

from ..cost import no_mixer_cost
from ..registry import register_mixer

register_mixer(
    "none",
    layer_type="moe",
    cost=no_mixer_cost,
    describe=lambda config: [
        ("MLP-only layers", str([i for i, m in enumerate(config.mixer_types) if m == "none"]))
    ],
)(None)
