"""GQA attention + top-k MoE families: ``qwen3_moe``, ``mixtral``, ``olmoe`` (softmax routers), ``minimax_m2``
(sigmoid router with a correction bias, full-width q/k norm, partial RoPE).

Layer map (native → ours): ``self_attn.*`` → ``mixer.*`` (attention), ``mlp.gate.weight`` →
``mlp.router.weight``, ``mlp.experts.{gate_up_proj, down_proj}`` (transformers 5 fuses them at load time into
our layout) → same names; our router's ``e_score_correction_bias`` has no native counterpart and must be zero.
Dense layers (Qwen3-MoE's ``mlp_only_layers``) keep ``mlp.*``.
"""

from __future__ import annotations

from .base import Custom, NativeFamily, W, native_fixed, ours_fixed, same, zero_filled

MODEL_RULES = (
    W("model.embed_tokens.weight", "model.embed_tokens.weight"),
    W("model.norm.weight", "model.norm.weight"),
    W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
)
NORM_RULES = (
    W("input_layernorm.weight", "input_layernorm.weight"),
    W("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
)
ATTENTION_RULES = (W("self_attn.", "mixer."),)
MOE_RULES = (
    W("mlp.gate.weight", "mlp.router.weight"),
    W("mlp.experts.", "mlp.experts."),
    W(
        (),
        "mlp.router.e_score_correction_bias",
        *zero_filled(
            lambda ctx: (ctx.ours.num_experts,), "the router's e_score_correction_bias (aux-loss-free bias)"
        ),
    ),
)
DENSE_RULES = (W("mlp.", "mlp."),)

_SOFTMAX_ROUTER = ours_fixed(
    router_scoring_func="softmax",
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    num_shared_experts=0,
    moe_routing="topk",
    moe_capacity_factor=None,
)
_PLAIN_ATTENTION = ours_fixed(attention_output_gate=False, attention_bias=False, mlp_bias=False)
_DECODER = same(
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    # training settings carried both ways, so fine-tuning an import balances like the original
    "router_aux_loss_coef",
    "output_router_logits",
)


def _head_dim(native) -> int:
    return getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads


_HEAD_DIM = Custom(("head_dim",), lambda n: {"head_dim": _head_dim(n)}, lambda o: {"head_dim": o.head_dim})
_NO_ATTN_BIAS = native_fixed(
    "attention_bias", False, why="it puts a bias on o_proj too; hf_hybrid's attention has q/k/v biases only"
)


# ---- qwen3_moe ---------------------------------------------------------------------------------------------


def _qwen3_moe_layers_to_ours(n) -> dict:
    layers = range(n.num_hidden_layers)
    only = set(n.mlp_only_layers or [])
    moe = [i not in only and n.num_experts > 0 and (i + 1) % n.decoder_sparse_step == 0 for i in layers]
    return {
        "mixer_types": ["attention"] * n.num_hidden_layers,
        "mlp_types": ["moe" if m else "dense" for m in moe],
    }


def _qwen3_moe_layers_to_native(o) -> dict:
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, t in enumerate(o.mlp_types) if t == "dense"],
    }


_MOE_SIZES = same(
    "moe_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob", "intermediate_size"
)

QWEN3_MOE = NativeFamily(
    model_type="qwen3_moe",
    config_rules=[
        *_DECODER,
        *_MOE_SIZES,
        _HEAD_DIM,
        _NO_ATTN_BIAS,
        native_fixed("use_sliding_window", False, why="Qwen3-MoE's sliding window layers are not mapped yet"),
        native_fixed("sliding_window", None, 4096, why="unused without use_sliding_window"),
        Custom(
            ("decoder_sparse_step", "mlp_only_layers"), _qwen3_moe_layers_to_ours, _qwen3_moe_layers_to_native
        ),
        *ours_fixed(use_qk_norm=True),
        *_PLAIN_ATTENTION,
        *_SOFTMAX_ROUTER,
    ],
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"attention": ATTENTION_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
)


# ---- mixtral -----------------------------------------------------------------------------------------------


def _mixtral_to_ours(n) -> dict:
    kind = "sliding_attention" if n.sliding_window else "attention"
    return {
        "mixer_types": [kind] * n.num_hidden_layers,
        "mlp_types": ["moe"] * n.num_hidden_layers,
        "sliding_window": n.sliding_window or None,
        # Mixtral's experts are `intermediate_size` wide; it has no dense layer.
        "moe_intermediate_size": n.intermediate_size,
        "intermediate_size": n.intermediate_size,
        "num_experts": n.num_local_experts,
    }


def _mixtral_to_native(o) -> dict:
    sliding = "sliding_attention" in o.mixer_types
    return {
        "sliding_window": o.sliding_window if sliding else None,
        "intermediate_size": o.moe_intermediate_size,
        "num_local_experts": o.num_experts,
    }


MIXTRAL = NativeFamily(
    model_type="mixtral",
    config_rules=[
        *_DECODER,
        _HEAD_DIM,
        *same("num_experts_per_tok", "router_jitter_noise"),
        Custom(
            ("sliding_window", "intermediate_size", "num_local_experts"), _mixtral_to_ours, _mixtral_to_native
        ),
        *ours_fixed(use_qk_norm=False, norm_topk_prob=True),
        *_PLAIN_ATTENTION,
        *_SOFTMAX_ROUTER,
    ],
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"attention": ATTENTION_RULES, "sliding_attention": ATTENTION_RULES},
    mlp_rules={"moe": MOE_RULES},
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
)

# ---- olmoe -------------------------------------------------------------------------------------------------

OLMOE = NativeFamily(
    model_type="olmoe",
    config_rules=[
        *_DECODER,
        *same("num_experts_per_tok", "num_experts", "norm_topk_prob"),
        *same("clip_qkv"),
        _NO_ATTN_BIAS,
        # OLMoE's experts are `intermediate_size` wide and it has no dense layer.
        Custom(
            ("intermediate_size",),
            lambda n: {
                "moe_intermediate_size": n.intermediate_size,
                "intermediate_size": n.intermediate_size,
                "head_dim": n.hidden_size // n.num_attention_heads,
                "mixer_types": ["attention"] * n.num_hidden_layers,
                "mlp_types": ["moe"] * n.num_hidden_layers,
            },
            lambda o: {"intermediate_size": o.moe_intermediate_size},
        ),
        *ours_fixed(use_qk_norm=True, qk_norm_scope="full"),
        *_PLAIN_ATTENTION,
        *_SOFTMAX_ROUTER,
    ],
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"attention": ATTENTION_RULES},
    mlp_rules={"moe": MOE_RULES},
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        clip_qkv=0.3,
        max_position_embeddings=128,
        pad_token_id=1,
        eos_token_id=2,
    ),
)

# ---- minimax_m2 --------------------------------------------------------------------------------------------
# MiniMax-M2: every layer GQA attention with RMSNorm over the whole q / k projection and partial RoPE
# (the first ``partial_rotary_factor`` of each head rotated; released checkpoints spell it ``rotary_dim``,
# which the config class turns into the factor), then an MoE of ``intermediate_size``-wide experts, no
# shared expert, routed by sigmoid scores: top-k of ``sigmoid + e_score_correction_bias`` (a buffer of the
# MoE block), weights the chosen sigmoids renormalised to sum 1 (DeepSeek-V3's router without groups or
# scaling).


def _minimax_m2_rotary_dim(ours) -> dict:
    """``rotary_dim``, the rotated channels of each head, which released MiniMax-M2 configs carry and vLLM
    (``config.rotary_dim``, required) and SGLang (default: the whole head) read; transformers turns it into
    ``partial_rotary_factor``."""
    (rotated,) = ours.rope_dims()
    return {"rotary_dim": rotated}


def _minimax_m2_to_ours(n) -> dict:
    return {
        "mixer_types": ["attention"] * n.num_hidden_layers,
        "mlp_types": ["moe"] * n.num_hidden_layers,
        "moe_intermediate_size": n.intermediate_size,
        "intermediate_size": n.intermediate_size,
        "num_experts": n.num_local_experts,
    }


MINIMAX_M2_MOE_RULES = (
    W("mlp.gate.weight", "mlp.router.weight"),
    W("mlp.e_score_correction_bias", "mlp.router.e_score_correction_bias"),
    W("mlp.experts.", "mlp.experts."),
)


def minimax_m2_engine_keys(raw: dict) -> dict:
    """The written config.json with what released MiniMax-M2 configs carry and transformers does not declare:
    vLLM and SGLang read ``scoring_func`` without a default, create the correction bias only with
    ``use_routing_bias``, and SGLang applies the full-width q/k norms only with ``use_qk_norm``."""
    raw.update(scoring_func="sigmoid", use_routing_bias=True, use_qk_norm=True, qk_norm_type="per_layer")
    return raw


MINIMAX_M2 = NativeFamily(
    engine_keys=minimax_m2_engine_keys,
    model_type="minimax_m2",
    config_rules=[
        *_DECODER,
        _HEAD_DIM,
        *same("num_experts_per_tok", "router_jitter_noise"),
        Custom(
            ("intermediate_size", "num_local_experts"),
            _minimax_m2_to_ours,
            lambda o: {"intermediate_size": o.moe_intermediate_size, "num_local_experts": o.num_experts},
        ),
        # read into partial_rotary_factor by the config class (rope_parameters carries it for us)
        Custom(("rotary_dim",), lambda n: {}, _minimax_m2_rotary_dim),
        *ours_fixed(
            use_qk_norm=True,
            qk_norm_scope="full",
            router_scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            num_shared_experts=0,
            moe_routing="topk",
            moe_capacity_factor=None,
        ),
        *_PLAIN_ATTENTION,
    ],
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"attention": ATTENTION_RULES},
    mlp_rules={"moe": MINIMAX_M2_MOE_RULES},
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
        bos_token_id=1,
        eos_token_id=2,
    ),
)

FAMILIES = {f.model_type: f for f in (QWEN3_MOE, MIXTRAL, OLMOE, MINIMAX_M2)}
