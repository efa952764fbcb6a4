"""The delta rule with a decay, for Gated DeltaNet (one decay per head, the gated delta rule) and Kimi Delta
Attention (one decay per key channel): the spec, our chunked torch form, fla-core dispatch.

``delta_rule(..., backend="auto")`` is the one dispatcher; ``gated_delta_rule`` and ``kda`` are it with the
decay form fixed (g [B, T, Hv] or [B, T, Hv, Dk]), the entry points for layers. See
``hf_hybrid.ops.fla_support`` for what ``auto`` picks. ``recurrent_delta_rule_step`` (and its two named forms)
is the one-token decode step.
"""

from __future__ import annotations

import logging

import torch

from hf_hybrid.ops.delta_rule.chunk import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_kda,
    per_channel_scores,
    unit_lower_inverse,
)
from hf_hybrid.ops.delta_rule.fla import (
    FLA_MAX_KEY_DIM,
    fla_chunk_delta_rule,
    fla_chunk_gated_delta_rule,
    fla_chunk_kda,
)
from hf_hybrid.ops.delta_rule.naive import (
    check_delta_rule_shapes,
    check_gated_delta_shapes,
    check_kda_shapes,
    l2norm,
    naive_recurrent_delta_rule,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_kda,
    recurrent_delta_rule_step,
    recurrent_gated_delta_rule_step,
    recurrent_kda_step,
)
from hf_hybrid.ops.fla_support import log_once, resolve_backend, without_autocast

_PATHS = {
    "torch": chunk_delta_rule,
    "naive": naive_recurrent_delta_rule,
    "fla": fla_chunk_delta_rule,
}


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    per_channel: bool,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule over a sequence, by the chosen backend ("auto", "torch", "naive" or "fla").

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] (Hv a multiple of Hk); g (log decay, <= 0) [B, T, Hv], or
    [B, T, Hv, Dk] if ``per_channel``; beta [B, T, Hv]; initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1]
    int32 packs N documents in one row (B == 1), else N == B. Returns o [B, T, Hv, Dv] in q's dtype and, if
    ``output_final_state``, the fp32 state [N, Hv, Dk, Dv].
    """
    op = "kda" if per_channel else "gated_delta_rule"
    # KDA is not "gated" for fla_support: its backward is not the chunk_bwd_dqkwg kernel fla refuses on some
    # Hopper set-ups
    path = resolve_backend(op, backend, (q, k, v, g, beta, initial_state), gated=not per_channel)
    if per_channel and path == "fla" and q.shape[-1] > FLA_MAX_KEY_DIM:
        why = f"fla-core's chunk_kda takes key head dims <= {FLA_MAX_KEY_DIM} (got {q.shape[-1]})"
        if backend == "fla":
            raise RuntimeError(f"{op}: backend='fla' was requested but {why}")
        log_once(
            f"{op}:{why}", f"{op}: not using fla-core ({why}); using the chunked torch path", logging.WARNING
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
            per_channel=per_channel,
        )


def gated_delta_rule(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`delta_rule` with one decay per token and value head (Gated DeltaNet): g [B, T, Hv]."""
    return delta_rule(q, k, v, g, beta, per_channel=False, **kwargs)


def kda(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`delta_rule` with one decay per key channel (Kimi Delta Attention): g [B, T, Hv, Dk]."""
    return delta_rule(q, k, v, g, beta, per_channel=True, **kwargs)


__all__ = [
    "FLA_MAX_KEY_DIM",
    "check_delta_rule_shapes",
    "check_gated_delta_shapes",
    "check_kda_shapes",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_kda",
    "delta_rule",
    "fla_chunk_delta_rule",
    "fla_chunk_gated_delta_rule",
    "fla_chunk_kda",
    "gated_delta_rule",
    "kda",
    "l2norm",
    "naive_recurrent_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_kda",
    "per_channel_scores",
    "recurrent_delta_rule_step",
    "recurrent_gated_delta_rule_step",
    "recurrent_kda_step",
    "unit_lower_inverse",
]
