"""Plain (causal) linear attention, optionally with a decay (the GLA / RetNet family).

``S_t = exp(g_t) S_{t-1} + φ(k_t) v_tᵀ``, ``o_t = φ(q_t)ᵀ S_t``. With a positive feature map (elu+1, relu,
Performer random features) the output is normalised by ``φ(q_t)ᵀ z_t`` with ``z_t = exp(g_t) z_{t-1} +
φ(k_t)`` (computed in the same scan by appending a column of ones to v). With the identity map the normaliser
could be zero or negative (the normaliser is only safe with positive feature maps), so an RMSNorm on the
output replaces it, as in MiniMax's lightning attention.

``linear_decay``: ``none`` (plain), ``scalar`` (a data-dependent log decay per head, like RetNet/Mamba-2's
gate), ``per_channel`` (one per key channel, GLA), ``fixed_slope`` (MiniMax-01's lightning attention: a
constant log decay ``-slope_h`` per head, see :func:`fixed_slopes`). MiniMax also applies SiLU to q, k, v
(``linear_qkv_activation``), no q·k scale (``linear_scale=1``), one RMSNorm over all heads
(``linear_norm_scope="full"``) and a sigmoid output gate from the layer input (``linear_output_gate``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm
from ..ops.simple_gla import recurrent_simple_gla_step, simple_gla
from ..specs import ConfigField, HybridizeInit, MixerCost, register_mixer, require_positive
from .base import MixerContext
from .from_attention import common_dropped, gqa_note, identity_conv_
from .recurrent import read_state, run_recurrence, short_conv, states_to_keep, write_state, zero_padding

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig
    from ..convert.hybridize import AttentionWeights

# The config fields of plain linear attention layers. linear_backend / linear_chunk_size are read by every
# recurrent mixer (Gated DeltaNet, KDA, Mamba-2 too).
CONFIG_FIELDS = (
    ConfigField(
        "linear_num_heads",
        None,
        "int | None",
        derive=lambda c: c.num_attention_heads,
        doc="defaults: num_attention_heads",
    ),
    ConfigField("linear_head_dim", None, "int | None", derive=lambda c: c.head_dim, doc="defaults: head_dim"),
    ConfigField(
        "linear_feature_map", "identity", "str", choices=("identity", "elu", "relu", "random_features")
    ),
    ConfigField("linear_decay", "none", "str", choices=("none", "scalar", "per_channel", "fixed_slope")),
    ConfigField("linear_conv_kernel_size", 0, "int", doc="0 = no short convolution"),
    ConfigField("linear_random_features", 64, "int"),
    # MiniMax-01's lightning attention: SiLU on q, k, v; a fixed per-head decay (linear_decay="fixed_slope":
    # ALiBi slopes 2^(-8(h+1)/H) scaled by 1 - layer/(L-1) + 1e-5); no q·k scale; RMSNorm over all heads; a
    # sigmoid output gate.
    ConfigField("linear_qkv_activation", "none", "str", choices=("none", "silu")),
    ConfigField(
        "linear_scale",
        None,
        "float | None",
        doc="None: head_dim^-0.5 with the identity map (output norm), 1 with positive maps",
    ),
    ConfigField(
        "linear_norm_scope",
        "head",
        "str",
        choices=("head", "full"),
        doc="output RMSNorm (identity map) over each head, or 'full': over all heads at once",
    ),
    ConfigField("linear_output_gate", False, "bool", doc="o = norm(o) · sigmoid(x W_gate) before o_proj"),
    ConfigField(
        "linear_norm_eps",
        None,
        "float | None",
        doc="eps of that output norm; None: rms_norm_eps (MiniMax's is fixed at 1e-6)",
    ),
    ConfigField(
        "linear_backend",
        "auto",
        "str",
        choices=("auto", "torch", "naive", "fla"),
        doc="every recurrent mixer: auto = fla-core on CUDA when usable, else our chunked torch path",
    ),
    ConfigField("linear_chunk_size", 64, "int", doc="every recurrent mixer's chunk length"),
)


_NORMALISER_EPS = 1e-6
# A learned decay gate starts close to no decay: sigmoid(bias)^(1/16) ~ 1 - small, as in GLA's gate
# temperature.
_GATE_TEMPERATURE = 16.0


def fixed_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """MiniMax-01's per-head decay rates [H] (fp32): ALiBi slopes ``(2^(-8/H))^(h+1)``, scaled down with depth
    by ``1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5``; the state decays by ``exp(-slope)`` per token."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads, dtype=torch.float32) + 1)
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


def _validate(config: HybridConfig) -> None:
    require_positive(config, "linear_num_heads", "linear_head_dim", "linear_chunk_size")
    if config.linear_conv_kernel_size < 0:
        raise ValueError(
            f"HybridConfig.linear_conv_kernel_size={config.linear_conv_kernel_size} must be >= 0"
        )
    if config.linear_scale is not None and not config.linear_scale > 0:
        raise ValueError(f"HybridConfig.linear_scale={config.linear_scale!r} must be > 0 or None")
    if config.linear_feature_map != "identity" and (
        config.linear_norm_scope != "head" or config.linear_output_gate
    ):
        name = "linear_output_gate" if config.linear_output_gate else "linear_norm_scope"
        raise ValueError(
            f"HybridConfig.{name}={getattr(config, name)!r} applies to the output norm, "
            "which only the identity feature map has "
            f"(linear_feature_map={config.linear_feature_map!r} normalises by φ(q)ᵀz instead)"
        )


def _describe(config: HybridConfig) -> list[tuple[str, str]]:
    text = (
        f"{config.linear_num_heads} heads × {config.linear_head_dim}, feature map "
        f"{config.linear_feature_map}, decay {config.linear_decay}, conv {config.linear_conv_kernel_size}"
        + (", SiLU q/k/v" if config.linear_qkv_activation == "silu" else "")
        + (", full-width norm" if config.linear_norm_scope == "full" else "")
        + (", output gate" if config.linear_output_gate else "")
    )
    return [("linear attention", text)]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def linear_attention_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    """q/k/v/o projections, optional short conv on q,k,v, feature map φ, optional data-dependent decay gate
    (``g_proj``: one per head or per feature channel; a fixed slope has no parameters), an output RMSNorm (per
    head or over all heads) when φ is the identity, and the optional sigmoid output gate [H, nh·d]."""
    h, nh, d = config.hidden_size, config.linear_num_heads, config.linear_head_dim
    k = config.linear_conv_kernel_size
    feat = config.linear_random_features if config.linear_feature_map == "random_features" else d
    gates = {"none": 0, "scalar": nh, "per_channel": nh * feat, "fixed_slope": 0}[config.linear_decay]
    out_gate = h * nh * d if config.linear_output_gate else 0  # sigmoid output gate (MiniMax)
    matmul = 4 * h * nh * d + (3 * nh * d * k if k > 0 else 0) + h * gates + out_gate
    positive = config.linear_feature_map != "identity"  # normalised by φ(q)ᵀz instead of an output norm
    norm = 0 if positive else (nh * d if config.linear_norm_scope == "full" else d)
    params = matmul + gates + norm
    # State: S [nh, f, d] plus the normaliser z [nh, f] (kept as an extra value column), and the conv tail.
    recurrent = nh * feat * (d + (1 if positive else 0))
    state = recurrent + (3 * nh * d * (k - 1) if k > 0 else 0)
    # Per token and head: S += φ(k) vᵀ (2·f·d), o = φ(q)ᵀ S (2·f·d), decay (f·d), normaliser (4·f).
    decays = gates or config.linear_decay == "fixed_slope"
    step = nh * (4.0 * feat * d + (feat * d if decays else 0) + (4.0 * feat if positive else 0))
    return MixerCost(
        params, matmul, state_elements=state, flops=lambda c: step, state_fp32_elements=recurrent
    )


# ---- from attention (hf_hybrid.convert.hybridize: what this kind inherits from an attention layer) ---------


def _hybridize_geometry(config: HybridConfig) -> dict[str, Any]:
    return {"linear_num_heads": config.num_attention_heads, "linear_head_dim": config.head_dim}


def _hybridize_apply(mixer: nn.Module, w: AttentionWeights, config: HybridConfig) -> list[str]:
    with torch.no_grad():
        mixer.q_proj.weight.copy_(w.query())
        mixer.k_proj.weight.copy_(w.key())
        mixer.v_proj.weight.copy_(w.value())
        mixer.o_proj.weight.copy_(w.o)
        if mixer.conv1d is not None:
            identity_conv_(mixer.conv1d)
    return ["q/k/v biases dropped"] if w.q_bias is not None else []


def _hybridize_statement(config: HybridConfig) -> dict[str, list[str]]:
    gqa = gqa_note(config)
    new = [
        f"feature map {config.linear_feature_map!r} ("
        + (
            "output RMSNorm, weight 1, in place of the normaliser"
            if config.linear_feature_map == "identity"
            else "normalised by φ(q)·Σφ(k)"
        )
        + ")"
    ]
    if config.linear_decay != "none":
        new.append(
            f"decay {config.linear_decay!r}: g_proj weight 0, bias 4 (slow decay, LinearAttention's init)"
        )
    if config.linear_conv_kernel_size:
        new.append("conv1d: identity (last tap 1, others 0)")
    if config.linear_feature_map == "random_features":
        new.append(f"random features: {config.linear_random_features} Gaussian (Performer)")
    return {
        "inherited": [
            "q_proj ← W_q" + (" (q_norm weight folded in)" if config.use_qk_norm else ""),
            "k_proj ← W_k" + (f", {gqa}" if gqa else ""),
            "v_proj ← W_v" + (f", {gqa}" if gqa else ""),
            "o_proj ← W_o",
        ],
        "new": new,
        "dropped": common_dropped(config)
        + (["the output gate (linear attention has none)"] if config.attention_output_gate else []),
    }


@register_mixer(
    "linear_attention",
    layer_type="linear_attention",
    recurrent=True,
    cost=linear_attention_cost,
    validate=_validate,
    describe=_describe,
    config_fields=CONFIG_FIELDS,
    hybridize_init=HybridizeInit(_hybridize_geometry, _hybridize_apply, _hybridize_statement),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "output_gate"),
)
class LinearAttention(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.linear_num_heads
        self.head_dim = config.linear_head_dim
        self.feature_map = config.linear_feature_map
        self.decay = config.linear_decay
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.conv1d = None
        if config.linear_conv_kernel_size > 0:
            self.conv1d = nn.Conv1d(
                3 * inner, 3 * inner, config.linear_conv_kernel_size, groups=3 * inner, bias=False
            )
        self.feature_dim = self.head_dim
        if self.feature_map == "random_features":
            self.feature_dim = config.linear_random_features
            # Fixed Gaussian projection (Performer's FAVOR+ positive features); saved so the function is
            # reproducible.
            self.register_buffer(
                "random_matrix", torch.randn(self.num_heads, self.head_dim, self.feature_dim)
            )
        self.g_proj = None
        if self.decay == "scalar":
            self.g_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        elif self.decay == "per_channel":  # one decay per feature (key) channel
            self.g_proj = nn.Linear(config.hidden_size, self.num_heads * self.feature_dim, bias=True)
        self.normalised = self.feature_map != "identity"
        norm_dim = inner if config.linear_norm_scope == "full" else self.head_dim
        eps = config.rms_norm_eps if config.linear_norm_eps is None else config.linear_norm_eps
        self.out_norm = None if self.normalised else RMSNorm(norm_dim, eps=eps)
        self.output_gate = (
            nn.Linear(config.hidden_size, inner, bias=False) if config.linear_output_gate else None
        )
        self.scale = config.linear_scale
        if self.scale is None:
            self.scale = 1.0 if self.normalised else self.head_dim**-0.5

    def init_hybrid_weights(self, init, config: HybridConfig) -> None:
        if self.g_proj is not None:
            init.zeros_(self.g_proj.weight)
            init.constant_(self.g_proj.bias, 4.0)  # slow initial decay
        if self.feature_map == "random_features":
            init.normal_(self.random_matrix)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map on [B, T, H, D] -> [B, T, H, F] (computed in fp32)."""
        x = x.float()
        if self.feature_map == "identity":
            return x
        if self.feature_map == "elu":
            return F.elu(x) + 1.0
        if self.feature_map == "relu":
            return F.relu(x)
        # Performer: exp(w·x - |x|²/2) / sqrt(m); inputs scaled by D^-1/4 so q·k matches softmax's D^-1/2.
        x = x * self.head_dim**-0.25
        proj = torch.einsum("bthd,hdf->bthf", x, self.random_matrix.float())
        return torch.exp(proj - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(self.feature_dim)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        h, d = self.num_heads, self.head_dim
        state = read_state(ctx, self.layer_idx)
        keep = states_to_keep(ctx, t)
        x = zero_padding(hidden_states, ctx)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        conv_states = None
        if self.conv1d is not None:
            qkv, conv_states = short_conv(qkv, self.conv1d, ctx, state, keep=keep)
        if self.config.linear_qkv_activation == "silu":
            qkv = F.silu(qkv)
        q, k, v = (y.reshape(b, t, h, d) for y in qkv.chunk(3, dim=-1))
        q, k = self.phi(q), zero_padding(self.phi(k), ctx)  # a padded key writes nothing
        v = v.float()
        if self.normalised:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column accumulates z_t = Σ φ(k)
        v = zero_padding(v, ctx)
        g = None
        if self.g_proj is not None:
            g = F.logsigmoid(self.g_proj(x).float()) / _GATE_TEMPERATURE
            g = g.reshape(b, t, h, self.feature_dim) if self.decay == "per_channel" else g
            g = zero_padding(g, ctx)
        elif self.decay == "fixed_slope":
            slopes = fixed_slopes(h, self.layer_idx, self.config.num_hidden_layers).to(x.device)
            g = zero_padding((-slopes).expand(b, t, h), ctx)

        scale = self.scale

        def full(lo: int, hi: int, initial: torch.Tensor | None):
            return simple_gla(
                q[:, lo:hi],
                k[:, lo:hi],
                v[:, lo:hi],
                None if g is None else g[:, lo:hi],
                scale=scale,
                initial_state=initial,
                output_final_state=ctx.cache is not None,
                cu_seqlens=ctx.cu_seqlens,
                chunk_size=self.config.linear_chunk_size,
                backend=self.config.linear_backend,
            )

        def step(i: int, s: torch.Tensor | None):
            return recurrent_simple_gla_step(
                q[:, i], k[:, i], v[:, i], None if g is None else g[:, i], s, scale=scale
            )

        o, recurrent = run_recurrence(state, t, keep, full=full, step=step)
        write_state(ctx, self.layer_idx, conv_states, recurrent, t)
        o = o.float()
        if self.normalised:
            o = o[..., :-1] / (o[..., -1:] + _NORMALISER_EPS)
        elif self.config.linear_norm_scope == "full":
            o = self.out_norm(o.reshape(b, t, h * d))
        else:
            o = self.out_norm(o)
        o = o.reshape(b, t, h * d)
        if self.output_gate is not None:
            o = o * torch.sigmoid(self.output_gate(hidden_states).float())
        return self.o_proj(o.to(hidden_states.dtype))
