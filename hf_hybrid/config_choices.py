"""The allowed values of each enumerated ``HybridConfig`` field. A leaf module: the config validates against
it, and a layer kind or a converter that offers the same choices reads it without importing the config (a
kind's file must not import the config: the registry imports the kinds while the config asks it for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

_CHOICES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2"),
    "linear_feature_map": ("identity", "elu", "relu", "random_features"),
    "linear_decay": ("none", "scalar", "per_channel", "fixed_slope"),
    "linear_qkv_activation": ("none", "silu"),
    "linear_norm_scope": ("head", "full"),
    "linear_backend": ("auto", "torch", "naive", "fla"),
    "mla_decode": ("absorbed", "naive"),
    "qk_norm_scope": ("head", "full"),
    "dsa_base": ("mla", "attention"),
    "dsa_mode": ("sparse", "dense_warmup", "dense"),
    "dsa_selector": ("indexer", "structured"),
    "dsa_backend": ("auto", "torch", "naive", "triton"),
    "router_scoring_func": ("softmax", "sigmoid"),
    "moe_routing": ("topk", "hash"),
    "hyper_connections": ("none", "ihc", "mhc"),
}

# The allowed values of each enumerated field, for tools and converters that offer the same choices
# (read-only).
FIELD_CHOICES: Mapping[str, tuple[Any, ...]] = MappingProxyType(_CHOICES)

__all__ = ["FIELD_CHOICES"]
