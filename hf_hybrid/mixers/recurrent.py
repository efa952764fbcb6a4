"""The decode-state interface of recurrent layer kinds, public: the built-in ones (linear attention, Mamba-2,
Gated DeltaNet, KDA) and any kind defined outside the package use it (CONTRIBUTING.md, "The decode state of
a recurrent kind"). ``read_state`` / ``write_state`` keep a layer's conv + recurrent state in transformers'
``LinearAttentionLayer`` cache (beam search reorders it along the batch dimension); ``short_conv`` is the
short causal convolution that continues from its cached tail; ``zero_padding`` neutralises padded positions,
so that padding never leaks through the convolution or the decay (left padding through the conv and packing
through ``position_ids`` alone are known leaks of other implementations)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.conv import causal_conv1d, causal_conv1d_step
from .base import MixerContext


@dataclass
class RecurrentState:
    conv: torch.Tensor | None  # [B, C, K - 1]
    recurrent: torch.Tensor | None  # [B, H, Dk, Dv] fp32
    decoding: bool  # the cache already holds a state for this layer (continue from it)


def init_decay_and_dt(init, A_log: torch.Tensor, dt_bias: torch.Tensor, config) -> None:
    """The selective-state initialisation Mamba-2, Gated DeltaNet and KDA share (as Mamba-2 and fla's layers
    do): decay rates ``A ~ U[1, 16]`` (stored as ``A_log``) and ``dt`` log-uniform in ``[mamba_dt_min,
    mamba_dt_max]`` floored at ``mamba_dt_init_floor``, stored as ``dt_bias = softplus⁻¹(dt)``. ``init`` is
    transformers' ``initialization`` module (it skips tensors loaded from a checkpoint)."""
    init.copy_(A_log, torch.empty(A_log.shape).uniform_(1, 16).log_())
    lo, hi = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
    dt = torch.exp(torch.rand(dt_bias.shape) * (hi - lo) + lo).clamp(min=config.mamba_dt_init_floor)
    init.copy_(dt_bias, dt + torch.log(-torch.expm1(-dt)))


def read_state(ctx: MixerContext, layer_idx: int) -> RecurrentState:
    """This layer's cached states; ``decoding`` is False (start from zero) when the cache holds none yet."""
    cache = ctx.cache
    layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    # The recurrent state is written by every forward (the conv state only when the mixer has a conv).
    if layer is None or not getattr(layer, "is_recurrent_states_initialized", {}).get(0, False):
        return RecurrentState(None, None, False)
    conv = layer.conv_states[0] if layer.is_conv_states_initialized[0] else None
    return RecurrentState(conv, layer.recurrent_states[0], True)


def write_state(
    ctx: MixerContext, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None
) -> None:
    """Store the new states (nothing without a cache): ``recurrent`` is any tensor whose first dimension is
    the batch (keep it in fp32), ``conv`` the last K-1 inputs [B, C, K-1] or None. transformers'
    ``update_conv_state`` keeps the last ``conv_kernel_size`` columns of (old, new), which is exactly ``conv``
    when we pass K-1 columns."""
    cache = ctx.cache
    if cache is None:
        return
    if conv is not None:
        cache.update_conv_state(conv, layer_idx, conv_kernel_size=conv.shape[-1])
    if recurrent is not None:
        cache.update_recurrent_state(recurrent, layer_idx)


def zero_padding(x: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
    """x [B, T, ...] with padded positions (ctx.padding_mask False) set to zero."""
    if ctx.padding_mask is None:
        return x
    mask = ctx.padding_mask.view(*ctx.padding_mask.shape, *([1] * (x.dim() - 2)))
    return x * mask.to(x.dtype)


def short_conv(
    x: torch.Tensor,
    conv: nn.Conv1d,
    ctx: MixerContext,
    state: RecurrentState,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv over x [B, T, C] continuing from the cached conv state; returns (y, new conv
    state).

    The new state is only computed when there is a cache to put it in."""
    weight = conv.weight.squeeze(1)  # (C, K)
    if state.decoding and x.shape[1] == 1 and state.conv is not None:
        y, new = causal_conv1d_step(x[:, 0], state.conv, weight, conv.bias, activation=activation)
        return y[:, None], new
    y, new = causal_conv1d(
        x,
        weight,
        conv.bias,
        activation=activation,
        initial_state=state.conv if state.decoding else None,
        cu_seqlens=ctx.cu_seqlens,
        padding_mask=ctx.padding_mask,
    )
    return y, (new if ctx.cache is not None else None)
