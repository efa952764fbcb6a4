"""The hf_hybrid decoder: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` per layer, each chosen in the
config.

Mixers live in ``hf_hybrid/mixers`` (one file per type), MLPs in ``mlp.py`` / ``moe.py``; each kind's spec
(class, transformers layer type, mask, cost) is in ``hf_hybrid.registry``. This file only wires them: masks,
packing, positions, RoPE, cache and the loss rule (``hf_hybrid.aux_loss``: ``loss`` = LM loss +
Σ coefficient × auxiliary term in training mode only; each term has its own field). Saving and loading
(strict, atomic, with a model card) live in ``hf_hybrid.saving``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
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
from .aux_loss import attach_aux_loss
from .cache import HybridCache
from .configuration_hybrid import HybridConfig
from .hyper_connections import FP32_MODULE_NAMES, HyperConnection, HyperHead
from .layers import LowRankGatedRMSNorm, ResidualGate, RMSNorm, rope_inv_freq
from .mixers.base import BatchInfo, MixerContext
from .ops.varlen import cu_seqlens_from_position_ids
from .registry import mixer_mask, mixer_spec, mlp_spec
from .saving import HybridSaving

logger = logging.get_logger(__name__)


@compat.output_dataclass
class HybridModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    # named as the installed transformers names it (compat.CACHE_NAME); the other name reads too
    cache: Any = None
    # output_hidden_states=True: each layer's input, then the final normed output; with hyper-connections a
    # layer's input is the residual streams [B, T, hc_mult, H]
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    # output_attentions=True: per layer, the attention probabilities [B, h, T, S] (eager), None for a layer
    # without any (recurrent mixers, sparse DSA)
    attentions: tuple[torch.FloatTensor | None, ...] | None = None
    # Per-layer terms averaged over the layers that produced them, before their coefficients. With their
    # graph when the caller asked for them unattached (attach_aux_loss=False: it adds them to its loss);
    # otherwise detached values, their gradients attached to the layers' outputs (hf_hybrid/aux_loss.py).
    aux_terms: dict[str, torch.Tensor] | None = None
    layer_stats: dict[str, Any] | None = None
    # output_router_logits=True: each MoE layer's fp32 router logits [B·T, E], in layer order; None without
    # MoE layers. Detached when the balance terms are attached (a loss built from them would count twice).
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    # output_mixer_io=[i, ...]: layer -> (mixer input [B, T, H] (after the input norm), the forward's
    # MixerContext, mixer output [B, T, H]), so a student mixer can run on exactly what the layer's mixer saw
    # (hf_hybrid.distill); with use_cache the context's cache has moved on since (run with use_cache=False to
    # replay a mixer)
    mixer_io: dict[int, tuple[torch.Tensor, Any, torch.Tensor]] | None = None


@compat.output_dataclass
class HybridCausalLMOutput(ModelOutput):
    """``loss`` follows the loss rule; ``lm_loss`` is always the LM loss alone; each auxiliary term (mean over
    the layers that produced it, before its coefficient) has its own field (``aux_terms`` holds them all, an
    outside kind's included). The terms carry their graph when they are in ``loss`` (``labels`` given), and
    are detached values when their gradients are attached (no ``labels``; ``hf_hybrid.aux_loss``)."""

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
    attentions: tuple[torch.FloatTensor | None, ...] | None = None
    aux_terms: dict[str, torch.Tensor] | None = None


# The built-in terms' own output fields (transformers' MoE families name the Switch term ``aux_loss``).
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
        mixer_cls = mixer_spec(self.mixer_type).cls
        # "post" (OLMo 2 / 3): each branch's norm is on its output, x + norm(f(x)), and has its own name;
        # "sandwich" (Ergo): both, x + norm'(f(norm(x))), the low-rank gate (gated_norms) on the input one
        placement = (config.norm_placement or ["pre"] * config.num_hidden_layers)[layer_idx]
        self.post_norm = placement == "post"
        sandwich = placement == "sandwich"
        gated = (config.gated_norms or ["none"] * config.num_hidden_layers)[layer_idx]

        def make_norm(branch: str) -> nn.Module:
            if gated in (branch, "both"):
                return LowRankGatedRMSNorm(
                    config.hidden_size, config.gated_norm_rank, eps=config.rms_norm_eps
                )
            return RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        if mixer_cls is None:  # an MLP-only layer (no token mixer, no input norm)
            self.input_layernorm = self.mixer = None
        else:
            norm = make_norm("mixer")
            if self.post_norm:
                self.input_layernorm, self.post_mixer_layernorm = None, norm
            else:
                self.input_layernorm = norm
            if sandwich:
                self.post_mixer_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mixer = mixer_cls(config, layer_idx)
        self.residual_from_norm = config.residual_from_norm
        self.mixer_scales = (
            float((config.mixer_residual_scales or [1.0] * config.num_hidden_layers)[layer_idx]),
            float((config.mixer_output_scales or [1.0] * config.num_hidden_layers)[layer_idx]),
        )
        self.mlp_scales = (float(config.mlp_residual_scale), float(config.mlp_output_scale))
        mlp_cls = mlp_spec(self.mlp_type).cls
        if mlp_cls is None:  # a mixer-only layer
            self.post_attention_layernorm = None
            self.mlp = None
        else:
            norm = make_norm("mlp")
            if self.post_norm:
                self.post_attention_layernorm, self.post_mlp_layernorm = None, norm
            else:
                self.post_attention_layernorm = norm
            if sandwich:
                self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = mlp_cls(config, layer_idx)
        # Ergo's residual gates: a learned per-channel mix of branch and stream (residual_gates)
        gates = config.residual_gates
        self.mixer_residual_gate = (
            ResidualGate(config.hidden_size) if gates and self.mixer is not None else None
        )
        self.mlp_residual_gate = ResidualGate(config.hidden_size) if gates and self.mlp is not None else None
        # Hyper-connection residual streams (hf_hybrid.hyper_connections): one per branch the layer has.
        streams = config.hyper_connections != "none"
        self.mixer_hc = HyperConnection(config) if streams and self.mixer is not None else None
        self.mlp_hc = HyperConnection(config) if streams and self.mlp is not None else None

    def mask_name(self, config: HybridConfig) -> str | None:
        """The transformers mask this layer's mixer reads now: the module's own answer when it depends on
        run-time state (``runtime_mask()``, e.g. DSA's mode), else its kind's spec."""
        if self.mixer is None:
            return None
        runtime = getattr(self.mixer, "runtime_mask", None)
        return runtime() if callable(runtime) else mixer_mask(mixer_spec(self.mixer_type), config)

    def aux_coefficients(self) -> dict[str, float]:
        """Auxiliary terms this layer's mixer and MLP record in training now -> the coefficient each enters
        the objective with (their ``aux_terms()``; see ``hf_hybrid.mixers.base``)."""
        out: dict[str, float] = {}
        for module in (self.mixer, self.mlp):
            fn = getattr(module, "aux_terms", None)
            if callable(fn):
                out.update({name: float(coef) for name, coef in fn().items()})
        return out

    def replaces_lm_loss(self) -> bool:
        """True when a module's auxiliary term is the whole objective now (DSA's dense warm-up)."""
        return any(
            callable(getattr(m, "replaces_lm_loss", None)) and m.replaces_lm_loss()
            for m in (self.mixer, self.mlp)
        )

    def returns_attention_weights(self) -> bool:
        """Whether the mixer returns attention probabilities under eager attention now (attention, MLA, dense
        DSA)."""
        fn = getattr(self.mixer, "returns_attention_weights", None)
        return bool(fn()) if callable(fn) else False

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        """``hidden_states`` [B, T, H], or the residual streams [B, T, N, H] with hyper-connections."""
        before = ctx.aux_count()
        if self.mixer is not None:
            streams = hidden_states
            if self.mixer_hc is not None:
                post, comb, hidden_states = self.mixer_hc(streams)
            normed = hidden_states if self.post_norm else self.input_layernorm(hidden_states)
            mixed = self.mixer(normed, ctx)
            if self.layer_idx in ctx.mixer_io_layers:
                ctx.mixer_io[self.layer_idx] = (normed, mixed)
            if getattr(self, "post_mixer_layernorm", None) is not None:
                mixed = self.post_mixer_layernorm(mixed)
            if self.mixer_hc is not None:
                hidden_states = self.mixer_hc.expand(streams, mixed, post, comb)
            elif self.mixer_residual_gate is not None:
                hidden_states = self.mixer_residual_gate(mixed, hidden_states)
            else:
                hidden_states = self._residual(
                    normed if self.residual_from_norm else hidden_states, mixed, *self.mixer_scales
                )
        if self.mlp is not None:
            streams = hidden_states
            if self.mlp_hc is not None:
                post, comb, hidden_states = self.mlp_hc(streams)
            normed = hidden_states if self.post_norm else self.post_attention_layernorm(hidden_states)
            out = self.mlp(normed, ctx)
            if getattr(self, "post_mlp_layernorm", None) is not None:
                out = self.post_mlp_layernorm(out)
            if self.mlp_hc is not None:
                hidden_states = self.mlp_hc.expand(streams, out, post, comb)
            elif self.mlp_residual_gate is not None:
                hidden_states = self.mlp_residual_gate(out, hidden_states)
            else:
                hidden_states = self._residual(
                    normed if self.residual_from_norm else hidden_states, out, *self.mlp_scales
                )
        # When the caller builds no loss with them, this layer's auxiliary terms reach their parameters
        # through its output, whatever loss is built on top (hf_hybrid/aux_loss.py); under reentrant
        # checkpointing this happens when the backward replays the layer.
        attached = None
        for name, values in ctx.aux.items():
            weight = ctx.aux_weights.get(name, 0.0)
            for value in values[before.get(name, 0) :] if weight else ():
                attached = weight * value if attached is None else attached + weight * value
        if attached is not None:
            hidden_states = attach_aux_loss(hidden_states, attached)
        return hidden_states

    @staticmethod
    def _residual(residual: torch.Tensor, out: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """``α·residual + β·out`` (scales of 1 skipped: the default block is exactly ``residual + out``)."""
        if alpha != 1.0:
            residual = residual * alpha
        if beta != 1.0:
            out = out * beta
        return residual + out


class HybridPreTrainedModel(HybridSaving, PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # the hyper-connection modules keep fp32 weights inside a bf16 layer: units of their own, so that FSDP
    # (its transformer wrap policy reads this list; FSDP2 needs one dtype per unit) shards each in one dtype
    _no_split_modules = ["HybridDecoderLayer", "HyperConnection", "HyperHead"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # hyper-connection weights load in fp32 whatever the dtype asked for (hf_hybrid.hyper_connections)
    _keep_in_fp32_modules_strict = list(FP32_MODULE_NAMES)

    # Attention and experts live in other files than this one, so transformers' heuristic (it searches the
    # source text of the module defining the model class for ``ALL_ATTENTION_FUNCTIONS.get_interface(`` and
    # ``@use_experts_implementation``) cannot see that we use its interfaces: state it. tests/test_core.py
    # checks that switching works.
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
            # The short causal convs of the recurrent mixers keep PyTorch's (and Mamba's) default,
            # Kaiming-uniform with fan-in = kernel size: a 4-tap filter at std 0.02 would start as nearly
            # zero.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
                init.uniform_(module.bias, -bound, bound)
        elif "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
            init.ones_(module.weight)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                init.zeros_(module.bias)
        if isinstance(getattr(module, "rope_log_scale", None), torch.Tensor):
            init.zeros_(module.rope_log_scale)  # rope_learned_scale: exp(0) = 1, plain RoPE
        # Mixers / MLPs with special parameters (decays, dt biases, fused experts, router biases) own their
        # init.
        if hasattr(module, "init_hybrid_weights"):
            module.init_hybrid_weights(init, self.config)

    # ---- run-time modes (never written to the config: what is saved is what the user chose) ----------------
    def dsa_mode(self, mode: str | None, *, index_topk: int | None = None, save: bool = False):
        """Run every DSA layer in ``mode`` (``"dense"`` | ``"dense_warmup"`` | ``"sparse"``; None: the
        config's) with ``index_topk`` (None: the config's) from now on, for training stages and evaluation
        sweeps; ``save=True`` records them in the config (what ``save_pretrained`` writes) instead. As a
        context manager the previous state returns on exit::

            model.dsa_mode("dense_warmup")
            with model.dsa_mode("sparse", index_topk=64):
                evaluate(model)

        The mode lives in ``hf_hybrid/mixers/dsa.py``: this is :func:`hf_hybrid.mixers.dsa.set_dsa_mode`.
        """
        from .mixers.dsa import set_dsa_mode

        return set_dsa_mode(self, mode, index_topk=index_topk, save=save)

    # The weight of one micro-batch's auxiliary terms in the step's objective (hf_hybrid/aux_loss.py):
    # run-time state, set per training step by Trainer (hf_hybrid/trainer_patch.py) or once by a custom loop.
    # ``attached``: the factor on attached gradients (no loss of ours to carry the loop's scaling);
    # ``in_loss``: the weight in our head's ``loss`` when it is normalised by ``num_items_in_batch`` (the loop
    # then does not divide it by the accumulation steps).
    _aux_loss_scales: tuple[float, float] = (1.0, 1.0)

    def set_aux_loss_scale(self, value: float, *, in_loss: float | None = None) -> float:
        """Weight each micro-batch's auxiliary terms (router balance / z / sequence terms, DSA indexer KL) by
        ``value`` in the objective: ``1 / accumulation_steps`` when the loop accumulates that many
        micro-batches into one step (the terms are then averaged over them, like the LM loss). It applies to
        the gradients attached when the loop builds its own loss (no ``labels``), and to our head's ``loss``
        when it gets ``num_items_in_batch`` (a loss the loop does not divide); a ``loss`` without it is a
        per-micro-batch mean that the loop divides itself, so its terms keep weight 1. ``in_loss`` overrides
        the second use (``Trainer``: it multiplies such a loss by the world size). With an fp16 ``GradScaler``
        in a custom loop that builds its own loss, multiply ``value`` by ``scaler.get_scale()``. ``Trainer``
        and TRL's trainers set this for each step. Applies to this model and every hf_hybrid model inside it;
        returns the previous ``value``."""
        for name, v in (("value", value), ("in_loss", value if in_loss is None else in_loss)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"set_aux_loss_scale: {name}={v!r} must be a positive number")
        previous = self._aux_loss_scales[0]
        scales = (float(value), float(value if in_loss is None else in_loss))
        for module in self.modules():
            if isinstance(module, HybridPreTrainedModel):
                module._aux_loss_scales = scales
        return previous


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # hyper-connections: collapses the residual streams before the final norm
        self.hc_head = HyperHead(config) if config.hyper_connections != "none" else None
        self.gradient_checkpointing = False
        self._inv_freq: dict[tuple[int, str], tuple[torch.Tensor, float]] = {}
        # rope_learned_scale (Mistral-Large-4's LeRoPE): inv_freq · exp(rope_log_scale) for the one rotary
        # dimension every layer uses
        self.rope_scale_dim = next(iter(config.rope_dims())) if config.rope_learned_scale else None
        self.rope_log_scale = (
            nn.Parameter(torch.zeros(self.rope_scale_dim // 2)) if config.rope_learned_scale else None
        )
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
                if dim == self.rope_scale_dim:  # rope_learned_scale: learned, so recomputed every forward
                    inv_freq = inv_freq * self.rope_log_scale.float().exp()
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
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        *,
        attach_aux_loss: bool = True,
        output_mixer_io: list[int] | tuple[int, ...] | None = None,
        **kwargs,
    ) -> HybridModelOutput:
        """``cache=`` and ``past_key_values=`` are the same argument (transformers 5.24 renamed it); give
        either.

        Auxiliary terms (training mode) are attached to the layers' outputs (``hf_hybrid/aux_loss.py``), so
        any loss built on ``last_hidden_state`` (TRL's fused LM head, a custom loop's) trains the routers and
        indexers; ``aux_terms`` and ``router_logits`` are then detached values. ``attach_aux_loss=False``:
        nothing is attached and ``aux_terms`` carry their graph, for a caller that adds
        ``Σ coefficient · term`` to its loss itself (our causal-LM head with ``labels``).

        ``output_mixer_io=[i, ...]``: also return, for those layers, what their token mixer saw and produced
        (``HybridModelOutput.mixer_io``)."""
        config = self.config
        _check_extra_kwargs(kwargs)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        if output_attentions is None:
            output_attentions = config.output_attentions
        if output_router_logits is None:
            output_router_logits = getattr(config, "output_router_logits", False)  # hidden without MoE layers
        past_key_values = compat.resolve_cache(cache, past_key_values, where="HybridModel.forward")
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch, seq_len = inputs_embeds.shape[:2]
        past_key_values, position_ids, cu_seqlens, max_seqlen = self._cache_and_packing(
            past_key_values, use_cache, position_ids, attention_mask, inputs_embeds, kwargs
        )
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = inputs_embeds.device
        position_ids = _positions(position_ids, attention_mask, batch, seq_len, past_length, device)

        if output_attentions:
            self._check_output_attentions()
        if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
            self._check_checkpointing()
        io_layers = self._check_mixer_io(output_mixer_io)

        masks, padding_mask = self._masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        batch_info = BatchInfo(
            padding_mask=padding_mask,
            attention_mask_2d=attention_mask
            if attention_mask is not None and attention_mask.ndim == 2
            else None,
            masks=masks,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            rope=self._rope_fn(position_ids, inputs_embeds.dtype),
            cache=past_key_values,
            past_length=past_length,
            attn_kwargs={k: v for k, v in kwargs.items() if k in _FLASH_KWARGS},
            output_router_logits=bool(output_router_logits),
            aux_weights=self._attached_weights() if self.training and attach_aux_loss else {},
            output_attentions=bool(output_attentions),
            input_ids=input_ids,
            mixer_io_layers=io_layers,
        )
        ctx = MixerContext(batch=batch_info)  # the layers record their outputs in ctx.outputs

        hidden_states, all_hidden = self._run_layers(inputs_embeds, ctx, output_hidden_states)
        if isinstance(past_key_values, HybridCache):
            past_key_values.advance(seq_len)
        return self._output(hidden_states, all_hidden, past_key_values, ctx, output_attentions, io_layers)

    # ---- the steps of forward ---------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The input embeddings [B, T, H] (``embedding_multiplier`` applied)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HybridModel.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        return inputs_embeds

    def _cache_and_packing(
        self,
        past_key_values: Any,
        use_cache: bool | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, int | None]:
        """The cache this forward uses (None without one) and the packed-document boundaries: returns
        ``(cache, position_ids, cu_seqlens [N + 1] or None, max_seqlen)``. A packed row starts fresh and
        cannot be cached; a model with recurrent layers needs a ``HybridCache``."""
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cu_seqlens, max_seqlen = None, None
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            cu_seqlens, max_seqlen = _packed_boundaries(position_ids, attention_mask, kwargs)
        if cu_seqlens is not None and position_ids is None:
            # Boundaries given only as cu_seq_lens_q (flash-style): positions restart in each document, which
            # also gives transformers' mask helpers the packed (block-diagonal) causal mask.
            length, device = inputs_embeds.shape[1], inputs_embeds.device
            position_ids = _positions_from_cu_seqlens(cu_seqlens, length, device)
        if cu_seqlens is not None:
            # Several documents in one row: each starts fresh, and a packed row cannot be continued by
            # decoding.
            if past_key_values is not None and use_cache:
                raise ValueError(
                    "packed sequences (position_ids restarting inside a row, or "
                    "cu_seq_lens_q) cannot be used with a cache; pass use_cache=False"
                )
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(config=config)
        if use_cache and not isinstance(past_key_values, HybridCache) and config.has_recurrent_layers:
            raise TypeError(
                f"HybridModel.forward: past_key_values is a {type(past_key_values).__name__}, which has no "
                "room for recurrent (conv / state) layers; pass "
                "hf_hybrid.cache.HybridCache(config=model.config) or None (the model, and generate(), then "
                "build one)"
            )
        return (past_key_values if use_cache else None), position_ids, cu_seqlens, max_seqlen

    def _masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        position_ids: torch.Tensor,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """transformers' attention masks by layer type, and the padding mask [B, T] (True for real tokens)."""
        config = self.config
        # Only the masks some layer declares it reads (registry specs) are built: e.g. sparse DSA layers
        # attend over their selection only and need no dense [B, 1, T, S] mask (4 GiB a row at 32K in fp32).
        wanted = {layer.mask_name(config) for layer in self.layers} - {None}
        masks: dict[str, Any] = {}
        mask_kwargs = dict(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=past_key_values
        )
        for name, builder in _mask_builders().items():
            if name in wanted:
                masks[name] = compat.build_mask(builder, position_ids=position_ids, **mask_kwargs)
        padding_mask = None
        if any(spec.needs_padding_mask for spec in config.layer_specs()):
            padding_mask = compat.build_mask(create_recurrent_attention_mask, **mask_kwargs)
            if padding_mask is not None:
                padding_mask = padding_mask.bool()
        return masks, padding_mask

    def _run_layers(
        self, hidden_states: torch.Tensor, ctx: MixerContext, output_hidden_states: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Every layer, then the final norm; also the hidden states entering each layer and the final one."""
        if self.hc_head is not None:  # hyper-connections: hc_mult copies of the residual stream
            hidden_states = hidden_states.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, ctx)
        if self.hc_head is not None:
            hidden_states = self.hc_head(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return hidden_states, all_hidden

    def _output(
        self,
        hidden_states: torch.Tensor,
        all_hidden: list[torch.Tensor] | None,
        past_key_values: Any,
        ctx: MixerContext,
        output_attentions: bool,
        io_layers: frozenset[int],
    ) -> HybridModelOutput:
        """The output from what the layers recorded in ``ctx.outputs``: auxiliary terms averaged over layers
        (values only when attached), router logits, statistics, attention weights by layer, mixer
        inputs/outputs."""
        out = ctx.outputs
        aux_terms = {name: torch.stack(values).mean() for name, values in out.aux.items() if values}
        want_router_logits = ctx.batch.output_router_logits
        router_logits = tuple(out.router_logits) if want_router_logits and out.router_logits else None
        if ctx.batch.aux_weights:  # attached: values only, so a client adding them again counts nothing twice
            aux_terms = {name: value.detach() for name, value in aux_terms.items()}
            if router_logits is not None:
                router_logits = tuple(r.detach() for r in router_logits)
        attentions = None
        if output_attentions:
            by_layer = dict(out.attentions)
            attentions = tuple(by_layer.get(i) for i in range(len(self.layers)))
        return HybridModelOutput(
            last_hidden_state=hidden_states,
            cache=past_key_values,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=attentions,
            aux_terms=aux_terms,
            layer_stats=dict(out.stats),
            router_logits=router_logits,
            mixer_io={i: (x, ctx, y) for i, (x, y) in sorted(out.mixer_io.items())} if io_layers else None,
        )

    def _check_mixer_io(self, layers: list[int] | tuple[int, ...] | None) -> frozenset[int]:
        if not layers:
            return frozenset()
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(
                f"output_mixer_io={list(layers)!r}: {bad} are not layer indices (0..{len(self.layers) - 1})"
            )
        no_mixer = [i for i in layers if self.layers[i].mixer is None]
        if no_mixer:
            kinds = [self.layers[i].mixer_type for i in no_mixer]
            raise ValueError(f"output_mixer_io: layers {no_mixer} ({', '.join(kinds)}) have no token mixer")
        return frozenset(layers)

    def aux_coefficients(self) -> dict[str, float]:
        """Each auxiliary term the layers record in training now -> its coefficient in the objective (the
        layers' ``aux_terms()``; a term's coefficient is the same in every layer that records it)."""
        out: dict[str, float] = {}
        for layer in self.layers:
            out.update(layer.aux_coefficients())
        return {name: coef for name, coef in out.items() if coef > 0}

    def _attached_weights(self) -> dict[str, float]:
        """Weight of each term's attached gradient in one layer: ``w · coefficient / number of layers
        recording it`` (the rule averages a term over layers), ``w`` the micro-batch weight
        (``set_aux_loss_scale``)."""
        scale = self._aux_loss_scales[0]
        coefficients: dict[str, float] = {}
        counts: dict[str, int] = {}
        for layer in self.layers:
            for name, coef in layer.aux_coefficients().items():
                coefficients[name] = coef
                counts[name] = counts.get(name, 0) + 1
        return {name: scale * coef / counts[name] for name, coef in coefficients.items() if coef > 0}

    def replaces_lm_loss(self) -> bool:
        """True when an auxiliary term is the whole objective now (DSA's dense warm-up: the indexer KL)."""
        return any(layer.replaces_lm_loss() for layer in self.layers)

    def _check_output_attentions(self) -> None:
        """Attention probabilities exist only where eager attention runs: other attention backends cannot
        return them (say which layers); recurrent and sparse DSA layers have none (their entry is None)."""
        impl = self.config._attn_implementation or "eager"
        if impl == "eager":
            return
        layers = [
            f"{layer.layer_idx} ({layer.mixer_type})"
            for layer in self.layers
            if layer.returns_attention_weights()
        ]
        if layers:
            raise ValueError(
                f"output_attentions=True: attn_implementation={impl!r} does not return attention weights for "
                f"layers {', '.join(layers)}; load the model with attn_implementation='eager' to get them"
            )

    def in_dsa_dense_warmup(self) -> bool:
        """True when a DSA layer runs in DeepSeek's dense warm-up now (``model.dsa_mode("dense_warmup")`` or
        the config's ``dsa_mode``): the indexer KL is then the whole training loss."""
        return any(getattr(layer.mixer, "in_dense_warmup", False) for layer in self.layers)

    def reentrant_checkpointing(self) -> bool:
        """Whether training runs the layers under reentrant gradient checkpointing (their first forward
        without autograd: a term computed there has no graph, so it can only reach its parameters attached,
        in the replay)."""
        if not (self.training and self.gradient_checkpointing and self.layers):
            return False
        fn = getattr(self.layers[0], "_gradient_checkpointing_func", None)
        return getattr(fn, "keywords", {}).get("use_reentrant", True) if fn is not None else False

    def _check_checkpointing(self) -> None:
        """Reentrant checkpointing runs each layer's first forward without autograd; the attached auxiliary
        terms then reach their parameters in the replay, but DSA's dense warm-up loss (the indexer KL,
        returned as the loss itself) would have no gradient at all."""
        if self.reentrant_checkpointing() and self.config.kv_source_layers is not None:
            raise ValueError(
                f"gradient checkpointing with use_reentrant=True cannot train kv_source_layers="
                f"{self.config.kv_source_layers}: a layer reading another layer's keys/values would replay "
                "them from the first forward, which reentrant checkpointing runs without autograd, and the "
                "source's projections would get no gradient from it. Enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        if self.reentrant_checkpointing() and self.in_dsa_dense_warmup():
            raise ValueError(
                "gradient checkpointing with use_reentrant=True cannot train DSA's "
                "dense warm-up: its loss (the indexer KL) is computed in the layers' "
                "first forward, which reentrant checkpointing runs without autograd. "
                "Enable it with gradient_checkpointing_kwargs={'use_reentrant': False}"
            )


# Keyword arguments the backbone reads from **kwargs: flash-attention varlen metadata (packed rows).
_FLASH_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
# Keywords clients pass that carry nothing this model uses, ignored on purpose: tokenizers' token_type_ids
# (``model(**tokenizer(text))``), TRL padding-free's seq_idx (the boundaries also come as position_ids), the
# cache_position some callers still send (positions come from position_ids / the cache).
_IGNORED_KWARGS = frozenset({"token_type_ids", "seq_idx", "cache_position"})


def _check_extra_kwargs(kwargs: dict[str, Any]) -> None:
    """A keyword the model does not know is a typo (a close match to a real argument: ``TypeError``, because
    ignoring it would silently change the result) or something a client passes along (warned about once)."""
    unknown = sorted(set(kwargs) - _FLASH_KWARGS - _IGNORED_KWARGS)
    if not unknown:
        return
    known = _forward_parameters()
    backbone = _backbone_parameters()
    for name in unknown:
        if name in known and name not in backbone:
            raise TypeError(
                f"HybridModel.forward got {name!r}, an argument of the causal-LM head: call "
                "HybridForCausalLM (or compute the loss from last_hidden_state yourself)"
            )
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            raise TypeError(
                f"HybridForCausalLM / HybridModel.forward got an unexpected keyword argument {name!r}; "
                f"did you mean {close[0]!r}?"
            )
    ignored = ", ".join(unknown)
    logger.warning_once(f"HybridModel.forward ignores keyword arguments it does not use: {ignored}")


@functools.cache
def _backbone_parameters() -> frozenset[str]:
    params = inspect.signature(HybridModel.forward).parameters
    return frozenset(p for p in params if p not in ("self", "kwargs")) | _FLASH_KWARGS


@functools.cache
def _forward_parameters() -> list[str]:
    names = {*_FLASH_KWARGS}
    for fn in (HybridModel.forward, HybridForCausalLM.forward):
        names.update(p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs"))
    names.update(("num_items_in_batch", "ignore_index"))  # the causal-LM head's loss keywords
    return sorted(names)


def _positions(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | dict | None,
    batch: int,
    seq_len: int,
    past_length: int,
    device: torch.device,
) -> torch.Tensor:
    """Check the 2D attention mask [B, past + T] and return the position ids [B, T]: as given, else counting
    real tokens only under left padding (a padded prompt matches the prompt alone), else past + 0..T-1."""
    if isinstance(attention_mask, dict):
        raise ValueError(
            "HybridModel.forward takes a 2D attention_mask [batch, past + new tokens] (or a 4D mask); "
            "it builds the per-layer masks itself"
        )
    if attention_mask is not None and attention_mask.ndim == 2:
        if attention_mask.shape != (batch, past_length + seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                f"(batch, past + new tokens) = ({batch}, {past_length + seq_len})"
            )
    if position_ids is not None:
        return position_ids
    if attention_mask is not None and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
    position_ids = torch.arange(past_length, past_length + seq_len, device=device)
    return position_ids.unsqueeze(0).expand(batch, -1)


def _positions_from_cu_seqlens(cu: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """[1, T] positions restarting at 0 at each boundary of ``cu`` ([N + 1], last = T)."""
    cu = cu.to(device=device, dtype=torch.long)
    pos = torch.arange(length, device=device)
    doc = torch.searchsorted(cu[1:], pos, right=True).clamp_max(cu.numel() - 2)
    return (pos - cu[doc])[None]


def _mask_builders() -> dict[str, Any]:
    """transformers' mask builder for each mask name a spec may declare (hf_hybrid.registry.MASKS), looked up
    at call time (so a test spy on the module attribute sees every call)."""
    return {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


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
    if (
        position_ids is None
        or position_ids.shape[0] != 1
        or attention_mask is not None
        or position_ids.shape[1] < 2
    ):
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
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(compat.CACHE_NAME)
        if type(cache).__name__ == "DynamicCache" and not getattr(cache, "_is_user_defined", False):
            model_kwargs[compat.CACHE_NAME] = cache = HybridCache(config=self.config)
        if isinstance(cache, HybridCache) and generation_config.is_assistant:
            # An assistant's cache is rolled back by the drafts its target rejects: this call's drafts at most
            # (the draft length may grow between calls under num_assistant_tokens_schedule="heuristic").
            drafts = max(generation_config.num_assistant_tokens or 0, generation_config.max_new_tokens or 0)
            cache.activate_past_recording(recurrent_states_to_keep=drafts)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, *args, **kwargs):
        """transformers' own, given the number of new tokens when generate left it out for a cache of
        recurrent layers only (see :func:`compat.new_tokens_for_generation`)."""
        if next_sequence_length is None:
            next_sequence_length = compat.new_tokens_for_generation(
                input_ids, kwargs.get(compat.CACHE_NAME), kwargs.get("attention_mask")
            )
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length, *args, **kwargs)

    def _get_candidate_generator(self, *args, **kwargs):
        """transformers' candidate generator; our cache learns how many draft tokens it may have to roll back
        (every supported transformers: 5.23 / 5.24 activate the recording without a number)."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        cache = kwargs.get("model_kwargs", {}).get(compat.CACHE_NAME)
        if isinstance(cache, HybridCache):
            cache.activate_past_recording(recurrent_states_to_keep=compat.drafting_tokens(generator))
        return generator

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """``generate`` pre-builds per-layer-type masks for compileable caches; our model builds its own masks
        (and the padding mask of the recurrent layers) from the 2D mask, so hand that through unchanged."""
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
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> HybridCausalLMOutput:
        past_key_values = compat.resolve_cache(cache, past_key_values, where="HybridForCausalLM.forward")
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in loss_kwargs}
        # With labels this head builds the loss, so the auxiliary terms go into it with their graph (whatever
        # the loop does to the loss reaches them); otherwise whoever builds the loss gets them attached.
        builds_loss = self.training and (labels is not None or shift_labels is not None)
        attach = not builds_loss or self.model.reentrant_checkpointing()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            attach_aux_loss=attach,
            **model_kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        if cap is not None:  # c · tanh(logits / c) (Mistral-Large-4, Gemma 2)
            logits = torch.tanh(logits / cap) * cap

        lm_loss = None
        if labels is not None or shift_labels is not None:
            lm_loss = self.loss_function(
                logits, labels, self.vocab_size, shift_labels=shift_labels, **loss_kwargs
            )
        aux = out.aux_terms or {}
        loss = lm_loss
        if builds_loss:
            loss = self._objective(lm_loss, aux, normalised_per_step="num_items_in_batch" in loss_kwargs)

        fields = {_AUX_OUTPUT_FIELDS[k]: v for k, v in aux.items() if k in _AUX_OUTPUT_FIELDS}
        output = HybridCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            lm_loss=lm_loss,
            router_logits=out.router_logits,
            layer_stats=out.layer_stats,
            attentions=out.attentions,
            aux_terms=aux,
            **fields,
        )
        return (
            output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()
        )

    def _objective(self, lm_loss: torch.Tensor, aux: dict[str, torch.Tensor], *, normalised_per_step: bool):
        """The loss rule for one micro-batch (``hf_hybrid.aux_loss``): LM loss + ``w`` · Σ coefficient · term,
        without the LM loss while a term replaces it (DSA's dense warm-up: the indexer KL, coefficient 1).
        ``w`` is 1 for a per-micro-batch mean (the loop divides it by the accumulation steps itself) and the
        model's micro-batch weight for a loss normalised by ``num_items_in_batch`` (the loop does not)."""
        weight = self._aux_loss_scales[1] if normalised_per_step else 1.0
        loss = None if self.model.replaces_lm_loss() else lm_loss
        for name, coef in self.model.aux_coefficients().items():
            if name in aux:
                term = weight * coef * aux[name].to(lm_loss.device)
                loss = term if loss is None else loss + term
        return lm_loss if loss is None else loss


class HybridForSequenceClassification(GenericForSequenceClassification, HybridPreTrainedModel):
    _task_head_keys = ("score.weight",)

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
