"""Mamba-2 (SSD, Dao & Gu 2024).

``in_proj`` gives (z, x, B, C, dt); a short causal conv (SiLU) runs over [x, B, C]; per head
``A = -exp(A_log)``, ``Δ = softplus(dt + dt_bias)`` (optionally clamped to ``mamba_dt_limit``),
``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_tᵀ``, ``y_t = C_tᵀ h_t + D ⊙ x_t``; B and C are shared by the heads of
a group (``mamba_n_groups``). Output gate **then** norm: ``RMSNorm(y · silu(z))`` per group (Mamba-2's
norm_before_gate=False), then out_proj. The scan is simple GLA with q = C, k = B, v = Δ·x, g = Δ·A, scale = 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import GatedRMSNorm
from ..ops.simple_gla import recurrent_simple_gla_step, simple_gla
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

# The config fields of Mamba-2 layers. mamba_dt_min / mamba_dt_max / mamba_dt_init_floor initialise dt of
# every selective-state mixer (Mamba-2, Gated DeltaNet, KDA): log-uniform in [min, max].
CONFIG_FIELDS = (
    ConfigField(
        "mamba_num_heads",
        None,
        "int | None",
        derive=lambda c: (
            max(1, c.mamba_expand * c.hidden_size // c.mamba_head_dim) if c.mamba_head_dim else None
        ),
        doc="defaults: expand * hidden_size // mamba_head_dim",
    ),
    ConfigField("mamba_head_dim", 64, "int"),
    ConfigField("mamba_expand", 2, "int"),
    ConfigField("mamba_state_size", 128, "int"),
    ConfigField("mamba_n_groups", 1, "int"),
    ConfigField("mamba_conv_kernel_size", 4, "int"),
    ConfigField("mamba_dt_min", 0.001, "float"),
    ConfigField("mamba_dt_max", 0.1, "float"),
    ConfigField("mamba_dt_init_floor", 1e-4, "float"),
    ConfigField(
        "mamba_dt_limit", None, "list[float] | None", doc="[min, max] clamp of softplus(dt); None = no clamp"
    ),
    ConfigField(
        "mamba_conv_bias",
        True,
        "bool",
        doc="bias on the short conv over [x, B, C] (Mamba-2, Bamba; some checkpoints drop it)",
    ),
)


def _validate(config: HybridConfig) -> None:
    require_positive(
        config,
        "mamba_num_heads",
        "mamba_head_dim",
        "mamba_state_size",
        "mamba_n_groups",
        "mamba_conv_kernel_size",
        "linear_chunk_size",
    )
    if config.mamba_num_heads % config.mamba_n_groups:
        raise ValueError(
            f"HybridConfig.mamba_n_groups={config.mamba_n_groups} must divide "
            f"mamba_num_heads={config.mamba_num_heads}"
        )
    limit = config.mamba_dt_limit
    if limit is not None and (len(limit) != 2 or not 0 <= limit[0] < limit[1]):
        raise ValueError(f"HybridConfig.mamba_dt_limit={limit!r} must be [min, max] with 0<=min<max")


def _describe(config: HybridConfig) -> list[tuple[str, str]]:
    return [
        (
            "Mamba-2",
            f"{config.mamba_num_heads} heads × {config.mamba_head_dim}, state {config.mamba_state_size}, "
            f"groups {config.mamba_n_groups}, conv {config.mamba_conv_kernel_size}",
        )
    ]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def mamba2_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """Mamba-2 (transformers' layout): in_proj -> [z, x, B, C, dt], conv (with bias) on [x, B, C], A_log, D,
    dt_bias, gated RMSNorm, out_proj."""
    h, nh, p = config.hidden_size, config.mamba_num_heads, config.mamba_head_dim
    g, n, k = config.mamba_n_groups, config.mamba_state_size, config.mamba_conv_kernel_size
    inner = nh * p
    conv_channels = inner + 2 * g * n
    matmul = h * (2 * inner + 2 * g * n + nh) + conv_channels * k + inner * h
    params = matmul + (conv_channels if config.mamba_conv_bias else 0) + 3 * nh + inner
    state = conv_channels * (k - 1) + nh * p * n
    # Per token and head: decay h (p·n), h += Δ·B xᵀ (2·p·n), y = Cᵀh (2·p·n).
    step = 5.0 * nh * p * n
    return MixerCost(
        params, matmul, state_elements=state, flops=lambda c: step, state_fp32_elements=nh * p * n
    )


# ---- from attention (hf_hybrid.convert.hybridize: what this kind inherits from an attention layer) ---------


def _hybridize_geometry(config: HybridConfig) -> dict[str, Any]:
    h, d = config.num_attention_heads, config.head_dim
    return {"mamba_num_heads": h, "mamba_head_dim": d, "mamba_state_size": d, "mamba_n_groups": h}


def _hybridize_apply(mixer: nn.Module, w: AttentionWeights, config: HybridConfig) -> list[str]:
    d = w.q.shape[1]
    n = w.heads * d  # d_inner = G·N = h·d
    with torch.no_grad():
        proj = mixer.in_proj.weight  # rows: z (d_inner), x (d_inner), B (G·N), C (G·N), dt (H)
        proj[n : 2 * n] = w.value()  # x ← V
        proj[2 * n : 3 * n] = w.key()  # B ← K
        proj[3 * n : 4 * n] = w.query(scale=d**-0.5)  # C ← Q · d^-½ (the softmax scale; Mamba's scan uses 1)
        if w.gate is not None:
            proj[:n] = w.gate.reshape(n, -1)
        proj[4 * n :] = 0.0  # dt: Δ = softplus(dt_bias) per head at the start
        b = w.biases()
        conv_bias = None if b is None else torch.cat([b[2], b[1], b[0] * d**-0.5])  # conv runs over [x, B, C]
        identity_conv_(mixer.conv1d, conv_bias)
        mixer.D.zero_()
        mixer.out_proj.weight.copy_(w.o)
    return []


def _hybridize_statement(config: HybridConfig) -> dict[str, list[str]]:
    gqa = gqa_note(config)
    h, d = config.num_attention_heads, config.head_dim
    inherited = [
        f"x ← W_v{f', {gqa}' if gqa else ''} (one Mamba head per query head: {h} heads of {d})",
        f"B ← W_k{' (k_norm folded in)' if config.use_qk_norm else ''}{f', {gqa}' if gqa else ''} "
        f"(n_groups = {h}, state size {d})",
        f"C ← W_q · {d}^-½{' (q_norm folded in)' if config.use_qk_norm else ''}",
        "out_proj ← W_o",
    ]
    if config.attention_bias:
        inherited.append("q/k/v biases → the conv bias (exact before the SiLU)")
    z = (
        "z (gate) ← the attention's output-gate rows"
        if config.attention_output_gate
        else f"z (gate): N(0, {config.initializer_range}²) (the model's init)"
    )
    if config.attention_output_gate:
        inherited.append(z)
    return {
        "inherited": inherited,
        "new": ([] if config.attention_output_gate else [z])
        + [
            "dt rows = 0: Δ = softplus(dt_bias) per head, dt log-uniform in "
            f"[{config.mamba_dt_min}, {config.mamba_dt_max}] (Mamba-2's init)",
            "A_log = log U[1, 16] (Mamba-2's init)",
            "D = 0 (no skip at the start: the output is the decayed linearised attention alone)",
            "conv1d: identity (last tap 1), bias "
            + ("= the attention biases" if config.attention_bias else "0"),
            "norm weight = 1",
        ],
        "dropped": common_dropped(config, bias_kept=True)
        + [
            "the output is RMSNorm(y·silu(z)) per head and the "
            "conv applies SiLU: not the attention's function"
        ],
    }


@register_mixer(
    "mamba2",
    layer_type="linear_attention",
    recurrent=True,
    cost=mamba2_cost,
    validate=_validate,
    describe=_describe,
    config_fields=CONFIG_FIELDS,
    hybridize_init=HybridizeInit(_hybridize_geometry, _hybridize_apply, _hybridize_statement),
    lora_targets=("in_proj", "out_proj"),
)
class Mamba2Mixer(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.mamba_n_groups
        self.state_size = config.mamba_state_size
        self.d_inner = self.num_heads * self.head_dim
        conv_dim = self.d_inner + 2 * self.n_groups * self.state_size

        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.mamba_conv_kernel_size, groups=conv_dim, bias=config.mamba_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(
            self.d_inner,
            eps=config.rms_norm_eps,
            norm_before_gate=False,
            group_size=self.d_inner // self.n_groups,
        )
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def init_hybrid_weights(self, init, config: HybridConfig) -> None:
        init_decay_and_dt(init, self.A_log, self.dt_bias, config)
        init.ones_(self.D)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        h, p, g_, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        state = read_state(ctx, self.layer_idx)
        keep = states_to_keep(ctx, t)
        x_in = zero_padding(hidden_states, ctx)
        z, xbc, dt = self.in_proj(x_in).split([self.d_inner, self.d_inner + 2 * g_ * n, h], dim=-1)
        xbc, conv_states = short_conv(xbc, self.conv1d, ctx, state, keep=keep)
        x, B, C = xbc.split([self.d_inner, g_ * n, g_ * n], dim=-1)
        x = x.reshape(b, t, h, p)
        # Groups share B and C: head i reads group i // (h / g).
        B = B.reshape(b, t, g_, n).repeat_interleave(h // g_, dim=2)
        C = C.reshape(b, t, g_, n).repeat_interleave(h // g_, dim=2)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H) fp32
        if self.config.mamba_dt_limit is not None:
            dt = dt.clamp(*self.config.mamba_dt_limit)
        dt = zero_padding(dt, ctx)  # Δ = 0 at padding: no decay, no write
        A = -self.A_log.float().exp()
        g = dt * A
        v = (x.float() * dt[..., None]).to(x.dtype)

        def full(lo: int, hi: int, initial: torch.Tensor | None):
            return simple_gla(
                C[:, lo:hi],
                B[:, lo:hi],
                v[:, lo:hi],
                g[:, lo:hi],
                scale=1.0,
                initial_state=initial,
                output_final_state=ctx.cache is not None,
                cu_seqlens=ctx.cu_seqlens,
                chunk_size=self.config.linear_chunk_size,
                backend=self.config.linear_backend,
            )

        def step(i: int, s: torch.Tensor | None):
            return recurrent_simple_gla_step(C[:, i], B[:, i], v[:, i], g[:, i], s, scale=1.0)

        y, recurrent = run_recurrence(state, t, keep, full=full, step=step)
        write_state(ctx, self.layer_idx, conv_states, recurrent, t)
        y = y + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y)
