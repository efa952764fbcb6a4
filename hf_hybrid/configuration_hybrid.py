"""HybridConfig: the configuration of the hf_hybrid decoder family.

Each layer is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; ``mixer_types[i]`` and ``mlp_types[i]`` choose
them. Per-kind settings are flat, prefixed attributes (``gdn_*``, ``kda_*``, ``mamba_*``, ``linear_*``,
DeepSeek's MLA names, ``index_*`` for DSA, transformers' MoE names) that each kind declares in its own file
(its spec's ``config_fields``: default, choices, checks); this class holds the decoder's own fields and sets
the kinds' at construction. transformers' own ``layer_types`` is derived from ``mixer_types`` (it only knows
its own names, and ``save_pretrained`` rejects others) and checked for consistency on reload.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib
import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .config_choices import _CHOICES, FIELD_CHOICES  # noqa: F401  (FIELD_CHOICES re-exported)
from .registry import (
    ConfigField,
    KVKind,
    check_field,
    mixer_spec,
    mixer_specs,
    mlp_spec,
    mlp_specs,
    remote_code_trusted,
    require_positive,
)
from .registry import trust_remote_code as _trusting

# Bump when the meaning of saved weights or fields changes; add a rule to `_migrate` at the same time.
FORMAT_VERSION = 1

# The mixer and MLP kinds, their transformers layer type, masks, cost, config fields and per-kind validation
# are declared next to each class (hf_hybrid/registry.py); this file reads them.


def _expand_pattern(pattern: str, n: int, field: str, allowed: tuple[str, ...]) -> list[str]:
    """Expand a layer-pattern shorthand to an explicit list of ``n`` names.

    Accepted forms (repeated cyclically over the layers):
    - ``"attention"``: every layer;
    - ``"gated_deltanet,gated_deltanet,gated_deltanet,attention"``: an explicit period;
    - ``"3:1 gated_deltanet:attention"``: counts then names (Qwen3-Next's 3:1, MiniMax's 7:1).
    """
    text = pattern.strip()
    match = re.fullmatch(r"(\d+(?::\d+)*)\s+([a-z0-9_]+(?::[a-z0-9_]+)*)", text)
    if match:
        counts = [int(c) for c in match.group(1).split(":")]
        names = match.group(2).split(":")
        if len(counts) != len(names) or any(c <= 0 for c in counts):
            raise ValueError(
                f"HybridConfig.{field}={pattern!r}: counts and names must pair up with positive counts, "
                "e.g. '3:1 gated_deltanet:attention'"
            )
        period = [name for name, c in zip(names, counts) for _ in range(c)]
    else:
        period = [p.strip() for p in text.split(",") if p.strip()]
    for name in period:
        if name not in allowed:
            raise ValueError(
                f"HybridConfig.{field}={pattern!r} names {name!r}, "
                f"which is not known; choose from {', '.join(allowed)}"
            )
    if not period:
        raise ValueError(f"HybridConfig.{field}={pattern!r} is empty")
    return [period[i % len(period)] for i in range(n)]


@strict
class HybridConfig(PreTrainedConfig):
    r"""Configuration of an hf_hybrid decoder.

    Shorthands (expanded at construction, never saved): ``mixer_pattern="3:1 gated_deltanet:attention"``,
    ``mlp_pattern="moe"``, ``first_k_dense=1`` (the first k layers get a dense MLP, like DeepSeek).

    Example:
    ```python
    >>> from hf_hybrid import HybridConfig
    >>> cfg = HybridConfig(num_hidden_layers=8, mixer_pattern="3:1 gated_deltanet:attention",
    ...                    mlp_pattern="moe")
    >>> cfg.mixer_types[:4]
    ['gated_deltanet', 'gated_deltanet', 'gated_deltanet', 'attention']
    ```
    """

    model_type = "hf_hybrid"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # ---- decoder -------------------------------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # ---- per-layer choice ----------------------------------------------------------------------
    mixer_types: list[str] | None = None
    mlp_types: list[str] | None = None
    layer_types: list[str] | None = None  # derived from mixer_types; transformers' cache/mask names
    hf_hybrid_format_version: int = FORMAT_VERSION

    # ---- residual branches (defaults: x + mixer(norm(x)), then x + mlp(norm(x))) ---------------------------
    # MiniMax-01: h = α·norm(x) + β·mixer(norm(x)) (the residual is the normed input, α/β per layer kind).
    residual_from_norm: bool = False
    mixer_residual_scales: list[float] | None = None  # per layer α multiplying the residual; None: all 1
    mixer_output_scales: list[float] | None = None  # per layer β multiplying the mixer output; None: all 1
    mlp_residual_scale: float = 1.0
    mlp_output_scale: float = 1.0
    # Per layer "pre" (x + f(norm(x)) for the mixer and the MLP) or "post" (x + norm(f(x)): OLMo 2 / 3's
    # blocks, OLMo Hybrid's attention layers) or "sandwich" (x + norm'(f(norm(x))): Ergo, Gemma 2 / 3); None:
    # every layer "pre".
    norm_placement: list[str] | None = None
    # ---- Ergo's residual gates ----
    # True: each branch f joins the stream as σ(w)·f + sqrt(1 + σ(w))·exp(-softplus(w)/2)·x, with a learned
    # w [hidden_size] per branch and layer (ErgoResidualGate), instead of x + f.
    residual_gates: bool = False
    # Per layer which of its two norms are low-rank gated RMSNorms, y · sigmoid(W_up silu(W_down y)) on y =
    # RMSNorm(x) (AXK2): "none", "mixer", "mlp" or "both"; None: none. gated_norm_rank: the gate's rank r.
    gated_norms: list[str] | None = None
    gated_norm_rank: int | None = None

    # ---- hyper-connection residual streams (one block: hyper_connections + hc_*) -------------------------
    # "none": one residual stream (x + f(norm(x))). "ihc" (HY-V4's independent hyper-connections) / "mhc"
    # (GLM-5-Next's manifold-constrained ones): hc_mult residual streams, copied from the embeddings; before
    # each mixer / MLP, weights computed from the streams collapse them into the branch input, and its output
    # is spread back over them (mHC also mixes the streams through a Sinkhorn-projected, doubly stochastic
    # matrix); a head collapses them before the final norm (iHC: learned weights, mHC: the mean).
    hyper_connections: str = "none"
    hc_mult: int = 4  # number of streams
    hc_eps: float = 1e-6  # added to the sigmoid gates (and, mHC, to the softmax and each Sinkhorn division)
    hc_magnitude: float = 2.0  # the output-spreading gate is hc_magnitude · sigmoid(.) (mHC: 2 fixed)
    hc_sinkhorn_iters: int = 20  # mHC: Sinkhorn-Knopp iterations making the stream mixing doubly stochastic

    # ---- softmax attention (attention, sliding_attention; GQA base of DSA) -----------------------
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # "head": over head_dim (Qwen3); "full": over the whole q / k projection (OLMoE)
    qk_norm_scope: str = "head"
    # clamp q, k, v to [-clip_qkv, clip_qkv] after projection (and q/k norm) (OLMoE)
    clip_qkv: float | None = None
    attention_output_gate: bool = False  # sigmoid output gate (Qwen3-Next)
    # False: no positional encoding in the softmax attention layers (NoPE; Granite 4)
    attention_rope: bool = True
    # per-layer NoPE: indices of the softmax attention layers (attention, sliding_attention) that use no
    # positional encoding while the others keep RoPE (Ergo's global layers); None: none
    nope_layers: list[int] | None = None
    # a learned logit per head that joins every query's softmax as an extra key with no value (gpt-oss,
    # HY-V4): attention may put weight "nowhere". Runs transformers' eager path (sdpa has no sinks).
    attention_sinks: bool = False
    # softmax scale of q·k; None: head_dim^-0.5 (Granite: attention_multiplier)
    attention_scaling: float | None = None
    # Granite's multipliers: inputs_embeds scaled by embedding_multiplier, logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    sliding_window: int | None = None
    mlp_bias: bool = False
    # False: every MLP (dense, shared and routed experts) is down(act(up(x))) without a gate (Nemotron-H's
    # relu²)
    mlp_gated: bool = True
    # SwiGLU clamp of the dense MLPs and the shared experts (GLM-5-Next): act(min(gate, limit)) ·
    # clamp(up, -limit, limit); None: no clamp. The routed experts have their own, moe_swiglu_limit.
    mlp_swiglu_limit: float | None = None

    # ---- the fields of each layer kind -----------------------------------------------------------
    # Declared in the kind's own file (its spec's config_fields: Gated DeltaNet's gdn_*, KDA's kda_*,
    # Mamba-2's mamba_*, linear attention's linear_*, MLA's and DSA's DeepSeek names, MoE's transformers
    # names), set on every config by __post_init__ as flat attributes and saved like these fields.

    # ---- cross-layer KV sharing (Mistral-Large-4's kv_source_layers) ------------------------------
    # Per layer the index of the layer whose keys/values (MLA: latent c_kv and rope key) it attends to: its
    # own index (it computes and caches its own) or an earlier layer of a compatible kind that owns its own
    # (kv_source_layers[j] == j). A sharing layer has no key/value projections and writes no cache entry:
    # the cache holds the shared KV once. None: every layer owns its KV.
    kv_source_layers: list[int] | None = None

    # ---- Mistral-Large-4's options ------------------------------------------------------------------
    # logits = c · tanh(logits / c) (Gemma 2, Mistral-Large-4); None: no capping
    final_logit_softcapping: float | None = None
    # per head h, queries (attention, MLA, DSA and its indexer) times s_h · log(1 + position) + b_h, learned
    # s and b (``softmax_scaling.scale`` / ``.bias``, initialised to 0 and 1: no scaling)
    query_log_scaling: bool = False
    # a learned log-scale per RoPE frequency, inv_freq · exp(rope_log_scale) (Mistral-Large-4's "LeRoPE"
    # alpha, initialised to 0): model.rope_log_scale [rotary dim / 2]; every rotating layer must use the
    # same rotary dimension
    rope_learned_scale: bool = False

    # ---- provenance, for model cards -------------------------------------------------------------
    hf_hybrid_lineage: dict | None = None
    # Kinds defined outside hf_hybrid that the layers use, and the module that defines each, e.g.
    # {"mixer_types": {"shift": "my_kinds"}}: written on save, read on load (the module is imported only with
    # trust_remote_code=True). None: every kind is built in.
    hf_hybrid_kind_modules: dict | None = None

    def __eq__(self, other: object) -> bool:
        # by value of what is set (the generated field-by-field __eq__ would trip over the absent
        # output_router_logits of a config without MoE layers, see __post_init__)
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None

    def __post_init__(self, **kwargs):
        kwargs = self._migrate(self.hf_hybrid_format_version, kwargs)
        mixer_pattern = kwargs.pop("mixer_pattern", None)
        mlp_pattern = kwargs.pop("mlp_pattern", None)
        first_k_dense = kwargs.pop("first_k_dense", 0)
        n = self.num_hidden_layers

        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if (
            self.head_dim is None
            and self.num_attention_heads
            and self.hidden_size % self.num_attention_heads == 0
        ):
            self.head_dim = self.hidden_size // self.num_attention_heads

        if mixer_pattern is not None:
            if self.mixer_types is not None:
                raise ValueError("HybridConfig: give either mixer_types or mixer_pattern, not both")
            self.mixer_types = _expand_pattern(mixer_pattern, n, "mixer_pattern", tuple(mixer_specs()))
        if mlp_pattern is not None:
            if self.mlp_types is not None:
                raise ValueError("HybridConfig: give either mlp_types or mlp_pattern, not both")
            self.mlp_types = _expand_pattern(mlp_pattern, n, "mlp_pattern", tuple(mlp_specs()))
        if self.mixer_types is None:
            self.mixer_types = ["attention"] * n
        if self.mlp_types is None:
            self.mlp_types = ["dense"] * n
        if not isinstance(first_k_dense, int) or first_k_dense < 0 or first_k_dense > n:
            raise ValueError(f"HybridConfig.first_k_dense={first_k_dense!r} must be an int in [0, {n}]")
        self.mlp_types = ["dense" if i < first_k_dense else t for i, t in enumerate(self.mlp_types)]
        with _trusting(kwargs.pop("trust_remote_code", None)):
            self._import_recorded_kinds()
        self._check_kinds()
        self.hf_hybrid_kind_modules = self.outside_kind_modules()
        # The kinds' own fields (declared in their files): the value given, else the kind's default. A field
        # that exists only when its kind is used is dropped from a config without such a layer; another
        # absent field (of an unused outside kind) given anyway is kept as any extra keyword is.
        for f, present in self._kind_fields(every=True):
            if present:
                setattr(self, f.name, kwargs.pop(f.name) if f.name in kwargs else copy.deepcopy(f.default))
            elif f.only_when_used:
                kwargs.pop(f.name, None)
                self.__dict__.pop(f.name, None)

        derived = self.derived_layer_types()
        if self.layer_types is not None and list(self.layer_types) != derived:
            raise ValueError(
                f"HybridConfig.layer_types={self.layer_types} disagrees with mixer_types={self.mixer_types} "
                f"(expected {derived}); layer_types is derived from mixer_types — edit mixer_types instead"
            )
        self.layer_types = derived

        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
        for f, _ in self._kind_fields():  # defaults that depend on other fields, in declaration order
            if f.derive is not None and getattr(self, f.name) is None:
                setattr(self, f.name, f.derive(self))
        for name in ("mixer_residual_scales", "mixer_output_scales"):  # all ones is the default: one spelling
            values = getattr(self, name)
            if isinstance(values, (list, tuple)) and all(v == 1 for v in values):
                setattr(self, name, None)
        if isinstance(self.norm_placement, (list, tuple)) and all(p == "pre" for p in self.norm_placement):
            self.norm_placement = None  # the default has one spelling
        if isinstance(self.gated_norms, (list, tuple)) and all(g == "none" for g in self.gated_norms):
            self.gated_norms = None
        if isinstance(self.nope_layers, (list, tuple)):
            self.nope_layers = sorted(self.nope_layers) or None
        if isinstance(self.kv_source_layers, (list, tuple)) and list(self.kv_source_layers) == list(range(n)):
            self.kv_source_layers = None  # no sharing has one spelling (what older checkpoints saved)

        self._check_misspelled(kwargs)
        super().__post_init__(**kwargs)

    def _check_misspelled(self, kwargs: dict[str, Any]) -> None:
        """A keyword that is no field but a close match to one (``num_expert=8``, ``n_shared_experts=1``) is a
        typo: stored as a stray attribute and never read, it would silently build a different model."""
        fields = {f.name for f in dataclasses.fields(self)} | {
            f.name for f, _ in self._kind_fields(every=True)
        }
        for key in kwargs:
            if key in fields or key.startswith("_"):
                continue
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.85)
            if close:
                raise ValueError(
                    f"HybridConfig: {key}={kwargs[key]!r} is not a field (did you mean {close[0]!r}?); "
                    "an unknown keyword would be stored and never read"
                )

    # ------------------------------------------------------------------------------------------------
    def _migrate(self, version: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rules that turn older checkpoint formats into the current one (none yet: version 1 is the first).
        A rule rewrites ``kwargs`` / fields saved under version v into version v + 1, then bumps the
        version."""
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"HybridConfig.hf_hybrid_format_version={version!r} must be a positive integer")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"HybridConfig.hf_hybrid_format_version={version} is newer than this hf_hybrid understands "
                f"({FORMAT_VERSION}); upgrade hf-hybrid"
            )
        self.hf_hybrid_format_version = FORMAT_VERSION
        return kwargs

    @classmethod
    def from_pretrained(cls, *args, trust_remote_code: bool | None = None, **kwargs):
        """transformers' ``from_pretrained``; ``trust_remote_code=True`` lets a checkpoint whose layers use a
        kind defined outside hf_hybrid import the module it recorded for that kind."""
        with _trusting(trust_remote_code):
            return super().from_pretrained(*args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], *, trust_remote_code: bool | None = None, **kwargs):
        with _trusting(trust_remote_code):
            return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # mixer_types / mlp_types may have been edited since construction (converters do): record what the
        # layers use now
        out["hf_hybrid_kind_modules"] = self.outside_kind_modules()
        return out

    def outside_kind_modules(self) -> dict[str, dict[str, str]] | None:
        """``{field: {kind: module}}`` for every kind the layers use that is defined outside hf_hybrid (None
        when there is none)."""
        recorded = self.hf_hybrid_kind_modules if isinstance(self.hf_hybrid_kind_modules, dict) else {}
        out: dict[str, dict[str, str]] = {}
        for field, specs in (("mixer_types", mixer_specs()), ("mlp_types", mlp_specs())):
            for name in dict.fromkeys(getattr(self, field) or ()):
                spec = specs.get(name)
                module = (recorded.get(field) or {}).get(name) if spec is None else spec.module
                if module is not None and (spec is None or not spec.builtin):
                    out.setdefault(field, {})[name] = module
        return out or None

    def _import_recorded_kinds(self) -> None:
        """A kind the layers name that is not registered, but that the saved config records as defined in a
        module outside hf_hybrid, is imported from that module, on the explicit opt-in only."""
        recorded = self.hf_hybrid_kind_modules
        if recorded is None:
            return
        if not isinstance(recorded, dict) or not all(
            isinstance(kinds, dict) and all(isinstance(m, str) for m in kinds.values())
            for kinds in recorded.values()
        ):
            raise ValueError(
                f"HybridConfig.hf_hybrid_kind_modules={recorded!r} must map 'mixer_types' / 'mlp_types' to "
                "{kind: module name}"
            )
        for field, specs_of in (("mixer_types", mixer_specs), ("mlp_types", mlp_specs)):
            values = getattr(self, field)
            if not isinstance(values, (list, tuple)):
                continue  # _check_kinds names the problem
            for i, name in enumerate(values):
                module = (recorded.get(field) or {}).get(name)
                if name in specs_of() or module is None:
                    continue
                where = f"HybridConfig.{field}[{i}]={name!r}"
                if module == "__main__":
                    raise ValueError(
                        f"{where} is a layer kind that was defined in a script (module '__main__') when the "
                        "model was saved, so no other process can import it; define the kind in a module, or "
                        "define it in this process before loading"
                    )
                if not remote_code_trusted():
                    raise ValueError(
                        f"{where} is a layer kind defined outside hf_hybrid, in module {module!r} (recorded "
                        "when the model was saved). Loading it imports that module, which runs its code: if "
                        "you trust it, pass trust_remote_code=True to from_pretrained (CLI: "
                        f"--trust-remote-code), or import {module!r} yourself before loading"
                    )
                try:
                    importlib.import_module(module)
                except ModuleNotFoundError as err:
                    raise ValueError(
                        f"{where} is defined in module {module!r}, which cannot be imported ({err}); put it "
                        "on sys.path (PYTHONPATH) and try again"
                    ) from err
                if name not in specs_of():
                    raise ValueError(
                        f"{where}: importing {module!r}, the module recorded for it, did not register a "
                        f"{field[:-6]} kind named {name!r}"
                    )

    def _check_kinds(self) -> None:
        """Every entry of mixer_types / mlp_types is a registered kind, one per layer."""
        n = self.num_hidden_layers
        for field, specs in (("mixer_types", mixer_specs()), ("mlp_types", mlp_specs())):
            values = getattr(self, field)
            if not isinstance(values, (list, tuple)) or len(values) != n:
                count = len(values) if isinstance(values, (list, tuple)) else values
                raise ValueError(
                    f"HybridConfig.{field} has {count} entries but num_hidden_layers={n}; give one per layer"
                )
            for i, v in enumerate(values):
                if v not in specs:
                    raise ValueError(
                        f"HybridConfig.{field}[{i}]={v!r} is not a known "
                        f"{field[:-6]} type; choose one of: {', '.join(specs)}"
                    )

    def _kind_fields(self, *, every: bool = False) -> list[tuple[ConfigField, bool]]:
        """``(field, present)`` for the config fields the layer kinds declare: a built-in kind's field is on
        every config (as when it was a field of this class), unless it exists only when its kind is used; a
        field of a kind defined outside hf_hybrid is on the configs whose layers use the kind. ``every``: the
        absent fields too."""
        out = []
        for field, specs in (("mixer_types", mixer_specs()), ("mlp_types", mlp_specs())):
            used = set(getattr(self, field) or ())
            for spec in specs.values():
                for f in spec.config_fields:
                    present = spec.name in used or (spec.builtin and not f.only_when_used)
                    if present or every:
                        out.append((f, present))
        return out

    def layer_specs(self) -> list:
        """The registry specs of the mixer and MLP kinds this config uses (each once, mixers first)."""
        return [mixer_spec(m) for m in dict.fromkeys(self.mixer_types)] + [
            mlp_spec(m) for m in dict.fromkeys(self.mlp_types)
        ]

    def derived_layer_types(self) -> list[str]:
        return [mixer_spec(m).layer_type for m in self.mixer_types]

    @property
    def has_recurrent_layers(self) -> bool:
        return any(mixer_spec(m).recurrent for m in self.mixer_types)

    @property
    def shared_expert_size(self) -> int:
        """Intermediate size of the one SwiGLU that holds all shared experts (0 when there are none)."""
        if self.num_shared_experts <= 0:
            return 0
        return self.shared_expert_intermediate_size or self.num_shared_experts * self.moe_intermediate_size

    @property
    def has_attention_cache(self) -> bool:
        return any(not mixer_spec(m).recurrent and mixer_spec(m).cls is not None for m in self.mixer_types)

    # ---- validation (run by @strict after construction; errors name the field, value and what is allowed) --
    def validate_layer_type(self):
        self._check_kinds()
        super().validate_layer_type()

    def _validate_native_options(self) -> None:
        """Options added for transformers' native families (olmoe, deepseek_v3, glm_moe_dsa, ...)."""
        for i in self.nope_layers or ():
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers:
                raise ValueError(
                    f"HybridConfig.nope_layers={self.nope_layers!r}: {i!r} is not a layer index in "
                    f"[0, {self.num_hidden_layers})"
                )
            # the kinds that take NoPE say so (their spec's accepts_nope): the softmax attention kinds, and
            # MLA layers (Mistral-Large-4), which then have no decoupled rope key
            accepts = mixer_spec(self.mixer_types[i]).accepts_nope
            if accepts is None or not accepts(self, i):
                raise ValueError(
                    f"HybridConfig.nope_layers names layer {i}, whose mixer_types[{i}]="
                    f"{self.mixer_types[i]!r} is neither softmax attention (attention, sliding_attention) "
                    "nor MLA (mla, or dsa with dsa_base='mla')"
                )
        if not isinstance(self.mla_gate_proj, bool):
            raise ValueError(f"HybridConfig.mla_gate_proj={self.mla_gate_proj!r} must be True or False")
        if self.mla_gate_proj and self.mla_output_gate:
            raise ValueError(
                "HybridConfig.mla_gate_proj=True with mla_output_gate=True: an MLA layer has one output "
                "gate, from its own gate_proj (HY-V4) or from q_b_proj (AXK2); choose one"
            )
        if self.nope_layers is not None and len(set(self.nope_layers)) != len(self.nope_layers):
            raise ValueError(f"HybridConfig.nope_layers={self.nope_layers!r} repeats a layer")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"HybridConfig.clip_qkv={self.clip_qkv!r} must be > 0 or None")
        limit = self.mlp_swiglu_limit
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
                raise ValueError(f"HybridConfig.mlp_swiglu_limit={limit!r} must be a positive number or None")
            if not self.mlp_gated:
                raise ValueError(
                    f"HybridConfig.mlp_swiglu_limit={limit!r} clamps the gate and up projections of gated "
                    "MLPs; with mlp_gated=False the MLPs have no gate (set it to None)"
                )

    def _validate_mistral_options(self) -> None:
        c = self.final_logit_softcapping
        if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
            raise ValueError(f"HybridConfig.final_logit_softcapping={c!r} must be a positive number or None")
        for name in ("query_log_scaling", "index_q_norm", "rope_learned_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HybridConfig.{name}={getattr(self, name)!r} must be True or False")
        if self.rope_learned_scale:
            dims = self.rope_dims()
            if len(dims) != 1:
                raise ValueError(
                    f"HybridConfig.rope_learned_scale=True needs every rotating layer to use one rotary "
                    f"dimension (it learns one scale per frequency); this config rotates {sorted(dims)} "
                    "channels"
                )

    def rope_dims(self) -> set[int]:
        """The rotary dimensions the layers ask RoPE tables for (their kinds' ``rope_dims`` hooks)."""
        dims: set[int] = set()
        for i, mixer in enumerate(self.mixer_types):
            hook = mixer_spec(mixer).rope_dims
            if hook is not None:
                dims |= set(hook(self, i))
        return dims

    # ---- cross-layer KV sharing ------------------------------------------------------------------------
    def kv_kind(self, layer_idx: int) -> KVKind | None:
        """What layer ``layer_idx`` caches as its keys/values, as far as another layer may read them (its
        kind's ``kv_kind`` hook, a :class:`~hf_hybrid.specs.KVKind`: kind and whether the keys are rotated;
        the built-ins: ``"kv"``, per-head keys and values; ``"sliding_kv"``, the same within
        ``sliding_window``; ``"mla_latent"``, MLA's ``(c_kv, k_pe)``); None for a layer with nothing to share
        (recurrent, no mixer, a kind that declares no ``kv_kind``)."""
        hook = mixer_spec(self.mixer_types[layer_idx]).kv_kind
        return None if hook is None else hook(self, layer_idx)

    def kv_source(self, layer_idx: int) -> int:
        """The layer whose keys/values layer ``layer_idx`` attends to (itself unless it shares)."""
        return layer_idx if self.kv_source_layers is None else self.kv_source_layers[layer_idx]

    def shares_kv(self, layer_idx: int) -> bool:
        """True when layer ``layer_idx`` reads another layer's keys/values (it has no K/V projections and no
        cache entry of its own)."""
        return self.kv_source(layer_idx) != layer_idx

    def is_kv_source(self, layer_idx: int) -> bool:
        """True when a later layer reads this layer's keys/values."""
        return self.kv_source_layers is not None and any(
            j != layer_idx and s == layer_idx for j, s in enumerate(self.kv_source_layers)
        )

    @property
    def kv_sharing_modes(self) -> list[str | None] | None:
        """transformers' per-layer cache hint (read by ``DynamicCache(config=...)``): ``"reuse"`` gives a
        sharing layer a ``DummyLayer`` that stores nothing; a sharing DSA layer with its own indexer keeps its
        ``DynamicIndexedLayer`` for the indexer keys (``"reuse_but_indexer"``) and writes no K/V there."""
        if self.kv_source_layers is None:
            return None
        modes: list[str | None] = []
        for i in range(self.num_hidden_layers):
            if not self.shares_kv(i):
                modes.append("store" if self.is_kv_source(i) else None)
            else:  # "reuse", or what the kind keeps of its cache layer while it reads another's K/V
                modes.append(self.kv_kind(i).reuse)
        return modes

    def _validate_kv_sharing(self) -> None:
        sources = self.kv_source_layers
        if sources is None:
            return
        n = self.num_hidden_layers
        if not isinstance(sources, (list, tuple)) or len(sources) != n:
            count = len(sources) if isinstance(sources, (list, tuple)) else sources
            raise ValueError(
                f"HybridConfig.kv_source_layers has {count} entries but num_hidden_layers={n}; give one "
                "layer index per layer (its own index: no sharing)"
            )

        def allowed(i: int) -> list[int]:
            kind = self.kv_kind(i)
            return [
                j for j in range(i) if kind is not None and sources[j] == j and self.kv_kind(j) == kind
            ] + [i]

        for i, j in enumerate(sources):
            where = f"HybridConfig.kv_source_layers[{i}]={j!r}"
            if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j <= i:
                raise ValueError(
                    f"{where}: a layer reads the keys/values of itself or of an earlier layer (no forward "
                    f"references); allowed for layer {i}: {allowed(i)}"
                )
            if j == i:
                continue
            if sources[j] != j:
                raise ValueError(
                    f"{where}: layer {j} reads the keys/values of layer {sources[j]} itself; a source must "
                    f"own its keys/values (kv_source_layers[{j}] == {j}); allowed for layer {i}: {allowed(i)}"
                )
            mine, theirs = self.kv_kind(i), self.kv_kind(j)
            if mine is None or mine != theirs:

                def what(k: int, kind: KVKind | None) -> str:
                    label = (
                        "nothing to share"
                        if kind is None
                        else f"{kind.kind}, {'RoPE' if kind.rotated else 'NoPE'}"
                    )
                    return f"layer {k} (mixer_types[{k}]={self.mixer_types[k]!r}: {label})"

                raise ValueError(
                    f"{where}: {what(i, mine)} cannot read the keys/values of {what(j, theirs)}; a layer "
                    "shares with a layer that caches the same kind of keys/values (attention and DSA on "
                    "attention: per-head K/V; sliding_attention: windowed K/V; mla and DSA on MLA: the "
                    f"latent), with the same RoPE use; allowed for layer {i}: {allowed(i)}"
                )

    def validate_residual(self):
        n = self.num_hidden_layers
        for i, (mixer, mlp) in enumerate(zip(self.mixer_types, self.mlp_types)):
            if mixer_spec(mixer).cls is None and mlp_spec(mlp).cls is None:
                raise ValueError(
                    f"HybridConfig: layer {i} has mixer_types[{i}]={mixer!r} and mlp_types[{i}]={mlp!r}, "
                    "neither a module; a layer needs a token mixer, an MLP or both"
                )
        for name in ("attention_scaling", "logits_scaling"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"HybridConfig.{name}={value!r} must be a positive number")
        for name in ("mixer_residual_scales", "mixer_output_scales"):
            values = getattr(self, name)
            if values is not None and (
                len(values) != n
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            ):
                raise ValueError(f"HybridConfig.{name}={values!r} must be None or {n} numbers, one per layer")
        if self.gated_norms is not None:
            if len(self.gated_norms) != n:
                raise ValueError(
                    f"HybridConfig.gated_norms has {len(self.gated_norms)} entries but "
                    f"num_hidden_layers={n}; give one of 'none', 'mixer', 'mlp', 'both' per layer"
                )
            for i, g in enumerate(self.gated_norms):
                if g not in ("none", "mixer", "mlp", "both"):
                    raise ValueError(
                        f"HybridConfig.gated_norms[{i}]={g!r} is not allowed; "
                        "choose one of: none, mixer, mlp, both"
                    )
            rank = self.gated_norm_rank
            if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
                raise ValueError(
                    f"HybridConfig.gated_norm_rank={rank!r} must be a positive integer when gated_norms "
                    "is set"
                )
        if self.norm_placement is not None:
            if len(self.norm_placement) != n:
                raise ValueError(
                    f"HybridConfig.norm_placement has {len(self.norm_placement)} entries but "
                    f"num_hidden_layers={n}; give one of 'pre', 'post' per layer"
                )
            for i, p in enumerate(self.norm_placement):
                if p not in ("pre", "post", "sandwich"):
                    raise ValueError(
                        f"HybridConfig.norm_placement[{i}]={p!r} is not allowed; choose one of: pre, post, "
                        "sandwich"
                    )
        # ---- residual gates ----
        if not isinstance(self.residual_gates, bool):
            raise ValueError(f"HybridConfig.residual_gates={self.residual_gates!r} must be True or False")
        if self.residual_gates:
            scaled = (
                self.residual_from_norm
                or self.mixer_residual_scales is not None
                or self.mixer_output_scales is not None
                or self.mlp_residual_scale != 1.0
                or self.mlp_output_scale != 1.0
            )
            if scaled:
                raise ValueError(
                    "HybridConfig.residual_gates=True replaces the residual sum by a learned gate; it cannot "
                    "be combined with residual_from_norm or residual / output scales (allowed: their "
                    "defaults)"
                )

    def validate_hyper_connections(self):
        """The hyper-connection block (hyper_connections, hc_*)."""
        if self.hyper_connections not in _CHOICES["hyper_connections"]:
            raise ValueError(
                f"HybridConfig.hyper_connections={self.hyper_connections!r} is not allowed; choose one of: "
                + ", ".join(_CHOICES["hyper_connections"])
            )
        if self.hyper_connections == "none":
            return
        n = self.hc_mult
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"HybridConfig.hc_mult={n!r} must be a positive integer (the number of streams)")
        for name in ("hc_eps", "hc_magnitude"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"HybridConfig.{name}={value!r} must be a positive number")
        iters = self.hc_sinkhorn_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"HybridConfig.hc_sinkhorn_iters={iters!r} must be a positive integer")
        if self.hyper_connections == "mhc" and self.hc_magnitude != 2.0:
            raise ValueError(
                f"HybridConfig.hc_magnitude={self.hc_magnitude!r} with hyper_connections='mhc': mHC spreads "
                "the branch output with 2·sigmoid(.), fixed; hc_magnitude applies to 'ihc' only"
            )
        # The streams replace the single residual: the scaled / normed residual forms have no stream version.
        what = self.hyper_connections
        if self.residual_from_norm:
            raise ValueError(
                f"HybridConfig.residual_from_norm=True with hyper_connections={what!r}: the streams are "
                "the residual; set residual_from_norm=False"
            )
        for name in ("mixer_residual_scales", "mixer_output_scales"):
            values = getattr(self, name)
            if values is not None and any(v != 1.0 for v in values):
                raise ValueError(
                    f"HybridConfig.{name}={values!r} with hyper_connections={what!r}: the streams' own "
                    "weights scale the residual and the output; leave it None"
                )
        for name in ("mlp_residual_scale", "mlp_output_scale"):
            if getattr(self, name) != 1.0:
                raise ValueError(
                    f"HybridConfig.{name}={getattr(self, name)!r} with hyper_connections={what!r}: the "
                    "streams' own weights scale the residual and the output; leave it 1.0"
                )
        if self.residual_gates:
            raise ValueError(
                f"HybridConfig.residual_gates=True with hyper_connections={what!r}: the streams' own weights "
                "mix branch and residual; choose one of the two"
            )

    def validate_hybrid(self):
        require_positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"HybridConfig.{name}={value!r} is not allowed; choose one of: {', '.join(choices)}"
                )
        for f, _ in self._kind_fields():  # the kinds' fields: their choices and checks
            check_field(self, f)
        if self.head_dim is None:
            raise ValueError(
                f"HybridConfig.head_dim is required: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        require_positive(self, "head_dim")
        rope = self.rope_parameters or {}
        prf = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
        rotary = self.head_dim * prf
        if not (0.0 < prf <= 1.0) or abs(rotary - round(rotary)) > 1e-9 or round(rotary) % 2:
            raise ValueError(
                f"HybridConfig.rope_parameters['partial_rotary_factor']={prf} must be in "
                f"(0, 1] and give an even rotary dimension of head_dim={self.head_dim}"
            )
        # Each kind the layers use checks its own settings (its spec's validator, next to its class).
        for spec in self.layer_specs():
            if spec.validate is not None:
                spec.validate(self)
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"HybridConfig.sliding_window={self.sliding_window!r} must be positive or None")
        self._validate_native_options()
        self._validate_kv_sharing()
        self._validate_mistral_options()


def install_auto_config_trust() -> None:
    """Hand ``trust_remote_code`` of ``AutoConfig.from_pretrained`` (and so of every ``AutoModel*``
    ``.from_pretrained``, which loads its config through it) on to HybridConfig. transformers pops the flag
    before it builds a config class registered in-process (for it the flag only governs code stored in the
    checkpoint's repository), so without this the opt-in for a kind defined outside hf_hybrid could not pass
    through the Auto classes."""
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained.__func__
    if getattr(original, "_hf_hybrid_trust", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        with _trusting(kwargs.get("trust_remote_code")):
            return original(cls, *args, **kwargs)

    from_pretrained._hf_hybrid_trust = True
    AutoConfig.from_pretrained = classmethod(from_pretrained)


__all__ = ["HybridConfig", "FORMAT_VERSION"]
