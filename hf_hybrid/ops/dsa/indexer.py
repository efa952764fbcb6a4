"""The DSA indexer at scale: streaming top-k, and the indexer's training losses and selection metrics.

Nothing here builds a [T, HI, S] or [T, S] tensor for all T at once:

- ``indexer_topk`` walks query chunks × key chunks, keeping a running top-k per query. The tie rule
  (equal scores → the more recent key) is made exact by packing (score, position) into one int64 whose
  integer order is the lexicographic order, so a plain ``topk`` over packed keys never meets a tie.
- the KL losses and metrics run per query chunk; the dense KL recomputes each chunk's target in the backward
  (activation checkpointing) and the indexer logits go through an autograd function that recomputes its
  [Tc, HI, Sc] ReLU block per key chunk in the backward, so saved memory is O(Tc · S) at most.

Legend as in ``naive.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .naive import _kl_rows, resolve_q_offset, selection_mask, visible_mask
from .torch_ops import _chunk_index, _chunk_probs, _gather_heads, _head_major, _queries

_INVALID = torch.iinfo(torch.int64).min  # packed key of a key the query may not see


# ----------------------------------------------------------------------------------------------------------
# indexer logits on a block of keys


def _indexer_logits_block(q_I: torch.Tensor, k_I: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_h w[t,h] · ReLU(q_I[t,h] · k_I[s]) for q_I [B, Tc, HI, DI], k_I [B, Sc, DI], w [B, Tc, HI] -> [B, Tc,
    Sc].

    Two batched matmuls in fp32; the [B, Tc, HI, Sc] intermediate is the block's whole working set.
    """
    B, Tc, HI, DI = q_I.shape
    z = torch.matmul(q_I.float().reshape(B, Tc * HI, DI), k_I.float().transpose(1, 2))  # (B, Tc·HI, Sc)
    z = F.relu(z).view(B, Tc, HI, -1)
    return torch.matmul(w.float()[:, :, None, :], z).squeeze(2)  # (B, Tc, 1, HI) @ (B, Tc, HI, Sc)


class _IndexerLogits(torch.autograd.Function):
    """Raw indexer logits [B, Tc, S] (no mask) whose backward recomputes the ReLU block per key chunk."""

    @staticmethod
    def forward(ctx, q_I, k_I, w, key_chunk: int):
        S = k_I.shape[1]
        out = torch.cat(
            [_indexer_logits_block(q_I, k_I[:, s0 : s0 + key_chunk], w) for s0 in range(0, S, key_chunk)],
            dim=-1,
        )
        ctx.save_for_backward(q_I, k_I, w)
        ctx.key_chunk = key_chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q_I, k_I, w = ctx.saved_tensors
        B, Tc, HI, DI = q_I.shape
        S = k_I.shape[1]
        qf, wf = q_I.float(), w.float()
        dq = torch.zeros(B, Tc, HI, DI, device=q_I.device, dtype=torch.float32)
        dw = torch.zeros(B, Tc, HI, device=w.device, dtype=torch.float32)
        dk = torch.empty(B, S, DI, device=k_I.device, dtype=torch.float32)
        for s0 in range(0, S, ctx.key_chunk):
            s1 = min(S, s0 + ctx.key_chunk)
            kf = k_I[:, s0:s1].float()
            z = torch.matmul(qf.reshape(B, Tc * HI, DI), kf.transpose(1, 2)).view(B, Tc, HI, s1 - s0)
            g = d_out[:, :, s0:s1].float()  # (B, Tc, Sc)
            dw += torch.matmul(F.relu(z), g[..., None]).squeeze(-1)
            dz = (g[:, :, None, :] * wf[..., None]).masked_fill_(z <= 0, 0.0)  # (B, Tc, HI, Sc)
            dq += torch.matmul(dz, kf[:, None]).view(B, Tc, HI, DI)
            dk[:, s0:s1] = torch.matmul(
                dz.reshape(B, Tc * HI, s1 - s0).transpose(1, 2), qf.reshape(B, Tc * HI, DI)
            )
        return dq.to(q_I.dtype), dk.to(k_I.dtype), dw.to(w.dtype), None


def indexer_logits(
    q_I: torch.Tensor, k_I: torch.Tensor, w: torch.Tensor, *, key_chunk: int = 2048
) -> torch.Tensor:
    """Unmasked indexer logits [B, Tc, S] fp32, differentiable, with O(Tc · HI · key_chunk) working memory."""
    return _IndexerLogits.apply(q_I, k_I, w, int(key_chunk))


# ----------------------------------------------------------------------------------------------------------
# exact top-k with ties toward the most recent key


def _pack(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(score, position) -> int64 whose integer order is the lexicographic order of the pair.

    The fp32 bit pattern is made monotone (flip the magnitude bits of negatives), put in the high 32 bits,
    the position in the low 32. -0.0 is first turned into +0.0 so that it ties with +0.0 as in the spec.
    """
    s = torch.where(scores == 0, 0.0, scores.float())
    bits = s.view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    packed = key * (1 << 32) + positions
    return packed.masked_fill(scores == float("-inf"), _INVALID)


def _unpack_sorted(packed: torch.Tensor) -> torch.Tensor:
    """Running packed top-k [.., K] -> positions best first, -1 for slots that hold no visible key."""
    packed = packed.sort(dim=-1, descending=True).values
    return torch.where(packed == _INVALID, -1, packed & 0xFFFFFFFF)


def topk_indices_packed(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract and result as ``naive.topk_indices`` ([..., S] -> [..., min(k, S)]), via packed keys.

    O(S) ``topk`` instead of a full sort; exact (no two packed keys in a row are equal).
    """
    S = scores.shape[-1]
    packed = _pack(scores, torch.arange(S, device=scores.device))
    return _unpack_sorted(packed.topk(min(int(k), S), dim=-1, sorted=False).values)


def indexer_topk(
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    *,
    topk: int,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 128,
    key_chunk: int = 2048,
    backend: str = "auto",
) -> torch.Tensor:
    """Streaming indexer + top-k: ``topk_indices(indexer_scores_naive(...), topk)`` without the [T, S] scores.

    q_I [B, T, HI, DI], k_I [B, S, DI], w [B, T, HI] -> idx [B, T, min(topk, S)] int64, best first, ties
    toward the most recent key, -1 in slots a query cannot fill (it sees fewer than ``topk`` keys).
    ``q_offset`` = P (default S - T); ``key_start`` [B, T] optional first visible key per query (left
    padding, packed documents). Working memory O(query_chunk · (HI · key_chunk + K)); key chunks that lie
    wholly in a query chunk's future are skipped. No gradient (selection is not differentiable).
    ``backend``: "torch" (fp32 matmuls, any device), "triton" (fused logits kernel: no [Tc, HI, Sc]
    intermediate, fp32 accumulation of the inputs' dtype) or "auto" (triton on CUDA when installed).
    """
    from . import resolve_backend  # the package is initialised by the time this runs

    logits_block = _indexer_logits_block
    if resolve_backend("indexer top-k", backend, q_I.device, ("auto", "torch", "triton")) == "triton":
        from .triton_kernels import indexer_logits_block_triton as logits_block
    B, T, HI, DI = q_I.shape
    S = k_I.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    K = min(int(topk), S)
    out = torch.empty(B, T, K, dtype=torch.int64, device=q_I.device)
    with torch.no_grad():
        for t0 in range(0, T, query_chunk):
            t1 = min(T, t0 + query_chunk)
            ks = None if key_start is None else key_start[:, t0:t1]
            running = torch.full((B, t1 - t0, K), _INVALID, dtype=torch.int64, device=q_I.device)
            lo = 0 if ks is None else int(ks.min())  # keys before every query's start are never visible
            hi = P + t1  # one past the last key the chunk's last query sees
            for s0 in range(lo - lo % key_chunk, hi, key_chunk):
                s1 = min(hi, s0 + key_chunk)
                scores = logits_block(q_I[:, t0:t1], k_I[:, s0:s1], w[:, t0:t1])  # (B, Tc, Sc) fp32
                mask = visible_mask(t1 - t0, s0, s1, q_offset=P + t0, key_start=ks, device=scores.device)
                packed = _pack(
                    scores.masked_fill(~mask, float("-inf")), torch.arange(s0, s1, device=q_I.device)
                )
                both = torch.cat([running, packed], dim=-1)
                running = both.topk(K, dim=-1, sorted=False).values if both.shape[-1] > K else both
            out[:, t0:t1] = _unpack_sorted(running)
    return out


# ----------------------------------------------------------------------------------------------------------
# indexer KL losses (DeepSeek-V3.2 continued training)


def _head_mean_probs(q_c: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean causal attention probabilities for a query chunk: q_c [B, Tc, H, D], k [B, Sv, Hkv, D],
    mask [B|1, Tc, Sv] -> [B, Tc, Sv] fp32. One kv group at a time bounds memory to Tc · G · Sv."""
    B, Tc, H, _ = q_c.shape
    Hkv = k.shape[2]
    G = H // Hkv
    acc = torch.zeros(B, Tc, k.shape[1], device=q_c.device, dtype=torch.float32)
    for j in range(Hkv):
        s = torch.einsum("btgd,bsd->btgs", q_c[:, :, j * G : (j + 1) * G].float(), k[:, :, j].float()) * scale
        acc += torch.softmax(s.masked_fill(~mask[:, :, None], float("-inf")), dim=-1).sum(2)
    return acc / H


def _maybe_checkpoint(fn, *args):
    """Recompute ``fn`` in the backward when it will have one, so no chunk keeps its activations."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def indexer_kl_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 64,
    key_chunk: int = 2048,
) -> torch.Tensor:
    """Dense warm-up loss: (1 / (B·T)) · Σ_{b,t} KL(p_t ‖ softmax(I_t)), a scalar fp32 (mean over queries).

    q [B, T, H, D], k [B, S, Hkv, D]: the main attention's queries and keys (post-RoPE, the attention uses
    ``scale``); q_I [B, T, HI, DI], k_I [B, S, DI], w [B, T, HI]: the indexer's. p_t = head-mean causal
    attention probabilities (= heads summed, L1-normalised), **detached**, recomputed per query chunk;
    I_t = indexer scores over the same visible keys. The gradient reaches only q_I, k_I and w. Memory
    O(query_chunk · (S + G · S + HI · key_chunk)) in forward and backward (chunks are recomputed).
    ``q_offset`` = P (default S - T); ``key_start`` as in ``indexer_topk``.
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    q, k = q.detach(), k.detach()

    def chunk_loss(t0: int, t1: int, q_I_c, w_c) -> torch.Tensor:
        hi = P + t1  # keys beyond hi are in every query's future here
        ks = None if key_start is None else key_start[:, t0:t1]
        mask = visible_mask(t1 - t0, 0, hi, q_offset=P + t0, key_start=ks, device=q.device)
        with torch.no_grad():
            p = _head_mean_probs(q[:, t0:t1], k[:, :hi], mask, scale)
        logits = indexer_logits(q_I_c, k_I[:, :hi], w_c, key_chunk=key_chunk).masked_fill(
            ~mask, float("-inf")
        )
        return _kl_rows(p, logits).sum()

    total = q_I.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        # k_I enters through the closure; checkpoint tracks it all the same (non-reentrant)
        total = total + _maybe_checkpoint(
            lambda a, b, _t0=t0, _t1=t1: chunk_loss(_t0, _t1, a, b), q_I[:, t0:t1], w[:, t0:t1]
        )
    return total / (B * T)


def indexer_kl_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Sparse-stage loss: (1 / (B·T)) · Σ_{b,t} KL(p_t|S_t ‖ softmax(I_t|S_t)), a scalar fp32.

    S_t = idx[b, t] ([B, T, K], -1 = unused). p_t = head-mean of each head's softmax over S_t (the sparse
    attention's own probabilities), detached; the indexer logits are gathered at S_t and renormalised there.
    Only q_I, k_I, w receive gradients. Memory O(query_chunk · K · (Hkv · D + HI + H)) per chunk.
    """
    B, T = q.shape[:2]
    Hkv = k.shape[2]
    q, k_hm = q.detach(), _head_major(k.detach())

    def chunk_loss(t0: int, t1: int, q_I_c, w_c) -> torch.Tensor:
        idx_c, valid = _chunk_index(idx, t0, t1)
        with torch.no_grad():
            p, _ = _chunk_probs(_queries(q[:, t0:t1], Hkv), _gather_heads(k_hm, idx_c), valid, scale, None)
            p = p.mean(dim=(1, 3))  # (B, Hkv, Tc, G, K) -> (B, Tc, K)
        kI_sel = _gather_heads(k_I[:, None], idx_c)[:, 0]  # (B, Tc, K, DI), differentiable
        z = F.relu(torch.matmul(q_I_c.float(), kI_sel.transpose(-1, -2)))  # (B, Tc, HI, K)
        logits = torch.matmul(w_c.float()[:, :, None, :], z).squeeze(2)  # (B, Tc, K)
        # invalid slots are out; a row with nothing selected gets finite dummy logits (its p is all 0)
        logits = logits.masked_fill(~valid & valid.any(-1, keepdim=True), float("-inf"))
        return _kl_rows(p, logits).sum()

    total = q_I.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        total = total + _maybe_checkpoint(
            lambda a, b, _t0=t0, _t1=t1: chunk_loss(_t0, _t1, a, b), q_I[:, t0:t1], w[:, t0:t1]
        )
    return total / (B * T)


# ----------------------------------------------------------------------------------------------------------
# selection metrics


@torch.no_grad()
def _per_query_metric(q, k, idx, scale, q_offset, key_start, query_chunk, recall: bool) -> torch.Tensor:
    B, T = q.shape[:2]
    S = k.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    out = torch.empty(B, T, device=q.device, dtype=torch.float32)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        hi = P + t1
        ks = None if key_start is None else key_start[:, t0:t1]
        mask = visible_mask(t1 - t0, 0, hi, q_offset=P + t0, key_start=ks, device=q.device)
        p = _head_mean_probs(q[:, t0:t1], k[:, :hi], mask, scale)  # (B, Tc, hi)
        idx_c = idx[:, t0:t1].long()
        idx_c = torch.where(idx_c < hi, idx_c, -1)  # a key in every query's future carries no mass
        if recall:
            true_idx = topk_indices_packed(p.masked_fill(~mask, float("-inf")), idx.shape[-1])
            chosen = selection_mask(idx_c, hi)
            hits = torch.where(true_idx >= 0, chosen.gather(-1, true_idx.clamp(min=0)), False).sum(-1)
            out[:, t0:t1] = hits.float() / (true_idx >= 0).sum(-1).clamp(min=1).float()
        else:
            out[:, t0:t1] = torch.where(idx_c >= 0, p.gather(-1, idx_c.clamp(min=0)), 0.0).sum(-1)
    return out


def attention_mass_in_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 64,
) -> torch.Tensor:
    """mass[b, t] = Σ_{s ∈ S_t} p[b, t, s] ∈ [0, 1], p the head-mean dense causal attention. [B, T] fp32.

    How much of the dense model's attention the selection keeps (1.0 = nothing lost). No gradient.
    """
    return _per_query_metric(q, k, idx, scale, q_offset, key_start, query_chunk, recall=False)


def indexer_recall_at_k(
    q: torch.Tensor,
    k: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 64,
) -> torch.Tensor:
    """recall[b, t] = |top-k_t(p[b, t]) ∩ S_t| / k_t, k_t = min(K, keys visible to t). [B, T] fp32.

    p the head-mean dense causal attention, its top-k with the indexer's tie rule. No gradient.
    """
    return _per_query_metric(q, k, idx, scale, q_offset, key_start, query_chunk, recall=True)
