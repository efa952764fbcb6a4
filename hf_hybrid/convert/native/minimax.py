"""``minimax`` (MiniMax-01) ↔ hf_hybrid: lightning attention (``linear_attention``) and softmax attention
(``full_attention``, full RoPE, no q/k norm), a top-k softmax MoE in every layer.

What the layers do, and the HybridConfig options that express it:
- the residual is taken **after** the input norm and both branches are scaled: ``h = α·norm(x) +
  β·f(norm(x))`` (``residual_from_norm``; α/β per layer kind from ``{linear,full}_attn_{alpha,beta}_factor``
  into ``mixer_residual_scales`` / ``mixer_output_scales``, ``mlp_{alpha,beta}_factor`` into ``mlp_*_scale``);
- lightning attention: SiLU on q, k, v (``linear_qkv_activation``), no q·k scale, a fixed per-head decay
  ``exp(-slope)`` per token (``linear_decay="fixed_slope"``), RMSNorm over all heads with eps 1e-6
  (``linear_norm_scope``, ``linear_norm_eps``), then ``sigmoid(output_gate(x))`` (``linear_output_gate``).
Names: ``qkv_proj`` rows are interleaved per head (``[q_h, k_h, v_h]``) ↔ our ``q_proj`` / ``k_proj`` /
``v_proj``; ``norm`` ↔ ``out_norm``, ``out_proj`` ↔ ``o_proj``. The native decay buffers (``slope_rate``,
``query_decay``, ``key_decay``, ``diagonal_decay``) are functions of the layer index, head count and
``block_size``: checked on import (a checkpoint with other values is refused), recomputed on export.
"""

from __future__ import annotations

import torch

from ...mixers.linear_attention import fixed_slopes
from .base import Custom, NativeFamily, RuleContext, W, fail, native_fixed, ours_fixed, rename, same
from .moe_attention import MODEL_RULES, MOE_RULES, NORM_RULES

_NATIVE_MIXER = {"linear_attention": "linear_attention", "full_attention": "attention"}
_OUR_LAYER = {v: k for k, v in _NATIVE_MIXER.items()}


def _head_dim(native) -> int:
    return native.head_dim or native.hidden_size // native.num_attention_heads


def _layers_to_ours(native) -> dict:
    n = native.num_hidden_layers
    types = list(native.layer_types)
    for i, t in enumerate(types):
        if t not in _NATIVE_MIXER:
            fail(
                f"minimax: MiniMaxConfig.layer_types[{i}]={t!r} has no "
                "counterpart; supported: linear_attention, full_attention"
            )
    alpha = {
        "linear_attention": native.linear_attn_alpha_factor,
        "full_attention": native.full_attn_alpha_factor,
    }
    beta = {
        "linear_attention": native.linear_attn_beta_factor,
        "full_attention": native.full_attn_beta_factor,
    }
    return {
        "mixer_types": [_NATIVE_MIXER[t] for t in types],
        "mlp_types": ["moe"] * n,
        "mixer_residual_scales": [float(alpha[t]) for t in types],
        "mixer_output_scales": [float(beta[t]) for t in types],
        "mlp_residual_scale": float(native.mlp_alpha_factor),
        "mlp_output_scale": float(native.mlp_beta_factor),
        "linear_num_heads": native.num_attention_heads,
        "linear_head_dim": _head_dim(native),
    }


def _layers_to_native(ours) -> dict:
    types = [_OUR_LAYER.get(m, m) for m in ours.mixer_types]
    out = {
        "layer_types": types,
        "mlp_alpha_factor": ours.mlp_residual_scale,
        "mlp_beta_factor": ours.mlp_output_scale,
    }
    n = ours.num_hidden_layers
    alphas, betas = ours.mixer_residual_scales or [1.0] * n, ours.mixer_output_scales or [1.0] * n
    for kind, prefix in (("linear_attention", "linear_attn"), ("full_attention", "full_attn")):
        layers = [i for i, t in enumerate(types) if t == kind]
        # One α and one β per layer kind natively: the first layer's; the round-trip check names any other
        # layer.
        out[f"{prefix}_alpha_factor"] = alphas[layers[0]] if layers else 1.0
        out[f"{prefix}_beta_factor"] = betas[layers[0]] if layers else 1.0
    return out


def _rope_to_ours(native) -> dict:
    rope = dict(native.rope_parameters or {})
    if rope.get("rope_type", "default") == "default":
        # transformers' MiniMax rotates the whole head for default RoPE
        rope.pop("partial_rotary_factor", None)
    return {"rope_parameters": rope}


def _check_ours(ours) -> str | None:
    for i, m in enumerate(ours.mixer_types):
        if m not in _OUR_LAYER:
            return (
                f"mixer_types[{i}]={m!r} (layer {i}) has no counterpart; minimax layers are "
                "linear_attention or attention"
            )
    for i, t in enumerate(ours.mlp_types):
        if t != "moe":
            return f"mlp_types[{i}]={t!r} (layer {i}): every minimax layer has a MoE block"
    return None


# ---- weights -----------------------------------------------------------------------------------------------


def _qkv_split(ts, ctx: RuleContext):
    c = ctx.ours
    w = ts[0].view(c.linear_num_heads, 3, c.linear_head_dim, -1)  # per head [q_h, k_h, v_h]
    return [w[:, j].reshape(c.linear_num_heads * c.linear_head_dim, -1) for j in range(3)]


def _qkv_fuse(ts, ctx: RuleContext):
    c = ctx.ours
    return [
        torch.stack([t.view(c.linear_num_heads, c.linear_head_dim, -1) for t in ts], dim=1).reshape(
            3 * c.linear_num_heads * c.linear_head_dim, -1
        )
    ]


def _decay_buffers(ctx: RuleContext, device=None) -> list[torch.Tensor]:
    """MiniMax's lightning decay buffers for this layer: slope [H, 1, 1]; per block position p = 1..B the
    query decay exp(-s·p) and key decay exp(-s·(B - p)) [H, B, 1]; the intra-block decay exp(-s·(i - j)) for i
    ≥ j, else 0, [1, H, B, B]."""
    c, n = ctx.ours, ctx.native
    slope = fixed_slopes(c.linear_num_heads, ctx.layer, c.num_hidden_layers)[:, None, None]
    block = n.block_size
    pos = torch.arange(block, dtype=torch.float32) + 1
    query = torch.exp(-slope * pos[:, None])
    key = torch.exp(-slope * (block - pos[:, None]))
    diff = (pos[:, None] - pos[None, :])[None, None]
    scaled = slope * diff
    diagonal = torch.exp(torch.where(scaled >= 0, -scaled, float("-inf")))
    return [slope, query, key, diagonal]


def _decay_to_ours(ts, ctx: RuleContext):
    for name, got, want in zip(
        ("slope_rate", "query_decay", "key_decay", "diagonal_decay"), ts, _decay_buffers(ctx)
    ):
        if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-6, atol=0):
            fail(
                f"minimax: layer {ctx.layer}'s self_attn.{name} is not MiniMax's fixed decay for "
                "this layer; hf_hybrid computes these slopes from the layer index and head count"
            )
    return []


_DECAY_NAMES = tuple(f"self_attn.{n}" for n in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"))

LIGHTNING_RULES = [
    W(
        "self_attn.qkv_proj.weight",
        ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
        _qkv_split,
        _qkv_fuse,
    ),
    W("self_attn.norm.weight", "mixer.out_norm.weight"),
    W("self_attn.output_gate.weight", "mixer.output_gate.weight"),
    W("self_attn.out_proj.weight", "mixer.o_proj.weight"),
    W(_DECAY_NAMES, (), _decay_to_ours, lambda ts, ctx: _decay_buffers(ctx)),
]
ATTENTION_RULES = [
    W(f"self_attn.{p}.weight", f"mixer.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]

FAMILIES = {
    "minimax": NativeFamily(
        model_type="minimax",
        config_rules=[
            *same(
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "rms_norm_eps",
                "tie_word_embeddings",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "num_experts_per_tok",
                "router_jitter_noise",
            ),
            rename("num_local_experts", "num_experts"),
            rename("intermediate_size", "moe_intermediate_size"),
            rename("block_size", "linear_chunk_size"),  # the chunk length of the chunked scan, both sides
            Custom(("head_dim",), lambda n: {"head_dim": _head_dim(n)}, lambda o: {"head_dim": o.head_dim}),
            Custom(("rope_parameters",), _rope_to_ours, lambda o: {"rope_parameters": o.rope_parameters}),
            Custom(
                (
                    "layer_types",
                    "full_attn_alpha_factor",
                    "full_attn_beta_factor",
                    "linear_attn_alpha_factor",
                    "linear_attn_beta_factor",
                    "mlp_alpha_factor",
                    "mlp_beta_factor",
                ),
                _layers_to_ours,
                _layers_to_native,
            ),
            native_fixed("hidden_act", "silu", why="lightning attention's q/k/v activation is SiLU here"),
            native_fixed("sliding_window", None, why="MiniMax's sliding-window attention is not mapped"),
            *ours_fixed(
                residual_from_norm=True,
                use_qk_norm=False,
                attention_output_gate=False,
                attention_bias=False,
                linear_feature_map="identity",
                linear_decay="fixed_slope",
                linear_qkv_activation="silu",
                linear_scale=1.0,
                linear_norm_scope="full",
                linear_norm_eps=1e-6,
                linear_output_gate=True,
                linear_conv_kernel_size=0,
                router_scoring_func="softmax",
                norm_topk_prob=True,
                routed_scaling_factor=1.0,
                n_group=1,
                topk_group=1,
                num_shared_experts=0,
                moe_routing="topk",
                moe_capacity_factor=None,
            ),
        ],
        model_rules=MODEL_RULES,
        layer_rules=NORM_RULES,
        mixer_rules={"linear_attention": LIGHTNING_RULES, "attention": ATTENTION_RULES},
        mlp_rules={"moe": MOE_RULES},
        tiny_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            block_size=8,
            layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
            full_attn_alpha_factor=1.5,
            full_attn_beta_factor=0.5,
            linear_attn_alpha_factor=0.75,
            linear_attn_beta_factor=1.25,
            mlp_alpha_factor=1.1,
            mlp_beta_factor=0.9,
            max_position_embeddings=256,
        ),
        exactness=(
            "exact: fp32 logits ≤ 3e-7; transformers' own cached decode drifts ~1e-3 on "
            "left-padded rows when layer 0 is a lightning layer (its full forward agrees with ours)"
        ),
        check_ours=_check_ours,
    ),
}
