"""``axk2`` (SK Telecom's A.X-K2) ↔ hf_hybrid: DSA on MLA + DeepSeek-V3's MoE, with gated norms and a gated
MLA output.

Layer map (native → ours):
- ``self_attn.*`` → ``mixer.*`` (``dsa`` with ``dsa_base="mla"``). ``q_gate_proj`` (reads
  ``[q_a_layernorm(c_q), c_q]``, emits per head ``[q (dn + dr), gate (dv)]``) is our ``q_b_proj`` with
  ``mla_output_gate=True``, row for row except the interleaved rope rows, de-interleaved as for DeepSeek
  (:func:`rope_deinterleave_index`); no ``q_b_proj`` of its own. The indexer rotates halves of its first
  ``qk_rope_head_dim`` channels like DeepSeek-V3.2's (and ours): its weights keep their rows.
- ``input_layernorm`` (every layer) and ``post_attention_layernorm`` (MoE layers) are ``AXK2GatedRMSNorm``:
  ``norm.weight`` / ``mlp.fc1`` / ``mlp.fc2`` → our ``LowRankGatedRMSNorm``'s ``norm.weight`` / ``gate_down``
  / ``gate_up`` (``gated_norms`` per layer ``"both"`` on MoE layers, ``"mixer"`` on dense ones,
  ``gated_norm_rank``).
- MoE: DeepSeek-V3's weights and router (sigmoid, correction bias, renormalised, ``routed_scaling_factor``);
  ``n_group=None`` (A.X-K2-Light: no expert groups) is our ``n_group = topk_group = 1``.
- Latent norms and the indexer's LayerNorm use eps 1e-6 (``mla_norm_eps``, ``index_norm_eps``).

DSA exactness as for ``deepseek_v32``: transformers selects with ``torch.topk`` (order among equal scores
unspecified), we break ties toward the most recent key; equal whenever a query's indexer scores have no tie at
the top-k cut.
"""

from __future__ import annotations

from .base import Custom, NativeFamily, RuleContext, W, fail, ours_fixed, permute_rows, same
from .deepseek import (
    _DSA_FIXED,
    _DSA_SIZES,
    _LATENT_EPS,
    DENSE_RULES,
    INDEXER_RULES,
    MLA_MOE_SAME,
    MOE_RULES,
    _check_dsa_export,
    _check_kv_heads,
    _kv_a_rows,
    _per_head_rope_rows,
)
from .moe_attention import MODEL_RULES


def _q_gate_rows(ctx: RuleContext):
    c = ctx.ours
    block = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim  # per head: [q_nope, q_rope, gate]
    return _per_head_rope_rows(c.num_attention_heads, block, c.qk_nope_head_dim, c.qk_rope_head_dim)


MLA_RULES = (
    W("self_attn.q_gate_proj.weight", "mixer.q_b_proj.weight", *permute_rows(_q_gate_rows)),
    W("self_attn.kv_a_proj_with_mqa.weight", "mixer.kv_a_proj_with_mqa.weight", *permute_rows(_kv_a_rows)),
    W(
        "self_attn.kv_a_proj_with_mqa.bias",
        "mixer.kv_a_proj_with_mqa.bias",
        *permute_rows(_kv_a_rows),
        when=lambda ctx: ctx.ours.attention_bias,
    ),
    W("self_attn.", "mixer."),  # q_a_proj, q_a_layernorm, kv_a_layernorm, kv_b_proj, o_proj
)


def _gated(native: str, ours: str) -> tuple[W, ...]:
    return (
        W(f"{native}.norm.weight", f"{ours}.norm.weight"),
        W(f"{native}.mlp.fc1.weight", f"{ours}.gate_down.weight"),
        W(f"{native}.mlp.fc2.weight", f"{ours}.gate_up.weight"),
    )


# The MLP's own norm goes with the MLP kind: gated on MoE layers, a plain RMSNorm on dense ones.
MOE_LAYER_RULES = (*_gated("post_attention_layernorm", "post_attention_layernorm"), *MOE_RULES)
DENSE_LAYER_RULES = (W("post_attention_layernorm.weight", "post_attention_layernorm.weight"), *DENSE_RULES)


def _layers_to_ours(n) -> dict:
    if any(t != "indexed_attention" for t in n.layer_types):
        fail(
            f"axk2: AXK2Config.layer_types={n.layer_types!r}; every layer of this family is "
            "'indexed_attention'"
        )
    mlp = ["moe" if t == "sparse" else "dense" for t in n.mlp_layer_types]
    return {
        "mixer_types": ["dsa"] * n.num_hidden_layers,
        "mlp_types": mlp,
        "gated_norms": ["both" if t == "moe" else "mixer" for t in mlp],
        "gated_norm_rank": n.gated_norm_rank,
    }


def _layers_to_native(o) -> dict:
    return {
        "mlp_layer_types": ["dense" if t == "dense" else "sparse" for t in o.mlp_types],
        "gated_norm_rank": o.gated_norm_rank,
    }


def _groups_to_ours(n) -> dict:
    if n.n_group is None:
        return {"n_group": 1, "topk_group": 1}
    return {"n_group": n.n_group, "topk_group": n.topk_group}


def _groups_to_native(o) -> dict:
    if o.n_group == 1 and o.topk_group == 1:
        return {"n_group": None, "topk_group": None}  # A.X-K2-Light's spelling of "no groups"
    return {"n_group": o.n_group, "topk_group": o.topk_group}


def _check_ours(o) -> str | None:
    reason = _check_dsa_export(o)
    if reason is not None:
        return reason
    want = ["both" if t == "moe" else "mixer" for t in o.mlp_types]
    got = list(o.gated_norms or ["none"] * o.num_hidden_layers)
    if got != want:
        return (
            f"HybridConfig.gated_norms={o.gated_norms!r}: axk2 gates the mixer's norm on every layer and the "
            f"MLP's norm on MoE layers, i.e. gated_norms={want!r}"
        )
    if not o.mla_output_gate:
        return "HybridConfig.mla_output_gate=False: every axk2 attention has the sigmoid output gate"
    return None


FAMILIES = {
    "axk2": NativeFamily(
        model_type="axk2",
        config_rules=[
            *same(
                *MLA_MOE_SAME,
                "q_lora_rank",
                "norm_topk_prob",
                "hidden_act",
                "tie_word_embeddings",
                "rope_parameters",
            ),
            Custom(
                ("n_routed_experts",),
                lambda n: {"num_experts": n.n_routed_experts},
                lambda o: {"n_routed_experts": o.num_experts},
            ),
            Custom(
                ("n_shared_experts",),
                lambda n: {"num_shared_experts": n.n_shared_experts},
                lambda o: {"n_shared_experts": o.num_shared_experts},
            ),
            Custom(("n_group", "topk_group"), _groups_to_ours, _groups_to_native),
            Custom(
                ("num_key_value_heads",),
                _check_kv_heads,
                lambda o: {"num_key_value_heads": o.num_attention_heads},
            ),
            Custom(("layer_types", "mlp_layer_types", "gated_norm_rank"), _layers_to_ours, _layers_to_native),
            *_DSA_FIXED,
            *_DSA_SIZES,
            *ours_fixed(
                router_scoring_func="sigmoid",
                moe_routing="topk",
                moe_capacity_factor=None,
                mla_norm_eps=_LATENT_EPS,
                mla_rope_heads=1,
                mla_latent_norm=True,
                mla_rope_pairs=None,
                mla_output_gate=True,
                dsa_indexer_types=None,
            ),
        ],
        ignored_options=("head_dim",),  # overwritten with qk_rope_head_dim by the config itself
        # all "indexed_attention" (derived by the class; 5.16 spells it "deepseek_sparse_attention")
        derived_native_fields=("layer_types",),
        model_rules=MODEL_RULES,
        layer_rules=_gated("input_layernorm", "input_layernorm"),
        mixer_rules={"dsa": (*INDEXER_RULES, *MLA_RULES)},
        mlp_rules={"moe": MOE_LAYER_RULES, "dense": DENSE_LAYER_RULES},
        check_ours=_check_ours,
        tiny_config=dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            mlp_layer_types=["dense", "sparse", "sparse"],
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=1.5,
            max_position_embeddings=128,
            index_n_heads=4,
            index_head_dim=16,
            index_topk=5,
            gated_norm_rank=6,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        exactness="exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied indexer scores at the cut",
    )
}
