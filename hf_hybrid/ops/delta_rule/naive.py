"""The delta rule with a decay (Gated DeltaNet's and Kimi Delta Attention's token mixer), the spec: one token
at a time.

Per value head, with the state S [Dk, Dv] (kept in fp32):

    S   <- Diag(exp(g_t)) S                g_t: log decay (<= 0), one value (GDN) or one per key channel (KDA)
    u_t  = beta_t * (v_t - Sᵀ k_t)         the delta rule writes only what S does not already predict
    S   <- S + k_t u_tᵀ                    = (I - beta_t k_t k_tᵀ) Diag(exp(g_t)) S + beta_t k_t v_tᵀ
    o_t  = Sᵀ (q_t * scale)                scale defaults to Dk^-0.5

The gated delta rule is the special case of one decay value shared by all Dk channels: g [*, Hv] (scalar) or
g [*, Hv, Dk] (per channel) picks the form. GVA: with Hv value heads and Hk q/k heads (Hv a multiple of Hk),
value head h reads q/k head h // (Hv // Hk), as in transformers' Qwen3-Next / Kimi Linear and fla-core.
``use_qk_l2norm`` L2-normalises q and k (``x / sqrt(Σx² + eps)``, eps 1e-6, fla's).
"""

from __future__ import annotations

import torch

from hf_hybrid.ops.simple_gla.naive import upcast
from hf_hybrid.ops.varlen import run_varlen

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(Σ x² + eps) over the last dim (fla-core's and transformers' definition)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., Hk, D] -> [..., heads, D]: each q/k head serves heads // Hk consecutive value heads."""
    groups = heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def check_delta_rule_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    token_dims: int = 2,
    *,
    per_channel: bool,
) -> None:
    """Raise a clear error unless q, k [*, Hk, Dk], v [*, Hv, Dv], beta [*, Hv] and g [*, Hv] (scalar decay)
    or [*, Hv, Dk] (``per_channel``) agree (Hv % Hk == 0).

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
    if per_channel and g.shape != (*lead, hv, dk):
        raise ValueError(
            f"g must be {(*lead, hv, dk)}, one log decay per "
            f"value head and key channel (got {tuple(g.shape)})"
        )
    if not per_channel and g.shape != (*lead, hv):
        raise ValueError(f"g must be {(*lead, hv)}, one value per value head (got {tuple(g.shape)})")
    if beta.shape != (*lead, hv):
        raise ValueError(f"beta must be {(*lead, hv)}, one value per value head (got {tuple(beta.shape)})")
    if initial_state is not None and initial_state.shape[1:] != (hv, dk, dv):
        raise ValueError(f"initial_state must be [N, {hv}, {dk}, {dv}] (got {tuple(initial_state.shape)})")


def check_gated_delta_shapes(q, k, v, g, beta, initial_state, token_dims: int = 2) -> None:
    """:func:`check_delta_rule_shapes` for the scalar decay (g [*, Hv])."""
    check_delta_rule_shapes(q, k, v, g, beta, initial_state, token_dims, per_channel=False)


def check_kda_shapes(q, k, v, g, beta, initial_state, token_dims: int = 2) -> None:
    """:func:`check_delta_rule_shapes` for the per-channel decay (g [*, Hv, Dk])."""
    check_delta_rule_shapes(q, k, v, g, beta, initial_state, token_dims, per_channel=True)


def recurrent_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step (no loop).

    q, k [B, Hk, Dk]; v [B, Hv, Dv]; g [B, Hv] (or [B, Hv, Dk] if ``per_channel``); beta [B, Hv]; state
    [B, Hv, Dk, Dv] or None (zeros). Returns (o [B, Hv, Dv] in q's dtype, new state [B, Hv, Dk, Dv] in fp32,
    or fp64 for fp64 inputs).
    """
    check_delta_rule_shapes(q, k, v, g, beta, state, token_dims=1, per_channel=per_channel)
    out_dtype = q.dtype
    heads = v.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (upcast(x) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = repeat_heads(q * scale, heads), repeat_heads(k, heads)  # (B, Hv, Dk)
    state = q.new_zeros(*q.shape, v.shape[-1]) if state is None else upcast(state)
    # (B, Hv, Dk, Dv): row d of S decays by exp(g_d), or all rows by exp(g)
    state = state * (g.exp()[..., None] if per_channel else g.exp()[..., None, None])
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, q)
    return o.to(out_dtype), state


def recurrent_gated_delta_rule_step(
    q, k, v, g, beta, state=None, *, scale=None, use_qk_l2norm=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrent_delta_rule_step` with a scalar decay: g [B, Hv]."""
    return recurrent_delta_rule_step(
        q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm, per_channel=False
    )


def recurrent_kda_step(
    q, k, v, g, beta, state=None, *, scale=None, use_qk_l2norm=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrent_delta_rule_step` with a per-channel decay: g [B, Hv, Dk]."""
    return recurrent_delta_rule_step(
        q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm, per_channel=True
    )


def naive_recurrent_delta_rule(
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
    """The delta rule by a per-token loop (the reference for every other path).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay, <= 0) [B, T, Hv] (or [B, T, Hv, Dk] if
    ``per_channel``); beta [B, T, Hv]; initial_state [N, Hv, Dk, Dv]; cu_seqlens [N + 1] packs N documents in
    one row (B == 1), else N == B. Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the
    fp32 state [N, Hv, Dk, Dv]. ``chunk_size`` is ignored (kept so every path has the same signature).
    """
    check_delta_rule_shapes(q, k, v, g, beta, initial_state, per_channel=per_channel)
    if cu_seqlens is not None:
        return run_varlen(
            naive_recurrent_delta_rule,
            (q, k, v, g, beta),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm,
            per_channel=per_channel,
        )
    state = initial_state
    outputs = []
    for t in range(q.shape[1]):
        o_t, state = recurrent_delta_rule_step(
            q[:, t],
            k[:, t],
            v[:, t],
            g[:, t],
            beta[:, t],
            state,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
            per_channel=per_channel,
        )
        outputs.append(o_t)
    if state is None:  # T == 0
        state = q.new_zeros(v.shape[0], v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).to(q.dtype)
    return o, (state if output_final_state else None)


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`naive_recurrent_delta_rule` with a scalar decay: g [B, T, Hv]."""
    return naive_recurrent_delta_rule(q, k, v, g, beta, per_channel=False, **kwargs)


def naive_recurrent_kda(q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`naive_recurrent_delta_rule` with a per-channel decay: g [B, T, Hv, Dk]."""
    return naive_recurrent_delta_rule(q, k, v, g, beta, per_channel=True, **kwargs)
