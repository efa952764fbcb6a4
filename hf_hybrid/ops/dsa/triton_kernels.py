"""Triton kernels for DSA sparse attention (forward + backward) and the indexer's logits.

Imported lazily (``hf_hybrid.ops.dsa`` works without triton). Tested on CPU under ``TRITON_INTERPRET=1``
in fp32/fp16 (the interpreter's bf16 ``tl.dot`` is wrong).

Sparse attention, one program per (query t, batch b, kv head, block of that kv group's query heads):
all heads of the group share the query's selection, so each gathered key/value block is loaded once and
multiplied against every head of the block ([BLOCK_G, D] × [D, BLOCK_K] on the tensor cores), which turns
MQA/latent-MLA (Hkv = 1, up to 128 heads) from a gather-bound loop into an MMA. Dqk is walked in BLOCK_D
slices, so Dqk = 576 (kv_lora 512 + rope 64) needs no padding to 1024; Dv is held whole in the forward
accumulator.

Backward, same grid: p is recomputed from the saved log-sum-exp, dQ is owned by the program (registers
when Dqk fits one slice, else read-modify-write of its own fp32 rows), dK/dV are scattered into the
selected keys with fp32 atomics (so the backward's dK/dV are not bitwise deterministic; keys selected
by many queries, e.g. the most recent ones, see the most contention).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .torch_ops import check_sparse_attention_inputs

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _d_block(d: int) -> int:
    """Slice width for a head dim: the whole dim (padded to a power of two) up to 128, else the largest
    power of two ≤ 128 dividing it (576 → 64, 512 → 128), else 64 with masking."""
    if d <= 128:
        return max(16, _pow2(d))
    for b in (128, 64, 32, 16):
        if d % b == 0:
            return b
    return 64


# fmt: off
@triton.jit
def _sparse_attn_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    s_qb, s_qt, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_ib, s_it,
    s_ob, s_ot, s_oh,
    s_lb, s_lt,
    NK, HKV, NUM_GB, scale_log2,
    G: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # fmt: on
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    gb = pid % NUM_GB
    kvh = (pid // NUM_GB) % HKV
    b = (pid // NUM_GB // HKV).to(tl.int64)

    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    heads = kvh * G + offs_g  # (BLOCK_G,) query heads of this kv group
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    q_rows = Q + b * s_qb + t * s_qt + heads[:, None] * s_qh  # (BLOCK_G, 1) row pointers
    k_head = K + b * s_kb + kvh * s_kh
    v_head = V + b * s_vb + kvh * s_vh
    idx_row = IDX + b * s_ib + t * s_it

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        sel = tl.load(idx_row + offs_k, mask=offs_k < NK, other=-1).to(tl.int64)
        valid = sel >= 0
        sel = tl.where(valid, sel, 0)
        # 1. s = q · kᵀ over Dqk slices, all heads of the block at once
        s = tl.zeros([BLOCK_G, BLOCK_K], tl.float32)
        for d0 in tl.static_range(0, DQK, BLOCK_D):
            d_mask = (d0 + offs_d) < DQK
            qb = tl.load(q_rows + d0 + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
            kb = tl.load(k_head + sel[:, None] * s_ks + d0 + offs_d[None, :],
                         mask=valid[:, None] & d_mask[None, :], other=0.0)
            s += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        # 2. online softmax; a row that has seen nothing yet keeps m = -inf and shifts by 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # 3. o += p · v
        vb = tl.load(v_head + sel[:, None] * s_vs + offs_dv[None, :], mask=valid[:, None] & dv_mask[None, :],
                     other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # nothing selected: o = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = OUT + b * s_ob + t * s_ot + heads[:, None] * s_oh + offs_dv[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=g_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + b * s_lb + t * s_lt + heads, lse, mask=g_mask)


# fmt: off
@triton.jit
def _sparse_attn_bwd_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
    s_qb, s_qt, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_ib, s_it,
    s_db, s_dt, s_dh,  # DO
    s_lb, s_lt,  # LSE and DELTA (same layout)
    s_dqb, s_dqt, s_dqh,
    s_dkb, s_dks, s_dkh,
    s_dvb, s_dvs, s_dvh,
    NK, HKV, NUM_GB, scale, scale_log2,
    G: tl.constexpr, DQK: tl.constexpr, DVD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # fmt: on
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    gb = pid % NUM_GB
    kvh = (pid // NUM_GB) % HKV
    b = (pid // NUM_GB // HKV).to(tl.int64)
    SINGLE_D: tl.constexpr = DQK <= BLOCK_D

    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = Q + b * s_qb + t * s_qt + heads[:, None] * s_qh
    do_rows = DO + b * s_db + t * s_dt + heads[:, None] * s_dh
    dq_rows = DQ + b * s_dqb + t * s_dqt + heads[:, None] * s_dqh
    k_head = K + b * s_kb + kvh * s_kh
    v_head = V + b * s_vb + kvh * s_vh
    dk_head = DK + b * s_dkb + kvh * s_dkh
    dv_head = DV + b * s_dvb + kvh * s_dvh
    idx_row = IDX + b * s_ib + t * s_it

    lse = tl.load(LSE + b * s_lb + t * s_lt + heads, mask=g_mask, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty selection (or padded head): p = 0
    delta = tl.load(DELTA + b * s_lb + t * s_lt + heads, mask=g_mask, other=0.0)
    dq_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        sel = tl.load(idx_row + offs_k, mask=offs_k < NK, other=-1).to(tl.int64)
        valid = sel >= 0
        sel = tl.where(valid, sel, 0)
        # 1. recompute p from the saved lse
        s = tl.zeros([BLOCK_G, BLOCK_K], tl.float32)
        for d0 in tl.static_range(0, DQK, BLOCK_D):
            d_mask = (d0 + offs_d) < DQK
            qb = tl.load(q_rows + d0 + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
            kb = tl.load(k_head + sel[:, None] * s_ks + d0 + offs_d[None, :],
                         mask=valid[:, None] & d_mask[None, :], other=0.0)
            s += tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        p = tl.exp2(s * scale_log2 - lse[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        # 2. dp = dO · vᵀ and dV += pᵀ · dO, over Dv slices
        dp = tl.zeros([BLOCK_G, BLOCK_K], tl.float32)
        for e0 in tl.static_range(0, DVD, BLOCK_DV):
            e_mask = (e0 + offs_dv) < DVD
            dob = tl.load(do_rows + e0 + offs_dv[None, :], mask=g_mask[:, None] & e_mask[None, :], other=0.0)
            vb = tl.load(v_head + sel[:, None] * s_vs + e0 + offs_dv[None, :],
                         mask=valid[:, None] & e_mask[None, :], other=0.0)
            dp += tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
            dvb = tl.dot(tl.trans(p.to(dob.dtype)), dob, input_precision=PRECISION)  # (BLOCK_K, BLOCK_DV)
            tl.atomic_add(dv_head + sel[:, None] * s_dvs + e0 + offs_dv[None, :], dvb,
                          mask=valid[:, None] & e_mask[None, :])
        # 3. ds = p ∘ (dp − δ) · scale; dQ += ds · k, dK += dsᵀ · q, over Dqk slices
        ds = p * (dp - delta[:, None]) * scale
        for d0 in tl.static_range(0, DQK, BLOCK_D):
            d_mask = (d0 + offs_d) < DQK
            qb = tl.load(q_rows + d0 + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
            kb = tl.load(k_head + sel[:, None] * s_ks + d0 + offs_d[None, :],
                         mask=valid[:, None] & d_mask[None, :], other=0.0)
            dkb = tl.dot(tl.trans(ds.to(qb.dtype)), qb, input_precision=PRECISION)  # (BLOCK_K, BLOCK_D)
            tl.atomic_add(dk_head + sel[:, None] * s_dks + d0 + offs_d[None, :], dkb,
                          mask=valid[:, None] & d_mask[None, :])
            dqb = tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)  # (BLOCK_G, BLOCK_D)
            if SINGLE_D:
                dq_acc += dqb
            else:  # this program owns these dQ rows: a plain read-modify-write, no atomics
                dq_ptrs = dq_rows + d0 + offs_d[None, :]
                dq_m = g_mask[:, None] & d_mask[None, :]
                tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_m, other=0.0) + dqb, mask=dq_m)
    if SINGLE_D:
        tl.store(dq_rows + offs_d[None, :], dq_acc, mask=g_mask[:, None] & (offs_d < DQK)[None, :])


def _launch_shape(H: int, Hkv: int) -> tuple[int, int, int]:
    """(G, BLOCK_G, NUM_GB): heads per kv group, heads per program (≥ 16 for tl.dot, ≤ 64), blocks per
    group."""
    G = H // Hkv
    block_g = max(16, min(64, _pow2(G)))
    return G, block_g, triton.cdiv(G, block_g)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (the default would be TF32 on GPUs)
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    # only picks block sizes: the interpreter pays per block step, a GPU pays for registers
    return bool(triton.knobs.runtime.interpret)


def sparse_attention_fwd_triton(q, k, v, idx, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel launch: o [B, T, H, Dv] (q's dtype), lse [B, T, H] fp32 (natural log)."""
    B, T, H, Dqk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = idx.contiguous()
    o = q.new_empty(B, T, H, Dv)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    G, block_g, num_gb = _launch_shape(H, Hkv)
    block_d = _d_block(Dqk)
    block_dv = max(16, _pow2(Dv))
    # interpreter: few, large blocks (each block step is Python overhead)
    block_k = 64 if _interpreting() else (16 if block_dv >= 512 else 32)
    grid = (T, B * Hkv * num_gb)
    _sparse_attn_fwd_kernel[grid](
        q, k, v, idx, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        idx.shape[-1], Hkv, num_gb, scale * _LOG2E,
        G=G, DQK=Dqk, DV=Dv,
        BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=_precision(q.dtype),
        num_warps=8 if block_dv >= 256 or block_g >= 64 else 4,
    )  # fmt: skip
    return o, lse


def sparse_attention_bwd_triton(q, k, v, idx, o, lse, do, dlse, scale: float):
    """Backward kernel launch: (dq, dk, dv) in the inputs' dtypes."""
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    do = do.to(q.dtype)
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    # δ = Σ_d dO·O − dlse: the second term is the gradient of a returned lse
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    G, block_g, num_gb = _launch_shape(H, Hkv)
    block_d = _d_block(Dqk)
    block_dv = _d_block(Dv)
    single_d = Dqk <= block_d
    dq = (torch.empty if single_d else torch.zeros)(B, T, H, Dqk, device=q.device, dtype=torch.float32)
    dk = torch.zeros(B, S, Hkv, Dqk, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, S, Hkv, Dv, device=q.device, dtype=torch.float32)
    block_k = 64 if _interpreting() else 32
    grid = (T, B * Hkv * num_gb)
    _sparse_attn_bwd_kernel[grid](
        q, k, v, idx, do, lse, delta, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        idx.shape[-1], Hkv, num_gb, scale, scale * _LOG2E,
        G=G, DQK=Dqk, DVD=Dv,
        BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=_precision(q.dtype),
        num_warps=8 if block_g >= 64 else 4,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionTriton(torch.autograd.Function):
    """(q, k, v, idx, scale) -> (o, lse); both outputs differentiable w.r.t. q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale: float):
        o, lse = sparse_attention_fwd_triton(q, k, v, idx, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd_triton(q, k, v, idx, o, lse, do, dlse, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton sparse attention; same contract as ``sparse_attention_naive`` / ``sparse_attention_torch``.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K] -> o [B, T, H, Dv]
    (+ lse [B, T, H] fp32). GQA (Hkv ≥ 1) and MQA/latent MLA (Hkv = 1, Dqk ≠ Dv, e.g. 576/512).
    """
    check_sparse_attention_inputs(q, k, v, idx)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "Triton sparse attention needs q, k, v of one dtype "
            f"(fp32, fp16, bf16); got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    o, lse = SparseAttentionTriton.apply(q, k, v, idx, float(scale))
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------------------
# indexer logits: Σ_h w[t,h] · ReLU(q_I[t,h] · k_I[s]) without the [Tc, HI, Sc] intermediate


# fmt: off
@triton.jit
def _indexer_logits_kernel(
    QI, KI, W, OUT,
    s_qb, s_qt, s_qh,
    s_kb, s_ks,
    s_wb, s_wt,
    s_ob, s_ot,
    TC, SC,
    HI: tl.constexpr, DI: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # fmt: on
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DI)
    t_mask = offs_t < TC
    s_mask = offs_s < SC
    d_mask = offs_d < DI
    # the key tile is shared by every indexer head: load it once
    kb = tl.load(KI + b * s_kb + offs_s[:, None].to(tl.int64) * s_ks + offs_d[None, :],
                 mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    q_rows = QI + b * s_qb + offs_t[:, None].to(tl.int64) * s_qt + offs_d[None, :]
    w_rows = W + b * s_wb + offs_t.to(tl.int64) * s_wt
    acc = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    for h in range(HI):
        qb = tl.load(q_rows + h * s_qh, mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        z = tl.dot(qb, tl.trans(kb), input_precision=PRECISION)
        wh = tl.load(w_rows + h, mask=t_mask, other=0.0).to(tl.float32)
        acc += wh[:, None] * tl.maximum(z, 0.0)
    out = OUT + b * s_ob + offs_t[:, None].to(tl.int64) * s_ot + offs_s[None, :]
    tl.store(out, acc, mask=t_mask[:, None] & s_mask[None, :])


def indexer_logits_block_triton(q_I: torch.Tensor, k_I: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Raw indexer logits for a block: q_I [B, Tc, HI, DI], k_I [B, Sc, DI], w [B, Tc, HI] -> [B, Tc, Sc]
    fp32.

    Same contract as ``indexer._indexer_logits_block`` (the torch twin); no gradient.
    """
    B, Tc, HI, DI = q_I.shape
    Sc = k_I.shape[1]
    q_I = q_I if q_I.stride(-1) == 1 else q_I.contiguous()
    k_I = k_I if k_I.stride(-1) == 1 else k_I.contiguous()
    k_I = k_I.to(q_I.dtype)
    w = w if w.stride(-1) == 1 else w.contiguous()
    out = torch.empty(B, Tc, Sc, device=q_I.device, dtype=torch.float32)
    block_di = max(16, _pow2(DI))
    if _interpreting():
        block_t, block_s = 32, 64
    else:
        block_t, block_s = (64, 64) if block_di <= 128 else (32, 64)
    grid = (triton.cdiv(Sc, block_s), triton.cdiv(Tc, block_t), B)
    _indexer_logits_kernel[grid](
        q_I, k_I, w, out,
        q_I.stride(0), q_I.stride(1), q_I.stride(2),
        k_I.stride(0), k_I.stride(1),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1),
        Tc, Sc,
        HI=HI, DI=DI, BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_DI=block_di,
        PRECISION=_precision(q_I.dtype),
        num_warps=4,
    )  # fmt: skip
    return out
