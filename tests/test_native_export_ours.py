"""Exports that start from hf_hybrid's *own* models (our defaults: full RoPE at our rope_theta, our norm eps,
our initialisation), not from a native import: the exported directory, reloaded by transformers alone, gives
the logits of the model it came from. A native round trip cannot catch a field the export leaves to the native
class's default (Qwen3-Next / Qwen3.5 fill in ``partial_rotary_factor=0.25``), because the import carries the
native value; these tests do. Plus the export refusals that used to surface as raw validation errors."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.convert.native import FAMILY_MODULES, NativeConversionError, export_native, get_family
from hf_hybrid.convert.native.base import VisionWrapperFamily
from hf_hybrid.mixers.dsa import index_ties

ATOL = 1e-5
OUR_DEFAULTS = {  # what a model built with hf_hybrid has unless it asks otherwise
    "rope_parameters": None,  # -> {"rope_type": "default", "rope_theta": 10000.0}: every head dim rotated
    "rms_norm_eps": HybridConfig.__dataclass_fields__["rms_norm_eps"].default,
}
# Fields a family ties to another one (one native option sets both): the model gets the value it follows.
# HY-V4's indexer LayerNorm uses rms_norm_eps (our index_norm_eps defaults to 1e-5 on its own; an export of
# a model where they differ is refused by name: test_new_layer_options_are_refused_by_families_without_them).
TIED = {
    "hy_v4": {"index_norm_eps": "rms_norm_eps"},
    "hy_v4_vl_text": {"index_norm_eps": "rms_norm_eps"},
}


def context(model_type: str):
    factory = get_family(model_type).native_context
    return factory() if factory is not None else contextlib.nullcontext()


def our_model(model_type: str, **overrides) -> HybridForCausalLM:
    """An hf_hybrid model with the layout of ``model_type``'s tiny config, our defaults and our init (norms
    moved off 1 so that a mapping that lost one would show)."""
    family = get_family(model_type)
    cfg = family.hybrid_config(family.config_class(**family.tiny_config)).to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    cfg.update(OUR_DEFAULTS, **overrides)
    cfg.update(
        {field: cfg[source] for field, source in TIED.get(model_type, {}).items() if field not in overrides}
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def exported_config(model_type: str, out, **overrides) -> dict:
    """The decoder's config.json (a vision-language wrapper's ``text_config``) of our tiny ``model_type``
    model with ``overrides`` exported to ``out``; skips where the installed transformers lacks the family."""
    family = get_family(model_type)
    if not family.available:
        pytest.skip(f"{model_type} needs transformers >= {family.min_transformers}, not installed here")
    with context(model_type):
        export_native(our_model(model_type, **overrides), out, to=model_type)
    raw = json.loads((out / "config.json").read_text())
    return raw.get("text_config", raw)


def left_padded(vocab: int, length: int = 11, seed: int = 1):
    ids = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _inputs(model, seed: int) -> dict:
    ids, mask = left_padded(model.config.vocab_size, seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


# Families written as their vision-language wrapper: the wrapper's tie_word_embeddings is the flag
# transformers reads, so a tied decoder must come back tied (an export that set only the text config's flag
# lost lm_head).
WRAPPED = sorted(t for t in FAMILY_MODULES if isinstance(get_family(t), VisionWrapperFamily))
CASES = [(t, {}) for t in sorted(FAMILY_MODULES)] + [(t, {"tie_word_embeddings": True}) for t in WRAPPED]


@pytest.mark.parametrize("model_type, overrides", CASES, ids=[t + ("-tied" if o else "") for t, o in CASES])
def test_export_of_our_model_reloads_in_transformers_with_its_logits(model_type, overrides, tmp_path):
    family = get_family(model_type)
    if not family.available:
        pytest.skip(f"{model_type} needs transformers >= {family.min_transformers}, not installed here")
    ours = our_model(model_type, **overrides)
    assert ours.config.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0
    ids, mask = left_padded(ours.config.vocab_size)
    if "dsa" in ours.config.mixer_types:
        # transformers selects with torch.topk, whose order among tied scores is unspecified: compare on an
        # input without ties at the top-k cut (the README's claim for the DSA families)
        seed = next(s for s in range(1, 20) if not index_ties(ours, **_inputs(ours, s)))
        ids, mask = left_padded(ours.config.vocab_size, seed=seed)
    with context(model_type):
        export_native(ours, tmp_path / "out", to=model_type)
        # a decoder without a causal-LM class of its own is written as its vision-language wrapper
        wrapped = "text_config" in json.loads((tmp_path / "out" / "config.json").read_text())
        auto = AutoModelForImageTextToText if wrapped else AutoModelForCausalLM
        reloaded = auto.from_pretrained(tmp_path / "out").eval()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            got = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            want = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert type(reloaded) is get_family(model_type).model_class
    if overrides:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    err = (got - want)[mask.bool()].abs().max().item()
    assert err <= ATOL, f"{model_type}: reloaded export differs from the model it came from by {err:.3g}"


@pytest.mark.parametrize("factor", [1.0, 0.25])
@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"])
def test_partial_rotary_factor_is_written_explicitly_in_both_spellings(model_type, factor, tmp_path):
    """The exported config.json names partial_rotary_factor (these classes default to 0.25) in rope_parameters
    and, as released configs do, at the top of the config: SGLang's config classes read it only there (default
    0.25). transformers reads it back; the source model's config is left as it was."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor}
    ours = our_model(model_type, rope_parameters=rope)
    before = json.dumps(ours.config.rope_parameters, sort_keys=True)
    with context(model_type):
        export_native(ours, tmp_path / "out", to=model_type)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    text = raw.get("text_config", raw)
    assert text["rope_parameters"]["partial_rotary_factor"] == text["partial_rotary_factor"] == factor
    reread = AutoConfig.from_pretrained(tmp_path / "out")
    assert getattr(reread, "text_config", reread).rope_parameters["partial_rotary_factor"] == factor
    assert json.dumps(ours.config.rope_parameters, sort_keys=True) == before


def test_qwen3_next_all_dense_exports_through_mlp_only_layers(tmp_path):
    """Qwen3-Next expresses an all-dense model (every layer in mlp_only_layers); our MoE fields, unused by
    such a model, are at their defaults (shared_expert_intermediate_size=None, which the native field
    rejects)."""
    dense = dict(mlp_types=["dense"] * 4, num_shared_experts=0, shared_expert_intermediate_size=None)
    ours = our_model("qwen3_next", **dense, shared_expert_gate=False)
    with context("qwen3_next"):
        native = export_native(ours, tmp_path / "out", to="qwen3_next")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        ids, mask = left_padded(ours.config.vocab_size)
        with torch.no_grad():
            got = reloaded(input_ids=ids, use_cache=False).logits
            want = ours(input_ids=ids, use_cache=False).logits
    assert native.config.mlp_only_layers == [0, 1, 2, 3]
    assert (got - want).abs().max().item() <= ATOL


def test_qwen3_next_ungated_attention_is_refused_by_name_before_writing(tmp_path):
    dense = dict(mlp_types=["dense"] * 4, num_shared_experts=0, shared_expert_intermediate_size=None)
    for overrides in (dense, {}):
        ours = our_model("qwen3_next", attention_output_gate=False, **overrides)
        with pytest.raises(NativeConversionError, match=r"attention_output_gate=False"):
            export_native(ours, tmp_path / "out", to="qwen3_next")
        assert not (tmp_path / "out").exists()


def test_new_layer_options_are_refused_by_families_without_them(tmp_path):
    """norm_placement / nope_layers / gdn_allow_neg_eigval are functional fields: a family that cannot express
    them names them (the export's round trip), nothing is written."""
    cases = [
        ("qwen3_moe", {"nope_layers": [1]}, r"nope_layers=\[1\]"),
        ("mixtral", {"norm_placement": ["post", "pre"]}, r"norm_placement=\['post', 'pre'\]"),
        ("qwen3_next", {"gdn_allow_neg_eigval": True}, r"gdn_allow_neg_eigval=True"),
        # HY-V4's options, on families without them (and hy_v4 without the mHC form)
        ("deepseek_v32", {"attention_sinks": True}, r"attention_sinks=True"),
        ("deepseek_v3", {"mla_gate_proj": True}, r"mla_gate_proj=True"),
        ("glm_moe_dsa", {"hyper_connections": "ihc", "hc_mult": 2}, r"hyper_connections='ihc'"),
        ("deepseek_v32", {"moe_swiglu_limit": 1.0}, r"moe_swiglu_limit=1.0"),
        ("hy_v4", {"hyper_connections": "mhc"}, r"hyper_connections='mhc'"),
        ("hy_v4", {"index_norm_eps": 1e-3}, r"index_norm_eps=0.001"),
        ("hy_v4", {"hc_mult": 3}, None),  # exports: hc_mult is an option of the family
    ]
    for model_type, overrides, message in cases:
        if message is None:
            export_native(our_model(model_type, **overrides), to=model_type)
            continue
        with pytest.raises(NativeConversionError, match=message):
            export_native(our_model(model_type, **overrides), tmp_path / "out", to=model_type)
        assert not (tmp_path / "out").exists()


def test_hy_v4_without_the_clamp_exports_as_an_infinite_limit(tmp_path):
    """HY-V4's experts always clamp: a model without the clamp (moe_swiglu_limit=None) is written with
    swiglu_limit=inf (clamp(x, max=inf) is x), and reloads with the same logits."""
    ours = our_model("hy_v4", moe_swiglu_limit=None)
    export_native(ours, tmp_path / "out", to="hy_v4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.swiglu_limit == float("inf")
    ids, mask = left_padded(ours.config.vocab_size)
    seed = next(s for s in range(1, 20) if not index_ties(ours, **_inputs(ours, s)))
    ids, mask = left_padded(ours.config.vocab_size, seed=seed)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), context("hy_v4"):
        got = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (got - want)[mask.bool()].abs().max().item() <= ATOL


# ---- what the serving engines read from config.json -------------------------------------------------------


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "glm5_next_text"])
def test_glm_exports_say_their_indexer_rotates_interleaved_pairs(model_type, tmp_path):
    """vLLM and SGLang rotate a DSA indexer on interleaved pairs only where ``indexer_rope_interleave`` is
    true (halves otherwise; vLLM's GLM-5-Next code reads it without a default); transformers always pairs for
    GLM: the export writes the flag, the import refuses a checkpoint saying False (computed two ways) except
    GLM-5-Next's, which rotates nothing."""
    family = get_family(model_type)
    assert exported_config(model_type, tmp_path / "out")["indexer_rope_interleave"] is True
    native = family.config_class(**{**family.tiny_config, "indexer_rope_interleave": False})
    if model_type == "glm5_next_text":  # no rotary channels (qk_rope_head_dim=0): the flag changes nothing
        assert (
            family.hybrid_config(native).to_dict()
            == family.hybrid_config(family.config_class(**family.tiny_config)).to_dict()
        )
        return
    with pytest.raises(NativeConversionError, match=r"indexer_rope_interleave=False"):
        family.hybrid_config(native)


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_minimax_m2_exports_write_the_rotary_dim_the_engines_read(factor, tmp_path):
    """vLLM reads ``config.rotary_dim`` (it fails to load without it), SGLang rotates the whole head without
    it: the export writes the rotated width, and transformers reads the same partial rotary factor back."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor}
    ours = our_model("minimax_m2", rope_parameters=rope)
    export_native(ours, tmp_path / "out", to="minimax_m2")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["rotary_dim"] == int(factor * ours.config.head_dim) == next(iter(ours.config.rope_dims()))
    reread = AutoConfig.from_pretrained(tmp_path / "out")
    assert reread.rope_parameters["partial_rotary_factor"] == factor


_ROUTER_KEYS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


@pytest.mark.parametrize(
    "model_type, keys",
    [
        ("deepseek_v3", _ROUTER_KEYS),
        ("deepseek_v32", _ROUTER_KEYS),
        ("glm_moe_dsa", {**_ROUTER_KEYS, "index_topk_pattern": "FSFS"}),  # indexer_types full/shared twice
        ("minimax_m2", {"scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True}),
        ("qwen3_next", {"rope_theta": 10000.0, "full_attention_interval": 4}),
        (
            "glm5_next_text",  # indexer_types full, full, shared, full; one dense MLP first
            {
                **_ROUTER_KEYS,
                "mhc": True,
                "mla_use_nope": True,
                "first_k_dense_replace": 1,
                "index_topk_pattern": "FFSF",
            },
        ),
        (
            "kimi_linear",  # layer_types: KDA, KDA, full, KDA (1-based in linear_attn_config); dense first
            {
                "linear_attn_config": {
                    "full_attn_layers": [3],
                    "kda_layers": [1, 2, 4],
                    "head_dim": 8,
                    "num_heads": 2,
                    "short_conv_kernel_size": 4,
                },
                "first_k_dense_replace": 1,
                "mla_use_nope": True,
            },
        ),
        ("qwen3_5_text", {"rope_theta": 10000.0, "full_attention_interval": 4}),
    ],
)
def test_exports_write_the_keys_the_serving_engines_read(model_type, keys, tmp_path):
    """Keys released checkpoints carry that transformers does not declare and vLLM / SGLang read (without
    them: a load failure or a default that computes another function); transformers reads the export back
    as the model it was (the export checks that, and the reload test above compares logits)."""
    raw = exported_config(model_type, tmp_path / "out")
    assert {k: raw.get(k) for k in keys} == keys


def test_full_attention_interval_only_where_the_layers_have_that_period(tmp_path):
    """SGLang builds Qwen3-Next's layer list from full_attention_interval alone: written only where
    layer_types is exactly a full-attention layer every k-th."""
    mixers = ["attention", "gated_deltanet", "gated_deltanet", "attention"]
    raw = exported_config("qwen3_next", tmp_path / "out", mixer_types=mixers)
    assert raw["layer_types"][0] == "full_attention" and "full_attention_interval" not in raw
