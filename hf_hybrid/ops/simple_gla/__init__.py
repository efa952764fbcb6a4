"""Simple GLA (scalar per-head decay; per-channel decay too): the spec, chunked torch form, fla dispatch.

One op serves three mixers: Mamba-2/SSD (q = C, k = B, v = Δ·x, g = Δ·A, scale = 1), plain linear attention
(g = None) and GLA-style per-channel decay (g [B, T, H, Dk]). ``simple_gla(..., backend="auto")`` is the
entry point for layers; ``recurrent_simple_gla_step`` is the one-token decode step.
"""

from __future__ import annotations

import torch

from hf_hybrid.ops.fla_support import resolve_backend
from hf_hybrid.ops.simple_gla.chunk import chunk_simple_gla
from hf_hybrid.ops.simple_gla.fla import fla_chunk_simple_gla
from hf_hybrid.ops.simple_gla.naive import naive_recurrent_simple_gla, recurrent_simple_gla_step

_PATHS = {
    "torch": chunk_simple_gla,
    "naive": naive_recurrent_simple_gla,
    "fla": fla_chunk_simple_gla,
}


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA over a sequence, by the chosen backend ("auto", "torch", "naive" or "fla").

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; g [B, T, H] (or [B, T, H, Dk], or None = no decay);
    initial_state [N, H, Dk, Dv]; cu_seqlens [N + 1] int32 packs N documents in one row (B == 1), else N == B.
    Returns o [B, T, H, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, H, Dk, Dv].
    """
    # fla's refused backward (chunk_bwd_dqkwg with g) is the scalar-decay kernel; chunk_gla has its own
    gated = g is not None and g.dim() == 3
    path = resolve_backend("simple_gla", backend, (q, k, v, g, initial_state), gated=gated)
    # The chunked forms choose their own precisions (fp32 decays and states); an enclosing autocast (Trainer's
    # bf16 on CPU, TRL's default) would recast their inner matmuls and leave the hand-written backwards with
    # mixed dtypes.
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _PATHS[path](
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )


__all__ = [
    "chunk_simple_gla",
    "fla_chunk_simple_gla",
    "naive_recurrent_simple_gla",
    "recurrent_simple_gla_step",
    "simple_gla",
]
