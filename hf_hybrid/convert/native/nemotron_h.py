"""``nemotron_h`` (NVIDIA Nemotron-H / Nemotron 3) ↔ hf_hybrid.

Each native layer is exactly one block after one RMSNorm, ``x + block(norm(x))``: ``linear_attention``
(Mamba-2), ``full_attention`` (GQA **without positional encoding**), ``mlp`` (non-gated relu² MLP) or ``moe``
(non-gated relu² experts, a sigmoid router with correction bias and group-limited top-k, one non-gated shared
expert). Ours: a Mamba-2 / attention layer has ``mlp_types[i]="none"``; an MLP / MoE layer has
``mixer_types[i]="none"`` (its norm is our ``post_attention_layernorm``). ``mlp_gated=False`` and
``hidden_act="relu2"`` give the non-gated MLPs, ``attention_rope=False`` the NoPE attention.

Names: ``model.embeddings`` ↔ ``model.embed_tokens``, ``model.norm_f`` ↔ ``model.norm``, ``layers.{i}.norm`` ↔
the layer's one norm, ``layers.{i}.mixer.*`` ↔ ``mixer.*`` (Mamba-2, attention) or ``mlp.*`` (``mixer.gate`` ↔
``mlp.router``, including its ``e_score_correction_bias``). The Mamba-2 step ``Δ`` is clamped by
``time_step_limit`` on transformers 5.25 (our ``mamba_dt_limit``; the default (0, ∞) is ``None``), and from
below at ``time_step_min`` before (our ``mamba_dt_limit = [time_step_min, ∞]``):
``compat.nemotron_h_dt_clamp`` tells which. Before 5.25 transformers' single-token decode step does not
clamp, ours does — equal whenever ``Δ ≥ time_step_min``, as it is with trained and freshly initialised
weights.
"""

from __future__ import annotations

import math

from ... import compat
from .base import Custom, NativeFamily, RuleContext, W, fail, native_fixed, ours_fixed, rename, same

_BLOCKS = {  # native block -> (our mixer, our mlp)
    "linear_attention": ("mamba2", "none"),
    "full_attention": ("attention", "none"),
    "mlp": ("none", "dense"),
    "moe": ("none", "moe"),
}
_FROM_OURS = {v: k for k, v in _BLOCKS.items()}


def _blocks_to_ours(native) -> dict:
    blocks = list(native.layers_block_type)
    for i, b in enumerate(blocks):
        if b not in _BLOCKS:
            fail(
                f"nemotron_h: NemotronHConfig.layers_block_type[{i}]={b!r} "
                f"has no counterpart; supported: {', '.join(_BLOCKS)}"
            )
    return {
        "num_hidden_layers": len(blocks),
        "mixer_types": [_BLOCKS[b][0] for b in blocks],
        "mlp_types": [_BLOCKS[b][1] for b in blocks],
    }


def _blocks_to_native(ours) -> dict:
    blocks = [_FROM_OURS.get((m, p), "?") for m, p in zip(ours.mixer_types, ours.mlp_types)]
    return {"layers_block_type": blocks, "num_hidden_layers": len(blocks)}


def _dt_to_ours(native) -> dict:
    # time_step_min also seeds the dt init, like our mamba_dt_min.
    if compat.nemotron_h_dt_clamp() == "time_step_limit":
        lo, hi = (float(x) for x in native.time_step_limit)
        limit = None if (lo, hi) == (0.0, math.inf) else [lo, hi]
        return {"mamba_dt_min": float(native.time_step_min), "mamba_dt_limit": limit}
    # The prefill clamps Δ at (time_step_min, ∞).
    return {
        "mamba_dt_min": float(native.time_step_min),
        "mamba_dt_limit": [float(native.time_step_min), math.inf],
    }


def _dt_to_native(ours) -> dict:
    limit = ours.mamba_dt_limit or [0.0, math.inf]
    if compat.nemotron_h_dt_clamp() == "time_step_limit":
        return {"time_step_min": ours.mamba_dt_min, "time_step_limit": (float(limit[0]), float(limit[1]))}
    return {"time_step_min": limit[0]}


def _check_ours(ours) -> str | None:
    for i, pair in enumerate(zip(ours.mixer_types, ours.mlp_types)):
        if pair not in _FROM_OURS:
            return (
                f"layer {i} is mixer_types[{i}]={pair[0]!r} with mlp_types[{i}]={pair[1]!r}: "
                "a nemotron_h layer is exactly one block (mamba2 or attention with mlp "
                "'none'; mixer 'none' with a dense or moe MLP)"
            )
    return None


def _is_mlp_layer(ctx: RuleContext) -> bool:
    return ctx.ours.mixer_types[ctx.layer] == "none"


MOE_RULES = [
    W("mixer.gate.weight", "mlp.router.weight"),
    W("mixer.gate.e_score_correction_bias", "mlp.router.e_score_correction_bias"),
    W("mixer.", "mlp."),  # experts.{up,down}_proj, shared_experts.{up,down}_proj
]

FAMILIES = {
    "nemotron_h": NativeFamily(
        model_type="nemotron_h",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "tie_word_embeddings",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "intermediate_size",
                "mlp_bias",
                "num_experts_per_tok",
                "routed_scaling_factor",
                "n_group",
                "topk_group",
                "norm_topk_prob",
                "moe_intermediate_size",
                "mamba_num_heads",
                "mamba_head_dim",
            ),
            rename("layer_norm_epsilon", "rms_norm_eps"),
            rename("mlp_hidden_act", "hidden_act"),
            rename("ssm_state_size", "mamba_state_size"),
            rename("n_groups", "mamba_n_groups"),
            rename("conv_kernel", "mamba_conv_kernel_size"),
            rename("use_conv_bias", "mamba_conv_bias"),
            rename("expand", "mamba_expand"),
            rename("time_step_max", "mamba_dt_max"),
            rename("time_step_floor", "mamba_dt_init_floor"),
            rename("n_routed_experts", "num_experts"),
            rename("moe_shared_expert_intermediate_size", "shared_expert_intermediate_size"),
            Custom(("layers_block_type",), _blocks_to_ours, _blocks_to_native),
            Custom(("time_step_min", "time_step_limit"), _dt_to_ours, _dt_to_native),
            native_fixed("mamba_hidden_act", "silu", why="our Mamba-2 short conv applies SiLU"),
            native_fixed("use_bias", False, why="our Mamba-2 in_proj / out_proj have no bias"),
            native_fixed("moe_latent_size", None, why="the latent MoE projections are not mapped"),
            native_fixed("residual_in_fp32", False, why="our residual stream stays in the model dtype"),
            *ours_fixed(
                attention_rope=False,
                mlp_gated=False,
                use_qk_norm=False,
                attention_output_gate=False,
                attention_bias=False,
                router_scoring_func="sigmoid",
                num_shared_experts=1,
                shared_expert_gate=False,
                moe_routing="topk",
                moe_capacity_factor=None,
            ),
        ],
        # Unused by the modeling (or only by its kernels, init, training or the MTP head, whose weights are
        # dropped).
        ignored_options=(
            "num_logits_to_keep",
            "use_mamba_kernels",
            "chunk_size",
            "mamba_ssm_cache_dtype",
            "n_shared_experts",
            "moe_shared_expert_overlap",
            "num_nextn_predict_layers",
            "mtp_layers_block_type",
            "hidden_dropout",
            "rescale_prenorm_residual",
            "attention_bias",
            "mamba_proj_bias",
            "sliding_window",
            "num_hidden_layers",
        ),
        model_rules=[
            W("model.embeddings.weight", "model.embed_tokens.weight"),
            W("model.norm_f.weight", "model.norm.weight"),
            W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
        ],
        layer_rules=[
            W("norm.weight", "input_layernorm.weight", when=lambda ctx: not _is_mlp_layer(ctx)),
            W("norm.weight", "post_attention_layernorm.weight", when=_is_mlp_layer),
        ],
        mixer_rules={"mamba2": [W("mixer.", "mixer.")], "attention": [W("mixer.", "mixer.")], "none": []},
        mlp_rules={"none": [], "dense": [W("mixer.", "mlp.")], "moe": MOE_RULES},
        ignored_native_keys=(r"(^|\.)rotary_emb\.", r"^mtp\."),
        tiny_config=dict(
            vocab_size=128,
            hidden_size=32,
            layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=8,
            conv_kernel=4,
            expand=2,
            chunk_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        exactness=(
            "exact: fp32 logits ≤ 1e-7; before transformers 5.25 its decode step does not clamp the "
            "Mamba-2 step at time_step_min (its prefill and ours do): equal while Δ ≥ time_step_min"
        ),
        check_ours=_check_ours,
    ),
}
