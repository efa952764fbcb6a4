"""HybridCache: transformers' DynamicCache plus what a hybrid needs.

transformers builds one cache layer per ``config.layer_types`` entry (``DynamicLayer`` for attention and MLA,
``DynamicSlidingWindowLayer``, ``DynamicIndexedLayer`` for DSA's indexer keys, ``LinearAttentionLayer`` for
conv + recurrent state). Two things are missing there and live here:

- ``get_seq_length`` raises when no layer is attention, so a pure Mamba-2 / GDN stack could not
  ``generate()``: we count the tokens we have seen ourselves.
- ``crop`` cannot rewind a recurrent state; assisted / speculative decoding needs it, so we refuse with a
  clear error instead of silently decoding from a wrong state.
"""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin


class HybridCache(DynamicCache):
    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self._seen_tokens = 0

    @property
    def has_recurrent_layers(self) -> bool:
        return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in self.layers)

    @property
    def has_attention_layers(self) -> bool:
        return any(isinstance(layer, CacheLayerMixin) for layer in self.layers)

    def advance(self, num_tokens: int) -> None:
        """Called by the model once per forward with the number of new tokens it processed."""
        self._seen_tokens += int(num_tokens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx == 0 and not self.has_attention_layers:
            return self._seen_tokens
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if self.has_recurrent_layers:
            raise ValueError(
                "HybridCache.crop: this model has recurrent layers (linear_attention / "
                "mamba2 / gated_deltanet / kda) whose state cannot be rewound, so "
                "assisted / speculative generation and cache cropping are not supported"
            )
        super().crop(tokens_to_remove)
        self._seen_tokens = super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self._seen_tokens = 0
