"""The hf_hybrid decoder: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` per layer, each chosen in the config.

Mixers live in ``hf_hybrid/mixers`` (one file per type, ``MIXER_REGISTRY``), MLPs in ``mlp.py`` / ``moe.py``
(``MLP_REGISTRY``). This file only wires them: masks, packing, positions, RoPE, cache and the loss rule
(DESIGN.md §6b: ``loss`` = LM loss + Σ coef × auxiliary term in training mode only; each term has its own field).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from . import compat
from . import mixers as _mixers  # noqa: F401  (registers the mixer types)
from . import mlp as _mlp
from . import moe as _moe  # noqa: F401  (registers the "moe" MLP type)
from .cache import HybridCache
from .configuration_hybrid import RECURRENT_MIXERS, HybridConfig
from .layers import RMSNorm, rope_inv_freq
from .mixers.base import MIXER_REGISTRY, MixerContext
from .ops.varlen import cu_seqlens_from_position_ids

logger = logging.get_logger(__name__)

# Auxiliary terms a layer may record (ctx.add_aux) -> the config field holding its coefficient.
AUX_LOSS_COEFFICIENTS = {
    "router_aux_loss": "router_aux_loss_coef",
    "router_z_loss": "router_z_loss_coef",
    "router_seq_aux_loss": "router_seq_aux_loss_coef",
    "indexer_loss": "index_loss_coef",
}


@compat.output_dataclass
class HybridModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    cache: Any = None  # named as the installed transformers names it (compat.CACHE_NAME); the other name reads too
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None  # kept for transformers' generic heads; not recorded
    aux_terms: dict[str, torch.Tensor] | None = None
    layer_stats: dict[str, Any] | None = None


@compat.output_dataclass
class HybridCausalLMOutput(ModelOutput):
    """``loss`` follows the loss rule; ``lm_loss`` is always the LM loss alone; each auxiliary term (mean over the
    layers that produced it, before its coefficient) has its own field."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    seq_aux_loss: torch.FloatTensor | None = None
    indexer_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    layer_stats: dict[str, Any] | None = None


_AUX_OUTPUT_FIELDS = {
    "router_aux_loss": "aux_loss",
    "router_z_loss": "z_loss",
    "router_seq_aux_loss": "seq_aux_loss",
    "indexer_loss": "indexer_loss",
}


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.mixer_types[layer_idx]
        self.mlp_type = config.mlp_types[layer_idx]
        if self.mixer_type == "none":  # an MLP-only layer
            self.input_layernorm = self.mixer = None
        else:
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mixer = MIXER_REGISTRY[self.mixer_type](config, layer_idx)
        self.residual_from_norm = config.residual_from_norm
        self.mixer_scales = (
            float((config.mixer_residual_scales or [1.0] * config.num_hidden_layers)[layer_idx]),
            float((config.mixer_output_scales or [1.0] * config.num_hidden_layers)[layer_idx]),
        )
        self.mlp_scales = (float(config.mlp_residual_scale), float(config.mlp_output_scale))
        if self.mlp_type == "none":
            self.post_attention_layernorm = None
            self.mlp = None
        else:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = _mlp.MLP_REGISTRY[self.mlp_type](config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        if self.mixer is not None:
            normed = self.input_layernorm(hidden_states)
            hidden_states = self._residual(
                normed if self.residual_from_norm else hidden_states, self.mixer(normed, ctx), *self.mixer_scales
            )
        if self.mlp is not None:
            normed = self.post_attention_layernorm(hidden_states)
            hidden_states = self._residual(
                normed if self.residual_from_norm else hidden_states, self.mlp(normed, ctx), *self.mlp_scales
            )
        return hidden_states

    @staticmethod
    def _residual(residual: torch.Tensor, out: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """``α·residual + β·out`` (scales of 1 skipped: the default block is exactly ``residual + out``)."""
        if alpha != 1.0:
            residual = residual * alpha
        if beta != 1.0:
            out = out * beta
        return residual + out


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    # Attention and experts live in other files than this one, so transformers' source-text heuristic
    # (DESIGN.md §2) cannot see that we use its interfaces: state it. tests/test_core.py checks that switching works.
    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            # The short causal convs of the recurrent mixers keep PyTorch's (and Mamba's) default, Kaiming-uniform
            # with fan-in = kernel size: a 4-tap filter at std 0.02 would start as nearly zero.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
                init.uniform_(module.bias, -bound, bound)
        elif "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            init.ones_(module.weight)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                init.zeros_(module.bias)
        # Mixers / MLPs with special parameters (decays, dt biases, fused experts, router biases) own their init.
        if hasattr(module, "init_hybrid_weights"):
            module.init_hybrid_weights(init, self.config)

    # ---- strict loading and atomic saving ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, but missing, unexpected or mismatched weights raise (transformers
        would warn and initialise them randomly: a silently wrong model). Pass ``strict=False`` to opt out."""
        strict = kwargs.pop("strict", True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            problems = []
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
                values = sorted(str(v) for v in (info.get(key) or []))
                if values:
                    shown = ", ".join(values[:8]) + (" ..." if len(values) > 8 else "")
                    problems.append(f"{key} ({len(values)}): {shown}")
            if problems:
                source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                raise ValueError(
                    f"{cls.__name__}.from_pretrained({source!r}): the checkpoint does not match the model — "
                    + "; ".join(problems)
                    + ". Refusing to initialise weights randomly (pass strict=False to load anyway)."
                )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Write to a temporary sibling directory first, then move files into place, so an interrupted save never
        leaves a half-written checkpoint. Also writes a model card when the directory has none yet."""
        save_directory = os.fspath(save_directory)
        if kwargs.pop("push_to_hub", False):
            # transformers' own path would overwrite README.md (ours or the user's) with the Hub's or a generic card:
            # save here as usual, then push through push_to_hub below.
            hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
            repo_id = hub.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.save_pretrained(save_directory, *args, **kwargs)
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)
            return None
        parent = os.path.dirname(os.path.abspath(save_directory)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-hf-hybrid-", dir=parent)
        try:
            super().save_pretrained(tmp, *args, **kwargs)
            self._write_card_if_missing(tmp, save_directory)
            if not os.path.exists(save_directory):
                os.replace(tmp, save_directory)
                return
            new_names = set(os.listdir(tmp))
            # Weight files of an earlier save under other shard names would be loaded alongside the new ones.
            for name in os.listdir(save_directory):
                if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
                    if name not in new_names:
                        os.remove(os.path.join(save_directory, name))
            for name in new_names:
                dst = os.path.join(save_directory, name)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(tmp, name), dst)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def push_to_hub(self, repo_id: str, **kwargs):
        """``PreTrainedModel.push_to_hub``, except that the uploaded README.md is our model card when the Hub repo has
        none yet (transformers would upload a generic one); a card already on the Hub is kept."""
        from .card import push_to_hub_with_card

        return push_to_hub_with_card(self, repo_id, **kwargs)

    def _write_card_if_missing(self, tmp_dir: str, final_dir: str) -> None:
        if os.path.exists(os.path.join(final_dir, "README.md")):
            return  # never clobber a user's card
        try:
            from .card import write_model_card
        except ImportError:
            return
        write_model_card(self.config, tmp_dir)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._inv_freq: dict[tuple[int, str], tuple[torch.Tensor, float]] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rope_fn(self, position_ids: torch.Tensor, dtype: torch.dtype):
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def rope(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            if dim not in cache:
                key = (dim, str(position_ids.device))
                if key not in self._inv_freq:
                    inv_freq, scale = rope_inv_freq(self.config, dim, device=position_ids.device)
                    self._inv_freq[key] = (inv_freq.float(), float(scale))
                inv_freq, scale = self._inv_freq[key]
                freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2), fp32 for long contexts
                emb = torch.cat([freqs, freqs], dim=-1)
                cache[dim] = ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype))
            return cache[dim]

        return rope

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs,
    ) -> HybridModelOutput:
        """``cache=`` and ``past_key_values=`` are the same argument (transformers 5.24 renamed it); give either."""
        config = self.config
        past_key_values = compat.resolve_cache(cache, past_key_values, where="HybridModel.forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HybridModel.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if config.embedding_multiplier != 1.0:
            inputs_embeds = inputs_embeds * config.embedding_multiplier
        batch, seq_len = inputs_embeds.shape[:2]
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cu_seqlens, max_seqlen = None, None
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            cu_seqlens, max_seqlen = _packed_boundaries(position_ids, attention_mask, kwargs)
        if cu_seqlens is not None:
            # Several documents in one row: each starts fresh, and a packed row cannot be continued by decoding.
            if past_key_values is not None and use_cache:
                raise ValueError(
                    "packed sequences (position_ids restarting inside a row, or cu_seq_lens_q) cannot be used with a "
                    "cache; pass use_cache=False"
                )
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(config=config)
        if not use_cache:
            past_key_values = None
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        if isinstance(attention_mask, dict):
            raise ValueError(
                "HybridModel.forward takes a 2D attention_mask [batch, past + new tokens] (or a 4D mask); "
                "it builds the per-layer masks itself"
            )
        if attention_mask is not None and attention_mask.ndim == 2:
            if attention_mask.shape != (batch, past_length + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new tokens) = "
                    f"({batch}, {past_length + seq_len})"
                )
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Left padding: positions count real tokens only, so a padded prompt matches the prompt alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)

        attn_kwargs = {k: kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
                       if k in kwargs}

        mixer_set = set(config.mixer_types)
        masks: dict[str, Any] = {}
        mask_kwargs = dict(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=past_key_values
        )
        if mixer_set & {"attention", "mla", "dsa"}:
            masks["full_attention"] = compat.build_mask(create_causal_mask, position_ids=position_ids, **mask_kwargs)
        if "sliding_attention" in mixer_set:
            masks["sliding_attention"] = compat.build_mask(
                create_sliding_window_causal_mask, position_ids=position_ids, **mask_kwargs
            )
        padding_mask = None
        if mixer_set & set(RECURRENT_MIXERS) or "dsa" in mixer_set or "moe" in config.mlp_types:
            padding_mask = compat.build_mask(create_recurrent_attention_mask, **mask_kwargs)
            if padding_mask is not None:
                padding_mask = padding_mask.bool()

        ctx = MixerContext(
            padding_mask=padding_mask,
            attention_mask_2d=attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None,
            masks=masks,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            rope=self._rope_fn(position_ids, inputs_embeds.dtype),
            cache=past_key_values,
            past_length=past_length,
            attn_kwargs=attn_kwargs,
        )
        if input_ids is not None:
            ctx.stats["input_ids"] = input_ids

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, ctx)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        if isinstance(past_key_values, HybridCache):
            past_key_values.advance(seq_len)

        aux_terms = {name: torch.stack(values).mean() for name, values in ctx.aux.items() if values}
        stats = {k: v for k, v in ctx.stats.items() if k != "input_ids"}
        return HybridModelOutput(
            last_hidden_state=hidden_states,
            cache=past_key_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_terms=aux_terms,
            layer_stats=stats,
        )


def _packed_boundaries(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor | None, int | None]:
    """Document boundaries of a packed row ([N + 1] int32) or None.

    Sources, in order: ``cu_seq_lens_q`` from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``;
    position ids that restart inside a single row (``DataCollatorWithFlattening`` default, or hand-made)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = cu.to(dtype=torch.int32)
        return cu, int((cu[1:] - cu[:-1]).max())
    if position_ids is None or position_ids.shape[0] != 1 or attention_mask is not None or position_ids.shape[1] < 2:
        return None, None
    if torch.compiler.is_compiling():
        return None, None
    cu = cu_seqlens_from_position_ids(position_ids)
    if cu.numel() == 2:  # one document: not packed
        return None, None
    return cu, int((cu[1:] - cu[:-1]).max())


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers refuses assisted generation for stateful models with its own clear message.
        self._is_stateful = config.has_recurrent_layers
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(compat.CACHE_NAME)
        if type(cache).__name__ == "DynamicCache" and not getattr(cache, "_is_user_defined", False):
            model_kwargs[compat.CACHE_NAME] = HybridCache(config=self.config)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """``generate`` pre-builds per-layer-type masks for compileable caches; our model builds its own masks (and
        the padding mask of the recurrent layers) from the 2D mask, so hand that through unchanged."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs,
    ) -> HybridCausalLMOutput:
        past_key_values = compat.resolve_cache(cache, past_key_values, where="HybridForCausalLM.forward")
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in loss_kwargs}
        model_kwargs.pop("output_attentions", None)
        output_router_logits = model_kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_logits: list[torch.Tensor] = []
        hooks = []
        if output_router_logits:
            # Record each router's fp32 logits [tokens, E] in layer order (the aux losses do not need this).
            for module in self.modules():
                if isinstance(module, _moe.HybridTopKRouter):
                    hooks.append(module.register_forward_hook(lambda _m, _i, out: router_logits.append(out[0])))
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                **model_kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling

        lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
        aux = out.aux_terms or {}
        loss = lm_loss
        if self.training and (lm_loss is not None or aux):
            if self.config.dsa_mode == "dense_warmup" and "indexer_loss" in aux:
                # DeepSeek's dense warm-up trains the indexer alone on its KL (DESIGN.md §5).
                loss = aux["indexer_loss"]
            elif lm_loss is not None:
                for name, value in aux.items():
                    coef = getattr(self.config, AUX_LOSS_COEFFICIENTS.get(name, ""), 0.0) or 0.0
                    if coef > 0:
                        loss = loss + coef * value.to(loss.device)

        fields = {_AUX_OUTPUT_FIELDS[k]: v for k, v in aux.items() if k in _AUX_OUTPUT_FIELDS}
        return HybridCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            lm_loss=lm_loss,
            router_logits=tuple(router_logits) if output_router_logits else None,
            layer_stats=out.layer_stats,
            **fields,
        )


class HybridForSequenceClassification(GenericForSequenceClassification, HybridPreTrainedModel):
    def forward(self, *args, cache: Any = None, past_key_values: Any = None, **kwargs):
        """transformers' generic head, taking the cache under either name on every supported version."""
        cache = compat.resolve_cache(cache, past_key_values, where="HybridForSequenceClassification.forward")
        if cache is not None:
            kwargs[compat.CACHE_NAME] = cache
        return super().forward(*args, **kwargs)


__all__ = [
    "HybridPreTrainedModel",
    "HybridModel",
    "HybridForCausalLM",
    "HybridForSequenceClassification",
    "HybridCausalLMOutput",
    "HybridModelOutput",
]
