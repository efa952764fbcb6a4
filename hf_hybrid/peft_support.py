"""Default LoRA targets for ``model_type="hf_hybrid"``, registered with PEFT when ``hf_hybrid`` is imported.

PEFT picks ``target_modules`` from a per-model-type table (``peft.utils.constants.
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read by ``LoraModel._prepare_adapter_config``) when a
``LoraConfig`` names none; with our entry there, ``LoraConfig(task_type="CAUSAL_LM")`` adapts every projection
of attention, MLA, the linear mixers and the dense / shared-expert MLPs. PEFT matches names by suffix and only
the names present in a given model (a pure-attention model has no ``in_proj``). Fused MoE experts are
parameters, not modules: adapt them with ``LoraConfig(target_parameters=["experts.gate_up_proj",
"experts.down_proj"])``.
"""

from __future__ import annotations

LORA_TARGET_MODULES: tuple[str, ...] = (
    # softmax attention (and the projections linear attention shares with it)
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    # MLA (q_proj above when q_lora_rank is None)
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    # linear mixers: Gated DeltaNet, Mamba-2
    "in_proj",
    "in_proj_qkvz",
    "in_proj_ba",
    "out_proj",
    "output_gate",  # lightning attention's sigmoid output gate (MiniMax)
    # dense MLPs and shared experts
    "gate_proj",
    "up_proj",
    "down_proj",
)

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
    targets = list(LORA_TARGET_MODULES)
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


register_peft_defaults()

__all__ = ["LORA_TARGET_MODULES", "register_peft_defaults"]
