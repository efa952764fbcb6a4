"""DeepSeek Sparse Attention (DSA), the obvious way: dense tensors, full masks. This file is the spec.

Every fast path (streaming indexer top-k, gather-based sparse attention, Triton kernels, chunked KL losses)
is tested against the functions here. They build [B, T, S] (and [B, H, T, S]) tensors, so they are for
tests and short sequences only.

Legend: B batch, T queries, S keys, P = S - T cached tokens before the queries (query t sits at absolute
position P + t and may see keys 0..P+t), H query heads, Hkv key/value heads (GQA; Hkv = 1 is MQA and the
latent mode of MLA), G = H // Hkv, K selected keys per query, HI indexer heads, DI indexer head dim.

Selections (``idx`` [B, T, K] int64) hold key positions, one set per query shared by all heads; -1 marks an
unused slot. Positions in a row must be distinct (top-k output always is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# visibility: which keys a query may see


def resolve_q_offset(T: int, S: int, q_offset: int | None) -> int:
    """P, the absolute position of query 0. ``None`` means the queries are the last T of the S keys."""
    P = S - T if q_offset is None else int(q_offset)
    if P < 0 or P + T > S:
        raise ValueError(
            f"q_offset={q_offset} puts queries at positions {P}..{P + T - 1}, outside the S={S} keys"
        )
    return P


def visible_mask(
    T: int,
    key_lo: int,
    key_hi: int,
    *,
    q_offset: int,
    key_start: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """[B or 1, T, key_hi - key_lo] bool: may query t see key s (key_lo <= s < key_hi)?

    Causal: s <= q_offset + t. ``key_start`` ([B, T] int, optional) is the first key each query may see,
    which expresses left padding and packed documents (each document starts at its own first token).
    """
    s = torch.arange(key_lo, key_hi, device=device)
    t_abs = q_offset + torch.arange(T, device=device)
    mask = (s[None, :] <= t_abs[:, None])[None]  # (1, T, Sc)
    if key_start is not None:
        mask = mask & (s[None, None, :] >= key_start[:, :, None].to(device))
    return mask


# ----------------------------------------------------------------------------------------------------------
# 1. indexer scores


def _indexer_raw(q_I: torch.Tensor, k_I: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("bthd,bsd->bths", q_I.float(), k_I.float())  # (B, T, HI, S)
    return torch.einsum("bths,bth->bts", F.relu(logits), w.float())  # (B, T, S)


def indexer_scores_naive(
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    *,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """I[b, t, s] = Σ_h w[b, t, h] · ReLU(q_I[b, t, h] · k_I[b, s]), -inf where query t may not see key s.

    q_I [B, T, HI, DI], k_I [B, S, DI] (one key per token, shared by the indexer heads), w [B, T, HI] (the
    caller has applied DeepSeek's H_I^-1/2 · D_I^-1/2 scales). Computed in fp32. Returns [B, T, S] fp32.
    """
    T, S = q_I.shape[1], k_I.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    scores = _indexer_raw(q_I, k_I, w)
    mask = visible_mask(T, 0, S, q_offset=P, key_start=key_start, device=scores.device)
    return scores.masked_fill(~mask, float("-inf"))


# ----------------------------------------------------------------------------------------------------------
# 2. top-k, ties toward the most recent key


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best keys of each row of ``scores`` [..., S] -> idx [..., min(k, S)] int64, best first.

    Order is lexicographic on (score, position), both descending: among equal scores the larger position
    (the more recent token) wins. ReLU makes many scores exactly zero, so the rule matters. -0.0 ties with
    +0.0. Entries equal to -inf are not visible: when a row has fewer than k visible keys, the remaining
    slots are -1 (at the end).

    Spec implementation: a stable descending sort of the row read backwards keeps equal scores in
    reversed-position order, i.e. most recent first. Exact; no epsilon is added to any score.
    """
    S = scores.shape[-1]
    K = min(int(k), S)
    vals, order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :K], (S - 1) - order[..., :K]
    return idx.masked_fill(vals == float("-inf"), -1)


def ties_at_topk_cut(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Which rows of ``scores`` [..., S] (-inf = not visible) have a tie at their top-k cut -> bool [...].

    True where the k-th and the (k+1)-th best visible scores are equal (-0.0 equals +0.0): there the top-k
    *set* depends on how ties are broken. :func:`topk_indices` breaks them toward the most recent key, while
    ``torch.topk`` (which transformers' DeepSeek-V3.2 / GLM-MoE-DSA use) leaves the order among ties
    unspecified (CPU and CUDA differ), so the two selections, hence the logits, can differ exactly on such
    rows. Rows with at most k visible keys select all of them and are never tied."""
    S = scores.shape[-1]
    if S <= k:
        return torch.zeros(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    top = scores.float().topk(int(k) + 1, dim=-1).values  # sorted, best first
    kth, nxt = top[..., k - 1], top[..., k]
    return (kth == nxt) & (nxt != float("-inf"))


# ----------------------------------------------------------------------------------------------------------
# 4. sparse attention


def selection_mask(idx: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T, K] selection (with -1 slots) -> [B, T, S] bool membership mask."""
    valid = idx >= 0
    mask = torch.zeros(*idx.shape[:-1], S + 1, dtype=torch.bool, device=idx.device)
    # -1 slots go to a spare column S that is dropped afterwards
    mask.scatter_(-1, torch.where(valid, idx, S), True)
    return mask[..., :S]


def sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over its selected keys only, with dense masked tensors.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K] (-1 = unused slot; one
    selection shared by all heads of a query). Dqk may differ from Dv (MLA latent/MQA mode).
    Returns o [B, T, H, Dv] in q's dtype, and with ``return_lse`` also the natural log-sum-exp of the
    scaled scores over the selection, lse [B, T, H] fp32. A query with an empty selection gets o = 0 and
    lse = -inf. Computed in fp32 throughout.
    """
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kf = k.float().repeat_interleave(G, dim=2)  # (B, S, H, Dqk)
    vf = v.float().repeat_interleave(G, dim=2)  # (B, S, H, Dv)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale  # (B, H, T, S)
    keep = selection_mask(idx, S)[:, None]  # (B, 1, T, S)
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T); -inf for an empty selection
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # exp(-inf) = 0 there
    o = torch.einsum("bhts,bshd->bthd", p, vf).to(q.dtype)
    if return_lse:
        return o, lse.transpose(1, 2)
    return o


def dense_causal_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int | None = None
) -> torch.Tensor:
    """Plain causal attention (fp32) with the same layout: what sparse attention equals when K >= S."""
    T, S = q.shape[1], k.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    all_keys = torch.arange(S, device=q.device).expand(q.shape[0], T, S)
    causal = all_keys <= (P + torch.arange(T, device=q.device))[None, :, None]
    return sparse_attention_naive(q, k, v, torch.where(causal, all_keys, -1), scale=scale)


# ----------------------------------------------------------------------------------------------------------
# 5. indexer training losses and selection metrics


def head_mean_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """p[b, t, s]: causal attention probabilities summed over heads and L1-normalised (= mean over heads).

    q [B, T, H, D], k [B, S, Hkv, D] -> [B, T, S] fp32. This is the target of the indexer's KL loss.
    """
    T, S = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    P = resolve_q_offset(T, S, q_offset)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float().repeat_interleave(G, dim=2)) * scale
    mask = visible_mask(T, 0, S, q_offset=P, key_start=key_start, device=q.device)[:, None]
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=1)


def _kl_rows(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per row; entries with logits = -inf must have p = 0 and are skipped."""
    log_q = torch.log_softmax(logits, dim=-1)
    keep = p > 0
    terms = p * (torch.log(torch.where(keep, p, 1.0)) - torch.where(keep, log_q, 0.0))
    return torch.where(keep, terms, 0.0).sum(-1)


def indexer_kl_dense_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense warm-up loss: mean over the B·T queries of KL(p_t ‖ softmax(I_t)), p detached.

    p = head-mean main attention over all visible keys (``head_mean_attention_naive``), I = indexer scores.
    The gradient reaches only q_I, k_I and w.
    """
    with torch.no_grad():
        p = head_mean_attention_naive(
            q.detach(), k.detach(), scale=scale, q_offset=q_offset, key_start=key_start
        )
    scores = indexer_scores_naive(q_I, k_I, w, q_offset=q_offset, key_start=key_start)
    return _kl_rows(p, scores).mean()


def indexer_kl_sparse_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Sparse-stage loss: mean over the B·T queries of KL(p_t|S_t ‖ softmax(I_t|S_t)), p detached.

    Both distributions live on the selected set S_t = idx[b, t] only: p is the head-mean of the sparse
    attention probabilities (each head's softmax over S_t, i.e. what the model computes in the sparse stage),
    softmax(I) is renormalised over S_t. Queries with an empty selection contribute 0.
    """
    S = k.shape[1]
    keep = selection_mask(idx, S)  # (B, T, S)
    with torch.no_grad():
        G = q.shape[2] // k.shape[2]
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float().repeat_interleave(G, dim=2)) * scale
        p = torch.softmax(scores.masked_fill(~keep[:, None], float("-inf")), dim=-1).nan_to_num(0.0).mean(1)
    # only idx decides which keys take part (no causal mask of its own)
    raw = _indexer_raw(q_I, k_I, w).masked_fill(~keep, float("-inf"))  # (B, T, S)
    nonempty = keep.any(-1, keepdim=True)
    # an empty row gets finite dummy logits so that log_softmax stays finite in the backward
    kl = _kl_rows(p, torch.where(nonempty, raw, 0.0))
    return kl.mean()


def attention_mass_in_selection_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """mass[b, t] = Σ_{s ∈ S_t} p[b, t, s], p the head-mean dense causal attention. [B, T] fp32."""
    p = head_mean_attention_naive(q, k, scale=scale, q_offset=q_offset, key_start=key_start)
    return (p * selection_mask(idx, k.shape[1])).sum(-1)


def indexer_recall_at_k_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """recall[b, t] = |top-k_t(p[b, t]) ∩ S_t| / k_t with k_t = min(K, visible keys of t). [B, T] fp32.

    p is the head-mean dense causal attention; its top-k uses the same tie rule as the indexer.
    """
    p = head_mean_attention_naive(q, k, scale=scale, q_offset=q_offset, key_start=key_start)
    mask = visible_mask(
        q.shape[1],
        0,
        k.shape[1],
        q_offset=resolve_q_offset(q.shape[1], k.shape[1], q_offset),
        key_start=key_start,
        device=q.device,
    )
    true_idx = topk_indices(p.masked_fill(~mask, float("-inf")), idx.shape[-1])
    chosen = selection_mask(idx, k.shape[1])
    hits = torch.where(true_idx >= 0, chosen.gather(-1, true_idx.clamp(min=0)), False).sum(-1)
    return hits.float() / (true_idx >= 0).sum(-1).clamp(min=1).float()


# ----------------------------------------------------------------------------------------------------------
# 6. indexer pooling (GLM-5-Next's index_kpool), one query at a time


def pooled_topk_naive(
    q_I: torch.Tensor,
    k_I: torch.Tensor,
    g_I: torch.Tensor,
    ape: torch.Tensor,
    w: torch.Tensor,
    *,
    pool: int,
    topk: int,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> list[list[list[int]]]:
    """The pooled selection of every query as a sorted list of key positions ([B][T] lists).

    Query t sits at p = P + t; its document starts at d = key_start[b, t] (0 without). Its document's
    tokens d, d+1, ... form pools of ``pool`` tokens from d on; pool j (tokens d + j·pool ... d + j·pool +
    pool - 1) is complete for the query when its last token is <= p. Pool key, per channel c:
    Σ_i softmax_i(g_I[m_i, c] + ape[i, c]) · k_I[m_i, c]; pool score Σ_h w[t, h] · ReLU(q_I[t, h] · key).
    The ``topk // pool`` best pools are kept (ties: the later pool wins), and the tokens of the query's own
    incomplete pool (from its start to p) are always added.
    """
    B, T = q_I.shape[:2]
    S = k_I.shape[1]
    P = resolve_q_offset(T, S, q_offset)
    out: list[list[list[int]]] = []
    for b in range(B):
        rows = []
        for t in range(T):
            p = P + t
            d = 0 if key_start is None else int(key_start[b, t])
            n_complete = (p - d + 1) // pool
            scores = []
            for j in range(n_complete):
                m = torch.arange(d + j * pool, d + (j + 1) * pool)
                a = torch.softmax(g_I[b, m].float() + ape.float(), dim=0).to(k_I.dtype)  # (pool, DI)
                key = (a * k_I[b, m]).sum(0).float()
                scores.append(float((F.relu(q_I[b, t].float() @ key) * w[b, t].float()).sum()))
            # best first; among equal scores the later pool first
            best = sorted(range(n_complete), key=lambda j: (scores[j], j), reverse=True)[: topk // pool]
            chosen = [d + j * pool + i for j in best for i in range(pool)]
            chosen += list(range(d + n_complete * pool, p + 1))  # the tail
            rows.append(sorted(chosen))
        out.append(rows)
    return out
