"""``bamba`` (IBM Bamba) ↔ hf_hybrid: Mamba-2 layers (``mamba2``) and GQA attention with partial RoPE (factor
½) at ``attn_layer_indices``, a dense SwiGLU in every layer.

Names: ``mamba.*`` / ``self_attn.*`` ↔ ``mixer.*``, ``feed_forward.*`` ↔ ``mlp.*``, ``pre_ff_layernorm`` ↔
``post_attention_layernorm``, ``model.final_layernorm`` ↔ ``model.norm``; the Mamba-2 parameters (``in_proj``
→ [z, x, B, C, dt], ``conv1d`` over [x, B, C], ``dt_bias``, ``A_log``, ``D``, the grouped gated norm,
``out_proj``) are laid out alike. ``time_step_limit`` = (0, ∞) (no clamp) is our ``mamba_dt_limit=None``.
"""

from __future__ import annotations

import math

from .base import Custom, NativeFamily, W, fail, native_fixed, rename, same


def _mixers_to_ours(native) -> dict:
    n = native.num_hidden_layers
    attn = set(native.attn_layer_indices or [])
    bad = sorted(i for i in attn if not 0 <= i < n)
    if bad:
        fail(
            f"bamba: BambaConfig.attn_layer_indices={native.attn_layer_indices!r} names layers outside "
            f"0..{n - 1}"
        )
    return {"mixer_types": ["attention" if i in attn else "mamba2" for i in range(n)]}


def _mixers_to_native(ours) -> dict:
    return {"attn_layer_indices": [i for i, m in enumerate(ours.mixer_types) if m == "attention"]}


def _dt_limit_to_ours(native) -> dict:
    limit = native.time_step_limit
    if limit is None or (limit[0] == 0.0 and math.isinf(limit[1])):
        return {"mamba_dt_limit": None}
    return {"mamba_dt_limit": [float(limit[0]), float(limit[1])]}


def _dt_limit_to_native(ours) -> dict:
    limit = ours.mamba_dt_limit
    return {"time_step_limit": (0.0, float("inf")) if limit is None else tuple(limit)}


def _check_ours(ours) -> str | None:
    for i, m in enumerate(ours.mixer_types):
        if m not in ("mamba2", "attention"):
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; bamba layers are mamba2 or attention"
            )
    for i, t in enumerate(ours.mlp_types):
        if t != "dense":
            return f"mlp_types[{i}]={t!r} (layer {i}): every bamba layer has a dense MLP"
    return None


MAMBA_RULES = [
    W(f"mamba.{name}", f"mixer.{name}")
    for name in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
] + [W("mamba.conv1d.bias", "mixer.conv1d.bias", when=lambda ctx: ctx.ours.mamba_conv_bias)]
ATTENTION_RULES = [
    W(f"self_attn.{p}.weight", f"mixer.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]
MLP_RULES = [W("feed_forward.", "mlp.")]

FAMILIES = {
    "bamba": NativeFamily(
        model_type="bamba",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "intermediate_size",
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
                "mlp_bias",
                "mamba_n_groups",
                "mamba_expand",
                "mamba_conv_bias",
            ),
            rename("mamba_n_heads", "mamba_num_heads"),
            rename("mamba_d_head", "mamba_head_dim"),
            rename("mamba_d_state", "mamba_state_size"),
            rename("mamba_d_conv", "mamba_conv_kernel_size"),
            native_fixed("hidden_act", "silu", why="the Mamba-2 short conv applies SiLU here"),
            native_fixed("mamba_proj_bias", False, why="our Mamba-2 in_proj / out_proj have no bias"),
            native_fixed(
                "attention_bias", False, why="o_proj would carry a bias too, which our attention has not"
            ),
            Custom(("attn_layer_indices",), _mixers_to_ours, _mixers_to_native),
            Custom(("time_step_limit",), _dt_limit_to_ours, _dt_limit_to_native),
            Custom((), lambda native: {"mlp_types": ["dense"] * native.num_hidden_layers}, lambda ours: {}),
        ],
        # mamba_chunk_size only changes the order of fp32 sums; z_loss_coefficient and num_logits_to_keep are
        # training / generation settings.
        ignored_options=("mamba_chunk_size", "z_loss_coefficient", "num_logits_to_keep"),
        model_rules=[
            W("model.embed_tokens.weight", "model.embed_tokens.weight"),
            W("model.final_layernorm.weight", "model.norm.weight"),
            W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
        ],
        layer_rules=[
            W("input_layernorm.weight", "input_layernorm.weight"),
            W("pre_ff_layernorm.weight", "post_attention_layernorm.weight"),
        ],
        mixer_rules={"mamba2": MAMBA_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"dense": MLP_RULES},
        tiny_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_indices=[1],
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=16,
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        exactness="exact: fp32 logits ≤ 1e-5 (measured ≤ 1.2e-7)",
        check_ours=_check_ours,
    ),
}
