"""``hy_v4`` (HY-V4): DSA on MLA with full and shared indexers, a per-head sigmoid output gate, learned
attention sinks, MoE with a clamped SwiGLU in the routed experts, independent hyper-connection residual
streams (iHC).

Layer map (native → ours):
- ``self_attn.*`` → ``mixer.*`` (``dsa``, ``dsa_base="mla"``), ``gate_proj`` (``mla_gate_proj``), ``sinks``
  (``attention_sinks``). RoPE layout: the checkpoint rotates interleaved pairs as DeepSeek does (vLLM and
  SGLang rotate HY-V4 that way, and transformers since 5.25): the rope rows of ``q_b_proj`` per head and
  ``kv_a_proj_with_mqa`` are de-interleaved, as in ``deepseek.py``. transformers 5.23 / 5.24 rotate halves
  instead, a different function of the same checkpoint; the conversion keeps the checkpoint's, so an import
  or export is the same model under every release (:func:`native_context` makes those two releases pair, for
  comparing against them).
- ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`` → ``mixer.indexer.{wq, wk, k_norm, weights_proj}``.
  HY-V4 rotates the *last* ``qk_rope_head_dim`` channels of each indexer head, ours the first: the rows of
  ``wq_b`` (per head), ``wk`` and ``k_norm`` are rotated so the rope block comes first, de-interleaved (the
  indexer score is a sum over channels and LayerNorm is permutation-equivariant: exact without an option).
  The indexer's LayerNorm eps is ``rms_norm_eps`` (``index_norm_eps``). ``indexer_types`` "shared" layers
  reuse the previous full layer's top-k: ``dsa_indexer_types``.
- ``attn_hc.*`` / ``ffn_hc.*`` → ``mixer_hc.*`` / ``mlp_hc.*``; ``model.hc_head.hc_{fn,base,scale}`` →
  ``model.hc_head.{fn,base,scale}`` (``hyper_connections="ihc"``, ``hc_mult``, ``hc_eps``, ``hc_magnitude``).
- ``mlp.*`` as DeepSeek's (``mlp_layer_types`` "dense" / "sparse"); ``swiglu_limit`` → ``moe_swiglu_limit``
  (HY-V4 always clamps: an export of a model without the clamp writes ``swiglu_limit=inf``, a no-op clamp).

Not carried: transformers keeps ``lm_head`` in fp32 and computes the logits in fp32; ours in the model dtype
(identical in fp32). DSA ties at the top-k cut as for ``deepseek_v32`` (see ``deepseek.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ...mixers.mla import rope_deinterleave_index
from .base import Custom, NativeFamily, RuleContext, W, fail, ours_fixed, permute_rows, same
from .deepseek import (
    _COMMON,
    _DSA_SIZES,
    DENSE_RULES,
    MOE_RULES,
    TINY_MLA_MOE,
    _glm_indexer_types,
    _per_head_rope_rows,
    _v32_layers,
    indexer_rules,
)
from .moe_attention import MODEL_RULES, NORM_RULES


def native_rope_in_halves() -> bool:
    """Whether the installed transformers' HY-V4 rotates halves (5.23 / 5.24) rather than the checkpoint's
    interleaved pairs (5.25 and later: ``apply_rotary_pos_emb_interleave``)."""
    from transformers.models.hy_v4 import modeling_hy_v4

    return not hasattr(modeling_hy_v4, "apply_rotary_pos_emb_interleave")


@contextlib.contextmanager
def native_context() -> Iterator[None]:
    """Inside the block, transformers' HY-V4 rotates the checkpoint's interleaved pairs on every release: on
    5.23 / 5.24 its ``apply_rotary_pos_emb`` (attention and indexer) is DeepSeek-V3's interleaved rotation
    (what 5.25 computes), restored on exit; nothing to do on 5.25. For comparing a conversion against
    transformers' model."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    from transformers.models.hy_v4 import modeling_hy_v4

    if not native_rope_in_halves():
        yield
        return

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary_pos_emb_interleave(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    saved = modeling_hy_v4.apply_rotary_pos_emb
    modeling_hy_v4.apply_rotary_pos_emb = interleaved
    try:
        yield
    finally:
        modeling_hy_v4.apply_rotary_pos_emb = saved


def _index_rows(n_heads: int, head_dim: int, rope: int) -> torch.Tensor:
    """Per head: the last ``rope`` rows first, de-interleaved, then the others (HY-V4's rope block → ours)."""
    tail = torch.arange(head_dim - rope, head_dim)[rope_deinterleave_index(rope)]
    block = torch.cat([tail, torch.arange(head_dim - rope)])
    return (torch.arange(n_heads)[:, None] * head_dim + block[None, :]).reshape(-1)


def _rope(ctx: RuleContext) -> int:
    c = ctx.ours
    return min(c.qk_rope_head_dim, c.index_head_dim)


def _index_q_rows(ctx: RuleContext) -> torch.Tensor:
    return _index_rows(ctx.ours.index_n_heads, ctx.ours.index_head_dim, _rope(ctx))


def _index_k_rows(ctx: RuleContext) -> torch.Tensor:
    return _index_rows(1, ctx.ours.index_head_dim, _rope(ctx))


def _q_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    dqk = c.qk_nope_head_dim + c.qk_rope_head_dim
    return _per_head_rope_rows(c.num_attention_heads, dqk, c.qk_nope_head_dim, c.qk_rope_head_dim)


def _kv_a_rows(ctx: RuleContext) -> torch.Tensor:
    c = ctx.ours
    return _per_head_rope_rows(1, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim)


# The attention's weight rules (HY-V4 and HY-V4-VL's text decoder): the indexer, the MLA projections with
# their rope rows de-interleaved, everything else of the attention by name (q_a_proj, q_a_layernorm,
# kv_a_layernorm, kv_b_proj, o_proj, gate_proj, sinks).
DSA_RULES = (
    *indexer_rules(_index_q_rows, _index_k_rows),
    W("self_attn.q_b_proj.weight", "mixer.q_b_proj.weight", *permute_rows(_q_rows)),
    W("self_attn.kv_a_proj_with_mqa.weight", "mixer.kv_a_proj_with_mqa.weight", *permute_rows(_kv_a_rows)),
    W(
        "self_attn.kv_a_proj_with_mqa.bias",
        "mixer.kv_a_proj_with_mqa.bias",
        *permute_rows(_kv_a_rows),
        when=lambda ctx: ctx.ours.attention_bias,
    ),
    W("self_attn.", "mixer."),
)

_HC_MODEL_RULES = (
    W("model.hc_head.hc_fn", "model.hc_head.fn"),
    W("model.hc_head.hc_base", "model.hc_head.base"),
    W("model.hc_head.hc_scale", "model.hc_head.scale"),
)
_HC_LAYER_RULES = (W("attn_hc.", "mixer_hc."), W("ffn_hc.", "mlp_hc."))


def _mlp_types(n) -> dict:
    return {"mlp_types": ["dense" if t == "dense" else "moe" for t in n.mlp_layer_types]}


def _mlp_layer_types(o) -> dict:
    return {"mlp_layer_types": ["dense" if t == "dense" else "sparse" for t in o.mlp_types]}


def _indexer_types_native(o) -> dict:
    n = o.num_hidden_layers
    return {"indexer_types": list(o.dsa_indexer_types) if o.dsa_indexer_types is not None else ["full"] * n}


def _swiglu_to_ours(n) -> dict:
    limit = n.swiglu_limit
    if not limit > 0:
        # HYV4Experts clamps with the value as given (its docstring says <= 0 disables the clamp; the code
        # clamps the gate to <= limit): no function to carry over faithfully.
        fail(
            f"{n.model_type}: {type(n).__name__}.swiglu_limit={limit!r}: transformers' HYV4Experts clamps "
            "the gate at this value (its docs say values <= 0 disable the clamp, its code does not); only a "
            "positive limit (or inf) has one meaning"
        )
    return {"moe_swiglu_limit": None if math.isinf(limit) else float(limit)}


def _swiglu_to_native(o) -> dict:
    return {"swiglu_limit": math.inf if o.moe_swiglu_limit is None else float(o.moe_swiglu_limit)}


def _check_export(o) -> str | None:
    """Refusals of ``--to hy_v4`` (and of HY-V4-VL's text decoder, the same layers)."""
    for i, t in enumerate(o.mlp_types):
        if t not in ("dense", "moe"):
            return f"HybridConfig.mlp_types[{i}]={t!r} (layer {i}): every layer of HY-V4 has an MLP"
    for i, t in enumerate(o.mixer_types):
        if t != "dsa":
            return f"HybridConfig.mixer_types[{i}]={t!r} (layer {i}): every layer of HY-V4 is DSA on MLA"
    if o.q_lora_rank is None:
        return "HybridConfig.q_lora_rank=None: HY-V4's attention and indexer read the q-LoRA latent"
    if o.dsa_base != "mla":
        return f"HybridConfig.dsa_base={o.dsa_base!r}: HY-V4 runs DSA on MLA"
    if o.index_head_dim < o.qk_rope_head_dim:
        return (
            f"HybridConfig.index_head_dim={o.index_head_dim} < qk_rope_head_dim={o.qk_rope_head_dim}: "
            "HY-V4's indexer rotates qk_rope_head_dim channels of each head"
        )
    return None


HY_V4 = NativeFamily(
    model_type="hy_v4",
    config_rules=[
        *_COMMON,
        *_DSA_SIZES,
        *ours_fixed(
            dsa_base="mla",
            dsa_mode="sparse",
            dsa_selector="indexer",
            attention_sinks=True,
            mla_gate_proj=True,
            hyper_connections="ihc",
            hc_sinkhorn_iters=20,  # not used by iHC; fixed so the export's round trip has one spelling
        ),
        Custom((), lambda n: {"index_norm_eps": n.rms_norm_eps}, lambda o: {}),
        *same("hc_mult", "hc_eps", "hc_magnitude"),
        Custom(("swiglu_limit",), _swiglu_to_ours, _swiglu_to_native),
        Custom(("mlp_layer_types",), _mlp_types, _mlp_layer_types),
        Custom(("layer_types",), _v32_layers, lambda o: {}),
        Custom(("indexer_types",), _glm_indexer_types, _indexer_types_native),
    ],
    # head_dim is overwritten with qk_rope_head_dim by the config itself; learnable_sink_init is the sinks'
    # initial value only
    ignored_options=("head_dim", "learnable_sink_init"),
    model_rules=(*MODEL_RULES, *_HC_MODEL_RULES),
    layer_rules=(*NORM_RULES, *_HC_LAYER_RULES),
    mixer_rules={"dsa": DSA_RULES},
    mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
    check_ours=_check_export,
    native_context=native_context,
    tiny_config=dict(
        TINY_MLA_MOE,
        n_group=1,
        q_lora_rank=24,
        index_n_heads=8,  # few exact-zero (ReLU) ties at the top-k cut on the tests' inputs
        index_head_dim=16,
        index_topk=5,
        indexer_types=["full", "shared", "full", "shared"],
        hc_mult=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        swiglu_limit=0.3,  # small enough that the tiny model's random activations reach it
    ),
    exactness="exact (fp32 ≤ 1e-5); at index_topk < T on inputs without tied indexer scores at the cut",
)

FAMILIES = {"hy_v4": HY_V4}
