"""fla-core's chunk kernel for the gated delta rule, behind our signature.

Checked against fla-core 0.6 ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``: same [B, T, H, D] layout
(no head_first), GVA by ``HV % H == 0`` with value head h reading q/k head h // (HV // H) (ours too),
g and beta [B, T, HV], g in log space, state [N, HV, Dk, Dv] (K before V), fp32 final state, cu_seqlens
[N + 1] with B == 1, L2 normalisation only when asked (``use_qk_l2norm_in_kernel``, eps 1e-6 as ours),
chunk size 16/32/64.
Imported lazily: this module imports without triton or fla-core.
"""

from __future__ import annotations

import torch

# chunk sizes fla-core's gated delta rule accepts; the chunk size changes speed, not results, so another
# value (tuned for our torch path) falls back to fla's default
FLA_CHUNK_SIZES = (16, 32, 64)


def fla_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``chunk_gated_delta_rule`` (shapes and dtypes), computed by fla-core."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    return call_fla_delta_rule(
        fla_chunk,
        FLA_CHUNK_SIZES,
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        chunk_size=chunk_size,
    )


def call_fla_delta_rule(
    fla_chunk,
    chunk_sizes: tuple[int, ...],
    q,
    k,
    v,
    g,
    beta,
    *,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    use_qk_l2norm,
    chunk_size,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call one of fla-core's chunked delta-rule kernels (gated delta rule, KDA: the same calling convention)
    with our dtypes and defaults: q's dtype for k/v/β, fp32 decays and state, long cu_seqlens, a chunk size it
    accepts."""
    dtype = q.dtype
    o, final_state = fla_chunk(
        q,
        k.to(dtype),
        v.to(dtype),
        g.float(),  # fla cumulates g in fp32 anyway
        beta.to(dtype),  # fla's kernels multiply beta into k/v tiles of q's dtype
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
        chunk_size=chunk_size if chunk_size in chunk_sizes else 64,
    )
    return o.to(dtype), (final_state.float() if output_final_state else None)
