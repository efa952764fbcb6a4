"""The one registry of layer kinds: every token mixer and every MLP declares everything about itself in a
spec next to its class (``hf_hybrid.specs`` says what a spec holds). The config's validation, the model (which
class to build, which masks to make), the cache (through transformers' ``layer_types``), the cost inspector
and the model card read these specs; nothing else in the package keeps a list of mixer names.

Adding a mixer is one file (CONTRIBUTING.md has the whole contract and the test kit, ``hf_hybrid.testing``)::

    from hf_hybrid.registry import register_mixer

    @register_mixer("my_mixer", layer_type="linear_attention", recurrent=True, cost=my_cost,
                    config_defaults={"my_mixer_width": 64}, validate=my_validate)
    class MyMixer(nn.Module):
        def __init__(self, config, layer_idx): ...
        def forward(self, hidden_states, ctx): ...   # ctx: hf_hybrid.mixers.MixerContext

Inside the package the file's name goes into ``hf_hybrid/mixers/__init__.py``. Outside it, importing the file
registers the mixer, and a config that uses it records the module, so that a fresh process can import it again
on load with ``trust_remote_code=True`` (see :func:`trust_remote_code`). The built-in kinds are imported on
first use, all or nothing; their files import ``hf_hybrid.specs``, never this module, the config or the cost
inspector, so there is no import circle.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from .specs import (  # noqa: F401  (the tables are re-exported for tests and tools)
    _MIXERS,
    _MLPS,
    LAYER_TYPES,
    MASKS,
    MIXER_REGISTRY,
    MLP_REGISTRY,
    ConfigField,
    HybridizeInit,
    KVKind,
    MixerCost,
    MixerSpec,
    MLPCost,
    MLPSpec,
    _notify,
    check_field,
    is_builtin_module,
    mixer_mask,
    nonnegative,
    positive_or_none,
    register_mixer,
    register_mlp,
    require_positive,
)

_BUILTIN_MODULES = ("hf_hybrid.mixers", "hf_hybrid.mlp", "hf_hybrid.moe")
_builtins_loaded = False
_builtins_loading = False


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
        _notify()  # tables kept in step with the specs forget the partial registration
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


def config_field_defaults() -> Mapping[str, object]:
    """``{field: default}`` of every config field a registered kind declares (``ConfigField``)."""
    specs = (*mixer_specs().values(), *mlp_specs().values())
    return {f.name: f.default for spec in specs for f in spec.config_fields}


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
    "config_field_defaults",
    "is_builtin_module",
    "mixer_mask",
    "mixer_spec",
    "mixer_specs",
    "mlp_spec",
    "mlp_specs",
    "nonnegative",
    "positive_or_none",
    "register_mixer",
    "register_mlp",
    "remote_code_trusted",
    "require_positive",
    "trust_remote_code",
]
