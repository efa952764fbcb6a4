"""Default LoRA targets for ``model_type="hf_hybrid"``, registered with PEFT when ``hf_hybrid`` is imported.

PEFT picks ``target_modules`` from a per-model-type table (``peft.utils.constants.
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read by ``LoraModel._prepare_adapter_config``) when a
``LoraConfig`` names none; with our entry there, ``LoraConfig(task_type="CAUSAL_LM")`` adapts the projections
each layer kind names in its spec (``lora_targets``: attention, MLA, the linear mixers, the dense /
shared-expert MLPs, and any kind registered later). PEFT matches names by suffix and only
the names present in a given model (a pure-attention model has no ``in_proj``). Fused MoE experts are
parameters, not modules: adapt them with ``LoraConfig(target_parameters=["experts.gate_up_proj",
"experts.down_proj"])``.
"""

from __future__ import annotations

from . import specs
from .registry import mixer_specs


def lora_targets() -> list[str]:
    """The default LoRA targets: every registered kind's ``lora_targets`` (its spec's hook), each once."""
    kinds = (*specs._MIXERS.values(), *specs._MLPS.values())
    return list(dict.fromkeys(t for spec in kinds for t in spec.lora_targets))


# The list PEFT's tables hold for our model type: refreshed in place whenever a kind registers, so an outside
# kind's targets join the default.
_TARGETS: list[str] = []


def _refresh() -> None:
    _TARGETS[:] = lora_targets()


# The mapping tables PEFT keeps per method; those that start as copies of LoRA's get the same default.
_MAPPINGS = (
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
)


def register_peft_defaults(model_type: str = "hf_hybrid") -> bool:
    """Put our default targets in PEFT's tables (no-op without peft). Returns whether peft was found."""
    try:
        from peft.utils import constants
    except ImportError:
        return False
    targets = _TARGETS
    for name in _MAPPINGS:
        mapping = getattr(constants, name, None)
        if isinstance(mapping, dict):
            mapping.setdefault(model_type, targets)
    # Methods whose table is a copy of LoRA's (DoRA-like variants, LoHa, LoKr, OFT, ...): same targets.
    for name in dir(constants):
        mapping = getattr(constants, name)
        if name.endswith("_TARGET_MODULES_MAPPING") and isinstance(mapping, dict) and "llama" in mapping:
            if mapping.get("llama") == constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
                "llama"
            ):
                mapping.setdefault(model_type, targets)
    return True


mixer_specs()  # the built-in kinds, registered now (their targets are the default)
specs.on_register(_refresh)
register_peft_defaults()
# The built-in kinds' targets (the default of a model without outside kinds).
LORA_TARGET_MODULES: tuple[str, ...] = tuple(_TARGETS)

__all__ = ["LORA_TARGET_MODULES", "lora_targets", "register_peft_defaults"]
