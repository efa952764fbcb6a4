"""MLA mixer (issue 5): DeepSeek layout, latent-only cache, naive vs absorbed decode (with PEFT LoRA on
kv_b_proj), masks of every attention implementation, invariances, save/load, PEFT, generate, hybrid stacks.

Tolerances: fp32 throughout. ``ATOL = 1e-5`` where two paths compute the same maths in a different order
(absorbed vs expanded: ``(W_ukᵀq)·c`` vs ``q·(W_uk c)``; cached decode vs one full forward; sdpa vs eager;
padded vs alone); logits here are O(1) and these reorderings move them by ~1e-6. Exact equality where the
arithmetic is identical (save → load).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from hf_hybrid import HybridCache, HybridConfig, HybridForCausalLM, compat
from hf_hybrid.mixers import mla as mla_module
from hf_hybrid.mixers.base import MixerContext
from hf_hybrid.mixers.mla import (
    HybridMLA,
    effective_linear_weight,
    latent_attention_bias,
    mla_softmax_scale,
    rope_deinterleave_index,
)

ATOL = 1e-5
peft = pytest.importorskip("peft")
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def tiny(**overrides) -> HybridConfig:
    # dn + dr = 24 ≠ dv = 12 so the sdpa path pads v; r = 32 exercises the latent space.
    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        mixer_types=["mla", "mla"],
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def build(
    config: HybridConfig, seed: int = 0, attn: str = "sdpa", decode: str | None = None
) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config._attn_implementation = attn
    model = HybridForCausalLM(config).eval()
    if decode is not None:
        set_decode(model, decode)
    return model


def mla_layers(model) -> list[HybridMLA]:
    return [m for m in model.modules() if isinstance(m, HybridMLA)]


def set_decode(model, decode: str) -> None:
    for layer in mla_layers(model):  # works through PEFT wrappers too
        layer.config.mla_decode = decode


def left_padded(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def decode_logits(model, ids, mask, steps: int = 4, chunk: int = 1, new: torch.Tensor | None = None):
    """Prefill then feed ``steps`` fixed tokens ``chunk`` at a time through the cache; returns the logits of
    the last prompt position and of every fed token, and the fed tokens."""
    if new is None:
        new = torch.randint(1, 96, (ids.shape[0], steps), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, logits = out.cache, [out.logits[:, -1:]]
        for i in range(0, steps, chunk):
            tok = new[:, i : i + chunk]
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(tok, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), new


class CountAbsorbed:
    """Counts calls of the absorbed path so parity tests cannot pass vacuously."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = HybridMLA.attend_absorbed

        def wrapped(mod, *args, **kwargs):
            self.calls += 1
            return orig(mod, *args, **kwargs)

        monkeypatch.setattr(HybridMLA, "attend_absorbed", wrapped)


# ------------------------------------------------------------------------------------------------------------
# layout and cache


def test_layout_names_and_q_without_lora():
    with_lora = build(tiny()).model.layers[0].mixer
    names = {n for n, _ in with_lora.named_children()}
    assert names == {
        "q_a_proj",
        "q_a_layernorm",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_a_layernorm",
        "kv_b_proj",
        "o_proj",
    }
    assert with_lora.kv_a_proj_with_mqa.out_features == 32 + 8
    assert with_lora.kv_b_proj.out_features == 4 * (16 + 12)
    no_lora = build(tiny(q_lora_rank=None)).model.layers[0].mixer
    assert hasattr(no_lora, "q_proj") and not hasattr(no_lora, "q_a_proj")
    x = torch.randn(2, 5, 64)
    assert with_lora.project_q(x)[2].shape == (2, 5, 32)
    assert no_lora.project_q(x)[2] is None
    assert with_lora.scaling == pytest.approx(24**-0.5)


def test_cache_holds_only_the_latent_and_rope_key():
    model = build(tiny())
    ids = torch.randint(1, 96, (2, 7))
    cache = model(ids, use_cache=True).cache
    assert isinstance(cache, HybridCache)
    for layer in cache.layers:
        assert type(layer) is DynamicLayer  # the ordinary layer, no new cache type
        assert layer.keys.shape == (2, 1, 7, 32) and layer.values.shape == (2, 1, 7, 8)
    per_token = sum(lay.keys[0, 0, 0].nbytes + lay.values[0, 0, 0].nbytes for lay in cache.layers) / len(
        cache.layers
    )
    assert per_token == (32 + 8) * 4  # (kv_lora_rank + qk_rope_head_dim) × fp32


def test_matches_transformers_deepseek_v3_with_deinterleaved_rope():
    """Our module with DeepSeek's interleaved rope rows permuted equals
    ``DeepseekV3Attention(rope_interleave=True)``, cache contents included."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = tiny()
    cfg._attn_implementation = "eager"
    ref_cfg = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rope_interleave=True,
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=False,
    )
    ref_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = DeepseekV3Attention(ref_cfg, 0).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = HybridMLA(cfg, 0).eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    perm = rope_deinterleave_index(8)
    qb = sd["q_b_proj.weight"].view(4, 24, 32)
    qb[:, 16:] = qb[:, 16:][:, perm]
    sd["kv_a_proj_with_mqa.weight"][32:] = sd["kv_a_proj_with_mqa.weight"][32:][perm]
    ours.load_state_dict(sd)

    x = torch.randn(2, 6, 64)
    pos = torch.arange(6)[None].expand(2, -1)
    cos, sin = DeepseekV3RotaryEmbedding(ref_cfg)(x, pos)
    ref_cache, our_cache = HybridCache(config=cfg), HybridCache(config=cfg)
    mask = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        # positional: the cache's keyword differs by version
        expected, _ = ref(x, (cos, sin), mask, ref_cache)
        ctx = MixerContext(
            padding_mask=None,
            attention_mask_2d=None,
            masks={"full_attention": mask},
            position_ids=pos,
            cu_seqlens=None,
            max_seqlen=None,
            rope=lambda dim: (cos, sin),
            cache=our_cache,
            past_length=0,
        )
        got = ours(x, ctx)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(our_cache.layers[0].keys, ref_cache.layers[0].keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(our_cache.layers[0].values, ref_cache.layers[0].values, atol=ATOL, rtol=0)


def test_yarn_mscale_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    rope = {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64,
    }
    cfg = tiny(rope_parameters=rope)
    assert mla_softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(rope, 24**-0.5))
    assert mla_softmax_scale(tiny()) == pytest.approx(24**-0.5)


# ------------------------------------------------------------------------------------------------------------
# masks and dispatch


def test_latent_bias_has_the_same_meaning_for_every_mask_form():
    from transformers.masking_utils import create_causal_mask

    cfg = tiny()
    ids, am = left_padded()
    am = torch.cat([am, torch.ones(3, 2, dtype=torch.long)], dim=1)  # 2 new tokens after 9 cached ones
    emb = torch.zeros(3, 2, 64)
    cache = HybridCache(config=cfg)
    for layer_idx in range(2):
        cache.update(torch.zeros(3, 1, 9, 32), torch.zeros(3, 1, 9, 8), layer_idx)
    cache.advance(9)  # what the model does after a forward: the cache's length is its own count
    ctx = MixerContext(
        padding_mask=None,
        attention_mask_2d=am,
        masks={},
        position_ids=torch.zeros(3, 2),
        cu_seqlens=None,
        max_seqlen=None,
        rope=None,
        cache=None,
        past_length=9,
    )
    allowed = []
    # flex's BlockMask is not a tensor; building a real one compiles for ~15 s on CPU, so a stand-in object
    # checks the "rebuild from ctx.attention_mask_2d" branch.
    for impl in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        cfg._attn_implementation = impl
        if impl == "flash_attention_2":
            mask = am  # what transformers hands flash kernels: the 2D padding mask
        elif impl == "flex_attention":
            mask = object()
        else:
            mask = compat.build_mask(
                create_causal_mask,
                config=cfg,
                inputs_embeds=emb,
                attention_mask=am,
                cache=cache,
                position_ids=torch.tensor([[9, 10]] * 3),
            )
        allowed.append(latent_attention_bias(mask, ctx, 2, 11, emb.device).expand(3, 1, 2, 11) == 0)
    expected = am.bool()[:, None, None, :] & (torch.arange(11)[None, :] <= torch.tensor([[9], [10]]))
    for got in allowed:
        assert torch.equal(got, expected.expand(3, 1, 2, 11))
    no_pad = MixerContext(
        padding_mask=None,
        attention_mask_2d=None,
        masks={},
        position_ids=torch.zeros(1, 2),
        cu_seqlens=None,
        max_seqlen=None,
        rope=None,
        cache=None,
        past_length=9,
    )
    assert latent_attention_bias(None, no_pad, 1, 10, emb.device) is None  # sdpa decode: nothing masked
    assert torch.equal(latent_attention_bias(None, no_pad, 2, 11, emb.device)[0, 0] == 0, expected[0, 0])


def test_absorbed_is_used_for_decode_only():
    mixer = build(tiny()).model.layers[0].mixer
    assert not mixer.uses_absorbed(8, 8, 0)  # prefill
    assert mixer.uses_absorbed(1, 4096, 4095)  # decode
    assert not mixer.uses_absorbed(512, 4096, 3584)  # a long chunk: expanding is cheaper
    mixer.config.mla_decode = "naive"
    assert not mixer.uses_absorbed(1, 4096, 4095)


# ------------------------------------------------------------------------------------------------------------
# naive vs absorbed, invariances


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_equals_naive_decode_with_left_padding(attn, q_lora_rank, monkeypatch):
    counter = CountAbsorbed(monkeypatch)
    model = build(tiny(q_lora_rank=q_lora_rank), attn=attn)
    ids, mask = left_padded()
    for chunk in (1, 2):  # 2: several new tokens per step, so causality inside the chunk matters
        set_decode(model, "naive")
        naive, _ = decode_logits(model, ids, mask, chunk=chunk)
        calls = counter.calls
        set_decode(model, "absorbed")
        absorbed, _ = decode_logits(model, ids, mask, chunk=chunk)
        assert counter.calls - calls == 2 * 4 // chunk  # 2 layers, every decode step
        torch.testing.assert_close(absorbed, naive, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("decode", ["absorbed", "naive"])
def test_full_forward_equals_prefill_plus_cached_decode(attn, decode, monkeypatch):
    counter = CountAbsorbed(monkeypatch)
    model = build(tiny(), attn=attn, decode=decode)
    ids = torch.randint(1, 96, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        pieces, cache, start = [], None, 0
        for size in (5, 3, 1, 1, 2):  # prefill, then a 3-token chunk (causal inside it), then single tokens
            out = model(ids[:, start : start + size], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache, start = out.cache, start + size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    assert counter.calls == (8 if decode == "absorbed" else 0)  # 4 cached steps × 2 layers


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16_absorbed_and_naive_stay_near_fp32(attn):
    """bf16 keeps 8 mantissa bits (~4e-3 relative); after a few bf16 GEMMs O(1) logits move by ~3e-3 in either
    path (measured): both must stay within 2e-2 of the fp32 model, and absorbed no further than naive is,
    within that."""
    ids, mask = left_padded()
    ref, _ = decode_logits(build(tiny(), attn=attn, decode="naive"), ids, mask)
    model = build(tiny(), attn=attn).to(torch.bfloat16)
    for decode in ("naive", "absorbed"):
        set_decode(model, decode)
        got, _ = decode_logits(model, ids, mask)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_row_equals_prompt_alone(attn):
    model = build(tiny(), attn=attn, decode="absorbed")
    ids, mask = left_padded()
    batch, new = decode_logits(model, ids, mask)
    for row in range(3):
        real = mask[row].bool()
        alone, _ = decode_logits(
            model, ids[row : row + 1, real], mask[row : row + 1, real], new=new[row : row + 1]
        )
        torch.testing.assert_close(batch[row : row + 1], alone, atol=ATOL, rtol=0)


def test_sdpa_equals_eager_forward_and_gradients():
    ids, mask = left_padded()
    grads, logits = [], []
    for attn in ("eager", "sdpa"):
        model = build(tiny(), attn=attn).train()
        # Padded rows attend to nothing and are garbage by design (differently in each kernel): keep them, and
        # the first real token they would "predict", out of the loss.
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        logits.append(out.logits[mask.bool()])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=ATOL, rtol=0, msg=name)


def test_absorbed_decode_gradients_equal_naive():
    """The absorbed path is differentiable (DSA and cached fine-tuning train through it)."""
    ids = torch.randint(1, 96, (2, 6))
    grads = []
    for decode in ("naive", "absorbed"):
        model = build(tiny(), decode=decode)
        with torch.no_grad():
            cache = model(ids[:, :5], use_cache=True).cache
        model.train()
        model(ids[:, 5:], past_key_values=cache, use_cache=True).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert "model.layers.0.mixer.kv_b_proj.weight" in grads[1]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=ATOL, rtol=0, msg=name)


def test_latent_mqa_form_equals_absorbed_attention():
    """``latent_qkv`` (what a sparse/DSA kernel consumes) + plain softmax attention = ``attend_absorbed``."""
    mixer = build(tiny()).model.layers[0].mixer
    b, t, s, h = 2, 3, 7, 4
    q_nope, q_pe = torch.randn(b, t, h, 16), torch.randn(b, t, h, 8)
    c_kv, k_pe = torch.randn(b, s, 32), torch.randn(b, s, 8)
    ctx = MixerContext(
        padding_mask=None,
        attention_mask_2d=None,
        masks={},
        position_ids=torch.zeros(b, t),
        cu_seqlens=None,
        max_seqlen=None,
        rope=None,
        cache=None,
        past_length=s - t,
    )
    w_uk, w_uv = mixer.absorbed_weights()
    q, k, v = mixer.latent_qkv(q_nope, q_pe, c_kv, k_pe, w_uk)
    assert q.shape == (b, t, h, 40) and k.shape == (b, s, 1, 40) and v.shape == (b, s, 1, 32)
    scores = torch.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * mixer.scaling
    causal = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o_lat = torch.einsum("bhts,bsr->bthr", probs, v[:, :, 0])
    expected = mixer.attend_absorbed(q_nope, q_pe, c_kv, k_pe, None, ctx, (w_uk, w_uv))
    torch.testing.assert_close(mixer.latent_to_value(o_lat, w_uv), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("decode", ["absorbed", "naive"])
def test_generate_greedy_matches_argmax_loop_without_cache(decode):
    model = build(tiny(), decode=decode)
    ids = torch.randint(1, 96, (2, 5))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)


def test_save_load_identical_logits(tmp_path):
    model = build(tiny())
    ids = torch.randint(1, 96, (2, 7))
    model.save_pretrained(tmp_path / "m")
    loaded = HybridForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.mixer_types == ["mla", "mla"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hybrid_with_attention_and_dense_mlp():
    cfg = tiny(
        num_hidden_layers=3,
        mixer_types=["mla", "attention", "mla"],
        mlp_types=["dense", "none", "dense"],
        num_key_value_heads=2,
    )
    model = build(cfg, decode="absorbed")
    ids, mask = left_padded()
    batch, _ = decode_logits(model, ids, mask)
    set_decode(model, "naive")
    naive, new = decode_logits(model, ids, mask)
    torch.testing.assert_close(batch, naive, atol=ATOL, rtol=0)
    with torch.no_grad():
        full = model(
            torch.cat([ids, new], 1), attention_mask=torch.cat([mask, torch.ones_like(new)], 1)
        ).logits
    torch.testing.assert_close(
        batch, full[:, 8:], atol=ATOL, rtol=0
    )  # prefill's last position + 4 decode steps
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 12)


# ------------------------------------------------------------------------------------------------------------
# PEFT


def lora_model(model, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLA_TARGETS, **kwargs)
    return peft.get_peft_model(model, config)


def randomise_lora(model, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def naive_and_absorbed(model):
    ids, mask = left_padded()
    set_decode(model, "naive")
    naive, _ = decode_logits(model, ids, mask)
    set_decode(model, "absorbed")
    absorbed, _ = decode_logits(model, ids, mask)
    return naive, absorbed


def test_absorbed_respects_unmerged_lora_on_kv_b_proj(monkeypatch):
    counter = CountAbsorbed(monkeypatch)
    base = build(tiny())
    ref_naive, _ = naive_and_absorbed(base)
    model = lora_model(base).eval()
    randomise_lora(model, seed=3)  # non-zero B, so the adapter changes the output
    kv_b = mla_layers(model)[0].kv_b_proj
    assert torch.count_nonzero(kv_b.lora_B["default"].weight) > 0

    naive, absorbed = naive_and_absorbed(model)
    assert counter.calls > 0
    torch.testing.assert_close(absorbed, naive, atol=ATOL, rtol=0)
    assert (naive - ref_naive).abs().max() > 1e-2  # the adapter really matters

    randomise_lora(model, seed=4)  # new adapter weights: no stale absorbed weight may survive
    naive2, absorbed2 = naive_and_absorbed(model)
    torch.testing.assert_close(absorbed2, naive2, atol=ATOL, rtol=0)
    assert (naive2 - naive).abs().max() > 1e-2

    with model.disable_adapter():
        off_naive, off_absorbed = naive_and_absorbed(model)
    torch.testing.assert_close(off_absorbed, off_naive, atol=ATOL, rtol=0)
    torch.testing.assert_close(off_naive, ref_naive, atol=ATOL, rtol=0)

    model.merge_adapter()
    merged_naive, merged_absorbed = naive_and_absorbed(model)
    torch.testing.assert_close(merged_absorbed, merged_naive, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged_naive, naive2, atol=ATOL, rtol=0)
    model.unmerge_adapter()


def test_unreadable_adapters_fall_back_to_naive(monkeypatch):
    model = lora_model(build(tiny()), use_dora=True).eval()
    randomise_lora(model, seed=5)
    kv_b = mla_layers(model)[0].kv_b_proj
    assert effective_linear_weight(kv_b) is None
    counter = CountAbsorbed(monkeypatch)
    naive, absorbed = naive_and_absorbed(model)
    assert counter.calls == 0
    torch.testing.assert_close(absorbed, naive, atol=0, rtol=0)

    dropout = lora_model(build(tiny()), lora_dropout=0.5)
    kv_b = mla_layers(dropout)[0].kv_b_proj
    dropout.train()
    assert effective_linear_weight(kv_b) is None  # dropout on the LoRA input is not a weight
    dropout.eval()
    assert effective_linear_weight(kv_b) is not None


def test_peft_lora_trains_saves_reloads_merges(tmp_path):
    model = lora_model(build(tiny()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("kv_b_proj.lora_A" in n for n in trainable) and any("q_a_proj.lora_B" in n for n in trainable)
    ids = torch.randint(1, 96, (4, 10))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    ids, mask = left_padded()
    expected, _ = decode_logits(model, ids, mask)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(build(tiny()), tmp_path / "adapter").eval()
    got, _ = decode_logits(reloaded, ids, mask)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged.model.layers[0].mixer.kv_b_proj) is torch.nn.Linear
    got, _ = decode_logits(merged, ids, mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_fallback_warning_is_logged_once(caplog):
    model = lora_model(build(tiny()), use_dora=True).eval()
    with caplog.at_level(logging.WARNING, logger=mla_module.logger.name):
        decode_logits(model, *left_padded())
    assert sum("naive path" in r.message for r in caplog.records) == 2  # once per MLA layer


# ------------------------------------------------------------------------------------------------------------
# options for dense -> MLA conversion: several rope keys, no latent norms, source RoPE pairs, dn = 0

EXTENDED = {
    "rope_heads_2": dict(mla_rope_heads=2),
    "rope_heads_4_no_norm": dict(mla_rope_heads=4, mla_latent_norm=False, q_lora_rank=None),
    "rope_pairs": dict(mla_rope_pairs=[0, 3, 5, 7], head_dim=16),
    "all_rotary": dict(qk_nope_head_dim=0, qk_rope_head_dim=16, mla_rope_heads=2, mla_latent_norm=False),
    "no_rope_channels": dict(qk_nope_head_dim=16, qk_rope_head_dim=0),  # GLM-5-Next: NoPE, cache c_kv only
}


@pytest.mark.parametrize("name", sorted(EXTENDED))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_extended_options_absorbed_equals_naive_and_full_forward(name, attn, monkeypatch):
    counter = CountAbsorbed(monkeypatch)
    model = build(tiny(**EXTENDED[name]), attn=attn)
    ids, mask = left_padded()
    set_decode(model, "naive")
    naive, new = decode_logits(model, ids, mask)
    set_decode(model, "absorbed")
    absorbed, _ = decode_logits(model, ids, mask)
    assert counter.calls == 2 * 4
    torch.testing.assert_close(absorbed, naive, atol=ATOL, rtol=0)
    with torch.no_grad():  # cached decode == one forward over prompt + fed tokens
        full = model(torch.cat([ids, new], 1), attention_mask=torch.ones(3, 13, dtype=torch.long)).logits
    torch.testing.assert_close(absorbed[0, 1:], full[0, -4:], atol=ATOL, rtol=0)  # row 0 has no padding
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    per_token = model.config.kv_lora_rank + model.config.mla_rope_heads * model.config.qk_rope_head_dim
    k, v = cache.layers[0].keys, cache.layers[0].values
    assert k.shape[-1] + v.shape[-1] == per_token and k.shape[1] == v.shape[1] == 1


def test_equal_rope_keys_equal_one_shared_key():
    """R rope keys that are all the same key compute the same function as DeepSeek's single shared one."""
    one = build(tiny(mla_rope_heads=1))
    many = build(tiny(mla_rope_heads=4))
    state = one.state_dict()
    r, dr = 32, 8
    for key, value in list(state.items()):
        if key.endswith("kv_a_proj_with_mqa.weight"):
            state[key] = torch.cat([value[:r], value[r:].repeat(4, 1)])
    many.load_state_dict(state)
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            many(ids, attention_mask=mask).logits, one(ids, attention_mask=mask).logits, atol=ATOL, rtol=0
        )
    assert dr * 4 + r == many.model.layers[0].mixer.kv_a_proj_with_mqa.out_features


def test_uniform_rope_pairs_equal_the_table_of_size_dr():
    """Pairs 0, s, 2s, ... of the head_dim table are the frequencies of the table of size dr (s = head_dim/dr,
    default RoPE, power-of-two sizes: bitwise the same frequencies)."""
    plain = build(tiny(head_dim=32))
    pairs = build(tiny(head_dim=32, mla_rope_pairs=[0, 4, 8, 12]))
    pairs.load_state_dict(plain.state_dict())
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            pairs(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits, atol=0, rtol=0
        )
    other = build(tiny(head_dim=32, mla_rope_pairs=[0, 1, 2, 3]))
    other.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, plain(ids).logits, atol=1e-3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mla_rope_heads=3), "mla_rope_heads=3"),
        (dict(mla_rope_pairs=[0, 1, 2]), "mla_rope_pairs"),
        (dict(mla_rope_pairs=[3, 2, 1, 0]), "mla_rope_pairs"),
        (dict(mla_rope_pairs=[0, 1, 2, 99]), "mla_rope_pairs"),
        (dict(qk_nope_head_dim=-1), "qk_nope_head_dim=-1"),
        (dict(qk_rope_head_dim=-2), "qk_rope_head_dim=-2"),
        (dict(qk_nope_head_dim=0, qk_rope_head_dim=0), "qk_nope_head_dim=0 and qk_rope_head_dim=0"),
    ],
)
def test_extended_options_are_validated(overrides, field):
    with pytest.raises(Exception, match=field.replace("[", r"\[")):  # a strict-dataclass error wrapping it
        tiny(**overrides)


def test_no_latent_norm_has_no_norm_parameters():
    model = build(tiny(mla_latent_norm=False))
    names = [n for n, _ in model.named_parameters()]
    assert not any("a_layernorm" in n for n in names)
    from hf_hybrid.cost import estimate_cost

    assert estimate_cost(model.config).total_params == sum(p.numel() for p in model.parameters())


def test_no_rope_channels_is_position_free():
    """qk_rope_head_dim=0: nothing is rotated, so in one layer the last token's output does not depend on the
    order of the tokens before it; with rope channels it does."""
    ids = torch.randint(0, 64, (1, 6))
    swapped = ids[:, [3, 1, 4, 0, 2, 5]]
    for rope, same in ((0, True), (8, False)):
        model = build(
            tiny(qk_nope_head_dim=16, qk_rope_head_dim=rope, num_hidden_layers=1, mixer_types=["mla"])
        )
        with torch.no_grad():
            a, b = model(ids).logits[:, -1], model(swapped).logits[:, -1]
        assert torch.allclose(a, b, atol=ATOL) is same
