"""Which native transformers families hf_hybrid converts, and in which file of ``convert/native/`` each is
defined. A leaf module: ``import_dense`` reads it to send a native family to the right importer without
importing the native package (whose family files import ``import_dense``'s config mapping).
"""

from __future__ import annotations

# model_type -> module (in hf_hybrid/convert/native/) whose FAMILIES dict defines it.
FAMILY_MODULES: dict[str, str] = {
    "qwen3_moe": "moe_attention",
    "mixtral": "moe_attention",
    "olmoe": "moe_attention",
    "minimax_m2": "moe_attention",
    "deepseek_v3": "deepseek",
    "deepseek_v32": "deepseek",
    "glm_moe_dsa": "deepseek",
    "hy_v4": "hy_v4",
    "axk2": "axk2",
    # dense attention families (import_dense is `hf-hybrid import`'s route for them; these specs add export)
    "llama": "dense",
    "mistral": "dense",
    "qwen2": "dense",
    "qwen3": "dense",
    "qwen3_next": "qwen3_next",
    "olmo_hybrid": "olmo_hybrid",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
    "bamba": "bamba",
    "minimax": "minimax",
    "granitemoehybrid": "granitemoehybrid",
    "nemotron_h": "nemotron_h",
    "kimi_linear": "kimi_linear",
    "minicpm5_moe": "minicpm5_moe",  # transformers >= 5.25
    "ergo": "ergo",  # transformers >= 5.25
    "mistral_large4_text": "mistral_large4",  # the text decoder of mistral_large4 (vision-language)
    "glm5_next_text": "glm5_next",  # the text decoder of glm5_next (vision-language)
    "hy_v4_vl_text": "hy_v4_vl",  # the text decoder of hy_v4_vl (vision-language)
}


# Vision-language wrappers whose text decoder is a family here: wrapper model_type -> the decoder's
# model_type. The import reads the wrapper's text_config and its decoder weights (transformers' key mapping
# strips ``model.language_model.``); the vision tower (``model.visual.*`` / ``model.vision_tower.*``) and the
# MTP head (``mtp.*``) are dropped.
TEXT_DECODER_OF: dict[str, str] = {
    "qwen3_5": "qwen3_5_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "mistral_large4": "mistral_large4_text",
    "glm5_next": "glm5_next_text",
    "hy_v4_vl": "hy_v4_vl_text",
}

__all__ = ["FAMILY_MODULES", "TEXT_DECODER_OF"]
