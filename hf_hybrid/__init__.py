"""hf-hybrid: hybrid decoder LLMs (attention, MLA, DSA, linear attention, Mamba-2, Gated DeltaNet; dense or
MoE MLPs) for the Hugging Face ecosystem. Importing this package registers the model family with the Auto
classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache import HybridCache
from .configuration_hybrid import HybridConfig, install_auto_config_trust
from .modeling_hybrid import (
    HybridCausalLMOutput,
    HybridForCausalLM,
    HybridForSequenceClassification,
    HybridModel,
    HybridPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("hf_hybrid", HybridConfig, exist_ok=True)
install_auto_config_trust()  # trust_remote_code=True reaches HybridConfig through the Auto classes
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridConfig, HybridForSequenceClassification, exist_ok=True)
from . import peft_support as _peft_support  # noqa: E402,F401  (default LoRA targets for PEFT)
from .trainer_patch import install as _install_trainer_patch  # noqa: E402

_install_trainer_patch()  # Trainer keeps our card and scales attached aux terms like its loss

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridModel",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridPreTrainedModel",
    "HybridCausalLMOutput",
]
