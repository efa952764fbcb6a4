"""Kimi Delta Attention (the gated delta rule with a per-channel decay): the spec, our chunked torch form,
fla-core dispatch.

``kda(..., backend="auto")`` is the entry point for layers; see ``hf_hybrid.ops.fla_support`` for what
``auto`` picks. ``recurrent_kda_step`` is the one-token decode step.
"""

from __future__ import annotations

import logging

import torch

from hf_hybrid.ops.fla_support import log_once, resolve_backend, without_autocast
from hf_hybrid.ops.kda.chunk import chunk_kda
from hf_hybrid.ops.kda.fla import FLA_MAX_KEY_DIM, fla_chunk_kda
from hf_hybrid.ops.kda.naive import check_kda_shapes, naive_recurrent_kda, recurrent_kda_step

_PATHS = {
    "torch": chunk_kda,
    "naive": naive_recurrent_kda,
    "fla": fla_chunk_kda,
}


def kda(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention over a sequence, by the chosen backend ("auto", "torch", "naive" or "fla").

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] (Hv a multiple of Hk); g (log decay, <= 0) [B, T, Hv, Dk];
    beta [B, T, Hv]; initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1] int32 packs N documents in one row
    (B == 1), else N == B. Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the fp32
    state [N, Hv, Dk, Dv].
    """
    # not "gated" for fla_support: KDA's backward is not the chunk_bwd_dqkwg kernel fla refuses on some Hopper
    # set-ups
    path = resolve_backend("kda", backend, (q, k, v, g, beta, initial_state), gated=False)
    if path == "fla" and q.shape[-1] > FLA_MAX_KEY_DIM:
        why = f"fla-core's chunk_kda takes key head dims <= {FLA_MAX_KEY_DIM} (got {q.shape[-1]})"
        if backend == "fla":
            raise RuntimeError(f"kda: backend='fla' was requested but {why}")
        log_once(
            f"kda:{why}", f"kda: not using fla-core ({why}); using the chunked torch path", logging.WARNING
        )
        path = "torch"
    with without_autocast(q):
        return _PATHS[path](
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


__all__ = [
    "check_kda_shapes",
    "chunk_kda",
    "fla_chunk_kda",
    "kda",
    "naive_recurrent_kda",
    "recurrent_kda_step",
]
