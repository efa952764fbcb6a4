"""``mistral_large4_text`` (the text decoder of Mistral-Large-4's vision-language checkpoint) both ways, on
tiny random models built with transformers' own ``MistralLarge4ForConditionalGeneration``: DSA on MLA without
q-LoRA, NoPE layers, cross-layer KV sharing, YaRN with the learned LeRoPE scale, query softmax scaling,
logit softcapping, a dense layer then MoE.

Tolerance: fp32, 1e-5 absolute on the logits (the same sums in another order; DSA compared on inputs whose
indexer scores have no tie at the top-k cut, checked). The query scaling reads absolute positions, so the
native model is given the positions ours computes for a left-padded batch (generate does the same).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import MistralLarge4ForConditionalGeneration

from hf_hybrid.convert.native import NativeConversionError, export_native, import_native
from hf_hybrid.testing import check_layer_kind

sys.path.insert(0, str(Path(__file__).parent))
from test_native_families import (  # noqa: E402  (shared with the family tests)
    assert_cached_decode_equals_full_forward,
    max_err,
    tie_free_batch,
)
from test_native_families import build_native as build_family_native  # noqa: E402

ATOL = 1e-5
FAMILY = "mistral_large4_text"


def build_native(seed: int = 0, **overrides) -> MistralLarge4ForConditionalGeneration:
    model = build_family_native(FAMILY, seed, **overrides)
    # LeRoPE's alpha: a parameter on 5.24+, a persistent buffer on 5.23 (which randomise leaves alone)
    alpha = model.model.language_model.rotary_emb.alpha
    with torch.no_grad():
        alpha.copy_(0.1 * torch.randn(alpha.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def native_logits(native, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return native(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def test_import_is_exact_with_left_padding_and_every_feature_used():
    native = build_native()
    hybrid = import_native(native)
    cfg = hybrid.config
    # what the tiny config exercises: sharing (a "reuse" and a "reuse_but_indexer" layer), NoPE MLA layers, an
    # index-reuse layer, YaRN + LeRoPE, the query scaling, the indexer's query norm, softcapping
    assert cfg.kv_source_layers == [0, 0, 2, 2] and cfg.nope_layers == [2, 3]
    assert cfg.dsa_indexer_types == ["full", "shared", "full", "full"] and cfg.q_lora_rank is None
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.final_logit_softcapping == 30.0
    assert cfg.query_log_scaling and cfg.index_q_norm and cfg.rope_learned_scale
    assert hybrid.model.rope_log_scale.abs().sum() > 0  # the randomised LeRoPE alpha was carried over
    assert cfg.index_topk < 12  # sparse selection really happens
    ids, mask = tie_free_batch(hybrid)
    with torch.no_grad():
        ours = hybrid(input_ids=ids, attention_mask=mask).logits
    assert max_err(native_logits(native, ids, mask), ours, mask) <= ATOL


def test_dense_limit_is_exact_whatever_the_ties():
    native = build_native(index_topk=64)
    hybrid = import_native(native)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ours = hybrid(input_ids=ids, attention_mask=mask).logits
    assert max_err(native_logits(native, ids, mask), ours, mask) <= ATOL


def test_cached_decode_and_generate_match_transformers():
    native = build_native()
    hybrid = import_native(native)
    ids, mask = tie_free_batch(hybrid, length=8)
    # our cached decode equals our full forward (the shared latent is cached once, by layers 0 and 2)
    cache = assert_cached_decode_equals_full_forward(hybrid, ids, mask)
    assert type(cache.layers[1]).__name__ == "DummyLayer" and cache.layers[0].keys.shape[-2] == 8
    # greedy generation with the cache: the same tokens as transformers' own model
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = hybrid.generate(input_ids=ids, attention_mask=mask, **kw)
    want = native.generate(input_ids=ids, attention_mask=mask, **kw)
    assert got.tolist() == want.tolist()


def test_export_reloads_in_transformers_alone_identical(tmp_path, capsys):
    native = build_native()
    hybrid = import_native(native)
    export_native(hybrid, tmp_path / "out")  # the family it was imported from
    assert "placeholder vision tower" in capsys.readouterr().out
    reloaded = MistralLarge4ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask = tie_free_batch(hybrid)
    assert torch.equal(native_logits(reloaded, ids, mask), native_logits(native, ids, mask))
    src, back = native.state_dict(), reloaded.state_dict()
    text = [k for k in src if not k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert all(torch.equal(src[k], back[k]) for k in text)  # import ∘ export = identity on the decoder
    assert all(not back[k].any() for k in back if k.startswith("model.vision_tower."))  # the placeholder
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mistral_large4"
    # the card says so too: the placeholder, its modules, and the class that loads it
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert "## Vision tower: a placeholder" in card
    assert "every weight of `model.multi_modal_projector.*`, `model.vision_tower.*` is zero" in card
    assert "`MistralLarge4ForConditionalGeneration.from_pretrained`" in card
    assert "AutoModelForCausalLM" not in card  # which has no mistral_large4 class
    # the exported directory imports again (the vision tower dropped with a note)
    again = import_native(tmp_path / "out")
    assert "dropping model.vision_tower" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, attention_mask=mask).logits,
            hybrid(input_ids=ids, attention_mask=mask).logits,
        )


def test_cli_import_and_export(tmp_path, capsys):
    from hf_hybrid import cli

    build_native().save_pretrained(tmp_path / "native")
    assert cli.main(["import", str(tmp_path / "native"), str(tmp_path / "ours")]) == 0
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", FAMILY]) == 0
    assert cli.main(["inspect", str(tmp_path / "native"), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["cache_by_mixer"]["dsa"]["layers"] == 4
    assert (tmp_path / "back" / "config.json").is_file()


def test_a_sharing_pattern_transformers_reads_differently_is_refused(tmp_path):
    """transformers keys shared latents by RoPE use: layers 0 and 1 both store a RoPE latent, so layer 2 reads
    layer 1's, not the layer 0 its config names. Refused naming the field, before anything is written."""
    native = build_native(
        no_rope_layers=[1, 1, 1, 1], kv_source_layers=[0, 1, 0, 1], indexer_types=["full"] * 4
    )
    with pytest.raises(
        NativeConversionError, match=r"kv_source_layers\[2\]=0, .* layer 2 would read layer 1"
    ):
        import_native(native, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refusals_name_the_field(tmp_path):
    hybrid = import_native(build_native())
    cfg = hybrid.config.to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    from hf_hybrid import HybridConfig, HybridForCausalLM

    cases = [
        ({"q_lora_rank": 8, "index_q_norm": False}, r"q_lora_rank=8"),
        ({"query_log_scaling": False}, r"query_log_scaling=False"),
        ({"kv_source_layers": [0, 1, 0, 1], "nope_layers": None}, r"kv_source_layers\[2\]=0"),
    ]
    for overrides, message in cases:
        model = HybridForCausalLM(HybridConfig.from_dict({**cfg, **overrides}))
        with pytest.raises(NativeConversionError, match=message):
            export_native(model, tmp_path / "out", to=FAMILY)
        assert not (tmp_path / "out").exists()


def test_the_family_options_pass_the_kit_in_a_mix_of_their_own():
    """nope_layers on MLA / DSA, query_log_scaling, index_q_norm, rope_learned_scale, final_logit_softcapping
    and kv_source_layers together, outside any import: the kit's invariances (decode, padding, packing,
    generate, beam search, save/load, cost = cache bytes, gradients)."""
    overrides = dict(
        num_hidden_layers=5,
        mixer_types=["dsa", "mla", "dsa", "dsa", "gated_deltanet"],
        mlp_types=["dense", "moe", "moe", "dense", "moe"],
        q_lora_rank=None,
        nope_layers=[2, 3],
        kv_source_layers=[0, 0, 2, 2, 4],
        dsa_indexer_types=["full", "full", "full", "shared", "full"],
        index_topk=4,
        index_n_heads=2,
        index_head_dim=8,
        query_log_scaling=True,
        index_q_norm=True,
        rope_learned_scale=True,
        final_logit_softcapping=3.0,
    )
    assert len(check_layer_kind(config_overrides=overrides)) == 11


# ---- the options on their own: naive references (no transformers model involved) ---------------------------


def _mla_model(seed: int = 0, **overrides):
    from hf_hybrid import HybridForCausalLM
    from hf_hybrid.testing import tiny_config

    torch.manual_seed(seed)
    kw = {"num_hidden_layers": 2, "mixer_types": ["mla", "mla"], "q_lora_rank": None, **overrides}
    return HybridForCausalLM(tiny_config(**kw)).eval()


def test_query_log_scaling_with_a_constant_factor_is_a_scaled_query_projection():
    """scale = 0, bias = c: every query is multiplied by c, which is what multiplying q_proj by c does."""
    ids = torch.randint(1, 64, (2, 7))
    scaled = _mla_model(query_log_scaling=True)
    plain = _mla_model(query_log_scaling=False)
    with torch.no_grad():
        for layer_s, layer_p, c in zip(scaled.model.layers, plain.model.layers, (1.7, 0.6)):
            layer_s.mixer.softmax_scaling.bias.fill_(c)
            layer_p.mixer.q_proj.weight.mul_(c)
        torch.testing.assert_close(scaled(ids).logits, plain(ids).logits, atol=ATOL, rtol=0)
        # and the position term: factor s·log(1 + t) + b per position t, against the formula written out
        module = scaled.model.layers[0].mixer.softmax_scaling
        module.scale.copy_(torch.tensor([0.5, -0.25, 1.0, 0.0]))
        q = torch.randn(1, 5, 4, 3)
        want = q * (module.scale * torch.log1p(torch.arange(5.0))[:, None] + module.bias)[None, :, :, None]
        torch.testing.assert_close(module(q, torch.arange(5)[None]), want, atol=ATOL, rtol=0)


def test_rope_learned_scale_multiplies_each_frequency():
    model = _mla_model(rope_learned_scale=True)
    dim = model.model.rope_scale_dim
    with torch.no_grad():
        model.model.rope_log_scale.copy_(torch.linspace(-0.5, 0.5, dim // 2))
    pos = torch.arange(9)[None]
    cos, sin = model.model._rope_fn(pos, torch.float32)(dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim)) * model.model.rope_log_scale.exp()
    angle = pos[..., None].float() * inv_freq
    torch.testing.assert_close(cos, torch.cat([angle, angle], -1).cos(), atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, torch.cat([angle, angle], -1).sin(), atol=ATOL, rtol=0)


def test_final_logit_softcapping_caps_the_logits():
    capped = _mla_model(final_logit_softcapping=0.05)
    plain = _mla_model()
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        a, b = capped(ids).logits, plain(ids).logits
    torch.testing.assert_close(a, 0.05 * torch.tanh(b / 0.05), atol=ATOL, rtol=0)
    assert a.abs().max() < 0.05


def test_a_nope_mla_layer_has_no_rope_key_and_ignores_positions():
    """nope_layers on an MLA layer: no rope channels in kv_a_proj_with_mqa, the whole query/key head from
    kv_b_proj, a cache of c_kv only, and the layer alone is invariant to shifting every position."""
    model = _mla_model(nope_layers=[0, 1])
    mixer, cfg = model.model.layers[0].mixer, model.config
    assert mixer.kv_a_proj_with_mqa.out_features == cfg.kv_lora_rank
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert mixer.kv_b_proj.out_features == cfg.num_attention_heads * (dqk + cfg.v_head_dim)
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        shifted = model(ids, position_ids=torch.arange(6)[None] + 11).logits
        torch.testing.assert_close(model(ids).logits, shifted, atol=ATOL, rtol=0)
    with pytest.raises(
        Exception, match=r"nope_layers names layer 1, whose mixer_types\[1\]='gated_deltanet'"
    ):
        _mla_model(mixer_types=["mla", "gated_deltanet"], nope_layers=[1])
