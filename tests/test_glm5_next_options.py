"""The layer options GLM-5-Next brought, usable in any mix: ``mlp_swiglu_limit`` (clamped SwiGLU in dense MLPs
and shared experts), ``kda_gate_lower_bound`` (KDA's bounded forget gate), MLA / DSA-on-MLA with
``qk_rope_head_dim=0`` (no rope channels; tests/test_mla.py checks its decode paths). Naive references,
parity with transformers' GLM-5-Next modules, validation, the kit in a mix of their own (with mHC streams and
indexer pooling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from hf_hybrid.mixers.kda import KDAForgetGate
from hf_hybrid.mlp import DenseMLP
from hf_hybrid.moe import HybridMoE
from hf_hybrid.testing import check_layer_kind, tiny_config

CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)


def _glm5_text_config(cfg, **extra):
    from transformers import Glm5NextTextConfig

    return Glm5NextTextConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        index_topk=16,
        index_kpool=4,
        linear_num_heads=cfg.kda_num_heads,
        linear_head_dim=cfg.kda_head_dim,
        **extra,
    )


# ---- mlp_swiglu_limit -----------------------------------------------------------------------------------


def test_dense_swiglu_limit_matches_formula_and_glm5_next_mlp():
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMLP

    torch.manual_seed(0)
    cfg = tiny_config(mlp_swiglu_limit=0.3)
    ours = DenseMLP(cfg, 0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.5)  # activations well past the limit
    x = torch.randn(2, 5, cfg.hidden_size)
    gate, up = x @ ours.gate_proj.weight.T, x @ ours.up_proj.weight.T
    naive = (F.silu(gate.clamp(max=0.3)) * up.clamp(-0.3, 0.3)) @ ours.down_proj.weight.T
    torch.testing.assert_close(ours(x), naive, atol=1e-6, rtol=0)
    theirs = Glm5NextTextMLP(_glm5_text_config(cfg, swiglu_limit=0.3))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    # the clamp is reached here: without it the output differs
    unclamped = DenseMLP(tiny_config(), 0)
    unclamped.load_state_dict(ours.state_dict())
    assert (unclamped(x) - naive).abs().max() > 1e-2


def test_shared_experts_clamp_and_routed_experts_keep_their_own_limit():
    """mlp_swiglu_limit clamps the shared experts only; moe_swiglu_limit the routed ones."""
    cfg = tiny_config(mlp="moe", num_shared_experts=1, mlp_swiglu_limit=0.3)
    moe = HybridMoE(cfg, 0)
    assert moe.shared_experts.limit == 0.3 and moe.experts.swiglu_limit is None
    both = HybridMoE(
        tiny_config(mlp="moe", num_shared_experts=1, mlp_swiglu_limit=0.3, moe_swiglu_limit=0.2), 0
    )
    assert both.shared_experts.limit == 0.3 and both.experts.swiglu_limit == 0.2


# ---- kda_gate_lower_bound -------------------------------------------------------------------------------


def test_bounded_forget_gate_matches_formula_and_glm5_next():
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextForgetGate

    torch.manual_seed(0)
    cfg = tiny_config("kda", kda_gate_rank=8, kda_gate_lower_bound=-5.0)  # GLM-5-Next: rank = head_dim
    ours = KDAForgetGate(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=1.0)
    x = torch.randn(2, 5, cfg.hidden_size)
    g = ours(x)
    a = (x @ ours.f_a_proj.weight.T @ ours.f_b_proj.weight.T + ours.dt_bias).view(2, 5, 2, 8)
    naive = -5.0 * torch.sigmoid(ours.A_log.exp()[:, None] * a)
    torch.testing.assert_close(g, naive, atol=1e-6, rtol=0)
    assert g.dtype == torch.float32 and bool(((g >= -5.0) & (g <= 0)).all())  # open in exact arithmetic
    theirs = Glm5NextTextForgetGate(_glm5_text_config(cfg, linear_lower_bound=-5.0))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(g, theirs(x), atol=0, rtol=0)
    # None: the unbounded softplus gate (Kimi Linear), also = transformers' with linear_lower_bound=None
    free = KDAForgetGate(tiny_config("kda", kda_gate_rank=8))
    free.load_state_dict(ours.state_dict())
    unbounded = Glm5NextTextForgetGate(_glm5_text_config(cfg, linear_lower_bound=None))
    unbounded.load_state_dict(ours.state_dict())
    torch.testing.assert_close(free(x), unbounded(x), atol=1e-6, rtol=0)
    assert (free(x) - g).abs().max() > 1e-2


def test_bounded_gate_starts_with_a_log_zero():
    from hf_hybrid import HybridForCausalLM

    torch.manual_seed(0)
    bounded = HybridForCausalLM(tiny_config("kda", kda_gate_lower_bound=-5.0))
    free = HybridForCausalLM(tiny_config("kda"))
    assert all(m.mixer.forget_gate.A_log.abs().max() == 0 for m in bounded.model.layers)
    assert all(
        m.mixer.forget_gate.A_log.min() >= 0 and m.mixer.forget_gate.A_log.max() > 0
        for m in free.model.layers
    )


# ---- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mlp_swiglu_limit": 0}, "mlp_swiglu_limit=0 must be a positive number or None"),
        ({"mlp_swiglu_limit": True}, "mlp_swiglu_limit=True must be a positive number or None"),
        ({"mlp_swiglu_limit": 1.0, "mlp_gated": False}, "mlp_swiglu_limit=1.0 clamps the gate"),
        ({"mixer_types": ["kda", "kda"], "kda_gate_lower_bound": 5.0}, "kda_gate_lower_bound=5.0 must be"),
        ({"mixer_types": ["kda", "kda"], "kda_gate_lower_bound": 0.0}, "kda_gate_lower_bound=0.0 must be"),
        (
            {"mixer_types": ["kda", "kda"], "kda_gate_lower_bound": float("-inf")},
            "kda_gate_lower_bound=-inf must be",
        ),
        ({"mixer_types": ["mla", "mla"], "qk_rope_head_dim": -2}, "qk_rope_head_dim=-2 must be an integer"),
        (
            {"mixer_types": ["mla", "mla"], "qk_rope_head_dim": 0, "qk_nope_head_dim": 0},
            "qk_nope_head_dim=0 and qk_rope_head_dim=0",
        ),
    ],
)
def test_options_refuse_bad_values(overrides, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_config(**overrides)


# ---- the kit, in a mix of their own ----------------------------------------------------------------------


def test_kit_in_a_mix_of_their_own():
    """GLM-5-Next's layout in small: bounded KDA, DSA on NoPE MLA with a pooled indexer and a shared one,
    clamped dense MLP and shared experts, mHC streams: decode, padding, packing, generate, save / load, cost,
    gradients, aux terms."""
    overrides = {
        "num_hidden_layers": 4,
        "mixer_types": ["kda", "dsa", "dsa", "kda"],
        "mlp_types": ["dense", "moe", "moe", "moe"],
        "dsa_base": "mla",
        "q_lora_rank": 12,
        "qk_rope_head_dim": 0,
        "index_n_heads": 2,
        "index_head_dim": 8,
        "index_topk": 4,
        "index_pool_size": 2,
        "dsa_indexer_types": ["full", "full", "shared", "full"],
        "kda_gate_lower_bound": -5.0,
        "num_shared_experts": 1,
        "mlp_swiglu_limit": 0.05,
        "moe_swiglu_limit": 0.05,
        "hyper_connections": "mhc",
        "hc_mult": 2,
    }
    checks = ["decode", "padding", "packing", "generate", "save_load", "cost", "gradients", "aux_terms"]
    assert check_layer_kind(config_overrides=overrides, checks=checks) == checks
