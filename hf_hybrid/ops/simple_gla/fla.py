"""fla-core's chunk kernels for simple GLA (and per-channel GLA), behind our signature.

Checked against fla-core 0.6: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g [B, T, H] or None, ...)`` and
``fla.ops.gla.chunk_gla(q, k, v, g [B, T, H, K], ...)``: [B, T, H, D] layout, g in log space, state
[N, H, Dk, Dv], cu_seqlens [N + 1] with B == 1, no normalisation of q/k. ``chunk_gla`` picks its own chunk
size and ``chunk_simple_gla`` needs a power of two >= 16: the chunk size changes speed, not results, so other
values fall back to fla's default. Imported lazily: this module imports without triton or fla-core.
"""

from __future__ import annotations

import torch


def fla_chunk_simple_gla(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``chunk_simple_gla`` (shapes and dtypes), computed by fla-core."""
    dtype = q.dtype
    common = dict(
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
    )
    if g is not None and g.dim() == 4:
        from fla.ops.gla import chunk_gla

        o, final_state = chunk_gla(q, k.to(dtype), v.to(dtype), g.float(), **common)
    else:
        from fla.ops.simple_gla import chunk_simple_gla as fla_chunk

        o, final_state = fla_chunk(
            q,
            k.to(dtype),
            v.to(dtype),
            None if g is None else g.float(),
            chunk_size=chunk_size if chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0 else 64,
            **common,
        )
    return o.to(dtype), (final_state.float() if output_final_state else None)
