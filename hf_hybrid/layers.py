"""Small building blocks shared by the mixers: RMSNorm, rotary embedding, GQA helpers."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 (Llama convention: weight initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LowRankGatedRMSNorm(nn.Module):
    """``y = RMSNorm(x)``, then ``y · sigmoid(W_up silu(W_down y))`` with ``W_down`` [r, D], ``W_up``
    [D, r]: an input-dependent per-channel gate of rank r on the normed activations (AXK2's gated norm,
    Megatron's ``GatedNormWrapper``). The gate is computed in fp32, the product rounded to the input
    dtype."""

    def __init__(self, dim: int, rank: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps=eps)
        self.gate_down = nn.Linear(dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)  # (..., D)
        gate = self.gate_up(nn.functional.silu(self.gate_down(y)))  # (..., D)
        return (y * torch.sigmoid(gate.float())).to(y.dtype)


class ResidualGate(nn.Module):
    """Adds a branch ``f`` to the residual stream ``x`` with a learned weight ``w`` [D] per channel (Ergo's
    ``ErgoResidualGate``, ``residual_gates=True``): ``σ(w)·f + sqrt(1 + σ(w))·exp(-softplus(w)/2)·x``, in
    fp32, rounded to x's dtype. At w = 0 (the init) that is 0.5·f + 0.866·x."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def init_hybrid_weights(self, init, config) -> None:
        init.zeros_(self.weight)

    def forward(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        branch_gate = torch.sigmoid(w)
        residual_gate = torch.sqrt(1.0 + branch_gate) * torch.exp(-0.5 * nn.functional.softplus(w))
        return (branch_gate * branch.float() + residual_gate * residual.float()).to(residual.dtype)


_GATE_ACTIVATIONS = {"silu": nn.functional.silu, "sigmoid": torch.sigmoid}


class GatedRMSNorm(nn.Module):
    """RMSNorm combined with a gate ``act(z)``, SiLU unless ``gate_activation="sigmoid"`` (Kimi Delta
    Attention).

    ``norm_before_gate=True`` (Gated DeltaNet, KDA): ``norm(x) * act(z)``;
    ``norm_before_gate=False`` (Mamba-2): ``norm(x * act(z))``. ``group_size`` normalises per head.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        norm_before_gate: bool,
        group_size: int | None = None,
        gate_activation: str = "silu",
    ):
        super().__init__()
        if gate_activation not in _GATE_ACTIVATIONS:
            raise ValueError(
                f"GatedRMSNorm gate_activation={gate_activation!r}; choose one of: "
                f"{', '.join(_GATE_ACTIVATIONS)}"
            )
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim
        self.gate_activation = gate_activation

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        act = _GATE_ACTIVATIONS[self.gate_activation]
        x, z = x.float(), z.float()
        if not self.norm_before_gate:
            x = x * act(z)
        shape = x.shape
        xg = x.reshape(*shape[:-1], -1, self.group_size)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        x = xg.reshape(shape)
        if self.norm_before_gate:
            x = x * act(z)
        return (self.weight * x).to(dtype)


class _RopeView:
    """The attributes transformers' RoPE init functions read, for a rotary dimension of our choosing.

    A hybrid may need several rotary sizes (attention head_dim × partial factor, MLA's ``qk_rope_head_dim``),
    while ``ROPE_INIT_FUNCTIONS`` read one ``head_dim`` off the config; this view supplies each size.
    """

    def __init__(self, config, dim: int):
        params = dict(config.rope_parameters)
        params["partial_rotary_factor"] = 1.0
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", 10000.0)
        self.rope_parameters = params
        self.head_dim = dim
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.max_position_embeddings = config.max_position_embeddings

    def standardize_rope_params(self) -> None:
        pass


def rope_inv_freq(config, dim: int, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scaling for ``config.rope_parameters`` at rotary size
    ``dim``."""
    view = _RopeView(config, dim)
    rope_type = view.rope_parameters["rope_type"]
    if rope_type == "default":
        base = float(view.rope_parameters["rope_theta"])
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (base**exponent), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"HybridConfig.rope_parameters['rope_type']={rope_type!r} is not known to transformers; "
            f"choose one of: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    return ROPE_INIT_FUNCTIONS[rope_type](view, device)


class LogPositionQueryScale(nn.Module):
    """Per-head query scaling by position (``HybridConfig.query_log_scaling``, Mistral-Large-4's softmax
    scaling): ``q[b, t, h] · (scale_h · log(1 + position[b, t]) + bias_h)``. Initialised to scale 0, bias 1
    (no scaling)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(num_heads))
        self.bias = nn.Parameter(torch.ones(num_heads))

    def init_hybrid_weights(self, init, config) -> None:
        init.zeros_(self.scale)
        init.ones_(self.bias)

    def forward(self, q: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D], position_ids [B, T] -> q scaled [B, T, H, D]."""
        log_pos = (position_ids + 1).float().log().to(q.dtype)  # (B, T)
        factor = self.scale.to(q.dtype) * log_pos[..., None] + self.bias.to(q.dtype)  # (B, T, H)
        return q * factor[..., None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` [B, T, h, d] (partial RoPE); cos/sin are [B, T,
    r]."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if r == x.shape[-1]:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat([x_rot.to(x.dtype), x_pass], dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)
