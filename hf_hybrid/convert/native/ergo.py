"""``ergo`` (transformers >= 5.25) ↔ hf_hybrid.

Every layer: GQA softmax attention with a fused ``qkv_proj``, per-head q/k RMSNorm, sliding-window layers with
RoPE and global layers without (``layer_types``; ``rope_parameters["full_attention"] = None``: our
``nope_layers``), sandwich norms (``input_layernorm`` / ``post_attention_layernorm`` around the attention,
``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP: ``norm_placement="sandwich"``)
and a learned residual gate per branch (``residual_gates``). ``global_attention_scale`` (s, set by
checkpoints whose context was extended) multiplies q and k of the global layers by sqrt(s), i.e. their logits
by s: our ``attention_logit_multipliers`` (s on the global layers, 1 on the sliding ones). MLPs: a leading
dense relu² block (``first_dense_intermediate_size``, ungated), then MoE: sigmoid router (fp32 logits,
correction bias, renormalised, ``moe_routed_scaling_factor``), relu² experts each followed by its own RMSNorm
(``moe_expert_norm``), and one relu² shared expert followed by an RMSNorm (``shared_expert_norm``).

Weights: Ergo rotates *interleaved* pairs (``rotate_half`` on ``x[..., ::2]`` / ``x[..., 1::2]``); ours
rotates halves, so the q and k rows of ``qkv_proj`` (per head) and the q/k norm weights are de-interleaved
(:func:`rope_deinterleave_index`; the per-head RMSNorm and q·k are permutation-invariant, so the NoPE layers
stay exact under the same permutation). Ergo stores its experts transposed (``up_proj [E, H, I]``).
"""

from __future__ import annotations

import torch

from ...mixers.mla import rope_deinterleave_index
from .base import Custom, NativeFamily, RuleContext, W, fail, ours_fixed, permute_rows, same
from .moe_attention import MODEL_RULES

_NATIVE_MIXER = {"sliding_attention": "sliding_attention", "full_attention": "attention"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}


def _head_dim(c) -> int:
    return c.hidden_size // c.num_attention_heads


def _rows_per_head(n_heads: int, d: int) -> torch.Tensor:
    return (torch.arange(n_heads)[:, None] * d + rope_deinterleave_index(d)[None, :]).reshape(-1)


def _qkv_to_ours(ts, ctx: RuleContext):
    c, d = ctx.ours, ctx.ours.head_dim
    sizes = [c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d]
    q, k, v = torch.split(ts[0], sizes)
    return [q[_rows_per_head(c.num_attention_heads, d)], k[_rows_per_head(c.num_key_value_heads, d)], v]


def _qkv_to_native(ts, ctx: RuleContext):
    c, d = ctx.ours, ctx.ours.head_dim
    q, k, v = ts

    def back(t, heads):
        index = _rows_per_head(heads, d)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel())
        return t[inverse]

    return [torch.cat([back(q, c.num_attention_heads), back(k, c.num_key_value_heads), v], dim=0)]


def _norm_rows(ctx: RuleContext) -> torch.Tensor:
    return rope_deinterleave_index(ctx.ours.head_dim)


def _transposed():
    swap = lambda ts, ctx: [ts[0].transpose(1, 2).contiguous()]  # noqa: E731 (an involution)
    return swap, swap


ATTENTION_RULES = (
    W(
        "self_attn.qkv_proj.weight",
        ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
        to_ours=_qkv_to_ours,
        to_native=_qkv_to_native,
    ),
    W("self_attn.q_norm.weight", "mixer.q_norm.weight", *permute_rows(_norm_rows)),
    W("self_attn.k_norm.weight", "mixer.k_norm.weight", *permute_rows(_norm_rows)),
    W("self_attn.o_proj.weight", "mixer.o_proj.weight"),
)
LAYER_RULES = (
    W("input_layernorm.weight", "input_layernorm.weight"),
    W("post_attention_layernorm.weight", "post_mixer_layernorm.weight"),
    W("pre_feedforward_layernorm.weight", "post_attention_layernorm.weight"),
    W("post_feedforward_layernorm.weight", "post_mlp_layernorm.weight"),
    W("attention_residual_gate.weight", "mixer_residual_gate.weight"),
    W("feedforward_residual_gate.weight", "mlp_residual_gate.weight"),
)
MOE_RULES = (
    W("mlp.gate.linear.weight", "mlp.router.weight"),
    W("mlp.gate.e_score_correction_bias", "mlp.router.e_score_correction_bias"),
    W("mlp.experts.up_proj", "mlp.experts.up_proj", *_transposed()),
    W("mlp.experts.down_proj", "mlp.experts.down_proj", *_transposed()),
    W("mlp.experts.post_expert_norm.weight", "mlp.experts.post_expert_norm.weight"),
    W("mlp.shared_experts.up_proj.weight", "mlp.shared_experts.up_proj.weight"),
    W("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj.weight"),
    W("mlp.shared_experts.norm.weight", "mlp.shared_experts_norm.weight"),
)
DENSE_RULES = (W("mlp.", "mlp."),)


def _layers_to_ours(n) -> dict:
    types = list(n.layer_types)
    for i, t in enumerate(types):
        if t not in _NATIVE_MIXER:
            supported = ", ".join(_NATIVE_MIXER)
            fail(f"ergo: ErgoConfig.layer_types[{i}]={t!r} has no counterpart; supported: {supported}")
    rope = n.rope_parameters or {}
    sliding, full = rope.get("sliding_attention"), rope.get("full_attention")
    if "sliding_attention" in types and sliding is None:
        fail(
            "ergo: ErgoConfig.rope_parameters['sliding_attention']=None has no counterpart (ergo's sliding "
            "layers rotate)"
        )
    if full is not None and sliding is not None and dict(full) != dict(sliding):
        fail(
            f"ergo: ErgoConfig.rope_parameters['full_attention']={full!r} differs from the sliding layers' "
            f"{sliding!r}; supported: None (NoPE global layers, Ergo's default) or the same parameters"
        )
    params = dict(sliding if sliding is not None else full or {"rope_type": "default", "rope_theta": 1e6})
    if params.get("rope_type", "default") != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
        fail(
            f"ergo: ErgoConfig.rope_parameters['sliding_attention']={params!r} has no counterpart; "
            "supported: rope_type 'default' over the whole head"
        )
    nope = [i for i, t in enumerate(types) if t == "full_attention"] if full is None else []
    return {
        "mixer_types": [_NATIVE_MIXER[t] for t in types],
        "nope_layers": nope or None,
        "rope_parameters": params,
        "head_dim": _head_dim(n),
    }


def _layers_to_native(o) -> dict:
    types = [_OUR_LAYER.get(m, m) for m in o.mixer_types]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    nope = bool(full) and set(o.nope_layers or ()) == set(full)
    every = full[0] + 1 if full else 4
    regular = all((t == "full_attention") == ((i + 1) % every == 0) for i, t in enumerate(types))
    rope = dict(o.rope_parameters)
    return {
        "layer_types": types,
        "global_attention_every_n_layers": every if regular else 4,
        "rope_parameters": {"sliding_attention": rope, "full_attention": None if nope else dict(rope)},
    }


def _mlp_to_ours(n) -> dict:
    return {"mlp_types": ["dense" if t == "dense" else "moe" for t in n.mlp_layer_types]}


def _mlp_to_native(o) -> dict:
    types = ["dense" if t == "dense" else "sparse" for t in o.mlp_types]
    k = 0
    while k < len(types) and types[k] == "dense":
        k += 1
    return {"mlp_layer_types": types, "num_dense_blocks": k}


def _scale_to_ours(n) -> dict:
    s = n.global_attention_scale
    if s is None:
        return {"attention_logit_multipliers": None}
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
        fail(
            f"ergo: ErgoConfig.global_attention_scale={s!r} has no counterpart; supported: None or a "
            "number > 0"
        )
    return {
        "attention_logit_multipliers": [float(s) if t == "full_attention" else 1.0 for t in n.layer_types]
    }


def _scale_to_native(o) -> dict:
    values = o.attention_logit_multipliers or [1.0] * o.num_hidden_layers
    scales = {float(v) for v, m in zip(values, o.mixer_types) if m == "attention"}
    s = scales.pop() if len(scales) == 1 else 1.0  # _check_ours refuses two values
    return {"global_attention_scale": None if s == 1.0 else s}


def _check_ours(o) -> str | None:
    n = o.num_hidden_layers
    for i, (m, mlp) in enumerate(zip(o.mixer_types, o.mlp_types)):
        if m not in _OUR_LAYER:
            supported = ", ".join(_OUR_LAYER)
            return f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; supported: {supported}"
        if mlp not in ("dense", "moe"):
            return f"mlp_types[{i}]={mlp!r} (layer {i}): every ergo layer has an MLP (dense or moe)"
        if m == "sliding_attention" and i in (o.nope_layers or ()):
            return f"nope_layers={o.nope_layers!r} names sliding layer {i}: ergo's sliding layers rotate"
    full = [i for i, m in enumerate(o.mixer_types) if m == "attention"]
    multipliers = o.attention_logit_multipliers or [1.0] * n
    for i, (m, v) in enumerate(zip(o.mixer_types, multipliers)):
        if m == "sliding_attention" and v != 1:
            return (
                f"attention_logit_multipliers[{i}]={v!r} (sliding layer {i}): ergo scales the global layers' "
                "logits only (global_attention_scale); the sliding layers' multiplier is 1"
            )
    if len({float(multipliers[i]) for i in full}) > 1:
        values = [multipliers[i] for i in full]
        return (
            f"attention_logit_multipliers={o.attention_logit_multipliers!r}: ergo has one scale for every "
            f"global layer (global_attention_scale); the global layers {full} have {values}"
        )
    if o.nope_layers is not None and sorted(o.nope_layers) != full:
        return f"nope_layers={o.nope_layers!r}: ergo's global layers are all NoPE ({full}) or all RoPE (None)"
    placement = list(o.norm_placement or ["pre"] * n)
    if placement != ["sandwich"] * n:
        return f"norm_placement={o.norm_placement!r}: every ergo layer has sandwich norms ('sandwich')"
    if o.head_dim * o.num_attention_heads != o.hidden_size:
        return f"head_dim={o.head_dim}: ergo's head_dim is hidden_size / num_attention_heads"
    if "moe" in o.mlp_types and o.num_shared_experts != 1:
        return f"num_shared_experts={o.num_shared_experts}: every ergo MoE layer has one shared expert"
    return None


FAMILIES = {
    "ergo": NativeFamily(
        model_type="ergo",
        min_transformers="5.25",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "moe_intermediate_size",
                "num_experts",
                "num_experts_per_tok",
                "max_position_embeddings",
                "rms_norm_eps",
                "sliding_window",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            ),
            Custom(
                ("first_dense_intermediate_size",),
                lambda n: {"intermediate_size": n.first_dense_intermediate_size},
                lambda o: {"first_dense_intermediate_size": o.intermediate_size},
            ),
            Custom(
                ("shared_intermediate_size",),
                lambda n: {"shared_expert_intermediate_size": n.shared_intermediate_size},
                lambda o: {"shared_intermediate_size": o.shared_expert_size or o.moe_intermediate_size},
            ),
            Custom(
                ("moe_routed_scaling_factor",),
                lambda n: {"routed_scaling_factor": n.moe_routed_scaling_factor},
                lambda o: {"moe_routed_scaling_factor": o.routed_scaling_factor},
            ),
            Custom(
                ("layer_types", "rope_parameters", "global_attention_every_n_layers"),
                _layers_to_ours,
                _layers_to_native,
            ),
            Custom(("mlp_layer_types", "num_dense_blocks"), _mlp_to_ours, _mlp_to_native),
            Custom(("global_attention_scale",), _scale_to_ours, _scale_to_native),
            *ours_fixed(
                num_shared_experts=1,
                shared_expert_gate=False,
                shared_expert_norm=True,
                moe_expert_norm=True,
                residual_gates=True,
                mlp_gated=False,
                hidden_act="relu2",
                mlp_bias=False,
                use_qk_norm=True,
                qk_norm_scope="head",
                clip_qkv=None,
                attention_bias=False,
                attention_output_gate=False,
                attention_scaling=None,
                attention_rope=True,
                attention_sinks=False,
                router_scoring_func="sigmoid",
                norm_topk_prob=True,
                n_group=1,
                topk_group=1,
                moe_routing="topk",
                moe_capacity_factor=None,
                gated_norms=None,
                tie_word_embeddings=False,  # ErgoForCausalLM has its own lm_head, never tied
            ),
            Custom((), lambda n: {"norm_placement": ["sandwich"] * n.num_hidden_layers}, lambda o: {}),
        ],
        model_rules=MODEL_RULES,
        layer_rules=LAYER_RULES,
        mixer_rules={"attention": ATTENTION_RULES, "sliding_attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES, "dense": DENSE_RULES},
        check_ours=_check_ours,
        tiny_config=dict(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            first_dense_intermediate_size=48,
            num_dense_blocks=1,
            moe_intermediate_size=16,
            shared_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            moe_routed_scaling_factor=1.5,
            sliding_window=4,
            global_attention_every_n_layers=2,
            global_attention_scale=2.0,  # a context-extended checkpoint's global logit scale (None: none)
            max_position_embeddings=128,
        ),
    ),
}
