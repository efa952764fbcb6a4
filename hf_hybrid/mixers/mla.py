"""Multi-head Latent Attention (DeepSeek-V2/V3), ``mixer_types`` value ``"mla"``.

Legend: B batch, T new tokens, S keys (cache + new), H heads, dn = ``qk_nope_head_dim``, dr =
``qk_rope_head_dim``, dv = ``v_head_dim``, r = ``kv_lora_rank``, rq = ``q_lora_rank``.

1. query:  ``q = q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)``) split per head into ``q_nope`` [dn]
   and ``q_pe`` [dr]; RoPE on ``q_pe`` only.
2. key/value latent: ``kv_a_proj_with_mqa(x)`` = ``c_kv`` [r] (then ``kv_a_layernorm``) and one rope key
   ``k_pe`` [dr] shared by all heads (the decoupled RoPE key).
3. cache: only ``(c_kv, k_pe)`` — (r + dr) numbers per token and layer — stored like transformers 5.23's
   ``deepseek_v3`` does: single-head ``keys = c_kv [B, 1, S, r]``, ``values = k_pe [B, 1, S, dr]`` (rotated)
   in the ordinary ``DynamicLayer`` of the layer. No new cache layer type: transformers' mapping of cache
   layer types is global, so registering one under an existing name would replace it for every model.
4. attention, two paths side by side:
   - **dense / naive** (:meth:`HybridMLA.attend_dense`): ``kv_b_proj(c_kv)`` expands every cached latent into
     per-head ``k_nope`` [dn] and ``v`` [dv]; ``k = [k_nope, k_pe]``; attention through transformers'
     interface (eager, sdpa, flash, flex). Used for prefill and training (and for decode with
     ``mla_decode="naive"``).
   - **absorbed** (:meth:`HybridMLA.attend_absorbed`): with ``W_uk [H, dn, r]`` and ``W_uv [H, dv, r]`` the
     two halves of ``kv_b_proj``, ``q_nope·(W_uk c) = (W_ukᵀ q_nope)·c``, so each head's query moves into the
     latent space and attends MQA-style directly on the cached ``[c_kv, k_pe]``; the latent output ``Σ p c``
     leaves through ``W_uv``. Nothing of size S × H × (dn + dv) is built. Used for decode (see
     :meth:`HybridMLA.uses_absorbed`).

Options beyond DeepSeek's layout (what an exact dense → MLA conversion needs, ``hf_hybrid.convert.mla``;
the native exports refuse them):

- ``mla_rope_heads = R > 1``: R decoupled rope keys instead of one, ``k_pe`` [R·dr] per token (cached as one
  flat single-head tensor); query head ``h`` scores against rope key ``h // (H / R)`` — a GQA source keeps
  one rope key per kv head.
- ``mla_latent_norm=False``: no ``q_a_layernorm`` / ``kv_a_layernorm``, so the latents are linear in x.
- ``mla_rope_pairs``: the rope channels rotate at the frequencies of pairs ``mla_rope_pairs`` of the RoPE
  table of size ``head_dim`` (the source's frequencies) instead of the table of size dr.
- ``qk_nope_head_dim = 0``: every query/key channel is rotary (``kv_b_proj`` carries values only).
- ``qk_rope_head_dim = 0`` (GLM-5-Next's MLA): no rope channels and no rope key at all — every query/key
  channel comes per head from ``kv_b_proj``, nothing is rotated (NoPE), and the cache holds ``c_kv`` only.

``mla_output_gate=True`` (AXK2's attention): ``q_b_proj`` reads ``[q_a_layernorm(c_q), c_q]`` (2·rq wide)
and emits per head ``[q (dn + dr), g (dv)]``; each head's output ``o_h`` becomes ``o_h · sigmoid(g_h)`` (fp32
gate) before ``o_proj``. The latent caches are unchanged.

``mla_use_rope=False`` (Kimi Linear's MLA, NoPE): the ``q_pe`` / ``k_pe`` channels are used as they are,
unrotated (still one ``k_pe`` shared by all heads and cached), so attention sees no positions at all.

RoPE layout: rotate-half (``layers.apply_rope``, the same as our attention mixer). transformers'
``deepseek_v3`` defaults to ``rope_interleave=True`` (DeepSeek's checkpoints rotate adjacent pairs) and writes
the rotated pairs back de-interleaved (evens, then odds). That equals rotate-half applied to the
de-interleaved input, so a DeepSeek checkpoint maps onto this module exactly by permuting the rope rows of
``q_b_proj`` (per head) and ``kv_a_proj_with_mqa`` with :func:`rope_deinterleave_index`; even the cached
``k_pe`` is then the same (``tests/test_mla.py`` checks this against ``DeepseekV3Attention``).

SDPA with q/k head dim (dn + dr) ≠ v head dim dv cannot use its flash kernels (CUDA falls back to the
mem-efficient kernel, CPU to the math kernel, which also builds the T × T matrix). We zero-pad v to dn + dr
for ``sdpa`` and flash implementations and slice the output. Measured on CPU (torch 2.13, 1 thread, B=1, H=16,
dqk=192, dv=128, causal, fp32): forward 88.5 → 53.8 ms at T=512, 270.6 → 136.6 ms at T=1024 (bool mask: 252.5
→ 162.0 ms); forward+backward 155 → 161 ms at T=512, 655 → 475 ms at T=1024. Flash kernels require equal head
dims.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from ..layers import LogPositionQueryScale, RMSNorm, apply_rope
from ..specs import ConfigField, KVKind, MixerCost, positive_or_none, register_mixer, require_positive
from .attention import attention_flops, eager_attention_forward
from .base import MixerContext

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig

# The projections PEFT's default LoRA config adapts (q_proj when q_lora_rank is None).
MLA_LORA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
# The config fields that decide an MLA layer's function (a native export compares them; the mla_* options
# are compared on every config).
MLA_FIELDS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "attention_bias",
    "attention_sinks",  # DSA on MLA has them too (HY-V4)
)

# The config fields of MLA layers (DeepSeek-V2/V3 names; DSA on MLA reads them too).
CONFIG_FIELDS = (
    ConfigField("q_lora_rank", None, "int | None"),
    ConfigField("kv_lora_rank", 128, "int"),
    ConfigField("qk_nope_head_dim", 32, "int"),
    ConfigField("qk_rope_head_dim", 16, "int"),
    ConfigField("v_head_dim", 32, "int"),
    ConfigField("mla_decode", "absorbed", "str", choices=("absorbed", "naive")),
    ConfigField(
        "mla_norm_eps",
        None,
        "float | None",
        check=positive_or_none,
        doc="eps of q_a_layernorm / kv_a_layernorm; None = rms_norm_eps (DeepSeek: 1e-6)",
        effective=lambda c: c.mla_norm_eps if c.mla_norm_eps is not None else c.rms_norm_eps,
    ),
    ConfigField(
        "mla_use_rope",
        True,
        "bool",
        doc="False = NoPE (Kimi Linear): the qk_rope_head_dim parts stay unrotated",
        # with no rope channels (qk_rope_head_dim=0) there is nothing to rotate: both values are one function
        effective=lambda c: c.mla_use_rope or c.qk_rope_head_dim == 0,
    ),
    # Decoupled RoPE keys: 1 shared by all heads (DeepSeek); more (dividing num_attention_heads) give each
    # group of heads its own rope key, as a GQA source has one per kv head (hf_hybrid.convert.mla).
    ConfigField("mla_rope_heads", 1, "int"),
    ConfigField(
        "mla_latent_norm",
        True,
        "bool",
        doc="False: no q_a_layernorm / kv_a_layernorm (the latents stay linear in x: exact dense -> MLA "
        "conversion)",
    ),
    # Which frequencies the qk_rope_head_dim rope channels use: None = the RoPE table of size
    # qk_rope_head_dim (DeepSeek); else qk_rope_head_dim/2 pair indices into the table of size head_dim
    # (partial RoPE kept from a dense source, which keeps its frequencies).
    ConfigField("mla_rope_pairs", None, "list[int] | None"),
    # Gated MLA output (AXK2's attention): q_b_proj reads [q_a_layernorm(c_q), c_q] (the normed and the raw
    # q latent, 2·q_lora_rank wide) and emits per head the query and a gate g [v_head_dim]; each head's
    # output is multiplied by sigmoid(g) before o_proj. Needs q_lora_rank.
    ConfigField("mla_output_gate", False, "bool"),
    # Gated MLA output from its own projection (HY-V4's attention): o = o_proj(attn · sigmoid(gate_proj(x))),
    # gate_proj [hidden -> heads · v_head_dim], on MLA and DSA-on-MLA layers. Exclusive with mla_output_gate.
    ConfigField("mla_gate_proj", False, "bool"),
)


logger = logging.get_logger(__name__)


def mla_softmax_scale(config: HybridConfig) -> float:
    """``(dn + dr)^-½``, times DeepSeek's YaRN ``mscale²`` when the rope scaling sets ``mscale_all_dim``
    (``mscale = 0.1 · mscale_all_dim · ln(factor) + 1`` for factor > 1)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters or {}
    mscale_all_dim = rope.get("mscale_all_dim") or 0
    factor = float(rope.get("factor") or 1.0)
    if rope.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1.0:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale


def rope_deinterleave_index(dim: int) -> torch.Tensor:
    """Row order ``[0, 2, 4, ..., 1, 3, 5, ...]`` that turns DeepSeek's interleaved rope channels into our
    rotate-half layout: ``w_ours[rope_rows] = w_deepseek[rope_rows][rope_deinterleave_index(dr)]``."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def effective_linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` matrix ``module`` applies *right now*, built at call time (so it is never stale), or
    None when it is not a bias-free linear map we can read exactly.

    - ``nn.Linear`` (no bias): its weight.
    - a ``peft`` LoRA ``Linear`` over a bias-free ``nn.Linear``, mirroring peft's own forward: adapters
      disabled → the base weight; merged → the base weight (it already holds the merge, and peft skips the
      adapters); otherwise base + Σ ``scaling · B·A`` over the active adapters, differentiable in A and B.
    - None for what a weight cannot express: LoRA variants (DoRA, ...), ``lora_bias``, LoRA dropout while
      training, disabled-but-merged adapters (peft unmerges inside its forward), quantised bases, other
      wrappers.
    """
    if type(module) is nn.Linear:
        return module.weight if module.bias is None else None
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or type(base) is not nn.Linear or base.bias is not None:
        return None
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if not isinstance(module, LoraLinear):
        return None
    if module.disable_adapters:
        return None if module.merged else base.weight
    if module.merged:
        return base.weight
    weight = base.weight
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in module.lora_variant or module.lora_bias.get(name, False):
            return None
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, nn.Identity) and dropout.training and getattr(dropout, "p", 0.0) > 0:
            return None
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def latent_attention_bias(
    mask: object, ctx: MixerContext, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Turn the mask transformers built for this layer into an additive fp32 bias [B|1, 1, T, S] (or None =
    all visible), with the semantics the attention interface gives it:

    - 4D bool (sdpa): True = attend; 4D float (eager): already additive (0 or a large negative);
    - 2D [B, S] (flash): padding only, causality is the kernel's; None (sdpa/flash with no padding): causal
      only;
    - anything else (flex's ``BlockMask``): rebuilt from ``ctx.attention_mask_2d`` + causality.
    Causality is aligned bottom-right: new query i sits at position S - T + i.
    """
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        mask = mask[..., -q_len:, -kv_len:]  # static-length masks may be longer than what is cached
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(
                ~mask.to(device), torch.finfo(torch.float32).min
            )
        return mask.to(device=device, dtype=torch.float32)
    allowed = None
    padding = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else ctx.attention_mask_2d
    if padding is not None:
        allowed = padding[:, -kv_len:].to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
    if q_len > 1:
        rows = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        causal = torch.arange(kv_len, device=device)[None, :] <= rows  # (T, S)
        allowed = causal[None, None] if allowed is None else allowed & causal
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min
    )


class MLAProjection(NamedTuple):
    """Everything MLA (and DSA built on it) attends with. Positions are already rotated."""

    q_nope: torch.Tensor  # (B, T, H, dn)
    q_pe: torch.Tensor  # (B, T, H, dr), rotated
    q_latent: torch.Tensor | None  # (B, T, rq) after q_a_layernorm; None without q-LoRA (DSA's indexer input)
    c_kv: torch.Tensor  # (B, S, r) after kv_a_layernorm, cache + new tokens
    k_pe: torch.Tensor  # (B, S, R·dr) rotated, cache + new tokens (R = mla_rope_heads, usually 1)
    gate: torch.Tensor | None = None  # (B, T, H, dv) output gate logits (mla_output_gate), else None


def validate_mla(config: HybridConfig) -> None:
    require_positive(config, "q_lora_rank", allow_none=True)
    require_positive(config, "kv_lora_rank", "v_head_dim", "mla_rope_heads")
    for name in ("qk_nope_head_dim", "qk_rope_head_dim"):  # either may be 0 (GLM-5-Next: no rope channels)
        dim = getattr(config, name)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"HybridConfig.{name}={dim!r} must be an integer >= 0")
    if config.qk_nope_head_dim + config.qk_rope_head_dim == 0:
        raise ValueError(
            "HybridConfig.qk_nope_head_dim=0 and qk_rope_head_dim=0: MLA needs query/key channels; set "
            "either > 0"
        )
    if config.qk_rope_head_dim % 2:
        raise ValueError(f"HybridConfig.qk_rope_head_dim={config.qk_rope_head_dim} must be even (RoPE pairs)")
    if config.num_attention_heads % config.mla_rope_heads:
        raise ValueError(
            f"HybridConfig.mla_rope_heads={config.mla_rope_heads} must divide "
            f"num_attention_heads={config.num_attention_heads} (each rope key serves a group of heads)"
        )
    if not isinstance(config.mla_output_gate, bool):
        raise ValueError(f"HybridConfig.mla_output_gate={config.mla_output_gate!r} must be True or False")
    if config.mla_output_gate and config.q_lora_rank is None:
        raise ValueError(
            "HybridConfig.mla_output_gate=True needs a q latent (q_lora_rank), got q_lora_rank=None: the "
            "gate is projected from it"
        )
    if not isinstance(config.mla_latent_norm, bool):
        raise ValueError(f"HybridConfig.mla_latent_norm={config.mla_latent_norm!r} must be True or False")
    pairs = config.mla_rope_pairs
    if pairs is not None:
        half = config.head_dim // 2
        ok = (
            all(isinstance(i, int) and not isinstance(i, bool) for i in pairs)
            and list(pairs) == sorted(set(pairs))
            and all(0 <= i < half for i in pairs)
        )
        if not ok or 2 * len(pairs) != config.qk_rope_head_dim:
            raise ValueError(
                f"HybridConfig.mla_rope_pairs={list(pairs)!r} must be qk_rope_head_dim/2="
                f"{config.qk_rope_head_dim // 2} increasing pair indices in [0, head_dim/2={half})"
            )
        if not config.mla_use_rope:
            raise ValueError(
                "HybridConfig.mla_rope_pairs needs mla_use_rope=True (it picks RoPE frequencies)"
            )


def _validate_mla_kind(config: HybridConfig) -> None:
    """The ``mla`` kind's checks: :func:`validate_mla` (which DSA on MLA runs too) and no sinks."""
    validate_mla(config)
    if config.attention_sinks:
        raise ValueError(
            "HybridConfig.attention_sinks=True with 'mla' layers: dense MLA has no sinks yet; sinks are "
            "supported by attention, sliding_attention and DSA on MLA (sparse mode) layers"
        )


# ---- cross-layer options (kv_source_layers, nope_layers, rope_learned_scale); DSA on MLA reads them too ----


def mla_nope_layer(config: HybridConfig, layer_idx: int) -> bool:
    """An MLA layer named in ``nope_layers`` has no decoupled rope key (Mistral-Large-4's NoPE layers):
    its ``qk_rope_head_dim`` query/key channels come per head from ``kv_b_proj`` like the others
    (``qk_nope_head_dim + qk_rope_head_dim`` of them, none rotated) and it caches ``c_kv`` only. (Kimi
    Linear's NoPE MLA, ``mla_use_rope=False``, keeps the shared key unrotated instead.) ``layer_idx``: an MLA
    layer (``mla``, or DSA on MLA)."""
    return layer_idx in (config.nope_layers or ())


def mla_head_dims(config: HybridConfig, layer_idx: int) -> tuple[int, int]:
    """(nope, rope) query/key head dims of MLA layer ``layer_idx``."""
    if mla_nope_layer(config, layer_idx):
        return config.qk_nope_head_dim + config.qk_rope_head_dim, 0
    return config.qk_nope_head_dim, config.qk_rope_head_dim


def mla_kv_kind(config: HybridConfig, layer_idx: int) -> KVKind:
    """An MLA layer shares its latent ``(c_kv, k_pe)`` with MLA layers of the same RoPE use."""
    if mla_nope_layer(config, layer_idx):
        return KVKind("mla_latent_without_rope_key", False)
    return KVKind("mla_latent", config.mla_use_rope)


def mla_rope_dims(config: HybridConfig, layer_idx: int) -> set[int]:
    if config.mla_use_rope and not mla_nope_layer(config, layer_idx):
        return {config.qk_rope_head_dim if config.mla_rope_pairs is None else config.head_dim}
    return set()


def _accepts_nope(config: HybridConfig, layer_idx: int) -> bool:
    return True


def describe_mla(config: HybridConfig) -> list[tuple[str, str]]:
    return [
        (
            "MLA",
            f"{config.num_attention_heads} heads, q_lora_rank {config.q_lora_rank}, kv_lora_rank "
            f"{config.kv_lora_rank}, qk dims {config.qk_nope_head_dim}+{config.qk_rope_head_dim} "
            f"({'rope' if config.mla_use_rope else 'shared, no RoPE'}"
            f"{f', {config.mla_rope_heads} rope keys' if config.mla_rope_heads != 1 else ''}"
            f"{', source RoPE pairs' if config.mla_rope_pairs is not None else ''}), "
            f"v dim {config.v_head_dim}"
            f"{'' if config.mla_latent_norm else ', no latent norms'}"
            f"{', sigmoid output gate' if config.mla_output_gate else ''}",
        )
    ]


# ---- cost (the inspector and the card read it through the spec) --------------------------------------------


def mla_parts(config: HybridConfig, layer_idx: int | None = None) -> tuple[int, int]:
    """(params, matmul params) of DeepSeek-V2/V3 MLA (transformers' ``deepseek_v3`` layout) in layer
    ``layer_idx`` (None: a layer that owns its latent)."""
    kv = 0 if layer_idx is not None and config.shares_kv(layer_idx) else 1  # kv_source_layers: no kv_a_*
    h, nh = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    # nope_layers: no rope key, its channels per head from kv_b_proj
    dn, dr = (
        (config.qk_nope_head_dim, config.qk_rope_head_dim)
        if layer_idx is None
        else mla_head_dims(config, layer_idx)
    )
    r_kv = config.kv_lora_rank
    rope_keys = config.mla_rope_heads * dr  # 1 shared rope key (DeepSeek) or R
    norms = config.mla_latent_norm  # q_a_layernorm / kv_a_layernorm
    if config.q_lora_rank and config.mla_output_gate:
        # q_b_proj reads [normed, raw] latent and emits the query and a v_head_dim gate per head
        q_matmul = h * config.q_lora_rank + 2 * config.q_lora_rank * nh * (qk + config.v_head_dim)
        q_norm = config.q_lora_rank if norms else 0
    elif config.q_lora_rank:
        q_matmul = h * config.q_lora_rank + config.q_lora_rank * nh * qk
        q_norm = config.q_lora_rank if norms else 0
    else:
        q_matmul, q_norm = h * nh * qk, 0
    matmul = (
        q_matmul
        + kv * h * (r_kv + rope_keys)  # kv_a_proj_with_mqa
        + r_kv * nh * (dn + config.v_head_dim)  # kv_b_proj
        + nh * config.v_head_dim * h  # o_proj
        + (h * nh * config.v_head_dim if getattr(config, "mla_gate_proj", False) else 0)  # gate_proj
    )
    # attention_bias: biases on q_a_proj (with a q latent), kv_a_proj_with_mqa and o_proj (DeepSeek's layout).
    bias = ((config.q_lora_rank or 0) + kv * (r_kv + rope_keys) + h) if config.attention_bias else 0
    scaling = 2 * nh if config.query_log_scaling else 0  # softmax_scaling.scale / .bias
    return matmul + q_norm + (kv * r_kv if norms else 0) + bias + scaling, matmul


def mla_cost(config: HybridConfig, layer_idx: int) -> MixerCost:
    params, matmul = mla_parts(config, layer_idx)
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    # Cache: the latent c_kv and the rope key(s), once per source (kv_source_layers). FLOPs: the plain
    # (non-absorbed) form, the one training uses.
    own = not config.shares_kv(layer_idx)
    return MixerCost(
        params,
        matmul,
        cache_per_token=own
        * (config.kv_lora_rank + config.mla_rope_heads * mla_head_dims(config, layer_idx)[1]),
        flops=attention_flops(config.num_attention_heads, qk, config.v_head_dim, None),
    )


@register_mixer(
    "mla",
    layer_type="full_attention",
    mask="full_attention",
    cost=mla_cost,
    validate=_validate_mla_kind,
    describe=describe_mla,
    config_fields=CONFIG_FIELDS,
    lora_targets=MLA_LORA_TARGETS,
    functional_fields=lambda config: MLA_FIELDS,
    kv_kind=mla_kv_kind,
    rope_dims=mla_rope_dims,
    accepts_nope=_accepts_nope,
)
class HybridMLA(nn.Module):
    """DeepSeek-V2/V3 MLA. Public pieces for mixers built on it (DSA): :meth:`project_q`, :meth:`project_kv`,
    :meth:`project` (+ RoPE + cache), :meth:`expand_kv`, :meth:`attend_dense`, :meth:`absorbed_weights`,
    :meth:`absorb_query`, :meth:`latent_to_value`, :meth:`attend_absorbed`, :meth:`latent_qkv` (MQA form for
    sparse kernels), :meth:`output`, :meth:`uses_absorbed`."""

    def returns_attention_weights(self) -> bool:
        """Eager attention hands its probabilities to ``ctx.attentions`` (``output_attentions=True``)."""
        return True

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        # nope_layers (Mistral-Large-4): no decoupled rope key, the rope channels join the per-head nope ones
        self.qk_nope_head_dim, self.qk_rope_head_dim = mla_head_dims(config, layer_idx)
        self.use_rope = config.mla_use_rope and not mla_nope_layer(config, layer_idx)
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.rope_heads = config.mla_rope_heads  # R decoupled rope keys (1: DeepSeek's shared one)
        self.rope_pairs = None if config.mla_rope_pairs is None else list(config.mla_rope_pairs)
        self._rope_index: dict[str, torch.Tensor] = {}
        self.num_key_value_groups = 1  # read by the attention interface: the dense path expands K/V per head
        self.is_causal = True
        self.scaling = mla_softmax_scale(config)
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        H, dqk = self.num_heads, self.qk_head_dim
        latent_eps = config.mla_norm_eps if config.mla_norm_eps is not None else config.rms_norm_eps

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, H * dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = (
                RMSNorm(self.q_lora_rank, eps=latent_eps) if config.mla_latent_norm else nn.Identity()
            )
            self.output_gate = config.mla_output_gate
            if self.output_gate:
                self.q_b_proj = nn.Linear(2 * self.q_lora_rank, H * (dqk + self.v_head_dim), bias=False)
            else:
                self.q_b_proj = nn.Linear(self.q_lora_rank, H * dqk, bias=False)
        # kv_source_layers: a layer that reads an earlier layer's latent has no kv_a_proj_with_mqa /
        # kv_a_layernorm (Mistral-Large-4's layout); it keeps its own kv_b_proj
        self.kv_source = config.kv_source(layer_idx)
        self.shares_kv = self.kv_source != layer_idx
        self.stores_kv = config.is_kv_source(layer_idx)
        if not self.shares_kv:
            self.kv_a_proj_with_mqa = nn.Linear(
                config.hidden_size, self.kv_lora_rank + self.rope_heads * self.qk_rope_head_dim, bias=bias
            )
            self.kv_a_layernorm = (
                RMSNorm(self.kv_lora_rank, eps=latent_eps) if config.mla_latent_norm else nn.Identity()
            )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(H * self.v_head_dim, config.hidden_size, bias=bias)
        self.softmax_scaling = LogPositionQueryScale(H) if config.query_log_scaling else None
        # mla_gate_proj (HY-V4): per-head sigmoid gate on the attention output, from x
        self.gate_proj = (
            nn.Linear(config.hidden_size, H * self.v_head_dim, bias=False)
            if getattr(config, "mla_gate_proj", False)
            else None
        )
        self._warned_fallback = False

    # ---- projections ---------------------------------------------------------------------------------------
    def project_q(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [B, T, hidden] -> q_nope [B, T, H, dn], q_pe [B, T, H, dr] (not rotated), q_latent [B, T, rq] |
        None, gate [B, T, H, dv] | None (``mla_output_gate``)."""
        b, t, _ = hidden_states.shape
        gate = None
        if self.q_lora_rank is None:
            q_latent = None
            q = self.q_proj(hidden_states)
        elif self.output_gate:
            raw = self.q_a_proj(hidden_states)
            q_latent = self.q_a_layernorm(raw)
            qg = self.q_b_proj(torch.cat([q_latent, raw], dim=-1))
            qg = qg.view(b, t, self.num_heads, self.qk_head_dim + self.v_head_dim)
            q, gate = qg.split([self.qk_head_dim, self.v_head_dim], dim=-1)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_latent)
        q = q.reshape(b, t, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, q_pe, q_latent, gate

    def project_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> c_kv [B, T, r] (after kv_a_layernorm), k_pe [B, T, R·dr] (not rotated)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.rope_heads * self.qk_rope_head_dim], dim=-1
        )
        return self.kv_a_layernorm(c_kv), k_pe

    def rope_table(self, ctx: MixerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, dr] of the rope channels: the RoPE table of size dr, or the pairs
        ``mla_rope_pairs`` of the table of size ``head_dim`` (rotate-half layout either way)."""
        if self.rope_pairs is None:
            return ctx.rope(self.qk_rope_head_dim)
        cos, sin = ctx.rope(self.config.head_dim)
        key = str(cos.device)
        if key not in self._rope_index:
            pairs = torch.tensor(self.rope_pairs, dtype=torch.long, device=cos.device)
            self._rope_index[key] = torch.cat([pairs, pairs + self.config.head_dim // 2])
        index = self._rope_index[key]
        return cos.index_select(-1, index), sin.index_select(-1, index)

    def rope_keys_per_head(self, k_pe: torch.Tensor) -> torch.Tensor:
        """k_pe [B, S, R·dr] -> [B, S, H, dr]: each head's rope key (a view when R = 1)."""
        b, s, _ = k_pe.shape
        k_pe = k_pe.view(b, s, self.rope_heads, self.qk_rope_head_dim)
        if self.rope_heads == 1:
            return k_pe.expand(b, s, self.num_heads, self.qk_rope_head_dim)
        return k_pe.repeat_interleave(self.num_heads // self.rope_heads, dim=2)

    def project(self, hidden_states: torch.Tensor, ctx: MixerContext) -> MLAProjection:
        """Projections, RoPE on the rope parts, and the cache: append this forward's ``(c_kv, k_pe)`` to the
        layer's ``DynamicLayer`` and return the whole latent history."""
        b, t, _ = hidden_states.shape
        q_nope, q_pe, q_latent, gate = self.project_q(hidden_states)
        if self.gate_proj is not None:  # mla_gate_proj (HY-V4): the gate from x, not from q_b_proj
            gate = self.gate_proj(hidden_states).view(b, t, self.num_heads, self.v_head_dim)
        # False = NoPE (Kimi Linear): the "rope" channels are ordinary shared channels
        cos, sin = self.rope_table(ctx) if self.use_rope else (None, None)
        if self.use_rope:
            q_pe = apply_rope(q_pe, cos, sin)
        if self.softmax_scaling is not None:  # query_log_scaling: per head and position, after RoPE
            q_nope = self.softmax_scaling(q_nope, ctx.position_ids)
            q_pe = self.softmax_scaling(q_pe, ctx.position_ids)
        if self.shares_kv:
            # The source layer's latent and (already rotated) rope key, cache included (kv_source_layers).
            c_kv, k_pe = ctx.kv_from_source(self.layer_idx, self.kv_source)
            return MLAProjection(q_nope, q_pe, q_latent, c_kv, k_pe, gate)
        c_kv, k_pe = self.project_kv(hidden_states)
        if self.use_rope:
            k_pe = k_pe.view(b, t, self.rope_heads, self.qk_rope_head_dim)
            k_pe = apply_rope(k_pe, cos, sin).view(b, t, -1)
        if ctx.cache is not None:
            # Single-head 4D tensors, as transformers' deepseek_v3 stores them: keys = c_kv, values = rotated
            # k_pe.
            c_all, k_pe_all = ctx.cache.update(c_kv.unsqueeze(1), k_pe.unsqueeze(1), self.layer_idx)
            c_kv, k_pe = c_all.squeeze(1), k_pe_all.squeeze(1)  # (B, S, r), (B, S, dr)
        if self.stores_kv:  # read by the layers that share it (kv_source_layers)
            ctx.shared_kv[self.layer_idx] = (c_kv, k_pe)
        return MLAProjection(q_nope, q_pe, q_latent, c_kv, k_pe, gate)

    # ---- dense (naive) path --------------------------------------------------------------------------------
    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv [B, S, r], k_pe [B, S, R·dr] -> k [B, H, S, dn + dr], v [B, H, S, dv] through ``kv_b_proj``
        (whatever adapter wraps it)."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, self.rope_keys_per_head(k_pe)], dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend_dense(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: object,
        ctx: MixerContext,
    ) -> torch.Tensor:
        """Expanded attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``; ``mask`` as
        transformers built it for that implementation. Returns [B, T, H, dv]."""
        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn + dr)
        impl = self.config._attn_implementation or "eager"
        dqk, dv = self.qk_head_dim, self.v_head_dim
        # Equal head dims let sdpa use its flash kernels and are required by flash ones (module docstring).
        pad = dqk != dv and (impl == "sdpa" or "flash" in impl)
        if pad and dv < dqk:
            v = F.pad(v, (0, dqk - dv))
        elif pad:  # zero channels in q and k change no score (the scale is passed explicitly)
            q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out, probs = interface(
            self,
            q,
            k,
            v,
            mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **ctx.attn_kwargs,
        )
        if ctx.output_attentions and probs is not None:
            ctx.attentions.append((self.layer_idx, probs))  # (B, H, T, S)
        return out[..., :dv]  # (B, T, H, dv)

    # ---- absorbed path -------------------------------------------------------------------------------------
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(W_uk [H, dn, r], W_uv [H, dv, r])`` from the weight ``kv_b_proj`` applies now (LoRA included,
        see :func:`effective_linear_weight`), or None when it cannot be expressed as a weight (then use the
        dense path)."""
        weight = effective_linear_weight(self.kv_b_proj)
        if weight is None:
            return None
        weight = weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]

    @staticmethod
    def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, H, dn] -> latent query [B, T, H, r] (``W_ukᵀ q_nope`` per head)."""
        return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)

    @staticmethod
    def latent_to_value(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """Latent output [B, T, H, r] (``Σ_s p c_s``) -> per-head value output [B, T, H, dv]."""
        return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)

    def attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        mask: object,
        ctx: MixerContext,
        weights: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention in the latent space, MQA-style on the cached ``[c_kv, k_pe]``; returns [B, T, H, dv].

        Plain matmul + softmax (the layout DeepSeek's inference code uses): no kernel planning per KV length,
        and the cache is read in place — no concatenation of ``[c_kv, k_pe]``, no expansion. Scores are
        computed in the input dtype (fp32 accumulation inside the GEMM) and the softmax in fp32.
        """
        w_uk, w_uv = weights
        b, t, h, _ = q_nope.shape
        s = c_kv.shape[1]
        # The softmax scale is folded into the (small) queries instead of the (B, T·H, S) scores.
        q_lat = (self.absorb_query(q_nope, w_uk) * self.scaling).reshape(b, t * h, self.kv_lora_rank)
        if self.rope_heads == 1:
            q_pe = (q_pe * self.scaling).reshape(b, t * h, self.qk_rope_head_dim)
            scores = torch.bmm(q_pe, k_pe.transpose(1, 2))  # (B, T·H, S)
        else:  # head group g scores against rope key g
            R, dr = self.rope_heads, self.qk_rope_head_dim
            q_pe = (q_pe * self.scaling).view(b, t, R, h // R, dr)
            scores = torch.einsum("btgjd,bsgd->btgjs", q_pe, k_pe.view(b, s, R, dr)).reshape(b, t * h, s)
        scores = torch.baddbmm(scores, q_lat, c_kv.transpose(1, 2)).view(b, t, h, s)
        bias = latent_attention_bias(mask, ctx, t, s, scores.device)  # (B|1, 1, T, S)
        if bias is not None:
            probs = F.softmax(scores.float() + bias.transpose(1, 2), dim=-1, dtype=torch.float32)
        else:
            probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        probs = F.dropout(probs, p=self.attention_dropout if self.training else 0.0, training=self.training)
        if ctx.output_attentions:
            ctx.attentions.append((self.layer_idx, probs.transpose(1, 2)))  # (B, H, T, S)
        o_lat = torch.bmm(probs.to(c_kv.dtype).view(b, t * h, s), c_kv)  # (B, T·H, r)
        return self.latent_to_value(o_lat.view(b, t, h, self.kv_lora_rank), w_uv)

    def latent_qkv(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        w_uk: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLA as MQA over the latent, in the ``[B, T, H, D]`` layout of ``hf_hybrid.ops.dsa`` (one shared KV
        head): q [B, T, H, r + dr], k [B, S, 1, r + dr], v [B, S, 1, r]; attend with ``self.scaling``, then
        :meth:`latent_to_value` and :meth:`output`. ``k`` is a copy of the latent history; ``v`` is a view of
        ``c_kv``. Needs one shared rope key (``mla_rope_heads=1``)."""
        if self.rope_heads != 1:
            raise ValueError(
                f"HybridConfig.mla_rope_heads={self.rope_heads}: the latent MQA form needs one shared "
                "rope key (1)"
            )
        q = torch.cat([self.absorb_query(q_nope, w_uk), q_pe], dim=-1)
        k = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(2)
        return q, k, c_kv.unsqueeze(2)

    def output(self, out: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head outputs [B, T, H, dv] (or [B, T, H·dv]) -> [B, T, hidden] through ``o_proj``, after the
        output gate ``out · sigmoid(gate)`` (gate [B, T, H, dv], fp32 sigmoid) when there is one."""
        b, t = out.shape[:2]
        out = out.reshape(b, t, self.num_heads * self.v_head_dim)
        if gate is not None:
            out = (out * torch.sigmoid(gate.reshape(b, t, -1).float())).to(out.dtype)
        return self.o_proj(out)

    def uses_absorbed(self, q_len: int, kv_len: int, past_len: int) -> bool:
        """Absorbed attention is chosen by ``config.mla_decode`` for decode steps — there are cached tokens
        (``past_len > 0``, so never a packed prefill) and it is cheaper than expanding: per head, absorbed
        costs ``T·(r·dn + S·(2r + dr) + r·dv)`` multiply-adds, naive ``S·r·(dn + dv) + T·S·(dn + dr + dv)``;
        with DeepSeek's sizes (r=512, dn=dv=128, dr=64) absorbed wins up to T ≈ 170 new tokens."""
        if self.config.mla_decode != "absorbed" or past_len == 0:
            return False
        r, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        dr = self.qk_rope_head_dim * self.rope_heads
        absorbed = q_len * (r * dn + kv_len * (2 * r + dr) + r * dv)
        naive = kv_len * r * (dn + dv) + q_len * kv_len * (dn + dr + dv)
        return absorbed <= naive

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        p = self.project(hidden_states, ctx)
        mask = ctx.masks.get("full_attention")
        out = None
        if self.uses_absorbed(t, p.c_kv.shape[1], ctx.past_length):
            weights = self.absorbed_weights()
            if weights is not None:
                out = self.attend_absorbed(p.q_nope, p.q_pe, p.c_kv, p.k_pe, mask, ctx, weights)
            elif not self._warned_fallback:
                self._warned_fallback = True
                logger.warning(
                    f"MLA layer {self.layer_idx}: kv_b_proj ({type(self.kv_b_proj).__name__}) cannot be "
                    "read as one weight (LoRA variant, lora_bias, active LoRA dropout, quantised base, "
                    "...); decoding with the naive path (mla_decode='naive') instead of the absorbed one"
                )
        if out is None:
            out = self.attend_dense(p.q_nope, p.q_pe, p.c_kv, p.k_pe, mask, ctx)
        return self.output(out, p.gate)


__all__ = [
    "HybridMLA",
    "MLAProjection",
    "effective_linear_weight",
    "latent_attention_bias",
    "mla_softmax_scale",
    "rope_deinterleave_index",
]
