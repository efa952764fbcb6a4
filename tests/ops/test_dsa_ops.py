"""DSA op layer on CPU: the naive spec against the chunked torch paths (no triton needed).

Tolerances (fp32 everywhere here): outputs, lse and gradients 1e-5 absolute and relative — both sides
compute in fp32 with different reduction orders. Selections (top-k indices) must match exactly.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid.ops.dsa import _announced as announced_backends
from hf_hybrid.ops.dsa import (
    attention_mass_in_selection,
    indexer_kl_dense,
    indexer_kl_sparse,
    indexer_recall_at_k,
    indexer_topk,
    sparse_attention,
    sparse_attention_torch,
    topk_indices_packed,
)
from hf_hybrid.ops.dsa.naive import (
    attention_mass_in_selection_naive,
    dense_causal_attention_naive,
    indexer_kl_dense_naive,
    indexer_kl_sparse_naive,
    indexer_recall_at_k_naive,
    indexer_scores_naive,
    sparse_attention_naive,
    topk_indices,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _dyadic(*shape, lo=-2, hi=3, denom=2.0, gen=None):
    """Small multiples of 1/denom: every product and sum below is exact in fp32, whatever the order, so
    scores tie exactly (and often: ReLU zeros, equal sums) and the streaming path must break ties alike."""
    return torch.randint(lo, hi, shape, generator=gen).float() / denom


def _indexer_inputs(B, T, S, HI=3, DI=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        _dyadic(B, T, HI, DI, gen=g),
        _dyadic(B, S, DI, gen=g),
        _dyadic(B, T, HI, lo=-1, hi=3, denom=4.0, gen=g),
    )


def _attn_inputs(B, T, S, H, Hkv, Dqk, Dv, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dqk, generator=g)
    k = torch.randn(B, S, Hkv, Dqk, generator=g)
    v = torch.randn(B, S, Hkv, Dv, generator=g)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


# ------------------------------------------------------------------------------------------------ indexer


def test_indexer_scores_match_the_formula():
    B, T, P, HI, DI = 1, 4, 3, 2, 5
    q_I, k_I, w = torch.randn(B, T, HI, DI), torch.randn(B, P + T, DI), torch.randn(B, T, HI)
    scores = indexer_scores_naive(q_I, k_I, w)
    for t in range(T):
        for s in range(P + T):
            if s > P + t:
                assert scores[0, t, s] == float("-inf")
                continue
            want = sum(w[0, t, h] * torch.relu(q_I[0, t, h] @ k_I[0, s]) for h in range(HI))
            torch.testing.assert_close(scores[0, t, s], want, atol=1e-6, rtol=1e-6)


def test_topk_ties_go_to_the_most_recent_key():
    scores = torch.tensor([[0.0, 1.0, -0.0, 1.0, 0.0, -1.0, float("-inf")]])
    want = torch.tensor([[3, 1, 4, 2, 0, 5, -1]])  # equal scores: larger position first; -0.0 == 0.0
    assert torch.equal(topk_indices(scores, 7), want)
    assert torch.equal(topk_indices_packed(scores, 7), want)
    assert torch.equal(topk_indices(scores, 3), want[:, :3])
    assert torch.equal(topk_indices_packed(scores, 3), want[:, :3])
    # a query that sees fewer than k keys fills the rest with -1
    s = indexer_scores_naive(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 2), torch.ones(1, 3, 1))
    assert torch.equal(topk_indices(s, 3), torch.tensor([[[0, -1, -1], [1, 0, -1], [2, 1, 0]]]))


def test_packed_topk_equals_sorted_topk_on_tie_heavy_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 4, (5, 7, 40), generator=g).float() / 2
    scores = torch.where(
        scores == 0, torch.where(torch.rand(scores.shape, generator=g) < 0.5, -0.0, 0.0), scores
    )
    scores = scores.masked_fill(torch.rand(scores.shape, generator=g) < 0.2, float("-inf"))
    scores[0, 0] = float("-inf")  # a row with nothing visible
    for k in (1, 5, 33, 40, 100):
        assert torch.equal(topk_indices_packed(scores, k), topk_indices(scores, k)), k


@pytest.mark.parametrize(
    "B,T,P,topk,qc,kc",
    [
        (2, 13, 0, 5, 4, 3),  # T not a multiple of either chunk
        (1, 11, 7, 6, 5, 4),  # cached prefix (decode-style offset)
        (2, 9, 4, 40, 4, 8),  # topk > S: K = S, early queries leave -1 slots
        (1, 1, 20, 8, 1, 6),  # single-token decode step
    ],
)
def test_streaming_topk_equals_naive(B, T, P, topk, qc, kc):
    S = P + T
    q_I, k_I, w = _indexer_inputs(B, T, S)
    scores = indexer_scores_naive(q_I, k_I, w)
    want = topk_indices(scores, topk)
    got = indexer_topk(q_I, k_I, w, topk=topk, query_chunk=qc, key_chunk=kc)
    visible = scores[torch.isfinite(scores)]
    assert (visible == 0).float().mean() > 0.15  # the tie rule is really exercised
    assert torch.equal(got, want)


def test_streaming_topk_with_key_start_equals_naive():
    B, T, P = 2, 12, 5
    q_I, k_I, w = _indexer_inputs(B, T, P + T, seed=3)
    key_start = torch.tensor([[0] * 6 + [9] * 6, [2] * 12])  # packed documents / left padding
    want = topk_indices(indexer_scores_naive(q_I, k_I, w, key_start=key_start), 6)
    got = indexer_topk(q_I, k_I, w, topk=6, key_start=key_start, query_chunk=5, key_chunk=4)
    assert torch.equal(got, want)
    assert (got[0, 6:][got[0, 6:] >= 0] >= 9).all()


def test_streaming_topk_random_floats_selects_equally_good_keys():
    # gaussian inputs: both paths round differently, so compare the scores of what they select
    B, T, P = 2, 17, 6
    g = torch.Generator().manual_seed(5)
    q_I, k_I, w = (
        torch.randn(B, T, 4, 8, generator=g),
        torch.randn(B, P + T, 8, generator=g),
        torch.rand(B, T, 4),
    )
    scores = indexer_scores_naive(q_I, k_I, w)
    got = indexer_topk(q_I, k_I, w, topk=7, query_chunk=6, key_chunk=5)
    want = topk_indices(scores, 7)
    assert torch.equal(got >= 0, want >= 0)
    pick = lambda i: torch.where(i >= 0, scores.gather(-1, i.clamp(min=0)), 0.0)
    torch.testing.assert_close(pick(got), pick(want), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- sparse attention

ATTN_CASES = [
    # B, T, P, H, Hkv, Dqk, Dv, topk, chunk
    (2, 13, 0, 4, 2, 16, 16, 5, 4),  # GQA, no cache
    (1, 11, 9, 4, 2, 16, 16, 6, 3),  # GQA with a cached prefix
    (2, 10, 5, 4, 1, 40, 32, 7, 4),  # MQA / latent MLA: Dqk != Dv
    (1, 7, 3, 3, 3, 8, 12, 4, 5),  # MHA
]


@pytest.mark.parametrize("B,T,P,H,Hkv,Dqk,Dv,topk,chunk", ATTN_CASES)
def test_sparse_attention_torch_equals_naive(B, T, P, H, Hkv, Dqk, Dv, topk, chunk):
    S = P + T
    q, k, v = _attn_inputs(B, T, S, H, Hkv, Dqk, Dv)
    idx = indexer_topk(*_indexer_inputs(B, T, S), topk=topk)
    scale = Dqk**-0.5
    o_ref, lse_ref = sparse_attention_naive(q, k, v, idx, scale=scale, return_lse=True)
    o, lse = sparse_attention_torch(q, k, v, idx, scale=scale, return_lse=True, query_chunk=chunk)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(lse, lse_ref, **TOL)
    # gradients through o and through the returned lse
    g = torch.Generator().manual_seed(7)
    do, dlse = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (lse_ref * dlse).sum(), (q, k, v))
    grads = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("P", [0, 6])
@pytest.mark.parametrize("Hkv,Dqk,Dv", [(2, 16, 16), (1, 24, 16)])
def test_topk_covering_all_keys_is_dense_causal_attention(P, Hkv, Dqk, Dv):
    B, T, H = 2, 9, 4
    S = P + T
    q, k, v = _attn_inputs(B, T, S, H, Hkv, Dqk, Dv, requires_grad=False)
    idx = indexer_topk(*_indexer_inputs(B, T, S), topk=S + 3)  # k >= S: every visible key is kept
    causal = torch.arange(S)[None, :] <= (P + torch.arange(T))[:, None]
    # independent reference: SDPA with an explicit bottom-right causal mask
    G = H // Hkv
    k_rep, v_rep = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_rep.transpose(1, 2), v_rep.transpose(1, 2), attn_mask=causal, scale=Dqk**-0.5
    ).transpose(1, 2)
    for fn in (sparse_attention_naive, sparse_attention_torch):
        torch.testing.assert_close(fn(q, k, v, idx, scale=Dqk**-0.5), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        dense_causal_attention_naive(q, k, v, scale=Dqk**-0.5), ref, atol=1e-5, rtol=1e-5
    )


def test_empty_selection_gives_zero_output_and_finite_gradients():
    q, k, v = _attn_inputs(1, 3, 3, 2, 1, 8, 8)
    idx = torch.tensor([[[0, -1], [-1, -1], [2, 1]]])
    for fn in (sparse_attention_naive, sparse_attention_torch):
        o, lse = fn(q, k, v, idx, scale=0.5, return_lse=True)
        assert torch.all(o[0, 1] == 0) and torch.all(lse[0, 1] == float("-inf"))
        grads = torch.autograd.grad(o.sum(), (q, k, v))
        assert all(torch.isfinite(gr).all() for gr in grads)
        assert torch.all(grads[0][0, 1] == 0)


def test_dispatcher_backends_agree_and_announce_once(caplog):
    q, k, v = _attn_inputs(1, 6, 8, 2, 1, 8, 8, requires_grad=False)
    idx = indexer_topk(*_indexer_inputs(1, 6, 8), topk=4)
    announced_backends.clear()
    with caplog.at_level(logging.INFO, logger="hf_hybrid"):
        outs = [
            sparse_attention(q, k, v, idx, scale=0.3, backend=b) for b in ("auto", "auto", "torch", "naive")
        ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **TOL)
    lines = [r.getMessage() for r in caplog.records if "DSA sparse attention" in r.getMessage()]
    assert len(lines) == 2 and "torch backend on cpu" in lines[0] and "naive" in lines[1], lines
    with pytest.raises(ValueError, match="choose one of"):
        sparse_attention(q, k, v, idx, scale=0.3, backend="flash")


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\nimport torch, hf_hybrid.ops.dsa as dsa\nq = "
        "torch.randn(1, 4, 2, 8); k = torch.randn(1, 4, 1, 8)\nidx = dsa.indexer_topk(torch.randn(1, "
        "4, 2, 4), torch.randn(1, 4, 4), torch.rand(1, 4, 2), topk=2)\nassert not "
        "dsa.triton_available()\nprint(dsa.sparse_attention(q, k, k, idx, scale=0.3).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 4, 2, 8])" in out.stdout


# ------------------------------------------------------------------------------------ indexer KL losses


def _kl_inputs(B, T, P, H, Hkv, D, HI, DI, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = P + T
    q = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, generator=g, requires_grad=True)
    q_I = torch.randn(B, T, HI, DI, generator=g, requires_grad=True)
    k_I = torch.randn(B, S, DI, generator=g, requires_grad=True)
    w = torch.randn(B, T, HI, generator=g, requires_grad=True)
    return q, k, q_I, k_I, w


def _matched_indexer(B, T, P, H, Hkv, D, seed=0):
    """Main attention and an indexer with softmax(I_t) == p_t exactly in math: every head has the same query,
    all entries are ≥ 0 (so ReLU is the identity) and the indexer is that head with w = scale, giving
    I = scale · q·k = the attention logits, i.e. I = log p + const."""
    g = torch.Generator().manual_seed(seed)
    S = P + T
    q1 = torch.rand(B, T, 1, D, generator=g)
    k1 = torch.rand(B, S, 1, D, generator=g)
    q = q1.expand(B, T, H, D).clone().requires_grad_()
    k = k1.expand(B, S, Hkv, D).clone().requires_grad_()
    scale = D**-0.5
    q_I, k_I = q1.clone().requires_grad_(), k1[:, :, 0].clone().requires_grad_()
    w = torch.full((B, T, 1), scale, requires_grad=True)
    return q, k, q_I, k_I, w, scale


@pytest.mark.parametrize("P,key_start", [(0, False), (5, False), (5, True)])
def test_kl_dense_chunked_equals_naive_and_trains_only_the_indexer(P, key_start):
    B, T, H, Hkv, D, HI, DI = 2, 11, 4, 2, 8, 3, 6
    q, k, q_I, k_I, w = _kl_inputs(B, T, P, H, Hkv, D, HI, DI)
    ks = torch.randint(0, P + 1, (B, T)) if key_start else None
    ref = indexer_kl_dense_naive(q, k, q_I, k_I, w, scale=0.3, key_start=ks)
    loss = indexer_kl_dense(q, k, q_I, k_I, w, scale=0.3, key_start=ks, query_chunk=4, key_chunk=5)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, ref, **TOL)
    grads_ref = torch.autograd.grad(ref, (q_I, k_I, w))
    loss.backward()
    for name, t, gr in zip(("q_I", "k_I", "w"), (q_I, k_I, w), grads_ref):
        torch.testing.assert_close(t.grad, gr, **TOL, msg=lambda m, name=name: f"d{name}: {m}")
    assert q.grad is None and k.grad is None  # the target is detached


@pytest.mark.parametrize("P", [0, 4])
def test_kl_sparse_chunked_equals_naive_and_trains_only_the_indexer(P):
    B, T, H, Hkv, D, HI, DI = 2, 10, 4, 1, 8, 3, 6
    q, k, q_I, k_I, w = _kl_inputs(B, T, P, H, Hkv, D, HI, DI, seed=1)
    idx = indexer_topk(q_I.detach(), k_I.detach(), w.detach(), topk=5)
    idx[0, 3] = -1  # a query with an empty selection contributes 0 and stays finite
    ref = indexer_kl_sparse_naive(q, k, q_I, k_I, w, idx, scale=0.3)
    loss = indexer_kl_sparse(q, k, q_I, k_I, w, idx, scale=0.3, query_chunk=3)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, ref, **TOL)
    grads_ref = torch.autograd.grad(ref, (q_I, k_I, w))
    loss.backward()
    for name, t, gr in zip(("q_I", "k_I", "w"), (q_I, k_I, w), grads_ref):
        torch.testing.assert_close(t.grad, gr, **TOL, msg=lambda m, name=name: f"d{name}: {m}")
        assert torch.isfinite(t.grad).all()
    assert q.grad is None and k.grad is None


@pytest.mark.parametrize("P", [0, 3])
def test_kl_losses_vanish_when_the_indexer_matches_attention(P):
    B, T, H, Hkv, D = 2, 9, 4, 2, 8
    q, k, q_I, k_I, w, scale = _matched_indexer(B, T, P, H, Hkv, D)
    dense = indexer_kl_dense(q, k, q_I, k_I, w, scale=scale, query_chunk=4)
    assert abs(dense.item()) < 1e-6
    assert abs(indexer_kl_dense_naive(q, k, q_I, k_I, w, scale=scale).item()) < 1e-6
    idx = indexer_topk(q_I.detach(), k_I.detach(), w.detach(), topk=4)
    assert abs(indexer_kl_sparse(q, k, q_I, k_I, w, idx, scale=scale, query_chunk=4).item()) < 1e-6
    # a perturbed indexer is strictly worse
    assert indexer_kl_dense(q, k, q_I, k_I, w * 2, scale=scale).item() > 1e-4


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("P,Hkv", [(0, 2), (6, 1)])
def test_selection_metrics_chunked_equal_naive(P, Hkv):
    B, T, H, D = 2, 11, 4, 8
    q, k, q_I, k_I, w = _kl_inputs(B, T, P, H, Hkv, D, 3, 6, seed=2)
    q, k = q.detach(), k.detach()
    idx = indexer_topk(q_I.detach(), k_I.detach(), w.detach(), topk=4)
    for fast, naive in ((attention_mass_in_selection, attention_mass_in_selection_naive),
                        (indexer_recall_at_k, indexer_recall_at_k_naive)):  # fmt: skip
        got = fast(q, k, idx, scale=0.3, query_chunk=4)
        torch.testing.assert_close(got, naive(q, k, idx, scale=0.3), **TOL)
        assert got.shape == (B, T) and (got >= 0).all() and (got <= 1 + 1e-6).all()
    # selecting every key keeps all the mass and every true top-k key
    full = indexer_topk(q_I.detach(), k_I.detach(), w.detach(), topk=P + T)
    torch.testing.assert_close(attention_mass_in_selection(q, k, full, scale=0.3), torch.ones(B, T))
    torch.testing.assert_close(indexer_recall_at_k(q, k, full, scale=0.3), torch.ones(B, T))


def test_recall_of_the_true_top_k_is_one():
    q, k, q_I, k_I, w, scale = _matched_indexer(1, 12, 4, 2, 1, 8)
    idx = indexer_topk(q_I.detach(), k_I.detach(), w.detach(), topk=3)
    torch.testing.assert_close(
        indexer_recall_at_k(q.detach(), k.detach(), idx, scale=scale), torch.ones(1, 12)
    )
