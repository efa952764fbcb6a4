"""Dense attention → multi-head latent attention (MLA) by weight surgery (MHA2MLA, TransMLA, X-EcoMLA).

    hf-hybrid mla SRC DST --lossless
    hf-hybrid mla SRC DST --kv-lora-rank 64 --rope-dims 16 [--rope-select uniform|frequency|norm]
                  [--rope-keys per_kv_head|shared] [--factorization joint|separate] [--activation-aware]
                  [--q-lora-rank 96] [--latent-norm] [--layers 0,2] [--calibration-blocks 8]

``SRC`` is an hf_hybrid checkpoint or a dense Llama / Qwen2 / Qwen3 / Mistral one (imported on the way). The
chosen full ``attention`` layers become ``mla`` layers (``hf_hybrid/mixers/mla.py``); every other tensor is
copied bit for bit, so a hybridized model's remaining attention layers convert too.

Legend: ``H`` query heads, ``G`` kv heads, ``d`` head dim, ``D`` hidden size; ``dr`` rotary channels kept per
head (``rope_dims``), ``dn = d - dr``; ``r`` = ``kv_lora_rank``. RoPE is rotate-half: pair ``i`` is channels
``(i, i + d/2)`` and turns at frequency ``f_i``.

What the source attention computes, per query head ``h`` of group ``g``: ``s · q_h·k_g`` with RoPE on all
``d`` channels, values ``v_g``. The MLA layer computes ``s' · (q_nope·k_nope + q_pe·k_pe)`` with RoPE on the
``pe`` parts only and ``[k_nope, v]`` expanded per head from the latent ``c = kv_a(x)`` by ``kv_b``. So:

1. **positions** (``rope_dims``, ``rope_select``): the pairs kept rotary become the ``pe`` channels, the
   others ``nope`` channels (their RoPE is dropped: exact only at relative distance 0). The kept pairs keep
   their source frequencies (``HybridConfig.mla_rope_pairs``; ``None`` — the layout DeepSeek's exports
   need — when the RoPE table of size dr gives them: ``uniform`` with power-of-two sizes as it is,
   ``frequency`` with ``rope_theta^(dr/d)`` once no attention layer remains, :func:`rope_layout`).
   ``uniform``: every ``d/dr``-th pair (MHA2MLA's S_uniform); ``frequency``: the ``dr/2`` fastest (S_high);
   ``norm``: the pairs with the largest ``‖q_i‖·‖k_i‖`` summed over heads and layers on calibration text
   (S_2-norm; one set for the whole model, since the RoPE table is one config field).
2. **rope keys** (``rope_keys``): ``per_kv_head`` keeps one rope key per kv head (``mla_rope_heads = G``;
   MHA2MLA's layout; cache ``r + G·dr`` per token) — exact for the kept pairs. ``shared`` builds DeepSeek's
   single rope key (``mla_rope_heads = 1``, cache ``r + dr``; what ``deepseek_v3`` / ``deepseek_v32``
   exports need): for each kept pair, the G heads' keys are mixed by the unit vector ``u`` of their largest
   principal component (TransMLA's idea: RoPE turns every head's pair by the same angle, so a mix across
   heads commutes with it), ``k_pe = Σ_g u_g k_g``, ``q_pe,h = u_g q_h``; exact when ``G = 1`` or the kv
   heads' keys of that pair are parallel, otherwise the residual off ``u`` is dropped.
3. **key/value latent** (``kv_lora_rank``, ``factorization``, ``activation_aware``): ``A = [K_nope; V]``
   (``G·(dn + d)`` rows) is factorised ``A ≈ U_r (U_rᵀ A)``: ``kv_a`` gets ``U_rᵀ A``, ``kv_b`` gets the rows
   of ``U_r`` of each head's group. ``joint``: one SVD of ``A``; ``separate``: K and V each their own
   (rank split in proportion to their rows). ``activation_aware``: ``U_r`` from the SVD of ``A Σ^½`` with
   ``Σ = E[x xᵀ]`` on calibration text (minimises ``E‖A x - U Uᵀ A x‖²`` instead of ``‖A - U Uᵀ A‖_F``).
   At ``r = G·(dn + d)`` the factor is the identity (no SVD): exact.
4. **queries** (``q_lora_rank``): ``None`` keeps ``q_proj`` (full rank); a rank factorises the query matrix
   the same way into ``q_a_proj`` / ``q_b_proj``.
5. **latent norms** (``latent_norm``): DeepSeek's ``q_a_layernorm`` / ``kv_a_layernorm`` divide each latent by
   its RMS, which no linear map undoes; ``False`` (default) leaves them out (``mla_latent_norm=False``).
   ``True`` (needed for the DeepSeek exports) sets their weight to the latent's expected RMS (calibration, or
   ``Σ = diag(γ²)`` of the input norm weight ``γ``): right on average, not per token — heal it.
6. the softmax scale: the source's ``s`` is folded into the query rows (``s / s'``).

**Identity** (``lossless=True``, ``--lossless``): every pair rotary (``dn = 0``, ``dr = d``), one rope key per
kv head, full rank (``r = G·d``), no q latent, no latent norms: the MLA layer computes the source's function
(tests: fp32 logits within 1e-5 on a left-padded batch and in cached decode) and caches as much as the source.
Every compression setting above is a stated approximation of that start; heal it with
``hf_hybrid.distill`` (``recipes/mla``).

Refused before anything is written (naming the option, the value and what is allowed): sliding-window layers,
attention biases (Qwen2), per-head q/k norms (Qwen3: not linear, so the keys cannot live in a linear latent),
q/k/v clipping, output gates, partial RoPE in the source, ranks larger than the matrices they factorise, layer
indices out of range.

Lineage: ``config.hf_hybrid_lineage`` (``recipe: "mla"``, the options, ``exact_start``) and so the model card.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..configuration_hybrid import HybridConfig
from ..layers import rope_inv_freq
from .checkpoint import as_dtype, check_dst, check_layer_indices, rebuild_model, write_checkpoint
from .source import derived_lineage, load_source, source_config

ROPE_SELECT = ("uniform", "frequency", "norm")
ROPE_KEYS = ("per_kv_head", "shared")
FACTORIZATIONS = ("joint", "separate")
LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm eps (what its exports need)


# ------------------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class MLAOptions:
    """What ``mla`` does; :meth:`validate` checks the options alone, :func:`check_mla` against a source."""

    kv_lora_rank: int | None = None  # None: full rank G·(dn + d)
    rope_dims: int | None = None  # rotary channels kept per head (even); None: all d
    rope_select: str = "uniform"
    rope_keys: str = "per_kv_head"
    factorization: str = "joint"
    activation_aware: bool = False
    q_lora_rank: int | None = None  # None: q_proj kept full
    latent_norm: bool = False
    layers: tuple[int, ...] | None = None  # None: every full attention layer
    lossless: bool = False

    def validate(self) -> None:
        for name in ("kv_lora_rank", "rope_dims", "q_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"mla: {name}={value!r} must be a positive integer or None")
        if self.rope_dims is not None and self.rope_dims % 2:
            raise ValueError(f"mla: rope_dims={self.rope_dims} must be even (RoPE turns channel pairs)")
        for name, choices in (
            ("rope_select", ROPE_SELECT),
            ("rope_keys", ROPE_KEYS),
            ("factorization", FACTORIZATIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"mla: {name}={getattr(self, name)!r} is not known; choose one of: {', '.join(choices)}"
                )
        if self.layers is not None:
            if not self.layers:
                raise ValueError("mla: layers is empty; give layer indices or None for every attention layer")
        if self.lossless:
            lossy = {
                k: v
                for k, v in (
                    ("kv_lora_rank", self.kv_lora_rank),
                    ("rope_dims", self.rope_dims),
                    ("q_lora_rank", self.q_lora_rank),
                    ("latent_norm", self.latent_norm or None),
                    ("activation_aware", self.activation_aware or None),
                    ("rope_keys", None if self.rope_keys == "per_kv_head" else self.rope_keys),
                )
                if v is not None
            }
            if lossy:
                raise ValueError(
                    "mla: lossless=True fixes every rank and layout (full rank, all RoPE pairs, one rope "
                    "key per kv head, no latent norms); drop "
                    + ", ".join(f"{k}={v!r}" for k, v in lossy.items())
                )

    @property
    def needs_calibration(self) -> bool:
        return self.rope_select == "norm" or self.activation_aware

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


@dataclass(frozen=True)
class MLAPlan:
    """The geometry one set of options gives on one source (every converted layer shares it)."""

    layers: list[int]
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # d
    rope_dims: int  # dr
    rope_heads: int  # R: G (per_kv_head) or 1 (shared)
    kv_lora_rank: int  # r
    k_rank: int  # separate: the rank of K_nope's factor (the rest is V's); joint: 0
    q_lora_rank: int | None
    rope_pairs: list[int] | None  # None until the pairs are chosen (norm selection needs calibration)

    @property
    def nope_dims(self) -> int:
        return self.head_dim - self.rope_dims

    @property
    def kv_rows(self) -> tuple[int, int]:
        """Rows of K_nope and V stacked over kv heads."""
        return self.kv_heads * self.nope_dims, self.kv_heads * self.head_dim


def check_mla(config: HybridConfig, opts: MLAOptions) -> MLAPlan:
    """Validate ``opts`` against ``config``; return the plan. Raises ``ValueError``; writes nothing."""
    opts.validate()
    types = list(config.mixer_types)
    n = len(types)
    attention = [i for i, t in enumerate(types) if t == "attention"]
    if opts.layers is None:
        if not attention:
            sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
            extra = f" (layers {sliding} are sliding-window attention)" if sliding else ""
            raise ValueError(
                f"mla: the source has no full attention layers to convert (mixer_types={types}){extra}"
            )
        layers = attention
    else:
        layers = check_layer_indices(opts.layers, n, what="mla: layers")
        wrong = [(i, types[i]) for i in layers if types[i] != "attention"]
        if wrong:
            raise ValueError(
                "mla: layers must be full 'attention' layers; "
                + ", ".join(f"layer {i} is {t!r}" for i, t in wrong)
                + (
                    f" (sliding_window={config.sliding_window}: MLA attends over the whole causal past)"
                    if any(t == "sliding_attention" for _, t in wrong)
                    else ""
                )
                + f"; convertible layers: {attention}"
            )
    if "mla" in types or "dsa" in types:
        have = [i for i, t in enumerate(types) if t in ("mla", "dsa")]
        raise ValueError(
            f"mla: the source already has MLA/DSA layers ({have}); the MLA sizes are global in "
            "HybridConfig, so mla starts from a model without them"
        )
    refusals = (
        (
            "attention_bias",
            config.attention_bias,
            False,
            "q/k/v biases have no place in MLA's query projection",
        ),
        ("use_qk_norm", config.use_qk_norm, False, "per-head q/k RMSNorm is not linear in x"),
        ("clip_qkv", config.clip_qkv, None, "clipping is not linear in x"),
        ("attention_output_gate", config.attention_output_gate, False, "MLA has no output gate"),
        ("attention_rope", config.attention_rope, True, "the source must use RoPE"),
    )
    for name, value, allowed, why in refusals:
        if value != allowed:
            raise ValueError(
                f"mla: HybridConfig.{name}={value!r} cannot be converted ({why}); allowed: {allowed}"
            )
    prf = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise ValueError(
            f"mla: rope_parameters['partial_rotary_factor']={prf} (partial RoPE in the source) is not "
            "supported; allowed: 1.0"
        )
    H, G, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    dr = d if opts.rope_dims is None else opts.rope_dims
    if dr > d:
        raise ValueError(f"mla: rope_dims={dr} is larger than head_dim={d}; allowed: even values in [2, {d}]")
    if opts.rope_select == "uniform" and (d // 2) % (dr // 2):
        raise ValueError(
            f"mla: rope_select='uniform' takes every (d/dr)-th pair, so rope_dims={dr} must divide "
            f"head_dim={d} into whole strides; allowed: "
            f"{[2 * k for k in range(1, d // 2 + 1) if (d // 2) % k == 0]}"
        )
    if opts.lossless:
        dr = d
    dn = d - dr
    rope_heads = 1 if opts.rope_keys == "shared" else G
    k_rows, v_rows = G * dn, G * d
    k_max, v_max = min(k_rows, D), min(v_rows, D)
    if opts.factorization == "joint":
        r_max = min(k_rows + v_rows, D)
    else:
        r_max = k_max + v_max
    r = r_max if opts.kv_lora_rank is None else opts.kv_lora_rank
    if r > r_max:
        raise ValueError(
            f"mla: kv_lora_rank={r} is larger than possible: the latent factorises [K_nope; V] of "
            f"{k_rows} + {v_rows} rows and hidden size {D} ({opts.factorization}); allowed: 1..{r_max}"
        )
    k_rank = 0
    if opts.factorization == "separate":
        k_rank = min(k_max, max(0 if k_rows == 0 else 1, round(r * k_rows / (k_rows + v_rows))))
        k_rank = max(k_rank, r - v_max)
        if r >= 2 and r - k_rank < 1:  # V keeps at least one direction whenever K does
            k_rank = r - 1
    q_rows = H * d
    if opts.q_lora_rank is not None and opts.q_lora_rank > min(q_rows, D):
        raise ValueError(
            f"mla: q_lora_rank={opts.q_lora_rank} is larger than possible: the query matrix is "
            f"{q_rows} × {D}; allowed: 1..{min(q_rows, D)} or None (q_proj kept full)"
        )
    pairs = None
    if opts.rope_select != "norm" or opts.lossless:
        pairs = fixed_rope_pairs(d, dr, "uniform" if opts.lossless else opts.rope_select)
    return MLAPlan(layers, H, G, d, dr, rope_heads, r, k_rank, opts.q_lora_rank, pairs)


def fixed_rope_pairs(d: int, dr: int, select: str) -> list[int]:
    """The kept pairs for the selections that need no data: ``uniform`` (stride d/dr) or ``frequency`` (the
    fastest: pairs 0..dr/2-1)."""
    if select == "uniform":
        return list(range(0, d // 2, (d // 2) // (dr // 2)))[: dr // 2]
    return list(range(dr // 2))


# ------------------------------------------------------------------------------------------------------------
# calibration


def calibration_covariances(model, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """``Σ = E[x xᵀ]`` [D, D] (fp64) of the attention inputs (after the layer's input norm) of ``layers`` over
    every token of ``input_ids`` [N, T] (unpadded blocks)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    hooks = []

    def hook_for(i: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[i] = sums.get(i, 0) + x.T @ x
            counts[i] = counts.get(i, 0) + x.shape[0]

        return hook

    for i in layers:
        hooks.append(model.model.layers[i].mixer.register_forward_pre_hook(hook_for(i)))
    try:
        with torch.no_grad():
            for row in input_ids:
                model(row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: sums[i] / counts[i] for i in layers}


def default_covariance(model, i: int) -> torch.Tensor:
    """``diag(γ²)``: the attention input of an isotropic unit-RMS stream after the input norm weight γ."""
    gamma = model.model.layers[i].input_layernorm.weight.detach().double()
    return torch.diag(gamma * gamma)


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(sigma)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


# ------------------------------------------------------------------------------------------------------------
# per-layer surgery


def _pair_channels(pairs: list[int], d: int) -> torch.Tensor:
    p = torch.tensor(pairs, dtype=torch.long)
    return torch.cat([p, p + d // 2])


def norm_rope_pairs(
    weights: dict[int, dict[str, torch.Tensor]], covs: dict[int, torch.Tensor], plan
) -> list[int]:
    """MHA2MLA's 2-norm selection: the dr/2 pairs with the largest ``Σ_layers Σ_h ‖q_h,i‖·‖k_g,i‖`` (RMS over
    calibration tokens)."""
    d, H, G = plan.head_dim, plan.heads, plan.kv_heads
    score = torch.zeros(d // 2, dtype=torch.float64)
    for i, w in weights.items():
        sigma = covs[i]

        def pair_norms(W: torch.Tensor, sigma: torch.Tensor = sigma) -> torch.Tensor:  # -> [heads, d/2]
            energy = torch.einsum("hcD,DE,hcE->hc", W, sigma, W).clamp(min=0)
            return (energy[:, : d // 2] + energy[:, d // 2 :]).sqrt()

        qn, kn = pair_norms(w["q"]), pair_norms(w["k"])
        score += (qn * kn.repeat_interleave(H // G, dim=0)).sum(0)
    top = torch.topk(score, plan.rope_dims // 2).indices
    return sorted(top.tolist())


def _low_rank(
    A: torch.Tensor, rank: int, sqrt_sigma: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A ≈ U (Uᵀ A)`` with ``U`` [rows, rank] orthonormal; identity factor at ``rank == rows``."""
    rows = A.shape[0]
    if rank == 0 or rows == 0:
        return A.new_zeros(rows, rank), A.new_zeros(rank, A.shape[1])
    if rank == rows:
        return torch.eye(rows, dtype=A.dtype), A.clone()
    U, _, _ = torch.linalg.svd(A if sqrt_sigma is None else A @ sqrt_sigma, full_matrices=False)
    U = U[:, :rank]
    return U, U.T @ A


def convert_layer(
    w: dict[str, torch.Tensor],
    plan: MLAPlan,
    opts: MLAOptions,
    *,
    sigma: torch.Tensor,
    alpha: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MLA tensors (fp64) of one attention layer ``w`` = {q [H, d, D], k [G, d, D], v [G, d, D],
    o [D, H·d]}, and a few numbers about the approximation (relative errors of the factorisations)."""
    H, G, d = plan.heads, plan.kv_heads, plan.head_dim
    dr, dn, group = plan.rope_dims, plan.nope_dims, plan.heads // plan.kv_heads
    pe = _pair_channels(plan.rope_pairs, d)
    nope = torch.tensor(sorted(set(range(d)) - set(pe.tolist())), dtype=torch.long)
    q, k, v = w["q"], w["k"], w["v"]
    stats: dict[str, Any] = {}

    q_nope = q[:, nope]  # (H, dn, D)
    q_pe = q[:, pe]  # (H, dr, D)
    if plan.rope_heads == G:
        k_pe = k[:, pe].reshape(G * dr, k.shape[-1])
    else:  # one shared rope key: per kept pair, the top principal direction u over the kv heads
        k_pe = torch.empty(dr, k.shape[-1], dtype=k.dtype)
        q_pe = q_pe.clone()
        lost = kept = 0.0
        half = dr // 2
        for j in range(half):
            cols = [j, j + half]  # the pair's two channels in the pe layout
            kp = k[:, pe[cols]]  # (G, 2, D)
            M = torch.einsum("gcD,DE,hcE->gh", kp, sigma, kp)  # (G, G)
            vals, vecs = torch.linalg.eigh(M)
            u = vecs[:, -1] * (1.0 if vecs[:, -1].sum() >= 0 else -1.0)
            k_pe[cols] = torch.einsum("g,gcD->cD", u, kp)
            q_pe[:, cols] = q_pe[:, cols] * u.repeat_interleave(group)[:, None, None]
            kept += float(vals[-1])
            lost += float(vals[:-1].clamp(min=0).sum())
        stats["shared_rope_key_energy_lost"] = lost / max(kept + lost, 1e-30)
    D = q.shape[-1]
    q_full = torch.cat([q_nope, q_pe], dim=1).reshape(H * (dn + dr), D) * alpha

    a_k = k[:, nope].reshape(G * dn, D)
    a_v = v.reshape(G * d, D)
    sqrt_sigma = _psd_sqrt(sigma) if opts.activation_aware else None
    if opts.factorization == "joint":
        B, C = _low_rank(torch.cat([a_k, a_v]), plan.kv_lora_rank, sqrt_sigma)
        b_k, b_v = B[: G * dn], B[G * dn :]
    else:
        r_k = plan.k_rank
        Bk, Ck = _low_rank(a_k, r_k, sqrt_sigma)
        Bv, Cv = _low_rank(a_v, plan.kv_lora_rank - r_k, sqrt_sigma)
        C = torch.cat([Ck, Cv])
        b_k = torch.cat([Bk, Bk.new_zeros(Bk.shape[0], Cv.shape[0])], dim=1)
        b_v = torch.cat([Bv.new_zeros(Bv.shape[0], Ck.shape[0]), Bv], dim=1)
    r = plan.kv_lora_rank
    # kv_b rows per head: [k_nope (dn); v (d)] of the head's kv group
    kv_b = torch.cat([b_k.view(G, dn, r), b_v.view(G, d, r)], dim=1).repeat_interleave(group, dim=0)
    for name, A, Bm in (("k", a_k, b_k), ("v", a_v, b_v)):
        if A.shape[0]:
            err = ((A - Bm @ C) @ _psd_sqrt(sigma)).norm() / (A @ _psd_sqrt(sigma)).norm().clamp(min=1e-30)
            stats[f"{name}_rel_error"] = float(err)

    out = {
        "kv_a_proj_with_mqa.weight": torch.cat([C, k_pe]),
        "kv_b_proj.weight": kv_b.reshape(H * (dn + d), r),
        "o_proj.weight": w["o"].clone(),
    }
    if opts.latent_norm:
        out["kv_a_layernorm.weight"] = _latent_rms(C, sigma).expand(r).clone()
    if plan.q_lora_rank is None:
        out["q_proj.weight"] = q_full
    else:
        Bq, Cq = _low_rank(q_full, plan.q_lora_rank, sqrt_sigma)
        out["q_a_proj.weight"], out["q_b_proj.weight"] = Cq, Bq
        if opts.latent_norm:
            out["q_a_layernorm.weight"] = _latent_rms(Cq, sigma).expand(plan.q_lora_rank).clone()
            # q_b then sees the unit-RMS latent times this weight; nothing else changes
        err = ((q_full - Bq @ Cq) @ _psd_sqrt(sigma)).norm() / (q_full @ _psd_sqrt(sigma)).norm()
        stats["q_rel_error"] = float(err)
    return out, stats


def _latent_rms(C: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(E‖C x‖² / rows): the RMS the latent norm divides by, on average; its weight restores it."""
    return (torch.einsum("rD,DE,rE->", C, sigma, C) / C.shape[0]).clamp(min=1e-12).sqrt().reshape(1)


# ------------------------------------------------------------------------------------------------------------
# config and model


def mla_config(config: HybridConfig, plan: MLAPlan, opts: MLAOptions) -> HybridConfig:
    """``config`` with ``plan.layers`` as MLA layers (a new object; lineage is left to the caller)."""
    d = config.to_dict()
    d.pop("layer_types", None)
    mixer_types = ["mla" if i in plan.layers else t for i, t in enumerate(config.mixer_types)]
    rope, pairs = rope_layout(config, plan, mixer_types)
    if rope is not None:
        d["rope_parameters"] = rope
    multipliers = config.attention_logit_multipliers
    if multipliers is not None:  # the converted layers carry theirs in their query weights (alpha)
        d["attention_logit_multipliers"] = [1.0 if i in plan.layers else m for i, m in enumerate(multipliers)]
    d.update(
        mixer_types=mixer_types,
        q_lora_rank=plan.q_lora_rank,
        kv_lora_rank=plan.kv_lora_rank,
        qk_nope_head_dim=plan.nope_dims,
        qk_rope_head_dim=plan.rope_dims,
        v_head_dim=plan.head_dim,
        mla_rope_heads=plan.rope_heads,
        mla_latent_norm=opts.latent_norm,
        mla_rope_pairs=pairs,
        mla_use_rope=True,
        mla_norm_eps=LATENT_NORM_EPS if opts.latent_norm else config.mla_norm_eps,
    )
    new = HybridConfig.from_dict(d)
    new._attn_implementation = config._attn_implementation
    return new


def _table(config, rope_parameters: dict, dim: int) -> tuple[torch.Tensor, float]:
    view = SimpleNamespace(
        rope_parameters=rope_parameters,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
    )
    inv_freq, scale = rope_inv_freq(view, dim)
    return inv_freq.float(), float(scale)


def rope_layout(
    config: HybridConfig, plan: MLAPlan, mixer_types: list[str]
) -> tuple[dict | None, list[int] | None]:
    """How the MLA layers get the kept pairs' source frequencies: ``(rope_parameters or None = unchanged,
    mla_rope_pairs or None)``. In DeepSeek's layout (``mla_rope_pairs=None``, what the exports need) when
    the RoPE table of size dr gives them:

    - as it is (``uniform`` with power-of-two sizes: pair ``j`` of the small table is pair ``j·d/dr`` of the
      big one) — bitwise;
    - with ``rope_theta' = rope_theta^(dr/d)`` when the kept pairs are the fastest ``dr/2`` (``frequency``):
      ``θ'^(-2j/dr) = θ^(-2j/d)``; used only when no RoPE attention layer remains (the base is one config
      field), and only when the tables agree to float32 rounding (≤ 2 ulps; a position error of ≤ ~1e-2 rad at
      32K, far below what dropping RoPE from the other pairs changes).

    Otherwise ``mla_rope_pairs`` picks the pairs from the table of size ``head_dim``."""
    rope = dict(config.rope_parameters or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    d, dr, pairs = plan.head_dim, plan.rope_dims, list(plan.rope_pairs)
    full, full_scale = _table(config, rope, d)
    picked = full[torch.tensor(pairs, dtype=torch.long)]
    small, small_scale = _table(config, rope, dr)
    if full_scale == small_scale and torch.equal(picked, small):
        return None, None
    other_rope = [i for i, t in enumerate(mixer_types) if t in ("attention", "sliding_attention")]
    if pairs == list(range(dr // 2)) and not other_rope:
        rebased = {**rope, "rope_theta": float(rope["rope_theta"]) ** (dr / d)}
        small, small_scale = _table(config, rebased, dr)
        ulp = torch.finfo(torch.float32).eps
        if full_scale == small_scale and bool(((small - picked).abs() <= 2 * ulp * picked.abs()).all()):
            return rebased, None
    return None, pairs


def _attention_weights(state: dict[str, torch.Tensor], i: int, plan: MLAPlan) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}.mixer."
    H, G, d = plan.heads, plan.kv_heads, plan.head_dim
    return {
        "q": state[p + "q_proj.weight"].double().view(H, d, -1),
        "k": state[p + "k_proj.weight"].double().view(G, d, -1),
        "v": state[p + "v_proj.weight"].double().view(G, d, -1),
        "o": state[p + "o_proj.weight"].double(),
    }


def mla_model(model, opts: MLAOptions | None = None, *, calibration: torch.Tensor | None = None, **kwargs):
    """Convert an in-memory ``HybridForCausalLM`` (left untouched): a new model, in the source's dtype and
    device, whose chosen attention layers are MLA layers. ``calibration``: token ids [N, T] (unpadded blocks)
    for ``rope_select="norm"`` and ``activation_aware`` (required by them), and for the latent-norm weights
    and the shared rope key's mixing (else ``Σ = diag(γ²)``)."""
    if opts is None:
        opts = MLAOptions(**kwargs)
    elif kwargs:
        raise TypeError("mla_model: pass an MLAOptions or keyword options, not both")
    config = model.config
    plan = check_mla(config, opts)
    if opts.needs_calibration and calibration is None:
        raise ValueError(
            "mla: rope_select='norm' and activation_aware=True need calibration token ids (calibration=...; "
            "CLI: --calibration-blocks N)"
        )
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if calibration is not None:
        covs = calibration_covariances(model, calibration, plan.layers)
    else:
        covs = {i: default_covariance(model, i) for i in plan.layers}
    weights = {i: _attention_weights(state, i, plan) for i in plan.layers}
    if plan.rope_pairs is None:
        plan = _with_pairs(plan, norm_rope_pairs(weights, covs, plan))
    new_config = mla_config(config, plan, opts)
    scale_src = config.attention_scaling if config.attention_scaling is not None else plan.head_dim**-0.5
    from ..mixers.attention import logit_multiplier
    from ..mixers.mla import mla_softmax_scale

    alpha = scale_src / mla_softmax_scale(new_config)
    stats = {}
    for i in plan.layers:
        p = f"model.layers.{i}.mixer."
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            state.pop(p + name)
        layer_alpha = alpha * logit_multiplier(config, i)  # attention_logit_multipliers: into q
        tensors, stats[i] = convert_layer(weights[i], plan, opts, sigma=covs[i], alpha=layer_alpha)
        for name, t in tensors.items():
            state[p + name] = t.to(dtype)
    new = rebuild_model(model, new_config, state)
    exact = opts.lossless or (
        plan.rope_dims == plan.head_dim
        and plan.rope_heads == plan.kv_heads
        and plan.kv_lora_rank == sum(plan.kv_rows)
        and plan.q_lora_rank is None
        and not opts.latent_norm
    )
    options = {
        **opts.as_dict(),
        "layers": plan.layers,
        "rope_dims": plan.rope_dims,
        "rope_pairs": plan.rope_pairs,
        "kv_lora_rank": plan.kv_lora_rank,
        "mla_rope_heads": plan.rope_heads,
        "calibrated": calibration is not None,
        "exact_start": exact,
    }
    new.config.hf_hybrid_lineage = derived_lineage(dict(config.hf_hybrid_lineage or {}), None, "mla", options)
    new.config.hf_hybrid_lineage["approximation"] = {str(i): s for i, s in stats.items() if s}
    return new


def _with_pairs(plan: MLAPlan, pairs: list[int]) -> MLAPlan:
    from dataclasses import replace

    return replace(plan, rope_pairs=pairs)


# ------------------------------------------------------------------------------------------------------------
# the whole job


def mla(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    opts: MLAOptions | None = None,
    *,
    calibration: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> Path:
    """Convert ``src`` (see the module docstring) and save it to ``dst``. Every check (options, source,
    layers, ranks, ``dst``) runs before anything is written; the surgery runs in fp64 on an fp32 copy, and the
    result is saved in ``dtype`` (default: the source's). Returns ``dst``."""
    if opts is None:
        opts = MLAOptions(**kwargs)
    elif kwargs:
        raise TypeError("mla: pass an MLAOptions or keyword options, not both")
    check_dst(dst)
    config, _ = source_config(src)
    check_mla(config, opts)
    if opts.needs_calibration and calibration is None:
        raise ValueError(
            "mla: rope_select='norm' and activation_aware=True need calibration token ids (calibration=...; "
            "CLI: --calibration-blocks N)"
        )
    out_dtype = as_dtype(dtype)
    model, source_dtype = load_source(src, dtype=torch.float32)
    new = mla_model(model, opts, calibration=calibration)
    lineage = new.config.hf_hybrid_lineage
    lineage.setdefault("base_model", os.fspath(src))
    lineage["source"] = os.fspath(src)
    return write_checkpoint(new, dst, src=src, dtype=out_dtype or source_dtype)


def kv_bytes_per_token(config: HybridConfig, dtype_bytes: int = 2) -> int:
    """KV-cache bytes each new token adds, all layers (``dtype_bytes`` per number), from the cost inspector:
    the growing part only (a sliding window's and the recurrent states' fixed sizes are in
    :func:`cache_bytes_at`)."""
    from ..cost import estimate_cost

    report = estimate_cost(config, contexts=(1,), dtype_bytes=dtype_bytes)
    return sum(layer.cache_per_token for layer in report.layers if layer.cache_window is None) * dtype_bytes


def cache_bytes_at(config: HybridConfig, context: int = 32768, dtype_bytes: int = 2) -> int:
    """The whole cache of one sequence at ``context`` tokens (KV + recurrent states), from the cost
    inspector."""
    from ..cost import estimate_cost

    return estimate_cost(config, contexts=(context,), dtype_bytes=dtype_bytes).cache_bytes(context)


__all__ = [
    "FACTORIZATIONS",
    "MLAOptions",
    "MLAPlan",
    "ROPE_KEYS",
    "ROPE_SELECT",
    "cache_bytes_at",
    "calibration_covariances",
    "check_mla",
    "convert_layer",
    "kv_bytes_per_token",
    "mla",
    "mla_config",
    "mla_model",
]
