"""``kimi_linear`` (Kimi Linear, Moonshot AI) ↔ hf_hybrid.

Layers (``layer_types``): Kimi Delta Attention (``linear_attention`` → ``"kda"``) and MLA without RoPE
(``full_attention`` → ``"mla"`` with ``mla_use_rope=False``; transformers' ``KimiLinearAttention`` applies no
rotation at all, the ``qk_rope_head_dim`` channels are an unrotated key shared by all heads). MLPs
(``mlp_layer_types``): ``dense`` SwiGLU or ``sparse`` MoE.

What the mapping handles:
- KDA: a rename, ``self_attn.*`` → ``mixer.*`` (our KDA keeps transformers' parameter names), except
  ``forget_gate.A_log``, [1, 1, H, 1] natively and [H] here: a reshape. Both low-rank gates (forget
  ``f_a/f_b``, output ``g_a/g_b``) have rank ``linear_head_dim`` natively: ``kda_gate_rank = kda_head_dim``.
  The short conv applies ``hidden_act`` natively, SiLU here: only ``hidden_act="silu"`` maps.
- MLA: ``self_attn.*`` → ``mixer.*`` unchanged (no rope rows to permute: nothing is rotated); the latent norms
  (``q_a_layernorm``, ``kv_a_layernorm``) are built with eps 1e-6 whatever ``rms_norm_eps`` is
  (``mla_norm_eps``).
- MoE: DeepSeek-V3's router exactly — sigmoid scores, aux-loss-free ``e_score_correction_bias`` for the choice
  only, group-limited top-k (groups ranked by their top-2 biased scores), weights renormalised
  (``norm_topk_prob``, +1e-20) and scaled by ``routed_scaling_factor``; one shared MLP of width
  ``n_shared_experts · moe_intermediate_size`` added ungated. The DeepSeek mapping's MoE rules apply unchanged
  (``mlp.gate`` → ``mlp.router``).
- ``tie_word_embeddings``: ``KimiLinearForCausalLM`` never ties (its ``_tied_weights_keys`` is empty, so the
  flag does not change the model): a native ``True`` imports as an untied model with the same function, and a
  tied hf_hybrid model has no counterpart.

transformers binds fla-core's Triton KDA / conv kernels into the modeling module at import time whenever
fla-core is installed, and they fail on CPU tensors: :func:`native_torch_kernels` (the family's
``native_context``) points the module back at transformers' own torch functions, which the kernels wrap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import (
    Custom,
    NativeFamily,
    RuleContext,
    W,
    fail,
    native_fixed,
    ours_fixed,
    rename,
    same,
    torch_reference_functions,
)
from .deepseek import DENSE_RULES, MLA_MOE_SAME, MOE_RULES, _check_kv_heads, leading_dense
from .moe_attention import MODEL_RULES, NORM_RULES

_MODULE = "transformers.models.kimi_linear.modeling_kimi_linear"
_KERNEL_FUNCTIONS = (
    "chunk_kimi_delta_attention",
    "recurrent_kimi_delta_attention",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)
_LATENT_EPS = 1e-6  # KimiLinearRMSNorm's default eps, used for q_a_layernorm / kv_a_layernorm


def native_torch_kernels(module: ModuleType | None = None):
    """Run transformers' kimi_linear model (or another modeling ``module`` with the same KDA / conv functions:
    GLM-5-Next's) on its torch reference functions (not fla-core's kernels) inside the block; restored on
    exit."""
    return torch_reference_functions([module or importlib.import_module(_MODULE)], _KERNEL_FUNCTIONS)


# ---- config ------------------------------------------------------------------------------------------------

_NATIVE_MIXER = {"linear_attention": "kda", "full_attention": "mla"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}
_NATIVE_MLP = {"dense": "dense", "sparse": "moe"}
_OUR_MLP = {v: k for k, v in _NATIVE_MLP.items()}


def per_layer(native, field: str, table: dict[str, str]) -> list[str]:
    """The native per-layer list ``field`` (one entry a layer) mapped through ``table``; refuses a wrong
    length or an entry ``table`` lacks, naming the config, the field, the layer and the value."""
    values = list(getattr(native, field))
    if len(values) != native.num_hidden_layers:
        fail(
            f"{native.model_type}: {field} has {len(values)} entries for num_hidden_layers="
            f"{native.num_hidden_layers}"
        )
    for i, v in enumerate(values):
        if v not in table:
            fail(
                f"{native.model_type}: {type(native).__name__}.{field}[{i}]={v!r} "
                f"has no counterpart; supported: {', '.join(table)}"
            )
    return [table[v] for v in values]


def _layers_to_ours(native) -> dict:
    return {
        "mixer_types": per_layer(native, "layer_types", _NATIVE_MIXER),
        "mlp_types": per_layer(native, "mlp_layer_types", _NATIVE_MLP),
    }


def _layers_to_native(ours) -> dict:
    return {
        "layer_types": [_OUR_LAYER.get(m, m) for m in ours.mixer_types],
        "mlp_layer_types": [_OUR_MLP.get(m, m) for m in ours.mlp_types],
    }


def _kda_to_ours(native) -> dict:
    return {"kda_head_dim": native.linear_head_dim, "kda_gate_rank": native.linear_head_dim}


def _check_ours(ours) -> str | None:
    for i, m in enumerate(ours.mixer_types):
        if m not in _OUR_LAYER:
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; kimi_linear has: "
                f"{', '.join(_OUR_LAYER)}"
            )
    for i, m in enumerate(ours.mlp_types):
        if m not in _OUR_MLP:
            return (
                f"mlp_types[{i}]={m!r} (layer {i}) has no counterpart; kimi_linear has: {', '.join(_OUR_MLP)}"
            )
    if "kda" in ours.mixer_types and ours.kda_gate_rank != ours.kda_head_dim:
        return (
            f"kda_gate_rank={ours.kda_gate_rank} differs from kda_head_dim={ours.kda_head_dim}: "
            "kimi_linear's forget and output gates have rank linear_head_dim"
        )
    if ours.tie_word_embeddings:
        return "tie_word_embeddings=True: KimiLinearForCausalLM never ties lm_head to the input embeddings"
    return None


CONFIG_RULES = [
    *same(*MLA_MOE_SAME, "q_lora_rank", "n_group", "topk_group", "norm_topk_prob", "output_router_logits"),
    rename("num_local_experts", "num_experts"),
    rename("n_shared_experts", "num_shared_experts"),
    rename("linear_num_heads", "kda_num_heads"),
    rename("linear_conv_kernel_dim", "kda_conv_kernel_size"),
    Custom(("linear_head_dim",), _kda_to_ours, lambda o: {"linear_head_dim": o.kda_head_dim}),
    Custom(
        ("num_key_value_heads",), _check_kv_heads, lambda o: {"num_key_value_heads": o.num_attention_heads}
    ),
    Custom(("layer_types", "mlp_layer_types"), _layers_to_ours, _layers_to_native),
    # never tied natively, whatever the flag says (see the module docstring)
    Custom(
        ("tie_word_embeddings",),
        lambda n: {"tie_word_embeddings": False},
        lambda o: {"tie_word_embeddings": False},
    ),
    native_fixed("hidden_act", "silu", why="the KDA short conv and the MLPs use SiLU here"),
    *ours_fixed(
        mla_use_rope=False,
        mla_norm_eps=_LATENT_EPS,
        mla_rope_heads=1,
        mla_latent_norm=True,
        mla_rope_pairs=None,
        router_scoring_func="sigmoid",
        moe_routing="topk",
        moe_capacity_factor=None,
        shared_expert_gate=False,
    ),
]


# ---- weights -----------------------------------------------------------------------------------------------


def _a_log_to_ours(ts, ctx: RuleContext):
    return [ts[0].reshape(-1)]


def _a_log_to_native(ts, ctx: RuleContext):
    return [ts[0].reshape(1, 1, -1, 1)]


KDA_RULES = (
    W("self_attn.forget_gate.A_log", "mixer.forget_gate.A_log", _a_log_to_ours, _a_log_to_native),
    # everything else keeps its name: q/k/v/o_proj, conv1d [3HD, 1, K], b_proj, g_a/g_b_proj, o_norm,
    # forget_gate.{f_a_proj, f_b_proj, dt_bias}
    W("self_attn.", "mixer."),
)
MLA_RULES = (W("self_attn.", "mixer."),)  # NoPE: no rope rows to de-interleave


def kimi_engine_keys(raw: dict) -> dict:
    """The written config.json with what released Kimi-Linear configs carry and transformers reads only as a
    fallback: vLLM's and SGLang's own config classes build the KDA / full-attention layers from
    ``linear_attn_config`` (1-based layer lists, with the KDA head size, head count and conv size), the dense
    MLPs from ``first_k_dense_replace`` (written where the dense layers lead), and vLLM asserts
    ``mla_use_nope`` (Kimi's MLA has no RoPE). transformers reads the same layers from ``layer_types``."""
    types = raw.get("layer_types") or []
    raw["linear_attn_config"] = {
        "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
        "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
        "head_dim": raw["linear_head_dim"],
        "num_heads": raw["linear_num_heads"],
        "short_conv_kernel_size": raw["linear_conv_kernel_dim"],
    }
    dense = leading_dense(raw.get("mlp_layer_types"))
    if dense is not None:
        raw["first_k_dense_replace"] = dense
    raw["mla_use_nope"] = True
    return raw


KIMI_LINEAR = NativeFamily(
    engine_keys=kimi_engine_keys,
    model_type="kimi_linear",
    config_rules=CONFIG_RULES,
    # pretraining_tp: read by no kimi_linear module
    ignored_options=("pretraining_tp",),
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"kda": KDA_RULES, "mla": MLA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    check_ours=_check_ours,
    native_context=native_torch_kernels,
    exactness=(
        "exact (fp32 ≤ 1e-5; 5.1e-6 at weights ~ N(0, 0.15²), where transformers' own "
        "chunked vs recurrent KDA differ by 3.2e-6 on the same input; layer by layer on "
        "the native inputs every mixer matches to ≤ 1e-6 relative and every MLP bitwise)"
    ),
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        linear_num_heads=2,
        linear_head_dim=8,
        linear_conv_kernel_dim=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.446,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
)

FAMILIES = {"kimi_linear": KIMI_LINEAR}
