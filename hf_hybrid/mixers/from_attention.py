"""Helpers for a kind's ``hybridize_init`` hook (its spec's :class:`hf_hybrid.specs.HybridizeInit`: how an
attention layer's weights become this kind's, used by ``hf_hybrid.convert.hybridize``). A leaf module: a
kind's file imports it without importing the converter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def identity_conv_(conv: nn.Conv1d, bias: torch.Tensor | None = None) -> None:
    """A depthwise causal conv [C, 1, K] that passes the current token through (last tap 1, the others 0; ours
    and fla's convs read the current token with the last tap), with ``bias`` (or zero) where the conv has a
    bias."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
        if conv.bias is not None:
            conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))


def gqa_note(config: Any) -> str:
    rep = config.num_attention_heads // config.num_key_value_heads
    return (
        f"KV heads repeated ×{rep} (GQA {config.num_attention_heads}/{config.num_key_value_heads})"
        if rep > 1
        else ""
    )


def common_dropped(config: Any, *, bias_kept: bool = False) -> list[str]:
    out = ["RoPE (the mixer has no positions)", "softmax (replaced by the mixer's recurrence)"]
    if config.attention_bias and not bias_kept:
        out.append("q/k/v biases (the mixer's projections have none)")
    if config.use_qk_norm:
        out.append("the per-token 1/rms of the q/k RMSNorm (its weight is folded into the projection rows)")
    return out
