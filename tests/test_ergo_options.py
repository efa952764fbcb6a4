"""Ergo's layer options as options of their own: ``norm_placement="sandwich"``, ``residual_gates``,
``moe_expert_norm`` and ``shared_expert_norm``. Each against a reference written out (the naive experts loop
for the normed experts, outputs and gradients), against transformers' own Ergo modules where the installed
transformers has them (5.25), the test kit's invariance checks in a mix of their own, and the refusals. fp32,
1e-5 as elsewhere (same maths, different summation order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid import HybridConfig
from hf_hybrid.layers import ResidualGate
from hf_hybrid.moe import HybridNormedExperts, HybridNormedUngatedExperts, experts_forward_loop
from hf_hybrid.testing import check_layer_kind, tiny_config

ATOL = 1e-5


def _ergo():
    return pytest.importorskip(
        "transformers.models.ergo.modeling_ergo", reason="this transformers has no ergo (added in 5.25)"
    )


def test_residual_gate_equals_its_formula():
    gate = ResidualGate(8)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(8))
    f, x = torch.randn(3, 8), torch.randn(3, 8)
    b = 1.0 / (1.0 + torch.exp(-gate.weight.detach()))
    r = torch.sqrt(1.0 + b) / torch.sqrt(1.0 + torch.exp(gate.weight.detach()))  # exp(-softplus/2)
    torch.testing.assert_close(gate(f, x), b * f + r * x, atol=ATOL, rtol=0)


def test_residual_gate_equals_transformers_ergo():
    mod = _ergo()
    from transformers.models.ergo.configuration_ergo import ErgoConfig

    theirs = mod.ErgoResidualGate(ErgoConfig(hidden_size=8))
    ours = ResidualGate(8)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(8))
        ours.weight.copy_(theirs.weight)
    f, x = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ours(f, x), theirs(f, x), atol=0, rtol=0)


@pytest.mark.parametrize("gated", [True, False])
def test_normed_experts_equal_the_naive_loop_with_gradients(gated):
    cfg = tiny_config(
        mlp="moe", moe_expert_norm=True, mlp_gated=gated, hidden_act="silu" if gated else "relu2"
    )
    torch.manual_seed(0)
    experts = (HybridNormedExperts if gated else HybridNormedUngatedExperts)(cfg)
    with torch.no_grad():  # outputs well above the norm's eps, so that the norm matters
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
        experts.post_expert_norm.weight.normal_(1.0, 0.3)
    x = torch.randn(7, cfg.hidden_size, requires_grad=True)
    index = torch.stack([torch.randperm(cfg.num_experts)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    fast = experts(x, index, weights)
    naive = experts_forward_loop(experts, x, index, weights)
    torch.testing.assert_close(fast, naive, atol=ATOL, rtol=0)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *experts.parameters()], g)
    grads_naive = torch.autograd.grad(naive, [x, *experts.parameters()], g)
    for a, b in zip(grads_fast, grads_naive):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # the norm is really applied: each routed output has the RMS of its expert's weight row
    one = experts(x[:1], index[:1, :1], torch.ones(1, 1))
    raw = experts_forward_loop(experts, x[:1], index[:1, :1], torch.ones(1, 1))
    w = experts.post_expert_norm.weight[index[0, 0]]
    torch.testing.assert_close(one, raw, atol=ATOL, rtol=0)
    torch.testing.assert_close(one / w, F.rms_norm(one / w, (cfg.hidden_size,)), atol=1e-4, rtol=0)


def test_normed_experts_equal_transformers_ergo():
    mod = _ergo()
    from transformers.models.ergo.configuration_ergo import ErgoConfig

    tcfg = ErgoConfig(hidden_size=32, num_experts=4, moe_intermediate_size=16, rms_norm_eps=1e-6)
    theirs = mod.ErgoExperts(tcfg)
    cfg = tiny_config(mlp="moe", moe_expert_norm=True, mlp_gated=False, hidden_act="relu2", rms_norm_eps=1e-6)
    ours = HybridNormedUngatedExperts(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.5, 0.3)
        ours.up_proj.copy_(theirs.up_proj.transpose(1, 2))  # transformers stores these transposed
        ours.down_proj.copy_(theirs.down_proj.transpose(1, 2))
        ours.post_expert_norm.weight.copy_(theirs.post_expert_norm.weight)
    x = torch.randn(6, 32)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(6)])
    weights = torch.rand(6, 2)
    torch.testing.assert_close(ours(x, index, weights), theirs(x, index, weights), atol=ATOL, rtol=0)


MIX = dict(
    num_hidden_layers=3,
    mixer_types=["sliding_attention", "attention", "mla"],
    mlp_types=["dense", "moe", "moe"],
    sliding_window=4,
    norm_placement=["sandwich", "pre", "sandwich"],
    residual_gates=True,
    moe_expert_norm=True,
    num_shared_experts=1,
    shared_expert_norm=True,
)


def test_invariance_kit_in_a_mix_of_their_own():
    run = check_layer_kind(config_overrides=MIX)
    assert {"decode", "padding", "packing", "save_load", "generate", "gradients", "cost"} <= set(run)


def test_options_build_what_they_say_and_refusals_name_the_field():
    from hf_hybrid import HybridForCausalLM

    model = HybridForCausalLM(tiny_config(**MIX))
    names = dict(model.named_parameters())
    assert "model.layers.0.post_mixer_layernorm.weight" in names  # sandwich: pre and post norms
    assert "model.layers.0.input_layernorm.weight" in names
    assert "model.layers.1.post_mixer_layernorm.weight" not in names  # "pre"
    assert names["model.layers.1.mlp_residual_gate.weight"].shape == (32,)
    assert names["model.layers.1.mlp.experts.post_expert_norm.weight"].shape == (4, 32)
    assert "model.layers.1.mlp.shared_experts_norm.weight" in names
    for overrides, message in [
        ({"norm_placement": ["middle"] * 2}, r"norm_placement\[0\]='middle' .*pre, post, sandwich"),
        ({"residual_gates": True, "mlp_output_scale": 2.0}, r"residual_gates=True .*scales"),
        ({"mlp_types": ["moe"] * 2, "shared_expert_norm": True}, r"shared_expert_norm=True needs a shared"),
        ({"mlp_types": ["moe"] * 2, "moe_expert_norm": 1}, r"moe_expert_norm=1 must be True or False"),
    ]:
        with pytest.raises(Exception, match=message):
            HybridConfig(**{**tiny_config().to_dict(), "layer_types": None, **overrides})


def test_upcycle_refuses_normed_experts():
    from hf_hybrid.convert.upcycle import UpcycleOptions, check_upcycle

    for name in ("moe_expert_norm", "shared_expert_norm"):
        cfg = tiny_config(**{name: True}, num_shared_experts=1)
        with pytest.raises(ValueError, match=rf"upcycle: HybridConfig.{name}=True .*allowed: {name}=False"):
            check_upcycle(cfg, UpcycleOptions(num_experts=2, top_k=1))
