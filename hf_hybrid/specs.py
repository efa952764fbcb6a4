"""What a layer kind declares: its spec (:class:`MixerSpec`, :class:`MLPSpec`), the decorators that register
it (:func:`register_mixer`, :func:`register_mlp`) and the cost records its cost function returns.

A leaf module: a kind's file imports this (and ``hf_hybrid.mixers.base``, the ops, the layers), never the
config, the cost inspector or the model, so that ``hf_hybrid.registry`` can import the built-in kinds on first
use without an import circle. Look kinds up through ``hf_hybrid.registry`` (which re-exports everything
here); see CONTRIBUTING.md for the contract a kind fulfils.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# transformers' layer_types that decide each layer's cache layer: DynamicLayer, DynamicSlidingWindowLayer,
# LinearAttentionLayer (conv + recurrent state), DynamicIndexedLayer (DSA indexer keys), and "moe"
# (transformers' name for a layer without token mixing, e.g. nemotron_h's MLP-only blocks: its cache layer
# holds nothing).
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention", "indexed_attention", "moe")
MASKS = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ConfigField:
    """One config field a kind adds to ``HybridConfig``: a flat attribute (``config.gdn_num_key_heads``),
    saved in ``config.json`` like the config's own fields, declared next to the kind that reads it.

    - ``default``: its value when neither the caller nor the checkpoint gives one;
    - ``type``: its annotation (as the config's own fields carry one);
    - ``choices``: the allowed values (``HybridConfig.<name>=<value> is not allowed; choose one of: ...``);
    - ``check``: ``fn(config, name)`` raising ``ValueError`` (field, value, what is allowed) for a bad value;
    - ``derive``: ``fn(config) -> value`` run when the value is None: a default that depends on other fields
      (``gdn_num_key_heads``: half the attention heads), resolved at construction and then saved;
    - ``effective``: ``fn(config) -> value`` as the layers read it, where spellings differ but mean the same
      (``gdn_norm_eps=None`` is ``rms_norm_eps``): what a native export's round trip compares;
    - ``only_when_used``: the field exists only on configs whose layers use the kind
      (``output_router_logits``: a client takes a config that has it for an MoE).

    The fields of hf_hybrid's own kinds are on every config, as they were when they were typed fields of
    ``HybridConfig`` (every saved config.json carries them), and their choices and checks run on every
    config; a kind defined outside the package adds its fields (and checks) only to configs whose layers use
    it. The flat name space is shared: a name may be declared by one kind only.
    """

    name: str
    default: Any = None
    type: str = "Any"
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any, str], None] | None = None
    derive: Callable[[Any], Any] | None = None
    only_when_used: bool = False
    doc: str = ""
    effective: Callable[[Any], Any] | None = None


def check_field(config: Any, spec_field: ConfigField) -> None:
    """Run ``spec_field``'s choices and check on ``config``."""
    value = getattr(config, spec_field.name)
    if spec_field.choices is not None and value not in spec_field.choices:
        raise ValueError(
            f"HybridConfig.{spec_field.name}={value!r} is not allowed; choose one of: "
            f"{', '.join(map(str, spec_field.choices))}"
        )
    if spec_field.check is not None:
        spec_field.check(config, spec_field.name)


def nonnegative(config: Any, name: str) -> None:
    """A ``ConfigField.check``: the value is >= 0 (a loss coefficient, a rate)."""
    if getattr(config, name) < 0:
        raise ValueError(f"HybridConfig.{name}={getattr(config, name)} must be >= 0")


def positive_or_none(config: Any, name: str) -> None:
    """A ``ConfigField.check``: None or > 0 (an eps whose None means another field's value)."""
    value = getattr(config, name)
    if value is not None and not value > 0:
        raise ValueError(f"HybridConfig.{name}={value!r} must be > 0")


@dataclass(frozen=True)
class HybridizeInit:
    """A mixer spec's ``hybridize_init`` hook: how an attention layer becomes this kind
    (``hf_hybrid.convert.hybridize``; helpers in ``hf_hybrid.mixers.from_attention``).

    - ``geometry(config)``: the config fields that give the mixer one head per query head of the attention's
      head dim (set on the student config; an existing layer of that type must already have them);
    - ``apply(mixer, weights, config)``: writes the inherited tensors (``weights``: the converter's
      ``AttentionWeights``) into a freshly built mixer (the rest keeps the mixer's own init); returns notes
      about this layer (e.g. biases dropped);
    - ``statement(config)``: what is inherited, what is new (and its init), what is dropped — printed and
      saved.
    """

    geometry: Callable[[Any], dict[str, Any]]
    apply: Callable[[Any, Any, Any], list[str]]
    statement: Callable[[Any], dict[str, list[str]]]


@dataclass(frozen=True)
class KVKind:
    """A mixer spec's ``kv_kind`` answer: what a layer caches as keys/values, as far as another layer may
    read them (``HybridConfig.kv_source_layers``). Two layers share only when ``kind`` and ``rotated`` are
    equal.

    - ``kind``: a label for what is cached (the built-ins: ``"kv"``, per-head keys and values;
      ``"sliding_kv"``, the same within ``sliding_window``; ``"mla_latent"``, MLA's ``(c_kv, k_pe)``);
    - ``rotated``: whether the cached keys carry RoPE;
    - ``reuse``: transformers' ``kv_sharing_modes`` entry of this layer when it reads another's keys/values:
      ``"reuse"`` (a ``DummyLayer``, nothing cached) or ``"reuse_but_indexer"`` (DSA's cache layer keeps the
      indexer keys); not compared.
    """

    kind: str
    rotated: bool
    reuse: str = field(default="reuse", compare=False)


@dataclass(frozen=True)
class MixerSpec:
    """Everything the package needs to know about one token-mixer kind.

    - ``layer_type``: transformers' ``layer_types`` entry, which picks the cache layer transformers builds for
      it.
    - ``mask``: which of transformers' attention masks the layer reads from ``ctx.masks`` (None: it needs
      none; a layer that needs one but declares None would see the future under eager attention), or
      ``fn(config)`` returning one of those when it depends on the layer's settings (a sparse DSA layer needs
      no dense mask). A mixer whose mask also depends on run-time state (DSA's ``model.dsa_mode(...)``)
      defines ``runtime_mask()`` on its module as well; the model asks the module then, the inspector and the
      card read the spec.
    - ``recurrent``: keeps a constant-size recurrent state (the model is stateful, the cache cannot be
      cropped).
    - ``needs_padding_mask``: reads ``ctx.padding_mask`` (recurrent mixers, DSA's indexer).
    - ``cost``: ``fn(config, layer_idx) -> MixerCost`` for the inspector and the card.
    - ``config_fields``: the config fields this kind adds (:class:`ConfigField`), the one home of their
      defaults and checks; ``config_defaults`` is the ``{name: default}`` view of them.
    - ``validate``: ``fn(config)`` raising ``ValueError`` (field, value, what is allowed) for a bad setting;
      run whenever a config uses this kind.
    - ``describe``: ``fn(config) -> [(label, text), ...]``, the model card's settings rows for this kind (rows
      that several kinds share, e.g. the attention heads, appear once).
    - optional hooks for the converters and clients: ``hybridize_init`` (:class:`HybridizeInit`, how
      ``hybridize`` turns attention into this kind), ``functional_fields`` (``fn(config) -> field names``:
      the config fields that decide the function of this kind's layers, compared by a native export's round
      trip; default: the fields it declares), ``lora_targets`` (the module names inside this kind that PEFT's
      default LoRA targets).
    - optional hooks for the options that relate layers to one another or to the model; a kind that does not
      declare one does not take part: ``kv_kind`` (``fn(config, layer_idx) -> KVKind | None``: what the layer
      caches that a layer of the same :class:`KVKind` may share through ``kv_source_layers``; default None,
      no sharing), ``rope_dims`` (``fn(config, layer_idx) -> set of ints``: the rotary dimensions the layer
      asks RoPE tables for, what ``rope_learned_scale`` checks; default none), ``accepts_nope``
      (``fn(config, layer_idx) -> bool``: whether ``nope_layers`` may name the layer; default False),
      ``cost_notes`` (``fn(config, contexts, estimate) -> [str]``: warnings about what the cost numbers show
      against the kind's intent, ``estimate(config, contexts)`` giving the formulas' cost report of another
      config; default none).
    - ``module``: the module that defines the kind (set at registration). A config that uses a kind defined
      outside hf_hybrid records it, so a fresh process can import it again on load (with
      ``trust_remote_code=True``, see :func:`trust_remote_code`).
    """

    name: str
    cls: type | None  # None: no token mixer at all (an MLP-only layer)
    layer_type: str
    mask: str | Callable[[Any], str | None] | None = None
    recurrent: bool = False
    needs_padding_mask: bool = False
    cost: Callable[..., Any] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[Any], None] | None = None
    describe: Callable[[Any], list[tuple[str, str]]] | None = None
    module: str = ""
    config_fields: tuple[ConfigField, ...] = ()
    functional_fields: Callable[[Any], Sequence[str]] | None = None
    lora_targets: tuple[str, ...] = ()
    hybridize_init: HybridizeInit | None = None
    kv_kind: Callable[[Any, int], KVKind | None] | None = None
    rope_dims: Callable[[Any, int], set[int]] | None = None
    accepts_nope: Callable[[Any, int], bool] | None = None
    cost_notes: Callable[[Any, Sequence[int], Callable[..., Any]], list[str]] | None = None

    @property
    def builtin(self) -> bool:
        return is_builtin_module(self.module)


def is_builtin_module(module: str) -> bool:
    """Whether ``module`` belongs to hf_hybrid itself (its kinds need no record in a saved config)."""
    return module == "hf_hybrid" or module.startswith("hf_hybrid.")


def mixer_mask(spec: MixerSpec, config: Any) -> str | None:
    """The transformers mask a layer of this kind reads under ``config`` (None: none)."""
    mask = spec.mask(config) if callable(spec.mask) else spec.mask
    if mask is not None and mask not in MASKS:
        raise ValueError(
            f"mixer {spec.name!r} asks for mask {mask!r}; choose None or one of {', '.join(MASKS)}"
        )
    return mask


@dataclass(frozen=True)
class MLPSpec:
    """One MLP kind: ``cls`` (None for no MLP at all), whether it reads the padding mask (MoE balancing), its
    cost function (``fn(config, layer_idx) -> MLPCost``), its config fields, a validator, its
    model-card rows (``describe``, as for mixers), the Hub tag a model using it gets (``tag``), the module
    that defines it (``module``, as for mixers) and the hooks ``functional_fields`` / ``lora_targets`` (as
    for mixers)."""

    name: str
    cls: type | None
    needs_padding_mask: bool = False
    cost: Callable[..., Any] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[Any], None] | None = None
    describe: Callable[[Any], list[tuple[str, str]]] | None = None
    tag: str | None = None
    module: str = ""
    config_fields: tuple[ConfigField, ...] = ()
    functional_fields: Callable[[Any], Sequence[str]] | None = None
    lora_targets: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return is_builtin_module(self.module)


_MIXERS: dict[str, MixerSpec] = {}
_MLPS: dict[str, MLPSpec] = {}
#: name -> class views of the registries (what builds a layer), kept in step with the specs.
MIXER_REGISTRY: dict[str, type] = {}
MLP_REGISTRY: dict[str, type | None] = {}


#: called (no arguments) after every registration: tables kept elsewhere in step with the specs (PEFT's
#: default LoRA targets). A listener reads the tables above, never the registry's loader.
_LISTENERS: list[Callable[[], None]] = []


def on_register(listener: Callable[[], None]) -> None:
    _LISTENERS.append(listener)
    listener()


def _notify() -> None:
    for listener in _LISTENERS:
        listener()


def _zero_flops(context: int) -> float:
    return 0.0


@dataclass(frozen=True)
class MixerCost:
    """Cost of one token mixer, what a mixer spec's ``cost(config, layer_idx)`` returns (units: see
    ``hf_hybrid.cost``)."""

    params: int
    matmul_params: int  # weights each token multiplies once (Linear and conv weights): 2 FLOPs each
    cache_per_token: int = 0
    cache_window: int | None = None
    state_elements: int = 0
    flops: Callable[[int], float] = _zero_flops  # extra forward FLOPs per token at context c
    state_fp32_elements: int = 0  # the part of state_elements kept in fp32 (recurrent state)


@dataclass(frozen=True)
class MLPCost:
    """Cost of one MLP, what an MLP spec's ``cost(config, layer_idx)`` returns."""

    params: int
    matmul_params: int
    inactive_params: int = 0  # routed experts that one token does not use (MoE)


def format_tokens(n: int) -> str:
    """A context length as the cost report prints it (``4096`` -> ``"4K"``)."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"{kind} name {name!r} must be a lower-case identifier such as 'my_mixer'")


def _defining_module(cls: type | None) -> str:
    """The module that defines ``cls``; for ``register_*(...)(None)``, the module that made the call."""
    if cls is not None:
        return cls.__module__
    return sys._getframe(2).f_globals.get("__name__", "")


def _check_taken(kind: str, old: MixerSpec | MLPSpec | None, cls: type | None, module: str) -> None:
    """Registering the same class again is a no-op (a module imported twice, or reloaded: same module and
    name); a different class under a taken name is an error, never a silent replacement."""
    if old is None or old.cls is cls:
        return
    same_definition = (
        old.module == module
        and getattr(old.cls, "__qualname__", None) == getattr(cls, "__qualname__", None)
        and (old.cls is None) == (cls is None)
    )
    if not same_definition:
        raise ValueError(
            f"{kind} {old.name!r} is registered twice ({old.cls} from {old.module!r} and {cls} from "
            f"{module!r}); choose another name for the second"
        )


def _config_fields(
    name: str, config_fields: Sequence[ConfigField] | None, config_defaults: Mapping[str, Any] | None
) -> tuple[ConfigField, ...]:
    """A kind's fields: ``config_fields`` and the plain ``{name: default}`` of ``config_defaults``, each name
    once and taken by no other kind."""
    fields = tuple(config_fields or ()) + tuple(
        ConfigField(key, default) for key, default in (config_defaults or {}).items()
    )
    taken = {}
    for spec in (*_MIXERS.values(), *_MLPS.values()):
        if spec.name != name:
            taken.update(dict.fromkeys(spec.config_defaults, spec.name))
    seen = set()
    for f in fields:
        if not isinstance(f, ConfigField) or not f.name.isidentifier():
            raise ValueError(f"{name!r}: config field {f!r} must be a ConfigField with an identifier as name")
        if f.name in taken:
            raise ValueError(f"config field {f.name!r} of {name!r} is already declared by {taken[f.name]!r}")
        if f.name in seen:
            raise ValueError(f"config field {f.name!r} of {name!r} is declared twice")
        seen.add(f.name)
    return fields


def register_mixer(
    name: str,
    *,
    layer_type: str,
    mask: str | Callable[[Any], str | None] | None = None,
    recurrent: bool = False,
    needs_padding_mask: bool | None = None,
    cost: Callable[..., Any] | None = None,
    config_defaults: Mapping[str, Any] | None = None,
    validate: Callable[[Any], None] | None = None,
    describe: Callable[[Any], list[tuple[str, str]]] | None = None,
    config_fields: Sequence[ConfigField] | None = None,
    functional_fields: Callable[[Any], Sequence[str]] | None = None,
    lora_targets: Sequence[str] = (),
    hybridize_init: HybridizeInit | None = None,
    kv_kind: Callable[[Any, int], KVKind | None] | None = None,
    rope_dims: Callable[[Any, int], set[int]] | None = None,
    accepts_nope: Callable[[Any, int], bool] | None = None,
    cost_notes: Callable[[Any, Sequence[int], Callable[..., Any]], list[str]] | None = None,
) -> Callable[[type], type]:
    """Class decorator declaring a token mixer (see :class:`MixerSpec`). ``needs_padding_mask`` defaults to
    ``recurrent``. Registering a different class under a taken name is an error. ``register_mixer("none",
    ...)(None)`` declares a layer without token mixer (no module, no input norm)."""
    _check_name("mixer", name)
    if layer_type not in LAYER_TYPES:
        raise ValueError(
            f"register_mixer({name!r}): layer_type={layer_type!r}; choose one of {', '.join(LAYER_TYPES)}"
        )
    if mask is not None and not callable(mask) and mask not in MASKS:
        raise ValueError(f"register_mixer({name!r}): mask={mask!r}; choose None or one of {', '.join(MASKS)}")

    def wrap(cls: type | None) -> type | None:
        module = _defining_module(cls)
        _check_taken("mixer", _MIXERS.get(name), cls, module)
        fields = _config_fields(name, config_fields, config_defaults)
        _MIXERS[name] = MixerSpec(
            name=name,
            cls=cls,
            layer_type=layer_type,
            mask=mask,
            recurrent=recurrent,
            needs_padding_mask=recurrent if needs_padding_mask is None else needs_padding_mask,
            cost=cost,
            config_defaults=MappingProxyType({f.name: f.default for f in fields}),
            validate=validate,
            describe=describe,
            module=module,
            config_fields=fields,
            functional_fields=functional_fields,
            lora_targets=tuple(lora_targets),
            hybridize_init=hybridize_init,
            kv_kind=kv_kind,
            rope_dims=rope_dims,
            accepts_nope=accepts_nope,
            cost_notes=cost_notes,
        )
        MIXER_REGISTRY[name] = cls
        _notify()
        return cls

    return wrap


def register_mlp(
    name: str,
    *,
    needs_padding_mask: bool = False,
    cost: Callable[..., Any] | None = None,
    config_defaults: Mapping[str, Any] | None = None,
    validate: Callable[[Any], None] | None = None,
    describe: Callable[[Any], list[tuple[str, str]]] | None = None,
    tag: str | None = None,
    config_fields: Sequence[ConfigField] | None = None,
    functional_fields: Callable[[Any], Sequence[str]] | None = None,
    lora_targets: Sequence[str] = (),
) -> Callable[[type | None], type | None]:
    """Class decorator declaring an MLP kind (see :class:`MLPSpec`); ``register_mlp("none")(None)`` declares a
    layer without MLP."""
    _check_name("MLP", name)

    def wrap(cls: type | None) -> type | None:
        module = _defining_module(cls)
        _check_taken("MLP", _MLPS.get(name), cls, module)
        fields = _config_fields(name, config_fields, config_defaults)
        _MLPS[name] = MLPSpec(
            name=name,
            cls=cls,
            needs_padding_mask=needs_padding_mask,
            cost=cost,
            config_defaults=MappingProxyType({f.name: f.default for f in fields}),
            validate=validate,
            describe=describe,
            tag=tag,
            module=module,
            config_fields=fields,
            functional_fields=functional_fields,
            lora_targets=tuple(lora_targets),
        )
        MLP_REGISTRY[name] = cls
        _notify()
        return cls

    return wrap


def require_positive(config: Any, *names: str, allow_none: bool = False) -> None:
    """Shared check for validators: each ``config.<name>`` is a positive int (or None when ``allow_none``)."""
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"HybridConfig.{name}={value!r} must be a positive integer")


__all__ = [
    "ConfigField",
    "HybridizeInit",
    "KVKind",
    "LAYER_TYPES",
    "MASKS",
    "MIXER_REGISTRY",
    "MLP_REGISTRY",
    "MLPCost",
    "MLPSpec",
    "MixerCost",
    "MixerSpec",
    "check_field",
    "format_tokens",
    "is_builtin_module",
    "mixer_mask",
    "nonnegative",
    "positive_or_none",
    "register_mixer",
    "register_mlp",
    "require_positive",
]
