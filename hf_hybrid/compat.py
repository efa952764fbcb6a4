"""Every difference between the transformers versions hf_hybrid supports (5.23 to 5.24) lives here.

The rest of the package calls these helpers and never tests a version itself (CONTRIBUTING.md). Each
difference is detected from the installed transformers' own objects, not from its version string, so a
backport or a later release that keeps one of these shapes is handled the same way.

Differences handled:

- **The cache's name.** 5.24 renamed ``past_key_values`` / ``cache_params`` to ``cache``: built-in outputs
  have a ``cache`` field, ``generate()`` calls ``forward(cache=...)`` and reads ``outputs["cache"]`` only, and
  a metaclass on ``ModelOutput`` renames the old constructor keyword. 5.23's ``generate()`` passes and reads
  ``past_key_values`` only. Our output classes therefore name the field as the installed transformers does
  (:func:`output_dataclass`), keep the other name readable, and every public forward takes both keywords
  (:func:`resolve_cache`).
- **Mask helpers** (``create_causal_mask`` and friends) renamed their ``past_key_values`` argument to
  ``cache``: the old keyword warns on 5.24, the new one fails on 5.23; positional works on both
  (:func:`build_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

#: The name the installed transformers gives the cache in forward keywords, outputs and ``generate()``'s
#: kwargs.
CACHE_NAME: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)
#: The other spelling, still accepted and still readable.
OTHER_CACHE_NAME: str = "past_key_values" if CACHE_NAME == "cache" else "cache"


def resolve_cache(cache: Any, past_key_values: Any, *, where: str) -> Any:
    """The cache given to a forward under either keyword (``cache=`` or ``past_key_values=``); both is an
    error.

    Both names are accepted on every supported transformers, so that a caller written for either version (and
    ``generate()`` of either) reaches the same cache; a keyword that fell into ``**kwargs`` would be silently
    ignored and decode from an empty state."""
    if cache is not None and past_key_values is not None:
        if cache is past_key_values:
            return cache
        raise ValueError(
            f"{where}: got both cache= and past_key_values= (two different caches); pass one of them "
            f"(they are the same argument: transformers 5.24 renamed past_key_values to cache)"
        )
    return cache if cache is not None else past_key_values


def output_dataclass(cls: type) -> type:
    """``@dataclass`` for our ``ModelOutput`` classes, which declare their cache field as ``cache``.

    On a transformers whose outputs still call it ``past_key_values`` (5.23) the field is renamed before the
    dataclass is made, so that version's ``generate()`` finds it as a key; ``cache=`` is still accepted by the
    constructor and ``.cache`` still reads. On 5.24 the class is left as declared (its ``ModelOutput`` already
    renames ``past_key_values=`` and reads ``.past_key_values`` as an alias)."""
    if CACHE_NAME == "cache":
        return dataclasses.dataclass(cls)
    annotations = cls.__dict__.get("__annotations__", {})
    if "cache" not in annotations:
        raise TypeError(f"{cls.__name__}: compat.output_dataclass needs a field named 'cache'")
    cls.__annotations__ = {(CACHE_NAME if k == "cache" else k): v for k, v in annotations.items()}
    setattr(cls, CACHE_NAME, cls.__dict__.get("cache", None))
    if "cache" in cls.__dict__:
        delattr(cls, "cache")
    cls = dataclasses.dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "cache" in kwargs:
            if CACHE_NAME in kwargs:
                raise ValueError(f"{cls.__name__}: got both cache= and {CACHE_NAME}=; pass one of them")
            kwargs[CACHE_NAME] = kwargs.pop("cache")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.cache = property(_read_cache, doc="The cache (alias of past_key_values; transformers 5.24's name).")
    return cls


def _read_cache(self) -> Any:
    return getattr(self, CACHE_NAME)


def output_cache(outputs: Any) -> Any:
    """The cache of any transformers or hf_hybrid output, read under the installed transformers' name (no
    deprecation warning); ``None`` when the output carries none."""
    if isinstance(outputs, dict):
        return outputs.get(CACHE_NAME)
    return getattr(outputs, CACHE_NAME, None)


def build_mask(
    fn: Callable[..., Any],
    *,
    config,
    inputs_embeds: torch.Tensor,
    attention_mask,
    cache,
    position_ids: torch.Tensor | None = None,
) -> Any:
    """Call one of transformers' mask helpers (``create_causal_mask``, ``create_sliding_window_causal_mask``,
    ``create_recurrent_attention_mask``, ...): the cache goes positionally, the one form both versions accept
    without a warning."""
    if position_ids is None:
        return fn(config, inputs_embeds, attention_mask, cache)
    return fn(config, inputs_embeds, attention_mask, cache, position_ids)


__all__ = [
    "CACHE_NAME",
    "OTHER_CACHE_NAME",
    "build_mask",
    "output_dataclass",
    "output_cache",
    "resolve_cache",
]
