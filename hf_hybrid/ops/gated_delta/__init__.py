"""The gated delta rule (Gated DeltaNet's token mixer): the names it had here, now
``hf_hybrid.ops.delta_rule`` (one package for the scalar and the per-channel decay)."""

from hf_hybrid.ops.delta_rule import (
    chunk_gated_delta_rule,
    fla_chunk_gated_delta_rule,
    gated_delta_rule,
    l2norm,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
    unit_lower_inverse,
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
