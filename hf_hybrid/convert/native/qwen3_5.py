"""``qwen3_5_text`` (dense) and ``qwen3_5_moe_text`` (MoE) ↔ hf_hybrid: the text decoders of Qwen3.5.

The same layers as Qwen3-Next (see ``qwen3_next.py``: zero-centred norms, gated attention with q/k norms, the
MoE block with a gated shared expert), except that the Gated DeltaNet projections are separate and not
interleaved: ``in_proj_qkv`` ([q | k | v] over all heads), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``; ours
fuse them as ``in_proj_qkvz = [qkv; z]`` and ``in_proj_ba = [b; a]`` (a concatenation each way).
``qwen3_5_text`` has a dense SwiGLU in every layer, ``qwen3_5_moe_text`` a MoE block in every layer (its
router always renormalises the top-k).

The published checkpoints are the vision-language wrappers (``model_type`` ``qwen3_5`` / ``qwen3_5_moe``) with
the text decoder under ``model.language_model.*``: the import reads their ``text_config`` and the decoder
weights (transformers' own key mapping strips the prefix), and drops ``model.visual.*`` (the vision tower) and
``mtp.*`` (the multi-token-prediction head) with a one-line note. Text-only RoPE: Qwen3.5's interleaved M-RoPE
with the three position streams equal (text tokens) is plain RoPE over the rotary dims, which is what ours
computes.
"""

from __future__ import annotations

import torch

from .base import Custom, NativeFamily, RuleContext, W, ours_fixed, same
from .qwen3_next import (
    ATTENTION_RULES,
    COMMON_FIXED,
    COMMON_SAME,
    DENSE_RULES,
    EXACTNESS,
    GDN_RENAMES,
    GDN_SHARED_RULES,
    LAYER_RULES,
    MIXER_CONFIG,
    MODEL_RULES,
    MOE_FIXED,
    MOE_RULES,
    SHARED_SIZE,
    TINY,
    ZERO_CENTRED_NATIVE,
    check_mixers,
    native_torch_kernels,
    qwen_engine_keys,
)


def _qkv_z_sizes(ctx: RuleContext) -> list[int]:
    c = ctx.ours
    key_dim = c.gdn_num_key_heads * c.gdn_key_head_dim
    value_dim = c.gdn_num_value_heads * c.gdn_value_head_dim
    return [2 * key_dim + value_dim, value_dim]


def _b_a_sizes(ctx: RuleContext) -> list[int]:
    return [ctx.ours.gdn_num_value_heads] * 2


def _concat(sizes_fn):
    """Several native tensors ↔ one of ours, concatenated along dim 0 (the sizes for the way back from
    ``sizes_fn``)."""
    return (
        lambda ts, ctx: [torch.cat(ts, dim=0)],
        lambda ts, ctx: list(torch.split(ts[0], sizes_fn(ctx), dim=0)),
    )


GDN_SEPARATE_RULES = [
    W(
        ("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"),
        "mixer.in_proj_qkvz.weight",
        *_concat(_qkv_z_sizes),
    ),
    W(
        ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"),
        "mixer.in_proj_ba.weight",
        *_concat(_b_a_sizes),
    ),
    *GDN_SHARED_RULES,
]


def _only(mlp: str):
    def check(ours) -> str | None:
        message = check_mixers(ours)
        if message:
            return message
        for i, t in enumerate(ours.mlp_types):
            if t != mlp:
                return f"mlp_types[{i}]={t!r} (layer {i}): every layer of this family has a {mlp!r} MLP"
        if mlp == "moe" and (
            ours.num_shared_experts != 1 or not ours.shared_expert_gate or not ours.norm_topk_prob
        ):
            return (
                f"num_shared_experts={ours.num_shared_experts}, "
                f"shared_expert_gate={ours.shared_expert_gate}, norm_topk_prob={ours.norm_topk_prob}: "
                "the MoE block has one gated shared expert and renormalises"
            )
        return None

    return check


# The wrappers' extra parts, dropped on import (named in the import's note).
_WRAPPER_KEYS = (r"(^|\.)rotary_emb\.", r"^mtp\.", r"^model\.visual\.", r"^visual\.")

FAMILIES = {
    "qwen3_5_text": NativeFamily(
        engine_keys=qwen_engine_keys,
        model_type="qwen3_5_text",
        config_rules=[
            *same(*COMMON_SAME, "intermediate_size"),
            *GDN_RENAMES,
            *COMMON_FIXED,
            MIXER_CONFIG,
            Custom((), lambda native: {"mlp_types": ["dense"] * native.num_hidden_layers}, lambda ours: {}),
        ],
        model_rules=MODEL_RULES,
        layer_rules=LAYER_RULES,
        mixer_rules={"gated_deltanet": GDN_SEPARATE_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"dense": DENSE_RULES},
        ignored_native_keys=_WRAPPER_KEYS,
        tiny_config=dict(TINY),
        exactness=EXACTNESS,
        check_ours=_only("dense"),
        rounding_native_weights=ZERO_CENTRED_NATIVE,
        native_context=native_torch_kernels,
    ),
    "qwen3_5_moe_text": NativeFamily(
        engine_keys=qwen_engine_keys,
        model_type="qwen3_5_moe_text",
        config_rules=[
            *same(*COMMON_SAME, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
            SHARED_SIZE,
            *GDN_RENAMES,
            *COMMON_FIXED,
            *MOE_FIXED,
            *ours_fixed(norm_topk_prob=True),
            MIXER_CONFIG,
            Custom((), lambda native: {"mlp_types": ["moe"] * native.num_hidden_layers}, lambda ours: {}),
        ],
        model_rules=MODEL_RULES,
        layer_rules=LAYER_RULES,
        mixer_rules={"gated_deltanet": GDN_SEPARATE_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES},
        ignored_native_keys=_WRAPPER_KEYS,
        tiny_config={
            **{k: v for k, v in TINY.items() if k != "intermediate_size"},
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
        },
        exactness=EXACTNESS,
        check_ours=_only("moe"),
        rounding_native_weights=ZERO_CENTRED_NATIVE,
        native_context=native_torch_kernels,
    ),
}
