"""The grouped experts implementations against the per-expert loop spec (fwd and bwd), and MLA's absorbed
decode step against the naive one, in low precision against fp32 on the same rounded weights."""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_checks import assert_close, poisoned

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_experts_implementation_matches_the_loop(gpu, impl):
    import bench_moe

    from hf_hybrid.moe import experts_forward_loop

    # batched_mm gathers one weight matrix per assignment ([N·k, 2I, H]): keep N·k·I·H small
    N, E, K, H, inter = gpu.pick((1024, 64, 8, 512, 256), (64, 8, 2, 32, 16))
    moe, cfg, x, weights, index = bench_moe.routed_block(N, E, K, H, inter)
    dtype = gpu.low_dtypes[0]
    experts = moe.experts.to(gpu.device, dtype)
    ref_experts = copy.deepcopy(experts).float()
    x_low, index, weights = x.to(gpu.device, dtype), index.to(gpu.device), weights.to(gpu.device)
    dy = torch.randn(N, H, device=gpu.device)

    def outputs(module, fn, xin):
        xin = xin.detach().requires_grad_()
        y = fn(module, xin)
        grads = torch.autograd.grad((y.float() * dy).sum(), (xin, module.gate_up_proj, module.down_proj))
        return {"y": y, "dx": grads[0], "dgate_up": grads[1], "ddown": grads[2]}

    def call(m, t):
        cfg._experts_implementation = impl
        return m(t, index, weights)

    want = outputs(ref_experts, lambda m, t: experts_forward_loop(m, t, index, weights), x_low.float())
    with poisoned():
        got = outputs(experts, call, x_low)
    assert_close(f"experts {impl} (N={N}, E={E}, k={K})", got, want, dtype)


MLA_GPU = dict(hidden=2048, heads=16, q_lora=None, kv_lora=512, rope=64, nope=128, v=128, contexts=[16384])
MLA_TOY = dict(hidden=64, heads=4, q_lora=None, kv_lora=32, rope=8, nope=16, v=16, contexts=[64])


def test_mla_decode_absorbed_and_naive(gpu):
    """One decode step, absorbed and naive, against the naive step in fp32 on the same rounded weights and
    cache."""
    from types import SimpleNamespace

    import bench_mla

    config = bench_mla.make_config(SimpleNamespace(**gpu.pick(MLA_GPU, MLA_TOY)))
    batch, context = gpu.pick((4, 4096), (2, 32))
    for dtype in gpu.low_dtypes:
        _, ref_step = bench_mla.make_decode_step(
            config, "naive", batch, context, gpu.device, torch.float32, dtype
        )
        ref = ref_step()
        outs = {}
        for mode in ("absorbed", "naive"):
            _, step = bench_mla.make_decode_step(config, mode, batch, context, gpu.device, dtype)
            with poisoned():
                outs[mode] = step()
        assert_close(f"mla decode (batch {batch}, context {context})", outs, {m: ref for m in outs}, dtype)
