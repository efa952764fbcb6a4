"""Indexer pooling (GLM-5-Next's ``index_kpool``): the indexer scores pools of ``pool`` consecutive tokens.

Each document (a packed document, or a row's real tokens after its left padding) is cut into pools of
``pool`` tokens from its first token on. A pool's key is a learned per-channel weighted average of its tokens'
indexer keys, ``k̄[c] = Σ_i softmax_i(g[m_i, c] + ape[i, c]) · k[m_i, c]`` (``g = x W_gate`` per token,
``ape`` one row per slot of the pool). A query scores the complete pools that end at or before it, keeps the
best ``topk // pool`` of them (ties toward the more recent pool) and attends over their tokens plus the tokens
of its own incomplete pool (the "tail", at most ``pool - 1`` tokens, always kept). The selection width is
``(topk // pool) · pool + pool - 1``.

Legend as in ``naive.py``; NP pools, G the gate logits [B, S, DI], ``ends`` [B, NP] the absolute position of
each pool's last token (-1: no pool in that slot), ``key_doc`` [B, S] the first token of each key's document
(a key before it is left padding).

``naive.pooled_topk_naive`` is the spec (a loop per query); the functions here are the batched path.
"""

from __future__ import annotations

import torch

from .indexer import _indexer_logits_block, topk_indices_packed


def pool_ends(key_doc: torch.Tensor | None, S: int, pool: int, *, batch: int, device) -> torch.Tensor:
    """The pools of S keys -> ends [B, NP] int64, in increasing order per row, -1 padded.

    A pool ends at key s when s is the ``pool``-th, 2·``pool``-th, ... token of its document (``key_doc``
    [B, S], or None: one document from position 0)."""
    pos = torch.arange(S, device=device)
    r = pos[None] - (torch.zeros(1, S, dtype=torch.long, device=device) if key_doc is None else key_doc)
    is_end = (r >= 0) & ((r + 1) % pool == 0)  # (B|1, S)
    is_end = is_end.expand(batch, S)
    n = int(is_end.sum(-1).max()) if S else 0
    # stable sort puts the ends first, in increasing position order
    order = torch.sort((~is_end).to(torch.int8), dim=-1, stable=True).indices[:, :n]
    return torch.where(is_end.gather(1, order), order, -1)


def pooled_keys(
    k_I: torch.Tensor, g_I: torch.Tensor, ape: torch.Tensor, ends: torch.Tensor, pool: int
) -> torch.Tensor:
    """k_I, g_I [B, S, DI], ape [pool, DI], ends [B, NP] -> pooled keys [B, NP, DI] in k_I's dtype (0 where
    ends is -1). Differentiable in k_I, g_I and ape. The softmax runs in fp32 and its weights are cast to
    k_I's dtype before the sum, as transformers' GLM-5-Next does."""
    B, NP = ends.shape
    DI = k_I.shape[-1]
    members = ends.clamp(min=pool - 1)[..., None] - (pool - 1) + torch.arange(pool, device=ends.device)
    flat = members.reshape(B, NP * pool, 1).expand(-1, -1, DI)
    keys = k_I.gather(1, flat).view(B, NP, pool, DI)
    logits = g_I.gather(1, flat).view(B, NP, pool, DI).float() + ape.float()
    weights = logits.softmax(dim=2).to(keys.dtype)
    out = (weights * keys).sum(dim=2)  # (B, NP, DI)
    return out * (ends >= 0)[..., None].to(out.dtype)


def pooled_token_keys(pooled: torch.Tensor, ends: torch.Tensor, S: int, pool: int) -> torch.Tensor:
    """Each token's pool key [B, S, DI]: the key of the complete pool holding it, 0 for a token in no
    complete pool (padding, an incomplete last pool). Differentiable in ``pooled``; the sparse indexer loss
    reads it (every token of a pool carries the pool's score, so its softmax over the selected pools'
    tokens is the softmax over those pools)."""
    B, NP, DI = pooled.shape
    members = ends[..., None] - (pool - 1) + torch.arange(pool, device=ends.device)  # (B, NP, pool)
    valid = (ends >= 0)[..., None].expand_as(members)
    src = pooled[:, :, None].expand(-1, -1, pool, -1)
    out = pooled.new_zeros(B, S + 1, DI)  # row S takes the writes of missing pools
    target = torch.where(valid, members, S).reshape(B, NP * pool, 1).expand(-1, -1, DI)
    out = out.scatter(1, target, src.reshape(B, NP * pool, DI))
    return out[:, :S]


def _pool_visible(ends: torch.Tensor, T: int, P: int, key_start: torch.Tensor | None) -> torch.Tensor:
    """[B, T, NP] bool: may query t (absolute position P + t) select pool j? Its last token must be visible:
    at or before the query, and in the query's document."""
    q_pos = P + torch.arange(T, device=ends.device)
    vis = (ends[:, None, :] >= 0) & (ends[:, None, :] <= q_pos[None, :, None])
    if key_start is not None:
        vis = vis & (ends[:, None, :] >= key_start[:, :, None])
    return vis


def pooled_scores(
    q_I: torch.Tensor,
    pooled: torch.Tensor,
    w: torch.Tensor,
    ends: torch.Tensor,
    *,
    q_offset: int,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores of every pool [B, T, NP] fp32, -inf where the query may not select the pool."""
    scores = _indexer_logits_block(q_I, pooled, w)
    return scores.masked_fill(~_pool_visible(ends, q_I.shape[1], q_offset, key_start), float("-inf"))


def pool_tail(
    T: int, P: int, key_start: torch.Tensor | None, pool: int, *, batch: int, device
) -> torch.Tensor:
    """The tokens of each query's own incomplete pool [B, T, pool - 1] (-1 = unused): from the start of that
    pool up to the query itself."""
    q_pos = P + torch.arange(T, device=device)[None]  # (1, T)
    start = torch.zeros_like(q_pos) if key_start is None else key_start
    n = q_pos - start + 1  # visible tokens of the document
    tail_start = start + n - n % pool
    tail = tail_start[..., None] + torch.arange(pool - 1, device=device)
    return torch.where(tail <= q_pos[..., None], tail, -1).expand(batch, -1, -1)


@torch.no_grad()
def pooled_topk(
    q_I: torch.Tensor,
    pooled: torch.Tensor,
    w: torch.Tensor,
    ends: torch.Tensor,
    *,
    pool: int,
    topk: int,
    q_offset: int,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 256,
) -> torch.Tensor:
    """The pooled selection: idx [B, T, (topk // pool) · pool + pool - 1] int64 (-1 = unused), the tokens
    of the ``topk // pool`` best complete pools (best pool first, ties toward the more recent pool), then
    the query's tail (:func:`pool_tail`). ``pooled`` / ``ends`` from :func:`pooled_keys` / :func:`pool_ends`
    over the keys; ``q_offset`` = P, the absolute position of query 0. No gradient."""
    B, T = q_I.shape[:2]
    P = int(q_offset)
    kp = topk // pool
    out = torch.full((B, T, kp * pool), -1, dtype=torch.long, device=q_I.device)
    offs = torch.arange(pool, device=q_I.device) - (pool - 1)
    for t0 in range(0, T, query_chunk):
        t1 = min(T, t0 + query_chunk)
        ks = None if key_start is None else key_start[:, t0:t1]
        scores = pooled_scores(q_I[:, t0:t1], pooled, w[:, t0:t1], ends, q_offset=P + t0, key_start=ks)
        sel = topk_indices_packed(scores, kp)  # (B, Tc, <= kp) pool slots, -1 = none
        end = torch.where(sel >= 0, ends.gather(1, sel.clamp(min=0).flatten(1)).view_as(sel), -1)
        tokens = torch.where(end[..., None] >= 0, end[..., None] + offs, -1).flatten(2)
        out[:, t0:t1, : tokens.shape[-1]] = tokens
    tail = pool_tail(T, P, key_start, pool, batch=B, device=q_I.device)
    return torch.cat([out, tail], dim=-1)


def pool_selection_width(topk: int, pool: int) -> int:
    """Slots of a pooled selection: ``topk // pool`` pools of ``pool`` tokens and a tail of ``pool - 1``."""
    return (topk // pool) * pool + pool - 1


__all__ = [
    "pool_ends",
    "pool_selection_width",
    "pool_tail",
    "pooled_keys",
    "pooled_scores",
    "pooled_token_keys",
    "pooled_topk",
]
