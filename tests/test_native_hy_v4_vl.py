"""``hy_v4_vl_text`` (the text decoder of HY-V4-VL's vision-language checkpoint) both ways, on tiny random
models built with transformers' own ``HYV4VLForConditionalGeneration``: HY-V4's decoder (DSA on MLA with full
and shared indexers, output gate, sinks, clamped-SwiGLU MoE, iHC streams) with M-RoPE, RoPE on interleaved
pairs in every release, and latent norms at ``rms_norm_eps``.

Tolerance: fp32, 1e-5 absolute on the logits (the same sums in another order; DSA compared on inputs whose
indexer scores have no tie at the top-k cut, checked). Run under transformers 5.24 and 5.25: HY-V4-VL rotates
interleaved pairs in both (HY-V4 itself rotates halves on 5.24), so the same tests hold on each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from hf_hybrid.convert.native import NativeConversionError, export_native, get_family, import_native
from hf_hybrid.convert.native.hy_v4_vl import mrope_section

sys.path.insert(0, str(Path(__file__).parent))
from test_native_families import (  # noqa: E402  (shared with the family tests)
    assert_cached_decode_equals_full_forward,
    max_err,
    tie_free_batch,
)
from test_native_families import build_native as build_family_native  # noqa: E402

ATOL = 1e-5
FAMILY = "hy_v4_vl_text"
if not get_family(FAMILY).available:
    pytest.skip("hy_v4_vl needs transformers >= 5.24, not installed here", allow_module_level=True)
from transformers import HYV4VLForConditionalGeneration  # noqa: E402  (where the family exists)


def build_native(seed: int = 0, wrapper: dict | None = None, **overrides) -> HYV4VLForConditionalGeneration:
    return build_family_native(FAMILY, seed, wrapper=wrapper, **overrides)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def realigned(model):
    """``model`` with every parameter copied to fresh memory. Weights loaded from safetensors sit at unaligned
    addresses of the file's mmap, where the batched expert matmul (ours and transformers') rounds differently
    (≤ 1e-6 on the logits here): equal weights give bit-identical logits only at equal alignment."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def test_import_is_exact_with_left_padding():
    native = build_native()
    hybrid = import_native(native)
    cfg = hybrid.config
    # the latent norms follow rms_norm_eps (1e-5 here, HY-V4's fixed 1e-6 would differ); M-RoPE's sections
    # are not carried (text positions make them irrelevant); HY-V4's options
    assert cfg.mla_norm_eps is None and cfg.rms_norm_eps == 1e-5
    assert "mrope_section" not in cfg.rope_parameters
    assert cfg.attention_sinks and cfg.mla_gate_proj and cfg.hyper_connections == "ihc" and cfg.hc_mult == 2
    assert cfg.dsa_indexer_types == ["full", "shared", "full", "shared"] and cfg.moe_swiglu_limit == 0.3
    assert cfg.index_topk < 12  # sparse selection really happens
    ids, mask = tie_free_batch(hybrid)
    assert max_err(logits(native, ids, mask), logits(hybrid, ids, mask), mask) <= ATOL


def test_dense_limit_is_exact_whatever_the_ties():
    native = build_native(index_topk=64)
    hybrid = import_native(native)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert max_err(logits(native, ids, mask), logits(hybrid, ids, mask), mask) <= ATOL


def test_mrope_sections_do_not_change_the_text_function():
    """Why the import drops ``mrope_section``: transformers' own model gives bit-identical text logits for
    any split (the three position streams of text tokens are equal)."""
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    splits = ([2, 1, 1], [4, 0, 0], [0, 2, 2])
    rope = {"rope_type": "default", "rope_theta": 1e4}
    outs = [logits(build_native(rope_parameters={**rope, "mrope_section": s}), ids, mask) for s in splits]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert mrope_section(8) == [2, 1, 1] and mrope_section(64) == [12, 10, 10]  # 64: transformers' default


def test_cached_decode_and_generate_match_transformers():
    native = build_native()
    hybrid = import_native(native)
    ids, mask = tie_free_batch(hybrid, length=8)
    assert_cached_decode_equals_full_forward(hybrid, ids, mask)
    # greedy generation with each side's cache: the same tokens, and the same logits at every step
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    kw.update(return_dict_in_generate=True, output_logits=True)
    got = hybrid.generate(input_ids=ids, attention_mask=mask, **kw)
    want = native.generate(input_ids=ids, attention_mask=mask, **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(got.logits, want.logits, strict=True):
        assert (a - b).abs().max().item() <= ATOL


def test_export_reloads_in_transformers_alone_identical(tmp_path, capsys):
    native = build_native()
    hybrid = import_native(native)
    export_native(hybrid, tmp_path / "out")  # the family it was imported from
    assert "placeholder vision tower" in capsys.readouterr().out
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "hy_v4_vl" and raw["architectures"] == ["HYV4VLForConditionalGeneration"]
    assert raw["text_config"]["rope_parameters"]["mrope_section"] == [2, 1, 1]
    card = " ".join((tmp_path / "out" / "README.md").read_text().split())
    assert (
        "## Vision tower: a placeholder" in card and "every weight of `model.vision_tower.*` is zero" in card
    )
    assert "`HYV4VLForConditionalGeneration.from_pretrained`" in card and "AutoModelForCausalLM" not in card
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is HYV4VLForConditionalGeneration
    src, back = native.state_dict(), reloaded.state_dict()
    text = [k for k in src if not k.startswith("model.vision_tower.")]
    assert all(torch.equal(src[k], back[k]) for k in text)  # import ∘ export = identity on the decoder
    assert all(not back[k].any() for k in back if k.startswith("model.vision_tower."))  # the placeholder
    ids, mask = tie_free_batch(hybrid)
    assert max_err(logits(reloaded, ids, mask), logits(native, ids, mask), mask) <= ATOL
    assert torch.equal(logits(realigned(reloaded), ids, mask), logits(native, ids, mask))
    # the exported directory imports again (the vision tower dropped with a note)
    again = import_native(tmp_path / "out")
    assert "hy_v4_vl vision-language checkpoint" in capsys.readouterr().out
    assert torch.equal(logits(realigned(again), ids, mask), logits(hybrid, ids, mask))


def test_export_to_hy_v4_where_it_expresses_the_latent_norms(tmp_path):
    """``--to hy_v4`` (transformers' text-only HY-V4 class): exact where rms_norm_eps is HY-V4's fixed latent
    eps 1e-6; at transformers' default 1e-5 refused naming the field, nothing written. Both checkpoints rotate
    interleaved pairs (HY-V4 under 5.23 / 5.24 runs in its family's native_context, which pairs as 5.25)."""
    hybrid = import_native(build_native())
    with pytest.raises(NativeConversionError, match=r"cannot export to hy_v4: .*mla_norm_eps=1e-05"):
        export_native(hybrid, tmp_path / "refused", to="hy_v4")
    assert not (tmp_path / "refused").exists()
    native = build_native(rms_norm_eps=1e-6)
    hybrid = import_native(native)
    export_native(hybrid, tmp_path / "out", to="hy_v4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "HYV4ForCausalLM"
    ids, mask = tie_free_batch(hybrid)
    with get_family("hy_v4").native_context():
        exported = logits(reloaded, ids, mask)
    assert max_err(exported, logits(native, ids, mask), mask) <= ATOL


def test_the_wrappers_tying_decides(tmp_path):
    """transformers ties lm_head by the wrapper's tie_word_embeddings, not the text config's: an untied
    wrapper around a text config saying "tied" keeps its own lm_head (reading the text config's flag would
    drop it: a different model); a tied wrapper imports tied and exports tied."""
    # the text config says tied, the wrapper does not
    native = build_native(tie_word_embeddings=True, wrapper={"tie_word_embeddings": False})
    assert native.lm_head.weight is not native.get_input_embeddings().weight
    hybrid = import_native(native)
    assert not hybrid.config.tie_word_embeddings
    ids, mask = tie_free_batch(hybrid)
    assert max_err(logits(native, ids, mask), logits(hybrid, ids, mask), mask) <= ATOL
    native.save_pretrained(tmp_path / "untied")
    assert not import_native(tmp_path / "untied").config.tie_word_embeddings
    tied = build_native(wrapper={"tie_word_embeddings": True})  # the text config says untied
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    hybrid = import_native(tied)
    assert hybrid.config.tie_word_embeddings
    export_native(hybrid, tmp_path / "tied")
    reloaded = HYV4VLForConditionalGeneration.from_pretrained(tmp_path / "tied").eval()
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert max_err(logits(reloaded, ids, mask), logits(tied, ids, mask), mask) <= ATOL


def test_cli_import_export_and_inspect(tmp_path, capsys):
    from hf_hybrid import cli

    build_native().save_pretrained(tmp_path / "native")
    assert cli.main(["import", str(tmp_path / "native"), str(tmp_path / "ours")]) == 0
    assert "dropping model.vision_tower.*" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", FAMILY]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "hy_v4_vl"
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "native"), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["cache_by_mixer"]["dsa"]["layers"] == 4
    # the wrapper's name points at the family
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "hy_v4_vl"]) == 2
    assert "did you mean 'hy_v4_vl_text'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refusals_name_the_option(tmp_path):
    native = build_native(swiglu_limit=0.0)
    with pytest.raises(NativeConversionError, match=r"HYV4VLTextConfig\.swiglu_limit=0\.0"):
        import_native(native, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    hybrid = import_native(build_native())
    from hf_hybrid import HybridConfig, HybridForCausalLM

    cfg = hybrid.config.to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    cases = [
        ({"mla_norm_eps": 1e-6}, r"mla_norm_eps=1e-06"),  # HY-V4-VL's latent norms use rms_norm_eps
        ({"q_lora_rank": None}, r"q_lora_rank=None"),
        ({"hyper_connections": "mhc"}, r"hyper_connections='mhc'"),
    ]
    for overrides, message in cases:
        model = HybridForCausalLM(HybridConfig.from_dict({**cfg, **overrides}))
        with pytest.raises(NativeConversionError, match=message):
            export_native(model, tmp_path / "out", to=FAMILY)
        assert not (tmp_path / "out").exists()
