"""``glm5_next_text`` (the text decoder of GLM-5-Next's vision-language checkpoint) both ways, on tiny
random models built with transformers' own ``Glm5NextForConditionalGeneration``: bounded KDA, DSA on NoPE MLA
with a pooled indexer and a shared one, clamped SwiGLU in dense MLPs and shared / routed experts, mHC streams,
a dense layer then MoE.

Tolerance: fp32, 1e-5 absolute on the logits (the same sums in another order; KDA's chunked form as for
kimi_linear; DSA compared on inputs whose pool scores have no tie at the top-k cut, checked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Glm5NextForConditionalGeneration

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.convert.native import NativeConversionError, export_native, get_family, import_native

sys.path.insert(0, str(Path(__file__).parent))
from test_native_families import (  # noqa: E402  (shared with the family tests)
    assert_cached_decode_equals_full_forward,
    max_err,
    tie_free_batch,
)
from test_native_families import build_native as build_family_native  # noqa: E402

ATOL = 1e-5
FAMILY = "glm5_next_text"


def build_native(seed: int = 0, **overrides) -> Glm5NextForConditionalGeneration:
    return build_family_native(FAMILY, seed, **overrides)


def native_logits(native, ids, mask):
    with torch.no_grad(), get_family(FAMILY).native_context():
        return native(input_ids=ids, attention_mask=mask).logits


def test_import_is_exact_with_left_padding_and_every_feature_used():
    native = build_native()
    hybrid = import_native(native)
    cfg = hybrid.config
    # what the tiny config exercises: KDA with the bounded gate, DSA on NoPE MLA with pools of 2 and an
    # index-reuse layer, the SwiGLU clamp everywhere, mHC streams, a dense layer then MoE
    assert cfg.mixer_types == ["kda", "dsa", "dsa", "kda"] and cfg.mlp_types == ["dense", "moe", "moe", "moe"]
    assert cfg.dsa_indexer_types == ["full", "full", "shared", "full"] and cfg.index_pool_size == 2
    assert cfg.qk_rope_head_dim == 0 and cfg.kda_gate_lower_bound == -5.0
    assert cfg.mlp_swiglu_limit == cfg.moe_swiglu_limit == 0.3 and cfg.hyper_connections == "mhc"
    assert cfg.index_topk < 12  # sparse selection really happens
    ids, mask = tie_free_batch(hybrid)
    with torch.no_grad():
        ours = hybrid(input_ids=ids, attention_mask=mask).logits
    assert max_err(native_logits(native, ids, mask), ours, mask) <= ATOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(index_topk=64),  # the dense limit: exact whatever the ties
        dict(linear_lower_bound=None, swiglu_limit=float("inf"), index_topk=64),  # unbounded gate, no clamp
        dict(n_shared_experts=0, index_topk=64, index_kpool=4, hc_mult=3),
    ],
    ids=["dense_limit", "unbounded_unclamped", "no_shared_pool4_hc3"],
)
def test_variants_are_exact(overrides):
    native = build_native(**overrides)
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
    assert_cached_decode_equals_full_forward(hybrid, ids, mask)
    # greedy generation with the cache: the same tokens as transformers' own model
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = hybrid.generate(input_ids=ids, attention_mask=mask, **kw)
    with get_family(FAMILY).native_context():
        want = native.generate(input_ids=ids, attention_mask=mask, **kw)
    assert got.tolist() == want.tolist()


def test_export_reloads_in_transformers_alone_identical(tmp_path, capsys):
    native = build_native()
    hybrid = import_native(native)
    export_native(hybrid, tmp_path / "out")  # the family it was imported from
    assert "placeholder vision tower" in capsys.readouterr().out
    reloaded = Glm5NextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask = tie_free_batch(hybrid)
    assert torch.equal(native_logits(reloaded, ids, mask), native_logits(native, ids, mask))
    src, back = native.state_dict(), reloaded.state_dict()
    text = [k for k in src if not k.startswith("model.visual.")]
    assert all(torch.equal(src[k], back[k]) for k in text)  # import ∘ export = identity on the decoder
    assert all(not back[k].any() for k in back if k.startswith("model.visual."))  # the placeholder
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "glm5_next"
    # DSA layers spelled "full_attention", which every release's config class respells as its own (5.16:
    # "deepseek_sparse_attention", later "indexed_attention"): the export loads under the serving pins
    assert written["text_config"]["layer_types"] == [
        "linear_attention",
        "full_attention",
        "full_attention",
        "linear_attention",
    ]
    assert reloaded.config.text_config.layer_types[1] == "indexed_attention"
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())  # the card names the placeholder
    assert "## Vision tower: a placeholder" in card and "every weight of `model.visual.*` is zero" in card
    assert "`Glm5NextForConditionalGeneration.from_pretrained`" in card and "AutoModelForCausalLM" not in card
    # the exported directory imports again (the vision tower dropped with a note)
    again = import_native(tmp_path / "out")
    assert "dropping model.visual" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, attention_mask=mask).logits,
            hybrid(input_ids=ids, attention_mask=mask).logits,
        )


def _our_glm5_like(**overrides) -> HybridForCausalLM:
    """A model of ours (not an import) in GLM-5-Next's layout: defaults where the family has no say."""
    kw = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        mixer_types=["kda", "dsa", "dsa"],
        mlp_types=["dense", "moe", "moe"],
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        dsa_base="mla",
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=0,
        v_head_dim=8,
        index_n_heads=4,
        index_head_dim=8,
        index_topk=8,
        index_pool_size=2,
        kda_num_heads=2,
        kda_head_dim=8,
        kda_gate_rank=8,
        hyper_connections="mhc",
        hc_mult=2,
        router_scoring_func="sigmoid",
        index_norm_eps=1e-6,  # the family's indexer LayerNorm eps (another value is refused, named)
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    return HybridForCausalLM(HybridConfig(**kw)).eval()


def test_export_of_our_own_model_reloads_in_transformers_alone(tmp_path):
    """From one of *our* models (defaults, an unbounded KDA gate, no clamp): the export writes what
    transformers would otherwise fill in differently (swiglu_limit=inf, linear_lower_bound=None), and
    transformers alone computes the same logits."""
    ours = _our_glm5_like()
    export_native(ours, tmp_path / "out", to=FAMILY)
    reloaded = Glm5NextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    text = reloaded.config.text_config
    assert text.linear_lower_bound is None and text.swiglu_limit == float("inf")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
    assert max_err(native_logits(reloaded, ids, mask), want, mask) <= ATOL


def test_cli_import_and_export(tmp_path, capsys):
    from hf_hybrid import cli

    build_native().save_pretrained(tmp_path / "native")
    assert cli.main(["import", str(tmp_path / "native"), str(tmp_path / "ours")]) == 0
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", FAMILY]) == 0
    assert cli.main(["inspect", str(tmp_path / "native"), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["cache_by_mixer"]["dsa"]["layers"] == 2 and report["cache_by_mixer"]["kda"]["layers"] == 2
    assert (tmp_path / "back" / "config.json").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(index_kpool_always_select_tail=False), r"index_kpool_always_select_tail=False"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
        (dict(linear_lower_bound=2.0), r"linear_lower_bound=2.0"),
        (dict(swiglu_limit=-1.0), r"swiglu_limit=-1.0"),
        # a shared DSA layer after a KDA layer: transformers raises in the forward, we refuse the config
        (
            dict(
                layer_types=[
                    "indexed_attention",
                    "linear_attention",
                    "indexed_attention",
                    "linear_attention",
                ],
                indexer_types=["full", "full", "shared", "full"],
            ),
            r"indexer_types\[2\]='shared' \(layer 2\) does not directly follow",
        ),
    ],
)
def test_import_refusals_name_the_option(overrides, message):
    family = get_family(FAMILY)
    native_cfg = family.config_class(**{**family.tiny_config, **overrides})
    with pytest.raises(NativeConversionError, match=message):
        family.hybrid_config(native_cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_rope_head_dim=4), r"qk_rope_head_dim=4"),
        (dict(hyper_connections="none"), r"hyper_connections='none'"),
        (dict(mlp_swiglu_limit=0.5, moe_swiglu_limit=0.2), r"mlp_swiglu_limit=0.5 differs"),
        (dict(mixer_types=["kda", "attention", "dsa"]), r"mixer_types\[1\]='attention'"),
        (
            dict(mixer_types=["dsa", "kda", "dsa"], dsa_indexer_types=["full", "full", "shared"]),
            r"dsa_indexer_types\[2\]='shared' \(layer 2\) does not directly follow",
        ),
        (dict(kda_gate_rank=4), r"kda_gate_rank=4"),
    ],
)
def test_export_refusals_name_the_field(overrides, message, tmp_path):
    model = _our_glm5_like(**overrides)
    with pytest.raises(NativeConversionError, match=message):
        export_native(model, tmp_path / "out", to=FAMILY)
    assert not (tmp_path / "out").exists()


def test_glm5_next_like_preset_is_transformers_default_config():
    """The preset is what importing transformers' default Glm5NextTextConfig gives (same function: every
    functional field), and it exports back to that config's sizes."""
    from hf_hybrid.convert.native.base import functional_fields
    from hf_hybrid.presets import preset_config

    family = get_family(FAMILY)
    imported = family.hybrid_config(family.config_class())
    preset = preset_config("glm5-next-like")
    assert functional_fields(preset) == functional_fields(imported)
    native = family.native_config(preset)
    default = family.config_class()
    for name in (
        "hidden_size",
        "num_hidden_layers",
        "index_kpool",
        "swiglu_limit",
        "linear_lower_bound",
        "hc_mult",
    ):
        assert getattr(native, name) == getattr(default, name), name
    assert native.layer_types == default.layer_types and native.mlp_layer_types == default.mlp_layer_types
