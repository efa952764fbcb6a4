"""Kimi Delta Attention (KDA, Kimi Linear's linear mixer), the spec: one token at a time.

The gated delta rule with a **per-channel** decay: per value head, with the state S [Dk, Dv] (kept in fp32),

    S   <- Diag(exp(g_t)) S                g_t [Dk]: log decay per key channel (<= 0)
    u_t  = beta_t * (v_t - Sᵀ k_t)         the delta rule writes only what S does not already predict
    S   <- S + k_t u_tᵀ                    i.e. S_t = (I - beta_t k_t k_tᵀ) Diag(alpha_t) S_{t-1} + beta_t k_t
    v_tᵀ o_t  = Sᵀ (q_t * scale)                scale defaults to Dk^-0.5

The gated delta rule (``hf_hybrid.ops.gated_delta``) is the special case of one decay value shared by all Dk
channels. GVA as there: value head h reads q/k head h // (Hv // Hk). ``use_qk_l2norm`` L2-normalises q and k
(``x / sqrt(Σx² + eps)``, eps 1e-6, as Kimi Linear and fla-core do).
"""

from __future__ import annotations

import torch

from hf_hybrid.ops.gated_delta.naive import l2norm, repeat_heads, step_by_step
from hf_hybrid.ops.simple_gla.naive import upcast
from hf_hybrid.ops.varlen import run_varlen


def check_kda_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    token_dims: int = 2,
) -> None:
    """Raise a clear error unless q, k [*, Hk, Dk], v [*, Hv, Dv], g [*, Hv, Dk], beta [*, Hv] agree.

    ``*`` is [B, T] for sequence ops (``token_dims=2``) and [B] for one-step decode (``token_dims=1``).
    """
    if q.dim() != token_dims + 2:
        raise ValueError(
            f"q must have {token_dims + 2} dims "
            f"({'[B, T, H, Dk]' if token_dims == 2 else '[B, H, Dk]'}); got {tuple(q.shape)}"
        )
    lead = q.shape[:token_dims]
    hk, dk = q.shape[token_dims:]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape (got {tuple(q.shape)} and {tuple(k.shape)})")
    if v.dim() != token_dims + 2 or v.shape[:token_dims] != lead:
        raise ValueError(
            f"v must be {(*lead, 'Hv', 'Dv')} to match q {tuple(q.shape)} (got {tuple(v.shape)})"
        )
    hv, dv = v.shape[token_dims:]
    if hv % hk != 0:
        raise ValueError(f"value heads ({hv}) must be a multiple of q/k heads ({hk}) for GVA")
    if g.shape != (*lead, hv, dk):
        raise ValueError(
            f"g must be {(*lead, hv, dk)}, one log decay per "
            f"value head and key channel (got {tuple(g.shape)})"
        )
    if beta.shape != (*lead, hv):
        raise ValueError(f"beta must be {(*lead, hv)}, one value per value head (got {tuple(beta.shape)})")
    if initial_state is not None and initial_state.shape[1:] != (hv, dk, dv):
        raise ValueError(f"initial_state must be [N, {hv}, {dk}, {dv}] (got {tuple(initial_state.shape)})")


def recurrent_kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step (no loop).

    q, k [B, Hk, Dk]; v [B, Hv, Dv]; g [B, Hv, Dk]; beta [B, Hv]; state [B, Hv, Dk, Dv] or None (zeros).
    Returns (o [B, Hv, Dv] in q's dtype, new state [B, Hv, Dk, Dv] in fp32, or fp64 for fp64 inputs).
    """
    check_kda_shapes(q, k, v, g, beta, state, token_dims=1)
    out_dtype = q.dtype
    heads = v.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (upcast(x) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = repeat_heads(q * scale, heads), repeat_heads(k, heads)  # (B, Hv, Dk)
    state = q.new_zeros(*q.shape, v.shape[-1]) if state is None else upcast(state)
    state = state * g.exp()[..., None]  # (B, Hv, Dk, Dv): row d of S decays by exp(g_d)
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, q)
    return o.to(out_dtype), state


def naive_recurrent_kda(
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
    """KDA by a per-token loop (the reference for every other path).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0) [B, T, Hv, Dk]; beta [B, T, Hv];
    initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1] packs N documents in one row (B == 1), else N == B.
    Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, Hv, Dk, Dv].
    ``chunk_size`` is ignored (kept so every path has the same signature).
    """
    check_kda_shapes(q, k, v, g, beta, initial_state)
    if cu_seqlens is not None:
        return run_varlen(
            naive_recurrent_kda,
            (q, k, v, g, beta),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm,
        )
    return step_by_step(
        recurrent_kda_step,
        q,
        k,
        v,
        g,
        beta,
        initial_state,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        output_final_state=output_final_state,
    )
