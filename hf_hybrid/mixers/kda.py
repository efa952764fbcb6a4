"""Kimi Delta Attention (Kimi Linear's linear layers, Moonshot AI 2025), ``mixer_types`` value ``"kda"``.

Per layer, with H = ``kda_num_heads`` heads of D = ``kda_head_dim`` (q, k and v alike) and r =
``kda_gate_rank``:

1. ``q, k, v = q_proj(x), k_proj(x), v_proj(x)``, one depthwise causal conv (SiLU) over the concatenation
   [q, k, v] (``conv1d``, no bias), then q and k L2-normalised per head (``x / sqrt(Σx² + 1e-6)``).
2. forget gate, low rank and **per channel**: ``g = -exp(A_log[h]) · softplus(f_b_proj(f_a_proj(x)) +
   dt_bias)`` [B, T, H, D] (log decay; ``dt_bias`` one per channel, ``A_log`` one per head), kept in fp32.
   With ``kda_gate_lower_bound`` = lb < 0 (GLM-5-Next's ``linear_lower_bound``, fla's "safe gate") the log
   decay is bounded instead: ``g = lb · sigmoid(exp(A_log[h]) · (f_b_proj(f_a_proj(x)) + dt_bias))`` in
   (lb, 0), and ``A_log`` starts at 0.
3. ``beta = sigmoid(b_proj(x))`` one per head; Kimi Delta Attention (``hf_hybrid.ops.delta_rule``) mixes
   tokens.
4. output: ``o_norm(o, g_b_proj(g_a_proj(x)))`` = RMSNorm per head **then** a **sigmoid** gate (Gated
   DeltaNet's gate is SiLU), then ``o_proj``.

Parameter names and shapes are transformers 5.24's ``KimiLinearDeltaAttention`` ones (``self_attn.*`` there,
``mixer.*`` here), so importing or exporting a ``kimi_linear`` layer is a rename: ``q_proj``, ``k_proj``,
``v_proj``, ``conv1d`` (channels [q, k, v], the three convs of Moonshot's checkpoint concatenated, as
transformers does), ``forget_gate.f_a_proj``, ``forget_gate.f_b_proj``, ``forget_gate.dt_bias`` [H·D],
``b_proj``, ``g_a_proj``, ``g_b_proj``, ``o_norm.weight`` [D], ``o_proj``; and ``forget_gate.A_log``, which is
[H] here (a vector, like Gated DeltaNet's, so the cost inspector counts it as one) and [1, 1, H, 1] there: a
reshape.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import GatedRMSNorm
from ..ops.delta_rule import kda, recurrent_kda_step
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

# The config fields of Kimi Delta Attention layers (Kimi Linear's linear layers).
CONFIG_FIELDS = (
    ConfigField(
        "kda_num_heads",
        None,
        "int | None",
        derive=lambda c: c.num_attention_heads,
        doc="defaults: num_attention_heads",
    ),
    ConfigField(
        "kda_head_dim",
        None,
        "int | None",
        derive=lambda c: c.head_dim,
        doc="defaults: head_dim (q, k and v heads alike, as in Kimi Linear)",
    ),
    ConfigField(
        "kda_gate_rank",
        None,
        "int | None",
        derive=lambda c: c.kda_head_dim,
        doc="width of the low-rank forget / output gates; defaults: kda_head_dim",
    ),
    ConfigField("kda_conv_kernel_size", 4, "int"),
    ConfigField(
        "kda_gate_lower_bound",
        None,
        "float | None",
        doc="None: g = -exp(A_log)·softplus(a); lb < 0: g = lb·sigmoid(exp(A_log)·a), bounded (GLM-5-Next)",
    ),
)


class KDAForgetGate(nn.Module):
    """``g = -exp(A_log) · softplus(a)``, or ``lower_bound · sigmoid(exp(A_log) · a)`` with
    ``kda_gate_lower_bound``, where ``a = f_b_proj(f_a_proj(x)) + dt_bias``: x [B, T, hidden] -> fp32 [B, T,
    H, D]."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.kda_num_heads, config.kda_head_dim
        width = self.num_heads * self.head_dim
        self.f_a_proj = nn.Linear(config.hidden_size, config.kda_gate_rank, bias=False)
        self.f_b_proj = nn.Linear(config.kda_gate_rank, width, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))  # transformers keeps it [1, 1, H, 1]
        self.dt_bias = nn.Parameter(torch.zeros(width))
        self.lower_bound = config.kda_gate_lower_bound

    def init_hybrid_weights(self, init, config: HybridConfig) -> None:
        init_decay_and_dt(init, self.A_log, self.dt_bias, config)  # A per head, dt per channel (fla's KDA)
        if self.lower_bound is not None:  # the bounded gate starts at A = exp(0) = 1 (fla, GLM-5-Next)
            init.zeros_(self.A_log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        a = a.view(b, t, self.num_heads, self.head_dim)
        rate = self.A_log.float().exp()[:, None]
        if self.lower_bound is not None:
            return self.lower_bound * torch.sigmoid(rate * a)
        return -rate * F.softplus(a)


def _validate(config: HybridConfig) -> None:
    require_positive(
        config, "kda_num_heads", "kda_head_dim", "kda_gate_rank", "kda_conv_kernel_size", "linear_chunk_size"
    )
    bound = config.kda_gate_lower_bound
    if bound is not None and (
        isinstance(bound, bool) or not isinstance(bound, (int, float)) or not -math.inf < bound < 0
    ):
        raise ValueError(
            f"HybridConfig.kda_gate_lower_bound={bound!r} must be a finite negative number (the least log "
            "decay per step, e.g. -5.0) or None (the unbounded softplus gate)"
        )


def _describe(config: HybridConfig) -> list[tuple[str, str]]:
    return [
        (
            "Kimi Delta Attention",
            f"{config.kda_num_heads} heads × {config.kda_head_dim}, per-channel decay"
            + (
                f" bounded below by {config.kda_gate_lower_bound}"
                if config.kda_gate_lower_bound is not None
                else ""
            )
            + f", gate rank {config.kda_gate_rank}, conv {config.kda_conv_kernel_size}",
        )
    ]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def kda_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """Kimi Linear's layout: q/k/v projections, depthwise conv on [q, k, v], low-rank forget gate (f_a, f_b,
    A_log per head, dt_bias per channel), b_proj (β per head), low-rank output gate (g_a, g_b), sigmoid-gated
    norm, o_proj."""
    h, nh, d, r, k = (
        config.hidden_size,
        config.kda_num_heads,
        config.kda_head_dim,
        config.kda_gate_rank,
        config.kda_conv_kernel_size,
    )
    w = nh * d
    matmul = 4 * h * w + 3 * w * k + 2 * (h * r + r * w) + h * nh
    params = matmul + nh + w + d  # A_log, dt_bias, o_norm
    # The conv tail is cached in the model dtype; the recurrent state S [nh, d, d] is kept in fp32
    # (ops.delta_rule).
    # Per token and head: decay S (d·d), Sᵀk (2·d·d), S += k uᵀ (2·d·d), Sᵀq (2·d·d).
    step = 7.0 * nh * d * d
    recurrent = nh * d * d
    return MixerCost(
        params,
        matmul,
        state_elements=3 * w * (k - 1) + recurrent,
        state_fp32_elements=recurrent,
        flops=lambda c: step,
    )


# ---- from attention (hf_hybrid.convert.hybridize: what this kind inherits from an attention layer) ---------


def _hybridize_geometry(config: HybridConfig) -> dict[str, Any]:
    return {"kda_num_heads": config.num_attention_heads, "kda_head_dim": config.head_dim}


def _hybridize_apply(mixer: nn.Module, w: AttentionWeights, config: HybridConfig) -> list[str]:
    with torch.no_grad():
        mixer.q_proj.weight.copy_(w.query())
        mixer.k_proj.weight.copy_(w.key())
        mixer.v_proj.weight.copy_(w.value())
        mixer.o_proj.weight.copy_(w.o)
        identity_conv_(mixer.conv1d)
        mixer.b_proj.weight.zero_()  # β = ½
        mixer.forget_gate.f_b_proj.weight.zero_()  # g = -exp(A_log)·softplus(dt_bias), per channel
    notes = ["q/k/v biases dropped"] if w.q_bias is not None else []
    if w.gate is not None:
        notes.append("attention output gate not inherited (KDA's gate is low rank)")
    return notes


def _hybridize_statement(config: HybridConfig) -> dict[str, list[str]]:
    gqa = gqa_note(config)
    return {
        "inherited": [
            "q_proj ← W_q" + (" (q_norm weight folded in)" if config.use_qk_norm else ""),
            "k_proj ← W_k"
            + (" (k_norm weight folded in)" if config.use_qk_norm else "")
            + (f", {gqa}" if gqa else ""),
            "v_proj ← W_v" + (f", {gqa}" if gqa else ""),
            "o_proj ← W_o",
        ],
        "new": [
            "b_proj = 0: β = ½ for every token at the start",
            (
                "forget gate: f_b_proj = 0, so g = −exp(A_log)·softplus(dt_bias) per channel (A_log = log "
                "U[1, 16], dt log-uniform in [1e-3, 1e-1], KDAForgetGate's init); f_a_proj: the model's init"
                if config.kda_gate_lower_bound is None
                else f"forget gate: f_b_proj = 0, so g = {config.kda_gate_lower_bound}·sigmoid(dt_bias) per "
                "channel (A_log = 0, dt log-uniform in [1e-3, 1e-1], KDAForgetGate's init); f_a_proj: the "
                "model's init"
            ),
            f"output gate g_a_proj, g_b_proj (rank {config.kda_gate_rank}): the model's init, "
            "sigmoid(≈0) ≈ ½",
            "conv1d: identity (last tap 1, others 0)",
            "o_norm weight = 1",
        ],
        "dropped": common_dropped(config)
        + (["the attention's output gate (KDA's is low rank)"] if config.attention_output_gate else []),
    }


@register_mixer(
    "kda",
    layer_type="linear_attention",
    recurrent=True,
    cost=kda_cost,
    validate=_validate,
    describe=_describe,
    config_fields=CONFIG_FIELDS,
    hybridize_init=HybridizeInit(_hybridize_geometry, _hybridize_apply, _hybridize_statement),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)
class KimiDeltaAttention(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.kda_num_heads
        self.head_dim = config.kda_head_dim
        width = self.num_heads * self.head_dim
        self.width = width

        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.conv1d = nn.Conv1d(
            3 * width, 3 * width, config.kda_conv_kernel_size, groups=3 * width, padding=0, bias=False
        )
        self.forget_gate = KDAForgetGate(config)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(config.hidden_size, config.kda_gate_rank, bias=False)
        self.g_b_proj = nn.Linear(config.kda_gate_rank, width, bias=False)
        self.o_norm = GatedRMSNorm(
            self.head_dim, eps=config.rms_norm_eps, norm_before_gate=True, gate_activation="sigmoid"
        )
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        heads = (b, t, self.num_heads, self.head_dim)
        state = read_state(ctx, self.layer_idx)
        keep = states_to_keep(ctx, t)
        x = zero_padding(hidden_states, ctx)
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        mixed, conv_states = short_conv(mixed, self.conv1d, ctx, state, keep=keep)
        q, k, v = (y.reshape(heads) for y in mixed.split(self.width, dim=-1))

        g = self.forget_gate(x)  # (B, T, H, D) fp32 log decay
        beta = self.b_proj(x).float().sigmoid()  # (B, T, H)
        # Padded positions must leave the state untouched: no decay (g = 0) and no write (β = 0).
        g, beta = zero_padding(g, ctx), zero_padding(beta, ctx)

        def full(lo: int, hi: int, initial: torch.Tensor | None):
            return kda(
                q[:, lo:hi],
                k[:, lo:hi],
                v[:, lo:hi],
                g[:, lo:hi],
                beta[:, lo:hi],
                initial_state=initial,
                output_final_state=ctx.cache is not None,
                cu_seqlens=ctx.cu_seqlens,
                use_qk_l2norm=True,
                chunk_size=self.config.linear_chunk_size,
                backend=self.config.linear_backend,
            )

        def step(i: int, s: torch.Tensor | None):
            return recurrent_kda_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s, use_qk_l2norm=True)

        o, recurrent = run_recurrence(state, t, keep, full=full, step=step)
        write_state(ctx, self.layer_idx, conv_states, recurrent, t)
        o = self.o_norm(o, self.g_b_proj(self.g_a_proj(x)).reshape(heads))
        return self.o_proj(o.reshape(b, t, self.width))
