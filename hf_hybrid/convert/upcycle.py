"""Dense → MoE upcycling: every chosen dense SwiGLU MLP becomes a ``HybridMoE`` whose experts
start as copies of it, so the MoE model begins where the dense one ended.

    hf-hybrid upcycle SRC DST --num-experts 8 --top-k 2 [--shared-expert] [--granularity G] [--drop-upcycling
    r]
                      [--noise s] [--layers 1,3,5] [--router softmax|sigmoid] [--no-renormalize]
                      [--routed-scaling F] [--router-init-std S] [--group-limited] [--seed N]

``SRC`` is an hf_hybrid checkpoint or a dense Llama / Qwen2 / Qwen3 / Mistral checkpoint saved by transformers
(imported on the way with :func:`hf_hybrid.convert.import_dense.import_dense`).

Shape legend: ``H`` hidden, ``I`` dense intermediate size, ``G`` granularity (shards per dense MLP), ``E``
copies of the dense MLP (``--num-experts``), ``k`` copies per token (``--top-k``). The MoE has ``E·G`` experts
of size ``I/G`` and routes each token to ``k·G`` of them; expert ``j = e·G + g`` holds shard ``g``
(intermediate neurons ``[g·I/G, (g+1)·I/G)``) of copy ``e`` — copy-major, so the shards of one copy are
contiguous.

Exact starts (fp32, dropless, no noise, no Drop-Upcycling; tests check logits within 1e-5 of the source). Let
``c`` be the factor applied to the routed experts' ``down_proj`` and ``F`` the routed scaling factor:

1. **renormalised top-k** (default): the selected weights sum to ``F``; a copy's ``G`` shards share one router
   row (Megatron's "virtual group" construction), so they get equal weights and together rebuild the dense
   MLP: ``c = G / F`` (``1`` for the plain case ``G = 1, F = 1``). Exact for any router with rows shared
   inside a copy, so the router gets a small random init (``--router-init-std``, default
   ``config.initializer_range``) that breaks the symmetry between copies at no cost to exactness.
2. **no renormalisation** (``--no-renormalize``): the router starts at zero, so every selected weight is
   ``w₀ = 1/(E·G)`` (softmax) or ``½`` (sigmoid) and ``c = 1 / (k · w₀ · F)`` — ``E·G/k`` for softmax, ``2/k``
   for sigmoid at ``F = 1``. Exact only with the zero router: ``--router-init-std > 0`` trades exactness for
   symmetry breaking (the output is then off by the spread of the router weights).
3. **shared expert** (``--shared-expert``): one shared SwiGLU of size ``I`` (``G`` shared experts of ``I/G``).
   We **halve both**: shared = the dense MLP with ``down_proj · ½``, routed ``c`` as above times ``½``.
   Halving (rather than "shared = dense, routed ``down_proj`` = 0") gives every routed parameter and the
   router a gradient from the first step: a zero ``down_proj`` sends no gradient to the experts'
   ``gate_up_proj`` nor to the router until ``down_proj`` itself has moved, and keeps the routed copies
   identical for longer.

Granular upcycling (``G > 1``) is exact when each token's top-``k·G`` consists of whole copies. What we
guarantee:
- with ``--group-limited`` (DeepSeek's group-limited routing with one group per copy: ``n_group = E``,
  ``topk_group = k``) whole copies are selected *structurally*, under any rounding and after any training — at
  the price of routing that stays copy-granular for good (the shards of a copy can still learn different
  weights);
- without it (default), whole copies are selected as long as the ``G`` logits of a copy are bitwise equal —
  they come from identical router rows, which torch's CPU GEMM maps to identical values (tested) — because the
  router's stable top-k lists tied experts in index order and a copy's shards are contiguous (even a zero
  router, where every expert ties, picks the first ``k`` whole copies). Training then separates the shards'
  router rows freely. We do not claim exactness on a backend whose GEMM could round identical rows
  differently.

Not function-preserving, for diversity between experts (each documented with what it promises and tested for
it):
- ``--noise s``: add ``N(0, (s·std(W))²)`` to each routed expert's copy of each dense matrix ``W``.
- ``--drop-upcycling r`` (Nakamura et al., 2025): in each routed expert, re-draw ``round(r · I/G)`` of its
  intermediate neurons — rows of gate and up, columns of down — from ``N(mean(W), std(W)²)`` of the dense
  matrix; the neurons are chosen independently per expert (different sets), the others keep the dense values.

Symmetry caveats, and what we do about them:
- at step 0 the copies are identical, so the LM loss sends the router no gradient; the balancing loss (aux
  1e-2, z 1e-3, the config's defaults) does, and so do noise / Drop-Upcycling. A router init that is not
  symmetric helps the copies drift apart (tests check that one optimizer step on real text moves the router);
- ``k = 1`` with renormalisation (``G = 1``) makes the weight always ``F``: the LM loss never trains the
  router (a warning is issued; use ``--no-renormalize`` or ``k ≥ 2``);
- a zero router plus top-k ties broken toward the lower index sends every token to the first ``k`` copies
  until the router moves: deterministic, documented, and broken by ``--router-init-std`` (at the cost of
  exactness) or by the balancing loss after the first step.

Lineage goes to ``config.hf_hybrid_lineage`` (``recipe: "upcycle"``, ``options``, ``exact_start``) and so to
the model card; ``hf-hybrid inspect DST`` shows total vs active parameters. Reading the source and writing
the result go through ``hf_hybrid.convert.source`` and ``hf_hybrid.convert.checkpoint`` (shared by every
converter).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..card import source_name as card_source_name
from ..configuration_hybrid import FIELD_CHOICES, HybridConfig
from .checkpoint import (
    as_dtype,
    check_dst,
    check_layer_indices,
    rebuild_model,
    write_checkpoint,
)
from .source import derived_lineage, load_source, source_config

ROUTERS = FIELD_CHOICES["router_scoring_func"]


# ------------------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class UpcycleOptions:
    """What ``upcycle`` does; :meth:`validate` raises ``ValueError`` for anything that cannot work."""

    num_experts: int  # E: copies of the dense MLP
    top_k: int  # k: copies per token
    shared_expert: bool = False
    granularity: int = 1  # G: shards per copy (E·G experts of I/G, top-k·G)
    drop_upcycling: float = 0.0  # r: fraction of each expert's neurons re-drawn
    noise: float = 0.0  # s: relative std of Gaussian noise on expert weights
    layers: tuple[int, ...] | None = None  # None: every dense-MLP layer
    router: str = "softmax"
    renormalize: bool = True
    routed_scaling: float = 1.0
    router_init_std: float | None = None  # None: initializer_range when renormalising, else 0 (exact)
    group_limited: bool = False  # G > 1: one routing group per copy (whole copies, structurally)
    router_aux_loss_coef: float | None = None  # None: the config's value (default 1e-2)
    router_z_loss_coef: float | None = None  # None: the config's value (default 1e-3)
    seed: int = 0

    def validate(self) -> None:
        def integer(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"upcycle: {name}={value!r} must be an integer")

        integer("num_experts", self.num_experts)
        integer("top_k", self.top_k)
        integer("granularity", self.granularity)
        integer("seed", self.seed)
        if self.num_experts < 1:
            raise ValueError(f"upcycle: num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"upcycle: top_k={self.top_k} must be between 1 and num_experts={self.num_experts} "
                "(the number of copies each token is sent to)"
            )
        if self.granularity < 1:
            raise ValueError(f"upcycle: granularity={self.granularity} must be >= 1")
        if not 0.0 <= self.drop_upcycling <= 1.0:
            raise ValueError(f"upcycle: drop_upcycling={self.drop_upcycling} must be a fraction in [0, 1]")
        if self.noise < 0:
            raise ValueError(f"upcycle: noise={self.noise} must be >= 0")
        if self.router not in ROUTERS:
            raise ValueError(
                f"upcycle: router={self.router!r} is not known; choose one of: {', '.join(ROUTERS)}"
            )
        if not self.routed_scaling > 0:
            raise ValueError(f"upcycle: routed_scaling={self.routed_scaling} must be > 0")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise ValueError(f"upcycle: router_init_std={self.router_init_std} must be >= 0")
        if self.group_limited and self.granularity == 1:
            raise ValueError(
                "upcycle: group_limited needs granularity > 1 (it keeps the G shards of a "
                "copy together); with granularity 1 every expert is a whole copy already"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"upcycle: {name}={value} must be >= 0")
        if self.layers is not None:
            if not self.layers:
                raise ValueError(
                    "upcycle: layers is empty; give layer indices or None for every dense-MLP layer"
                )
            for i in self.layers:
                integer("layers entry", i)

    def router_std(self, config: HybridConfig) -> float:
        if self.router_init_std is not None:
            return float(self.router_init_std)
        return float(config.initializer_range) if self.renormalize else 0.0

    def exact_start(self, config: HybridConfig) -> bool:
        """True when the upcycled model starts function-preserving (see the module docstring for the G > 1
        rule)."""
        return (
            self.noise == 0
            and self.drop_upcycling == 0
            and (self.renormalize or self.router_std(config) == 0)
        )

    def down_scale(self) -> float:
        """``c``: the factor on the routed experts' ``down_proj`` that makes the start exact."""
        E, k, G, F = self.num_experts, self.top_k, self.granularity, self.routed_scaling
        if self.renormalize:
            c = G / F
        else:
            w0 = 1.0 / (E * G) if self.router == "softmax" else 0.5
            c = 1.0 / (k * w0 * F)
        return c * (0.5 if self.shared_expert else 1.0)

    def notes(self, config: HybridConfig) -> list[str]:
        """Warnings about this choice (printed by the CLI, issued as warnings by the library)."""
        out = []
        if self.top_k == 1 and self.granularity == 1 and self.renormalize:
            out.append(
                "top_k=1 with renormalisation: every routing weight is exactly "
                "routed_scaling, so the LM loss never trains the router (only the "
                "balancing loss does); consider --no-renormalize or top_k >= 2"
            )
        if not self.renormalize and self.router_std(config) > 0:
            out.append(
                f"router_init_std={self.router_std(config)} without renormalisation: the start is not exact "
                "(the routing weights differ from 1/(k·w0)); use router_init_std=0 for an exact start"
            )
        if not self.renormalize and self.router_std(config) == 0:
            out.append(
                "zero router: until it moves, every token goes to the first top_k copies (ties "
                "break toward the lower expert index); the balancing loss breaks the tie after "
                "one optimizer step. --router-init-std > 0 breaks it at once but costs exactness"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


# ------------------------------------------------------------------------------------------------------------
# the weights of one layer


@dataclass
class UpcycledMLP:
    """Tensors of one upcycled layer (fp32). ``redrawn[j]``: the neuron indices (within expert j)
    Drop-Upcycling re-drew (empty without it)."""

    gate_up_proj: torch.Tensor  # [E·G, 2·I/G, H], gate rows first
    down_proj: torch.Tensor  # [E·G, H, I/G]
    router_weight: torch.Tensor  # [E·G, H]
    # {"gate_proj.weight" [I, H], "up_proj.weight", "down_proj.weight" [H, I]}
    shared: dict[str, torch.Tensor] | None
    redrawn: list[torch.Tensor]


def upcycle_mlp(
    gate_IH: torch.Tensor,
    up_IH: torch.Tensor,
    down_HI: torch.Tensor,
    opts: UpcycleOptions,
    *,
    router_std: float,
    generator: torch.Generator,
) -> UpcycledMLP:
    """Experts, router and shared expert for one dense SwiGLU ``down(act(gate x) · up x)`` (see the module
    docstring for the construction and what is exact)."""
    E, G = opts.num_experts, opts.granularity
    inter, H = gate_IH.shape
    if inter % G:
        raise ValueError(f"upcycle: granularity={G} must divide the dense intermediate size {inter}")
    i_f = inter // G
    gate, up, down = gate_IH.float(), up_IH.float(), down_HI.float()

    # 1. copies, sharded: expert j = e·G + g holds neurons [g·i_f, (g+1)·i_f) of copy e.
    gate_EIH = gate.view(G, i_f, H).repeat(E, 1, 1)  # (E·G, i_f, H)
    up_EIH = up.view(G, i_f, H).repeat(E, 1, 1)
    down_EHI = down.view(H, G, i_f).permute(1, 0, 2).repeat(E, 1, 1)  # (E·G, H, i_f)

    # 2. noise, relative to each dense matrix's spread.
    if opts.noise > 0:
        for dense, experts in ((gate, gate_EIH), (up, up_EIH), (down, down_EHI)):
            experts.add_(torch.randn(experts.shape, generator=generator) * (opts.noise * dense.std()))

    # 3. Drop-Upcycling: re-draw round(r · i_f) neurons per expert from the dense matrices' statistics.
    redrawn: list[torch.Tensor] = []
    n_drop = int(round(opts.drop_upcycling * i_f))
    for j in range(E * G):
        if n_drop == 0:
            redrawn.append(torch.empty(0, dtype=torch.long))
            continue
        idx = torch.randperm(i_f, generator=generator)[:n_drop].sort().values
        gate_EIH[j, idx] = torch.randn(n_drop, H, generator=generator) * gate.std() + gate.mean()
        up_EIH[j, idx] = torch.randn(n_drop, H, generator=generator) * up.std() + up.mean()
        down_EHI[j][:, idx] = torch.randn(H, n_drop, generator=generator) * down.std() + down.mean()
        redrawn.append(idx)

    down_EHI = down_EHI * opts.down_scale()
    gate_up_EIH = torch.cat([gate_EIH, up_EIH], dim=1)  # (E·G, 2·i_f, H), gate rows first

    # 4. router: one row per copy, shared by its G shards (virtual groups).
    router_EH = torch.randn(E, H, generator=generator) * router_std if router_std > 0 else torch.zeros(E, H)
    router_EH = router_EH.repeat_interleave(G, dim=0)  # (E·G, H)

    shared = None
    if opts.shared_expert:
        shared = {
            "gate_proj.weight": gate.clone(),
            "up_proj.weight": up.clone(),
            "down_proj.weight": down * 0.5,
        }
    return UpcycledMLP(gate_up_EIH.contiguous(), down_EHI.contiguous(), router_EH, shared, redrawn)


# ------------------------------------------------------------------------------------------------------------
# config and model


def check_upcycle(config: HybridConfig, opts: UpcycleOptions) -> list[int]:
    """Validate ``opts`` against ``config``; return the layers to upcycle. Raises ``ValueError``; writes
    nothing."""
    opts.validate()
    n = config.num_hidden_layers
    if "moe" in config.mlp_types:
        have = [i for i, t in enumerate(config.mlp_types) if t == "moe"]
        raise ValueError(
            f"upcycle: the source already has MoE layers ({have}); MoE settings are "
            "global in HybridConfig, so upcycle starts from a model whose MLPs are dense"
        )
    if not config.mlp_gated:
        raise ValueError(
            "upcycle: HybridConfig.mlp_gated=False (ungated MLPs, e.g. a Nemotron-H import) "
            "is not supported; upcycling copies gated SwiGLU MLPs into gated experts"
        )
    dense = [i for i, t in enumerate(config.mlp_types) if t == "dense"]
    if not dense:
        raise ValueError(
            f"upcycle: the source has no dense MLP layers (mlp_types={config.mlp_types}); nothing to upcycle"
        )
    if opts.layers is None:
        layers = dense
    else:
        layers = check_layer_indices(opts.layers, n, what="upcycle: layers")
        not_dense = [i for i in layers if config.mlp_types[i] != "dense"]
        if not_dense:
            raise ValueError(
                f"upcycle: layers {not_dense} have no dense MLP (mlp_types: "
                f"{[config.mlp_types[i] for i in not_dense]}); dense-MLP layers are {dense}"
            )
    for name in ("moe_expert_norm", "shared_expert_norm"):
        if getattr(config, name):
            raise ValueError(
                f"upcycle: HybridConfig.{name}=True would norm the copied experts' outputs, so the upcycled "
                f"model would not start equal to the dense one; allowed: {name}=False"
            )
    if config.mlp_bias:
        raise ValueError(
            "upcycle: the dense MLPs have biases (mlp_bias=True) and experts have none; cannot copy exactly"
        )
    if config.intermediate_size % opts.granularity:
        raise ValueError(
            f"upcycle: granularity={opts.granularity} must divide "
            f"intermediate_size={config.intermediate_size}"
        )
    return layers


def upcycled_config(config: HybridConfig, opts: UpcycleOptions, layers: list[int]) -> HybridConfig:
    """The source config with ``layers`` turned into MoE layers (a new object; lineage is left to the
    caller)."""
    E, k, G = opts.num_experts, opts.top_k, opts.granularity
    d = config.to_dict()
    d.update(
        mlp_types=["moe" if i in layers else t for i, t in enumerate(config.mlp_types)],
        num_experts=E * G,
        num_experts_per_tok=k * G,
        moe_intermediate_size=config.intermediate_size // G,
        num_shared_experts=G if opts.shared_expert else 0,
        router_scoring_func=opts.router,
        norm_topk_prob=opts.renormalize,
        routed_scaling_factor=float(opts.routed_scaling),
        n_group=E if opts.group_limited else 1,
        topk_group=k if opts.group_limited else 1,
        moe_routing="topk",
        moe_capacity_factor=None,  # dropless: exactness needs every assignment computed
        router_jitter_noise=0.0,
        router_bias_update_rate=0.0,
        # the experts are copies (or shards) of clamped dense MLPs: the same elementwise clamp
        moe_swiglu_limit=config.mlp_swiglu_limit,
    )
    if opts.router_aux_loss_coef is not None:
        d["router_aux_loss_coef"] = float(opts.router_aux_loss_coef)
    if opts.router_z_loss_coef is not None:
        d["router_z_loss_coef"] = float(opts.router_z_loss_coef)
    new = HybridConfig.from_dict(d)
    new._attn_implementation = config._attn_implementation
    return new


def upcycle_model(model, opts: UpcycleOptions | None = None, **kwargs: Any):
    """Upcycle an in-memory ``HybridForCausalLM`` (left untouched); returns a new model with fresh tensors, in
    the source's dtype and device. Options: an ``UpcycleOptions`` or its fields as keyword arguments."""
    if opts is None:
        opts = UpcycleOptions(**kwargs)
    elif kwargs:
        raise TypeError("upcycle_model: pass an UpcycleOptions or keyword options, not both")
    config = model.config
    layers = check_upcycle(config, opts)
    new_config = upcycled_config(config, opts, layers)
    for note in opts.notes(config):
        warnings.warn(note, stacklevel=2)

    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(opts.seed)
    router_std = opts.router_std(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in layers:
        prefix = f"model.layers.{i}.mlp."
        up = upcycle_mlp(
            state.pop(prefix + "gate_proj.weight"),
            state.pop(prefix + "up_proj.weight"),
            state.pop(prefix + "down_proj.weight"),
            opts,
            router_std=router_std,
            generator=generator,
        )
        state[prefix + "experts.gate_up_proj"] = up.gate_up_proj.to(dtype)
        state[prefix + "experts.down_proj"] = up.down_proj.to(dtype)
        state[prefix + "router.weight"] = up.router_weight.to(dtype)
        state[prefix + "router.e_score_correction_bias"] = torch.zeros(
            new_config.num_experts, dtype=torch.float32
        )
        for name, tensor in (up.shared or {}).items():
            state[prefix + "shared_experts." + name] = tensor.to(dtype)
    new = rebuild_model(model, new_config, state)
    lineage = dict(config.hf_hybrid_lineage or {})
    new.config.hf_hybrid_lineage = derived_lineage(
        lineage,
        None,
        "upcycle",
        {**opts.as_dict(), "layers": layers, "exact_start": opts.exact_start(config)},
    )
    return new


# ------------------------------------------------------------------------------------------------------------
# the whole job


def upcycle(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_experts: int,
    top_k: int,
    shared_expert: bool = False,
    granularity: int = 1,
    drop_upcycling: float = 0.0,
    noise: float = 0.0,
    layers: list[int] | tuple[int, ...] | None = None,
    router: str = "softmax",
    renormalize: bool = True,
    routed_scaling: float = 1.0,
    router_init_std: float | None = None,
    group_limited: bool = False,
    router_aux_loss_coef: float | None = None,
    router_z_loss_coef: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Upcycle the dense checkpoint ``src`` into an MoE checkpoint ``dst`` (see the module docstring).

    Every check (options, source, layers, ``dst``) runs before anything is written. The surgery runs in fp32;
    the result is saved in ``dtype`` (default: the dtype the source was stored in). Returns ``dst``."""
    opts = UpcycleOptions(
        num_experts=num_experts,
        top_k=top_k,
        shared_expert=shared_expert,
        granularity=granularity,
        drop_upcycling=drop_upcycling,
        noise=noise,
        layers=tuple(layers) if layers is not None else None,
        router=router,
        renormalize=renormalize,
        routed_scaling=routed_scaling,
        router_init_std=router_init_std,
        group_limited=group_limited,
        router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
        seed=seed,
    )
    check_dst(dst)
    config, _ = source_config(src)
    check_upcycle(config, opts)
    out_dtype = as_dtype(dtype)

    model, source_dtype = load_source(src, dtype=torch.float32)
    new = upcycle_model(model, opts)
    lineage = new.config.hf_hybrid_lineage
    if "base_model" not in lineage:
        lineage["base_model"] = card_source_name(src)
    lineage["source"] = os.fspath(src)
    return write_checkpoint(new, dst, src=src, dtype=out_dtype or source_dtype)


__all__ = [
    "UpcycleOptions",
    "UpcycledMLP",
    "upcycle",
    "upcycle_model",
    "upcycle_mlp",
    "upcycled_config",
    "check_upcycle",
]
