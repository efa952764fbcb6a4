"""``granitemoehybrid`` (IBM Granite 4.0 hybrids) ↔ hf_hybrid: Mamba-2 (``linear_attention``) and GQA
attention (``full_attention``; NoPE unless ``position_embedding_type="rope"``), then a top-k softmax MoE
**plus an always-on shared SwiGLU** (``shared_mlp``) in every layer, or the shared MLP alone when
``num_local_experts=0``.

Options: ``embedding_multiplier`` (inputs scaled), ``attention_multiplier`` (the softmax scale, our
``attention_scaling``), ``residual_multiplier`` (both branch outputs scaled: ``mixer_output_scales`` /
``mlp_output_scale``), ``logits_scaling`` (logits divided). Names: ``mamba.*`` / ``self_attn.*`` ↔
``mixer.*``, ``block_sparse_moe.router`` ↔ ``mlp.router``, ``block_sparse_moe.experts`` ↔ ``mlp.experts``,
``shared_mlp.input_linear`` ([gate; up] rows) ↔ ``mlp.shared_experts.{gate,up}_proj`` (``mlp.{gate,up}_proj``
without experts), ``shared_mlp.output_linear`` ↔ ``down_proj``. The router's softmax over the top-k logits
equals our renormalised top-k softmax.
"""

from __future__ import annotations

import torch

from .bamba import MAMBA_RULES, _dt_limit_to_native, _dt_limit_to_ours
from .base import Custom, NativeFamily, W, fail, native_fixed, ours_fixed, rename, same, zero_filled
from .moe_attention import MODEL_RULES, NORM_RULES

_NATIVE_MIXER = {"linear_attention": "mamba2", "full_attention": "attention"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}


def _layers_to_ours(native) -> dict:
    n = native.num_hidden_layers
    types = list(native.layer_types)
    for i, t in enumerate(types):
        if t not in _NATIVE_MIXER:
            fail(
                f"granitemoehybrid: layer_types[{i}]={t!r} has no counterpart; supported: "
                f"{', '.join(_NATIVE_MIXER)}"
            )
    out = {
        "mixer_types": [_NATIVE_MIXER[t] for t in types],
        "mixer_output_scales": [float(native.residual_multiplier)] * n,
        "mlp_output_scale": float(native.residual_multiplier),
        "attention_rope": native.position_embedding_type == "rope",
    }
    if native.position_embedding_type not in (None, "rope", "nope"):
        fail(
            "granitemoehybrid: "
            f"GraniteMoeHybridConfig.position_embedding_type={native.position_embedding_type!r} "
            "has no counterpart; supported: None (NoPE), 'rope'"
        )
    if native.num_local_experts > 0:
        out.update(
            mlp_types=["moe"] * n,
            num_experts=native.num_local_experts,
            moe_intermediate_size=native.intermediate_size,
            shared_expert_intermediate_size=native.shared_intermediate_size,
            intermediate_size=native.shared_intermediate_size,
        )
    else:
        out.update(
            mlp_types=["dense"] * n,
            intermediate_size=native.shared_intermediate_size,
            moe_intermediate_size=native.intermediate_size,
        )
    return out


def _layers_to_native(ours) -> dict:
    out = {
        "layer_types": [_OUR_LAYER.get(m, m) for m in ours.mixer_types],
        "residual_multiplier": ours.mlp_output_scale,
        "position_embedding_type": "rope" if ours.attention_rope else None,
        "intermediate_size": ours.moe_intermediate_size,
    }
    if "moe" in ours.mlp_types:
        out.update(num_local_experts=ours.num_experts, shared_intermediate_size=ours.shared_expert_size)
    else:
        out.update(num_local_experts=0, shared_intermediate_size=ours.intermediate_size)
    return out


def _check_ours(ours) -> str | None:
    for i, m in enumerate(ours.mixer_types):
        if m not in _OUR_LAYER:
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; granitemoehybrid layers are "
                "mamba2 or attention"
            )
    kinds = set(ours.mlp_types)
    if kinds not in ({"moe"}, {"dense"}):
        i = next(
            i for i, t in enumerate(ours.mlp_types) if t != ours.mlp_types[0] or t not in ("moe", "dense")
        )
        return (
            f"mlp_types[{i}]={ours.mlp_types[i]!r} (layer {i}): granitemoehybrid has a "
            "MoE + shared MLP in every layer, or the shared MLP alone in every layer"
        )
    if "moe" in kinds and (ours.num_shared_experts != 1 or ours.shared_expert_gate):
        return (
            f"num_shared_experts={ours.num_shared_experts}, shared_expert_gate={ours.shared_expert_gate}: "
            "granitemoehybrid's shared MLP is one ungated SwiGLU"
        )
    return None


def _split_gate_up(ts, ctx):
    return list(ts[0].chunk(2, dim=0))


def _fuse_gate_up(ts, ctx):
    return [torch.cat(ts, dim=0)]


ATTENTION_RULES = [
    W(f"self_attn.{p}.weight", f"mixer.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]
MOE_RULES = [
    W("block_sparse_moe.router.weight", "mlp.router.weight"),
    W(
        (),
        "mlp.router.e_score_correction_bias",
        *zero_filled(lambda ctx: (ctx.ours.num_experts,), "the router's e_score_correction_bias"),
    ),
    W("block_sparse_moe.experts.gate_up_proj", "mlp.experts.gate_up_proj"),
    W("block_sparse_moe.experts.down_proj", "mlp.experts.down_proj"),
    W(
        "shared_mlp.input_linear.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        _split_gate_up,
        _fuse_gate_up,
    ),
    W("shared_mlp.output_linear.weight", "mlp.shared_experts.down_proj.weight"),
]
DENSE_RULES = [
    W(
        "shared_mlp.input_linear.weight",
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        _split_gate_up,
        _fuse_gate_up,
    ),
    W("shared_mlp.output_linear.weight", "mlp.down_proj.weight"),
]

FAMILIES = {
    "granitemoehybrid": NativeFamily(
        model_type="granitemoehybrid",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "rms_norm_eps",
                "tie_word_embeddings",
                "rope_parameters",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "num_experts_per_tok",
                "embedding_multiplier",
                "logits_scaling",
                "mamba_n_groups",
                "mamba_expand",
                "mamba_conv_bias",
            ),
            rename("attention_multiplier", "attention_scaling"),
            rename("mamba_n_heads", "mamba_num_heads"),
            rename("mamba_d_head", "mamba_head_dim"),
            rename("mamba_d_state", "mamba_state_size"),
            rename("mamba_d_conv", "mamba_conv_kernel_size"),
            Custom(("time_step_limit",), _dt_limit_to_ours, _dt_limit_to_native),
            Custom(
                (
                    "layer_types",
                    "residual_multiplier",
                    "position_embedding_type",
                    "num_local_experts",
                    "intermediate_size",
                    "shared_intermediate_size",
                ),
                _layers_to_ours,
                _layers_to_native,
            ),
            native_fixed("hidden_act", "silu", why="the Mamba-2 short conv applies SiLU here"),
            native_fixed("mamba_proj_bias", False, why="our Mamba-2 in_proj / out_proj have no bias"),
            native_fixed(
                "attention_bias", False, why="o_proj would carry a bias too, which our attention has not"
            ),
            *ours_fixed(
                use_qk_norm=False,
                attention_output_gate=False,
                num_shared_experts=1,
                shared_expert_gate=False,
                router_scoring_func="softmax",
                norm_topk_prob=True,
                routed_scaling_factor=1.0,
                n_group=1,
                topk_group=1,
                moe_routing="topk",
                moe_capacity_factor=None,
                mlp_bias=False,
            ),
        ],
        # the chunk length of the native scan: fp32 summation order only
        ignored_options=("mamba_chunk_size",),
        model_rules=MODEL_RULES,
        layer_rules=NORM_RULES,
        mixer_rules={"mamba2": MAMBA_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
        tiny_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=16,
            shared_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=16,
            embedding_multiplier=4.0,
            attention_multiplier=0.25,
            residual_multiplier=0.5,
            logits_scaling=0.25,
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        exactness="exact: fp32 logits ≤ 1e-5 (measured ≤ 3.6e-7)",
        check_ours=_check_ours,
    ),
}
