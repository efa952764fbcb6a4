"""The delta rule with a decay, chunked (WY / UT form): matmuls inside each chunk, a short loop over chunks.

One function serves both decays: a scalar per token and head (the gated delta rule, Gated DeltaNet) and one
per key channel (Kimi Delta Attention). They differ only in how the decay-weighted scores are formed.

Scalar decay.

Within a chunk of C tokens (b_i = Σ_{s<=i} g_s from the chunk start, fp32; S0 the state entering it),
unrolling the recurrence gives for the written values u (the "new values" of the delta rule):

    u_i + Σ_{j<i} beta_i exp(b_i - b_j) (k_i·k_j) u_j = beta_i v_i - beta_i exp(b_i) S0ᵀ k_i

i.e. (I + A) u = beta·V - diag(beta·exp(b)) K S0 with A strictly lower triangular. With T = (I + A)^-1:

    u  = U - W S0,             U = T (beta·V),   W = T (beta·exp(b)·K)
    o  = (exp(b)·Q) S0 + tril(Q Kᵀ ⊙ exp(b_i - b_j)) u
    S_C = exp(b_C) S0 + (exp(b_C - b)·K)ᵀ u

Everything but the dependency on S0 is computed for all chunks at once; the chunk loop is
:class:`~hf_hybrid.ops.simple_gla.chunk.ChunkStateScan` (shared with simple GLA, here with W).
T is built by recursive 2x2 block inversion (matmuls only, see :func:`unit_lower_inverse`).

Per-channel decay.

Within a chunk of C tokens, b_i = Σ_{s<=i} g_s [Dk] is the per-channel log decay from the chunk start (fp32,
<= 0 and decreasing in every channel) and S0 the state entering the chunk. Writing Γ_ij = Diag(exp(b_i -
b_j)), the unrolled recurrence gives for the written values u (the delta rule's "new values"):

    u_i + Σ_{j<i} beta_i (k_iᵀ Γ_ij k_j) u_j = beta_i v_i - beta_i (exp(b_i) ⊙ k_i)ᵀ S0

i.e. (I + A) u = beta·V - diag(beta) (exp(b) ⊙ K) S0 with A strictly lower triangular. With T = (I + A)^-1:

    u   = U - W S0,                 U = T (beta·V),   W = T (beta·exp(b) ⊙ K)
    o   = (exp(b) ⊙ Q) S0 + P u,    P_ij = q_iᵀ Γ_ij k_j for j <= i, 0 above
    S_C = Diag(exp(b_C)) S0 + (exp(b_C - b) ⊙ K)ᵀ u

With a scalar decay Γ is a scalar per pair and P, A are one masked matmul each (above); here A and P need a
sum over channels of a pair-dependent decay, so they cannot be one matmul of decayed q and k.

Where exp could overflow, and the choice made: the obvious factorisation exp(b_i - b_j) = exp(b_i) · exp(-b_j)
relative to the *chunk start* needs exp(-b_j), which overflows fp32 (e^88) as soon as one channel decays by
more than 88 nats inside a chunk — Kimi Linear's gate ``-exp(A_log) · softplus(·)`` with A up to 16 gets there
in a handful of tokens, and bf16-trained gates even faster. So P and A are built relative to **sub-chunk**
boundaries, by halving (:func:`per_channel_scores`): for two sibling blocks L, R of s tokens (s = C/2, ..., 1)
and the last token m of L, every pair (i in R, j in L) factors as exp(b_i - b_m) · exp(b_m - b_j) with both
exponents <= 0, so each level is one matmul of decayed queries and keys; the diagonal (i = j) has exp(0) = 1.
Each exponent is built from the log decays of its own 2s-token block only (block-local sums, never a
difference of chunk-wide prefix sums), so strong decays elsewhere in the chunk cost no accuracy either. Every
other exponent above (exp(b), exp(b_C), exp(b_C - b)) is <= 0 by construction: nothing is ever the exp of a
positive number, at any decay strength, in any dtype. The cost is log2(C) matmuls that together do the work of
one C x C x Dk matmul, and no [C, C, Dk] tensor.

Backward (both decays): autograd through this form, except the two pieces with hand-written backwards
(:class:`UnitLowerInverse` and the chunk loop :class:`~hf_hybrid.ops.simple_gla.chunk.ChunkStateScan`, with a
scalar or per-channel decay), so no graph grows with the number of chunks or the log2(C) inversion levels.

Legend: N = B * Hv rows, NC chunks, C chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_hybrid.ops.delta_rule.naive import (
    check_delta_rule_shapes,
    l2norm,
    naive_recurrent_delta_rule,
    repeat_heads,
)
from hf_hybrid.ops.simple_gla.chunk import (
    _initial_state,
    causal_decay,
    chunk_state_scan,
    from_chunks,
    sum_to_chunk_end,
    to_chunks,
)
from hf_hybrid.ops.varlen import run_varlen


def _diagonal_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """View of the (size x size) diagonal blocks of x [..., n, n] as [..., pairs, size, size] (writable)."""
    n = x.shape[-1]
    blocks = x.reshape(*x.shape[:-2], n // size, size, n // size, size).diagonal(dim1=-4, dim2=-2)
    return blocks.movedim(-1, -3)


class UnitLowerInverse(torch.autograd.Function):
    """T = (I + A)^-1 for strictly lower-triangular A [..., C, C]; backward dA = -tril(Tᵀ dT Tᵀ, -1).

    Only the strictly lower triangle of A is read (the diagonal and above may hold anything; their gradient
    is zero), so callers need not mask it.

    Forward: recursive 2x2 block inversion from 1x1 blocks up, in place: for each diagonal block
    [[T11, 0], [A21, T22]] the inverse has T21 = -T22 A21 T11. log2(C) levels of batched matmuls, no
    per-row loop and no LAPACK call; this is the blocked form of forward substitution. The hand-written
    backward (two matmuls) keeps the log2(C) levels out of the autograd graph.
    """

    @staticmethod
    def forward(ctx, a):
        size = a.shape[-1]
        n = 1 << max(size - 1, 0).bit_length()  # next power of two; zero padding inverts to identity
        a_pad = F.pad(a, (0, n - size, 0, n - size)) if n != size else a
        inv = torch.zeros_like(a_pad)
        inv.diagonal(dim1=-2, dim2=-1).fill_(1)
        block = 1
        while block < n:
            t = _diagonal_blocks(inv, 2 * block)  # (..., pairs, 2b, 2b), a view into inv
            a21 = _diagonal_blocks(a_pad, 2 * block)[..., block:, :block]
            t[..., block:, :block] = -(t[..., block:, block:] @ a21 @ t[..., :block, :block])
            block *= 2
        inv = inv[..., :size, :size]
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, d_inv):
        (inv,) = ctx.saved_tensors
        inv_t = inv.transpose(-1, -2)
        return -(inv_t @ d_inv @ inv_t).tril(-1)


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, -1))^-1 for ``a`` [..., C, C]: only the strictly lower triangle is read
    (see :class:`UnitLowerInverse`)."""
    return UnitLowerInverse.apply(a)


def per_channel_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_d q_id k_jd exp(Σ_{j<s<=i} g_sd) for j <= i, 0 above, without any exp of a positive number.

    q [..., C, Dk] (its leading dims may broadcast against k's, e.g. two query sets at once); k, g [*, C, Dk]
    (g per token, not cumulated). Returns [..., C, C]. Built bottom-up by doubling the block size (see the
    module docstring): a block of 2s tokens is [[block(L), 0], [R-against-L pairs, block(R)]].
    """
    size = q.shape[-2]
    n = 1 << max(size - 1, 0).bit_length()  # next power of two; zero padding (g = 0, q = k = 0) adds nothing
    if n != size:
        q, k, g = (F.pad(x, (0, 0, 0, n - size)) for x in (q, k, g))
    blocks = (q * k).sum(-1)[..., :, None, None]  # (..., n, 1, 1): i = j, decay exp(0) = 1
    s = 1
    while s < n:
        qp, kp, gp = (x.unflatten(-2, (n // (2 * s), 2, s)) for x in (q, k, g))  # (..., pairs, 2, s, Dk)
        g_left, g_right = gp[..., 0, :, :], gp[..., 1, :, :]
        to_right = g_right.cumsum(-2)  # Σ_{m<t<=i} g_t for i in R (m: the last token of L), <= 0
        from_left = g_left.sum(-2, keepdim=True) - g_left.cumsum(-2)  # Σ_{j<t<=m} g_t for j in L, <= 0
        pairs = (qp[..., 1, :, :] * to_right.exp()) @ (kp[..., 0, :, :] * from_left.exp()).transpose(-1, -2)
        left, right = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]  # (..., pairs, s, s)
        blocks = torch.cat(
            [torch.cat([left, torch.zeros_like(left)], -1), torch.cat([pairs, right], -1)], dim=-2
        )
        s *= 2
    return blocks[..., 0, :size, :size]


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule in chunked WY form; same contract as ``naive_recurrent_delta_rule``.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0) [B, T, Hv] (or [B, T, Hv, Dk] if
    ``per_channel``); beta [B, T, Hv]; initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1] (then B == 1).
    Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, Hv, Dk, Dv].
    All arithmetic is fp32 (float64 inputs: float64).
    """
    check_delta_rule_shapes(q, k, v, g, beta, initial_state, per_channel=per_channel)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if cu_seqlens is not None:
        return run_varlen(
            chunk_delta_rule,
            (q, k, v, g, beta),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm,
            chunk_size=chunk_size,
            per_channel=per_channel,
        )
    if q.shape[1] == 0:  # no chunk to form: the spec returns the empty output and the untouched state
        return naive_recurrent_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            per_channel=per_channel,
        )
    out_dtype = q.dtype
    batch, length, _, dk = q.shape
    heads, dv = v.shape[2:]
    scale = dk**-0.5 if scale is None else scale
    if use_qk_l2norm:
        # at least fp32, and float64 stays float64 (v, g, beta keep their dtype below)
        work = torch.promote_types(q.dtype, torch.float32)
        q, k = l2norm(q.to(work)), l2norm(k.to(work))
    q_c, k_c = (to_chunks(repeat_heads(x, heads), chunk_size) for x in (q, k))  # (N, NC, C, Dk)
    v_c = to_chunks(v, chunk_size)  # (N, NC, C, Dv)
    beta_c = to_chunks(beta, chunk_size)[..., None]  # (N, NC, C, 1)
    g_c = to_chunks(g, chunk_size)  # (N, NC, C) or (N, NC, C, Dk): fp32 log decay per token (and channel)
    q_c = q_c * scale
    k_beta = beta_c * k_c
    if per_channel:
        # P (q against k) and A (beta·k against k) in one call: the key-side decayed tiles are built once and
        # the two query sets broadcast over them (leading dim 2).
        scores, a = per_channel_scores(torch.stack([q_c, k_beta]), k_c, g_c).unbind(0)  # (N, NC, C, C) each
    else:
        gamma = causal_decay(g_c)  # (N, NC, C, C): exp(b_i - b_j) for j <= i
        a = k_beta @ k_c.transpose(-1, -2) * gamma
        scores = (q_c @ k_c.transpose(-1, -2)) * gamma
        g_c = g_c[..., None]  # (N, NC, C, 1): broadcasts over the key channels like a per-channel decay
    b = g_c.cumsum(2)  # (N, NC, C, Dk or 1) log decay from the chunk start
    t = unit_lower_inverse(a)  # reads the strictly lower triangle only
    u_c = t @ (beta_c * v_c)
    w_c = t @ (k_beta * b.exp())
    kd = k_c * sum_to_chunk_end(g_c).exp()  # keys decayed to the chunk end
    decay = b[:, :, -1, :, None].exp()  # (N, NC, Dk or 1, 1): each state row decays by its own channel

    s0 = _initial_state(initial_state, batch * heads, dk, dv, q_c)
    states, u, final = chunk_state_scan(u_c, kd, decay, s0, w_c)
    o_inter = (q_c * b.exp()) @ states  # reads the state entering the chunk
    o = torch.baddbmm(o_inter.flatten(0, 1), scores.flatten(0, 1), u.flatten(0, 1)).view_as(o_inter)
    o = from_chunks(o, batch, length).to(out_dtype)
    return o, (final.view(batch, heads, dk, dv) if output_final_state else None)


def chunk_gated_delta_rule(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_delta_rule` with a scalar decay: g [B, T, Hv]."""
    return chunk_delta_rule(q, k, v, g, beta, per_channel=False, **kwargs)


def chunk_kda(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_delta_rule` with a per-channel decay: g [B, T, Hv, Dk]."""
    return chunk_delta_rule(q, k, v, g, beta, per_channel=True, **kwargs)
