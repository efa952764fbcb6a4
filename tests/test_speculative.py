"""The cache's length and its rollback (issue 23): one length for every layer kind whatever layer 0 is, and
assisted / speculative decoding, prompt lookup and ``crop()`` on models with recurrent layers, on every
supported transformers.

Tolerance: fp32, 1e-5 absolute — a rolled-back state is the very tensor a shorter forward would have left,
and the step / chunked paths sum the same terms in another order.
"""

from __future__ import annotations

import pytest
import torch

from hf_hybrid import HybridCache, HybridForCausalLM
from hf_hybrid.presets import preset_config

ATOL = 1e-5
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, linear_chunk_size=4)

# What layer 0 is: recurrent (each kind), attention, MLA, DSA, or an MLP-only layer.
FIRST = {
    "gated_deltanet": dict(mixer_types=["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"]),
    "mamba2": dict(mixer_types=["mamba2", "attention"], mamba_head_dim=8, mamba_state_size=8),
    "kda": dict(mixer_types=["kda", "attention"], kda_num_heads=2, kda_head_dim=8, kda_gate_rank=6),
    "linear_attention": dict(mixer_types=["linear_attention", "attention"], linear_conv_kernel_size=3),
    "attention": dict(mixer_types=["attention", "gated_deltanet"]),
    "none": dict(mixer_types=["none", "gated_deltanet", "attention"], mlp_types=["dense", "dense", "dense"]),
}


def build(preset: str = "tiny-attention", seed: int = 0, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    if "mixer_types" in overrides:
        overrides.setdefault("num_hidden_layers", len(overrides["mixer_types"]))
    model = HybridForCausalLM(preset_config(preset, **{**SMALL, **overrides})).eval()
    model.generation_config.pad_token_id = 0
    return model


def _pad_left(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("first", sorted(FIRST))
def test_length_is_the_tokens_seen_whatever_layer_zero_is(first):
    model = build(**FIRST[first])
    ids = torch.randint(1, 64, (2, 8))
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [8] * len(cache.layers)
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("first", sorted(FIRST))
def test_cached_decode_without_position_ids_equals_full_forward(first):
    model = build(**FIRST[first])
    ids = torch.randint(1, 64, (2, 11))
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        for t in range(8, 11):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("first", sorted(FIRST))
def test_batched_left_padded_generate_equals_each_prompt_alone(first):
    model = build(**FIRST[first])
    prompts = [torch.randint(1, 64, (n,)) for n in (8, 3)]
    ids, mask = _pad_left(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=5, do_sample=False)
        assert out[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist()


# --- rollback --------------------------------------------------------------------------------------------
# Every recurrent mixer (with its conv state), MLA, DSA's indexer keys, MoE.
ROLLBACK = {
    "hybrid_3to1_gdn": ("tiny-hybrid", {}),
    "gdn": ("tiny-gdn", {}),
    "mamba2": ("tiny-mamba2", dict(mamba_head_dim=8, mamba_state_size=8)),
    "kda": ("tiny-kda", dict(kda_num_heads=2, kda_head_dim=8, kda_gate_rank=6)),
    "linear_conv": ("tiny-linear", dict(linear_conv_kernel_size=3, linear_decay="scalar")),
    "mla": ("tiny-mla", {}),
    "dsa": ("tiny-dsa", dict(index_topk=4)),
    "moe_hybrid": ("tiny-moe", dict(mixer_pattern="3:1 gated_deltanet:attention")),
    # a window shorter than the generation: the layer trims itself, and must keep its past while recording
    "sliding_hybrid": (
        "tiny-sliding",
        dict(
            mixer_types=["gated_deltanet", "sliding_attention", "gated_deltanet", "attention"],
            sliding_window=5,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(ROLLBACK))
def test_crop_puts_every_layer_back(name):
    """Prefill, a forward of 4 tokens (a verification), crop 3 of them: the next token's logits are those of a
    model that never saw the 3 — and the same after a crop spanning single-token forwards."""
    preset, overrides = ROLLBACK[name]
    model = build(preset, **overrides)
    ids = torch.randint(1, 64, (1, 14))
    with torch.no_grad():
        cache = HybridCache(config=model.config)
        cache.activate_past_recording(recurrent_states_to_keep=3)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        model(ids[:, 6:10], past_key_values=cache, use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 7
        after = model(ids[:, 10:11], past_key_values=cache, use_cache=True).logits[:, -1]
        expect = model(torch.cat([ids[:, :7], ids[:, 10:11]], 1)).logits[:, -1]
        torch.testing.assert_close(after, expect, atol=ATOL, rtol=0)
        for t in range(8, 11):  # three one-token forwards, then all three rolled back
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 8
        again = model(ids[:, 6:7], past_key_values=cache, use_cache=True).logits[:, -1]
        expect = model(torch.cat([ids[:, :7], ids[:, 10:11], ids[:, 6:7]], 1)).logits[:, -1]
    torch.testing.assert_close(again, expect, atol=ATOL, rtol=0)


def _assistant(preset: str, overrides: dict) -> HybridForCausalLM:
    """A smaller model of the same family (fewer layers, other weights)."""
    config = preset_config(preset, **{**SMALL, **overrides})
    layers = max(1, config.num_hidden_layers // 2)
    small = dict(
        overrides,
        num_hidden_layers=layers,
        mixer_types=config.mixer_types[:layers],
        mlp_types=config.mlp_types[:layers],
    )
    small.pop("mixer_pattern", None)
    return build(preset, seed=1, **small)


@pytest.mark.parametrize("name", sorted(ROLLBACK))
def test_speculative_greedy_equals_plain_greedy(name):
    preset, overrides = ROLLBACK[name]
    model = build(preset, **overrides)
    ids = torch.randint(1, 64, (1, 6))
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    assistant = _assistant(preset, overrides)
    assistant.generation_config.num_assistant_tokens = 4
    drafted = model.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=assistant)
    assert drafted.tolist() == plain.tolist()
    model.generation_config.num_assistant_tokens = 3
    itself = model.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=model)
    assert itself.tolist() == plain.tolist()


@pytest.mark.parametrize("name", ["hybrid_3to1_gdn", "mamba2", "dsa"])
def test_prompt_lookup_greedy_equals_plain_greedy(name):
    preset, overrides = ROLLBACK[name]
    model = build(preset, **overrides)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])  # repeated n-grams: prompt lookup drafts
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    looked_up = model.generate(ids, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=4)
    assert looked_up.tolist() == plain.tolist()


def test_rollback_history_is_bounded_by_the_draft_length(monkeypatch):
    """The states kept for a rollback: at most (drafts + 1) per recurrent layer, at every step of an assisted
    generation, with drafts that are rejected and accepted."""
    model = build("tiny-hybrid")
    assistant = _assistant("tiny-hybrid", {})
    drafts = 4
    assistant.generation_config.num_assistant_tokens = drafts
    recurrent_layers = sum(m == "gated_deltanet" for m in model.config.mixer_types)
    seen = []
    advance = HybridCache.advance

    def spy(self, num_tokens):
        advance(self, num_tokens)
        if self.recording:
            seen.append((self.history_size(), len(self.layers)))

    monkeypatch.setattr(HybridCache, "advance", spy)
    model.generate(
        torch.randint(1, 64, (1, 20)), max_new_tokens=16, do_sample=False, assistant_model=assistant
    )
    target = [size for size, layers in seen if layers == model.config.num_hidden_layers]
    assert target and max(target) <= (drafts + 1) * recurrent_layers
    assert max(target) > recurrent_layers  # it did keep a history


def test_crop_without_recording_or_past_the_history_is_refused_clearly():
    model = build("tiny-gdn")
    ids = torch.randint(1, 64, (1, 6))
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-2)
    cache.activate_past_recording(recurrent_states_to_keep=2)
    with torch.no_grad():
        for t in range(4):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    assert cache.is_croppable
    with pytest.raises(ValueError, match="last 2 tokens"):
        cache.crop(-3)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-mamba2"])
def test_beam_search_and_sampling_match_cacheless_generation(preset):
    model = build(preset)
    ids = torch.randint(1, 64, (1, 5))
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.tolist() == model.generate(ids, max_new_tokens=6, num_beams=3, use_cache=False).tolist()
    torch.manual_seed(3)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(3)
    assert (
        sampled.tolist()
        == model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, use_cache=False).tolist()
    )
