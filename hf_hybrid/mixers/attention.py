"""Softmax attention: MHA / GQA / MQA, optional sliding window, partial RoPE, q/k RMSNorm per head (Qwen3) or
over the whole projection (OLMoE, ``qk_norm_scope="full"``), q/k/v clipping (OLMoE's ``clip_qkv``), q/k/v bias
(Qwen2), a sigmoid output gate (Qwen3-Next) and a per-layer multiplier of the attention logits
(``attention_logit_multipliers``, Ergo's ``global_attention_scale``). The kernel comes from transformers'
attention interface (``eager``, ``sdpa``, ``flash_attention_2``, ``flex_attention``) chosen by
``config._attn_implementation``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..layers import LogPositionQueryScale, RMSNorm, apply_rope, repeat_kv
from ..specs import ConfigField, KVKind, MixerCost, register_mixer
from .base import MixerContext

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig

# The projections PEFT's default LoRA config adapts (by name suffix).
ATTENTION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The config fields that decide a softmax attention layer's function (a native export compares them).
GQA_FIELDS = (
    "num_key_value_heads",
    "head_dim",
    "use_qk_norm",
    "attention_output_gate",
    "attention_bias",
    "attention_rope",
    "attention_scaling",
    "attention_sinks",
    "attention_logit_multipliers",
)
SOFTMAX_KINDS = ("attention", "sliding_attention")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious path: q,k,v [B, h, T, d]; additive or boolean mask [B, 1, T, S]; returns [B, T, h, dv]."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        # one extra logit per head in the softmax, whose probability multiplies no value (then dropped)
        b, h, t, _ = scores.shape
        scores = torch.cat([scores, sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1].to(query.dtype)
    else:
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def logit_multiplier(config: HybridConfig, layer_idx: int) -> float:
    """The factor on layer ``layer_idx``'s attention logits (``attention_logit_multipliers``; 1.0 if None)."""
    values = getattr(config, "attention_logit_multipliers", None)
    return 1.0 if values is None else float(values[layer_idx])


def _effective_multipliers(config: HybridConfig) -> list[float] | None:
    """All ones and None mean the same function (what a native export's round trip compares)."""
    values = config.attention_logit_multipliers
    return None if values is None or all(v == 1 for v in values) else [float(v) for v in values]


def _check_multipliers(config: HybridConfig, name: str) -> None:
    values, n = getattr(config, name), config.num_hidden_layers
    if values is None:
        return
    if (
        not isinstance(values, (list, tuple))
        or len(values) != n
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ValueError(
            f"HybridConfig.{name}={values!r} must be None or {n} positive numbers, one per layer"
        )
    for i, (mixer, v) in enumerate(zip(config.mixer_types, values)):
        if v != 1 and mixer not in SOFTMAX_KINDS:
            raise ValueError(
                f"HybridConfig.{name}[{i}]={v!r}: layer {i} is mixer_types[{i}]={mixer!r}; a multiplier "
                f"other than 1 applies to softmax attention layers ({', '.join(SOFTMAX_KINDS)}) only"
            )


LOGIT_MULTIPLIERS = ConfigField(
    "attention_logit_multipliers",
    None,
    type="list[float] | None",
    check=_check_multipliers,
    effective=_effective_multipliers,
    doc="per layer, a factor on the q·k logits of a softmax attention layer (on top of the softmax scale: "
    "Ergo's global_attention_scale); 1 elsewhere; None: all 1",
)


def validate_gqa(config: HybridConfig) -> None:
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"HybridConfig.num_key_value_heads={config.num_key_value_heads} must divide "
            f"num_attention_heads={config.num_attention_heads} (GQA groups)"
        )


def _validate_sliding(config: HybridConfig) -> None:
    validate_gqa(config)
    if config.sliding_window is None or config.sliding_window <= 0:
        raise ValueError(
            f"HybridConfig.sliding_window={config.sliding_window!r} must be a positive integer when "
            "mixer_types contains 'sliding_attention'"
        )


def describe_attention(config: HybridConfig) -> list[tuple[str, str]]:
    extras = [
        n
        for n, on in (
            ("qk-norm", config.use_qk_norm),
            ("output gate", config.attention_output_gate),
            ("qkv bias", config.attention_bias),
            ("no RoPE", not config.attention_rope),
            (f"no RoPE in layers {config.nope_layers}", config.attention_rope and bool(config.nope_layers)),
            (f"scale {config.attention_scaling}", config.attention_scaling is not None),
            ("attention sinks", config.attention_sinks),
            (
                f"logit multipliers {_effective_multipliers(config)}",
                _effective_multipliers(config) is not None,
            ),
        )
        if on
    ]
    heads = (
        f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, head dim "
        f"{config.head_dim}" + (f" ({', '.join(extras)})" if extras else "")
    )
    return [("attention", heads)]


def _describe_sliding(config: HybridConfig) -> list[tuple[str, str]]:
    return [*describe_attention(config), ("sliding window", str(config.sliding_window))]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def attention_parts(config: HybridConfig, layer_idx: int | None = None) -> tuple[int, int]:
    """(params, matmul params) of the softmax-attention projections of layer ``layer_idx``, as
    ``mixers/attention.py`` builds them (None: a layer that owns its keys/values)."""
    h, nq, nkv, d = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    # a layer sharing an earlier layer's keys/values (kv_source_layers) has no k/v projections nor k norm
    kv = 0 if layer_idx is not None and config.shares_kv(layer_idx) else 1
    q_out = nq * d * (2 if config.attention_output_gate else 1)
    matmul = h * q_out + kv * 2 * h * nkv * d + nq * d * h
    bias = (q_out + kv * 2 * nkv * d) if config.attention_bias else 0
    norms = (
        (d + kv * d if config.qk_norm_scope == "head" else (nq + kv * nkv) * d) if config.use_qk_norm else 0
    )
    sinks = nq if getattr(config, "attention_sinks", False) else 0
    scaling = 2 * nq if getattr(config, "query_log_scaling", False) else 0
    return matmul + bias + norms + sinks + scaling, matmul


def attention_flops(heads: int, qk_dim: int, v_dim: int, window: int | None) -> Callable[[int], float]:
    # Scores q·k over the visible tokens (2·qk_dim each) and the weighted sum of values (2·v_dim each), per
    # head.
    def flops(context: int) -> float:
        visible = context if window is None else min(context, window)
        return 2.0 * visible * heads * (qk_dim + v_dim)

    return flops


def attention_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    params, matmul = attention_parts(config, layer_idx)
    nq, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cache = 0 if config.shares_kv(layer_idx) else 2 * nkv * d  # a shared K/V is cached once, by its source
    return MixerCost(params, matmul, cache_per_token=cache, flops=attention_flops(nq, d, d, None))


def sliding_attention_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    params, matmul = attention_parts(config, layer_idx)
    nq, nkv, d, w = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.sliding_window,
    )
    cache = 0 if config.shares_kv(layer_idx) else 2 * nkv * d
    return MixerCost(
        params, matmul, cache_per_token=cache, cache_window=w, flops=attention_flops(nq, d, d, w)
    )


# ---- cross-layer options (kv_source_layers, nope_layers, rope_learned_scale) -------------------------------


def attention_rotary_dim(config: HybridConfig) -> int:
    """The rotary channels per head of a softmax attention layer (``partial_rotary_factor`` of head_dim)."""
    prf = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return int(config.head_dim * prf) if config.head_dim else 0


def attention_rotates(config: HybridConfig, layer_idx: int) -> bool:
    """Whether attention layer ``layer_idx`` applies RoPE (``attention_rope``, less ``nope_layers``)."""
    return config.attention_rope and layer_idx not in (config.nope_layers or ())


def attention_rope_dims(config: HybridConfig, layer_idx: int) -> set[int]:
    return {attention_rotary_dim(config)} if attention_rotates(config, layer_idx) else set()


def _accepts_nope(config: HybridConfig, layer_idx: int) -> bool:
    return True


@register_mixer(
    "sliding_attention",
    layer_type="sliding_attention",
    mask="sliding_attention",
    cost=sliding_attention_cost,
    validate=_validate_sliding,
    describe=_describe_sliding,
    lora_targets=ATTENTION_LORA_TARGETS,
    functional_fields=lambda config: (*GQA_FIELDS, "sliding_window"),
    kv_kind=lambda config, layer_idx: KVKind("sliding_kv", attention_rotates(config, layer_idx)),
    rope_dims=attention_rope_dims,
    accepts_nope=_accepts_nope,
)
@register_mixer(
    "attention",
    layer_type="full_attention",
    mask="full_attention",
    cost=attention_cost,
    validate=validate_gqa,
    config_fields=(LOGIT_MULTIPLIERS,),
    describe=describe_attention,
    lora_targets=ATTENTION_LORA_TARGETS,
    functional_fields=lambda config: GQA_FIELDS,
    kv_kind=lambda config, layer_idx: KVKind("kv", attention_rotates(config, layer_idx)),
    rope_dims=attention_rope_dims,
    accepts_nope=_accepts_nope,
)
class HybridAttention(nn.Module):
    def returns_attention_weights(self) -> bool:
        """Eager attention hands its probabilities to ``ctx.attentions`` (``output_attentions=True``)."""
        return True

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        scale = self.head_dim**-0.5 if config.attention_scaling is None else config.attention_scaling
        # attention_logit_multipliers: a factor on this layer's logits, folded into the scale that every
        # kernel of transformers' interface (eager, sdpa, flash, flex) applies to q·k
        self.scaling = scale * logit_multiplier(config, layer_idx)
        self.use_rope = config.attention_rope and layer_idx not in (config.nope_layers or ())
        self.is_causal = True
        self.is_sliding = config.mixer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.output_gate = config.attention_output_gate
        rope_factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        self.rotary_dim = int(self.head_dim * rope_factor)

        q_out = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        # kv_source_layers: a layer reading an earlier layer's keys/values has no K/V projections of its own
        self.kv_source = config.kv_source(layer_idx)
        self.shares_kv = self.kv_source != layer_idx
        self.stores_kv = config.is_kv_source(layer_idx)
        if not self.shares_kv:
            self.k_proj = nn.Linear(
                config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias
            )
            self.v_proj = nn.Linear(
                config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias
            )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # q/k RMSNorm per head (Qwen3) or over the whole projection (OLMoE: qk_norm_scope="full").
        self.qk_norm_full = config.qk_norm_scope == "full"
        q_dim = self.num_heads * self.head_dim if self.qk_norm_full else self.head_dim
        k_dim = self.num_key_value_heads * self.head_dim if self.qk_norm_full else self.head_dim
        if config.use_qk_norm:
            self.q_norm = RMSNorm(q_dim, eps=config.rms_norm_eps)
            self.k_norm = None if self.shares_kv else RMSNorm(k_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.clip_qkv = config.clip_qkv
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None
        self.softmax_scaling = LogPositionQueryScale(self.num_heads) if config.query_log_scaling else None

    def project(
        self, hidden_states: torch.Tensor, ctx: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q [B, h, T, d], k and v [B, hkv, S, d] (RoPE applied, cache appended), gate [B, T, h·d] or None."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states)
        gate = None
        if self.output_gate:
            q, gate = q.view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(b, t, -1)
        q = q.reshape(b, t, self.num_heads, self.head_dim)  # (B, T, h, d)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(b, t, -1)).view_as(q) if self.qk_norm_full else self.q_norm(q)
        if self.clip_qkv is not None:
            q = q.clamp(-self.clip_qkv, self.clip_qkv)
        cos, sin = ctx.rope(self.rotary_dim) if self.use_rope else (None, None)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
        if self.softmax_scaling is not None:  # query_log_scaling: per head and position
            q = self.softmax_scaling(q, ctx.position_ids)
        q = q.transpose(1, 2)  # (B, h, T, d)
        if self.shares_kv:
            # The source layer's keys (already normed, clipped, rotated) and values, cache included.
            k, v = ctx.kv_from_source(self.layer_idx, self.kv_source)
            return q, k, v, gate
        k = self.k_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k.reshape(b, t, -1)).view_as(k) if self.qk_norm_full else self.k_norm(k)
        if self.clip_qkv is not None:
            k, v = (x.clamp(-self.clip_qkv, self.clip_qkv) for x in (k, v))
        if self.use_rope:
            k = apply_rope(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, hkv, T, d)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)
        if self.stores_kv:  # read by the layers that share them (kv_source_layers)
            ctx.shared_kv[self.layer_idx] = (k, v)
        return q, k, v, gate

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        """Dense attention through transformers' interface; returns [B, T, h, d]. With sinks, the eager path
        (the only one of transformers' kernels here that every backend runs with sinks)."""
        implementation = "eager" if self.sinks is not None else self.config._attn_implementation
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        mask = ctx.masks.get("sliding_attention" if self.is_sliding else "full_attention")
        if mask is None and implementation != self.config._attn_implementation and q.shape[2] > 1:
            mask = self._causal_mask(q.shape[2], k.shape[2], q.device)  # sdpa's None means "is_causal"
        out, probs = interface(
            self,
            q,
            k,
            v,
            mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **ctx.attn_kwargs,
        )
        if ctx.output_attentions and probs is not None:
            ctx.attentions.append((self.layer_idx, probs))  # (B, h, T, S)
        return out

    def _causal_mask(self, t: int, s: int, device: torch.device) -> torch.Tensor:
        """[1, 1, T, S] bool, True where query i (at position S - T + i) may see key j: what a backend's
        ``mask=None`` (is_causal, no padding) stands for, for the eager path sinks run on."""
        i = torch.arange(t, device=device)[:, None] + (s - t)
        j = torch.arange(s, device=device)[None, :]
        visible = j <= i
        if self.sliding_window is not None:
            visible &= j > i - self.sliding_window
        return visible[None, None]

    def output(self, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """[B, T, h, d] -> [B, T, hidden]: output gate (if any), then o_proj."""
        b, t = out.shape[:2]
        out = out.reshape(b, t, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        q, k, v, gate = self.project(hidden_states, ctx)
        return self.output(self.attend(q, k, v, ctx), gate)
