"""``qwen3_next`` (Qwen3-Next) ↔ hf_hybrid.

Layers: Gated DeltaNet (``linear_attention``) and gated softmax attention (``full_attention``, q/k RMSNorm per
head, sigmoid output gate folded into ``q_proj``), a sparse MoE block (softmax top-k router, fused experts and
one shared expert scaled by ``sigmoid(shared_expert_gate(x))``) or a dense SwiGLU (``mlp_only_layers``).

What the mapping handles:
- the GDN input projections are **interleaved per key-head group** natively: ``in_proj_qkvz`` rows are, for
  each of the ``Hk`` key heads, ``[q_h (dk), k_h (dk), v (r·dv), z (r·dv)]`` with ``r = Hv / Hk``, and
  ``in_proj_ba`` rows ``[b (r), a (r)]``; ours are ``[q (all heads), k, v, z]`` and ``[b, a]``: a row
  permutation each way;
- the decoder norms, the final norm and the attention q/k norms are zero-centred, ``x̂ · (1 + w)``; ours are
  ``x̂ · w``: ``w_ours = 1 + w_native`` (the GDN's gated output norm is plain ``x̂ · w`` on both sides).
  fp32 ``1 + w`` rounds the same way here as in the native forward, so the function is bitwise the same; only
  native → ours → native changes a norm weight, by at most half an ulp of 1 (≤ 6e-8), and leaves its ``1 + w``
  unchanged. ours → native → ours is the identity.
"""

from __future__ import annotations

import importlib

import torch

from .base import (
    Custom,
    NativeFamily,
    RuleContext,
    W,
    add_constant,
    fail,
    native_fixed,
    ours_fixed,
    permute_rows,
    rename,
    same,
    torch_reference_functions,
    zero_filled,
)

# ---- running the native model on CPU -----------------------------------------------------------------------

# transformers' Qwen3-Next / Qwen3.5 modeling bind fla-core's Triton kernels at import time whenever fla-core
# is installed (``use_kernel_func_from_hub_with_fallback``), and those crash on CPU tensors. The modules call
# these functions through their globals; ``compat.torch_reference`` finds the torch function behind each.
_KERNEL_MODULES = (
    "transformers.models.qwen3_next.modeling_qwen3_next",
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.olmo_hybrid.modeling_olmo_hybrid",
)
_KERNEL_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


def native_torch_kernels():
    """Run transformers' qwen3_next / qwen3_5 / qwen3_5_moe / olmo_hybrid models on their torch reference
    functions (not fla-core's kernels) inside the block; restored on exit."""
    modules = []
    for name in _KERNEL_MODULES:
        modules.append(importlib.import_module(name))
    return torch_reference_functions(modules, _KERNEL_FUNCTIONS)


# ---- config ------------------------------------------------------------------------------------------------

_NATIVE_MIXER = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}


def qwen_engine_keys(raw: dict) -> dict:
    """The written config.json with keys released Qwen3-Next / Qwen3.5 configs carry at the top of the (text)
    config, where SGLang's config classes read them: ``partial_rotary_factor`` (default 0.25 there, so a
    full-RoPE export would be served rotating a quarter of each head), ``rope_theta`` (default 10000 there)
    and ``full_attention_interval`` (SGLang builds its layer list from it alone; written where ``layer_types``
    is that period, a full-attention layer every k-th). transformers reads the same values either way."""
    for cfg in (raw, raw.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        rope = cfg.get("rope_parameters") or {}
        for key in ("partial_rotary_factor", "rope_theta"):
            if key in rope:
                cfg[key] = rope[key]
        full = [t == "full_attention" for t in cfg.get("layer_types") or ()]
        if any(full):
            k = full.index(True) + 1
            if full == [(i + 1) % k == 0 for i in range(len(full))]:
                cfg["full_attention_interval"] = k
    return raw


def mixers_to_ours(native) -> dict:
    layer_types = list(native.layer_types)
    if len(layer_types) != native.num_hidden_layers:
        fail(
            f"{native.model_type}: layer_types has {len(layer_types)} entries for "
            f"{native.num_hidden_layers} layers"
        )
    for i, t in enumerate(layer_types):
        if t not in _NATIVE_MIXER:
            fail(
                f"{native.model_type}: layer_types[{i}]={t!r} has no counterpart; supported: "
                f"{', '.join(_NATIVE_MIXER)}"
            )
    return {"mixer_types": [_NATIVE_MIXER[t] for t in layer_types]}


def mixers_to_native(ours) -> dict:
    return {"layer_types": [_OUR_LAYER.get(m, m) for m in ours.mixer_types]}


def _moe_layers_to_ours(native) -> dict:
    n = native.num_hidden_layers
    only = set(native.mlp_only_layers or [])
    step = native.decoder_sparse_step
    if native.num_experts > 0 and step <= 0:
        fail(f"qwen3_next: Qwen3NextConfig.decoder_sparse_step={step!r} must be a positive integer")
    mlp = [
        "moe" if i not in only and native.num_experts > 0 and (i + 1) % step == 0 else "dense"
        for i in range(n)
    ]
    return {"mlp_types": mlp}


def _moe_layers_to_native(ours) -> dict:
    dense = [i for i, t in enumerate(ours.mlp_types) if t == "dense"]
    # num_experts stays what the config says, so an all-dense model keeps its MoE sizes (unused) on the way
    # back.
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1}


SHARED_SIZE = rename("shared_expert_intermediate_size", "shared_expert_intermediate_size")


def _check_mlps(ours) -> str | None:
    for i, t in enumerate(ours.mlp_types):
        if t not in ("moe", "dense"):
            return f"mlp_types[{i}]={t!r} (layer {i}): every qwen3_next layer has an MLP (moe or dense)"
    if "moe" in ours.mlp_types:
        if ours.num_shared_experts != 1 or not ours.shared_expert_gate:
            return (
                f"num_shared_experts={ours.num_shared_experts}, "
                f"shared_expert_gate={ours.shared_expert_gate}: "
                "qwen3_next's MoE block has exactly one shared expert with a sigmoid gate"
            )
    return None


# Options every Qwen3-Next-lineage config spells as we do (those a family lacks are dropped by its own list).
COMMON_SAME = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
GDN_RENAMES = [
    rename("linear_conv_kernel_dim", "gdn_conv_kernel_size"),
    rename("linear_key_head_dim", "gdn_key_head_dim"),
    rename("linear_value_head_dim", "gdn_value_head_dim"),
    rename("linear_num_key_heads", "gdn_num_key_heads"),
    rename("linear_num_value_heads", "gdn_num_value_heads"),
]
COMMON_FIXED = [
    # The GDN short conv applies hidden_act, which our GDN fixes to SiLU (as every Qwen3-Next / Qwen3.5
    # checkpoint).
    native_fixed("hidden_act", "silu", why="the GDN short conv and the MLPs use SiLU here"),
    native_fixed("attention_bias", False, why="o_proj would carry a bias too, which our attention has not"),
    *ours_fixed(use_qk_norm=True, attention_output_gate=True),
]
MIXER_CONFIG = Custom(("layer_types",), mixers_to_ours, mixers_to_native)


def check_mixers(ours) -> str | None:
    for i, m in enumerate(ours.mixer_types):
        if m not in _OUR_LAYER:
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; supported: {', '.join(_OUR_LAYER)}"
            )
    return None


def _check_ours(ours) -> str | None:
    return check_mixers(ours) or _check_mlps(ours)


# ---- weights -----------------------------------------------------------------------------------------------


def _gdn_dims(ctx: RuleContext) -> tuple[int, int, int, int]:
    c = ctx.ours
    return (
        c.gdn_num_key_heads,
        c.gdn_num_value_heads // c.gdn_num_key_heads,
        c.gdn_key_head_dim,
        c.gdn_value_head_dim,
    )


def _qkvz_index(ctx: RuleContext) -> torch.Tensor:
    """Native row of each of our ``in_proj_qkvz`` rows: ours [q | k | v | z], native per key head [q k v
    z]."""
    hk, r, dk, dv = _gdn_dims(ctx)
    rows = torch.arange(hk * (2 * dk + 2 * r * dv)).view(hk, 2 * dk + 2 * r * dv)
    q, k, v, z = rows.split([dk, dk, r * dv, r * dv], dim=1)
    return torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1), z.reshape(-1)])


def _ba_index(ctx: RuleContext) -> torch.Tensor:
    """Native row of each of our ``in_proj_ba`` rows: ours [b | a], native per key head [b (r) a (r)]."""
    hk, r, _, _ = _gdn_dims(ctx)
    rows = torch.arange(hk * 2 * r).view(hk, 2 * r)
    b, a = rows.split([r, r], dim=1)
    return torch.cat([b.reshape(-1), a.reshape(-1)])


ZERO_CENTRED = add_constant(1.0)
# The native tensors ZERO_CENTRED applies to (every "norm.weight" but the GDN's gated output norm).
ZERO_CENTRED_NATIVE = (
    r"^model\.norm\.weight$",
    r"\.(input_layernorm|post_attention_layernorm)\.weight$",
    r"\.self_attn\.(q_norm|k_norm)\.weight$",
)

MODEL_RULES = [
    W("model.embed_tokens.weight", "model.embed_tokens.weight"),
    W("model.norm.weight", "model.norm.weight", *ZERO_CENTRED),
    W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
]
LAYER_RULES = [
    W("input_layernorm.weight", "input_layernorm.weight", *ZERO_CENTRED),
    W("post_attention_layernorm.weight", "post_attention_layernorm.weight", *ZERO_CENTRED),
]
GDN_SHARED_RULES = [  # the parameters both GDN layouts name alike
    W("linear_attn.conv1d.weight", "mixer.conv1d.weight"),
    W("linear_attn.A_log", "mixer.A_log"),
    W("linear_attn.dt_bias", "mixer.dt_bias"),
    W("linear_attn.norm.weight", "mixer.norm.weight"),
    W("linear_attn.out_proj.weight", "mixer.out_proj.weight"),
]
GDN_FUSED_RULES = [
    W("linear_attn.in_proj_qkvz.weight", "mixer.in_proj_qkvz.weight", *permute_rows(_qkvz_index)),
    W("linear_attn.in_proj_ba.weight", "mixer.in_proj_ba.weight", *permute_rows(_ba_index)),
    *GDN_SHARED_RULES,
]
ATTENTION_RULES = [
    W("self_attn.q_proj.weight", "mixer.q_proj.weight"),
    W("self_attn.k_proj.weight", "mixer.k_proj.weight"),
    W("self_attn.v_proj.weight", "mixer.v_proj.weight"),
    W("self_attn.o_proj.weight", "mixer.o_proj.weight"),
    W("self_attn.q_norm.weight", "mixer.q_norm.weight", *ZERO_CENTRED),
    W("self_attn.k_norm.weight", "mixer.k_norm.weight", *ZERO_CENTRED),
]
DENSE_RULES = [W(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
MOE_RULES = [
    W("mlp.gate.weight", "mlp.router.weight"),
    W(
        (),
        "mlp.router.e_score_correction_bias",
        *zero_filled(lambda ctx: (ctx.ours.num_experts,), "the router's e_score_correction_bias"),
    ),
    W("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj"),
    W("mlp.experts.down_proj", "mlp.experts.down_proj"),
    *[
        W(f"mlp.shared_expert.{p}.weight", f"mlp.shared_experts.{p}.weight")
        for p in ("gate_proj", "up_proj", "down_proj")
    ],
    W("mlp.shared_expert_gate.weight", "mlp.shared_experts_gate.weight"),
]
MOE_FIXED = ours_fixed(
    num_shared_experts=1,
    shared_expert_gate=True,
    router_scoring_func="softmax",
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    moe_routing="topk",
    moe_capacity_factor=None,
)

EXACTNESS = (
    "exact: fp32 logits ≤ 1e-7 at init-scale weights; with large weights (std 0.15) fp32 rounding in "
    "the delta rule gives ≤ 2e-5, inside transformers' own chunked-vs-recurrent spread on the same "
    "input; native → ours → native moves a (1 + w) norm weight by ≤ half an ulp of 1 + w, keeping 1 + w"
)

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    max_position_embeddings=256,
)

FAMILIES = {
    "qwen3_next": NativeFamily(
        engine_keys=qwen_engine_keys,
        model_type="qwen3_next",
        config_rules=[
            *same(
                *COMMON_SAME,
                "intermediate_size",
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "norm_topk_prob",
            ),
            SHARED_SIZE,
            *GDN_RENAMES,
            *COMMON_FIXED,
            *MOE_FIXED,
            MIXER_CONFIG,
            Custom(("mlp_only_layers", "decoder_sparse_step"), _moe_layers_to_ours, _moe_layers_to_native),
        ],
        model_rules=MODEL_RULES,
        layer_rules=LAYER_RULES,
        mixer_rules={"gated_deltanet": GDN_FUSED_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
        ignored_native_keys=(r"(^|\.)rotary_emb\.", r"^mtp\."),
        tiny_config=dict(
            TINY,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[1],
        ),
        exactness=EXACTNESS,
        check_ours=_check_ours,
        rounding_native_weights=ZERO_CENTRED_NATIVE,
        native_context=native_torch_kernels,
    ),
}
