"""``minicpm5_moe`` (MiniCPM5-MoE, transformers >= 5.25) ↔ hf_hybrid.

Every layer: GQA softmax attention with a sigmoid output gate (``q_gate_proj`` rows per head ``[q_h, g_h]``,
which is our ``q_proj`` with ``attention_output_gate=True``, row for row), no q/k norm, RoPE over the whole
head; then a dense SwiGLU (``mlp_layer_types[i] == "dense"``, by default the first layer) or DeepSeek-V3's MoE
(sigmoid router with correction bias, group-limited top-k, renormalised, ``routed_scaling_factor``, shared
experts), whose weights are named as DeepSeek-V3's.
"""

from __future__ import annotations

from .base import Custom, NativeFamily, W, fail, native_fixed, ours_fixed, rename, same
from .deepseek import DENSE_RULES, MOE_RULES, _mlp_types_from_list
from .moe_attention import MODEL_RULES, NORM_RULES


def _rope_to_ours(n) -> dict:
    rope = n.rope_parameters
    if (rope or {}).get("partial_rotary_factor", 1.0) != 1.0:
        fail(
            f"minicpm5_moe: MiniCPM5MoeConfig.rope_parameters['partial_rotary_factor']="
            f"{rope['partial_rotary_factor']!r} has no counterpart (MiniCPM5-MoE's attention rotates the "
            "whole head); supported: 1.0"
        )
    return {"rope_parameters": rope, "mixer_types": ["attention"] * n.num_hidden_layers}


def _check_ours(o) -> str | None:
    for i, (m, mlp) in enumerate(zip(o.mixer_types, o.mlp_types)):
        if m != "attention":
            return f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; supported: attention"
        if mlp not in ("dense", "moe"):
            return f"mlp_types[{i}]={mlp!r} (layer {i}): every minicpm5_moe layer has an MLP (dense or moe)"
    prf = (o.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        return f"rope_parameters['partial_rotary_factor']={prf!r}: minicpm5_moe rotates the whole head"
    return None


ATTENTION_RULES = (
    W("self_attn.q_gate_proj.weight", "mixer.q_proj.weight"),
    W("self_attn.k_proj.weight", "mixer.k_proj.weight"),
    W("self_attn.v_proj.weight", "mixer.v_proj.weight"),
    W("self_attn.o_proj.weight", "mixer.o_proj.weight"),
)

FAMILIES = {
    "minicpm5_moe": NativeFamily(
        model_type="minicpm5_moe",
        min_transformers="5.25",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "moe_intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "hidden_act",
                "max_position_embeddings",
                "rms_norm_eps",
                "tie_word_embeddings",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "routed_scaling_factor",
                "n_group",
                "topk_group",
                "num_experts_per_tok",
                "norm_topk_prob",
            ),
            rename("n_routed_experts", "num_experts"),
            rename("n_shared_experts", "num_shared_experts"),
            Custom(
                ("rope_parameters",), _rope_to_ours, lambda o: {"rope_parameters": dict(o.rope_parameters)}
            ),
            Custom(
                ("mlp_layer_types",),
                _mlp_types_from_list,
                lambda o: {"mlp_layer_types": ["dense" if t == "dense" else "sparse" for t in o.mlp_types]},
            ),
            native_fixed(
                "attention_bias", False, why="o_proj would carry a bias too, which our attention has not"
            ),
            *ours_fixed(
                attention_output_gate=True,
                use_qk_norm=False,
                attention_bias=False,
                mlp_bias=False,
                router_scoring_func="sigmoid",
                moe_routing="topk",
                moe_capacity_factor=None,
            ),
        ],
        model_rules=MODEL_RULES,
        layer_rules=NORM_RULES,
        mixer_rules={"attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
        check_ours=_check_ours,
        tiny_config=dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            routed_scaling_factor=2.5,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}
