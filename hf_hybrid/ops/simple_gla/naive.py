"""Simple GLA, the spec: one token at a time.

Per head, with the state S [Dk, Dv] (kept in fp32):

    S_t = exp(g_t) * S_{t-1} + k_t v_tᵀ          g_t: log decay (<= 0), a scalar per head
    o_t = S_tᵀ (q_t * scale)

``g = None`` is plain (causal) linear attention. A per-channel ``g`` [B, T, H, Dk] decays each key channel
separately (the GLA family): ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_tᵀ``.
Mamba-2 (SSD) is this op with q = C, k = B, v = Δ·x, g = Δ·A, scale = 1.
"""

from __future__ import annotations

import torch

from hf_hybrid.ops.varlen import run_varlen


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for 16/32-bit floats, fp64 kept (the recurrent ops compute in fp32 at least; fp64 tests the
    math)."""
    return x if x.dtype == torch.float64 else x.float()


def check_simple_gla_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    token_dims: int = 2,
) -> None:
    """Raise a clear error unless q, k [*, H, Dk], v [*, H, Dv], g [*, H] or [*, H, Dk] agree.

    ``*`` is [B, T] for sequence ops (``token_dims=2``) and [B] for one-step decode (``token_dims=1``).
    """
    lead = q.shape[:token_dims]
    heads, dk = q.shape[token_dims:]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape (got {tuple(q.shape)} and {tuple(k.shape)})")
    if v.dim() != token_dims + 2 or v.shape[: token_dims + 1] != (*lead, heads):
        raise ValueError(f"v must be {(*lead, heads, 'Dv')} to match q (got {tuple(v.shape)})")
    if g is not None and g.shape not in ((*lead, heads), (*lead, heads, dk)):
        raise ValueError(f"g must be {(*lead, heads)} or {(*lead, heads, dk)} (got {tuple(g.shape)})")
    if initial_state is not None and initial_state.shape[1:] != (heads, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [N, {heads}, {dk}, {v.shape[-1]}] (got {tuple(initial_state.shape)})"
        )


def recurrent_simple_gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step.

    q, k [B, H, Dk]; v [B, H, Dv]; g [B, H] or [B, H, Dk] or None; state [B, H, Dk, Dv] or None (zeros).
    Returns (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] in fp32, or fp64 for fp64 inputs).
    """
    check_simple_gla_shapes(q, k, v, g, state, token_dims=1)
    out_dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = upcast(q) * scale, upcast(k), upcast(v)
    state = q.new_zeros(*q.shape, v.shape[-1]) if state is None else upcast(state)
    if g is not None:
        decay = upcast(g).exp()
        # scalar decay scales the whole [Dk, Dv] state; per-channel decay scales its rows
        state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    state = state + k[..., :, None] * v[..., None, :]  # (B, H, Dk, Dv)
    o = torch.einsum("bhkv,bhk->bhv", state, q)
    return o.to(out_dtype), state


def naive_recurrent_simple_gla(
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
    """Simple GLA by a per-token loop (the reference for every other path).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; g [B, T, H] (or [B, T, H, Dk], or None = no decay);
    initial_state [N, H, Dk, Dv]; cu_seqlens [N + 1] packs N documents in one row (B == 1), else N == B.
    Returns o [B, T, H, Dv] in q's dtype and, if ``output_final_state``, the fp32 state [N, H, Dk, Dv].
    ``chunk_size`` is ignored (kept so every path has the same signature).
    """
    check_simple_gla_shapes(q, k, v, g, initial_state)
    if cu_seqlens is not None:
        return run_varlen(
            naive_recurrent_simple_gla,
            (q, k, v, g),
            cu_seqlens,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    state = initial_state
    outputs = []
    for t in range(q.shape[1]):
        o_t, state = recurrent_simple_gla_step(
            q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state, scale=scale
        )
        outputs.append(o_t)
    if state is None:  # T == 0
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=torch.float32)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).to(q.dtype)
    return o, (state if output_final_state else None)
