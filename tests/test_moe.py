"""MoE MLP (issue 8): router maths, balancing losses, experts paths, capacity, dtype guards, model
integration.

Tolerances: fp32 throughout. ``PARITY`` (1e-5 abs and rel) for experts paths that compute the same products
and sums in another order (per-expert slice GEMMs vs per-assignment bmm vs grouped_mm; K contributions summed
by reshape-sum vs index_add): with H, I <= 48 each output is a sum of <= 48 fp32 products, so reordering moves
it by a few ulps of O(1) values (~1e-6). Loss values computed by hand agree to 1e-6; exact equality where the
arithmetic is identical.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hf_hybrid.configuration_hybrid import HybridConfig
from hf_hybrid.mixers.base import MixerContext
from hf_hybrid.mlp import MLP_REGISTRY
from hf_hybrid.moe import (
    HybridExperts,
    HybridMoE,
    HybridTopKRouter,
    capacity_mask,
    expected_capacity,
    experts_forward_loop,
    group_limited_mask,
    hash_experts,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_loss,
    stable_topk,
)

PARITY = dict(atol=1e-5, rtol=1e-5)


def moe_config(**overrides) -> HybridConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_pattern="moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    kwargs.update(overrides)
    cfg = HybridConfig(**kwargs)
    cfg._experts_implementation = "eager"
    return cfg


def make_ctx(B: int, T: int, padding_mask=None, cu_seqlens=None, input_ids=None) -> MixerContext:
    ctx = MixerContext(
        padding_mask=padding_mask,
        attention_mask_2d=None,
        masks={},
        position_ids=torch.arange(T).expand(B, T),
        cu_seqlens=cu_seqlens,
        max_seqlen=None,
        rope=lambda dim: (None, None),
        cache=None,
        past_length=0,
        input_ids=input_ids,
    )
    return ctx


def set_router(router: HybridTopKRouter, weight: torch.Tensor) -> None:
    with torch.no_grad():
        router.weight.copy_(weight)


# ------------------------------------------------------------------------------------------------------------
# router maths


def test_registered_and_built_from_config():
    cfg = moe_config(num_shared_experts=2)
    moe = MLP_REGISTRY["moe"](cfg, 1)
    assert isinstance(moe, HybridMoE) and moe.layer_idx == 1
    assert moe.experts.gate_up_proj.shape == (8, 32, 32)  # [E, 2I, H]
    assert moe.experts.down_proj.shape == (8, 32, 16)  # [E, H, I]
    assert moe.shared_experts.gate_proj.weight.shape == (32, 32)  # 2 shared experts of I=16, fused
    assert moe.router.e_score_correction_bias.dtype == torch.float32
    assert "router.e_score_correction_bias" in moe.state_dict()


def test_stable_topk_breaks_ties_toward_lower_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, idx = stable_topk(x, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    assert stable_topk(x, 4)[1].tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert torch.equal(values, torch.topk(x, 2).values)


@pytest.mark.parametrize(
    "scoring,norm,scale",
    [("softmax", False, 1.0), ("softmax", True, 2.5), ("sigmoid", True, 2.5), ("sigmoid", False, 1.0)],
)
def test_router_weights_by_hand(scoring, norm, scale):
    cfg = moe_config(router_scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = HybridTopKRouter(cfg, 0).eval()
    torch.manual_seed(0)
    x = torch.randn(7, 32)
    logits, weights, index = router(x)
    ref_logits = x.double() @ router.weight.double().T
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-5, rtol=1e-5)
    scores = ref_logits.softmax(-1) if scoring == "softmax" else ref_logits.sigmoid()
    ref_w, ref_i = torch.topk(scores, 2)  # random inputs: no ties
    assert torch.equal(index, ref_i)
    if norm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.double(), ref_w * scale, atol=1e-6, rtol=1e-6)
    assert logits.dtype == weights.dtype == torch.float32


def test_zero_router_picks_lowest_experts_and_uniform_weights():
    cfg = moe_config(num_experts_per_tok=3, norm_topk_prob=False)
    router = HybridTopKRouter(cfg, 0)
    set_router(router, torch.zeros(8, 32))
    _, weights, index = router(torch.randn(5, 32))
    assert index.tolist() == [[0, 1, 2]] * 5  # exact ties -> lower index, explicitly
    torch.testing.assert_close(weights, torch.full((5, 3), 1 / 8))


def test_correction_bias_changes_selection_not_weights():
    cfg = moe_config(router_scoring_func="sigmoid", norm_topk_prob=False)
    router = HybridTopKRouter(cfg, 0)
    x = torch.randn(6, 32)
    logits, _, _ = router(x)
    router.e_score_correction_bias[7] = 10.0
    _, weights, index = router(x)
    assert (index == 7).any(dim=-1).all()
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, index))


def _group_route_reference(scores: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Per-token Python loop: the obvious reading of DeepSeek-V3's node-limited routing."""
    out = []
    E = scores.shape[1]
    size = E // n_group
    for row in scores.tolist():
        group_score = [
            sum(sorted(row[g * size : (g + 1) * size], reverse=True)[: min(2, size)]) for g in range(n_group)
        ]
        groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // size in groups]
        out.append(sorted(allowed, key=lambda e: (-row[e], e))[:k])
    return torch.tensor(out)


def test_group_limited_routing_by_hand_and_against_loop():
    # Groups {0,1} {2,3} {4,5} {6,7}: expert 0 is the single best, but its group (top-2 sum) loses to {2,3}
    # and {4,5}.
    cfg = moe_config(
        hidden_size=8, num_attention_heads=2, router_scoring_func="sigmoid", n_group=4, topk_group=2
    )
    router = HybridTopKRouter(cfg, 0)
    set_router(router, torch.eye(8))
    x = torch.tensor([[5.0, -5.0, 1.0, 1.0, 0.9, 0.9, -1.0, -1.0]])
    _, _, index = router(x)
    assert index.tolist() == [[2, 3]]
    masked = group_limited_mask(x.sigmoid(), 4, 2)
    assert torch.isinf(masked[0, [0, 1, 6, 7]]).all() and torch.isfinite(masked[0, 2:6]).all()
    # random scores with ties sprinkled in, against the loop
    torch.manual_seed(1)
    scores = torch.randint(0, 5, (40, 16)).float() / 4
    for n_group, topk_group, k in [(4, 2, 3), (8, 3, 4), (2, 1, 2), (16, 4, 4)]:
        _, got = stable_topk(group_limited_mask(scores, n_group, topk_group), k)
        assert torch.equal(got, _group_route_reference(scores, n_group, topk_group, k)), (
            n_group,
            topk_group,
            k,
        )


def test_router_fp32_under_autocast_and_bf16_model():
    cfg = moe_config()
    moe = HybridMoE(cfg, 0)
    x = torch.randn(2, 3, 32)
    logits_fp32 = moe.router(x.reshape(-1, 32))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ac = moe.router(x.reshape(-1, 32))[0]
    assert logits_ac.dtype == torch.float32
    torch.testing.assert_close(logits_ac, logits_fp32)
    moe.to(torch.bfloat16)
    logits_bf16, weights, _ = moe.router(x.reshape(-1, 32).bfloat16())
    assert logits_bf16.dtype == weights.dtype == torch.float32
    assert moe(x.bfloat16(), None).dtype == torch.bfloat16


def test_jitter_only_in_training():
    cfg = moe_config(router_jitter_noise=0.5)
    router = HybridTopKRouter(cfg, 0)
    x = torch.randn(4, 32)
    router.eval()
    assert torch.equal(router(x)[0], router(x)[0])
    router.train()
    torch.manual_seed(0)
    a = router(x)[0]
    assert not torch.allclose(a, router(x)[0])


def test_hash_routing_is_fixed_distinct_and_needs_input_ids():
    ids = torch.arange(64).repeat(3)
    a = hash_experts(ids, 8, 2, salt=0)
    assert torch.equal(a, hash_experts(ids, 8, 2, salt=0))
    assert torch.equal(a[:64], a[64:128])  # same token id -> same experts
    assert (a[:, 0] != a[:, 1]).all()
    assert not torch.equal(a, hash_experts(ids, 8, 2, salt=1))  # each layer its own table
    counts = torch.bincount(hash_experts(torch.arange(4096), 8, 2, salt=3).flatten(), minlength=8).float()
    assert counts.max() / counts.mean() < 1.15  # a hash spreads token ids evenly

    cfg = moe_config(moe_routing="hash")
    moe = HybridMoE(cfg, 1)
    x = torch.randn(2, 5, 32)
    input_ids = torch.randint(0, 64, (2, 5))
    moe(x, make_ctx(2, 5, input_ids=input_ids))
    _, _, index = moe.router(x.reshape(10, 32), token_ids=input_ids.reshape(-1))
    assert torch.equal(index, hash_experts(input_ids.reshape(-1), 8, 2, salt=1))
    with pytest.raises(ValueError, match=r"MixerContext.input_ids"):
        moe(x, make_ctx(2, 5))


# ------------------------------------------------------------------------------------------------------------
# balancing losses


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_uniform_router_aux_loss_is_exactly_one(scoring):
    cfg = moe_config(router_scoring_func=scoring, router_seq_aux_loss_coef=0.1)
    moe = HybridMoE(cfg, 0).train()
    set_router(moe.router, torch.zeros(8, 32))
    ctx = make_ctx(3, 5)
    moe(torch.randn(3, 5, 32), ctx)
    assert ctx.aux["router_aux_loss"][0].item() == pytest.approx(1.0, abs=1e-6)
    assert ctx.aux["router_seq_aux_loss"][0].item() == pytest.approx(1.0, abs=1e-6)
    # uniform probabilities and uniform load, directly
    probs = torch.full((16, 8), 1 / 8)
    index = torch.arange(16 * 2).remainder(8).view(16, 2)
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0, abs=1e-7)


def test_collapsed_router_aux_loss_is_num_experts():
    logits = torch.full((10, 8), -30.0)
    logits[:, 3] = 30.0
    index = torch.full((10, 1), 3)
    assert load_balancing_loss(logits.softmax(-1), index).item() == pytest.approx(8.0, rel=1e-6)


def test_aux_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    probs = logits.softmax(-1)
    index = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2], [0, 1], [2, 3]])
    f = [sum(int(e == i) for row in index.tolist() for e in row) / 12 for i in range(4)]
    P = probs.mean(0).tolist()
    expected = 4 * sum(fi * pi for fi, pi in zip(f, P))
    assert load_balancing_loss(probs, index).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 2.0]])
    per_token = [math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()]
    assert router_z_loss(logits).item() == pytest.approx(sum(per_token) / 3, rel=1e-6)
    mask = torch.tensor([True, False, True])
    assert router_z_loss(logits, mask).item() == pytest.approx((per_token[0] + per_token[2]) / 2, rel=1e-6)


def test_sequence_loss_is_per_sequence_switch_loss_averaged():
    torch.manual_seed(0)
    probs = torch.randn(10, 4).softmax(-1)
    index = torch.randint(0, 4, (10, 1))
    segment = torch.tensor([0] * 4 + [1] * 6)
    expected = (load_balancing_loss(probs[:4], index[:4]) + load_balancing_loss(probs[4:], index[4:])) / 2
    torch.testing.assert_close(sequence_balance_loss(probs, index, segment, 2), expected)
    # it differs from the batch-level loss whenever sequences differ
    assert not torch.allclose(expected, load_balancing_loss(probs, index))


def test_padding_excluded_from_losses_and_load():
    cfg = moe_config(router_seq_aux_loss_coef=0.1)
    torch.manual_seed(0)
    moe = HybridMoE(cfg, 0).train()
    x = torch.randn(2, 6, 32)
    lengths = [6, 3]
    mask = torch.tensor([[True] * n + [False] * (6 - n) for n in lengths])
    x_pad = x.clone()
    x_pad[1, 3:] = 100.0 * torch.randn(3, 32)  # garbage in the padded slots must not matter
    ctx = make_ctx(2, 6, padding_mask=mask)
    out = moe(x_pad, ctx)
    # reference: the real tokens alone, each row its own batch
    seq, counts = [], torch.zeros(8)
    for b, n in enumerate(lengths):
        c = make_ctx(1, n)
        moe(x[b : b + 1, :n], c)
        seq.append(c.aux["router_seq_aux_loss"][0])
        counts += moe.last_counts
        torch.testing.assert_close(out[b, :n], moe(x[b : b + 1, :n], None)[0], **PARITY)
    real = x[mask]
    c = make_ctx(1, real.shape[0])
    moe(real[None], c)
    torch.testing.assert_close(ctx.aux["router_aux_loss"][0], c.aux["router_aux_loss"][0], **PARITY)
    torch.testing.assert_close(ctx.aux["router_z_loss"][0], c.aux["router_z_loss"][0], **PARITY)
    torch.testing.assert_close(ctx.aux["router_seq_aux_loss"][0], torch.stack(seq).mean(), **PARITY)
    torch.testing.assert_close(ctx.stats["expert_load"][0], counts / counts.sum())
    # without ctx.padding_mask the model's 2-D attention mask is used
    ctx2 = make_ctx(2, 6)
    ctx2 = MixerContext(batch=dataclasses.replace(ctx2.batch, attention_mask_2d=mask.long()))
    moe(x_pad, ctx2)
    torch.testing.assert_close(ctx2.aux["router_aux_loss"][0], ctx.aux["router_aux_loss"][0])


def test_packed_documents_are_sequences_for_seq_loss():
    cfg = moe_config(router_seq_aux_loss_coef=0.1)
    moe = HybridMoE(cfg, 0).train()
    x = torch.randn(2, 5, 32)
    rows = make_ctx(2, 5)
    moe(x, rows)
    packed = make_ctx(1, 10, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32))
    moe(x.reshape(1, 10, 32), packed)
    torch.testing.assert_close(
        packed.aux["router_seq_aux_loss"][0], rows.aux["router_seq_aux_loss"][0], **PARITY
    )


def test_aux_terms_only_in_training_and_with_positive_coefficient():
    moe = HybridMoE(moe_config(router_z_loss_coef=0.0), 0)
    ctx = make_ctx(1, 4)
    moe.train()(torch.randn(1, 4, 32), ctx)
    assert set(ctx.aux) == {"router_aux_loss"}
    ctx = make_ctx(1, 4)
    moe.eval()(torch.randn(1, 4, 32), ctx)
    assert ctx.aux == {} and ctx.stats["expert_load"][0].sum().item() == pytest.approx(1.0)
    assert moe.last_load is not None and moe.last_load.shape == (8,)


def test_aux_loss_trains_the_router():
    moe = HybridMoE(moe_config(), 0).train()
    ctx = make_ctx(2, 4)
    moe(torch.randn(2, 4, 32), ctx)
    (ctx.aux["router_aux_loss"][0] + ctx.aux["router_z_loss"][0]).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# experts: loop reference vs eager / batched_mm / grouped_mm


def _experts_case(seed=0, N=13, E=6, K=2, H=24, inter=40):
    cfg = moe_config(
        hidden_size=H,
        num_attention_heads=4,
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=inter,
    )
    torch.manual_seed(seed)
    experts = HybridExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=H**-0.5)
        experts.down_proj.normal_(std=inter**-0.5)
    x = torch.randn(N, H, requires_grad=True)
    # distinct per token; expert E-1 unused
    index = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])
    weights = torch.rand(N, K, requires_grad=True)
    return cfg, experts, x, index, weights


def _run(fn, experts, x, index, weights):
    for p in (experts.gate_up_proj, experts.down_proj, x, weights):
        p.grad = None
    out = fn(x, index, weights)
    grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad.clone() for t in (x, weights, experts.gate_up_proj, experts.down_proj)]


IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_experts_parity_forward_and_backward(impl):
    cfg, experts, x, index, weights = _experts_case()
    ref_out, ref_grads = _run(lambda *a: experts_forward_loop(experts, *a), experts, x, index, weights)
    cfg._experts_implementation = impl
    out, grads = _run(experts, experts, x, index, weights)
    torch.testing.assert_close(out, ref_out, **PARITY)
    for name, g, r in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, ref_grads):
        torch.testing.assert_close(g, r, **PARITY, msg=lambda m, n=name: f"{impl} grad {n}: {m}")
    assert grads[2][cfg.num_experts - 1].abs().sum() == 0  # the unused expert gets no gradient


def test_switching_experts_implementation_changes_code_path(monkeypatch):
    from transformers.integrations import moe as hf_moe

    calls = []
    for name in ("batched_mm", "grouped_mm"):
        original = hf_moe.ExpertsInterface._global_mapping[name]

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setitem(hf_moe.ExpertsInterface._global_mapping, name, spy)
    cfg = moe_config()
    moe = HybridMoE(cfg, 0)
    x = torch.randn(2, 3, 32)
    outs = {}
    for impl in IMPLEMENTATIONS:
        cfg._experts_implementation = impl
        outs[impl] = moe(x, None)
    assert calls == ["batched_mm", "grouped_mm"]
    for impl in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outs[impl], outs["eager"], **PARITY)


# ------------------------------------------------------------------------------------------------------------
# capacity


def test_capacity_drops_lowest_priority_and_counts_them():
    # 6 tokens all choose expert 0 (k=1, E=4, factor 1): capacity ceil(6*1/4)=2, so 4 drops, the 2 heaviest
    # stay.
    index = torch.zeros(6, 1, dtype=torch.long)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9], [0.3], [0.2]])
    keep, dropped = capacity_mask(index, weights, 4, 1.0)
    assert expected_capacity(6, 1, 4, 1.0) == 2
    assert keep.flatten().tolist() == [False, True, False, True, False, False]
    assert dropped.tolist() == [4.0, 0.0, 0.0, 0.0]
    # ties: earlier token first; padding takes no slot and is not a drop
    keep, dropped = capacity_mask(
        index, torch.full((6, 1), 0.5), 4, 1.0, mask_N=torch.tensor([False, True, True, True, True, True])
    )
    assert keep.flatten().tolist() == [False, True, True, False, False, False]  # capacity ceil(5/4) = 2
    assert dropped.tolist() == [3.0, 0.0, 0.0, 0.0]


def test_capacity_in_module_zeroes_dropped_tokens():
    cfg = moe_config(num_experts=4, num_experts_per_tok=1, moe_capacity_factor=1.0)
    moe = HybridMoE(cfg, 0)
    w = torch.zeros(4, 32)
    w[0, 0] = 1.0  # every token prefers expert 0, more strongly the larger x[..., 0]
    set_router(moe.router, w)
    x = torch.randn(1, 8, 32)
    x[..., 0] = torch.arange(8.0) + 1.0  # k=1 renormalised weights are all 1: priority is the router score
    ctx = make_ctx(1, 8)
    out = moe(x, ctx)
    assert ctx.stats["expert_drops"][0].tolist() == [6.0, 0.0, 0.0, 0.0]  # capacity 2
    assert (out[0, :6] == 0).all() and (out[0, 6:].abs().sum(-1) > 0).all()  # the 2 largest weights survive
    # load before drops
    torch.testing.assert_close(ctx.stats["expert_load"][0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    moe.eval()
    # the same drops in eval (one capacity factor, applied in every mode)
    assert torch.equal(moe(x, None), out)


# ------------------------------------------------------------------------------------------------------------
# dtype guard and shared experts


def test_correction_bias_stays_fp32_through_casts():
    moe = HybridMoE(moe_config(), 0)
    bias = torch.tensor([0.1234567, -0.0000123, 3.3333333, 1e-7, 0.5, -2.0000001, 0.0, 7.7777777])
    moe.router.e_score_correction_bias.copy_(bias)
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.to(dtype=torch.float64),
        lambda m: m.float(),
    ):
        cast(moe)
        assert moe.router.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(moe.router.e_score_correction_bias, bias)  # not rounded through bf16 on the way
    moe.to(torch.bfloat16)
    assert moe.router.weight.dtype == torch.bfloat16 and moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.router.state_dict()["e_score_correction_bias"].dtype == torch.float32


def test_shared_experts_always_active():
    cfg = moe_config(num_shared_experts=1)
    moe = HybridMoE(cfg, 0)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        moe.experts.down_proj.zero_()
    torch.testing.assert_close(moe(x, None), moe.shared_experts(x))


def test_router_output_is_recordable_logits_first():
    from transformers.utils.output_capturing import OutputRecorder

    rec = OutputRecorder(HybridTopKRouter, index=0)
    moe = HybridMoE(moe_config(), 0)
    seen = []
    handle = moe.router.register_forward_hook(lambda mod, args, out: seen.append(out[rec.index]))
    moe(torch.randn(2, 3, 32), None)
    handle.remove()
    assert seen[0].shape == (6, 8) and seen[0].dtype == torch.float32
