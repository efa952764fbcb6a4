"""Named configurations shared by tests, recipes, the CLI and the docs ("a tiny debug config per family").

Each preset is a plain dict of ``HybridConfig`` keyword arguments, so it can be printed, edited and saved as
YAML. ``tiny-*`` presets are debug sizes (a forward pass in milliseconds on CPU); ``*-like`` presets reproduce
the shape of a published model for cost estimates (``hf-hybrid inspect qwen3-next-like``) and are not meant to
be built on a laptop.
"""

from __future__ import annotations

import copy
from typing import Any

from .configuration_hybrid import HybridConfig

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

PRESETS: dict[str, dict[str, Any]] = {
    # ---- tiny debug configs, one per family ----------------------------------------------------------------
    "tiny-attention": {**_TINY, "num_hidden_layers": 2},
    "tiny-sliding": {**_TINY, "mixer_pattern": "3:1 sliding_attention:attention", "sliding_window": 16},
    "tiny-hybrid": {**_TINY, "mixer_pattern": "3:1 gated_deltanet:attention"},
    "tiny-gdn": {**_TINY, "num_hidden_layers": 2, "mixer_pattern": "gated_deltanet"},
    "tiny-kda": {**_TINY, "num_hidden_layers": 2, "mixer_pattern": "kda"},
    "tiny-mamba2": {
        **_TINY,
        "num_hidden_layers": 2,
        "mixer_pattern": "mamba2",
        "mamba_head_dim": 16,
        "mamba_state_size": 16,
        "mlp_pattern": "none",
    },
    "tiny-linear": {**_TINY, "num_hidden_layers": 2, "mixer_pattern": "linear_attention,attention"},
    "tiny-mla": {
        **_TINY,
        "num_hidden_layers": 2,
        "mixer_pattern": "mla",
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    },
    "tiny-dsa": {
        **_TINY,
        "num_hidden_layers": 2,
        "mixer_pattern": "dsa",
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 8,
    },
    "tiny-moe": {
        **_TINY,
        "mlp_pattern": "moe",
        "first_k_dense": 1,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "num_shared_experts": 1,
    },
    # ---- published shapes, for cost estimates --------------------------------------------------------------
    # Llama-2-7B: 32 × (MHA 32 heads + SwiGLU 11008), untied embeddings; 6.74 B parameters.
    "llama-7b-like": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # Qwen3-Next-80B-A3B (its config.json, without the MTP head): 3:1 Gated DeltaNet : gated attention (q/k
    # norm, sigmoid output gate, partial RoPE ¼), 512 experts top-10 + 1 shared expert behind a sigmoid gate.
    # 79.67 B parameters, 3.25 B active without embeddings (published: 80 B, A3B). Exports to qwen3_next.
    "qwen3-next-like": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5120,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        mixer_pattern="3:1 gated_deltanet:attention",
        use_qk_norm=True,
        attention_output_gate=True,
        gdn_num_key_heads=16,
        gdn_num_value_heads=32,
        gdn_key_head_dim=128,
        gdn_value_head_dim=128,
        mlp_pattern="moe",
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        num_shared_experts=1,
        shared_expert_intermediate_size=512,
        shared_expert_gate=True,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # MiniMax-Text-01: 7:1 lightning attention (SiLU q/k/v, fixed per-head decay, full-width output norm,
    # sigmoid output gate) : softmax attention, 32 experts top-2. 456.09 B parameters, 45.94 B active without
    # embeddings (published: 456 B / 45.9 B).
    "minimax-like": dict(
        vocab_size=200064,
        hidden_size=6144,
        intermediate_size=9216,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=1048576,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5},
        mixer_pattern="7:1 linear_attention:attention",
        linear_num_heads=64,
        linear_head_dim=128,
        linear_decay="fixed_slope",
        linear_qkv_activation="silu",
        linear_scale=1.0,
        linear_norm_scope="full",
        linear_output_gate=True,
        linear_norm_eps=1e-6,
        # DeepNorm-style residuals: h = α·norm(x) + f(norm(x)) with α = (2 · 80 layers)^¼ for every branch.
        residual_from_norm=True,
        mixer_residual_scales=[(2 * 80) ** 0.25] * 80,
        mlp_residual_scale=(2 * 80) ** 0.25,
        rms_norm_eps=1e-5,
        mlp_pattern="moe",
        num_experts=32,
        num_experts_per_tok=2,
        moe_intermediate_size=9216,
    ),
    # DeepSeek-V3 (without its MTP module): MLA everywhere, 3 dense layers then 256 experts top-8 + 1 shared.
    "deepseek-v3-like": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        max_position_embeddings=163840,
        mixer_pattern="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mlp_pattern="moe",
        first_k_dense=3,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        num_shared_experts=1,
        router_scoring_func="sigmoid",
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        # as in DeepSeek-V3's config.json: YaRN to 160K, latent norms at eps 1e-6, bos/eos 0/1
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        mla_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    ),
}
# Kimi-Linear-48B-A3B (moonshotai/Kimi-Linear-48B-A3B-Instruct's config.json): 27 layers, KDA everywhere but
# MLA (NoPE, no q-LoRA) at layers 4, 8, ..., 24 and 27 (1-indexed), 32 KDA heads × 128; the first layer dense,
# then 256 sigmoid-routed experts top-8 + 1 shared. Published: 48 B total, 3 B activated.
PRESETS["kimi-linear-like"] = dict(
    vocab_size=163840,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=27,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=1048576,
    rms_norm_eps=1e-5,
    mixer_types=["mla" if i + 1 in (4, 8, 12, 16, 20, 24, 27) else "kda" for i in range(27)],
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    mla_use_rope=False,
    mla_norm_eps=1e-6,  # the latent norms' eps in transformers' kimi_linear, whatever rms_norm_eps is
    kda_num_heads=32,
    kda_head_dim=128,
    kda_conv_kernel_size=4,
    mlp_pattern="moe",
    first_k_dense=1,
    num_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=1024,
    num_shared_experts=1,
    router_scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.446,
)
# DeepSeek-V3.2: the same model with DSA (64 indexer heads of dim 128, top-2048) in every layer.
PRESETS["deepseek-v3.2-like"] = {
    **PRESETS["deepseek-v3-like"],
    "mixer_pattern": "dsa",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "index_norm_eps": 1e-6,
}

# GLM-5-Next (transformers' Glm5NextTextConfig defaults, "zai-org/GLM-5.3-Flash"): 45 layers, three KDA layers
# (64 heads × 128, forget gate bounded below by -5) then one DSA-on-MLA layer (NoPE: qk_rope_head_dim 0; 64
# heads, q-LoRA 1536, kv-LoRA 512; indexer 32 heads × 128, top-2048 over pools of 16); three dense layers,
# then 288 sigmoid-routed experts top-8 + 1 shared; every SwiGLU clamped at 10; 4 mHC residual streams.
PRESETS["glm5-next-like"] = dict(
    vocab_size=154880,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=45,
    num_attention_heads=64,
    num_key_value_heads=64,
    max_position_embeddings=1048576,
    rms_norm_eps=1e-5,
    pad_token_id=154820,
    mixer_types=["dsa" if i % 4 == 3 else "kda" for i in range(45)],
    dsa_base="mla",
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=256,
    qk_rope_head_dim=0,
    v_head_dim=256,
    mla_use_rope=False,
    index_n_heads=32,
    index_head_dim=128,
    index_topk=2048,
    index_pool_size=16,
    index_norm_eps=1e-6,
    kda_num_heads=64,
    kda_head_dim=128,
    kda_gate_rank=128,
    kda_conv_kernel_size=4,
    kda_gate_lower_bound=-5.0,
    mlp_pattern="moe",
    first_k_dense=3,
    num_experts=288,
    num_experts_per_tok=8,
    moe_intermediate_size=2048,
    num_shared_experts=1,
    router_scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    mlp_swiglu_limit=10.0,
    moe_swiglu_limit=10.0,
    hyper_connections="mhc",
    hc_mult=4,
    hc_magnitude=2.0,
    hc_eps=1e-6,
    hc_sinkhorn_iters=20,
)


def preset_kwargs(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's ``HybridConfig`` keyword arguments."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str, **overrides: Any) -> HybridConfig:
    """``HybridConfig`` of a preset, with keyword overrides (``preset_config("tiny-attention",
    vocab_size=1000)``)."""
    kwargs = preset_kwargs(name)
    if "mixer_types" in overrides:
        kwargs.pop("mixer_pattern", None)
    if "mlp_types" in overrides:
        kwargs.pop("mlp_pattern", None)
        kwargs.pop("first_k_dense", None)
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


__all__ = ["PRESETS", "preset_kwargs", "preset_config"]
