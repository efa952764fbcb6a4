"""Simple GLA, chunked: matmuls inside each chunk, a short loop over chunks for the state.

Also home of the chunk machinery the gated delta rule reuses (chunk reshaping, the decay masks, and
:class:`ChunkStateScan`, the only sequential part, with a hand-written backward).

Within a chunk of C tokens, b_i = Σ_{s<=i} g_s (fp32, cumulated from the chunk start, so b_i <= 0 and
decreasing), and with the state S entering the chunk:

    o_i = exp(b_i) S0ᵀ q_i  +  Σ_{j<=i} exp(b_i - b_j) (q_i·k_j) v_j          (q already scaled)
    S_C = exp(b_C) S0  +  Σ_j exp(b_C - b_j) k_j v_jᵀ

Every exponent is <= 0 (the upper triangle is masked to -inf *before* exp), so nothing overflows, and
b_i - b_j is summed from its own terms (:func:`segsum`), not subtracted, so strong decays stay accurate.

Legend: N = B * H rows, NC chunks, C chunk length, Dk/Dv key/value dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_hybrid.ops.simple_gla.naive import check_simple_gla_shapes, naive_recurrent_simple_gla, upcast
from hf_hybrid.ops.varlen import run_varlen


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *rest] -> [B * H, NC, C, *rest] in fp32 (fp64 kept), zero-padded at the end (zeros are
    neutral)."""
    batch, length, heads, *rest = x.shape
    num_chunks = -(-length // chunk_size)
    x = upcast(x).movedim(2, 1)  # (B, H, T, *rest)
    x = F.pad(x, (0, 0) * len(rest) + (0, num_chunks * chunk_size - length))
    return x.reshape(batch * heads, num_chunks, chunk_size, *rest)


def from_chunks(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[B * H, NC, C, D] -> [B, T, H, D] (drops the padding)."""
    return x.reshape(batch, -1, x.shape[1] * x.shape[2], x.shape[-1])[:, :, :length].transpose(1, 2)


def segsum(g: torch.Tensor) -> torch.Tensor:
    """Σ_{j<s<=i} g_s for j <= i and -inf above the diagonal: [..., C] -> [..., C, C].

    Each entry sums exactly its own terms (a masked cumsum, as in Mamba-2's ``ssd_minimal``), never a
    difference of two prefix sums: b_i - b_j loses |b| * 2^-24 in fp32, which is 6e-5 once strong decays
    push the prefix sum to -1000 inside a chunk.
    """
    size = g.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=g.device)
    terms = g[..., :, None].expand(*g.shape, size).masked_fill(~ones.tril(-1), 0)  # [s, j] = g_s for s > j
    return terms.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))


def causal_decay(g: torch.Tensor) -> torch.Tensor:
    """exp(Σ_{j<s<=i} g_s) for j <= i, 0 above (masked before exp, so nothing overflows): [..., C] -> [..., C,
    C]."""
    return segsum(g).exp()


def sum_to_chunk_end(g: torch.Tensor) -> torch.Tensor:
    """Σ_{s>j} g_s within each chunk (the log decay from token j to the chunk end): g [N, NC, C, *rest]."""
    tail = g.flip(2).cumsum(2).flip(2)  # Σ_{s>=j}
    return torch.cat([tail[:, :, 1:], torch.zeros_like(tail[:, :, :1])], dim=2)


def intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Decay-weighted causal scores Σ_d q_id k_jd exp(Σ_{j<s<=i} g_sd) for j <= i: [N, NC, C, C].

    q, k [N, NC, C, Dk]; g (per token, not cumulated) [N, NC, C] (scalar decay), [N, NC, C, Dk]
    (per-channel decay) or None.
    """
    if g is None:
        return (q @ k.transpose(-1, -2)).tril()
    if g.dim() == q.dim() - 1:
        return (q @ k.transpose(-1, -2)) * causal_decay(g)
    return _per_channel_scores(q, k, g)


def _per_channel_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, sub: int = 16) -> torch.Tensor:
    """Per-channel decay scores without a [C, C, Dk] tensor or any exp of a positive number.

    Split the chunk into sub-blocks of ``sub`` tokens. For a query sub-block I starting at r_I and an earlier
    key j < r_I, exp(b_i - b_j) = exp(b_i - b_{r_I}) * exp(b_{r_I} - b_j), both factors <= 1: one matmul.
    Keys inside block I (the diagonal block) use the elementwise form on a [sub, sub, Dk] tensor.
    (The off-diagonal factors are differences of chunk prefix sums b: see :func:`segsum` for their fp32 cost.)
    """
    *lead, size, dk = q.shape
    sub = sub if size % sub == 0 else size
    n_sub = size // sub
    b = g.cumsum(-2)
    b_ref = b[..., ::sub, :]  # (N, NC, n_sub, Dk): b at each sub-block's first token
    q_sub = q.unflatten(-2, (n_sub, sub)) * (b.unflatten(-2, (n_sub, sub)) - b_ref[..., None, :]).exp()
    # keys before the query block only: the exponent is masked to -inf before exp for j >= r_I
    before = (
        torch.arange(size, device=q.device)[None, :] < torch.arange(0, size, sub, device=q.device)[:, None]
    )
    expo = (b_ref[..., :, None, :] - b[..., None, :, :]).masked_fill(~before[..., None], float("-inf"))
    k_sub = k[..., None, :, :] * expo.exp()  # (N, NC, n_sub, C, Dk)
    off = (q_sub @ k_sub.transpose(-1, -2)).flatten(-3, -2)  # (N, NC, C, C), zero for j >= r_I

    q_blk, k_blk, g_blk = (x.unflatten(-2, (n_sub, sub)) for x in (q, k, g))
    decay = causal_decay(g_blk.transpose(-1, -2))  # (N, NC, n_sub, Dk, sub, sub)
    diag = torch.einsum("...id,...jd,...dij->...ij", q_blk, k_blk, decay)  # (N, NC, n_sub, sub, sub)
    eye = torch.eye(n_sub, dtype=q.dtype, device=q.device)
    diag = (diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, size, size)
    return off + diag


class ChunkStateScan(torch.autograd.Function):
    """The loop over chunks, with a backward that is also one loop (no autograd graph per chunk).

    Per chunk c, with S the state entering it:
        u_c     = U_c - W_c S          (W is None for simple GLA: u = U)
        S_next  = decay_c * S + Kd_cᵀ u_c

    U [N, NC, C, Dv]; Kd [N, NC, C, Dk] (keys decayed to the chunk end); decay [N, NC, Dk or 1, 1];
    S0 [N, Dk, Dv]; W [N, NC, C, Dk] or None. Returns (states entering each chunk [N, NC, Dk, Dv],
    u [N, NC, C, Dv] or None when W is None, final state [N, Dk, Dv]).
    """

    @staticmethod
    def forward(ctx, u_in, kd, decay, s0, w):
        state = s0
        states, us = [], []
        for c in range(u_in.shape[1]):
            states.append(state)
            u_c = u_in[:, c] if w is None else torch.baddbmm(u_in[:, c], w[:, c], state, alpha=-1)
            us.append(u_c)
            state = torch.baddbmm(state * decay[:, c], kd[:, c].transpose(1, 2), u_c)
        states_before = torch.stack(states, 1)
        u = None if w is None else torch.stack(us, 1)
        ctx.save_for_backward(kd, decay, states_before, u_in if w is None else u, w)
        return states_before, u, state

    @staticmethod
    def backward(ctx, d_states, d_u, d_final):
        kd, decay, states_before, u, w = ctx.saved_tensors
        num_chunks = kd.shape[1]
        d_state = torch.zeros_like(states_before[:, 0]) if d_final is None else d_final
        d_next, d_u_total = [], []
        for c in reversed(range(num_chunks)):
            d_next.append(d_state)  # gradient w.r.t. the state leaving chunk c
            if d_u is None:
                du_c = kd[:, c] @ d_state
            else:
                du_c = torch.baddbmm(d_u[:, c], kd[:, c], d_state)
            d_u_total.append(du_c)
            if d_states is None:
                d_state = d_state * decay[:, c]
            else:
                d_state = torch.addcmul(d_states[:, c], d_state, decay[:, c])
            if w is not None:
                d_state = torch.baddbmm(d_state, w[:, c].transpose(1, 2), du_c, alpha=-1)
        d_next = torch.stack(d_next[::-1], 1)  # (N, NC, Dk, Dv)
        d_u_total = torch.stack(d_u_total[::-1], 1)  # (N, NC, C, Dv)
        d_kd = u @ d_next.transpose(-1, -2)
        d_decay = (states_before * d_next).sum(-1, keepdim=True)
        if decay.shape[-2] == 1:
            d_decay = d_decay.sum(-2, keepdim=True)
        d_w = None if w is None else -(d_u_total @ states_before.transpose(-1, -2))
        return d_u_total, d_kd, d_decay, d_state, d_w


def chunk_state_scan(
    u_in: torch.Tensor,
    kd: torch.Tensor,
    decay: torch.Tensor,
    s0: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Functional entry point of :class:`ChunkStateScan` (same shapes)."""
    return ChunkStateScan.apply(u_in, kd, decay, s0, w)


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA in chunked (matmul) form; same contract as ``naive_recurrent_simple_gla``.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; g [B, T, H] (or [B, T, H, Dk], or None = no decay);
    initial_state [N, H, Dk, Dv]; cu_seqlens [N + 1] (then B == 1). Returns o [B, T, H, Dv] in q's dtype
    and, if ``output_final_state``, the fp32 state [N, H, Dk, Dv].
    """
    check_simple_gla_shapes(q, k, v, g, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if cu_seqlens is not None:
        return run_varlen(
            chunk_simple_gla,
            (q, k, v, g),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
        )
    if q.shape[1] == 0:  # no chunk to form: the spec returns the empty output and the untouched state
        return naive_recurrent_simple_gla(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    q_c, k_c, v_c = (to_chunks(x, chunk_size) for x in (q, k, v))  # (N, NC, C, D)
    q_c = q_c * scale
    if g is None:
        g_c, q_g, kd = None, q_c, k_c
        decay = q_c.new_ones(1, 1, 1, 1).expand(q_c.shape[0], q_c.shape[1], 1, 1)
    else:
        g_c = to_chunks(g, chunk_size)  # (N, NC, C) or (N, NC, C, Dk), fp32
        col = (lambda x: x) if g.dim() == 4 else (lambda x: x[..., None])  # broadcast a scalar decay over Dk
        b = g_c.cumsum(2)  # log decay from the chunk start
        q_g = q_c * col(b).exp()  # queries read the state entering the chunk
        kd = k_c * col(sum_to_chunk_end(g_c)).exp()  # keys decayed to the chunk end
        decay = b[:, :, -1].exp().reshape(q_c.shape[0], q_c.shape[1], -1, 1)  # (N, NC, Dk or 1, 1)
    s0 = _initial_state(initial_state, batch * heads, dk, dv, q_c)
    states, _, final = chunk_state_scan(v_c, kd, decay, s0)
    o_inter = q_g @ states  # (N, NC, C, Dv)
    scores = intra_chunk_scores(q_c, k_c, g_c)
    o = torch.baddbmm(o_inter.flatten(0, 1), scores.flatten(0, 1), v_c.flatten(0, 1)).view_as(o_inter)
    o = from_chunks(o, batch, length).to(q.dtype)
    return o, (final.view(batch, heads, dk, dv) if output_final_state else None)


def _initial_state(initial_state: torch.Tensor | None, rows: int, dk: int, dv: int, like: torch.Tensor):
    """The fp32 [B * H, Dk, Dv] state entering the first chunk (zeros when None)."""
    if initial_state is None:
        return like.new_zeros(rows, dk, dv)
    return upcast(initial_state).reshape(rows, dk, dv)
