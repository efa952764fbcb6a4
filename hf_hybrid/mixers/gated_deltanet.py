"""Gated DeltaNet (Yang et al. 2024; Qwen3-Next's linear layers).

q, k, v from one projection, a short causal conv (SiLU) on each, q and k L2-normalised, per value head
``g = -exp(A_log) · softplus(a + dt_bias)`` (log decay) and ``β = sigmoid(b)``; the gated delta rule
(``hf_hybrid.ops.delta_rule``) mixes tokens; output ``RMSNorm(o) · silu(z)`` (norm **then** gate), then
out_proj. GVA: ``gdn_num_value_heads`` may be a multiple of ``gdn_num_key_heads``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import GatedRMSNorm
from ..ops.delta_rule import gated_delta_rule, recurrent_gated_delta_rule_step
from ..specs import ConfigField, HybridizeInit, MixerCost, register_mixer, require_positive
from .base import MixerContext
from .from_attention import common_dropped, gqa_note, identity_conv_
from .recurrent import (
    init_decay_and_dt,
    read_state,
    run_recurrence,
    short_conv,
    states_to_keep,
    write_state,
    zero_padding,
)

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig
    from ..convert.hybridize import AttentionWeights

# The config fields of Gated DeltaNet layers (flat ``HybridConfig`` attributes; GVA 2:1 like Qwen3-Next).
CONFIG_FIELDS = (
    ConfigField(
        "gdn_num_key_heads",
        None,
        "int | None",
        derive=lambda c: max(1, c.num_attention_heads // 2),
        doc="defaults: num_attention_heads // 2",
    ),
    ConfigField(
        "gdn_num_value_heads",
        None,
        "int | None",
        derive=lambda c: c.num_attention_heads,
        doc="defaults: num_attention_heads",
    ),
    ConfigField(
        "gdn_key_head_dim", None, "int | None", derive=lambda c: c.head_dim, doc="defaults: head_dim"
    ),
    ConfigField(
        "gdn_value_head_dim", None, "int | None", derive=lambda c: c.head_dim, doc="defaults: head_dim"
    ),
    ConfigField("gdn_conv_kernel_size", 4, "int"),
    ConfigField(
        "gdn_allow_neg_eigval",
        False,
        "bool",
        doc="β = 2·sigmoid(b) ∈ (0, 2): negative eigenvalues (OLMo Hybrid)",
    ),
    ConfigField(
        "gdn_norm_eps",
        None,
        "float | None",
        doc="eps of the gated output norm; None: rms_norm_eps (OLMo Hybrid: 1e-5)",
        effective=lambda c: c.gdn_norm_eps if c.gdn_norm_eps is not None else c.rms_norm_eps,
    ),
)


def _validate(config: HybridConfig) -> None:
    require_positive(
        config,
        "gdn_num_key_heads",
        "gdn_num_value_heads",
        "gdn_key_head_dim",
        "gdn_value_head_dim",
        "gdn_conv_kernel_size",
        "linear_chunk_size",
    )
    if config.gdn_norm_eps is not None and not config.gdn_norm_eps > 0:
        raise ValueError(f"HybridConfig.gdn_norm_eps={config.gdn_norm_eps!r} must be > 0 (or None)")
    if config.gdn_num_value_heads % config.gdn_num_key_heads:
        raise ValueError(
            f"HybridConfig.gdn_num_value_heads={config.gdn_num_value_heads} must be a multiple of "
            f"gdn_num_key_heads={config.gdn_num_key_heads} (GVA)"
        )


def _describe(config: HybridConfig) -> list[tuple[str, str]]:
    return [
        (
            "Gated DeltaNet",
            f"{config.gdn_num_key_heads} key heads × {config.gdn_key_head_dim}, {config.gdn_num_value_heads} "
            f"value heads × {config.gdn_value_head_dim}, conv {config.gdn_conv_kernel_size}",
        )
    ]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def gated_deltanet_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """Qwen3-Next's layout: in_proj_qkvz, in_proj_ba, depthwise conv on q,k,v, A_log, dt_bias, gated norm,
    out_proj."""
    h, hk, hv = config.hidden_size, config.gdn_num_key_heads, config.gdn_num_value_heads
    dk, dv, k = config.gdn_key_head_dim, config.gdn_value_head_dim, config.gdn_conv_kernel_size
    conv_channels = 2 * hk * dk + hv * dv
    matmul = h * (2 * hk * dk + 2 * hv * dv) + h * 2 * hv + conv_channels * k + hv * dv * h
    params = matmul + 2 * hv + dv
    state = conv_channels * (k - 1) + hv * dk * dv
    # Per token and value head: decay S (dk·dv), Sᵀk (2·dk·dv), S += k uᵀ (2·dk·dv), Sᵀq (2·dk·dv).
    step = 7.0 * hv * dk * dv
    return MixerCost(
        params, matmul, state_elements=state, flops=lambda c: step, state_fp32_elements=hv * dk * dv
    )


# ---- from attention (hf_hybrid.convert.hybridize: what this kind inherits from an attention layer) ---------


def _hybridize_geometry(config: HybridConfig) -> dict[str, Any]:
    h, d = config.num_attention_heads, config.head_dim
    return {"gdn_num_key_heads": h, "gdn_num_value_heads": h, "gdn_key_head_dim": d, "gdn_value_head_dim": d}


def _hybridize_apply(mixer: nn.Module, w: AttentionWeights, config: HybridConfig) -> list[str]:
    notes = []
    with torch.no_grad():
        qkvz = mixer.in_proj_qkvz.weight  # rows: q (h·d), k (h·d), v (h·d), z (h·d)
        n = w.heads * w.q.shape[1]
        qkvz[:n] = w.query()
        qkvz[n : 2 * n] = w.key()
        qkvz[2 * n : 3 * n] = w.value()
        if w.gate is not None:
            qkvz[3 * n :] = w.gate.reshape(n, -1)
        mixer.in_proj_ba.weight.zero_()  # β = sigmoid(0) = ½, a = 0: decay = -exp(A_log)·softplus(dt_bias)
        identity_conv_(mixer.conv1d)
        mixer.out_proj.weight.copy_(w.o)
    if w.q_bias is not None:
        notes.append("q/k/v biases dropped")
    return notes


def _hybridize_statement(config: HybridConfig) -> dict[str, list[str]]:
    gqa = gqa_note(config)
    z = (
        "z (output gate) ← the attention's sigmoid output-gate rows (used as silu(z))"
        if config.attention_output_gate
        else f"z (output gate): N(0, {config.initializer_range}²) (the model's init)"
    )
    return {
        "inherited": [
            "q ← W_q" + (" (q_norm weight folded in)" if config.use_qk_norm else ""),
            "k ← W_k"
            + (" (k_norm weight folded in)" if config.use_qk_norm else "")
            + (f", {gqa}" if gqa else ""),
            "v ← W_v" + (f", {gqa}" if gqa else ""),
            "out_proj ← W_o",
        ]
        + ([z] if config.attention_output_gate else []),
        "new": ([] if config.attention_output_gate else [z])
        + [
            "in_proj_ba = 0: β = ½ and a = 0 for every token at the start",
            "A_log = log U[1, 16], dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 1e-1]: "
            "per-head log decay g = −exp(A_log)·softplus(dt_bias) (GatedDeltaNet.init_hybrid_weights)",
            "conv1d: identity (last tap 1, others 0)",
            "norm weight = 1",
        ],
        "dropped": common_dropped(config)
        + [
            "the output is RMSNorm(o)·silu(z): q, k L2-normalised and SiLU "
            "after the conv, so the start is not the attention's function"
        ],
    }


@register_mixer(
    "gated_deltanet",
    layer_type="linear_attention",
    recurrent=True,
    cost=gated_deltanet_cost,
    validate=_validate,
    describe=_describe,
    config_fields=CONFIG_FIELDS,
    hybridize_init=HybridizeInit(_hybridize_geometry, _hybridize_apply, _hybridize_statement),
    lora_targets=("in_proj_qkvz", "in_proj_ba", "out_proj"),
)
class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_k_heads = config.gdn_num_key_heads
        self.num_v_heads = config.gdn_num_value_heads
        self.head_k_dim = config.gdn_key_head_dim
        self.head_v_dim = config.gdn_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        conv_dim = 2 * self.key_dim + self.value_dim

        self.in_proj_qkvz = nn.Linear(config.hidden_size, conv_dim + self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(config.hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.gdn_conv_kernel_size, groups=conv_dim, padding=0, bias=False
        )
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        norm_eps = config.gdn_norm_eps if config.gdn_norm_eps is not None else config.rms_norm_eps
        self.norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)

    def init_hybrid_weights(self, init, config: HybridConfig) -> None:
        init_decay_and_dt(init, self.A_log, self.dt_bias, config)  # per value head

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        state = read_state(ctx, self.layer_idx)
        keep = states_to_keep(ctx, t)
        x = zero_padding(hidden_states, ctx)
        mixed, z = self.in_proj_qkvz(x).split([2 * self.key_dim + self.value_dim, self.value_dim], dim=-1)
        beta_logit, a = self.in_proj_ba(x).float().chunk(2, dim=-1)  # (B, T, Hv)
        mixed, conv_states = short_conv(mixed, self.conv1d, ctx, state, keep=keep)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(b, t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(b, t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(b, t, self.num_v_heads, self.head_v_dim)

        beta = beta_logit.sigmoid()
        if self.config.gdn_allow_neg_eigval:  # β ∈ (0, 2): I - β k kᵀ may have a negative eigenvalue
            beta = beta * 2.0
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())  # log decay, fp32
        # Padded positions must leave the state untouched: no decay (g = 0) and no write (β = 0).
        beta, g = zero_padding(beta, ctx), zero_padding(g, ctx)

        scale = self.head_k_dim**-0.5

        def full(lo: int, hi: int, initial: torch.Tensor | None):
            return gated_delta_rule(
                q[:, lo:hi],
                k[:, lo:hi],
                v[:, lo:hi],
                g[:, lo:hi],
                beta[:, lo:hi],
                scale=scale,
                initial_state=initial,
                output_final_state=ctx.cache is not None,
                cu_seqlens=ctx.cu_seqlens,
                use_qk_l2norm=True,
                chunk_size=self.config.linear_chunk_size,
                backend=self.config.linear_backend,
            )

        def step(i: int, s: torch.Tensor | None):
            return recurrent_gated_delta_rule_step(
                q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s, scale=scale, use_qk_l2norm=True
            )

        o, recurrent = run_recurrence(state, t, keep, full=full, step=step)
        write_state(ctx, self.layer_idx, conv_states, recurrent, t)
        o = self.norm(o, z.reshape(b, t, self.num_v_heads, self.head_v_dim))
        return self.out_proj(o.reshape(b, t, self.value_dim))
