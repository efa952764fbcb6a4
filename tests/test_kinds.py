"""Every built-in layer kind passes the kit a kind author runs (``hf_hybrid.testing``). The checks that other
files already run per kind, on more stacks (decode, prefill, padding, packing, generate, beam search:
test_linear_mixers, test_core, test_mla, test_dsa, test_kda_mixer, test_moe), are not repeated here."""

from __future__ import annotations

import pytest

from hf_hybrid import registry
from hf_hybrid.testing import check_layer_kind

# The kit's settings for each built-in kind: a kind left out here fails test_every_builtin_kind_is_covered.
MIXERS = {
    "attention": {},
    "sliding_attention": {"sliding_window": 5},
    "mla": {"q_lora_rank": 12},
    "dsa": {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 4},  # sparse: the indexer KL is a term
    "linear_attention": {"linear_feature_map": "elu", "linear_decay": "scalar", "linear_conv_kernel_size": 3},
    "mamba2": {"mamba_n_groups": 2},
    "gated_deltanet": {},
    "kda": {},
    "none": {"mixer_types": ["none", "attention"]},  # a layer needs a mixer or an MLP
}
MLPS = {
    "dense": {},
    "moe": {"num_shared_experts": 1, "router_seq_aux_loss_coef": 0.01},  # balance, z-loss and sequence terms
    "none": {"mlp_types": ["none", "dense"]},
}
CHECKS = ["batch", "save_load", "cost", "gradients", "aux_terms"]


def test_every_builtin_kind_is_covered():
    assert {s.name for s in registry.mixer_specs().values() if s.builtin} == set(MIXERS)
    assert {s.name for s in registry.mlp_specs().values() if s.builtin} == set(MLPS)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_builtin_mixer_passes_the_kit(kind):
    assert check_layer_kind(kind, config_overrides=MIXERS[kind], checks=CHECKS) == CHECKS


@pytest.mark.parametrize("kind", sorted(MLPS))
def test_builtin_mlp_passes_the_kit(kind):
    assert check_layer_kind(mlp=kind, config_overrides=MLPS[kind], checks=CHECKS) == CHECKS
