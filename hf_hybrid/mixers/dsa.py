"""DeepSeek Sparse Attention (DeepSeek-V3.2), ``mixer_types`` value ``"dsa"``.

A lightning indexer scores every visible past token, ``I[t,s] = Σ_h w[t,h] · ReLU(q_I[t,h] · k_I[s])`` (one
shared indexer key per token, LayerNorm + partial RoPE on it, ``w = weights_proj(x) · H_I^-½ · d_I^-½``, the
indexer query from MLA's q-LoRA latent when there is one), keeps the top ``index_topk`` per query (ties toward
the most recent position), and attention runs over those tokens only: O(T·k) compute and memory, never a T×T
mask.

DSA sits on a dense mixer (``dsa_base``): ``"mla"`` (as in V3.2: MLA in latent MQA mode, so one selection
serves all heads, attention runs on the cached ``[c_kv, k_pe]`` directly) or ``"attention"`` (GQA). The
weights of the base keep their names (a DSA layer is its base mixer plus ``indexer.*``), so converting a dense
checkpoint is a copy plus fresh indexers.

``dsa_mode``:
- ``"sparse"``: top-k sparse attention. The indexer always sees **detached** inputs and learns only from
  ``KL(p_t|S ‖ softmax(I_t)|S)`` over the selected set (``indexer_loss``); the LM loss reaches the model, not
  the indexer (the selection is integer-valued).
- ``"dense_warmup"``: dense attention; in training ``indexer_loss = KL(p_t ‖ softmax(I_t))`` over all visible
  keys, p the main attention (head-mean, detached), recomputed per query chunk; the model's ``loss`` is this
  KL alone.
- ``"dense"``: the base mixer, indexer unused (e.g. a freshly converted model before warm-up).

``dsa_selector``: ``"indexer"`` (learned, default) or ``"structured"`` (first ``dsa_global_tokens`` tokens as
anchors, the last ``dsa_local_window`` tokens, and evenly strided representatives of the middle).

``dsa_indexer_types`` (GLM-MoE-DSA's index-reuse layers): a DSA layer marked ``"shared"`` has no indexer and
attends over the top-k the previous ``"full"`` DSA layer selected in the same forward
(``MixerContext.dsa_topk``); it adds no indexer loss and caches no indexer keys.

``index_pool_size`` > 1 (GLM-5-Next's ``index_kpool``, ``hf_hybrid.ops.dsa.pooling``): the indexer scores
pools of that many consecutive tokens of a document (a learned per-channel weighted average of their keys,
``indexer.pool_gate`` / ``indexer.pool_ape``), keeps the best ``index_topk // index_pool_size`` complete
pools a query sees and always the tokens of the query's own incomplete pool; the cache holds each token's
indexer key and gate logits. Its sparse-stage KL runs over the selected pools (each token carries its pool's
score), not the tail; the dense warm-up is not defined for pools (refused).

Set ``module.collect_metrics = True`` to have each forward record ``dsa_recall`` (recall@k against the top-k
of the true head-mean attention) and ``dsa_mass`` (attention mass inside the selected set) as layer stats.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..layers import LogPositionQueryScale, apply_rope
from ..ops.dsa import (
    attention_mass_in_selection,
    dense_visible_attention,
    indexer_kl_dense,
    indexer_kl_sparse,
    indexer_recall_at_k,
    indexer_scores_naive,
    indexer_topk,
    pooling,
    sparse_attention,
    ties_at_topk_cut,
)
from ..specs import (
    ConfigField,
    KVKind,
    MixerCost,
    format_tokens,
    nonnegative,
    positive_or_none,
    register_mixer,
    require_positive,
)
from .attention import (
    ATTENTION_LORA_TARGETS,
    GQA_FIELDS,
    HybridAttention,
    attention_flops,
    attention_parts,
    attention_rope_dims,
    attention_rotary_dim,
    attention_rotates,
    describe_attention,
    validate_gqa,
)
from .base import MixerContext
from .mla import (
    MLA_FIELDS,
    MLA_LORA_TARGETS,
    HybridMLA,
    describe_mla,
    mla_head_dims,
    mla_kv_kind,
    mla_parts,
    mla_rope_dims,
    validate_mla,
)

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig

DSA_MODES = ("sparse", "dense_warmup", "dense")


def _check_indexer_types(config: HybridConfig, name: str) -> None:
    """``dsa_indexer_types``: per layer "full" (own indexer) or "shared" (the top-k of the previous full DSA
    layer); entries of non-DSA layers are ignored."""
    if config.dsa_indexer_types is None:
        return
    kinds = list(config.dsa_indexer_types)
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(
            f"HybridConfig.dsa_indexer_types has {len(kinds)} entries but num_hidden_layers="
            f"{config.num_hidden_layers}; give one per layer"
        )
    seen_full = False
    for i, (kind, mixer) in enumerate(zip(kinds, config.mixer_types)):
        if kind not in ("full", "shared"):
            raise ValueError(
                f"HybridConfig.dsa_indexer_types[{i}]={kind!r} is not allowed; choose one of: full, shared"
            )
        if mixer != "dsa":
            continue
        if kind == "shared" and not seen_full:
            raise ValueError(
                f"HybridConfig.dsa_indexer_types[{i}]='shared' reuses the top-k "
                "of an earlier 'full' DSA layer, and there is none before it"
            )
        if kind == "shared" and config.dsa_selector != "indexer":
            raise ValueError(
                f"HybridConfig.dsa_indexer_types[{i}]='shared' needs dsa_selector='indexer' "
                f"(got {config.dsa_selector!r})"
            )
        seen_full = seen_full or kind == "full"


def dsa_layer_has_indexer(config: HybridConfig, layer_idx: int) -> bool:
    """False for a DSA layer marked "shared" in ``dsa_indexer_types`` (it reuses an earlier layer's
    top-k)."""
    return config.dsa_indexer_types is None or config.dsa_indexer_types[layer_idx] == "full"


def _effective_indexer_types(config: HybridConfig) -> list[str | None] | None:
    """``dsa_indexer_types`` as the layers read it: the entries of DSA layers, None when all are "full"."""
    kinds = config.dsa_indexer_types
    if kinds is None:
        return None
    kinds = [k if m == "dsa" else None for k, m in zip(kinds, config.mixer_types)]
    return None if all(k in ("full", None) for k in kinds) else kinds


# The config fields of DSA layers (DeepSeek-V3.2 names); the base mixer's fields are MLA's or attention's.
CONFIG_FIELDS = (
    ConfigField("index_n_heads", 8, "int"),
    ConfigField("index_head_dim", 64, "int"),
    ConfigField("index_topk", 256, "int"),
    ConfigField("dsa_base", "mla", "str", choices=("mla", "attention")),
    ConfigField("dsa_mode", "sparse", "str", choices=DSA_MODES),
    ConfigField("dsa_selector", "indexer", "str", choices=("indexer", "structured")),
    ConfigField("dsa_backend", "auto", "str", choices=("auto", "torch", "naive", "triton")),
    ConfigField("dsa_query_chunk", 256, "int"),
    ConfigField("index_loss_coef", 1.0, "float", check=nonnegative),
    ConfigField("dsa_local_window", 64, "int", doc="structured selector: recent tokens kept"),
    ConfigField("dsa_global_tokens", 4, "int", doc="structured selector: first tokens kept as anchors"),
    ConfigField(
        "index_norm_eps",
        1e-5,
        "float",
        check=positive_or_none,
        doc="eps of the indexer's key LayerNorm (DeepSeek-V3.2 / GLM: 1e-6)",
    ),
    # Per layer "full" (own indexer) or "shared" (no indexer: reuse the top-k of the previous "full" DSA
    # layer, as GLM-MoE-DSA's index-reuse layers do); None = every DSA layer "full".
    ConfigField(
        "dsa_indexer_types",
        None,
        "list[str] | None",
        check=_check_indexer_types,
        effective=_effective_indexer_types,
    ),
    # DSA indexer pooling (GLM-5-Next's index_kpool): > 1 scores pools of this many consecutive tokens of a
    # document (a learned per-channel weighted average of their keys), keeps the best
    # index_topk // index_pool_size pools and always the query's own incomplete pool; 1: each token alone.
    ConfigField("index_pool_size", 1, "int"),
    # LayerNorm (eps index_norm_eps) on the indexer's query input when that is the hidden state (no q-LoRA
    # latent): Mistral-Large-4's q_input_norm.
    ConfigField("index_q_norm", False, "bool"),
)


class LightningIndexer(nn.Module):
    def __init__(self, config: HybridConfig, *, query_dim: int, rope_dim: int):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = min(rope_dim, self.head_dim)
        self.rope_dim -= self.rope_dim % 2
        # index_q_norm (Mistral-Large-4): a LayerNorm on the query input when it is the hidden state
        self.q_input_norm = (
            nn.LayerNorm(query_dim, eps=config.index_norm_eps) if config.index_q_norm else None
        )
        self.wq = nn.Linear(query_dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.index_norm_eps)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.weight_scale = self.n_heads**-0.5 * self.head_dim**-0.5
        self.softmax_scaling = LogPositionQueryScale(self.n_heads) if config.query_log_scaling else None
        self.pool = config.index_pool_size
        if self.pool > 1:
            # GLM-5-Next's k-pool compression: per-channel gate logits x W_gate plus a learned row per slot of
            # the pool decide how each channel of the pool key averages its tokens' keys.
            self.pool_gate = nn.Linear(config.hidden_size, self.head_dim, bias=False)
            self.pool_ape = nn.Parameter(torch.zeros(self.pool, self.head_dim))

    def init_hybrid_weights(self, init, config: HybridConfig) -> None:
        if self.pool > 1:
            # zero gate and slot logits: a fresh pool key is the plain mean of its tokens' keys
            init.zeros_(self.pool_gate.weight)
            init.zeros_(self.pool_ape)

    def forward(
        self, hidden_states: torch.Tensor, query_source: torch.Tensor, ctx: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q_I [B, T, H_I, d_I], k_I [B, T, d_I] (this forward's keys; with pooling [B, T, 2·d_I]: the
        keys, then the pool gate logits), w [B, T, H_I] fp32."""
        b, t, _ = hidden_states.shape
        if self.q_input_norm is not None:
            query_source = self.q_input_norm(query_source)
        q = self.wq(query_source).view(b, t, self.n_heads, self.head_dim)
        if self.softmax_scaling is not None:  # query_log_scaling (a scalar per head: it commutes with RoPE)
            q = self.softmax_scaling(q, ctx.position_ids)
        k = self.k_norm(self.wk(hidden_states))
        if self.rope_dim:
            cos, sin = ctx.rope(self.rope_dim)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k.unsqueeze(2), cos, sin).squeeze(2)
        w = self.weights_proj(hidden_states).float() * self.weight_scale
        if self.pool > 1:
            k = torch.cat([k, self.pool_gate(hidden_states).to(k.dtype)], dim=-1)
        return q, k, w

    def pooled(self, k_cached: torch.Tensor, ctx: MixerContext) -> PooledKeys:
        """The pools over every cached key ([B, S, 2·d_I]: keys, gate logits)."""
        b, s = k_cached.shape[:2]
        if ctx.cu_seqlens is not None and ctx.past_length:
            raise ValueError("DSA index_pool_size > 1: packed documents (cu_seqlens) after a cache prefix")
        key_doc = key_start_positions(ctx, s, k_cached.device)
        ends = pooling.pool_ends(key_doc, s, self.pool, batch=b, device=k_cached.device)
        keys, gates = k_cached.split(self.head_dim, dim=-1)
        pooled = pooling.pooled_keys(keys, gates, self.pool_ape, ends, self.pool)
        # each token's pool key is read by the indexer loss only (training)
        per_token = pooling.pooled_token_keys(pooled, ends, s, self.pool) if self.training else None
        return PooledKeys(pooled, ends, per_token)


class PooledKeys(NamedTuple):
    """The indexer keys of a pooled layer: pooled [B, NP, d_I], ends [B, NP] (last token of each pool, -1 =
    none), per_token [B, S, d_I] (each token's pool key, 0 outside complete pools; None out of training)."""

    pooled: torch.Tensor
    ends: torch.Tensor
    per_token: torch.Tensor | None


def key_start_positions(ctx: MixerContext, t: int, device: torch.device) -> torch.Tensor | None:
    """First key each query may see [B, T] (absolute positions): the start of its document in a packed row, or
    the first real token of a left-padded row; None when every query may see from position 0."""
    if ctx.cu_seqlens is not None:
        cu = ctx.cu_seqlens.to(device=device, dtype=torch.long)
        pos = torch.arange(t, device=device)
        doc = torch.searchsorted(cu[1:], pos, right=True)  # (T,)
        return cu[doc][None]
    mask = ctx.attention_mask_2d
    if mask is None or bool(mask[:, 0].all()):
        return None
    first = mask.long().argmax(dim=-1)  # left padding: index of the first real token
    return first[:, None].expand(-1, t).to(device)


def structured_indices(
    b: int,
    t: int,
    past: int,
    key_start: torch.Tensor | None,
    *,
    topk: int,
    window: int,
    anchors: int,
    device: torch.device,
) -> torch.Tensor:
    """Fixed selection [B, T, topk] (-1 = unused): the first ``anchors`` tokens, the last ``window`` tokens,
    and ``topk - anchors - window`` evenly strided tokens between them; the three sets are disjoint by
    construction."""
    pos = (past + torch.arange(t, device=device))[None, :, None]  # (1, T, 1) absolute query positions
    start = (
        torch.zeros(b, t, 1, dtype=torch.long, device=device) if key_start is None else key_start[..., None]
    )
    mid_lo = start + anchors
    first = start + torch.arange(anchors, device=device)  # (B, T, G)
    first = torch.where(first <= pos, first, -1)
    recent = pos - torch.arange(window, device=device)  # (1, T, W)
    recent = torch.where(recent >= mid_lo, recent, -1).expand(b, -1, -1)
    m = max(0, topk - anchors - window)
    mid_hi = pos - window + 1  # exclusive end of the middle region
    span = (mid_hi - mid_lo).clamp(min=0)
    j = torch.arange(m, device=device)
    strided = mid_lo + (j * span) // max(m, 1)  # (B, T, M) evenly spread, increasing, distinct when span >= M
    distinct = torch.cat(
        [torch.ones_like(strided[..., :1], dtype=torch.bool), strided[..., 1:] != strided[..., :-1]], -1
    )
    strided = torch.where((strided < mid_hi) & distinct, strided, -1)
    return torch.cat([first.expand(b, -1, -1), recent, strided], dim=-1)[..., :topk]


def gather_selected_latent(
    c_kv: torch.Tensor, k_pe: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selected latent rows only, for sparse attention when T·k < S (decode).

    c_kv [B, S, r], k_pe [B, S, dr], idx [B, T, K] (-1 = unused) -> k [B, T·K, 1, r + dr], v [B, T·K, 1, r]
    and idx' [B, T, K] into them (slot j of query t is row t·K + j; -1 kept), so ``sparse_attention(q, k, v,
    idx')`` equals ``sparse_attention(q, cat(c_kv, k_pe), c_kv, idx)`` while reading T·K rows instead of
    copying S."""
    b, t, kk = idx.shape
    rows = idx.clamp(min=0).reshape(b, t * kk, 1)
    c_sel = c_kv.gather(1, rows.expand(-1, -1, c_kv.shape[-1]))  # (B, T·K, r)
    pe_sel = k_pe.gather(1, rows.expand(-1, -1, k_pe.shape[-1]))  # (B, T·K, dr)
    local = torch.arange(t * kk, device=idx.device, dtype=idx.dtype).view(1, t, kk)
    idx_sel = torch.where(idx >= 0, local, torch.full_like(idx, -1))
    return torch.cat([c_sel, pe_sel], dim=-1)[:, :, None], c_sel[:, :, None], idx_sel


class _DSAMixin:
    """The selection and the indexer loss, shared by DSA on MLA and DSA on GQA attention.

    Run-time state (never written to the config, so what is saved stays what the user chose):
    ``mode_override`` / ``topk_override`` (set through ``model.dsa_mode(...)``; None: the config's
    ``dsa_mode`` / ``index_topk``) and ``collect_metrics``."""

    config: HybridConfig
    indexer: LightningIndexer
    layer_idx: int

    def _init_runtime_state(self) -> None:
        self.collect_metrics = False
        self.mode_override: str | None = None
        self.topk_override: int | None = None

    @property
    def mode(self) -> str:
        """The ``dsa_mode`` this layer runs in now."""
        return self.mode_override or self.config.dsa_mode

    @property
    def topk(self) -> int:
        """The ``index_topk`` this layer selects now."""
        return self.topk_override or self.config.index_topk

    @property
    def in_dense_warmup(self) -> bool:
        """DeepSeek's dense warm-up: the indexer KL is the whole training loss (the causal-LM head's rule)."""
        return self.mode == "dense_warmup"

    def returns_attention_weights(self) -> bool:
        """The dense modes run the base mixer (its eager probabilities); sparse attention returns none."""
        return self.mode != "sparse"

    def runtime_mask(self) -> str | None:
        """The transformers mask this layer reads in its current mode (the model builds only those asked
        for)."""
        return _mask_for_mode(self.mode)

    def aux_terms(self) -> dict[str, float]:
        """Auxiliary terms this layer records in training now -> their coefficient: the indexer KL, with
        ``index_loss_coef`` in sparse mode and 1 in the dense warm-up (where it replaces the LM loss); none
        for a "shared" layer (no indexer) or the structured selector."""
        if self.config.dsa_selector != "indexer" or self.indexer is None or self.mode == "dense":
            return {}
        return {"indexer_loss": 1.0 if self.in_dense_warmup else float(self.config.index_loss_coef)}

    def replaces_lm_loss(self) -> bool:
        """DeepSeek's dense warm-up trains the indexer on its KL alone."""
        return self.in_dense_warmup

    def _indexer(self, hidden: torch.Tensor, query_source: torch.Tensor, ctx: MixerContext):
        # Both of DeepSeek's stages train the indexer on its KL alone: its inputs are detached so that loss
        # never moves the model (and the LM loss cannot reach the indexer: the selection is integer-valued).
        hidden, query_source = hidden.detach(), query_source.detach()
        q_i, k_i, w = self.indexer(hidden, query_source, ctx)
        if ctx.cache is not None:
            k_i = ctx.cache.update_indexer(k_i, self.layer_idx)
        if self.indexer.pool > 1:
            if self.mode == "dense_warmup":
                raise ValueError(
                    f"DSA layer {self.layer_idx}: dsa_mode='dense_warmup' with index_pool_size="
                    f"{self.config.index_pool_size}: the dense indexer KL is defined per token, not per "
                    "pool; allowed: 'sparse' or 'dense', or index_pool_size=1"
                )
            k_i = self.indexer.pooled(k_i, ctx)
        return q_i, k_i, w

    def _shared_selection(self, ctx: MixerContext) -> torch.Tensor:
        """The top-k [B, T, k] of the previous "full" DSA layer (``dsa_indexer_types``), for a layer without
        one."""
        cfg = self.config
        source = max(
            j for j in range(self.layer_idx) if cfg.mixer_types[j] == "dsa" and dsa_layer_has_indexer(cfg, j)
        )  # exists: the config validates that a "shared" layer follows a "full" one
        idx = ctx.dsa_topk.get(source)
        if idx is None:
            raise RuntimeError(
                f"DSA layer {self.layer_idx} is 'shared' in dsa_indexer_types but layer "
                f"{source}, whose top-k it reuses, selected nothing in this forward"
            )
        return idx

    def _select(self, q_i, k_i, w, key_start, ctx: MixerContext) -> torch.Tensor:
        cfg = self.config
        b, t = q_i.shape[:2]
        if cfg.dsa_selector == "structured":
            return structured_indices(
                b,
                t,
                ctx.past_length,
                key_start,
                topk=min(self.topk, k_i.shape[1]),
                window=cfg.dsa_local_window,
                anchors=cfg.dsa_global_tokens,
                device=q_i.device,
            )
        if isinstance(k_i, PooledKeys):
            idx = pooling.pooled_topk(
                q_i,
                k_i.pooled,
                w,
                k_i.ends,
                pool=self.indexer.pool,
                topk=self.topk,
                q_offset=ctx.past_length,
                key_start=key_start,
                query_chunk=cfg.dsa_query_chunk,
            )
            ctx.dsa_topk[self.layer_idx] = idx
            return idx
        idx = indexer_topk(
            q_i,
            k_i,
            w,
            topk=self.topk,
            q_offset=ctx.past_length,
            key_start=key_start,
            query_chunk=cfg.dsa_query_chunk,
        )
        ctx.dsa_topk[self.layer_idx] = idx  # read by later "shared" layers (dsa_indexer_types)
        return idx

    def _attend_selected(self, q, k, v, idx, key_start, ctx: MixerContext) -> torch.Tensor:
        """Sparse attention over ``idx`` — or, when ``index_topk`` >= S (the selection then holds every key a
        query may see), the same function as dense attention through SDPA: no gather, 5-20x cheaper on CPU.
        q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], idx [B, T, K]."""
        if self.topk >= k.shape[1]:
            return dense_visible_attention(
                q, k, v, scale=self.scaling, q_offset=ctx.past_length, key_start=key_start
            )
        return sparse_attention(q, k, v, idx, scale=self.scaling, backend=self.config.dsa_backend)

    def _losses_and_metrics(
        self, q, k, q_i, k_i, w, idx, key_start, ctx: MixerContext, *, scale: float
    ) -> None:
        """q [B, T, H, D], k [B, S, Hkv, D]: the main attention's queries/keys (what its softmax sees)."""
        cfg = self.config
        k_kl, idx_kl = k_i, idx
        if isinstance(k_i, PooledKeys):
            # The KL runs over the selected pools: every token of a pool carries the pool's score, so the
            # softmax over their tokens is the softmax over the pools; the tail has no pool score.
            k_kl = k_i.per_token
            if idx is not None:
                idx_kl = idx[..., : (self.topk // self.indexer.pool) * self.indexer.pool]
        if self.training and self.mode == "dense_warmup":
            ctx.add_aux(
                "indexer_loss",
                indexer_kl_dense(
                    q,
                    k,
                    q_i,
                    k_i,
                    w,
                    scale=scale,
                    q_offset=ctx.past_length,
                    key_start=key_start,
                    query_chunk=min(cfg.dsa_query_chunk, 64),
                ),
            )
        elif self.training and self.mode == "sparse" and idx is not None and cfg.dsa_selector == "indexer":
            ctx.add_aux(
                "indexer_loss",
                indexer_kl_sparse(q, k, q_i, k_kl, w, idx_kl, scale=scale, query_chunk=cfg.dsa_query_chunk),
            )
        if self.collect_metrics:
            if idx is None:
                idx = self._select(q_i, k_i, w, key_start, ctx)
            kw = dict(scale=scale, q_offset=ctx.past_length, key_start=key_start)
            ctx.add_stat("dsa_recall", self.layer_idx, indexer_recall_at_k(q, k, idx, **kw).mean().item())
            ctx.add_stat(
                "dsa_mass", self.layer_idx, attention_mass_in_selection(q, k, idx, **kw).mean().item()
            )


class DSAOnMLA(_DSAMixin, HybridMLA):
    """DSA over MLA in latent MQA mode (DeepSeek-V3.2)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        HybridMLA.__init__(self, config, layer_idx)
        query_dim = config.q_lora_rank or config.hidden_size
        self.indexer = (
            LightningIndexer(
                config, query_dim=query_dim, rope_dim=self.qk_rope_head_dim if self.use_rope else 0
            )
            if dsa_layer_has_indexer(config, layer_idx)
            else None
        )
        # attention_sinks (HY-V4): a learned logit per head joins each query's softmax over its selection as
        # a key with no value; sparse mode only (the selected attention's log-sum-exp rescales the output)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None
        self._init_runtime_state()

    def _sparse_attention(self, q, k, v, idx) -> torch.Tensor:
        """``sparse_attention``, with sinks: ``o · exp(lse) / (exp(lse) + exp(sink_h))`` = ``o ·
        sigmoid(lse - sink_h)``, the softmax that includes the sink (an empty selection stays 0)."""
        if self.sinks is None:
            return sparse_attention(q, k, v, idx, scale=self.scaling, backend=self.config.dsa_backend)
        o, lse = sparse_attention(
            q, k, v, idx, scale=self.scaling, backend=self.config.dsa_backend, return_lse=True
        )
        keep = torch.sigmoid(lse - self.sinks.float())  # [B, T, H] fp32
        return (o.float() * keep.unsqueeze(-1)).to(o.dtype)

    def _attend_selected(self, q, k, v, idx, key_start, ctx: MixerContext) -> torch.Tensor:
        if self.sinks is None:
            return super()._attend_selected(q, k, v, idx, key_start, ctx)
        return self._sparse_attention(q, k, v, idx)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        p = self.project(hidden_states, ctx)
        if (self.mode == "dense" and not self.collect_metrics) or (
            self.indexer is None and self.mode != "sparse"
        ):
            return self._dense(p, ctx, b, t)
        if self.indexer is not None:
            q_i, k_i, w = self._indexer(
                hidden_states, p.q_latent if p.q_latent is not None else hidden_states, ctx
            )
        key_start = key_start_positions(ctx, t, hidden_states.device)
        weights = self.absorbed_weights()
        if weights is None:
            raise ValueError(
                f"DSA layer {self.layer_idx}: kv_b_proj ({type(self.kv_b_proj).__name__}) "
                "cannot be read as one weight (a LoRA variant, lora_bias or active LoRA "
                "dropout); sparse latent attention needs it"
            )
        w_uk, w_uv = weights
        # Latent MQA view of MLA: per-head latent queries against the single cached [c_kv, k_pe] "head".
        q_lat = torch.cat([self.absorb_query(p.q_nope, w_uk), p.q_pe], dim=-1)  # (B, T, H, r + dr)
        idx = None
        k_lat = None
        if self.indexer is None:  # a "shared" layer: the previous full layer's selection, no indexer loss
            k_lat = torch.cat([p.c_kv, p.k_pe], dim=-1)[:, :, None]  # (B, S, 1, r + dr)
            key_start = key_start_positions(ctx, t, hidden_states.device)
            selection = self._shared_selection(ctx)
            o_lat = self._attend_selected(q_lat, k_lat, p.c_kv[:, :, None], selection, key_start, ctx)
            return self.output(self.latent_to_value(o_lat, w_uv), p.gate)
        if self.mode == "sparse":
            idx = self._select(q_i, k_i, w, key_start, ctx)
            if self.training or t * idx.shape[-1] >= p.c_kv.shape[1] or self.topk >= p.c_kv.shape[1]:
                k_lat = torch.cat([p.c_kv, p.k_pe], dim=-1)[:, :, None]  # (B, S, 1, r + dr)
                o_lat = self._attend_selected(q_lat, k_lat, p.c_kv[:, :, None], idx, key_start, ctx)
            else:
                # Decode: T·k selected rows are far fewer than the S cached ones, so gather only those instead
                # of concatenating the whole latent history into [c_kv, k_pe] every step.
                k_sel, v_sel, idx_sel = gather_selected_latent(p.c_kv, p.k_pe, idx)
                o_lat = self._sparse_attention(q_lat, k_sel, v_sel, idx_sel)
            out = self.latent_to_value(o_lat, w_uv)
        else:
            out = None
        if (self.training and self.mode != "dense") or self.collect_metrics:
            if k_lat is None:
                k_lat = torch.cat([p.c_kv, p.k_pe], dim=-1)[:, :, None]
            self._losses_and_metrics(q_lat, k_lat, q_i, k_i, w, idx, key_start, ctx, scale=self.scaling)
        if out is None:
            return self._dense(p, ctx, b, t)
        return self.output(out, p.gate)

    def _dense(self, p, ctx: MixerContext, b: int, t: int) -> torch.Tensor:
        if self.sinks is not None:
            raise ValueError(
                f"DSA layer {self.layer_idx} runs dense (mode {self.mode!r}); with attention_sinks=True DSA "
                "on MLA runs in sparse mode only (dsa_mode='sparse', model.dsa_mode('sparse'))"
            )
        mask = ctx.masks.get("full_attention")
        out = None
        if self.uses_absorbed(t, p.c_kv.shape[1], ctx.past_length):
            weights = self.absorbed_weights()
            if weights is not None:
                out = self.attend_absorbed(p.q_nope, p.q_pe, p.c_kv, p.k_pe, mask, ctx, weights)
        if out is None:
            out = self.attend_dense(p.q_nope, p.q_pe, p.c_kv, p.k_pe, mask, ctx)
        return self.output(out, p.gate)


class DSAOnAttention(_DSAMixin, HybridAttention):
    """DSA over GQA softmax attention: one selection per query shared by all heads."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        HybridAttention.__init__(self, config, layer_idx)
        self.indexer = (
            LightningIndexer(config, query_dim=config.hidden_size, rope_dim=self.rotary_dim)
            if dsa_layer_has_indexer(config, layer_idx)
            else None
        )
        self._init_runtime_state()

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        q, k, v, gate = self.project(hidden_states, ctx)  # (B, h, T, d), (B, hkv, S, d)
        if (self.mode == "dense" and not self.collect_metrics) or (
            self.indexer is None and self.mode != "sparse"
        ):
            return self.output(self.attend(q, k, v, ctx), gate)
        t = hidden_states.shape[1]
        if self.indexer is None:  # a "shared" layer: the previous full layer's selection
            q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            key_start = key_start_positions(ctx, t, hidden_states.device)
            out = self._attend_selected(q_t, k_t, v_t, self._shared_selection(ctx), key_start, ctx)
            return self.output(out, gate)
        q_i, k_i, w = self._indexer(hidden_states, hidden_states, ctx)
        key_start = key_start_positions(ctx, t, hidden_states.device)
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|S, heads, d)
        idx = None
        if self.mode == "sparse":
            idx = self._select(
                q_i, k_i, w, key_start, ctx
            )  # also read by the indexer loss and "shared" layers
            out = self._attend_selected(q_t, k_t, v_t, idx, key_start, ctx)
        else:
            out = self.attend(q, k, v, ctx)
        self._losses_and_metrics(q_t, k_t, q_i, k_i, w, idx, key_start, ctx, scale=self.scaling)
        return self.output(out, gate)


def _validate_dsa(config: HybridConfig) -> None:
    (validate_mla if config.dsa_base == "mla" else validate_gqa)(config)
    if config.dsa_base == "mla" and config.mla_rope_heads != 1:
        raise ValueError(
            f"HybridConfig.mla_rope_heads={config.mla_rope_heads} with dsa_base='mla': DSA attends MQA-style "
            "over the latent and one shared rope key; allowed: 1"
        )
    require_positive(config, "index_n_heads", "index_head_dim", "index_topk", "dsa_query_chunk")
    # ---- indexer pooling ----
    require_positive(config, "index_pool_size")
    pool = config.index_pool_size
    if pool > 1:
        if config.dsa_selector != "indexer":
            raise ValueError(
                f"HybridConfig.index_pool_size={pool} pools the learned indexer's keys; dsa_selector="
                f"{config.dsa_selector!r} has no indexer; allowed: dsa_selector='indexer' or "
                "index_pool_size=1"
            )
        if config.index_topk % pool:
            raise ValueError(
                f"HybridConfig.index_topk={config.index_topk} must be a multiple of index_pool_size={pool} "
                "(the selection keeps index_topk // index_pool_size whole pools)"
            )
        if config.dsa_mode == "dense_warmup":
            raise ValueError(
                f"HybridConfig.dsa_mode='dense_warmup' with index_pool_size={pool}: the dense indexer KL is "
                "defined per token, not per pool; allowed: 'sparse' or 'dense', or index_pool_size=1"
            )
    if config.attention_sinks and config.dsa_base == "attention":
        raise ValueError(
            "HybridConfig.attention_sinks=True with DSA on GQA (dsa_base='attention'): the sparse "
            "attention has no sinks yet; sinks are supported by attention and sliding_attention layers"
        )
    if config.attention_sinks and config.dsa_mode != "sparse":
        raise ValueError(
            f"HybridConfig.attention_sinks=True with dsa_mode={config.dsa_mode!r}: DSA on MLA has sinks in "
            "sparse mode only; set dsa_mode='sparse'"
        )
    # (a non-bool index_q_norm is refused by the config's own check, with its own message)
    if config.index_q_norm is True and config.dsa_base == "mla" and config.q_lora_rank:
        raise ValueError(
            f"HybridConfig.index_q_norm=True with q_lora_rank={config.q_lora_rank}: the indexer reads the "
            "(already normed) q-LoRA latent; index_q_norm applies when it reads the hidden state "
            "(q_lora_rank=None or dsa_base='attention')"
        )


def _mask_for_mode(mode: str) -> str | None:
    # Sparse mode attends over each query's selection only (key starts come from the 2D mask): no dense mask.
    # The dense warm-up and dense modes run the base mixer over every token and read the causal mask.
    return None if mode == "sparse" else "full_attention"


def _dsa_functional_fields(config: HybridConfig) -> tuple[str, ...]:
    """Its own fields and those of its base mixer."""
    base = MLA_FIELDS if config.dsa_base == "mla" else GQA_FIELDS
    return (*(f.name for f in CONFIG_FIELDS), *base)


def _dsa_mask(config: HybridConfig) -> str | None:
    return _mask_for_mode(config.dsa_mode)


def index_ties(model: nn.Module, **inputs) -> list[tuple[int, int, int]]:
    """Run ``model(**inputs)`` (no cache) and return ``(layer, row, query)`` for every query whose indexer
    scores are tied at its top-k cut (:func:`hf_hybrid.ops.dsa.ties_at_topk_cut`), with the visibility the
    selection used (causal, left padding, packed documents); with ``index_pool_size`` > 1 the ties are
    between pools at the cut of ``index_topk // index_pool_size`` pools. Our selection breaks such ties
    toward the most recent key (pool); ``torch.topk`` (transformers' DeepSeek-V3.2 / GLM-MoE-DSA /
    GLM-5-Next) in an unspecified order, so their logits can differ from ours exactly there. An empty list:
    this input selects the same keys either way."""
    found: list[tuple[int, int, int]] = []
    layers = [m for m in dsa_layers(model) if getattr(m, "indexer", None) is not None]

    def watch(layer: _DSAMixin):
        select = layer._select

        def _select(q_i, k_i, w, key_start, ctx):
            if layer.config.dsa_selector == "indexer" and isinstance(k_i, PooledKeys):
                scores = pooling.pooled_scores(
                    q_i, k_i.pooled, w, k_i.ends, q_offset=ctx.past_length, key_start=key_start
                )
                tied = ties_at_topk_cut(scores, layer.topk // layer.indexer.pool)
                found.extend((layer.layer_idx, int(b), int(t)) for b, t in tied.nonzero().tolist())
            elif layer.config.dsa_selector == "indexer":
                scores = indexer_scores_naive(q_i, k_i, w, q_offset=ctx.past_length, key_start=key_start)
                tied = ties_at_topk_cut(scores, layer.topk)
                found.extend((layer.layer_idx, int(b), int(t)) for b, t in tied.nonzero().tolist())
            return select(q_i, k_i, w, key_start, ctx)

        return _select

    try:
        for layer in layers:
            layer._select = watch(layer)
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for layer in layers:
            del layer._select  # the class's method again
    return sorted(set(found))


def dsa_layers(model: nn.Module) -> list[_DSAMixin]:
    """Every DSA mixer in ``model`` (a PEFT- or DDP-wrapped model too)."""
    return [m for m in model.modules() if isinstance(m, _DSAMixin)]


def set_dsa_mode(
    model: nn.Module, mode: str | None, *, index_topk: int | None = None, save: bool = False
) -> DSARuntimeMode:
    """The one way to set the DSA mode: run every DSA layer of ``model`` (any module holding them, PEFT- or
    DDP-wrapped too) in ``mode`` (``"dense"`` | ``"dense_warmup"`` | ``"sparse"``; ``"warmup"`` is read as
    ``"dense_warmup"``; None: the config's) with ``index_topk`` (None: the config's) from now on.

    Run-time state of the layers: the config, and so ``save_pretrained``, keeps the mode and top-k the model
    was built or loaded with. As a context manager the previous state returns on exit::

        set_dsa_mode(model, "dense_warmup")            # from now on (the same as model.dsa_mode(...))
        with set_dsa_mode(model, "sparse", index_topk=64):
            evaluate(model)                             # back to dense_warmup afterwards

    ``save=True`` instead records ``mode`` (and ``index_topk`` if given) in the config, so that is what a
    checkpoint says, and clears the run-time state: every layer then runs in the saved mode (for the end of a
    training recipe; not a context manager). ``model.dsa_mode(...)``
    (:meth:`hf_hybrid.modeling_hybrid.HybridPreTrainedModel.dsa_mode`) and
    ``hf_hybrid.convert.dsa.set_dsa_mode`` are this function.
    """
    return DSARuntimeMode(model, mode, index_topk=index_topk, save=save)


class DSARuntimeMode:
    """The run-time mode of a model's DSA layers, made by :func:`set_dsa_mode` (see there); as a context
    manager it restores each layer's previous state on exit."""

    def __init__(
        self, model: nn.Module, mode: str | None = None, *, index_topk: int | None = None, save: bool = False
    ):
        allowed = DSA_MODES
        mode = {"warmup": "dense_warmup"}.get(mode, mode)
        if mode is not None and mode not in allowed:
            raise ValueError(f"dsa_mode={mode!r} is not allowed; choose one of: {', '.join(allowed)}")
        if index_topk is not None and (
            isinstance(index_topk, bool) or not isinstance(index_topk, int) or index_topk <= 0
        ):
            raise ValueError(f"index_topk={index_topk!r} must be a positive integer")
        self.layers = dsa_layers(model)
        if not self.layers:
            raise ValueError(f"dsa_mode: {type(model).__name__} has no DSA layers")
        self.previous = [(m.mode_override, m.topk_override) for m in self.layers]
        if save:
            if mode is None:
                raise ValueError("dsa_mode: save=True needs a mode to record in the config")
            for config in {id(m.config): m.config for m in self.layers}.values():
                config.dsa_mode = mode
                if index_topk is not None:
                    config.index_topk = index_topk
            mode = index_topk = None  # the layers follow the config again
        for m in self.layers:
            m.mode_override, m.topk_override = mode, index_topk

    def __enter__(self) -> DSARuntimeMode:
        return self

    def __exit__(self, *exc) -> None:
        for m, (mode, topk) in zip(self.layers, self.previous):
            m.mode_override, m.topk_override = mode, topk


# The indexer reads the padding mask (padded keys are never selected); its keys live in transformers'
# DynamicIndexedLayer ("indexed_attention").
def _describe_dsa(config: HybridConfig) -> list[tuple[str, str]]:
    base = describe_mla(config) if config.dsa_base == "mla" else describe_attention(config)
    return [
        *base,
        (
            "DSA",
            f"base {config.dsa_base}, selector {config.dsa_selector}, indexer {config.index_n_heads} "
            f"heads × {config.index_head_dim}, top-k {config.index_topk}, mode {config.dsa_mode}"
            + (f", pools of {config.index_pool_size}" if config.index_pool_size > 1 else ""),
        ),
    ]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def dsa_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """MLA (or GQA attention) over the top-k selected tokens, plus the lightning indexer over all of them."""
    if config.dsa_base == "mla":
        params, matmul = mla_parts(config, layer_idx)
        rope_key = mla_head_dims(config, layer_idx)[1]  # 0 in a NoPE layer (nope_layers)
        cache = config.kv_lora_rank + rope_key
        params += config.num_attention_heads if config.attention_sinks else 0  # one sink logit per head
        heads, qk, v = (
            config.num_attention_heads,
            config.qk_nope_head_dim + config.qk_rope_head_dim,
            config.v_head_dim,
        )
        q_in = config.q_lora_rank or config.hidden_size
    else:
        params, matmul = attention_parts(config, layer_idx)
        cache = 2 * config.num_key_value_heads * config.head_dim
        heads, qk, v = config.num_attention_heads, config.head_dim, config.head_dim
        q_in = config.hidden_size
    if config.shares_kv(layer_idx):
        cache = 0  # kv_source_layers: the K/V (latent) is cached once, by the source layer
    h, hi, di = config.hidden_size, config.index_n_heads, config.index_head_dim
    pool = config.index_pool_size if config.dsa_selector == "indexer" else 1
    if config.dsa_selector == "indexer" and not dsa_layer_has_indexer(config, layer_idx):
        # a "shared" layer (dsa_indexer_types): no indexer of its own, the previous full layer's top-k
        hi = di = 0
        kept = config.index_topk
    elif config.dsa_selector == "indexer":
        # wq_b (from the q latent), wk (one shared key per token), LayerNorm on k (weight + bias),
        # weights_proj.
        idx_matmul = q_in * hi * di + h * di + h * hi
        extra = (2 * q_in if config.index_q_norm else 0) + (2 * hi if config.query_log_scaling else 0)
        params, matmul, cache = params + idx_matmul + 2 * di + extra, matmul + idx_matmul, cache + di
        kept = config.index_topk
        if pool > 1:
            # pool_gate (hidden -> d_I) and pool_ape (pool × d_I); the cache holds each token's gate logits
            # too; the selection adds the query's own incomplete pool (up to pool - 1 tokens).
            # (pool_ape is 2-D: the inspector counts it with the matmul weights, as it counts every 2-D one)
            params, matmul, cache = params + h * di + pool * di, matmul + h * di + pool * di, cache + di
            kept = (config.index_topk // pool) * pool + pool - 1
    else:  # structured selector: recent window + first tokens, nothing learned
        hi = di = 0
        kept = config.dsa_local_window + config.dsa_global_tokens
    dense = config.dsa_mode != "sparse"
    if config.dsa_mode == "dense" and hi:
        # mode "dense" runs the base mixer alone (mixers/dsa.py): no indexer scores over the context, no
        # indexer keys cached (the indexer's weights are still counted, as they are in the model).
        cache, hi = cache - di * (2 if pool > 1 else 1), 0
    attend = attention_flops(heads, qk, v, None)
    if config.dsa_base == "mla" and not dense:
        # Sparse DSA on MLA runs latent MQA (mixers/dsa.py, as V3.2 does): each head scores the selected
        # cached [c_kv, k_pe] (r + dr wide) and sums c_kv (r wide); the query absorption and W_uv cost what
        # kv_b_proj costs, already in matmul_params.
        attend = attention_flops(heads, config.kv_lora_rank + rope_key, config.kv_lora_rank, None)

    def flops(context: int) -> float:
        selected = context if dense else min(context, kept)
        # indexer: q_I·k_I for every head and past token (pool), then the weighted sum over heads.
        scored = context // pool if pool > 1 else context
        return attend(selected) + 2.0 * scored * hi * (di + 1)

    return MixerCost(params, matmul, cache_per_token=cache, flops=flops)


def dsa_cost_notes(config: HybridConfig, contexts, estimate) -> list[str]:
    """A warning when the model in sparse DSA mode needs more FLOPs per token than the same model with dense
    base attention (no indexers) at some of ``contexts``: the lightning indexer scores every past token with
    ``index_n_heads × index_head_dim``, which only pays off once top-k is small next to the context and the
    attention it replaces is wider than the indexer. Empty when there is nothing to warn about."""
    if config.dsa_selector != "indexer":
        return []
    data = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # derived from mixer_types
    sparse = type(config).from_dict({**data, "dsa_mode": "sparse"})
    dense = type(config).from_dict(
        {
            **data,
            "mixer_types": [config.dsa_base if t == "dsa" else t for t in config.mixer_types],
            # dense MLA has no sinks; they cost no FLOPs worth counting here
            "attention_sinks": data.get("attention_sinks", False) and config.dsa_base != "mla",
        }
    )
    with_dsa, without = estimate(sparse, contexts), estimate(dense, contexts)
    worse = [c for c in contexts if with_dsa.flops_per_token(c) > without.flops_per_token(c)]
    if not worse:
        return []
    where = "every given context" if len(worse) == len(contexts) else ", ".join(map(format_tokens, worse))
    return [
        f"sparse DSA costs more FLOPs/token than dense {config.dsa_base} at {where}: the "
        f"{config.index_n_heads}×{config.index_head_dim} indexer costs more than top-{config.index_topk} "
        "saves; use fewer or narrower indexer heads"
    ]


# ---- cross-layer options (kv_source_layers, nope_layers, rope_learned_scale): those of the base ------------


def _dsa_kv_kind(config: HybridConfig, layer_idx: int) -> KVKind:
    """The base's keys/values; a layer with its own indexer keeps its cache layer for the indexer keys while
    it reads another layer's keys/values."""
    if config.dsa_base == "mla":
        kind = mla_kv_kind(config, layer_idx)
    else:
        kind = KVKind("kv", attention_rotates(config, layer_idx))
    if config.dsa_selector == "indexer" and dsa_layer_has_indexer(config, layer_idx):
        return replace(kind, reuse="reuse_but_indexer")
    return kind


def _dsa_rope_dims(config: HybridConfig, layer_idx: int) -> set[int]:
    """The base's rotary dims and the indexer's (its rope part: the base's, at most index_head_dim, even)."""
    if config.dsa_base == "mla":
        dims, rope = mla_rope_dims(config, layer_idx), mla_head_dims(config, layer_idx)[1]
    else:
        dims, rope = attention_rope_dims(config, layer_idx), attention_rotary_dim(config)
    if dsa_layer_has_indexer(config, layer_idx):
        index_rope = min(rope, config.index_head_dim)
        index_rope -= index_rope % 2
        if index_rope:
            dims.add(index_rope)
    return dims


def _dsa_accepts_nope(config: HybridConfig, layer_idx: int) -> bool:
    """NoPE layers of DSA on MLA (Mistral-Large-4); DSA on GQA takes none."""
    return config.dsa_base == "mla"


@register_mixer(
    "dsa",
    layer_type="indexed_attention",
    mask=_dsa_mask,
    needs_padding_mask=True,
    cost=dsa_cost,
    validate=_validate_dsa,
    describe=_describe_dsa,
    config_fields=CONFIG_FIELDS,
    lora_targets=tuple(
        dict.fromkeys(ATTENTION_LORA_TARGETS + MLA_LORA_TARGETS)
    ),  # the base's; not the indexer's,
    functional_fields=_dsa_functional_fields,
    kv_kind=_dsa_kv_kind,
    rope_dims=_dsa_rope_dims,
    accepts_nope=_dsa_accepts_nope,
    cost_notes=dsa_cost_notes,
)
def build_dsa(config: HybridConfig, layer_idx: int) -> nn.Module:
    """DSA over the dense mixer named by ``config.dsa_base``."""
    return DSAOnMLA(config, layer_idx) if config.dsa_base == "mla" else DSAOnAttention(config, layer_idx)


__all__ = [
    "DSAOnAttention",
    "DSAOnMLA",
    "DSARuntimeMode",
    "set_dsa_mode",
    "dsa_layers",
    "dsa_layer_has_indexer",
    "LightningIndexer",
    "build_dsa",
    "gather_selected_latent",
    "key_start_positions",
    "structured_indices",
]
