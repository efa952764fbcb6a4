"""Causal depthwise 1-D convolution (the short conv of Mamba-2 / Gated DeltaNet / linear attention layers).

y_t[c] = act(bias[c] + Σ_{i<K} weight[c, i] · x_{t-K+1+i}[c]): the last tap multiplies the current token
(the layout of ``nn.Conv1d(C, C, K, groups=C).weight[:, 0]`` and of the causal-conv1d package). The conv
state is the last K-1 inputs [B, C, K-1], oldest first.

Padding and packing never leak (known bugs elsewhere: left padding leaking through the short conv, packing
via ``position_ids`` alone leaking state across documents):
- ``padding_mask`` [B, T] (True = real token): padded inputs are zeroed *before* the conv and the outputs
  there are zeroed too. Left padding is then exactly a zero initial state; for right padding the final state
  is the K-1 inputs ending at the last real token. (A row that is left-padded *and* continues from an
  ``initial_state`` would see the zeroed pad between the two; decoding never asks for that.)
- ``cu_seqlens`` [N + 1] (B == 1): each document starts from its own ``initial_state[n]`` (zeros if None)
  and returns its own final state, through the shared unpack/repack of :mod:`hf_hybrid.ops.varlen`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_hybrid.ops.varlen import check_cu_seqlens, pack, unpack, varlen_index

ACTIVATIONS = (None, "silu", "swish")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of: {ACTIVATIONS}")
    return y if activation is None else F.silu(y)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time.

    x [B, T, C]; weight [C, K]; bias [C] or None; initial_state [B, C, K-1] ([N, C, K-1] with cu_seqlens)
    or None (zeros); cu_seqlens [N + 1] packs N documents in one row (B == 1); padding_mask [B, T] bool.
    Returns y [B, T, C] in x's dtype and the final state [B or N, C, K-1] (the last K-1 real inputs).
    """
    batch, length, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be [C={channels}, K] (got {tuple(weight.shape)})")
    width = weight.shape[1] - 1  # K - 1
    if cu_seqlens is not None:
        if padding_mask is not None:
            raise ValueError("pass either cu_seqlens (packed documents) or padding_mask, not both")
        check_cu_seqlens(cu_seqlens, total=length, batch=batch)
        index = varlen_index(cu_seqlens, length)
        y, final = causal_conv1d(
            unpack(x, index),
            weight,
            bias,
            activation=activation,
            initial_state=initial_state,
            padding_mask=index.valid_NL,
        )
        return pack(y, index), final
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width)
    elif initial_state.shape != (batch, channels, width):
        raise ValueError(
            f"initial_state must be [{batch}, {channels}, {width}] (got {tuple(initial_state.shape)})"
        )
    if padding_mask is not None:
        x = x * padding_mask[..., None].to(x.dtype)
    x_ext = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (B, C, K-1+T)
    y = F.conv1d(
        x_ext, weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype), groups=channels
    )
    y = _activate(y, activation).transpose(1, 2)  # (B, T, C)
    if padding_mask is None:
        final = x_ext[..., x_ext.shape[-1] - width :]
    else:
        y = y * padding_mask[..., None].to(y.dtype)
        # the K-1 inputs ending at the last real token: x_ext[end : end + K-1], end = last real index + 1
        positions = torch.arange(1, length + 1, device=x.device)
        end = (padding_mask.long() * positions).amax(dim=1)  # (B,) 0 when the row has no real token
        taps = end[:, None] + torch.arange(width, device=x.device)  # (B, K-1)
        final = x_ext.gather(2, taps[:, None, :].expand(batch, channels, width))
    return y, final


def causal_conv1d_step(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x [B, C], state [B, C, K-1] -> (y [B, C], new state [B, C, K-1])."""
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (B, C, K)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return _activate(y, activation), window[..., 1:]
