"""Dense SwiGLU MLP, and the "none" kind (a layer with a token mixer only). Kinds are declared in
``hf_hybrid.registry`` next to their class.

An MLP is built as ``MLP(config, layer_idx)`` and called as ``mlp(hidden_states [B, T, H], ctx) -> [B, T, H]``
(``ctx`` is the ``MixerContext``; the MoE uses it for padding-aware balancing losses and load statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN

from .mixers.base import MixerContext
from .specs import MLP_REGISTRY, MLPCost, register_mlp, require_positive  # noqa: F401  (MLP_REGISTRY re-exported)

if TYPE_CHECKING:
    from .configuration_hybrid import HybridConfig

# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def swiglu_params(config: HybridConfig, intermediate: int) -> int:
    return (3 if config.mlp_gated else 2) * config.hidden_size * intermediate  # ungated: no gate_proj


def dense_mlp_cost(config: HybridConfig, layer_idx: int) -> MLPCost:
    matmul = swiglu_params(config, config.intermediate_size)
    bias = (
        (2 if config.mlp_gated else 1) * config.intermediate_size + config.hidden_size
        if config.mlp_bias
        else 0
    )
    return MLPCost(matmul + bias, matmul)


def no_mlp_cost(config: HybridConfig, layer_idx: int) -> MLPCost:
    return MLPCost(0, 0)


register_mlp("none", cost=no_mlp_cost)(None)  # no MLP: the layer is x + mixer(norm(x)) only


class SwiGLU(nn.Module):
    """``down(act(gate(x)) * up(x))``; the unit that dense layers, shared experts and upcycling all reuse.
    ``gated=False``: ``down(act(up(x)))`` with no ``gate_proj`` (Nemotron-H's relu² MLPs). ``limit``
    (``mlp_swiglu_limit``, GLM-5-Next): ``down(act(min(gate(x), limit)) * clamp(up(x), -limit, limit))``."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        bias: bool = False,
        gated: bool = True,
        limit: float | None = None,
    ):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return self.down_proj(self.act_fn(gate) * up)


def _validate_dense(config: HybridConfig) -> None:
    require_positive(config, "intermediate_size")


def _describe_dense(config: HybridConfig) -> list[tuple[str, str]]:
    kind = "SwiGLU" if config.mlp_gated else "ungated MLP"
    clamp = f", clamped at {config.mlp_swiglu_limit}" if config.mlp_swiglu_limit is not None else ""
    return [("dense MLP", f"{kind} ({config.hidden_act}){clamp}, intermediate {config.intermediate_size}")]


@register_mlp(
    "dense",
    cost=dense_mlp_cost,
    validate=_validate_dense,
    describe=_describe_dense,
    lora_targets=("gate_proj", "up_proj", "down_proj"),
    functional_fields=lambda config: ("intermediate_size", "mlp_bias", "mlp_swiglu_limit"),
)
class DenseMLP(SwiGLU):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            config.mlp_bias,
            gated=config.mlp_gated,
            limit=config.mlp_swiglu_limit,
        )
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, ctx: MixerContext | None = None) -> torch.Tensor:
        return super().forward(x)
