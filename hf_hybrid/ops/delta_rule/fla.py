"""fla-core's chunk kernels for the delta rule (gated delta rule, KDA), behind our signature.

Gated delta rule: checked against fla-core 0.6 ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``: same
[B, T, H, D] layout (no head_first), GVA by ``HV % H == 0`` with value head h reading q/k head h // (HV // H)
(ours too), g and beta [B, T, HV], g in log space, state [N, HV, Dk, Dv] (K before V), fp32 final state,
cu_seqlens [N + 1] with B == 1, L2 normalisation only when asked (``use_qk_l2norm_in_kernel``, eps 1e-6 as
ours), chunk size 16/32/64.

KDA: checked against fla-core 0.6 ``fla.ops.kda.chunk_kda``: the same conventions, with g [B, T, HV, K] in
log space (already the decay: we compute the gate ourselves, so ``use_gate_in_kernel=False``), beta after the
sigmoid, state [N, HV, K, V] (``state_v_first=False``) and fp32 (fla asserts it), chunk size 32 or 64,
K <= 256. KDA's backward is its own kernel (``chunk_kda_bwd_kernel_wy_dqkg_fused``), not the
``chunk_bwd_dqkwg`` that fla-core refuses on Hopper with some Triton versions (``hf_hybrid.ops.fla_support``),
so it is not "gated" there.

Imported lazily: this module imports without triton or fla-core.
"""

from __future__ import annotations

import torch

# chunk sizes fla-core's kernels accept; the chunk size changes speed, not results, so another value (tuned
# for our torch path) falls back to fla's default
FLA_CHUNK_SIZES = (16, 32, 64)
FLA_KDA_CHUNK_SIZES = (32, 64)
# fla-core 0.6 asserts K <= 256 in chunk_kda; the dispatcher (``hf_hybrid.ops.delta_rule``) checks it first
FLA_MAX_KEY_DIM = 256


def fla_chunk_delta_rule(
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
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``chunk_delta_rule`` (shapes and dtypes), computed by fla-core: ``chunk_kda`` for a
    per-channel decay, ``chunk_gated_delta_rule`` for a scalar one. Our dtypes and defaults: q's dtype for
    k/v/β, fp32 decays and state, long cu_seqlens, a chunk size the kernel accepts."""
    if per_channel:
        from fla.ops.kda import chunk_kda as fla_chunk

        chunk_sizes = FLA_KDA_CHUNK_SIZES
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        chunk_sizes = FLA_CHUNK_SIZES
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


def fla_chunk_gated_delta_rule(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fla_chunk_delta_rule` with a scalar decay: g [B, T, Hv]."""
    return fla_chunk_delta_rule(q, k, v, g, beta, per_channel=False, **kwargs)


def fla_chunk_kda(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fla_chunk_delta_rule` with a per-channel decay: g [B, T, Hv, Dk]."""
    return fla_chunk_delta_rule(q, k, v, g, beta, per_channel=True, **kwargs)
