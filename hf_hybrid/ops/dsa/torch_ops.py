"""Sparse attention in plain torch: gather the selected keys/values per query, chunked over queries.

Memory is O(query_chunk · K · Hkv · (Dqk + Dv)) in the forward *and* the backward: a custom autograd
function saves only (q, k, v, idx, o, lse) and recomputes each chunk's probabilities from the log-sum-exp
in the backward, like FlashAttention does, so nothing of size T × S or T × K × D outlives one chunk.
Softmax and all products run in fp32; outputs are cast back to the input dtype.

Legend as in ``naive.py``: q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K].
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# elements (fp32) of the gathered keys/values/scores one chunk may hold: 2**25 · 4 B = 128 MiB
_CHUNK_BUDGET = 2**25


def check_sparse_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
) -> None:
    """Shape checks shared by every sparse-attention backend, with messages in the caller's terms."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 3:
        raise ValueError(
            "sparse attention expects q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, idx {tuple(idx.shape)}"
        )
    B, T, H, Dqk = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != Dqk:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={k.shape[2]}")
    if idx.shape[:2] != (B, T):
        raise ValueError(f"idx {tuple(idx.shape)} must be [B={B}, T={T}, K]")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")


def auto_query_chunk(T: int, K: int, H: int, Hkv: int, Dqk: int, Dv: int) -> int:
    """Largest query chunk whose gathered keys/values and scores fit in ``_CHUNK_BUDGET`` fp32 elements."""
    per_query = K * (Hkv * (Dqk + Dv) + 2 * H)
    return max(1, min(T, _CHUNK_BUDGET // max(per_query, 1)))


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, S, Hkv, D], idx [B, Tc, K] (no -1) -> [B, Tc, K, Hkv, D] fp32, one index_select."""
    B, S = x.shape[:2]
    flat = (idx + S * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
    return x.reshape(B * S, *x.shape[2:]).index_select(0, flat).view(*idx.shape, *x.shape[2:]).float()


def _chunk_probs(
    q_c: torch.Tensor, k_sel: torch.Tensor, valid: torch.Tensor, scale: float, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over the selection. q_c [B, Tc, Hkv, G, D] fp32, k_sel [B, Tc, K, Hkv, D] fp32.

    Returns p [B, Tc, Hkv, G, K] and lse [B, Tc, Hkv, G]; when ``lse`` is given (backward) it is reused.
    """
    s = torch.einsum("btkgd,btjkd->btkgj", q_c, k_sel) * scale
    s = s.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # an empty selection has lse = -inf: shift by 0 instead so exp(-inf) = 0 and o = 0
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p, lse


class _SparseAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale: float, query_chunk: int):
        B, T, H, _ = q.shape
        Hkv, Dv = k.shape[2], v.shape[3]
        G = H // Hkv
        o = q.new_empty(B, T, H, Dv)
        lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
        for t0 in range(0, T, query_chunk):
            t1 = min(T, t0 + query_chunk)
            idx_c = idx[:, t0:t1].long()
            valid = idx_c >= 0
            idx_c = idx_c.clamp(min=0)
            k_sel, v_sel = _gather_rows(k, idx_c), _gather_rows(v, idx_c)  # (B, Tc, K, Hkv, D)
            q_c = q[:, t0:t1].float().reshape(B, t1 - t0, Hkv, G, -1)
            p, lse_c = _chunk_probs(q_c, k_sel, valid, scale, None)
            o_c = torch.einsum("btkgj,btjkd->btkgd", p, v_sel)
            o[:, t0:t1] = o_c.reshape(B, t1 - t0, H, Dv).to(o.dtype)
            lse[:, t0:t1] = lse_c.reshape(B, t1 - t0, H)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.scale, ctx.query_chunk = scale, query_chunk
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, idx, o, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.query_chunk
        B, T, H, Dqk = q.shape
        S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = H // Hkv
        dq = torch.empty_like(q)
        dk = torch.zeros(B * S, Hkv, Dqk, device=k.device, dtype=torch.float32)
        dv = torch.zeros(B * S, Hkv, Dv, device=v.device, dtype=torch.float32)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            Tc = t1 - t0
            idx_c = idx[:, t0:t1].long()
            valid = idx_c >= 0
            idx_c = idx_c.clamp(min=0)
            k_sel, v_sel = _gather_rows(k, idx_c), _gather_rows(v, idx_c)
            q_c = q[:, t0:t1].float().reshape(B, Tc, Hkv, G, Dqk)
            do_c = do[:, t0:t1].float().reshape(B, Tc, Hkv, G, Dv)
            lse_c = lse[:, t0:t1].reshape(B, Tc, Hkv, G)
            p, _ = _chunk_probs(q_c, k_sel, valid, scale, lse_c)  # (B, Tc, Hkv, G, K)
            # dL/ds = p · (dp − Σ_d dO·O + dlse): the lse term carries the gradient of a returned lse
            delta = (do_c * o[:, t0:t1].float().reshape(B, Tc, Hkv, G, Dv)).sum(-1)
            delta = delta - dlse[:, t0:t1].reshape(B, Tc, Hkv, G)
            dp = torch.einsum("btkgd,btjkd->btkgj", do_c, v_sel)
            ds = p * (dp - delta[..., None]) * scale
            dq[:, t0:t1] = torch.einsum("btkgj,btjkd->btkgd", ds, k_sel).reshape(B, Tc, H, Dqk).to(dq.dtype)
            # scatter back to the selected keys; -1 slots point at key 0 with p = 0, adding exact zeros
            flat = (idx_c + S * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)
            dk.index_add_(0, flat, torch.einsum("btkgj,btkgd->btjkd", ds, q_c).reshape(-1, Hkv, Dqk))
            dv.index_add_(0, flat, torch.einsum("btkgj,btkgd->btjkd", p, do_c).reshape(-1, Hkv, Dv))
        dk = dk.view(B, S, Hkv, Dqk).to(k.dtype)
        dv = dv.view(B, S, Hkv, Dv).to(v.dtype)
        return dq, dk, dv, None, None, None


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    return_lse: bool = False,
    query_chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention by gathering the selected keys/values, chunked over queries.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K] int (-1 = unused slot, positions
    distinct per row) -> o [B, T, H, Dv] in q's dtype (+ lse [B, T, H] fp32 with ``return_lse``; the lse is
    differentiable too). ``query_chunk=None`` picks the largest chunk within a 128 MiB fp32 working set.
    Same results as ``sparse_attention_naive``; gradients flow to q, k and v.
    """
    check_sparse_attention_inputs(q, k, v, idx)
    B, T, H, Dqk = q.shape
    if query_chunk is None:
        query_chunk = auto_query_chunk(T, idx.shape[-1], H, k.shape[2], Dqk, v.shape[3])
    o, lse = _SparseAttentionTorch.apply(q, k, v, idx, float(scale), max(1, int(query_chunk)))
    return (o, lse) if return_lse else o
