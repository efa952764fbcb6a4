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

# elements (fp32) of the gathered keys/values/scores one chunk may hold: 2**24 · 4 B = 64 MiB
_CHUNK_BUDGET = 2**24


def check_sparse_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
) -> None:
    """Shape checks shared by every sparse-attention backend, with messages in the caller's terms."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or idx.dim() != 3:
        raise ValueError(
            "sparse attention expects q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, "
            f"K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, idx {tuple(idx.shape)}"
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


# Layout: keys/values are gathered head-major, [B, Hkv, Tc, K, D], and queries viewed as
# [B, Hkv, Tc, G, D], so every product below is one batched matmul over (B, Hkv, Tc) with the gathered
# block used as is (a transposed view, no copy).


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, Hkv, S, D] contiguous (free when Hkv = 1, the MQA/latent case)."""
    return x.transpose(1, 2).contiguous()


def _gather_heads(x_hm: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x_hm [B, Hkv, S, D], idx [B, Tc, K] (no -1) -> [B, Hkv, Tc, K, D] fp32, one index_select."""
    B, Hkv, S, D = x_hm.shape
    return (
        x_hm.reshape(-1, D).index_select(0, _flat_index(idx, Hkv, S)).view(B, Hkv, *idx.shape[1:], D).float()
    )


def _flat_index(idx: torch.Tensor, Hkv: int, S: int) -> torch.Tensor:
    """Row numbers of (b, h, idx[b, t, j]) in a [B·Hkv·S, D] view, ordered [B, Hkv, Tc, K]."""
    B = idx.shape[0]
    base = (torch.arange(B, device=idx.device)[:, None] * Hkv + torch.arange(Hkv, device=idx.device)) * S
    return (base[:, :, None, None] + idx[:, None]).reshape(-1)


def _queries(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, Tc, H, D] -> [B, Hkv, Tc, G, D] fp32 (head h = kv head h // G, as in GQA's repeat_interleave)."""
    B, Tc, H, D = x.shape
    return x.float().reshape(B, Tc, Hkv, H // Hkv, D).transpose(1, 2)


def _unqueries(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, Tc, G, ...] -> [B, Tc, H, ...]."""
    B, Hkv, Tc, G = x.shape[:4]
    return x.transpose(1, 2).reshape(B, Tc, Hkv * G, *x.shape[4:])


def _chunk_probs(
    q_c: torch.Tensor, k_sel: torch.Tensor, valid: torch.Tensor, scale: float, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities over the selection. q_c [B, Hkv, Tc, G, D], k_sel [B, Hkv, Tc, K, D], valid [B, Tc, K].

    Returns p [B, Hkv, Tc, G, K] fp32 and lse [B, Hkv, Tc, G]; when ``lse`` is given (backward) it is reused.
    """
    s = torch.matmul(q_c, k_sel.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, None, :, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # an empty selection has lse = -inf: shift by 0 instead so exp(-inf) = 0 and o = 0
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p, lse


def _chunk_index(idx: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection of queries t0..t1 with -1 slots pointed at key 0 (their p is 0), and the validity mask."""
    idx_c = idx[:, t0:t1].long()
    valid = idx_c >= 0
    return idx_c.clamp(min=0), valid


class _SparseAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale: float, query_chunk: int):
        B, T, H, _ = q.shape
        Hkv, Dv = k.shape[2], v.shape[3]
        k_hm, v_hm = _head_major(k), _head_major(v)
        o = q.new_empty(B, T, H, Dv)
        lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
        for t0 in range(0, T, query_chunk):
            t1 = min(T, t0 + query_chunk)
            idx_c, valid = _chunk_index(idx, t0, t1)
            p, lse_c = _chunk_probs(
                _queries(q[:, t0:t1], Hkv), _gather_heads(k_hm, idx_c), valid, scale, None
            )
            o[:, t0:t1] = _unqueries(torch.matmul(p, _gather_heads(v_hm, idx_c))).to(o.dtype)
            lse[:, t0:t1] = _unqueries(lse_c)
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
        k_hm, v_hm = _head_major(k), _head_major(v)
        dq = torch.empty_like(q)
        dk_hm = torch.zeros(B * Hkv * S, Dqk, device=k.device, dtype=torch.float32)
        dv_hm = torch.zeros(B * Hkv * S, Dv, device=v.device, dtype=torch.float32)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            idx_c, valid = _chunk_index(idx, t0, t1)
            k_sel, v_sel = _gather_heads(k_hm, idx_c), _gather_heads(v_hm, idx_c)  # (B, Hkv, Tc, K, D)
            q_c, do_c = _queries(q[:, t0:t1], Hkv), _queries(do[:, t0:t1], Hkv)  # (B, Hkv, Tc, G, D)
            p, _ = _chunk_probs(q_c, k_sel, valid, scale, _queries(lse[:, t0:t1, :, None], Hkv)[..., 0])
            # dL/ds = p · (dp − Σ_d dO·O + dlse): the lse term carries the gradient of a returned lse
            delta = (do_c * _queries(o[:, t0:t1], Hkv)).sum(-1) - _queries(dlse[:, t0:t1, :, None], Hkv)[
                ..., 0
            ]
            dp = torch.matmul(do_c, v_sel.transpose(-1, -2))  # (B, Hkv, Tc, G, K)
            ds = p * (dp - delta[..., None]) * scale
            dq[:, t0:t1] = _unqueries(torch.matmul(ds, k_sel)).to(dq.dtype)
            # scatter back to the selected keys; -1 slots point at key 0 with p = 0, adding exact zeros
            flat = _flat_index(idx_c, Hkv, S)
            dk_hm.index_add_(0, flat, torch.matmul(ds.transpose(-1, -2), q_c).reshape(-1, Dqk))
            dv_hm.index_add_(0, flat, torch.matmul(p.transpose(-1, -2), do_c).reshape(-1, Dv))
        dk = dk_hm.view(B, Hkv, S, Dqk).transpose(1, 2).to(k.dtype)
        dv = dv_hm.view(B, Hkv, S, Dv).transpose(1, 2).to(v.dtype)
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
    differentiable too). ``query_chunk=None`` picks the largest chunk within a 64 MiB fp32 working set.
    Same results as ``sparse_attention_naive``; gradients flow to q, k and v.
    """
    check_sparse_attention_inputs(q, k, v, idx)
    B, T, H, Dqk = q.shape
    if query_chunk is None:
        query_chunk = auto_query_chunk(T, idx.shape[-1], H, k.shape[2], Dqk, v.shape[3])
    o, lse = _SparseAttentionTorch.apply(q, k, v, idx, float(scale), max(1, int(query_chunk)))
    return (o, lse) if return_lse else o


def dense_visible_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``sparse_attention`` computes when every query's selection holds all the keys it may see
    (``index_topk`` >= S): causal attention from ``key_start`` on, through PyTorch's SDPA (no gather).

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], key_start [B, T] or None -> o [B, T, H, Dv].
    A query that may see no key (a left-padding position) gets o = 0, as in sparse attention. The reference
    is ``sparse_attention`` with idx = every visible key (tests/test_dsa.py)."""
    from .naive import resolve_q_offset, visible_mask

    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    P = resolve_q_offset(T, S, q_offset)
    G = H // Hkv
    q_hm = q.transpose(1, 2)  # (B, H, T, Dqk)
    k_hm = k.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else k.transpose(1, 2).expand(B, H, S, -1)
    v_hm = v.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else v.transpose(1, 2).expand(B, H, S, -1)
    if key_start is None and P == 0 and T == S:
        o = torch.nn.functional.scaled_dot_product_attention(q_hm, k_hm, v_hm, is_causal=True, scale=scale)
        return o.transpose(1, 2)
    visible = visible_mask(T, 0, S, q_offset=P, key_start=key_start, device=q.device)  # (B|1, T, S)
    empty = ~visible.any(dim=-1, keepdim=True)  # (B|1, T, 1): no visible key
    # An empty row would give NaN (softmax over nothing); let it see every key, then zero its output, so its
    # (zero) output gradient adds nothing to k and v either.
    o = torch.nn.functional.scaled_dot_product_attention(
        q_hm, k_hm, v_hm, attn_mask=(visible | empty)[:, None], scale=scale
    )
    return o.transpose(1, 2).masked_fill(empty[..., None], 0.0)
