"""``glm5_next_text`` ↔ hf_hybrid: the text decoder of GLM-5-Next (a vision-language checkpoint,
``Glm5NextForConditionalGeneration``; transformers has no text-only causal-LM class for it).

Layers (``layer_types``): Kimi Delta Attention (``linear_attention`` → ``"kda"``) and DSA on MLA
(``indexed_attention`` → ``"dsa"``, ``dsa_base="mla"``); MLPs (``mlp_layer_types``): ``dense`` SwiGLU or
``sparse`` MoE (DeepSeek-V3's router: sigmoid scores, ``e_score_correction_bias``, groups, routed scaling,
shared experts). Nothing in the model is rotated: its MLA has no rope channels (``qk_rope_head_dim=0``, which
transformers requires) and its indexer none either. Every layer's two branches run in mHC residual streams.

What maps onto options of ours:
- ``swiglu_limit`` clamps every SwiGLU (dense MLPs, shared and routed experts): ``mlp_swiglu_limit`` and
  ``moe_swiglu_limit``, both at that value (an export needs the two to agree where they apply; no clamp is
  written as ``inf``, a no-op clamp).
- KDA: a rename, ``self_attn.*`` → ``mixer.*`` (the same names and shapes as our KDA, ``A_log`` [H] here
  too); both low-rank gates have rank ``linear_head_dim`` (``kda_gate_rank = kda_head_dim``);
  ``linear_lower_bound`` → ``kda_gate_lower_bound`` (None: the unbounded softplus gate). The short conv
  applies ``hidden_act``, SiLU here: only ``hidden_act="silu"`` maps.
- MLA: ``self_attn.*`` → ``mixer.*`` unchanged; the latent norms use ``rms_norm_eps`` (``mla_norm_eps=None``).
- the indexer: ``wq_b`` → ``wq`` (from the q latent), ``wk``, ``k_norm`` (LayerNorm, eps 1e-6),
  ``weights_proj``; its k-pool compression ``index_kpool`` → ``index_pool_size`` with
  ``index_kpool_compress_gate`` → ``indexer.pool_gate.weight`` and ``index_kpool_compress_ape`` →
  ``indexer.pool_ape``. The query's own incomplete pool is always attended (``index_kpool_always_select_tail``
  must be True: ours has no other rule). ``indexer_types`` "shared" → ``dsa_indexer_types``: transformers
  hands a layer's top-k to the *next* layer only, so a shared DSA layer must follow a full DSA layer directly
  (transformers raises otherwise; both directions refuse such a layout); entries of KDA layers are ignored
  there and written "full".
- ``attn_hc.*`` / ``ffn_hc.*`` → ``mixer_hc.*`` / ``mlp_hc.*`` (``hyper_connections="mhc"``, ``hc_mult``,
  ``hc_eps``, ``hc_sinkhorn_iters``; post weights ``2·sigmoid``: ``hc_magnitude=2``); the final collapse is
  the streams' mean (no weights).

Import reads the text decoder (``model.language_model.*``, ``lm_head``) and drops the vision tower
(``model.visual.*``, one printed line). Export writes a ``Glm5NextForConditionalGeneration`` whose vision
tower is a **placeholder** (one tiny block, all weights zero; the export's card and a printed line say so):
the text function is exact, images are not understood.

transformers binds fla-core's Triton KDA kernels into the modeling module whenever fla-core is installed, and
they fail on CPU tensors: the family's ``native_context`` points the module back at transformers' own torch
functions (as for ``kimi_linear``). DSA ties at the top-k cut (here between pools) as for ``deepseek_v32``.
"""

from __future__ import annotations

import importlib
import math

from .base import (
    Custom,
    VisionWrapperFamily,
    W,
    fail,
    native_fixed,
    ours_fixed,
    rename,
    same,
)
from .deepseek import (
    DENSE_RULES,
    MLA_MOE_SAME,
    MOE_RULES,
    TINY_MLA_MOE,
    _check_kv_heads,
    _has_indexer,
    add_index_topk_pattern,
    deepseek_engine_keys,
    leading_dense,
)
from .kimi_linear import native_torch_kernels, per_layer

_MODULE = "transformers.models.glm5_next.modeling_glm5_next"
_INDEX_EPS = 1e-6  # the indexer's nn.LayerNorm (k_norm)
_LM = "model.language_model."

# DSA layers: "indexed_attention" since transformers 5.17, "deepseek_sparse_attention" before; both
# releases' config classes turn "full_attention" into their own spelling, so the export writes that.
_NATIVE_MIXER = {
    "linear_attention": "kda",
    "indexed_attention": "dsa",
    "deepseek_sparse_attention": "dsa",
    "full_attention": "dsa",
}
_OUR_LAYER = {"kda": "linear_attention", "dsa": "indexed_attention"}
_NATIVE_MLP = {"dense": "dense", "sparse": "moe"}
_OUR_MLP = {v: k for k, v in _NATIVE_MLP.items()}


# ---- config ------------------------------------------------------------------------------------------------


def _shared_layout_error(mixers: list[str], kinds: list[str], field: str) -> str | None:
    """transformers' GLM-5-Next passes a full DSA layer's top-k to the next layer only: a shared DSA layer
    must directly follow a full DSA layer."""
    for i, (mixer, kind) in enumerate(zip(mixers, kinds)):
        if (
            mixer == "dsa"
            and kind == "shared"
            and (i == 0 or mixers[i - 1] != "dsa" or kinds[i - 1] != "full")
        ):
            return (
                f"{field}[{i}]='shared' (layer {i}) does not directly follow a 'full' DSA layer: "
                "transformers' GLM-5-Next hands a layer's top-k to the next layer only"
            )
    return None


def _layers_to_ours(native) -> dict:
    mixers = per_layer(native, "layer_types", _NATIVE_MIXER)
    kinds = list(native.indexer_types)
    if len(kinds) != native.num_hidden_layers or any(k not in ("full", "shared") for k in kinds):
        fail(f"glm5_next_text: Glm5NextTextConfig.indexer_types={kinds!r}: one of 'full', 'shared' per layer")
    message = _shared_layout_error(mixers, kinds, "Glm5NextTextConfig.indexer_types")
    if message:
        fail(f"glm5_next_text: {message}")
    dsa_kinds = [k if m == "dsa" else "full" for m, k in zip(mixers, kinds)]
    return {
        "mixer_types": mixers,
        "mlp_types": per_layer(native, "mlp_layer_types", _NATIVE_MLP),
        "dsa_indexer_types": None if all(k == "full" for k in dsa_kinds) else dsa_kinds,
    }


def _layers_to_native(ours) -> dict:
    kinds = ours.dsa_indexer_types or ["full"] * ours.num_hidden_layers
    return {
        "layer_types": [_OUR_LAYER.get(m, m) for m in ours.mixer_types],
        "mlp_layer_types": [_OUR_MLP.get(m, m) for m in ours.mlp_types],
        "indexer_types": [k if m == "dsa" else "full" for m, k in zip(ours.mixer_types, kinds)],
    }


def _kda_to_ours(native) -> dict:
    bound = native.linear_lower_bound
    if bound is not None and not (isinstance(bound, (int, float)) and -math.inf < bound < 0):
        fail(
            f"glm5_next_text: Glm5NextTextConfig.linear_lower_bound={bound!r}: the bounded forget gate "
            "lower_bound · sigmoid(·) is a decay only for a finite negative bound (or None: unbounded)"
        )
    return {
        "kda_head_dim": native.linear_head_dim,
        "kda_gate_rank": native.linear_head_dim,
        "kda_gate_lower_bound": None if bound is None else float(bound),
    }


def _kda_to_native(ours) -> dict:
    return {"linear_head_dim": ours.kda_head_dim, "linear_lower_bound": ours.kda_gate_lower_bound}


def _swiglu_to_ours(native) -> dict:
    limit = native.swiglu_limit
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        # transformers clamps the up projection to [-limit, limit]: empty for limit <= 0
        fail(
            f"glm5_next_text: Glm5NextTextConfig.swiglu_limit={limit!r}: only a positive limit (or inf, no "
            "clamp) has one meaning (the up projection is clamped to [-limit, limit])"
        )
    value = None if math.isinf(limit) else float(limit)
    return {"mlp_swiglu_limit": value, "moe_swiglu_limit": value}


def _swiglu_to_native(ours) -> dict:
    limits = _swiglu_limits(ours)  # one value (the export refuses two); none: no SwiGLU, no clamp to write
    limit = next(iter(limits)) if len(limits) == 1 else None
    return {"swiglu_limit": math.inf if limit is None else float(limit)}


def _swiglu_limits(ours) -> set[float | None]:
    """The clamps of the SwiGLUs the model has (dense MLPs and shared experts: ``mlp_swiglu_limit``; routed
    experts: ``moe_swiglu_limit``)."""
    has_swiglu = "dense" in ours.mlp_types or ("moe" in ours.mlp_types and ours.num_shared_experts > 0)
    limits = {ours.mlp_swiglu_limit} if has_swiglu else set()
    if "moe" in ours.mlp_types:
        limits.add(ours.moe_swiglu_limit)
    return limits


def _check_export(ours) -> str | None:
    for i, t in enumerate(ours.mixer_types):
        if t not in _OUR_LAYER:
            return (
                f"HybridConfig.mixer_types[{i}]={t!r} (layer {i}) has no counterpart; glm5_next has: kda, dsa"
            )
    for i, t in enumerate(ours.mlp_types):
        if t not in _OUR_MLP:
            return f"HybridConfig.mlp_types[{i}]={t!r} (layer {i}): every layer of glm5_next has an MLP"
    if "dsa" in ours.mixer_types:
        if ours.dsa_base != "mla":
            return f"HybridConfig.dsa_base={ours.dsa_base!r}: glm5_next runs DSA on MLA"
        if ours.q_lora_rank is None:
            return "HybridConfig.q_lora_rank=None: glm5_next's attention and indexer read the q-LoRA latent"
        if ours.qk_rope_head_dim != 0:
            return (
                f"HybridConfig.qk_rope_head_dim={ours.qk_rope_head_dim}: glm5_next's MLA has no rope "
                "channels (0)"
            )
        if ours.dsa_indexer_types is not None:
            message = _shared_layout_error(
                ours.mixer_types, ours.dsa_indexer_types, "HybridConfig.dsa_indexer_types"
            )
            if message:
                return message
    if "kda" in ours.mixer_types and ours.kda_gate_rank != ours.kda_head_dim:
        return (
            f"kda_gate_rank={ours.kda_gate_rank} differs from kda_head_dim={ours.kda_head_dim}: glm5_next's "
            "forget and output gates have rank linear_head_dim"
        )
    if len(_swiglu_limits(ours)) > 1:
        return (
            f"HybridConfig.mlp_swiglu_limit={ours.mlp_swiglu_limit!r} differs from moe_swiglu_limit="
            f"{ours.moe_swiglu_limit!r}: glm5_next clamps every SwiGLU at one swiglu_limit"
        )
    if ours.hyper_connections != "mhc":
        return (
            f"HybridConfig.hyper_connections={ours.hyper_connections!r}: every glm5_next layer runs in mHC "
            "residual streams ('mhc')"
        )
    return None


_CONFIG_RULES = [
    *same(
        *MLA_MOE_SAME,
        "q_lora_rank",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "tie_word_embeddings",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "hc_mult",
        "hc_eps",
        "hc_sinkhorn_iters",
    ),
    rename("n_routed_experts", "num_experts"),
    rename("n_shared_experts", "num_shared_experts"),
    rename("linear_num_heads", "kda_num_heads"),
    rename("linear_conv_kernel_dim", "kda_conv_kernel_size"),
    rename("index_kpool", "index_pool_size"),
    Custom(("linear_head_dim", "linear_lower_bound"), _kda_to_ours, _kda_to_native),
    Custom(
        ("num_key_value_heads",), _check_kv_heads, lambda o: {"num_key_value_heads": o.num_attention_heads}
    ),
    Custom(("layer_types", "mlp_layer_types", "indexer_types"), _layers_to_ours, _layers_to_native),
    Custom(("swiglu_limit",), _swiglu_to_ours, _swiglu_to_native),
    native_fixed("hidden_act", "silu", why="the KDA short conv and the MLPs use SiLU here"),
    # vLLM reads the flag (without a default) to build the indexer's RoPE: the export writes GLM's True; with
    # no rotary channels here (qk_rope_head_dim=0) either value is the same model
    native_fixed("indexer_rope_interleave", True, False),
    native_fixed(
        "index_kpool_always_select_tail",
        True,
        why="a query always attends to the tokens of its own incomplete pool here",
    ),
    *ours_fixed(
        router_scoring_func="sigmoid",
        moe_routing="topk",
        moe_capacity_factor=None,
        shared_expert_gate=False,
        mla_norm_eps=None,  # q_a_layernorm / kv_a_layernorm use rms_norm_eps
        mla_rope_heads=1,
        mla_latent_norm=True,
        mla_rope_pairs=None,
        mla_use_rope=False,
        dsa_base="mla",
        dsa_mode="sparse",
        dsa_selector="indexer",
        index_norm_eps=_INDEX_EPS,
        hyper_connections="mhc",
        hc_magnitude=2.0,
    ),
]


# ---- weights -----------------------------------------------------------------------------------------------


_DSA_RULES = (
    W("self_attn.indexer.wq_b.weight", "mixer.indexer.wq.weight", when=_has_indexer),
    W("self_attn.indexer.index_kpool_compress_gate", "mixer.indexer.pool_gate.weight", when=_has_indexer),
    W("self_attn.indexer.index_kpool_compress_ape", "mixer.indexer.pool_ape", when=_has_indexer),
    # the rest keeps its name: q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
    # kv_b_proj, o_proj, indexer.{wk, k_norm, weights_proj}
    W("self_attn.", "mixer."),
)
# KDA keeps every name: q/k/v/o_proj, conv1d [3HD, 1, K], forget_gate.{f_a_proj, f_b_proj, dt_bias,
# A_log [H]}, b_proj, g_a/g_b_proj, o_norm
_KDA_RULES = (W("self_attn.", "mixer."),)

_MODEL_RULES = (
    W(f"{_LM}embed_tokens.weight", "model.embed_tokens.weight"),
    W(f"{_LM}norm.weight", "model.norm.weight"),
    W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
)
_LAYER_RULES = (
    W("input_layernorm.weight", "input_layernorm.weight"),
    W("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    W("attn_hc.", "mixer_hc."),
    W("ffn_hc.", "mlp_hc."),
)


class Glm5NextFamily(VisionWrapperFamily):
    """The text decoder lives in ``Glm5NextForConditionalGeneration``."""

    def model_config(self, text_config):
        """The wrapper config around ``text_config``, with the smallest vision tower (placeholder)."""
        from transformers import Glm5NextConfig

        vision = dict(
            depth=1,
            hidden_size=8,
            num_heads=1,
            intermediate_size=8,
            out_hidden_size=text_config.hidden_size,
            projection_intermediate_size=8,
        )
        return Glm5NextConfig(
            text_config=text_config.to_dict(),
            vision_config=vision,
            tie_word_embeddings=text_config.tie_word_embeddings,
        )

    def portable_config(self, raw: dict) -> dict:
        """DSA layers written "full_attention", which each release's config class respells as its own
        ("deepseek_sparse_attention" in 5.16, "indexed_attention" since): the export loads under both."""
        raw = super().portable_config(raw)
        text = raw.get("text_config", {})
        if text.get("layer_types"):
            dsa = ("indexed_attention", "deepseek_sparse_attention")
            text["layer_types"] = ["full_attention" if t in dsa else t for t in text["layer_types"]]
        return raw


def native_context():
    return native_torch_kernels(importlib.import_module(_MODULE))


def glm5_next_engine_keys(raw: dict) -> dict:
    """The written config.json (the wrapper's) with what vLLM's and SGLang's GLM-5-Next code reads from the
    text config and transformers does not declare: vLLM reads ``topk_method``, ``scoring_func``, ``mhc`` and
    ``mla_use_nope`` without a default; SGLang's own class defaults ``mhc`` to False and
    ``first_k_dense_replace`` to 3. Every export here has mHC streams, NoPE MLA, sigmoid routing with a
    correction bias; the dense MLPs lead where ``first_k_dense_replace`` is written; ``index_topk_pattern``
    lays out the shared indexers (F / S a layer) as the engines read them."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        return raw
    deepseek_engine_keys(text)  # the router keys
    text.update(mhc=True, mla_use_nope=True)
    dense = leading_dense(text.get("mlp_layer_types"))
    if dense is not None:
        text["first_k_dense_replace"] = dense
    add_index_topk_pattern(text)
    return raw


GLM5_NEXT_TEXT = Glm5NextFamily(
    engine_keys=glm5_next_engine_keys,
    model_type="glm5_next_text",
    wrapper_class="Glm5NextForConditionalGeneration",
    placeholder_weights=r"model\.visual\.",
    config_rules=_CONFIG_RULES,
    # head_dim and qk_head_dim are derived by the config itself from qk_rope_head_dim / qk_nope_head_dim
    ignored_options=("head_dim",),
    model_rules=_MODEL_RULES,
    layer_rules=_LAYER_RULES,
    mixer_rules={"kda": _KDA_RULES, "dsa": _DSA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    ignored_native_keys=(r"^model\.visual\.", r"^mtp"),
    native_layer_prefix=_LM + "layers.{i}.",
    check_ours=_check_export,
    native_context=native_context,
    tiny_config=dict(
        TINY_MLA_MOE,
        n_group=2,
        layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
        indexer_types=["full", "full", "shared", "full"],
        q_lora_rank=24,
        qk_rope_head_dim=0,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=4,
        index_kpool=2,
        linear_num_heads=2,
        linear_head_dim=8,
        linear_conv_kernel_dim=4,
        linear_lower_bound=-5.0,
        swiglu_limit=0.3,  # small enough that the tiny model's random activations reach it
        hc_mult=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    exactness=(
        "exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied pool scores at the cut; KDA as "
        "kimi_linear"
    ),
    wrapper_note="model.visual.* (the vision tower) and mtp*",
)

FAMILIES = {GLM5_NEXT_TEXT.model_type: GLM5_NEXT_TEXT}

__all__ = ["FAMILIES", "Glm5NextFamily"]
