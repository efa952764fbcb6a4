"""The decode-state interface of recurrent layer kinds, public: the built-in ones (linear attention, Mamba-2,
Gated DeltaNet, KDA) and any kind defined outside the package use it (CONTRIBUTING.md, "The decode state of
a recurrent kind"). ``read_state`` / ``write_state`` keep a layer's conv + recurrent state in transformers'
``LinearAttentionLayer`` cache (beam search reorders it along the batch dimension); ``short_conv`` is the
short causal convolution that continues from its cached tail; ``zero_padding`` neutralises padded positions,
so that padding never leaks through the convolution or the decay (left padding through the conv and packing
through ``position_ids`` alone are known leaks of other implementations)."""

from __future__ import annotations

import math
from collections.abc import Callable
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


def states_to_keep(ctx: MixerContext, num_new_tokens: int) -> int:
    """How many trailing states this forward must hand to :func:`write_state` (the states after each of the
    last n tokens): more than 1 only while a ``HybridCache`` records its past for a rollback (assisted /
    speculative decoding)."""
    keep = getattr(ctx.cache, "states_to_keep", None)
    return 1 if keep is None else keep(num_new_tokens)


def run_recurrence(
    state: RecurrentState,
    num_new_tokens: int,
    keep: int,
    *,
    full: Callable[[int, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
    step: Callable[[int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run a recurrence over this forward's tokens and return (o [B, T, ...], the states after each of the
    last ``keep`` tokens; the last one is the final state).

    ``full(lo, hi, initial)`` runs tokens ``lo:hi`` at once (the chunked op; ``initial`` None = zeros) and
    ``step(i, state)`` one token ``i`` (the recurrent step). A one-token decode is one step; otherwise the
    tokens before the last ``keep`` go through ``full`` and those ``keep`` one by one, each state kept."""
    t = num_new_tokens
    initial = state.recurrent if state.decoding else None
    if state.decoding and t == 1:
        o, s = step(0, initial)
        return o[:, None], [s]
    if keep <= 1:
        o, s = full(0, t, initial)
        return o, [s]
    head = max(t - keep, 0 if initial is not None else 1)  # a step needs a state to start from
    outs, states, s = [], [], initial
    if head:
        o, s = full(0, head, initial)
        outs.append(o)
        if head > t - keep:
            states.append(s)
    for i in range(head, t):
        o, s = step(i, s)
        outs.append(o[:, None])
        states.append(s)
    return torch.cat(outs, dim=1), states


def write_state(
    ctx: MixerContext,
    layer_idx: int,
    conv: torch.Tensor | list[torch.Tensor] | None,
    recurrent: torch.Tensor | list[torch.Tensor | None] | None,
    num_new_tokens: int | None = None,
) -> None:
    """Store the new states: ``conv`` / ``recurrent`` are the states after each of the last n tokens of this
    forward (n from :func:`states_to_keep`; the last one is the new state), or the new state alone (a mixer
    that keeps no history: the cache can then not be rolled back into this forward). ``num_new_tokens``
    defaults to the forward's length. A conv state is already the last K-1 inputs: transformers'
    ``update_conv_state`` keeps the last ``conv_kernel_size`` columns of (old, new), which is exactly it when
    we pass K-1 columns."""
    cache = ctx.cache
    if cache is None:
        return
    conv = [conv] if isinstance(conv, torch.Tensor) else conv
    recurrent = [recurrent] if isinstance(recurrent, torch.Tensor) else recurrent
    if num_new_tokens is None:
        num_new_tokens = ctx.position_ids.shape[-1]
    if recurrent is not None and recurrent[-1] is None:
        recurrent = None
    write = getattr(cache, "write_recurrent", None)
    if write is not None:
        write(layer_idx, conv, recurrent, num_new_tokens=num_new_tokens)
        return
    if conv is not None:
        cache.update_conv_state(conv[-1], layer_idx, conv_kernel_size=conv[-1].shape[-1])
    if recurrent is not None:
        cache.update_recurrent_state(recurrent[-1], layer_idx)


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
    keep: int = 1,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Depthwise causal conv over x [B, T, C] continuing from the cached conv state; returns (y, the conv
    states [B, C, K-1] after each of the last ``keep`` tokens, the last one being the new state).

    The states are only computed when there is a cache to put them in."""
    weight = conv.weight.squeeze(1)  # (C, K)
    if state.decoding and x.shape[1] == 1 and state.conv is not None:
        y, new = causal_conv1d_step(x[:, 0], state.conv, weight, conv.bias, activation=activation)
        return y[:, None], [new]
    initial = state.conv if state.decoding else None
    y, new = causal_conv1d(
        x,
        weight,
        conv.bias,
        activation=activation,
        initial_state=initial,
        cu_seqlens=ctx.cu_seqlens,
        padding_mask=ctx.padding_mask,
    )
    if ctx.cache is None:
        return y, None
    states = [new]
    if keep > 1:
        # The state after token m is the K-1 inputs ending there: columns m .. m+K-2 of (initial, x).
        width = weight.shape[1] - 1
        xs = zero_padding(x, ctx).transpose(1, 2)  # (B, C, T)
        start = xs.new_zeros(*xs.shape[:2], width) if initial is None else initial.to(xs.dtype)
        ext = torch.cat([start, xs], dim=-1)  # (B, C, K-1+T)
        t = x.shape[1]
        states = [ext[..., m : m + width] for m in range(t - keep + 1, t)] + states
    return y, states
