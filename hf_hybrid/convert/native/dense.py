"""Dense attention families: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` — as specs of the framework, so an
hf_hybrid model with full / sliding attention and dense MLPs exports back to them.

The import direction reuses ``import_dense``'s config mapping (its refusals included); ``hf-hybrid import``
keeps using ``import_dense`` for these types (it reads the safetensors without building the native model).
Weights: ``self_attn.*`` → ``mixer.*``, everything else keeps its name.
"""

from __future__ import annotations

import dataclasses

from ..import_dense import _config_kwargs
from .base import Custom, NativeFamily
from .moe_attention import ATTENTION_RULES, DENSE_RULES, MODEL_RULES, NORM_RULES


def _to_ours(model_type: str):
    def fn(native) -> dict:
        return _config_kwargs(f"{model_type} config", model_type, native, native.to_dict())

    return fn


def _to_native(model_type: str):
    def fn(o) -> dict:
        kw = dict(
            vocab_size=o.vocab_size,
            hidden_size=o.hidden_size,
            intermediate_size=o.intermediate_size,
            num_hidden_layers=o.num_hidden_layers,
            num_attention_heads=o.num_attention_heads,
            num_key_value_heads=o.num_key_value_heads,
            head_dim=o.head_dim,
            hidden_act=o.hidden_act,
            max_position_embeddings=o.max_position_embeddings,
            rms_norm_eps=o.rms_norm_eps,
            tie_word_embeddings=o.tie_word_embeddings,
            rope_parameters=o.rope_parameters,
            bos_token_id=o.bos_token_id,
            eos_token_id=o.eos_token_id,
            pad_token_id=o.pad_token_id,
        )
        sliding = [m == "sliding_attention" for m in o.mixer_types]
        if model_type == "llama":
            kw.update(mlp_bias=o.mlp_bias)
        elif model_type == "mistral":
            kw.update(sliding_window=o.sliding_window if any(sliding) else None)
        else:  # qwen2, qwen3: per-layer sliding through layer_types
            kw.update(
                use_sliding_window=any(sliding),
                sliding_window=o.sliding_window if any(sliding) else None,
                layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
            )
        return kw

    return fn


def _dense_family(model_type: str, tiny: dict) -> NativeFamily:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    options = tuple(f.name for f in dataclasses.fields(CONFIG_MAPPING[model_type]))
    return NativeFamily(
        model_type=model_type,
        config_rules=[Custom(options, _to_ours(model_type), _to_native(model_type))],
        model_rules=MODEL_RULES,
        layer_rules=NORM_RULES,
        mixer_rules={"attention": ATTENTION_RULES, "sliding_attention": ATTENTION_RULES},
        mlp_rules={"dense": DENSE_RULES},
        tiny_config=tiny,
    )


_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

FAMILIES = {
    "llama": _dense_family("llama", dict(_TINY)),
    "mistral": _dense_family("mistral", dict(_TINY, sliding_window=5)),
    "qwen2": _dense_family("qwen2", dict(_TINY, tie_word_embeddings=True)),
    "qwen3": _dense_family(
        "qwen3", dict(_TINY, head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    ),
}
