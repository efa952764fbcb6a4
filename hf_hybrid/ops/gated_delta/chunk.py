"""Gated delta rule, chunked (WY / UT form): matmuls inside each chunk, a short loop over chunks.

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

Legend: N = B * Hv rows, NC chunks, C chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_hybrid.ops.gated_delta.naive import (
    check_gated_delta_shapes,
    l2norm,
    naive_recurrent_gated_delta_rule,
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


def chunk_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule in chunked WY form; same contract as ``naive_recurrent_gated_delta_rule``.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0), beta [B, T, Hv]; initial_state
    [N, Hv, Dk, Dv]; cu_seqlens [N + 1] (then B == 1). Returns o [B, T, Hv, Dv] in q's dtype and, if
    ``output_final_state``, the fp32 state [N, Hv, Dk, Dv]. All arithmetic is fp32 (float64 inputs: float64).
    """
    check_gated_delta_shapes(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if cu_seqlens is not None:
        return run_varlen(
            chunk_gated_delta_rule,
            (q, k, v, g, beta),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm,
            chunk_size=chunk_size,
        )
    if q.shape[1] == 0:  # no chunk to form: the spec returns the empty output and the untouched state
        return naive_recurrent_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state
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
    g_c = to_chunks(g, chunk_size)  # (N, NC, C) fp32 log decay per token
    b = g_c.cumsum(2)  # log decay from the chunk start
    q_c = q_c * scale

    gamma = causal_decay(g_c)  # (N, NC, C, C): exp(b_i - b_j) for j <= i
    k_beta = beta_c * k_c
    t = unit_lower_inverse(k_beta @ k_c.transpose(-1, -2) * gamma)  # reads the strictly lower triangle only
    u_c = t @ (beta_c * v_c)
    w_c = t @ (k_beta * b[..., None].exp())
    kd = k_c * sum_to_chunk_end(g_c)[..., None].exp()  # keys decayed to the chunk end
    decay = b[..., -1].exp()[..., None, None]  # (N, NC, 1, 1)

    s0 = _initial_state(initial_state, batch * heads, dk, dv, q_c)
    states, u, final = chunk_state_scan(u_c, kd, decay, s0, w_c)
    o_inter = (q_c * b[..., None].exp()) @ states  # reads the state entering the chunk
    scores = (q_c @ k_c.transpose(-1, -2)) * gamma
    o = torch.baddbmm(o_inter.flatten(0, 1), scores.flatten(0, 1), u.flatten(0, 1)).view_as(o_inter)
    o = from_chunks(o, batch, length).to(out_dtype)
    return o, (final.view(batch, heads, dk, dv) if output_final_state else None)
