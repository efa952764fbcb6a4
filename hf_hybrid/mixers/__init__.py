"""Token mixers, one type per file; importing this package registers them in ``MIXER_REGISTRY``. It also
exports what a mixer receives (``MixerContext``) and the decode-state interface of recurrent kinds
(``read_state``, ``write_state``, ``zero_padding``, ``short_conv``, ``RecurrentState``; see
CONTRIBUTING.md)."""

import importlib

from .base import MIXER_REGISTRY, BatchInfo, LayerOutputs, MixerContext, register_mixer
from .recurrent import RecurrentState, read_state, short_conv, write_state, zero_padding

# Each entry is one file; a mixer under construction that fails to import must not break the others.
_MIXER_MODULES = ("attention", "mla", "dsa", "linear_attention", "mamba2", "gated_deltanet", "none", "kda")
for _name in _MIXER_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:  # file not written yet
        if _err.name != f"{__name__}.{_name}":
            raise

__all__ = [
    "MIXER_REGISTRY",
    "BatchInfo",
    "LayerOutputs",
    "MixerContext",
    "RecurrentState",
    "read_state",
    "register_mixer",
    "short_conv",
    "write_state",
    "zero_padding",
]
