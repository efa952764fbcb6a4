"""HybridCache: transformers' DynamicCache plus what a hybrid needs.

transformers builds one cache layer per ``config.layer_types`` entry (``DynamicLayer`` for attention and MLA,
``DynamicSlidingWindowLayer``, ``DynamicIndexedLayer`` for DSA's indexer keys, ``LinearAttentionLayer`` for
conv + recurrent state). Two things are ours, the same on every supported transformers:

- **The length.** The cache counts the tokens it has seen, one integer every layer agrees on
  (``get_seq_length(i)`` for any layer ``i``). transformers' layers count differently by kind and version
  (attention layers their keys; 5.25's linear-attention layers their own conv columns), and a recurrent layer
  first must not make the length depend on that.
- **Rollback** for assisted / speculative decoding and ``crop()``. A recurrent state cannot be rewound, so
  while recording (``activate_past_recording(recurrent_states_to_keep=N)``, which ``generate`` calls) each
  recurrent layer keeps the (conv, recurrent) states after each of the last N tokens — N + 1 states per layer
  at most — and ``crop`` restores the one at the new length. Attention, MLA and DSA's indexer keys are cropped
  by transformers' own layers. The recurrent mixers hand the states over through :meth:`write_recurrent`
  after asking :meth:`states_to_keep` how many trailing ones this forward needs.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

#: A recurrent layer's states after some token: (conv [B, C, K-1] or None, recurrent [B, H, Dk, Dv] or None).
States = tuple[torch.Tensor | None, torch.Tensor | None]


class HybridCache(DynamicCache):
    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self._seen_tokens = 0
        # Rollback: None = not recording; else the number of tokens a crop may remove.
        self._keep: int | None = None
        # layer_idx -> {length: states after that many tokens}, oldest first (only while recording).
        self._history: dict[int, dict[int, States]] = {}
        self._forward_keep = 0  # the bound for the forward in progress (see states_to_keep)

    @property
    def has_recurrent_layers(self) -> bool:
        return any(self._is_recurrent(i) for i in range(len(self.layers)))

    def _is_recurrent(self, layer_idx: int) -> bool:
        return isinstance(self.layers[layer_idx], LinearAttentionCacheLayerMixin)

    # --- length -----------------------------------------------------------------------------------------
    def advance(self, num_tokens: int) -> None:
        """Called by the model once per forward (after every layer) with the number of new tokens (code that
        fills the layers by hand, ``cache.update(...)``, calls it too: the length is this count)."""
        self._seen_tokens += int(num_tokens)
        if self._keep is not None:
            self._prune()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The tokens this cache has seen (the same for every layer, whatever its kind)."""
        return self._seen_tokens

    # --- rollback ---------------------------------------------------------------------------------------
    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """Keep what ``crop`` needs to remove up to ``recurrent_states_to_keep`` tokens (at least the tokens
        of the newest forward after the first, whatever this number: a verification forward may be cropped
        back to its first token).

        Called again, the bound only grows. Attention layers that trim themselves (sliding window) are told
        to keep their past too."""
        keep = 0 if recurrent_states_to_keep is None else int(recurrent_states_to_keep)
        if keep < 0:
            raise ValueError(f"activate_past_recording: recurrent_states_to_keep={keep} must be >= 0")
        self._keep = max(keep, self._keep or 0)
        for i, layer in enumerate(self.layers):
            # Our recurrent layers keep their own history (below); transformers' record_past mode for them
            # expects the raw new conv columns, which our mixers do not hand over.
            if not self._is_recurrent(i) and hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording(**kwargs)

    @property
    def recording(self) -> bool:
        return self._keep is not None

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` can put the cache back as it was: always without recurrent layers, and with them
        while recording."""
        if self.has_recurrent_layers and not self.recording:
            return False
        attention = [layer for i, layer in enumerate(self.layers) if not self._is_recurrent(i)]
        return all(getattr(layer, "is_croppable", True) for layer in attention)

    def states_to_keep(self, num_new_tokens: int) -> int:
        """How many states a recurrent mixer must hand to :meth:`write_recurrent` for a forward of
        ``num_new_tokens`` tokens: those after each of the last n tokens (n >= 1; the last is the final
        state). 1 when not recording."""
        if self._keep is None:
            return 1
        keep = self._keep
        if self._seen_tokens > 0:
            # A verification forward (last accepted token + drafts) may be cropped back to its first token,
            # whatever draft length the candidate generator chose this round.
            keep = max(keep, num_new_tokens - 1)
        self._forward_keep = keep
        return max(1, min(num_new_tokens, keep + 1))

    def write_recurrent(
        self,
        layer_idx: int,
        conv_states: list[torch.Tensor] | None,
        recurrent_states: list[torch.Tensor] | None,
        *,
        num_new_tokens: int,
    ) -> None:
        """Store a recurrent layer's states after this forward: ``conv_states`` / ``recurrent_states`` are the
        states after each of its last n tokens (n from :meth:`states_to_keep`, the last one is the new state;
        either list may be None for a layer without that state). Only the last is written into transformers'
        layer; the others go to the rollback history while recording."""
        conv_last = conv_states[-1] if conv_states else None
        rec_last = recurrent_states[-1] if recurrent_states else None
        layer = self.layers[layer_idx]
        if self._keep is not None:
            history = self._history.setdefault(layer_idx, {})
            if self._seen_tokens not in history and layer.is_recurrent_states_initialized.get(0, False):
                history[self._seen_tokens] = self._snapshot(layer)
            n = len(conv_states or recurrent_states or [])
            end = self._seen_tokens + num_new_tokens
            for j in range(n - 1):
                history[end - n + 1 + j] = (
                    conv_states[j] if conv_states else None,
                    recurrent_states[j] if recurrent_states else None,
                )
        if conv_last is not None:
            self.update_conv_state(conv_last, layer_idx, conv_kernel_size=conv_last.shape[-1])
        if rec_last is not None:
            self.update_recurrent_state(rec_last, layer_idx)
        if self._keep is not None:
            self._history[layer_idx][self._seen_tokens + num_new_tokens] = self._snapshot(layer)

    @staticmethod
    def _snapshot(layer) -> States:
        conv = layer.conv_states[0].clone() if layer.is_conv_states_initialized[0] else None
        rec = layer.recurrent_states[0].clone() if layer.is_recurrent_states_initialized[0] else None
        return conv, rec

    def _prune(self) -> None:
        oldest = self._seen_tokens - max(self._keep, self._forward_keep)
        for history in self._history.values():
            for length in [n for n in history if n < oldest or n > self._seen_tokens]:
                del history[length]
        self._forward_keep = 0

    def history_size(self) -> int:
        """How many rollback states are held (all recurrent layers together): at most
        ``(recurrent_states_to_keep + 1) × recurrent layers`` between forwards."""
        return sum(len(h) for h in self._history.values())

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as transformers' caches take it);
        ``crop(0)`` only trims layers back to their working size."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"HybridCache.crop({tokens_to_remove}): pass a negative number, the tokens to remove (as "
                f"transformers' caches take it), e.g. crop(-2)"
            )
        remove = min(-tokens_to_remove, self._seen_tokens)
        target = self._seen_tokens - remove
        recurrent = [i for i in range(len(self.layers)) if self._is_recurrent(i)]
        if remove and recurrent:
            if self._keep is None:
                raise ValueError(
                    "HybridCache.crop: this model has recurrent layers (linear_attention / mamba2 / "
                    "gated_deltanet / kda) and the cache was not recording their past states; call "
                    "cache.activate_past_recording(recurrent_states_to_keep=N) before the forwards you may "
                    "roll back (generate's assisted decoding does)"
                )
            missing = [i for i in recurrent if target not in self._history.get(i, {})]
            if missing:
                held = sorted(self._history.get(missing[0], {}))
                raise ValueError(
                    f"HybridCache.crop(-{remove}): the recurrent layers keep the states of the last "
                    f"{self._keep} tokens (activate_past_recording(recurrent_states_to_keep={self._keep})); "
                    f"lengths held: {held}, asked for {target}. Record more states, or draft fewer tokens"
                )
        for i, layer in enumerate(self.layers):
            if i in recurrent:
                if remove:
                    conv, rec = self._history[i][target]
                    if conv is not None:
                        layer.conv_states[0].copy_(conv)
                    if rec is not None:
                        layer.recurrent_states[0].copy_(rec)
            else:
                layer.crop(-remove)
        self._seen_tokens = target
        for history in self._history.values():
            for length in [n for n in history if n > target]:
                del history[length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for history in self._history.values():
            for length, (conv, rec) in history.items():
                history[length] = tuple(
                    None if s is None else s.index_select(0, beam_idx.to(s.device)) for s in (conv, rec)
                )

    def reset(self) -> None:
        super().reset()
        self._seen_tokens = 0
        self._history.clear()
