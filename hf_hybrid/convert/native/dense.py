"""Dense attention families: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` — as specs of the framework, so an
hf_hybrid model with full / sliding attention and dense MLPs exports back to them.

The config mapping (``dense_config_kwargs``, with its refusals) and the weight tables here are the one path
for these types: ``hf-hybrid import`` uses ``import_dense``, which reads the safetensors without building the
native model but maps the config and names the weights (``NativeFamily.name_map``) by this file.
Weights: ``self_attn.*`` → ``mixer.*``, everything else keeps its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..checkpoint import fail as _fail
from .base import Custom, NativeFamily
from .moe_attention import ATTENTION_RULES, DENSE_RULES, MODEL_RULES, NORM_RULES

# model_type -> (class transformers saves it as, q/k/v bias, per-head q/k RMSNorm)
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# RoPE variants that change their frequencies with the sequence length at run time: hf_hybrid computes RoPE
# frequencies once per rotary size, so these would silently diverge past the original context.
_DYNAMIC_ROPE = {"dynamic", "longrope"}


def _mixer_types(model_type: str, cfg) -> tuple[list[str], int | None]:
    """Per-layer attention kind, following each transformers model's own rule for sliding windows."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if model_type == "mistral":
        # MistralAttention applies config.sliding_window to every layer when it is set (layer_types is
        # ignored).
        kinds = ["sliding_attention" if window else "attention"] * n
    elif model_type in ("qwen2", "qwen3"):
        # Qwen2/3 resolve use_sliding_window / max_window_layers into layer_types; a layer slides only when
        # its type says so *and* a window is set (sliding_window is None when use_sliding_window is false).
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        kinds = [
            "sliding_attention" if t == "sliding_attention" and window else "attention" for t in layer_types
        ]
    else:
        kinds = ["attention"] * n
    return kinds, (window if "sliding_attention" in kinds else None)


def dense_config_kwargs(src, model_type: str, cfg, raw: dict[str, Any]) -> dict[str, Any]:
    """``HybridConfig`` keyword arguments for the dense transformers config ``cfg`` of ``model_type`` (read
    from ``src``, named in errors); refuses what hf_hybrid cannot compute exactly."""
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        _fail(
            f"{src}: pretraining_tp={cfg.pretraining_tp} is not "
            "supported (transformers' legacy tensor-parallel path)"
        )
    if model_type in ("llama", "qwen3") and getattr(cfg, "attention_bias", False):
        _fail(
            f"{src}: attention_bias=True puts a bias on o_proj as well as q/k/v in "
            f"{SUPPORTED[model_type]}; hf_hybrid's attention has biases on q/k/v only (Qwen2 style)"
        )
    act = cfg.hidden_act
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        _fail(
            f"{src}: hidden_act={act!r} is not supported; hf_hybrid "
            "MLPs take silu, gelu, gelu_pytorch_tanh, relu"
        )
    rope = dict(cfg.rope_parameters or {})
    if rope.get("rope_type", "default") in _DYNAMIC_ROPE:
        _fail(
            f"{src}: rope_type={rope['rope_type']!r} changes RoPE frequencies with the "
            "sequence length at run time, which hf_hybrid does not do (it would silently "
            "diverge on long inputs); supported: default, linear, yarn, llama3, proportional"
        )
    mixer_types, window = _mixer_types(model_type, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=head_dim,
        hidden_act=act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        rope_parameters=rope or None,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attention_dropout=getattr(cfg, "attention_dropout", 0.0),
        attention_bias=model_type == "qwen2",  # Qwen2: q/k/v biases, none on o_proj
        use_qk_norm=model_type == "qwen3",
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        sliding_window=window,
        mixer_types=mixer_types,
        mlp_types=["dense"] * cfg.num_hidden_layers,
        use_cache=bool(getattr(cfg, "use_cache", True)),
    )
    return kwargs


def _to_ours(model_type: str):
    def fn(native) -> dict:
        return dense_config_kwargs(f"{model_type} config", model_type, native, native.to_dict())

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
