"""Mixture-of-Experts MLP: fp32 top-k router, fused experts, shared experts, balancing losses.

Built as ``HybridMoE(config, layer_idx)`` and called as ``moe(hidden_states [B, T, H], ctx) -> [B, T, H]``,
like every MLP kind in ``hf_hybrid.registry`` (declared here as ``"moe"``).

Shape legend (torchtitan style suffixes): ``B`` batch, ``T`` tokens per row, ``N = B*T`` flattened tokens,
``H`` hidden, ``E`` routed experts, ``K`` experts per token, ``I`` expert intermediate size, ``S = N*K``
routed assignments, ``G`` expert groups, ``D`` documents (or rows) for the sequence-level loss.

Pieces, each with one home:
- ``HybridTopKRouter``: scores (softmax | sigmoid), aux-loss-free correction bias, group-limited top-k with
  explicit tie-breaking, renormalisation, scaling, jitter; or hash routing from token ids. Returns ``(logits,
  weights, index)`` so transformers' ``OutputRecorder(HybridTopKRouter, index=0)`` records router logits.
- ``HybridExperts``: fused weights in transformers v5 layout (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H,
  I]``), decorated with ``@use_experts_implementation`` so ``experts_implementation="eager" | "batched_mm" |
  "grouped_mm"`` dispatches to transformers' kernels. ``experts_forward_loop`` is the obvious per-expert loop,
  the naive twin.
- ``HybridMoE``: router -> optional capacity drops -> experts (+ shared experts); balancing losses and load
  statistics go through ``MixerContext``.

Contract with the decoder (``modeling_hybrid.py``):
- auxiliary terms are reported with ``ctx.add_aux`` in training mode only and only when their coefficient is >
  0: ``router_aux_loss`` (Switch), ``router_z_loss``, ``router_seq_aux_loss`` (DeepSeek-V3 sequence-wise);
  each is the *unscaled* term (a perfectly uniform router gives a balance loss of exactly 1.0); the model
  multiplies by the matching ``router_*_coef``.
- ``ctx.add_stat("expert_load", layer_idx, fraction [E])`` on every forward (detached; sums to 1 over
  experts); ``ctx.add_stat("expert_drops", layer_idx, dropped [E])`` when ``moe_capacity_factor`` is set.
- ``moe_routing="hash"`` reads the token ids of *this* forward from ``ctx.input_ids`` ([B, T]: the new tokens
  only when decoding with a cache), which the model passes whenever it is called with ``input_ids``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from .layers import RMSNorm
from .mixers.base import MixerContext, in_backward_recompute
from .mlp import SwiGLU, swiglu_params
from .specs import ConfigField, MLPCost, nonnegative, register_mlp, require_positive

if TYPE_CHECKING:
    from .configuration_hybrid import HybridConfig

# The config fields of MoE layers (transformers' names, which clients such as TRL read).
CONFIG_FIELDS = (
    ConfigField("num_experts", 8, "int"),
    ConfigField("num_experts_per_tok", 2, "int"),
    ConfigField(
        "moe_intermediate_size",
        None,
        "int | None",
        derive=lambda c: max(1, c.intermediate_size // max(1, c.num_experts_per_tok)),
        doc="defaults: intermediate_size // num_experts_per_tok",
    ),
    ConfigField("num_shared_experts", 0, "int"),
    ConfigField(
        "shared_expert_intermediate_size",
        None,
        "int | None",
        derive=lambda c: c.num_shared_experts * c.moe_intermediate_size if c.num_shared_experts > 0 else None,
        doc="defaults: num_shared_experts * moe_intermediate_size",
    ),
    ConfigField(
        "shared_expert_gate",
        False,
        "bool",
        doc="shared output scaled by sigmoid(x·w_gate), w_gate [1, H] (Qwen2-MoE/Qwen3-Next)",
    ),
    ConfigField("router_scoring_func", "softmax", "str", choices=("softmax", "sigmoid")),
    ConfigField("norm_topk_prob", True, "bool"),
    ConfigField("routed_scaling_factor", 1.0, "float"),
    ConfigField("n_group", 1, "int"),
    ConfigField("topk_group", 1, "int"),
    ConfigField("router_aux_loss_coef", 0.01, "float", check=nonnegative),
    ConfigField("router_z_loss_coef", 0.001, "float", check=nonnegative),
    ConfigField("router_seq_aux_loss_coef", 0.0, "float", check=nonnegative),
    ConfigField(
        "router_bias_update_rate",
        0.0,
        "float",
        check=nonnegative,
        doc="> 0 turns on aux-loss-free bias balancing",
    ),
    ConfigField("router_jitter_noise", 0.0, "float", check=nonnegative),
    ConfigField("moe_routing", "topk", "str", choices=("topk", "hash")),
    ConfigField("moe_capacity_factor", None, "float | None", doc="None = dropless"),
    # Ergo's normed experts: each routed expert's output passes an RMSNorm with that expert's own weight [H]
    # before the routing weight scales it (moe_expert_norm); an RMSNorm on the shared experts' output
    # (shared_expert_norm).
    ConfigField("moe_expert_norm", False, "bool"),
    ConfigField("shared_expert_norm", False, "bool"),
    # HY-V4's clamped SwiGLU in the routed experts (not the shared ones): silu(min(gate, L)) · clamp(up, -L,
    # L); None: no clamp.
    ConfigField("moe_swiglu_limit", None, "float | None"),
    # Only on configs with MoE layers: clients decide "is this an MoE?" by hasattr(config,
    # "output_router_logits") (TRL's SFT / DPO trainers then ask the backbone for router logits and add
    # Mixtral's balance loss), so a model without one does not carry the switch.
    ConfigField("output_router_logits", False, "bool", only_when_used=True),
)
# Those that decide an MoE layer's function (a native export compares them): all but the training ones.
FUNCTIONAL_FIELDS = tuple(
    f.name
    for f in CONFIG_FIELDS
    if not f.name.startswith(
        ("router_aux", "router_z", "router_seq", "router_bias", "router_jitter", "output_")
    )
)

# ------------------------------------------------------------------------------------------------------------
# routing helpers


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` along the last dim with **ties broken toward the lower index** (torch.topk leaves the order
    unspecified).

    A stable descending sort keeps equal values in their original (index) order, so the first ``k`` columns
    are the top-k with lower indices first among equals. Returns ``(values, indices)``, both ``[..., k]``,
    sorted descending.
    """
    indices = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, indices), indices


def group_limited_mask(scores_NE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3 node-limited routing: keep only experts in the ``topk_group`` best of ``n_group`` groups.

    A group's score is the sum of its top-2 scores (top-1 when a group has a single expert). Experts outside
    the kept groups get ``-inf``, so a later top-k never picks them. Ties between groups go to the lower group
    index.
    """
    N, E = scores_NE.shape
    grouped_NGe = scores_NE.view(N, n_group, E // n_group)
    group_scores_NG = stable_topk(grouped_NGe, min(2, E // n_group))[0].sum(dim=-1)
    _, keep_group_NK = stable_topk(group_scores_NG, topk_group)
    keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool).scatter_(1, keep_group_NK, True)
    keep_NE = keep_NG.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, E)
    return scores_NE.masked_fill(~keep_NE, float("-inf"))


_HASH_PRIME = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64, so the hash never overflows


def hash_experts(token_ids_N: torch.Tensor, num_experts: int, top_k: int, salt: int) -> torch.Tensor:
    """Hash routing (Roller et al., 2021): a fixed pseudo-random choice of ``top_k`` distinct experts per
    token id.

    Each (token id, expert, salt) gets an integer hash (two rounds of ``x -> x*x + c mod p``, pure integer
    arithmetic, so identical on every device and torch version); a token's experts are the ``top_k`` largest
    hashes, i.e. the first ``top_k`` entries of a fixed random permutation of the experts per token id.
    Different ``salt`` (the layer index) gives each layer its own table. Returns ``[N, top_k]`` int64.
    """
    p = _HASH_PRIME
    experts_E = torch.arange(num_experts, device=token_ids_N.device, dtype=torch.int64)
    x_NE = (token_ids_N.to(torch.int64)[:, None] * num_experts + experts_E + (salt + 1) * 1_000_003) % p
    for c in (12_345_701, 998_244_353):
        x_NE = (x_NE * x_NE + c) % p
    return stable_topk(x_NE, top_k)[1]


# ------------------------------------------------------------------------------------------------------------
# router


class HybridTopKRouter(nn.Module):
    """Token -> ``K`` experts and their weights; all math in fp32 whatever the model dtype.

    ``forward(hidden [N, H], *, token_ids [N] | None) -> (logits [N, E] fp32, weights [N, K] fp32, index [N,
    K] int64)``.

    - ``scores = softmax(logits)`` or ``sigmoid(logits)``;
    - selection on ``scores + e_score_correction_bias`` (aux-loss-free balancing, DeepSeek-V3), group-limited
      when ``n_group > 1``, top-k ties to the lower expert index; the bias never enters the weights;
    - ``weights = scores[index]``, divided by their sum when ``norm_topk_prob`` (for sigmoid too), times
      ``routed_scaling_factor``;
    - ``router_jitter_noise`` multiplies the router input by U(1-eps, 1+eps) in training (Switch Transformer);
    - ``moe_routing="hash"``: the experts come from ``hash_experts(token_ids)``; the weights are still the
      router's scores at those experts, so the router keeps learning how much to trust each expert (and DDP
      sees a gradient).

    ``e_score_correction_bias`` is a persistent fp32 buffer, saved with the model and kept fp32 through
    ``model.to(torch.bfloat16)`` / ``.half()`` (see ``_apply``). It is updated outside forward, once per
    optimizer step, by ``hf_hybrid.moe_training.AuxFreeBiasCallback`` from the token counts this module
    accumulates in training mode.
    """

    _fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.scoring_func = config.router_scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.jitter_noise = config.router_jitter_noise
        self.routing = config.moe_routing
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_size))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True
        )
        # Token counts per expert, summed over training-mode forwards. Plain attributes on purpose, not
        # buffers: DDP (broadcast_buffers=True) copies rank 0's buffers over every rank's at each forward,
        # which would erase each rank's own counts before they are all-reduced. `pending_counts` is consumed
        # by the bias update, `log_counts` by the load-logging callback. Both fp32 [E], allocated lazily on
        # the logits' device.
        self.pending_counts: torch.Tensor | None = None
        self.log_counts: torch.Tensor | None = None
        nn.init.normal_(self.weight, std=config.initializer_range)

    def init_hybrid_weights(self, init_module, config: HybridConfig) -> None:
        """Called by ``HybridPreTrainedModel._init_weights`` (``init_module`` is
        ``transformers.initialization``, whose functions skip weights already loaded from a checkpoint)."""
        init_module.normal_(self.weight, mean=0.0, std=config.initializer_range)
        init_module.zeros_(self.e_score_correction_bias)

    def _apply(self, fn, recurse: bool = True):
        # Keep the correction bias fp32 through dtype casts (model.to(bf16), .half()): it accumulates updates
        # of size `router_bias_update_rate` (~1e-3), which bf16 (8 bits of mantissa) would round away. The
        # value is stashed *before* the cast and restored on the new device, so no precision is lost on the
        # way.
        saved = {
            name: self._buffers[name] for name in self._fp32_buffers if self._buffers.get(name) is not None
        }
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.is_floating_point() and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def scores(self, logits_NE: torch.Tensor) -> torch.Tensor:
        """Router scores from fp32 logits (softmax over experts, or independent sigmoids)."""
        return logits_NE.softmax(dim=-1) if self.scoring_func == "softmax" else logits_NE.sigmoid()

    def forward(
        self, hidden_states: torch.Tensor, *, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_NH = hidden_states.reshape(-1, self.hidden_size)
        # fp32 router even under autocast: small logit differences decide the experts.
        with torch.autocast(device_type=x_NH.device.type, enabled=False):
            x_NH = x_NH.float()
            if self.training and self.jitter_noise > 0:
                x_NH = x_NH * torch.empty_like(x_NH).uniform_(
                    1.0 - self.jitter_noise, 1.0 + self.jitter_noise
                )
            logits_NE = F.linear(x_NH, self.weight.float())
        scores_NE = self.scores(logits_NE)

        if self.routing == "hash":
            if token_ids is None:
                raise ValueError(
                    f"HybridTopKRouter (layer {self.layer_idx}): "
                    "moe_routing='hash' needs the token ids of this forward"
                )
            index_NK = hash_experts(token_ids.reshape(-1), self.num_experts, self.top_k, salt=self.layer_idx)
        else:
            with torch.no_grad():
                choice_NE = scores_NE + self.e_score_correction_bias
                if self.n_group > 1:
                    choice_NE = group_limited_mask(choice_NE, self.n_group, self.topk_group)
                index_NK = stable_topk(choice_NE, self.top_k)[1]

        weights_NK = scores_NE.gather(1, index_NK)
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_NK = weights_NK * self.routed_scaling_factor
        return logits_NE, weights_NK, index_NK

    @torch.no_grad()
    def accumulate_counts(self, counts_E: torch.Tensor) -> None:
        """Add one training forward's routed-assignment counts (padding excluded) to both accumulators."""
        counts_E = counts_E.detach().float()
        for name in ("pending_counts", "log_counts"):
            current = getattr(self, name)
            if current is None or current.device != counts_E.device:
                setattr(self, name, counts_E.clone())
            else:
                current.add_(counts_E)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring_func}, "
            f"routing={self.routing}, groups={self.topk_group}/{self.n_group}"
        )


# ------------------------------------------------------------------------------------------------------------
# experts


@use_experts_implementation
class HybridExperts(nn.Module):
    """``E`` SwiGLU experts stored fused: ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H,
    I]``.

    ``forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]`` is transformers' experts
    signature; ``@use_experts_implementation`` swaps it for ``batched_mm`` / ``grouped_mm`` when
    ``config._experts_implementation`` names them. The method below is the ``"eager"`` path: sort the S = N*K
    assignments by expert (stable, so token order is kept inside an expert), run one pair of matmuls per
    expert on its contiguous chunk, scale by the routing weight, unsort, and sum the K contributions of each
    token with a reshape-sum (deterministic, no atomics). Assignments with weight 0 (capacity drops) are still
    computed: the kernels have no skip mask, and a zero weight already removes them from the output and every
    gradient.
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.swiglu_limit = getattr(config, "moe_swiglu_limit", None)
        nn.init.normal_(self.gate_up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def init_hybrid_weights(self, init_module, config: HybridConfig) -> None:
        """Called by ``HybridPreTrainedModel._init_weights`` with ``transformers.initialization``."""
        init_module.normal_(self.gate_up_proj, mean=0.0, std=config.initializer_range)
        init_module.normal_(self.down_proj, mean=0.0, std=config.initializer_range)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        def expert(in_E, down_E, e, x_cH):
            return F.linear(self._apply_gate(F.linear(x_cH, in_E[e])), down_E[e])

        return _grouped_forward(
            self.gate_up_proj, self.down_proj, expert, hidden_states, top_k_index, top_k_weights
        )

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` from the fused [S, 2I] projection; with ``moe_swiglu_limit`` (HY-V4) the gate is
        clamped above at the limit and up to [-limit, limit] first. transformers' ``batched_mm`` /
        ``grouped_mm`` kernels call this too."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return self.act_fn(gate) * up


def _grouped_forward(in_proj, down_proj, expert, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The eager experts path shared by the gated and ungated experts: ``expert(in_E, down_E, e, x_cH) ->
    y_cH``."""
    N, H = hidden_states.shape
    K = top_k_index.shape[-1]
    if N == 0:
        return hidden_states.clone()
    expert_S = top_k_index.reshape(-1)
    order_S = torch.argsort(expert_S, stable=True)  # assignments grouped by expert
    x_SH = hidden_states[order_S // K]
    counts = torch.bincount(expert_S, minlength=in_proj.shape[0]).tolist()  # the one host sync
    # split / unbind (not per-expert slicing or indexing): their backward is one cat / stack, where E separate
    # slices would each materialise a zero gradient of the full [S, H] input or [E, 2I, H] weight.
    in_E, down_E = in_proj.unbind(0), down_proj.unbind(0)
    outs = [
        expert(in_E, down_E, e, x_cH) for e, x_cH in enumerate(torch.split(x_SH, counts)) if x_cH.shape[0]
    ]
    y_SH = torch.cat(outs) * top_k_weights.reshape(-1)[order_S].unsqueeze(-1).to(hidden_states.dtype)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return y_SH[inverse_S].view(N, K, H).sum(dim=1).to(hidden_states.dtype)


@use_experts_implementation(has_gate=False)
class HybridUngatedExperts(nn.Module):
    """``E`` experts without a gate (``mlp_gated=False``, Nemotron-H): ``down(act(up(x)))`` with ``up_proj [E,
    I, H]``, ``down_proj [E, H, I]``; transformers' ``has_gate=False`` experts layout, so its kernels apply
    here too."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        nn.init.normal_(self.up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def init_hybrid_weights(self, init_module, config: HybridConfig) -> None:
        init_module.normal_(self.up_proj, mean=0.0, std=config.initializer_range)
        init_module.normal_(self.down_proj, mean=0.0, std=config.initializer_range)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        def expert(in_E, down_E, e, x_cH):
            return F.linear(self.act_fn(F.linear(x_cH, in_E[e])), down_E[e])

        return _grouped_forward(
            self.up_proj, self.down_proj, expert, hidden_states, top_k_index, top_k_weights
        )


class ExpertOutputNorm(nn.Module):
    """Per-expert RMSNorm of the routed experts' outputs (``moe_expert_norm``, Ergo's ``ErgoExpertNorm``):
    ``forward(y [S, H], expert [S]) -> rms_norm(y) · weight[expert]`` in fp32, rounded to y's dtype; weight
    [E, H], one row per expert."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.num_experts, config.hidden_size))
        self.eps = config.rms_norm_eps

    def forward(self, y_SH: torch.Tensor, expert_S: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(y_SH.float(), (y_SH.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()[expert_S]).to(y_SH.dtype)


class _NormedExpertsMixin:
    """Experts whose every output is normed by its expert's own RMSNorm before the routing weight scales it
    (``moe_expert_norm``). The experts kernels (eager, ``batched_mm``, ``grouped_mm``) sum the K routes of a
    token, so each route gets its own row with unit weight, as transformers' Ergo does; the norm and the
    weighted sum follow."""

    post_expert_norm: ExpertOutputNorm

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        N, K = top_k_index.shape
        x_SH = hidden_states.repeat_interleave(K, dim=0) if K > 1 else hidden_states
        expert_S1 = top_k_index.reshape(-1, 1)
        y_SH = super().forward(x_SH, expert_S1, x_SH.new_ones(expert_S1.shape))
        y_SH = self.post_expert_norm(y_SH, expert_S1.flatten())
        out_NH = (y_SH.view(N, K, -1) * top_k_weights.unsqueeze(-1).to(y_SH.dtype)).sum(dim=1)
        return out_NH.to(hidden_states.dtype)


class HybridNormedExperts(_NormedExpertsMixin, HybridExperts):
    """SwiGLU experts with per-expert output norms (``moe_expert_norm``)."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.post_expert_norm = ExpertOutputNorm(config)


class HybridNormedUngatedExperts(_NormedExpertsMixin, HybridUngatedExperts):
    """Ungated experts (``mlp_gated=False``) with per-expert output norms (Ergo's relu² experts)."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.post_expert_norm = ExpertOutputNorm(config)


def experts_forward_loop(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The naive twin of ``HybridExperts.forward``: for each expert, find its tokens, run its MLP, add the
    result.

    Same signature and shapes (``[N, H], [N, K], [N, K] -> [N, H]``); reads ``experts.gate_up_proj`` and
    ``experts.down_proj`` directly. Slow (E small matmuls, E host syncs); the spec the fast paths are tested
    against.
    """
    out_NH = torch.zeros_like(hidden_states)
    for e in range(experts.num_experts):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        if hasattr(experts, "gate_up_proj"):
            gate, up = F.linear(hidden_states[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
            limit = getattr(experts, "swiglu_limit", None)
            if limit is not None:  # moe_swiglu_limit, written out
                gate, up = torch.clamp(gate, max=limit), torch.clamp(up, min=-limit, max=limit)
            y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        else:  # ungated experts
            y = F.linear(
                experts.act_fn(F.linear(hidden_states[token_idx], experts.up_proj[e])), experts.down_proj[e]
            )
        norm = getattr(experts, "post_expert_norm", None)
        if norm is not None:  # moe_expert_norm: the expert's own RMSNorm, before the routing weight
            y = (F.rms_norm(y.float(), (y.shape[-1],), eps=norm.eps) * norm.weight[e].float()).to(y.dtype)
        out_NH = out_NH.index_add(0, token_idx, y * top_k_weights[token_idx, slot, None].to(y.dtype))
    return out_NH


# ------------------------------------------------------------------------------------------------------------
# balancing losses (pure functions: easy to test by hand)


def _normalised_probs(router: HybridTopKRouter, logits_NE: torch.Tensor) -> torch.Tensor:
    """Per-token probability over experts: softmax, or sigmoid scores divided by their sum (DeepSeek-V3)."""
    scores_NE = router.scores(logits_NE)
    if router.scoring_func == "sigmoid":
        scores_NE = scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)
    return scores_NE


def load_balancing_loss(
    probs_NE: torch.Tensor, index_NK: torch.Tensor, mask_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch loss ``E * sum_i f_i * P_i`` over real tokens (``mask_N`` True); exactly 1.0 for a uniform
    router.

    ``f_i``: fraction of routed assignments that went to expert i (count / (tokens * K)); ``P_i``: mean
    probability of expert i. Gradient flows through ``P`` only (``f`` is a count).
    """
    N, E = probs_NE.shape
    K = index_NK.shape[-1]
    m_N = probs_NE.new_ones(N) if mask_N is None else mask_N.to(probs_NE.dtype)
    n_real = m_N.sum().clamp_min(1.0)
    counts_E = probs_NE.new_zeros(E).index_add_(0, index_NK.reshape(-1), m_N.repeat_interleave(K))
    f_E = counts_E / (n_real * K)
    P_E = (probs_NE * m_N[:, None]).sum(dim=0) / n_real
    return E * (f_E * P_E).sum()


def router_z_loss(logits_NE: torch.Tensor, mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp_i(logits[t, i])^2`` over real tokens."""
    z_N = torch.logsumexp(logits_NE, dim=-1).square()
    if mask_N is None:
        return z_N.mean()
    m_N = mask_N.to(z_N.dtype)
    return (z_N * m_N).sum() / m_N.sum().clamp_min(1.0)


def sequence_balance_loss(
    probs_NE: torch.Tensor,
    index_NK: torch.Tensor,
    segment_N: torch.Tensor,
    num_segments: int,
    mask_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss: the Switch loss per sequence, averaged over
    sequences.

    ``segment_N`` gives each token's sequence (row, or packed document); sequences without real tokens are
    skipped.
    """
    N, E = probs_NE.shape
    K = index_NK.shape[-1]
    m_N = probs_NE.new_ones(N) if mask_N is None else mask_N.to(probs_NE.dtype)
    ntok_D = probs_NE.new_zeros(num_segments).index_add_(0, segment_N, m_N)
    counts_DE = probs_NE.new_zeros(num_segments * E)
    flat = (segment_N[:, None] * E + index_NK).reshape(-1)
    counts_DE = counts_DE.index_add_(0, flat, m_N.repeat_interleave(K)).view(num_segments, E)
    P_DE = probs_NE.new_zeros(num_segments, E).index_add_(0, segment_N, probs_NE * m_N[:, None])
    denom_D = ntok_D.clamp_min(1.0)
    loss_D = E * ((counts_DE / (denom_D[:, None] * K)) * (P_DE / denom_D[:, None])).sum(dim=-1)
    has_D = (ntok_D > 0).to(loss_D.dtype)
    return (loss_D * has_D).sum() / has_D.sum().clamp_min(1.0)


def _real_token_mask(ctx: MixerContext | None, B: int, T: int) -> torch.Tensor | None:
    """[B*T] bool, True for real tokens: ``ctx.padding_mask``, else the new-token part of the user's 2-D
    attention mask (the model only builds ``padding_mask`` for mixers that need it), else None (no
    padding)."""
    if ctx is None:
        return None
    if ctx.padding_mask is not None:
        return ctx.padding_mask.reshape(B * T).to(torch.bool)
    if ctx.attention_mask_2d is not None and ctx.attention_mask_2d.shape[-1] >= T:
        return ctx.attention_mask_2d[:, -T:].reshape(B * T).to(torch.bool)
    return None


def _segments(B: int, T: int, ctx: MixerContext | None, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sequence id per token: packed documents from ``ctx.cu_seqlens`` when present, else rows."""
    if ctx is not None and ctx.cu_seqlens is not None:
        cu = ctx.cu_seqlens.to(device=device, dtype=torch.int64)
        positions = torch.arange(B * T, device=device)
        seg = torch.searchsorted(cu[1:], positions, right=True).clamp_max(cu.numel() - 2)
        return seg, cu.numel() - 1
    return torch.arange(B, device=device).repeat_interleave(T), B


def capacity_mask(
    index_NK: torch.Tensor,
    priority_NK: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    mask_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which assignments fit in ``capacity = ceil(capacity_factor * real_tokens * K / E)`` slots per expert.

    Priority inside an expert: higher ``priority_NK`` first, then earlier token. ``HybridMoE`` passes the
    router score of each assignment (before renormalisation, which would make every weight 1 when K = 1), so
    overflow drops the *lowest-score* assignments: V-MoE's batch-prioritised routing rather than Switch's
    first-come order, which penalises tokens late in the batch. Padding never takes a slot and is not counted
    as a drop. Returns ``keep [N, K]`` bool and ``dropped [E]`` fp32 counts of real assignments dropped.
    """
    N, K = index_NK.shape
    valid_S = (
        torch.ones(N * K, dtype=torch.bool, device=index_NK.device)
        if mask_N is None
        else mask_N.reshape(-1).repeat_interleave(K)
    )
    # float64 so the ceil agrees with `expected_capacity` (Python floats) for factors like 1.1
    capacity = torch.ceil(capacity_factor * valid_S.sum().double() / num_experts)
    expert_S = index_NK.reshape(-1)
    priority_S = priority_NK.detach().reshape(-1).float().masked_fill(~valid_S, float("-inf"))
    by_weight = torch.sort(priority_S, descending=True, stable=True).indices  # ties: earlier token first
    order_S = by_weight[torch.sort(expert_S[by_weight], stable=True).indices]  # then grouped by expert
    counts_E = torch.bincount(expert_S, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(N * K, device=index_NK.device) - starts_E[expert_S[order_S]]
    rank_S = torch.empty_like(rank_sorted)
    rank_S[order_S] = rank_sorted
    keep_S = (rank_S < capacity) & valid_S
    dropped_E = torch.zeros(num_experts, device=index_NK.device).index_add_(
        0, expert_S, (~keep_S & valid_S).float()
    )
    return keep_S.view(N, K), dropped_E


# ------------------------------------------------------------------------------------------------------------
# the MLP


def _validate(config: HybridConfig) -> None:
    require_positive(
        config, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"
    )
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"HybridConfig.num_experts_per_tok={config.num_experts_per_tok} must be <= "
            f"num_experts={config.num_experts}"
        )
    if config.num_shared_experts < 0:
        raise ValueError(f"HybridConfig.num_shared_experts={config.num_shared_experts} must be >= 0")
    require_positive(config, "shared_expert_intermediate_size", allow_none=True)
    for name in ("moe_expert_norm", "shared_expert_norm"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"HybridConfig.{name}={getattr(config, name)!r} must be True or False")
    if config.num_shared_experts == 0 and config.shared_expert_norm:
        raise ValueError(
            "HybridConfig.shared_expert_norm=True needs a shared expert; set num_shared_experts >= 1 "
            "(it is 0)"
        )
    if config.num_shared_experts == 0 and config.shared_expert_gate:
        raise ValueError(
            "HybridConfig.shared_expert_gate=True needs a shared "
            "expert; set num_shared_experts >= 1 (it is 0)"
        )
    if config.num_experts % config.n_group or config.topk_group > config.n_group:
        raise ValueError(
            f"HybridConfig.n_group={config.n_group} must divide num_experts={config.num_experts} and "
            f"topk_group={config.topk_group} must be <= n_group"
        )
    per_group = config.num_experts // config.n_group
    if config.n_group > 1 and config.num_experts_per_tok > config.topk_group * per_group:
        raise ValueError(
            f"HybridConfig.num_experts_per_tok={config.num_experts_per_tok} exceeds the experts reachable in "
            f"topk_group={config.topk_group} groups of {per_group}"
        )
    if config.moe_capacity_factor is not None and config.moe_capacity_factor <= 0:
        raise ValueError(f"HybridConfig.moe_capacity_factor={config.moe_capacity_factor} must be > 0 or None")
    limit = config.moe_swiglu_limit
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"HybridConfig.moe_swiglu_limit={limit!r} must be a positive number or None")
        if not config.mlp_gated:
            raise ValueError(
                f"HybridConfig.moe_swiglu_limit={limit!r} clamps the gate and up halves of gated experts; "
                "with mlp_gated=False the experts have no gate (set it to None)"
            )


# The balancing losses and load statistics exclude padded tokens: MoE reads the padding mask.
def _describe(config: HybridConfig) -> list[tuple[str, str]]:
    text = (
        f"{config.num_experts} experts, top-{config.num_experts_per_tok} ({config.router_scoring_func}, "
        f"{config.moe_routing}), expert intermediate {config.moe_intermediate_size}, "
        f"{config.num_shared_experts} shared"
        + (f" ({config.shared_expert_size} wide, sigmoid-gated)" if config.shared_expert_gate else "")
        + (", per-expert output norms" if config.moe_expert_norm else "")
        + (", normed shared output" if config.shared_expert_norm else "")
    )
    return [("MoE", text)]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def moe_mlp_cost(config: HybridConfig, layer_idx: int) -> MLPCost:
    """Router [E, H], fused routed experts [E, 2I, H] + [E, H, I], shared experts (one SwiGLU of
    ``shared_expert_size``), and their sigmoid gate [1, H] when ``shared_expert_gate``."""
    e, k = config.num_experts, config.num_experts_per_tok
    expert = swiglu_params(config, config.moe_intermediate_size)
    router = e * config.hidden_size
    shared = swiglu_params(config, config.shared_expert_size)
    if config.num_shared_experts > 0 and config.shared_expert_gate:
        shared += config.hidden_size  # the shared experts' sigmoid gate [1, H]
    # moe_expert_norm: one RMSNorm row [H] per expert (a 2-D weight [E, H], counted with the matmul weights
    # as every 2-D one is, and inactive with its expert); shared_expert_norm: one RMSNorm [H]
    expert += config.hidden_size if config.moe_expert_norm else 0
    norm = config.hidden_size if config.num_shared_experts > 0 and config.shared_expert_norm else 0
    total = router + e * expert + shared + norm
    return MLPCost(total, total - norm, inactive_params=(e - k) * expert)


@register_mlp(
    "moe",
    needs_padding_mask=True,
    cost=moe_mlp_cost,
    validate=_validate,
    describe=_describe,
    tag="moe",
    config_fields=CONFIG_FIELDS,
    lora_targets=("gate_proj", "up_proj", "down_proj"),  # the shared experts,
    # the shared experts are SwiGLUs clamped by mlp_swiglu_limit too
    functional_fields=lambda config: (
        FUNCTIONAL_FIELDS + (("mlp_swiglu_limit",) if config.num_shared_experts else ())
    ),
)
class HybridMoE(nn.Module):
    """Routed experts (+ always-on shared experts, DeepSeek style): ``[B, T, H] -> [B, T, H]``.

    After each forward the module keeps detached statistics for callbacks that do not see the model outputs:
    ``last_counts [E]`` (routed assignments of real tokens, before capacity drops), ``last_load [E]`` (the
    same as a fraction, sums to 1) and ``last_drops [E]`` (None when dropless).
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.capacity_factor = config.moe_capacity_factor
        self.routing = config.moe_routing
        self.aux_loss_coef = config.router_aux_loss_coef
        self.z_loss_coef = config.router_z_loss_coef
        self.seq_aux_loss_coef = config.router_seq_aux_loss_coef
        self.router = HybridTopKRouter(config, layer_idx)
        if config.moe_expert_norm:  # Ergo: each expert's output normed by its own RMSNorm
            self.experts = (
                HybridNormedExperts(config) if config.mlp_gated else HybridNormedUngatedExperts(config)
            )
        else:
            self.experts = HybridExperts(config) if config.mlp_gated else HybridUngatedExperts(config)
        self.shared_experts = (
            SwiGLU(
                config.hidden_size,
                config.shared_expert_size,
                config.hidden_act,
                gated=config.mlp_gated,
                limit=config.mlp_swiglu_limit,
            )
            if config.num_shared_experts > 0
            else None
        )
        # Qwen2-MoE / Qwen3-Next: a per-token sigmoid gate in [0, 1] on the shared experts' output.
        self.shared_experts_gate = (
            nn.Linear(config.hidden_size, 1, bias=False)
            if config.num_shared_experts > 0 and config.shared_expert_gate
            else None
        )
        # Ergo: an RMSNorm on the shared experts' output
        self.shared_experts_norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if config.num_shared_experts > 0 and config.shared_expert_norm
            else None
        )
        self.last_counts: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_drops: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """E, as the router routes (one home: the router; the experts' weights have it as their first dim)."""
        return self.router_module.num_experts

    @property
    def top_k(self) -> int:
        return self.router_module.top_k

    @property
    def router_module(self) -> HybridTopKRouter:
        """The router itself, even when PEFT has wrapped it (``target_parameters=["router.weight"]``)."""
        get_base = getattr(self.router, "get_base_layer", None)
        return get_base() if callable(get_base) else self.router

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext | None = None) -> torch.Tensor:
        B, T, H = hidden_states.shape
        x_NH = hidden_states.reshape(B * T, H)
        mask_N = _real_token_mask(ctx, B, T)
        token_ids = None
        if self.routing == "hash":
            token_ids = None if ctx is None else ctx.input_ids
            if token_ids is None or token_ids.numel() != B * T:
                raise ValueError(
                    f"HybridMoE layer {self.layer_idx}: moe_routing='hash' picks experts from token "
                    "ids, which the model passes as MixerContext.input_ids [B, T] for the tokens of "
                    f"this forward (got {None if token_ids is None else tuple(token_ids.shape)} for "
                    f"hidden states {(B, T, H)}); hash routing cannot run from inputs_embeds alone"
                )

        router = self.router_module
        logits_NE, weights_NK, index_NK = self.router(x_NH, token_ids=token_ids)

        with torch.no_grad():
            m_S = (
                x_NH.new_ones(B * T * self.top_k, dtype=torch.float32)
                if mask_N is None
                else mask_N.float().repeat_interleave(self.top_k)
            )
            counts_E = torch.zeros(self.num_experts, device=x_NH.device).index_add_(
                0, index_NK.reshape(-1), m_S
            )
            load_E = counts_E / counts_E.sum().clamp_min(1.0)
        drops_E = None
        if self.capacity_factor is not None:
            priority_NK = router.scores(logits_NE.detach()).gather(1, index_NK)
            keep_NK, drops_E = capacity_mask(
                index_NK, priority_NK, self.num_experts, self.capacity_factor, mask_N
            )
            weights_NK = weights_NK * keep_NK

        out_NH = self.experts(x_NH, index_NK, weights_NK.to(x_NH.dtype))
        if self.shared_experts is not None:
            shared_NH = self.shared_experts(x_NH)
            if self.shared_experts_norm is not None:
                shared_NH = self.shared_experts_norm(shared_NH)
            if self.shared_experts_gate is not None:
                shared_NH = torch.sigmoid(self.shared_experts_gate(x_NH)) * shared_NH
            out_NH = out_NH + shared_NH

        if self.training:
            # gradient checkpointing replays this forward: count each token once
            if not in_backward_recompute():
                router.accumulate_counts(counts_E)
            if ctx is not None:
                self._add_losses(ctx, router, logits_NE, index_NK, mask_N, B, T)
        if ctx is not None and ctx.output_router_logits:
            ctx.router_logits.append(logits_NE)
        self.last_counts, self.last_load, self.last_drops = counts_E, load_E, drops_E
        if ctx is not None:
            ctx.add_stat("expert_load", self.layer_idx, load_E)
            if drops_E is not None:
                ctx.add_stat("expert_drops", self.layer_idx, drops_E)
        return out_NH.view(B, T, H)

    def aux_terms(self) -> dict[str, float]:
        """The balancing terms this layer records in training -> their coefficients (a term is recorded only
        when its coefficient is > 0)."""
        terms = {
            "router_aux_loss": self.aux_loss_coef,
            "router_z_loss": self.z_loss_coef,
            "router_seq_aux_loss": self.seq_aux_loss_coef,
        }
        return {name: float(coef) for name, coef in terms.items() if coef > 0}

    def _add_losses(self, ctx, router, logits_NE, index_NK, mask_N, B, T) -> None:
        if self.aux_loss_coef > 0 or self.seq_aux_loss_coef > 0:
            probs_NE = _normalised_probs(router, logits_NE)
        if self.aux_loss_coef > 0:
            ctx.add_aux("router_aux_loss", load_balancing_loss(probs_NE, index_NK, mask_N))
        if self.z_loss_coef > 0:
            ctx.add_aux("router_z_loss", router_z_loss(logits_NE, mask_N))
        if self.seq_aux_loss_coef > 0:
            segment_N, num_segments = _segments(B, T, ctx, logits_NE.device)
            ctx.add_aux(
                "router_seq_aux_loss",
                sequence_balance_loss(probs_NE, index_NK, segment_N, num_segments, mask_N),
            )


def expected_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for ``num_tokens`` real tokens (the formula ``capacity_mask`` applies)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


__all__ = [
    "HybridMoE",
    "HybridTopKRouter",
    "HybridExperts",
    "HybridUngatedExperts",
    "HybridNormedExperts",
    "HybridNormedUngatedExperts",
    "ExpertOutputNorm",
    "experts_forward_loop",
    "stable_topk",
    "group_limited_mask",
    "hash_experts",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "capacity_mask",
    "expected_capacity",
]
