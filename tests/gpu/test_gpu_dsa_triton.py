"""DSA's Triton kernels — sparse attention (fwd, bwd) and the indexer — against the torch path on fp32 copies
of the same rounded inputs, with every ``torch.empty`` poisoned (an element a kernel never writes fails)."""

from __future__ import annotations

import pytest
import torch
from gpu_checks import LOW_DTYPES, assert_close, poisoned

pytestmark = pytest.mark.gpu

# B, T (queries), P (cached keys), H, Hkv, Dqk, Dv, K (top-k)
CASES_GPU = {
    "gqa H16/Hkv4 D128": (2, 1000, 48, 16, 4, 128, 128, 256),
    "mla-latent H16 Dqk576/Dv512": (1, 700, 100, 16, 1, 576, 512, 512),
}
CASES_TOY = {"gqa": (2, 11, 6, 4, 2, 32, 32, 7), "mqa-latent": (1, 9, 4, 4, 1, 40, 32, 6)}


def test_poisoning_works_here(gpu):
    """Unwritten outputs fail only if poisoning works on this device and torch."""
    with poisoned():
        canary = torch.empty(1024, device=gpu.device, dtype=gpu.low_dtypes[0])
    assert bool(canary.isnan().all())


def _case(B, T, P, H, Hkv, Dqk, Dv, K, dtype, device, seed):
    """Random q, k, v (S = P + T keys) and a top-K selection from a small random indexer (-1 where t < K)."""
    from hf_hybrid.ops.dsa import indexer_topk

    g = torch.Generator().manual_seed(seed)
    S = P + T
    q = torch.randn(B, T, H, Dqk, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, S, Hkv, Dqk, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, S, Hkv, Dv, generator=g).to(device, dtype).requires_grad_()
    q_I, k_I = torch.randn(B, T, 2, 8, generator=g), torch.randn(B, S, 8, generator=g)
    idx = indexer_topk(q_I, k_I, torch.rand(B, T, 2, generator=g), topk=K, backend="torch").to(device)
    return q, k, v, idx


def _outputs(fn, q, k, v, idx, scale, seed):
    """o, lse and the gradients of Σ o·dO + Σ lse·dlse (the lse path of the backward counts too)."""
    o, lse = fn(q, k, v, idx, scale=scale, return_lse=True)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(o.device)
    dlse = torch.randn(lse.shape, generator=g).to(o.device)
    dq, dk, dv = torch.autograd.grad((o.float() * do).sum() + (lse * dlse).sum(), (q, k, v))
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


@LOW_DTYPES
@pytest.mark.parametrize("case", range(2), ids=["gqa", "mla-latent"])
def test_sparse_attention(gpu, dtype, case):
    from hf_hybrid.ops.dsa import sparse_attention, sparse_attention_torch

    gpu.need(dtype)
    name, (B, T, P, H, Hkv, Dqk, Dv, K) = list(gpu.pick(CASES_GPU, CASES_TOY).items())[case]
    seed = 1 + case
    q, k, v, idx = _case(B, T, P, H, Hkv, Dqk, Dv, K, dtype, gpu.device, seed)
    scale = Dqk**-0.5
    with poisoned():
        triton_attn = lambda *a, **kw: sparse_attention(*a, backend="triton", **kw)
        got = _outputs(triton_attn, q, k, v, idx, scale, seed)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = _outputs(sparse_attention_torch, q32, k32, v32, idx, scale, seed)
    lse = {"lse": got.pop("lse")}  # fp32 from exact low-precision products: an fp32-sized bound
    assert_close(f"sparse_attention {name}", got, want, dtype)
    assert_close(f"sparse_attention {name}", lse, want, dtype, bound=1e-4 if dtype != torch.float32 else None)


@LOW_DTYPES
def test_indexer_logits(gpu, dtype):
    from hf_hybrid.ops.dsa.indexer import _indexer_logits_block
    from hf_hybrid.ops.dsa.triton_kernels import indexer_logits_block_triton

    gpu.need(dtype)
    B, T, S, HI, DI = gpu.pick((1, 512, 1536, 64, 128), (2, 37, 70, 3, 24))
    g = torch.Generator().manual_seed(100)
    q_I = torch.randn(B, T, HI, DI, generator=g).to(gpu.device, dtype)
    k_I = torch.randn(B, S, DI, generator=g).to(gpu.device, dtype)
    w = (torch.randn(B, T, HI, generator=g) * (HI * DI) ** -0.5).to(gpu.device, dtype)
    with poisoned():
        got = indexer_logits_block_triton(q_I, k_I, w)
    want = _indexer_logits_block(q_I.float(), k_I.float(), w.float())
    # exact products of rounded inputs, fp32 sums in another order
    assert_close("indexer_logits", {"logits": got}, {"logits": want}, dtype, bound=1e-5)


@LOW_DTYPES
def test_indexer_topk_on_exact_inputs(gpu, dtype):
    """Inputs whose every partial sum is exact (multiples of 1/4): the same sets, ties toward recent keys."""
    from hf_hybrid.ops.dsa import indexer_topk
    from hf_hybrid.ops.dsa.naive import indexer_scores_naive, topk_indices

    gpu.need(dtype)
    B, T, P, HI, DI, K, qc, kc = gpu.pick((1, 300, 200, 8, 32, 64, 64, 128), (2, 21, 9, 3, 8, 6, 8, 16))
    g = torch.Generator().manual_seed(4)
    q_I = torch.randint(-2, 3, (B, T, HI, DI), generator=g).float() / 2
    k_I = torch.randint(-2, 3, (B, P + T, DI), generator=g).float() / 2
    w = torch.randint(-1, 3, (B, T, HI), generator=g).float() / 4
    want = topk_indices(indexer_scores_naive(q_I, k_I, w), K)
    args = (x.to(gpu.device, dtype) for x in (q_I, k_I, w))
    with poisoned():
        got = indexer_topk(*args, topk=K, query_chunk=qc, key_chunk=kc, backend="triton")
    assert torch.equal(got.cpu(), want)
