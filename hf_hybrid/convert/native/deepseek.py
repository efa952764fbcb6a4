"""MLA families with DeepSeek's group-limited sigmoid MoE: ``deepseek_v3``, ``deepseek_v32`` (DSA on MLA) and
``glm_moe_dsa`` (DSA on MLA with index-reuse layers).

Layer map (native → ours):
- ``self_attn.*`` → ``mixer.*`` (``mla``, or ``dsa`` with ``dsa_base="mla"``). DeepSeek rotates *interleaved*
  rope pairs; ours rotates halves, which equals interleaved RoPE on de-interleaved channels, so the rope rows
  of ``q_b_proj`` / ``q_proj`` (per head) and ``kv_a_proj_with_mqa`` are permuted
  (:func:`rope_deinterleave_index`).
- ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`` → ``mixer.indexer.{wq, wk, k_norm, weights_proj}``.
  V3.2's indexer rotates halves like ours. GLM's rotates interleaved pairs: the same de-interleaving
  permutation on the rope rows of ``wq_b`` (per head), ``wk`` and ``k_norm`` (LayerNorm is
  permutation-equivariant) makes it exact without a config option. GLM's ``indexer_types`` "shared" layers
  have no indexer and reuse the previous full layer's top-k: ``HybridConfig.dsa_indexer_types``.
- ``mlp.gate.{weight, e_score_correction_bias}`` → ``mlp.router.*``; ``mlp.experts.*``,
  ``mlp.shared_experts.*`` keep their names; dense layers (``first_k_dense_replace`` / ``mlp_layer_types``)
  keep ``mlp.*``.
- DeepSeek's latent norms (``q_a_layernorm``, ``kv_a_layernorm``) use eps 1e-6 whatever ``rms_norm_eps`` is
  (``HybridConfig.mla_norm_eps``); the indexer's LayerNorm eps is 1e-6 (``index_norm_eps``).

DSA exactness: transformers selects with plain ``torch.topk`` (order among equal scores unspecified), we break
ties toward the most recent position. Equal whenever the k-th and (k+1)-th scores of a query differ — always
at ``index_topk >= T``; the tests use inputs whose indexer scores have no tie at the cut (checked, not
assumed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...mixers.dsa import dsa_layer_has_indexer
from ...mixers.mla import rope_deinterleave_index
from .base import Custom, NativeFamily, RuleContext, W, native_fixed, ours_fixed, permute_rows, rename, same
from .moe_attention import MODEL_RULES, NORM_RULES

_LATENT_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a_layernorm / kv_a_layernorm
_INDEX_EPS = 1e-6  # the indexer's nn.LayerNorm


def _per_head_rope_rows(n_heads: int, head_dim: int, rope_start: int, rope_dim: int) -> torch.Tensor:
    """Row index over ``n_heads`` blocks of ``head_dim`` rows whose rows ``[rope_start, rope_start +
    rope_dim)`` are de-interleaved."""
    block = torch.arange(head_dim)
    block[rope_start : rope_start + rope_dim] = rope_start + rope_deinterleave_index(rope_dim)
    return (torch.arange(n_heads)[:, None] * head_dim + block[None, :]).reshape(-1)


def _interleaved(ctx: RuleContext) -> bool:
    """Whether the attention's RoPE rotates interleaved pairs: DeepSeek-V3 unless ``rope_interleave=False``;
    DeepSeek-V3.2, GLM-MoE-DSA and AXK2 always (their transformers code never reads the flag)."""
    if ctx.native.model_type != "deepseek_v3":
        return True
    return bool(getattr(ctx.native, "rope_interleave", True))


def _q_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    dqk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if not _interleaved(ctx):
        return torch.arange(c.num_attention_heads * dqk)
    return _per_head_rope_rows(c.num_attention_heads, dqk, c.qk_nope_head_dim, c.qk_rope_head_dim)


def _kv_a_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    if not _interleaved(ctx):
        return torch.arange(c.kv_lora_rank + c.qk_rope_head_dim)
    return _per_head_rope_rows(1, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim)


def _index_rope_interleaved(ctx: RuleContext) -> bool:
    """Whether the checkpoint's indexer rotates interleaved pairs: GLM-MoE-DSA always (transformers, and the
    ``indexer_rope_interleave=True`` its export writes for vLLM / SGLang); a DeepSeek-V3.2 config where
    ``indexer_rope_interleave`` says so (transformers' DeepSeek-V3.2 ignores the flag and rotates halves, vLLM
    and SGLang follow it: the import keeps the served function)."""
    flag = bool(getattr(ctx.native, "indexer_rope_interleave", False))
    return ctx.native.model_type == "glm_moe_dsa" or flag


def _index_q_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    rope = min(c.qk_rope_head_dim, c.index_head_dim)
    if not _index_rope_interleaved(ctx):
        return torch.arange(c.index_n_heads * c.index_head_dim)
    return _per_head_rope_rows(c.index_n_heads, c.index_head_dim, 0, rope)


def _index_k_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    if not _index_rope_interleaved(ctx):
        return torch.arange(c.index_head_dim)
    return _per_head_rope_rows(1, c.index_head_dim, 0, min(c.qk_rope_head_dim, c.index_head_dim))


MLA_RULES = (
    W(
        "self_attn.q_b_proj.weight",
        "mixer.q_b_proj.weight",
        *permute_rows(_q_rows),
        when=lambda ctx: ctx.ours.q_lora_rank is not None,
    ),
    W(
        "self_attn.q_proj.weight",
        "mixer.q_proj.weight",
        *permute_rows(_q_rows),
        when=lambda ctx: ctx.ours.q_lora_rank is None,
    ),
    W("self_attn.kv_a_proj_with_mqa.weight", "mixer.kv_a_proj_with_mqa.weight", *permute_rows(_kv_a_rows)),
    W(
        "self_attn.kv_a_proj_with_mqa.bias",
        "mixer.kv_a_proj_with_mqa.bias",
        *permute_rows(_kv_a_rows),
        when=lambda ctx: ctx.ours.attention_bias,
    ),
    # everything else of MLA keeps its name (q_a_proj, q_a_layernorm, kv_a_layernorm, kv_b_proj, o_proj)
    W("self_attn.", "mixer."),
)


def _has_indexer(ctx: RuleContext) -> bool:
    return dsa_layer_has_indexer(ctx.ours, ctx.layer)


def indexer_rules(
    q_rows: Callable[[RuleContext], torch.Tensor], k_rows: Callable[[RuleContext], torch.Tensor]
):
    """The lightning indexer's weight rules (layers with an indexer of their own), with ``q_rows`` /
    ``k_rows`` the row orders of its query and key projections (where the family rotates which channels)."""
    return (
        W(
            "self_attn.indexer.wq_b.weight",
            "mixer.indexer.wq.weight",
            *permute_rows(q_rows),
            when=_has_indexer,
        ),
        W("self_attn.indexer.wk.weight", "mixer.indexer.wk.weight", *permute_rows(k_rows), when=_has_indexer),
        W(
            "self_attn.indexer.k_norm.weight",
            "mixer.indexer.k_norm.weight",
            *permute_rows(k_rows),
            when=_has_indexer,
        ),
        W(
            "self_attn.indexer.k_norm.bias",
            "mixer.indexer.k_norm.bias",
            *permute_rows(k_rows),
            when=_has_indexer,
        ),
        W("self_attn.indexer.weights_proj.weight", "mixer.indexer.weights_proj.weight", when=_has_indexer),
    )


INDEXER_RULES = indexer_rules(_index_q_rows, _index_k_rows)
DSA_RULES = (*INDEXER_RULES, *MLA_RULES)


def _no_shared(ctx: RuleContext) -> bool:
    return ctx.ours.num_shared_experts == 0


_EMPTY_SHARED = (
    lambda ts, ctx: [],
    lambda ts, ctx: [
        torch.zeros(0, ctx.ours.hidden_size),
        torch.zeros(0, ctx.ours.hidden_size),
        torch.zeros(ctx.ours.hidden_size, 0),
    ],
)

MOE_RULES = (
    W("mlp.gate.weight", "mlp.router.weight"),
    W("mlp.gate.e_score_correction_bias", "mlp.router.e_score_correction_bias"),
    W("mlp.experts.", "mlp.experts."),
    W("mlp.shared_experts.", "mlp.shared_experts.", when=lambda ctx: not _no_shared(ctx)),
    # n_shared_experts=0: transformers still builds the shared MLP, 0 wide (it adds exactly 0); we build none
    W(
        (
            "mlp.shared_experts.gate_proj.weight",
            "mlp.shared_experts.up_proj.weight",
            "mlp.shared_experts.down_proj.weight",
        ),
        (),
        *_EMPTY_SHARED,
        when=_no_shared,
    ),
)
DENSE_RULES = (W("mlp.", "mlp."),)


# ---- config ------------------------------------------------------------------------------------------------

# The options every DeepSeek-lineage MLA + MoE family spells as DeepSeek-V3 does (each family adds its own)
MLA_MOE_SAME = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "routed_scaling_factor",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "num_experts_per_tok",
    "max_position_embeddings",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
)

# A tiny DeepSeek-lineage MLA + MoE model (a dense layer, then MoE) that the families' tiny test configs start
# from
TINY_MLA_MOE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    topk_group=1,
    num_experts_per_tok=2,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    routed_scaling_factor=1.5,
    max_position_embeddings=128,
)

_COMMON = [
    *same(
        *MLA_MOE_SAME,
        "q_lora_rank",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "hidden_act",
        "tie_word_embeddings",
        "rope_parameters",
    ),
    rename("n_routed_experts", "num_experts"),
    rename("n_shared_experts", "num_shared_experts"),
    Custom(
        ("num_key_value_heads",),
        lambda n: _check_kv_heads(n),
        lambda o: {"num_key_value_heads": o.num_attention_heads},
    ),
    *ours_fixed(
        router_scoring_func="sigmoid",
        moe_routing="topk",
        moe_capacity_factor=None,
        mla_norm_eps=_LATENT_EPS,
        mla_rope_heads=1,
        mla_latent_norm=True,
        mla_rope_pairs=None,
    ),
]


def _check_kv_heads(n) -> dict:
    kv = n.num_key_value_heads
    if kv is not None and kv != n.num_attention_heads:
        from .base import fail

        fail(
            f"{n.model_type}: num_key_value_heads={kv} differs from "
            f"num_attention_heads={n.num_attention_heads}; "
            "MLA expands keys per head, so only num_key_value_heads == num_attention_heads is well defined"
        )
    return {"num_key_value_heads": n.num_attention_heads}


def _mlp_types_first_k(n) -> dict:
    k = min(n.first_k_dense_replace or 0, n.num_hidden_layers)
    return {"mlp_types": ["dense"] * k + ["moe"] * (n.num_hidden_layers - k)}


def _first_k_from_ours(o) -> dict:
    k = 0
    while k < len(o.mlp_types) and o.mlp_types[k] == "dense":
        k += 1
    return {"first_k_dense_replace": k}


def _mlp_types_from_list(n) -> dict:
    return {"mlp_types": ["dense" if t == "dense" else "moe" for t in n.mlp_layer_types]}


def _mlp_list_from_ours(o) -> dict:
    return {
        "mlp_layer_types": ["dense" if t == "dense" else "sparse" for t in o.mlp_types],
        "first_k_dense_replace": _first_k_from_ours(o)["first_k_dense_replace"],
    }


def _check_mla_export(o) -> str | None:
    for i, t in enumerate(o.mlp_types):
        if t not in ("dense", "moe"):
            return f"HybridConfig.mlp_types[{i}]={t!r} (layer {i}): every layer of this family has an MLP"
    return None


def _check_dsa_export(o) -> str | None:
    if o.q_lora_rank is None:
        return "HybridConfig.q_lora_rank=None: the DSA indexer of this family reads the q-LoRA latent"
    if o.dsa_base != "mla":
        return f"HybridConfig.dsa_base={o.dsa_base!r}: this family runs DSA on MLA"
    return _check_mla_export(o)


def deepseek_engine_keys(raw: dict) -> dict:
    """The written config.json with the router keys released DeepSeek-V3 configs carry and transformers does
    not declare: vLLM's and SGLang's DeepSeek model code reads them (SGLang without a default; vLLM makes no
    correction-bias parameter and scores by softmax without them), and every export here routes by sigmoid
    scores with a correction bias in every MoE layer after the leading dense ones."""
    raw.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    return raw


def leading_dense(mlp_layer_types) -> int | None:
    """How many dense MLP layers lead, where every later one is sparse (what ``first_k_dense_replace`` says);
    None for another layout."""
    types = list(mlp_layer_types or ())
    dense = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    return dense if all(t == "sparse" for t in types[dense:]) else None


def add_index_topk_pattern(config: dict) -> None:
    """``index_topk_pattern`` beside ``indexer_types`` in a written config dict: one letter a layer (F: own
    indexer, S: reuses the previous top-k), the layout vLLM and SGLang take instead of ``indexer_types``."""
    if config.get("indexer_types"):
        config["index_topk_pattern"] = "".join("S" if t == "shared" else "F" for t in config["indexer_types"])


def glm_engine_keys(raw: dict) -> dict:
    """:func:`deepseek_engine_keys` and the indexer layout as the engines read it
    (:func:`add_index_topk_pattern`)."""
    raw = deepseek_engine_keys(raw)
    add_index_topk_pattern(raw)
    return raw


DEEPSEEK_V3 = NativeFamily(
    engine_keys=deepseek_engine_keys,
    model_type="deepseek_v3",
    config_rules=[
        *_COMMON,
        Custom(("first_k_dense_replace",), _mlp_types_first_k, _first_k_from_ours),
        Custom(("rope_interleave",), lambda n: {}, lambda o: {"rope_interleave": True}),
        native_fixed("pretraining_tp", 1, None, why="transformers' legacy tensor-parallel path"),
        Custom((), lambda n: {"mixer_types": ["mla"] * n.num_hidden_layers}, lambda o: {}),
    ],
    ignored_options=("num_mtp_layers",),  # transformers builds no MTP layers (their weights are not loaded)
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"mla": MLA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    check_ours=_check_mla_export,
    tiny_config=dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        routed_scaling_factor=1.5,
        max_position_embeddings=128,
    ),
)

_DSA_FIXED = ours_fixed(
    dsa_base="mla",
    dsa_mode="sparse",
    dsa_selector="indexer",
    index_norm_eps=_INDEX_EPS,
)
_DSA_SIZES = same("index_n_heads", "index_head_dim", "index_topk")


def _v32_layers(n) -> dict:
    if any(t != "indexed_attention" for t in n.layer_types):
        from .base import fail

        fail(
            f"{n.model_type}: layer_types={n.layer_types!r}; "
            "every layer of this family is 'indexed_attention'"
        )
    return {"mixer_types": ["dsa"] * n.num_hidden_layers}


def _glm_indexer_types(n) -> dict:
    kinds = list(n.indexer_types)
    return {"dsa_indexer_types": None if all(k == "full" for k in kinds) else kinds}


def _glm_indexer_types_native(o) -> dict:
    n = o.num_hidden_layers
    return {"indexer_types": list(o.dsa_indexer_types) if o.dsa_indexer_types is not None else ["full"] * n}


_DSA_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    routed_scaling_factor=1.5,
    max_position_embeddings=128,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=5,
)

# vLLM and SGLang rotate a DSA indexer on interleaved pairs only where the config says
# indexer_rope_interleave=True (halves otherwise); GLM's checkpoints say so, and transformers pairs there.
GLM_INDEXER_ROPE_WHY = (
    "transformers rotates the indexer's RoPE on interleaved pairs whatever this flag says, vLLM and SGLang "
    "by it: a checkpoint saying False is computed two ways"
)


DEEPSEEK_V32 = NativeFamily(
    engine_keys=deepseek_engine_keys,
    model_type="deepseek_v32",
    config_rules=[
        *_COMMON,
        *_DSA_FIXED,
        *_DSA_SIZES,
        Custom(("mlp_layer_types", "first_k_dense_replace"), _mlp_types_from_list, _mlp_list_from_ours),
        Custom(("layer_types",), _v32_layers, lambda o: {}),
        native_fixed("mlp_bias", False, why="DeepSeek's MLPs have no bias"),
        *ours_fixed(dsa_indexer_types=None),
    ],
    ignored_options=("head_dim",),  # overwritten with qk_rope_head_dim by the config itself
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"dsa": DSA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    check_ours=_check_dsa_export,
    derived_native_fields=("layer_types",),
    tiny_config=dict(_DSA_TINY),
    exactness="exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied indexer scores at the cut",
)

GLM_MOE_DSA = NativeFamily(
    engine_keys=glm_engine_keys,
    model_type="glm_moe_dsa",
    config_rules=[
        *_COMMON,
        *_DSA_FIXED,
        *_DSA_SIZES,
        Custom(("mlp_layer_types", "first_k_dense_replace"), _mlp_types_from_list, _mlp_list_from_ours),
        Custom(("layer_types",), _v32_layers, lambda o: {}),
        Custom(("indexer_types",), _glm_indexer_types, _glm_indexer_types_native),
        native_fixed("mlp_bias", False, why="GLM-MoE-DSA's MLPs have no bias"),
        native_fixed("indexer_rope_interleave", True, why=GLM_INDEXER_ROPE_WHY),
    ],
    ignored_options=("head_dim",),
    model_rules=MODEL_RULES,
    layer_rules=NORM_RULES,
    mixer_rules={"dsa": DSA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    check_ours=_check_dsa_export,
    derived_native_fields=("layer_types",),
    tiny_config=dict(_DSA_TINY, num_hidden_layers=4, indexer_types=["full", "shared", "full", "shared"]),
    exactness="exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied indexer scores at the cut",
)

FAMILIES = {f.model_type: f for f in (DEEPSEEK_V3, DEEPSEEK_V32, GLM_MOE_DSA)}
