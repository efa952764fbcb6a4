"""fla-core's chunk kernel for Kimi Delta Attention, behind our signature.

Checked against fla-core 0.6 ``fla.ops.kda.chunk_kda``: same [B, T, H, D] layout, GVA by ``HV % H == 0``
(value head h reads q/k head h // (HV // H), ours too), g [B, T, HV, K] in log space (already the decay: we
compute the gate ourselves, so ``use_gate_in_kernel=False``), beta [B, T, HV] after the sigmoid, state [N, HV,
K, V] (K before V, ``state_v_first=False``) and fp32 (fla asserts it), fp32 final state, cu_seqlens [N + 1]
with B == 1, L2 normalisation only when asked (``use_qk_l2norm_in_kernel``, eps 1e-6 as ours), chunk size 32
or 64, K <= 256. KDA's backward is its own kernel (``chunk_kda_bwd_kernel_wy_dqkg_fused``), not the
``chunk_bwd_dqkwg`` that fla-core refuses on Hopper with some Triton versions (``hf_hybrid.ops.fla_support``),
so it is not "gated" there. Imported lazily: this module imports without triton or fla-core.
"""

from __future__ import annotations

import torch

from ..gated_delta.fla import call_fla_delta_rule

# chunk sizes fla-core's KDA accepts; the chunk size changes speed, not results, so another value (tuned for
# our torch path) falls back to fla's default
FLA_CHUNK_SIZES = (32, 64)
# fla-core 0.6 asserts K <= 256 in chunk_kda; the dispatcher (``hf_hybrid.ops.kda.kda``) checks it first
FLA_MAX_KEY_DIM = 256


def fla_chunk_kda(
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
    """Same contract as ``chunk_kda`` (shapes and dtypes), computed by fla-core."""
    from fla.ops.kda import chunk_kda as fla_chunk

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
