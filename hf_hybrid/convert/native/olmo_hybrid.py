"""``olmo_hybrid`` (OLMo Hybrid) ↔ hf_hybrid.

Layers (``layer_types``): Gated DeltaNet (``linear_attention``) in a pre-norm block, and OLMo 3's softmax
attention (``full_attention``) in a **post-norm** block, ``h = x + norm(attn(x))``, ``out = h + norm(mlp(h))``
(``HybridConfig.norm_placement[i] = "post"``; the norms are ``post_mixer_layernorm`` / ``post_mlp_layernorm``
here, ``post_attention_layernorm`` / ``post_feedforward_layernorm`` natively). Every layer has a dense SwiGLU.

What the mapping handles:
- the GDN's separate ``q/k/v/g_proj`` and ``b/a_proj`` are the row blocks of our fused ``in_proj_qkvz``
  (``g`` is our output gate ``z``) and ``in_proj_ba``; the conv runs over ``[q, k, v]`` on both sides;
- ``linear_allow_neg_eigval`` (β = 2·sigmoid(b)) is ``gdn_allow_neg_eigval``; the gated output norm's eps is
  fixed at 1e-5 natively (``gdn_norm_eps``);
- q/k RMSNorm over the whole projection (``qk_norm_scope="full"``); RoPE over the whole head, or none when
  ``rope_parameters`` has no ``rope_theta`` (the released checkpoints: ``attention_rope=False``).
"""

from __future__ import annotations

from .base import Custom, NativeFamily, W, fail, native_fixed, ours_fixed, rename, same, split_rows
from .qwen3_next import native_torch_kernels

_NATIVE_MIXER = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}
_NOPE = {"rope_type": "default", "rope_theta": None}


def _layers_to_ours(n) -> dict:
    types = list(n.layer_types)
    for i, t in enumerate(types):
        if t not in _NATIVE_MIXER:
            supported = ", ".join(_NATIVE_MIXER)
            fail(f"olmo_hybrid: layer_types[{i}]={t!r} has no counterpart; supported: {supported}")
    return {
        "mixer_types": [_NATIVE_MIXER[t] for t in types],
        "mlp_types": ["dense"] * len(types),
        "norm_placement": ["post" if t == "full_attention" else "pre" for t in types],
        "head_dim": n.hidden_size // n.num_attention_heads,
    }


def _layers_to_native(o) -> dict:
    return {"layer_types": [_OUR_LAYER.get(m, m) for m in o.mixer_types]}


def _rope_to_ours(n) -> dict:
    rope = n.rope_parameters
    if rope is None or rope.get("rope_theta") is None:
        return {"attention_rope": False}  # OlmoHybridModel builds no rotary embedding then
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        fail(
            f"olmo_hybrid: OlmoHybridConfig.rope_parameters['partial_rotary_factor']="
            f"{rope['partial_rotary_factor']!r} has no counterpart (OLMo Hybrid's attention rotates the "
            "whole head); supported: 1.0"
        )
    return {"attention_rope": True, "rope_parameters": rope}


def _rope_to_native(o) -> dict:
    return {"rope_parameters": dict(o.rope_parameters) if o.attention_rope else dict(_NOPE)}


def _check_ours(o) -> str | None:
    for i, (m, mlp) in enumerate(zip(o.mixer_types, o.mlp_types)):
        if m not in _OUR_LAYER:
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; supported: {', '.join(_OUR_LAYER)}"
            )
        if mlp != "dense":
            return f"mlp_types[{i}]={mlp!r} (layer {i}): every olmo_hybrid layer has a dense MLP"
        placement = (o.norm_placement or ["pre"] * o.num_hidden_layers)[i]
        want = "post" if m == "attention" else "pre"
        if placement != want:
            return (
                f"norm_placement[{i}]={placement!r} (layer {i}, {m}): olmo_hybrid's {m} layers are "
                f"{want}-norm"
            )
    prf = (o.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if o.attention_rope and prf != 1.0:
        return f"rope_parameters['partial_rotary_factor']={prf!r}: olmo_hybrid rotates the whole head"
    return None


def _gdn_sizes(ctx) -> list[int]:
    c = ctx.ours
    key, value = c.gdn_num_key_heads * c.gdn_key_head_dim, c.gdn_num_value_heads * c.gdn_value_head_dim
    return [key, key, value, value]


def _ba_sizes(ctx) -> list[int]:
    return [ctx.ours.gdn_num_value_heads] * 2


_split_qkvg, _cat_qkvg = split_rows(_gdn_sizes)
_split_ba, _cat_ba = split_rows(_ba_sizes)

MODEL_RULES = (
    W("model.embed_tokens.weight", "model.embed_tokens.weight"),
    W("model.norm.weight", "model.norm.weight"),
    W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
)
GDN_RULES = (
    W("input_layernorm.weight", "input_layernorm.weight"),
    W("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    W(
        tuple(f"linear_attn.{p}_proj.weight" for p in "qkvg"),
        "mixer.in_proj_qkvz.weight",
        to_ours=_cat_qkvg,
        to_native=_split_qkvg,
    ),
    W(
        ("linear_attn.b_proj.weight", "linear_attn.a_proj.weight"),
        "mixer.in_proj_ba.weight",
        to_ours=_cat_ba,
        to_native=_split_ba,
    ),
    W("linear_attn.conv1d.weight", "mixer.conv1d.weight"),
    W("linear_attn.A_log", "mixer.A_log"),
    W("linear_attn.dt_bias", "mixer.dt_bias"),
    W("linear_attn.o_norm.weight", "mixer.norm.weight"),
    W("linear_attn.o_proj.weight", "mixer.out_proj.weight"),
)
ATTENTION_RULES = (
    W("post_attention_layernorm.weight", "post_mixer_layernorm.weight"),
    W("post_feedforward_layernorm.weight", "post_mlp_layernorm.weight"),
    W("self_attn.", "mixer."),
)
DENSE_RULES = (W("mlp.", "mlp."),)

FAMILIES = {
    "olmo_hybrid": NativeFamily(
        model_type="olmo_hybrid",
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
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            ),
            rename("linear_conv_kernel_dim", "gdn_conv_kernel_size"),
            rename("linear_key_head_dim", "gdn_key_head_dim"),
            rename("linear_value_head_dim", "gdn_value_head_dim"),
            rename("linear_num_key_heads", "gdn_num_key_heads"),
            rename("linear_num_value_heads", "gdn_num_value_heads"),
            rename("linear_allow_neg_eigval", "gdn_allow_neg_eigval"),
            Custom(("layer_types",), _layers_to_ours, _layers_to_native),
            Custom(("rope_parameters",), _rope_to_ours, _rope_to_native),
            native_fixed("hidden_act", "silu", why="the GDN short conv and the MLPs use SiLU here"),
            native_fixed(
                "attention_bias", False, why="o_proj would carry a bias too, which our attention has not"
            ),
            *ours_fixed(
                use_qk_norm=True,
                qk_norm_scope="full",
                gdn_norm_eps=1e-5,  # FLA's FusedRMSNormGated default, fixed in OlmoHybridGatedDeltaNet
                attention_output_gate=False,
                mlp_bias=False,
                clip_qkv=None,
                attention_scaling=None,
            ),
        ],
        # initialisation ranges only
        ignored_options=(
            "linear_a_log_min",
            "linear_a_log_max",
            "linear_dt_min",
            "linear_dt_max",
            "linear_dt_init_floor",
        ),
        model_rules=MODEL_RULES,
        mixer_rules={"gated_deltanet": GDN_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"dense": DENSE_RULES},
        check_ours=_check_ours,
        native_context=native_torch_kernels,
        tiny_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
}
