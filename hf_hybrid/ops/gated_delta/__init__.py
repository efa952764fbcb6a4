"""Gated delta rule (Gated DeltaNet's token mixer): the spec, our chunked torch form, fla-core dispatch.

``gated_delta_rule(..., backend="auto")`` is the entry point for layers; see ``hf_hybrid.ops.fla_support``
for what ``auto`` picks. ``recurrent_gated_delta_rule_step`` is the one-token decode step.
"""

from __future__ import annotations

import torch

from hf_hybrid.ops.fla_support import resolve_backend, without_autocast
from hf_hybrid.ops.gated_delta.chunk import chunk_gated_delta_rule, unit_lower_inverse
from hf_hybrid.ops.gated_delta.fla import fla_chunk_gated_delta_rule
from hf_hybrid.ops.gated_delta.naive import (
    l2norm,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
)

_PATHS = {
    "torch": chunk_gated_delta_rule,
    "naive": naive_recurrent_gated_delta_rule,
    "fla": fla_chunk_gated_delta_rule,
}


def gated_delta_rule(
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
    """Gated delta rule over a sequence, by the chosen backend ("auto", "torch", "naive" or "fla").

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] (Hv a multiple of Hk); g (log decay, <= 0), beta [B, T, Hv];
    initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1] int32 packs N documents in one row (B == 1), else N ==
    B. Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, Hv, Dk, Dv].
    """
    path = resolve_backend("gated_delta_rule", backend, (q, k, v, g, beta, initial_state), gated=True)
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
    "chunk_gated_delta_rule",
    "fla_chunk_gated_delta_rule",
    "gated_delta_rule",
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_step",
    "unit_lower_inverse",
]
