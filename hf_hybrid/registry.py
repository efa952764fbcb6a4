"""The one registry of layer kinds: every token mixer and every MLP declares everything about itself here, in
a spec next to its class (STYLE.md §13). The config's validation, the model (which class to build, which masks
to make), the cache (through transformers' ``layer_types``), the cost inspector and the model card read these
specs; nothing else in the package keeps a list of mixer names.

Adding a mixer is one new file plus one import line::

    from hf_hybrid.registry import register_mixer

    @register_mixer("my_mixer", layer_type="linear_attention", recurrent=True, cost=my_cost,
                    config_defaults={"my_mixer_width": 64}, validate=my_validate)
    class MyMixer(nn.Module):
        def __init__(self, config, layer_idx): ...
        def forward(self, hidden_states, ctx): ...   # ctx: hf_hybrid.mixers.MixerContext

(inside the package the import line goes into ``hf_hybrid/mixers/__init__.py``; outside it, importing the file
registers the mixer, see ``tests/test_registry.py``). The built-in specs load on first use, so importing the
config never imports the mixers (no import circle).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
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
    - ``cost``: ``fn(config, layer_idx) -> hf_hybrid.cost.MixerCost`` for the inspector and the card.
    - ``config_defaults``: config fields this kind adds and their defaults (for kinds defined outside the
      package; the built-in kinds' fields are typed fields of ``HybridConfig``, the one home of their
      defaults).
    - ``validate``: ``fn(config)`` raising ``ValueError`` (field, value, what is allowed) for a bad setting;
      run whenever a config uses this kind.
    - ``describe``: ``fn(config) -> [(label, text), ...]``, the model card's settings rows for this kind (rows
      that several kinds share, e.g. the attention heads, appear once).
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
    cost function (``fn(config, layer_idx) -> hf_hybrid.cost.MLPCost``), extra config fields, a validator, its
    model-card rows (``describe``, as for mixers), the Hub tag a model using it gets (``tag``) and the module
    that defines it (``module``, as for mixers)."""

    name: str
    cls: type | None
    needs_padding_mask: bool = False
    cost: Callable[..., Any] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[Any], None] | None = None
    describe: Callable[[Any], list[tuple[str, str]]] | None = None
    tag: str | None = None
    module: str = ""

    @property
    def builtin(self) -> bool:
        return is_builtin_module(self.module)


_MIXERS: dict[str, MixerSpec] = {}
_MLPS: dict[str, MLPSpec] = {}
#: name -> class views of the registries (what builds a layer), kept in step with the specs.
MIXER_REGISTRY: dict[str, type] = {}
MLP_REGISTRY: dict[str, type | None] = {}

_BUILTIN_MODULES = ("hf_hybrid.mixers", "hf_hybrid.mlp", "hf_hybrid.moe")
_builtins_loaded = False
_builtins_loading = False


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


def _check_defaults(name: str, defaults: Mapping[str, Any]) -> None:
    taken = {}
    for spec in (*_MIXERS.values(), *_MLPS.values()):
        if spec.name != name:
            taken.update(dict.fromkeys(spec.config_defaults, spec.name))
    for key in defaults:
        if key in taken:
            raise ValueError(f"config field {key!r} of {name!r} is already declared by {taken[key]!r}")


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
    defaults = dict(config_defaults or {})

    def wrap(cls: type | None) -> type | None:
        module = _defining_module(cls)
        _check_taken("mixer", _MIXERS.get(name), cls, module)
        _check_defaults(name, defaults)
        _MIXERS[name] = MixerSpec(
            name=name,
            cls=cls,
            layer_type=layer_type,
            mask=mask,
            recurrent=recurrent,
            needs_padding_mask=recurrent if needs_padding_mask is None else needs_padding_mask,
            cost=cost,
            config_defaults=MappingProxyType(defaults),
            validate=validate,
            describe=describe,
            module=module,
        )
        MIXER_REGISTRY[name] = cls
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
) -> Callable[[type | None], type | None]:
    """Class decorator declaring an MLP kind (see :class:`MLPSpec`); ``register_mlp("none")(None)`` declares a
    layer without MLP."""
    _check_name("MLP", name)
    defaults = dict(config_defaults or {})

    def wrap(cls: type | None) -> type | None:
        module = _defining_module(cls)
        _check_taken("MLP", _MLPS.get(name), cls, module)
        _check_defaults(name, defaults)
        _MLPS[name] = MLPSpec(
            name=name,
            cls=cls,
            needs_padding_mask=needs_padding_mask,
            cost=cost,
            config_defaults=MappingProxyType(defaults),
            validate=validate,
            describe=describe,
            tag=tag,
            module=module,
        )
        MLP_REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    """Import the built-in kinds once, all or nothing: a failed import leaves the registry as it was (and the
    next call tries again) instead of a registry that silently lacks some kinds."""
    global _builtins_loaded, _builtins_loading
    if _builtins_loaded:
        return
    if _builtins_loading:
        raise RuntimeError(
            "hf_hybrid.registry: a built-in kind's module asked for the registry while the built-in kinds "
            "are being imported (an import circle); read the specs at call time, not at import time"
        )
    saved = (dict(_MIXERS), dict(_MLPS), dict(MIXER_REGISTRY), dict(MLP_REGISTRY))
    before = set(sys.modules)
    _builtins_loading = True
    try:
        for module in _BUILTIN_MODULES:
            loaded = importlib.import_module(module)
            if getattr(getattr(loaded, "__spec__", None), "_initializing", False):
                raise RuntimeError(
                    f"hf_hybrid.registry: the specs were asked for while {module} is still being imported "
                    "(an import circle); read the specs at call time, not at import time"
                )
    except BaseException:
        for live, old in zip((_MIXERS, _MLPS, MIXER_REGISTRY, MLP_REGISTRY), saved):
            live.clear()
            live.update(old)
        for name in set(sys.modules) - before:  # so that the next try imports them afresh
            if is_builtin_module(name):
                del sys.modules[name]
        raise
    finally:
        _builtins_loading = False
    _builtins_loaded = True


_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hf_hybrid_trust_remote_code", default=False
)


@contextlib.contextmanager
def trust_remote_code(trust: bool | None = True) -> Iterator[None]:
    """Inside the block, a config that uses a kind defined outside hf_hybrid may import the module its
    checkpoint recorded for it (transformers' ``trust_remote_code`` convention: importing runs that module's
    code, so it happens only on this explicit opt-in). ``from_pretrained(..., trust_remote_code=True)`` of
    ``HybridConfig``, the hf_hybrid models and the Auto classes, and the CLI's ``--trust-remote-code``, enter
    it for you; ``trust=None`` (the argument not given) leaves an enclosing block's choice in force."""
    if trust is None:  # not given: whatever an enclosing block said
        yield
        return
    token = _TRUST_REMOTE_CODE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def remote_code_trusted() -> bool:
    return _TRUST_REMOTE_CODE.get()


def mixer_specs() -> Mapping[str, MixerSpec]:
    """Every registered token mixer, built-ins first, in registration order (read-only)."""
    _load_builtins()
    return MappingProxyType(_MIXERS)


def mlp_specs() -> Mapping[str, MLPSpec]:
    _load_builtins()
    return MappingProxyType(_MLPS)


def mixer_spec(name: str) -> MixerSpec:
    specs = mixer_specs()
    if name not in specs:
        raise ValueError(f"{name!r} is not a known mixer type; choose one of: {', '.join(specs)}")
    return specs[name]


def mlp_spec(name: str) -> MLPSpec:
    specs = mlp_specs()
    if name not in specs:
        raise ValueError(f"{name!r} is not a known MLP type; choose one of: {', '.join(specs)}")
    return specs[name]


def require_positive(config: Any, *names: str, allow_none: bool = False) -> None:
    """Shared check for validators: each ``config.<name>`` is a positive int (or None when ``allow_none``)."""
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"HybridConfig.{name}={value!r} must be a positive integer")


__all__ = [
    "LAYER_TYPES",
    "MASKS",
    "MIXER_REGISTRY",
    "MLP_REGISTRY",
    "MLPSpec",
    "MixerSpec",
    "is_builtin_module",
    "mixer_mask",
    "mixer_spec",
    "mixer_specs",
    "mlp_spec",
    "mlp_specs",
    "register_mixer",
    "register_mlp",
    "remote_code_trusted",
    "require_positive",
    "trust_remote_code",
]
