"""Gated delta rule (Gated DeltaNet), the spec: one token at a time.

Per value head, with the state S [Dk, Dv] (kept in fp32):

    S   <- exp(g_t) * S                    g_t: log decay (<= 0)
    u_t  = beta_t * (v_t - Sᵀ k_t)         the delta rule writes only what S does not already predict
    S   <- S + k_t u_tᵀ
    o_t  = Sᵀ (q_t * scale)                scale defaults to Dk^-0.5

GVA: with Hv value heads and Hk q/k heads (Hv a multiple of Hk), value head h reads q/k head h // (Hv // Hk),
as in transformers' Qwen3-Next and fla-core. ``use_qk_l2norm`` L2-normalises q and k (eps 1e-6, fla's).
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


def check_gated_delta_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    token_dims: int = 2,
) -> None:
    """Raise a clear error unless q, k [*, Hk, Dk], v [*, Hv, Dv], g, beta [*, Hv] agree (Hv % Hk == 0).

    ``*`` is [B, T] for sequence ops (``token_dims=2``) and [B] for one-step decode (``token_dims=1``).
    """
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
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (*lead, hv):
            raise ValueError(f"{name} must be {(*lead, hv)}, one value per value head (got {tuple(x.shape)})")
    if initial_state is not None and initial_state.shape[1:] != (hv, dk, dv):
        raise ValueError(f"initial_state must be [N, {hv}, {dk}, {dv}] (got {tuple(initial_state.shape)})")


def recurrent_gated_delta_rule_step(
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

    q, k [B, Hk, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; state [B, Hv, Dk, Dv] or None (zeros).
    Returns (o [B, Hv, Dv] in q's dtype, new state [B, Hv, Dk, Dv] in fp32, or fp64 for fp64 inputs).
    """
    check_gated_delta_shapes(q, k, v, g, beta, state, token_dims=1)
    out_dtype = q.dtype
    heads = v.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (upcast(x) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = repeat_heads(q * scale, heads), repeat_heads(k, heads)  # (B, Hv, Dk)
    state = q.new_zeros(*q.shape, v.shape[-1]) if state is None else upcast(state)
    state = state * g.exp()[..., None, None]  # (B, Hv, Dk, Dv)
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, q)
    return o.to(out_dtype), state


def naive_recurrent_gated_delta_rule(
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
    """Gated delta rule by a per-token loop (the reference for every other path).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay), beta [B, T, Hv]; initial_state [N, Hv, Dk, Dv];
    cu_seqlens [N + 1] packs N documents in one row (B == 1), else N == B.
    Returns o [B, T, Hv, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, Hv, Dk, Dv].
    ``chunk_size`` is ignored (kept so every path has the same signature).
    """
    check_gated_delta_shapes(q, k, v, g, beta, initial_state)
    if cu_seqlens is not None:
        return run_varlen(
            naive_recurrent_gated_delta_rule,
            (q, k, v, g, beta),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm,
        )
    return step_by_step(
        recurrent_gated_delta_rule_step,
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


def step_by_step(step, q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, output_final_state):
    """Run a delta-rule ``step`` (gated delta rule, KDA: the same signature) over every token of [B, T, ...]
    inputs; the loop of the naive references."""
    state = initial_state
    outputs = []
    for t in range(q.shape[1]):
        o_t, state = step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale=scale, use_qk_l2norm=use_qk_l2norm
        )
        outputs.append(o_t)
    if state is None:  # T == 0
        state = q.new_zeros(v.shape[0], v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).to(q.dtype)
    return o, (state if output_final_state else None)
