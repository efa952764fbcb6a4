"""``mistral_large4_text`` ↔ hf_hybrid: the text decoder of Mistral-Large-4 (a vision-language checkpoint,
``MistralLarge4ForConditionalGeneration``; transformers has no text-only class for it).

Every layer is DSA on MLA without q-LoRA (``mixer_types`` ``"dsa"``, ``q_lora_rank=None``) with a MoE or dense
MLP (``mlp_layer_types``). What differs from DeepSeek-V3.2 and maps onto options of ours:

- ``no_rope_layers`` (1 = RoPE): the NoPE layers have no decoupled rope key (their ``qk_rope_head_dim``
  channels come per head from ``kv_b_proj``) and their indexer no RoPE → ``nope_layers`` on MLA layers.
- ``kv_source_layers``: a layer pointing at an earlier one has no ``kv_a_proj_with_mqa`` / ``kv_a_layernorm``
  and attends over that layer's latent cache → ``kv_source_layers`` (the cache holds it once).
  transformers passes shared latents between layers in a dict keyed by "rope" / "nope", so a layer really
  reads the latest *storing* layer of its RoPE kind before it; the import refuses a config where that is not
  the layer ``kv_source_layers`` names (transformers would compute something else than it says).
- ``MistralLarge4TextSoftmaxScaling`` on the attention queries (after RoPE) and the indexer queries: per head
  ``q · (scale · log(1 + position) + bias)`` → ``query_log_scaling``.
- the indexer's query comes from the hidden state through a LayerNorm (``q_input_norm``) → ``index_q_norm``;
  its RoPE rotates interleaved pairs (as GLM-MoE-DSA's): the rows are de-interleaved like the attention's.
- LeRoPE: the rotary embedding's learned ``alpha`` scales each inverse frequency by ``exp(alpha)`` →
  ``rope_learned_scale`` (``model.rope_log_scale``); YaRN rope scaling as transformers computes it.
- ``final_logit_softcapping`` (default 30): ``c · tanh(logits / c)`` → the same field.
- the MoE router: softmax, group-limited (top-2 sum per group), top-k always renormalised, routed scaling,
  shared experts (``n_shared_experts × moe_intermediate_size`` wide); no correction bias.

Import reads the text decoder (``model.language_model.*``, ``lm_head``) and drops the vision tower and
projector (one printed line). Export writes a ``MistralLarge4ForConditionalGeneration`` whose vision tower and
projector are a **placeholder** (a one-layer Pixtral tower, all weights zero; the export's card and a printed
line say so): the text function is exact, images are not understood.

Position-dependent parts (the query scaling): the native model must be given the same ``position_ids`` as ours
(``generate`` does; a bare forward of a left-padded batch uses ``arange`` there and counts real tokens here).
"""

from __future__ import annotations

import torch

from ...mixers.dsa import dsa_layer_has_indexer
from ...mixers.mla import mla_nope_layer
from .base import (
    Custom,
    RuleContext,
    VisionWrapperFamily,
    W,
    fail,
    ours_fixed,
    permute_rows,
    rename,
    same,
    zero_filled,
)
from .deepseek import (
    MLA_MOE_SAME,
    TINY_MLA_MOE,
    _check_kv_heads,
    _glm_indexer_types,
    _glm_indexer_types_native,
    _mlp_list_from_ours,
    _mlp_types_from_list,
    _per_head_rope_rows,
    _v32_layers,
)

_INDEX_EPS = 1e-6  # the indexer's nn.LayerNorms (q_input_norm, k_norm)
_LM = "model.language_model."


def _rope_layer(ctx: RuleContext) -> bool:
    return not mla_nope_layer(ctx.ours, ctx.layer)


def _q_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    dqk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if not _rope_layer(ctx):
        return torch.arange(c.num_attention_heads * dqk)
    return _per_head_rope_rows(c.num_attention_heads, dqk, c.qk_nope_head_dim, c.qk_rope_head_dim)


def _kv_a_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    if not _rope_layer(ctx):
        return torch.arange(c.kv_lora_rank)
    return _per_head_rope_rows(1, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim)


def _index_rope(ctx: RuleContext) -> int:
    return min(ctx.ours.qk_rope_head_dim, ctx.ours.index_head_dim) if _rope_layer(ctx) else 0


def _index_q_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    if not _index_rope(ctx):
        return torch.arange(c.index_n_heads * c.index_head_dim)
    return _per_head_rope_rows(c.index_n_heads, c.index_head_dim, 0, _index_rope(ctx))


def _index_k_rows(ctx: RuleContext) -> torch.Tensor:
    if not _index_rope(ctx):
        return torch.arange(ctx.ours.index_head_dim)
    return _per_head_rope_rows(1, ctx.ours.index_head_dim, 0, _index_rope(ctx))


def _owns_kv(ctx: RuleContext) -> bool:
    return not ctx.ours.shares_kv(ctx.layer)


def _has_indexer(ctx: RuleContext) -> bool:
    return dsa_layer_has_indexer(ctx.ours, ctx.layer)


_ATTENTION_RULES = (
    W("self_attn.q_proj.weight", "mixer.q_proj.weight", *permute_rows(_q_rows)),
    W(
        "self_attn.kv_a_proj_with_mqa.weight",
        "mixer.kv_a_proj_with_mqa.weight",
        *permute_rows(_kv_a_rows),
        when=_owns_kv,
    ),
    W(
        "self_attn.kv_a_proj_with_mqa.bias",
        "mixer.kv_a_proj_with_mqa.bias",
        *permute_rows(_kv_a_rows),
        when=lambda ctx: _owns_kv(ctx) and ctx.ours.attention_bias,
    ),
    *(
        W(f"self_attn.indexer.{n}", f"mixer.indexer.{o}", *permute_rows(rows), when=_has_indexer)
        for n, o, rows in (
            ("wq_b.weight", "wq.weight", _index_q_rows),
            ("wk.weight", "wk.weight", _index_k_rows),
            ("k_norm.weight", "k_norm.weight", _index_k_rows),
            ("k_norm.bias", "k_norm.bias", _index_k_rows),
        )
    ),
    # the rest keeps its name: kv_a_layernorm, kv_b_proj, o_proj, softmax_scaling.*, indexer.{q_input_norm,
    # weights_proj, softmax_scaling}.*
    W("self_attn.", "mixer."),
)

_MOE_RULES = (
    W("mlp.gate.weight", "mlp.router.weight"),
    W("mlp.experts.", "mlp.experts."),
    W("mlp.shared_experts.", "mlp.shared_experts."),
    W(
        (),
        "mlp.router.e_score_correction_bias",
        *zero_filled(
            lambda ctx: (ctx.ours.num_experts,), "the router's e_score_correction_bias (aux-loss-free bias)"
        ),
    ),
)

_MODEL_RULES = (
    W(f"{_LM}embed_tokens.weight", "model.embed_tokens.weight"),
    W(f"{_LM}norm.weight", "model.norm.weight"),
    W(f"{_LM}rotary_emb.alpha", "model.rope_log_scale"),
    W("lm_head.weight", "lm_head.weight", when=lambda ctx: not ctx.ours.tie_word_embeddings),
)


# ---- config ------------------------------------------------------------------------------------------------


def _nope_layers(native) -> dict:
    flags = list(native.no_rope_layers)[: native.num_hidden_layers]
    return {"nope_layers": [i for i, use in enumerate(flags) if not use] or None}


def _no_rope_layers(ours) -> dict:
    nope = set(ours.nope_layers or ())
    return {"no_rope_layers": [0 if i in nope else 1 for i in range(ours.num_hidden_layers)]}


def transformers_kv_sources(native) -> list[int]:
    """The layer each layer really reads its latent from in transformers' ``MistralLarge4TextModel``: storing
    layers (``kv_sharing_modes`` "store") write a dict keyed "rope" / "nope" by their RoPE use, a sharing
    layer reads the entry of its own RoPE use, the latest write before it. -1: nothing stored there yet."""
    modes = native.kv_sharing_modes
    latest: dict[bool, int] = {}
    out = []
    for i, mode in enumerate(modes):
        rope = bool(native.no_rope_layers[i])
        if mode in ("reuse", "reuse_but_indexer"):
            out.append(latest.get(rope, -1))
        else:
            out.append(i)
            if mode == "store":
                latest[rope] = i
    return out


def _kv_sources(native) -> dict:
    sources = list(native.kv_source_layers)
    real = transformers_kv_sources(native)
    for i, (said, read) in enumerate(zip(sources, real)):
        if said != read:
            what = (
                "nothing (no layer of its RoPE use stores a latent before it)"
                if read < 0
                else f"layer {read}"
            )
            fail(
                f"mistral_large4_text: MistralLarge4TextConfig.kv_source_layers[{i}]={said}, but "
                "transformers passes shared latents by RoPE use (no_rope_layers) and layer "
                f"{i} would read {what}; hf_hybrid imports configs where each layer reads the layer "
                "kv_source_layers names: a source of the same RoPE use, with no other storing layer of that "
                "use in between"
            )
    return {"kv_source_layers": None if sources == list(range(len(sources))) else sources}


def _kv_sources_native(ours) -> dict:
    return {"kv_source_layers": [ours.kv_source(i) for i in range(ours.num_hidden_layers)]}


def _check_export(ours) -> str | None:
    if ours.q_lora_rank is not None:
        return f"HybridConfig.q_lora_rank={ours.q_lora_rank}: this family's attention has no q-LoRA (None)"
    for i, t in enumerate(ours.mixer_types):
        if t != "dsa":
            return f"HybridConfig.mixer_types[{i}]={t!r} (layer {i}): every layer of this family is 'dsa'"
    if ours.dsa_base != "mla":
        return f"HybridConfig.dsa_base={ours.dsa_base!r}: this family runs DSA on MLA"
    for i, t in enumerate(ours.mlp_types):
        if t not in ("dense", "moe"):
            return f"HybridConfig.mlp_types[{i}]={t!r} (layer {i}): every layer of this family has an MLP"
    if "moe" in ours.mlp_types and ours.num_shared_experts < 1:
        return "HybridConfig.num_shared_experts=0: this family's MoE block has shared experts (>= 1)"
    try:  # a sharing pattern transformers' "rope" / "nope" dict would read differently
        _kv_sources(_NativeView(ours))
    except Exception as err:  # noqa: BLE001 - reported as the export's reason
        return str(err).removeprefix("mistral_large4_text: ")
    return None


class _NativeView:
    """What :func:`transformers_kv_sources` reads, computed from our config (for the export's check)."""

    def __init__(self, ours):
        n = ours.num_hidden_layers
        self.kv_source_layers = [ours.kv_source(i) for i in range(n)]
        self.no_rope_layers = _no_rope_layers(ours)["no_rope_layers"]
        indexer = ["full" if dsa_layer_has_indexer(ours, i) else "shared" for i in range(n)]
        modes = [None if s == i else "reuse" for i, s in enumerate(self.kv_source_layers)]
        for i in range(n):
            if modes[i] == "reuse" and indexer[i] != "shared":
                modes[i] = "reuse_but_indexer"
        for i in range(n):
            if i in self.kv_source_layers[i + 1 :]:
                modes[i] = "store"
        self.kv_sharing_modes = modes


class MistralLarge4Family(VisionWrapperFamily):
    """The text decoder lives in ``MistralLarge4ForConditionalGeneration``."""

    def model_config(self, text_config):
        """The wrapper config around ``text_config``, with the smallest Pixtral vision tower (placeholder)."""
        from transformers import MistralLarge4Config

        vision = dict(
            model_type="pixtral",
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            head_dim=8,
            patch_size=14,
            image_size=28,
            hidden_act="silu",
        )
        return MistralLarge4Config(
            text_config=text_config.to_dict(),
            vision_config=vision,
            tie_word_embeddings=text_config.tie_word_embeddings,  # the wrapper's flag is the one read
        )


MISTRAL_LARGE4_TEXT = MistralLarge4Family(
    model_type="mistral_large4_text",
    wrapper_class="MistralLarge4ForConditionalGeneration",
    placeholder_weights=r"model\.(vision_tower|multi_modal_projector)\.",
    config_rules=[
        *same(
            *MLA_MOE_SAME,
            "n_group",
            "topk_group",
            "hidden_act",
            "tie_word_embeddings",
            "rope_parameters",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "final_logit_softcapping",
        ),
        rename("n_routed_experts", "num_experts"),
        rename("n_shared_experts", "num_shared_experts"),
        Custom(
            ("num_key_value_heads",),
            lambda n: _check_kv_heads(n),
            lambda o: {"num_key_value_heads": o.num_attention_heads},
        ),
        Custom(("mlp_layer_types", "first_k_dense_replace"), _mlp_types_from_list, _mlp_list_from_ours),
        Custom(("layer_types",), _v32_layers, lambda o: {}),
        Custom(("indexer_types",), _glm_indexer_types, _glm_indexer_types_native),
        Custom(("no_rope_layers",), _nope_layers, _no_rope_layers),
        Custom(("kv_source_layers",), _kv_sources, _kv_sources_native),
        *ours_fixed(
            q_lora_rank=None,
            router_scoring_func="softmax",
            norm_topk_prob=True,
            moe_routing="topk",
            moe_capacity_factor=None,
            mla_norm_eps=None,  # kv_a_layernorm uses rms_norm_eps
            mla_rope_heads=1,
            mla_latent_norm=True,
            mla_rope_pairs=None,
            mla_use_rope=True,
            dsa_base="mla",
            dsa_mode="sparse",
            dsa_selector="indexer",
            index_norm_eps=_INDEX_EPS,
            index_q_norm=True,
            query_log_scaling=True,
            rope_learned_scale=True,
        ),
    ],
    ignored_options=("head_dim",),  # overwritten with qk_rope_head_dim by the config itself
    model_rules=_MODEL_RULES,
    layer_rules=(
        W("input_layernorm.weight", "input_layernorm.weight"),
        W("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ),
    mixer_rules={"dsa": _ATTENTION_RULES},
    mlp_rules={"moe": _MOE_RULES, "dense": (W("mlp.", "mlp."),)},
    ignored_native_keys=(r"^model\.vision_tower\.", r"^model\.multi_modal_projector\.", r"^mtp"),
    native_layer_prefix=_LM + "layers.{i}.",
    check_ours=_check_export,
    tiny_config=dict(
        TINY_MLA_MOE,
        n_group=2,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=5,
        no_rope_layers=[1, 1, 0, 0],
        kv_source_layers=[0, 0, 2, 2],
        indexer_types=["full", "shared", "full", "full"],
        final_logit_softcapping=30.0,
        # YaRN with a context short enough that its ramp matters here (attention_factor 1: no magnitude
        # scaling, as the published config)
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": 1.0,
        },
    ),
    exactness="exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied indexer scores at the cut",
    wrapper_note="model.vision_tower.* and model.multi_modal_projector.* (the vision tower) and mtp*",
)

FAMILIES = {MISTRAL_LARGE4_TEXT.model_type: MISTRAL_LARGE4_TEXT}

__all__ = ["FAMILIES", "MistralLarge4Family", "transformers_kv_sources"]
