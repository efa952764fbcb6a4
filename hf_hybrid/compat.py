"""Every difference between the transformers versions hf_hybrid supports (5.23 to 5.25) lives here.

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
- **Assisted decoding.** 5.25 tells the cache how many tokens a round drafts
  (``activate_past_recording(recurrent_states_to_keep=N)``) and names it ``num_drafting_tokens`` on its
  candidate generators; 5.23 / 5.24 activate the recording without a number (:func:`drafting_tokens`), and
  their prefill does not slice the inputs for a cache of recurrent layers only
  (:func:`new_tokens_for_generation`). The cache's length and its rollback are ours on every version
  (``hf_hybrid.cache``), so 5.25's own linear-attention token counts and history are not used.
- **Hub kernels.** 5.25 (``kernels`` 0.19) turns transformers' kernel-dispatching functions into modules
  without ``__name__`` / ``__wrapped__`` (:func:`torch_reference` finds the torch function behind either
  form).
- **nemotron_h's Δ clamp**: ``time_step_limit`` on 5.25, ``(time_step_min, ∞)`` before
  (:func:`nemotron_h_dt_clamp`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
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


def drafting_tokens(candidate_generator: Any) -> int:
    """How many tokens a candidate generator of ``generate``'s assisted decoding drafts per round (the most a
    verification can reject). 5.25 names it ``num_drafting_tokens``; before, an assistant model's generator
    has ``num_assistant_tokens`` and prompt lookup's ``num_output_tokens``."""
    for name in ("num_drafting_tokens", "num_assistant_tokens", "num_output_tokens"):
        value = getattr(candidate_generator, name, None)
        if value is not None:
            return int(value)
    raise TypeError(
        f"{type(candidate_generator).__name__}: cannot tell how many tokens it drafts (no "
        f"num_drafting_tokens, num_assistant_tokens or num_output_tokens)"
    )


def new_tokens_for_generation(input_ids: torch.Tensor, cache: Any, attention_mask: Any) -> int | None:
    """How many of ``input_ids`` a generation step must feed, when ``generate`` passes the whole sequence to a
    cache that already holds some of it; None = all of them (transformers decides).

    5.23 / 5.24's prefill never slices for a cache whose layers are all recurrent (``all(cache.is_linear)``:
    such a cache had no length there), so an assistant model of recurrent layers only, called again with its
    cache by assisted decoding, would re-read its whole context. 5.25 slices by ``get_seq_length()`` for every
    cache; our cache knows its length on every version, so we slice the same way (only when the 2D mask, if
    any, covers the whole sequence, as transformers does)."""
    if cache is None or not hasattr(cache, "is_linear") or not all(cache.is_linear):
        return None
    past = cache.get_seq_length()
    if past == 0 or input_ids.shape[1] <= past:
        return None
    if attention_mask is not None and attention_mask.shape[-1] != input_ids.shape[1]:
        return None
    return input_ids.shape[1] - past


def torch_reference(fn: Any) -> Callable[..., Any] | None:
    """The plain torch function behind one of transformers' kernel-dispatching functions
    (``use_kernel_func_from_hub_with_fallback``: fla-core / mamba-ssm / causal-conv1d when installed, a Hub
    kernel when kernelized), or None when ``fn`` is None.

    Up to 5.24 the decorator returns a ``functools.wraps`` wrapper, so ``inspect.unwrap`` reaches the torch
    function. 5.25 (with ``kernels`` >= 0.19, a hard dependency there) returns an ``nn.Module`` instance with
    no ``__name__`` / ``__wrapped__``, whose class's ``forward`` closes over that wrapper as ``func``."""
    if fn is None:
        return None
    if isinstance(fn, torch.nn.Module):
        inner = inspect.getclosurevars(type(fn).forward).nonlocals.get("func")
        if inner is None:
            raise TypeError(
                f"{type(fn).__qualname__}: a kernel-dispatching module whose torch function cannot be found "
                f"(its forward closes over no 'func'); this kernels / transformers release is not supported"
            )
        fn = inner
    return inspect.unwrap(fn)


@functools.cache
def nemotron_h_dt_clamp() -> str:
    """Which config field transformers' ``nemotron_h`` Mamba-2 mixer clamps Δ with: ``"time_step_limit"``
    (5.25: ``(lo, hi)``, default (0, ∞)) or ``"time_step_min"`` (5.23 / 5.24: ``(time_step_min, ∞)``).

    Read from a one-layer mixer built with a distinct ``time_step_min``, not from the version."""
    from transformers.models.nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = NemotronHConfig(
        hidden_size=8,
        mamba_num_heads=2,
        mamba_head_dim=4,
        ssm_state_size=2,
        n_groups=1,
        time_step_min=0.25,
        time_step_limit=(0.0, float("inf")),
    )
    limit = tuple(NemotronHMamba2Mixer(config, layer_idx=0).time_step_limit)
    return "time_step_min" if limit[0] == 0.25 else "time_step_limit"


__all__ = [
    "nemotron_h_dt_clamp",
    "torch_reference",
    "new_tokens_for_generation",
    "drafting_tokens",
    "CACHE_NAME",
    "OTHER_CACHE_NAME",
    "build_mask",
    "output_dataclass",
    "output_cache",
    "resolve_cache",
]
