"""The layer options HY-V4 brought, usable in any mix: ``moe_swiglu_limit`` (clamped SwiGLU in the routed
experts), ``mla_gate_proj`` (per-head sigmoid gate on MLA / DSA-on-MLA output), ``attention_sinks`` on DSA
over MLA (sparse mode). Naive references, parity with transformers' HY-V4 modules, validation, the kit in a
mix of their own (with hyper-connections)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from hf_hybrid import HybridForCausalLM
from hf_hybrid.moe import HybridExperts, experts_forward_loop
from hf_hybrid.ops.dsa.naive import selection_mask
from hf_hybrid.testing import check_layer_kind, tiny_config

CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)
DSA = {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 4, "q_lora_rank": 12}


# ---- moe_swiglu_limit ------------------------------------------------------------------------------------


def _experts_case(limit):
    torch.manual_seed(0)
    cfg = tiny_config(mlp="moe", moe_swiglu_limit=limit)
    experts = HybridExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.5)  # activations well past the limit
    x = torch.randn(10, cfg.hidden_size)
    index = torch.stack([torch.randperm(cfg.num_experts)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    return cfg, experts, x, index, weights


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_swiglu_limit_matches_loop_and_hy_v4_experts(impl):
    from transformers import HYV4Config
    from transformers.models.hy_v4.modeling_hy_v4 import HYV4Experts

    cfg, experts, x, index, weights = _experts_case(0.5)
    ref = experts_forward_loop(experts, x, index, weights)
    hf_cfg = HYV4Config(
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.num_experts,
        swiglu_limit=0.5,
    )
    theirs = HYV4Experts(hf_cfg)
    with torch.no_grad():
        theirs.gate_up_proj.copy_(experts.gate_up_proj)
        theirs.down_proj.copy_(experts.down_proj)
    hf_cfg._experts_implementation = "eager"
    torch.testing.assert_close(theirs(x, index, weights), ref, atol=1e-6, rtol=0)
    cfg._experts_implementation = impl
    torch.testing.assert_close(experts(x, index, weights), ref, atol=1e-6, rtol=0)
    # the clamp is reached here: without it the output differs
    _, unclamped, *_ = _experts_case(None)
    assert (unclamped(x, index, weights) - ref).abs().max() > 1e-2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe_swiglu_limit": 0.0}, "moe_swiglu_limit=0.0 must be a positive number or None"),
        ({"moe_swiglu_limit": 1.0, "mlp_gated": False}, "moe_swiglu_limit=1.0 clamps the gate"),
        ({"mla_gate_proj": 1}, "mla_gate_proj=1 must be True or False"),
        (
            {
                "mixer_types": ["mla", "mla"],
                "q_lora_rank": 12,
                "mla_gate_proj": True,
                "mla_output_gate": True,
            },
            "mla_gate_proj=True with mla_output_gate=True",
        ),
    ],
)
def test_options_refuse_bad_values(overrides, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_config(mlp="moe", **overrides)


# ---- attention sinks on DSA over MLA ---------------------------------------------------------------------


def test_dsa_sinks_match_softmax_with_sink_column():
    """o · sigmoid(lse - sink) (ours) = softmax over [selected scores, sink] with the sink's column dropped,
    as transformers' eager attention with s_aux computes it."""
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("dsa", attention_sinks=True, **DSA)).eval()
    layer = model.model.layers[0].mixer
    with torch.no_grad():
        layer.sinks.normal_()
    B, T, S, H, D, Dv = 2, 5, 7, layer.num_heads, 12, 6
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, S, 1, D), torch.randn(B, S, 1, Dv)
    idx = torch.stack([torch.randperm(S)[:4] for _ in range(B * T)]).view(B, T, 4)
    idx[0, 0, 2:] = -1  # unused slots
    got = layer._sparse_attention(q, k, v, idx)
    scores = torch.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * layer.scaling
    scores = scores.masked_fill(~selection_mask(idx, S)[:, None], float("-inf"))
    sink = layer.sinks.view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    want = torch.einsum("bhts,bsd->bthd", probs, v[:, :, 0])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_dsa_sinks_refuse_dense_modes():
    with pytest.raises(CONFIG_ERRORS, match="attention_sinks=True with dsa_mode='dense'"):
        tiny_config("dsa", attention_sinks=True, dsa_mode="dense", **DSA)
    with pytest.raises(CONFIG_ERRORS, match="attention_sinks=True with 'mla' layers"):
        tiny_config("mla", attention_sinks=True)
    model = HybridForCausalLM(tiny_config("dsa", attention_sinks=True, **DSA)).eval()
    with model.dsa_mode("dense"), pytest.raises(ValueError, match="runs in sparse mode only"):
        model(torch.randint(0, 64, (1, 6)))


# ---- mla_gate_proj -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["mla", "dsa"])
def test_mla_gate_proj_zero_weights_halve_the_output(mixer):
    """gate_proj = 0: sigmoid(0) = 1/2 on every channel: the layer equals the ungated one with o_proj / 2."""
    torch.manual_seed(0)
    overrides = DSA if mixer == "dsa" else {"q_lora_rank": 12}
    gated = HybridForCausalLM(tiny_config(mixer, mla_gate_proj=True, **overrides)).eval()
    plain = HybridForCausalLM(tiny_config(mixer, **overrides)).eval()
    state = {k: v for k, v in gated.state_dict().items() if "gate_proj" not in k or "mlp" in k}
    plain.load_state_dict(state)
    with torch.no_grad():
        for layer in gated.model.layers:
            layer.mixer.gate_proj.weight.zero_()
        for layer in plain.model.layers:
            layer.mixer.o_proj.weight.mul_(0.5)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(gated(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


# ---- the kit in a mix of their own ------------------------------------------------------------------------


def test_kit_in_a_mix_of_their_own():
    """DSA on MLA (sinks, gated output, a shared indexer), softmax attention (sinks), clamped MoE and
    dense MLPs, iHC streams: decode, padding, packing, generate, save / load, cost, gradients, aux terms."""
    overrides = {
        **DSA,
        "num_hidden_layers": 3,
        "mixer_types": ["dsa", "attention", "dsa"],
        "mlp_types": ["moe", "dense", "moe"],
        "dsa_indexer_types": ["full", "full", "shared"],
        "attention_sinks": True,
        "mla_gate_proj": True,
        "moe_swiglu_limit": 0.05,
        "hyper_connections": "ihc",
        "hc_mult": 2,
    }
    checks = ["decode", "padding", "packing", "generate", "save_load", "cost", "gradients", "aux_terms"]
    assert check_layer_kind(config_overrides=overrides, checks=checks) == checks
