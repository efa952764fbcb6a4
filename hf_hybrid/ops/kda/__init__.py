"""Kimi Delta Attention (the delta rule with a per-channel decay): the names it had here, now
``hf_hybrid.ops.delta_rule`` (one package for the scalar and the per-channel decay)."""

from hf_hybrid.ops.delta_rule import (
    check_kda_shapes,
    chunk_kda,
    fla_chunk_kda,
    kda,
    naive_recurrent_kda,
    recurrent_kda_step,
)

__all__ = [
    "check_kda_shapes",
    "chunk_kda",
    "fla_chunk_kda",
    "kda",
    "naive_recurrent_kda",
    "recurrent_kda_step",
]
