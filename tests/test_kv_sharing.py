"""Cross-layer KV sharing (``HybridConfig.kv_source_layers``, Mistral-Large-4's option) in any per-layer mix.

A sharing layer attends with its own queries (and, for MLA, its own ``kv_b_proj``) over the keys/values an
earlier layer computed; it has no K/V projections and writes no cache entry, so the cache holds a shared KV
once and the inspector counts it once.

Tolerance: fp32, 1e-5 absolute (``hf_hybrid.testing.ATOL``) — the reference and the model sum the same terms
in another order.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.cache_utils import DummyLayer, DynamicIndexedLayer

from hf_hybrid import HybridCache, HybridConfig, HybridForCausalLM
from hf_hybrid.cost import estimate_cost
from hf_hybrid.layers import apply_rope, repeat_kv
from hf_hybrid.testing import ATOL, check_layer_kind, tiny_config

DSA = dict(index_topk=4, index_n_heads=2, index_head_dim=8)
MIXES = {
    "attention_mla": dict(
        num_hidden_layers=4,
        mixer_types=["attention", "attention", "mla", "mla"],
        kv_source_layers=[0, 0, 2, 2],
    ),
    # DSA on MLA reading an MLA latent (own indexer: keeps its indexer-key cache) and a "shared"-indexer DSA
    # layer reading it too; a recurrent layer in between.
    "mla_dsa_gdn": dict(
        num_hidden_layers=5,
        mixer_types=["mla", "dsa", "gated_deltanet", "dsa", "mla"],
        kv_source_layers=[0, 0, 2, 0, 0],
        dsa_indexer_types=["full", "full", "full", "shared", "full"],
        **DSA,
    ),
    # windowed K/V shared within sliding layers; DSA on GQA attention reading a full-attention layer;
    # per-layer NoPE layers (with q/k norms) sharing with a NoPE layer
    "sliding_dsa_attention_nope": dict(
        num_hidden_layers=6,
        mixer_types=["sliding_attention", "sliding_attention", "attention", "dsa", "attention", "attention"],
        sliding_window=6,
        dsa_base="attention",
        nope_layers=[4, 5],
        use_qk_norm=True,
        kv_source_layers=[0, 0, 2, 2, 4, 4],
        **DSA,
    ),
}


def build(mix: str, seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config(**MIXES[mix])).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_kv_sharing_passes_the_kit_in_a_mix(mix):
    """cached decode = full forward, two-piece prefill, left/right padding, packing, batch, generate, beam
    search (cache reorder), save/load, cost (the cache's bytes = the inspector's), gradients, aux terms."""
    assert len(check_layer_kind(config_overrides=MIXES[mix])) == 11


def _reference(model: HybridForCausalLM, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(model's mixer output, naive output) of sharing layer ``layer``: the source layer's keys/values are
    recomputed from the source's own input with the source's projections, and attention is written out."""
    cfg = model.config
    src = cfg.kv_source_layers[layer]
    with torch.no_grad():
        io = model.model(ids, output_mixer_io=[src, layer], use_cache=False).mixer_io
        (x_src, _, _), (x, _, y) = io[src], io[layer]
        s_mod, d_mod = model.model.layers[src].mixer, model.model.layers[layer].mixer
        b, t, _ = x.shape
        pos = torch.arange(t)[None].expand(b, -1)
        rope = model.model._rope_fn(pos, x.dtype)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if cfg.mixer_types[layer] == "attention":
            h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            q = d_mod.q_proj(x).view(b, t, h, d)
            k = s_mod.k_proj(x_src).view(b, t, hkv, d)
            v = s_mod.v_proj(x_src).view(b, t, hkv, d)
            cos, sin = rope(d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            k, v = repeat_kv(k, h // hkv), repeat_kv(v, h // hkv)
            scale = d**-0.5
        else:  # MLA: the source's latent and rope key, the sharing layer's kv_b_proj and queries
            h, dn, dr, dv = (
                cfg.num_attention_heads,
                cfg.qk_nope_head_dim,
                cfg.qk_rope_head_dim,
                cfg.v_head_dim,
            )
            latent, k_pe = s_mod.kv_a_proj_with_mqa(x_src).split([cfg.kv_lora_rank, dr], dim=-1)
            latent = s_mod.kv_a_layernorm(latent)
            q = d_mod.q_proj(x).view(b, t, h, dn + dr)
            q_nope, q_pe = q.split([dn, dr], dim=-1)
            cos, sin = rope(dr)
            q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe[:, :, None], cos, sin)
            k_nope, v = d_mod.kv_b_proj(latent).view(b, t, h, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(b, t, h, dr)], -1).transpose(1, 2)
            q, v = torch.cat([q_nope, q_pe], -1).transpose(1, 2), v.transpose(1, 2)
            scale = (dn + dr) ** -0.5
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return y, d_mod.o_proj(out)


@pytest.mark.parametrize("layer", [1, 3])
def test_sharing_layer_equals_the_naive_reference(layer):
    model = build("attention_mla")
    ids = torch.randint(1, 64, (2, 9))
    got, expected = _reference(model, ids, layer)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_sharing_layer_has_no_kv_projections_and_no_cache_entry():
    model = build("mla_dsa_gdn")
    names = {i: {n for n, _ in layer.mixer.named_parameters()} for i, layer in enumerate(model.model.layers)}
    assert "kv_a_proj_with_mqa.weight" in names[0] and "kv_b_proj.weight" in names[0]
    for i in (1, 3, 4):
        assert not any(n.startswith("kv_a_") for n in names[i]) and "kv_b_proj.weight" in names[i]
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 64, (2, 7)), past_key_values=cache, use_cache=True)
    layers = cache.layers
    assert isinstance(layers[3], DummyLayer) and isinstance(layers[4], DummyLayer)  # "reuse"
    # DSA with its own indexer keeps its indexer keys, but no latent of its own
    assert isinstance(layers[1], DynamicIndexedLayer) and layers[1].indexer_keys.shape[1] == 7
    assert layers[1].keys is None or layers[1].keys.numel() == 0
    assert layers[0].keys.shape[-2] == 7  # the source holds the latent once


def test_the_inspector_counts_a_shared_kv_once(tmp_path, capsys):
    from hf_hybrid import cli

    shared = tiny_config(**MIXES["attention_mla"])
    alone = tiny_config(**{**MIXES["attention_mla"], "kv_source_layers": None})
    r_shared, r_alone = estimate_cost(shared, dtype_bytes=2), estimate_cost(alone, dtype_bytes=2)
    per_layer = [c.cache_per_token for c in r_alone.layers]
    assert [c.cache_per_token for c in r_shared.layers] == [per_layer[0], 0, per_layer[2], 0]
    assert r_shared.cache_bytes(4096) == 4096 * 2 * (per_layer[0] + per_layer[2])
    # the sharing layers' missing K/V projections are missing from the count too
    unshared = HybridForCausalLM(alone).model.layers
    missing = [(1, ("k_proj.", "v_proj.")), (3, ("kv_a_proj_with_mqa.", "kv_a_layernorm."))]
    assert r_alone.total_params - r_shared.total_params == sum(
        p.numel()
        for i, keys in missing
        for n, p in unshared[i].mixer.named_parameters()
        if n.startswith(keys)
    )
    shared.save_pretrained(tmp_path)
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cache_bytes_per_sequence"]["4096"] == r_shared.cache_bytes(4096)
    assert data["cache_by_mixer"]["mla"]["layers_caching"] == 1


def test_crop_and_assisted_decoding_with_shared_kv():
    """A verification forward cropped back, then speculative decoding (the assistant's cache is cropped each
    round): the same tokens as plain greedy decoding."""
    model = build("mla_dsa_gdn")
    ids = torch.randint(1, 64, (1, 12))
    with torch.no_grad():
        cache = HybridCache(config=model.config)
        cache.activate_past_recording(recurrent_states_to_keep=3)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        model(ids[:, 6:10], past_key_values=cache, use_cache=True)
        cache.crop(-3)
        after = model(ids[:, 10:11], past_key_values=cache, use_cache=True).logits[:, -1]
        expect = model(torch.cat([ids[:, :7], ids[:, 10:11]], 1)).logits[:, -1]
    torch.testing.assert_close(after, expect, atol=ATOL, rtol=0)
    prompt = ids[:, :6]
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.generation_config.num_assistant_tokens = 3
    assert model.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=model).tolist() == (
        plain.tolist()
    )


def test_gradients_reach_the_source_through_sharing_layers_and_checkpointing():
    """The source's K/V projections learn from the layers sharing them: their gradient is the sum over every
    reader. Non-reentrant checkpointing gives the same gradients; reentrant checkpointing (whose first forward
    has no autograd) is refused."""
    ids = torch.randint(1, 64, (2, 8))

    def grads(model):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = build("attention_mla").train()
    plain = grads(model)
    # Only layer 1 reads layer 0's K/V here: freezing what layer 0 itself does with them changes the gradient.
    assert plain["model.layers.0.mixer.k_proj.weight"].abs().sum() > 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], atol=ATOL, rtol=0, msg=name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"use_reentrant=True cannot train kv_source_layers=\[0, 0, 2, 2\]"):
        model(ids, labels=ids)


def test_sharing_layer_gradient_equals_the_reference_gradient():
    """The gradient the sharing layer sends into the source's k_proj equals the naive reference's."""
    model = build("attention_mla").train()
    ids = torch.randint(1, 64, (1, 6))
    io = model.model(ids, output_mixer_io=[0, 1], use_cache=False).mixer_io
    y = io[1][2]
    (g_model,) = torch.autograd.grad(y.sum(), model.model.layers[0].mixer.k_proj.weight, retain_graph=True)
    # reference: layer 0's recorded input, recomputed K/V, layer 1's own queries
    x_src, x = io[0][0], io[1][0]
    m0, m1 = model.model.layers[0].mixer, model.model.layers[1].mixer
    cfg = model.config
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = model.model._rope_fn(torch.arange(6)[None], x.dtype)(d)
    q = apply_rope(m1.q_proj(x).view(1, 6, h, d), cos, sin).transpose(1, 2)
    k = apply_rope(m0.k_proj(x_src).view(1, 6, hkv, d), cos, sin).transpose(1, 2)
    v = m0.v_proj(x_src).view(1, 6, hkv, d).transpose(1, 2)
    scores = (q @ repeat_kv(k, h // hkv).transpose(-1, -2) * d**-0.5).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf")
    )
    ref = m1.o_proj((scores.softmax(-1) @ repeat_kv(v, h // hkv)).transpose(1, 2).reshape(1, 6, -1))
    (g_ref,) = torch.autograd.grad(ref.sum(), m0.k_proj.weight)
    torch.testing.assert_close(g_model, g_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(kv_source_layers=[0, 2, 2, 3]),
            r"kv_source_layers\[1\]=2: .*no forward references.*allowed for layer 1: \[0, 1\]",
        ),
        (
            dict(kv_source_layers=[0, 0, 1, 3]),
            r"kv_source_layers\[2\]=1: layer 1 reads .* of layer 0 itself.*allowed for layer 2: \[0, 2\]",
        ),
        (
            dict(mixer_types=["attention", "mla", "mla", "mla"], kv_source_layers=[0, 0, 2, 3]),
            r"kv_source_layers\[1\]=0: layer 1 \(mixer_types\[1\]='mla': mla_latent, RoPE\) cannot read "
            r".* layer 0 \(mixer_types\[0\]='attention': kv, RoPE\).*allowed for layer 1: \[1\]",
        ),
        (
            dict(
                mixer_types=["gated_deltanet", "attention", "attention", "attention"],
                kv_source_layers=[0, 0, 2, 3],
            ),
            r"kv_source_layers\[1\]=0: .*layer 0 \(mixer_types\[0\]='gated_deltanet': nothing to share\)",
        ),
        (
            dict(nope_layers=[1], kv_source_layers=[0, 0, 2, 3]),
            r"kv_source_layers\[1\]=0: layer 1 \(.*kv, NoPE\) cannot read .*kv, RoPE.*same RoPE use",
        ),
        (dict(kv_source_layers=[0, 0]), r"kv_source_layers has 2 entries but num_hidden_layers=4"),
        (dict(kv_source_layers=[0, "0", 2, 3]), r"kv_source_layers\[1\]='0'"),
    ],
)
def test_bad_kv_source_layers_are_refused_naming_field_value_and_allowed(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(num_hidden_layers=4, **{"mixer_types": ["attention"] * 4, **overrides})


def test_the_default_keeps_todays_model_and_old_checkpoints_load(tmp_path):
    plain = tiny_config(num_hidden_layers=3, mixer_types=["attention", "mla", "dsa"], **DSA)
    assert plain.kv_source_layers is None and plain.kv_sharing_modes is None
    # "every layer its own source" is the default, spelled one way (what is saved)
    assert tiny_config(num_hidden_layers=3, kv_source_layers=[0, 1, 2]).kv_source_layers is None
    torch.manual_seed(0)
    model = HybridForCausalLM(plain).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("kv_source_layers")  # a checkpoint written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = HybridForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 64, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(HybridConfig.from_pretrained(tmp_path).kv_source_layers, type(None))
