"""Native recurrent hybrid families ↔ hf_hybrid (qwen3_next, qwen3_5_text, qwen3_5_moe_text, bamba, minimax):
tiny random native models built with transformers' own classes (fp32) → import → the same logits (left
padding), cached decode equal to the full forward, export → reload with the native class → the same logits,
weights round-trip, refusals before anything is written, the Qwen3.5 vision-language wrapper, and DSA
conversion of a qwen3_next import.

transformers' qwen3_next / qwen3_5 modeling pick fla-core's Triton kernels at import time whenever fla-core is
installed, and those crash on CPU tensors: the module fixture below points them back at transformers' own
torch functions for the duration of this file (``hf_hybrid.convert.native.qwen3_next.native_torch_kernels``,
the families' ``native_context``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hf_hybrid.convert.native import NativeConversionError, export_native, get_family, import_native

FAMILIES = [
    "qwen3_next",
    "olmo_hybrid",
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "bamba",
    "minimax",
    "granitemoehybrid",
    "nemotron_h",
]
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def native_torch_kernels():
    from hf_hybrid.convert.native.qwen3_next import native_torch_kernels

    with native_torch_kernels():
        yield


def tiny_native(model_type: str, seed: int = 0, **overrides):
    """A tiny native model in eval mode, with its norms, decays and dt biases moved off their init values
    (zero-centred norms start at 0, and a mapping that forgot the ``1 +`` would still pass at init)."""
    family = get_family(model_type)
    config = family.config_class(**{**family.tiny_config, **overrides})
    torch.manual_seed(seed)
    model = family.model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias", ".D", "conv1d.bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def left_padded_batch(vocab: int, seed: int = 1, length: int = 13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """What generate() gives a left-padded prompt: positions count real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def native_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits


def ours_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def max_diff_real(a, b, mask) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_import_logits_equal_with_left_padding(model_type):
    native = tiny_native(model_type)
    ours = import_native(native)
    ids, mask = left_padded_batch(native.config.vocab_size)
    diff = max_diff_real(native_logits(native, ids, mask), ours_logits(ours, ids, mask), mask)
    assert diff <= ATOL, f"{model_type}: import differs by {diff:.3g}"
    assert ours.config.hf_hybrid_lineage["base_model_type"] == model_type


# transformers' MiniMax decodes left-padded rows wrongly when layer 0 is a lightning layer (its full forward
# and ours agree; its cached decode drifts by ~1e-3 on padded rows only): its own generate() is compared on
# unpadded rows.
_NATIVE_DECODE_NEEDS_UNPADDED = ("minimax",)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_cached_decode_equals_full_forward_and_native(model_type):
    native = tiny_native(model_type)
    ours = import_native(native)
    ids, mask = left_padded_batch(native.config.vocab_size, length=9)
    kw = dict(
        max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=mask, **kw)
    steps = torch.stack(out.logits, 1)
    # Cached decode = the full forward over prompt + generated tokens, ours and transformers', at each new
    # position.
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], 5, dtype=mask.dtype)], dim=1)
    at_new = slice(ids.shape[1] - 1, -1)
    assert (ours_logits(ours, out.sequences, full_mask)[:, at_new] - steps).abs().max().item() <= ATOL
    assert (native_logits(native, out.sequences, full_mask)[:, at_new] - steps).abs().max().item() <= ATOL
    # transformers' own cached decode agrees too.
    if model_type in _NATIVE_DECODE_NEEDS_UNPADDED:
        mask = torch.ones_like(mask)
        with torch.no_grad():
            out = ours.generate(ids, attention_mask=mask, **kw)
    with torch.no_grad():
        out_native = native.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, out_native.sequences)
    assert (torch.stack(out.logits, 1) - torch.stack(out_native.logits, 1)).abs().max().item() <= ATOL


@pytest.mark.parametrize("model_type", FAMILIES)
def test_export_reload_with_native_class(model_type, tmp_path):
    native = tiny_native(model_type)
    ours = import_native(native)
    dst = tmp_path / "exported"
    export_native(ours, dst)
    raw = json.loads((dst / "config.json").read_text())
    assert raw["model_type"] == model_type
    family = get_family(model_type)
    reloaded = family.model_class.from_pretrained(dst).eval()
    ids, mask = left_padded_batch(native.config.vocab_size)
    diff = max_diff_real(native_logits(native, ids, mask), native_logits(reloaded, ids, mask), mask)
    assert diff <= ATOL


@pytest.mark.parametrize("model_type", FAMILIES)
def test_weights_round_trip(model_type):
    native = tiny_native(model_type)
    source = {k: v.detach().clone() for k, v in native.state_dict().items()}  # compared against below
    ours = import_native(native)
    a = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    # ours -> native -> ours: the identity, bit for bit.
    again = import_native(export_native(ours))
    b = again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # native -> ours -> native: the identity, except that a zero-centred norm weight w comes back as fl(1 + w)
    # - 1 (|change| <= half an ulp of 1); the 1 + w the native forward computes is unchanged.
    rounding = get_family(model_type).rounding_native_weights
    back = export_native(ours).state_dict()
    for name, w in source.items():
        if "rotary_emb" in name:
            continue
        if any(re.search(p, name) for p in rounding):
            assert (back[name] - w).abs().max().item() <= 2.0**-24, name
            assert torch.equal(1.0 + back[name], 1.0 + w), name
        else:
            assert torch.equal(back[name], w), name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_in_memory_conversions_own_their_storage(model_type):
    """No parameter or buffer of an in-memory import / export shares storage with its source (qwen3_next:
    45 of 62 parameters did), so editing one model never edits the other."""
    native = tiny_native(model_type)
    ours = import_native(native)
    back = export_native(ours)
    for src, dst in ((native, ours), (ours, back)):
        ptrs = {t.untyped_storage().data_ptr() for t in [*src.parameters(), *src.buffers()]}
        named = [*dst.named_parameters(), *dst.named_buffers()]
        assert [n for n, t in named if t.numel() and t.untyped_storage().data_ptr() in ptrs] == []


def _assert_refused(fn, match, dst):
    with pytest.raises(NativeConversionError, match=match):
        fn()
    assert not dst.exists(), "a refused conversion must write nothing"


def test_refusals_name_the_option_and_write_nothing(tmp_path):
    from hf_hybrid import HybridConfig, HybridForCausalLM

    dst = tmp_path / "out"
    # native options without a counterpart
    family = get_family("qwen3_next")
    gelu = family.config_class(**{**family.tiny_config, "hidden_act": "gelu"})
    _assert_refused(lambda: import_native(family.model_class(gelu), dst), "hidden_act='gelu'", dst)
    bamba = get_family("bamba")
    biased = bamba.config_class(**{**bamba.tiny_config, "mamba_proj_bias": True})
    _assert_refused(lambda: import_native(bamba.model_class(biased), dst), "mamba_proj_bias=True", dst)
    # layer mixes a family cannot express
    ours = import_native(tiny_native("qwen3_next"))
    cfg = ours.config.to_dict()
    cfg.pop("layer_types")
    mixed = HybridForCausalLM(
        HybridConfig.from_dict({**cfg, "mixer_types": ["gated_deltanet", "mamba2"] * 2})
    )
    _assert_refused(lambda: export_native(mixed, dst, to="qwen3_next"), r"mixer_types\[1\]='mamba2'", dst)
    _assert_refused(lambda: export_native(ours, dst, to="qwen3_5_text"), r"mlp_types\[0\]='moe'", dst)
    _assert_refused(lambda: export_native(ours, dst, to="bamba"), r"mixer_types\[0\]='gated_deltanet'", dst)
    ungated = HybridForCausalLM(HybridConfig.from_dict({**cfg, "shared_expert_gate": False}))
    _assert_refused(lambda: export_native(ungated, dst, to="qwen3_next"), "shared_expert_gate=False", dst)


def test_qwen3_5_vision_language_wrapper_imports_its_text_decoder(tmp_path, capsys):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = get_family("qwen3_5_text")
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        spatial_merge_size=1,
        temporal_patch_size=1,
    )
    torch.manual_seed(0)
    vlm = Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(text_config=text.tiny_config, vision_config=vision)
    ).eval()
    src = tmp_path / "vlm"
    vlm.save_pretrained(src)
    ours = import_native(src, tmp_path / "imported")
    assert "model.visual.* and mtp.*" in capsys.readouterr().out
    assert ours.config.hf_hybrid_lineage["base_model_type"] == "qwen3_5_text"
    ids, mask = left_padded_batch(text.tiny_config["vocab_size"])
    with torch.no_grad():
        ref = vlm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    assert max_diff_real(ref, ours_logits(ours, ids, mask), mask) <= ATOL


def test_qwen3_next_import_converts_to_dsa():
    from hf_hybrid.convert.dsa import convert_model_to_dsa

    native = tiny_native("qwen3_next")
    ours = import_native(native)
    ids, mask = left_padded_batch(native.config.vocab_size)
    # Top-k covering the whole context: DSA over the gated attention layer equals the dense model exactly.
    dsa = convert_model_to_dsa(
        ours, index_topk=ids.shape[1], index_heads=2, index_head_dim=8, mode="sparse"
    ).eval()
    assert [i for i, m in enumerate(dsa.config.mixer_types) if m == "dsa"] == [3]
    assert max_diff_real(native_logits(native, ids, mask), ours_logits(dsa, ids, mask), mask) <= ATOL
    # A real selection (k < T) runs and changes the function.
    small = convert_model_to_dsa(ours, index_topk=2, index_heads=2, index_head_dim=8, mode="sparse").eval()
    assert max_diff_real(native_logits(native, ids, mask), ours_logits(small, ids, mask), mask) > ATOL


def _randomise(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Every weight N(0, std²) (activations of order 10 at std 0.15); norm weights around their neutral
    value (0 for the Qwen families' zero-centred norms, 1 otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    zero_centred_family = bool(get_family(model.config.model_type).rounding_native_weights)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            zero_centred = (
                zero_centred_family and name.endswith("norm.weight") and ".linear_attn." not in name
            )
            if name.endswith("norm.weight"):
                p.copy_((0.0 if zero_centred else 1.0) + 0.2 * noise)
            else:
                p.copy_(std * noise)


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid"])
def test_large_weights_within_transformers_own_fp32_spread(model_type, monkeypatch):
    """With large weights (std 0.15: hidden states ~10, logits ~6) fp32 rounding in the delta rule alone
    exceeds 1e-5 at the logits: transformers' own two GDN paths (chunked, and the step-by-step recurrence)
    already differ by 1-3e-5. Ours must stay within twice that spread, measured on the same input."""
    import sys

    native = tiny_native(model_type)
    _randomise(native, 0.15)
    ours = import_native(native)
    ids, mask = left_padded_batch(native.config.vocab_size)
    ref = native_logits(native, ids, mask)
    module = sys.modules[type(native).__module__]
    recurrent = module.torch_recurrent_gated_delta_rule

    def chunk_as_recurrence(*args, chunk_size=64, **kwargs):
        return recurrent(*args, **kwargs)

    monkeypatch.setattr(module, "torch_chunk_gated_delta_rule", chunk_as_recurrence)
    spread = max_diff_real(ref, native_logits(native, ids, mask), mask)
    err = max_diff_real(ref, ours_logits(ours, ids, mask), mask)
    assert err <= max(ATOL, 2.0 * spread), (
        f"{model_type}: ours {err:.3g}, transformers' own spread {spread:.3g}"
    )


def test_presets_are_the_published_models():
    """qwen3-next-like is Qwen3-Next-80B-A3B (its config.json maps onto it exactly) and both presets count the
    published sizes: 80 B / A3B (79.67 B, 3.25 B active without embeddings), 456 B / 45.9 B."""
    from hf_hybrid.cost import estimate_cost, format_count
    from hf_hybrid.presets import preset_config

    qwen = preset_config("qwen3-next-like")
    native = get_family("qwen3_next").native_config(qwen)  # refuses anything qwen3_next cannot express
    published = dict(  # Qwen/Qwen3-Next-80B-A3B-Instruct config.json
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5120,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    for name, value in published.items():
        assert getattr(native, name) == value, name
    assert native.layer_types == ["linear_attention"] * 3 + ["full_attention"] + native.layer_types[4:]
    assert native.layer_types.count("full_attention") == 12
    assert (
        native.rope_parameters["rope_theta"] == 1e7
        and native.rope_parameters["partial_rotary_factor"] == 0.25
    )

    cost = estimate_cost(qwen)
    assert cost.exact
    assert format_count(cost.total_params) == "79.67 B"
    assert format_count(cost.active_non_embedding_params) == "3.25 B"
    minimax = estimate_cost(preset_config("minimax-like"))
    assert minimax.exact
    assert format_count(minimax.total_params) == "456.09 B"
    assert format_count(minimax.active_non_embedding_params) == "45.94 B"


@pytest.mark.parametrize("model_type", ["bamba", "minimax", "granitemoehybrid", "nemotron_h"])
def test_large_weights_still_within_1e5(model_type):
    """Mamba-2 and lightning attention stay at the 1e-5 bound with large weights (measured ~1e-7 and
    ~3e-7)."""
    native = tiny_native(model_type)
    _randomise(native, 0.15)
    ours = import_native(native)
    ids, mask = left_padded_batch(native.config.vocab_size)
    assert max_diff_real(native_logits(native, ids, mask), ours_logits(ours, ids, mask), mask) <= ATOL


def test_minimax_refusals(tmp_path):
    from hf_hybrid import HybridConfig, HybridForCausalLM

    dst = tmp_path / "out"
    family = get_family("minimax")
    sliding = family.config_class(**{**family.tiny_config, "sliding_window": 16})
    _assert_refused(lambda: import_native(family.model_class(sliding), dst), "sliding_window=16", dst)
    ours = import_native(tiny_native("minimax"))
    cfg = ours.config.to_dict()
    cfg.pop("layer_types")
    scales = list(cfg["mixer_output_scales"])
    scales[3] = 2.0  # layer 3 is a lightning layer like layer 0, but MiniMax has one β per layer kind
    odd = HybridForCausalLM(HybridConfig.from_dict({**cfg, "mixer_output_scales": scales}))
    _assert_refused(lambda: export_native(odd, dst, to="minimax"), r"mixer_output_scales\[3\]=2\.0", dst)
    ungated = HybridForCausalLM(HybridConfig.from_dict({**cfg, "linear_output_gate": False}))
    _assert_refused(lambda: export_native(ungated, dst, to="minimax"), "linear_output_gate=False", dst)


def test_granitemoehybrid_variants_and_refusals(tmp_path):
    """Without experts (the shared MLP alone) and with RoPE; refusals name the option."""
    from hf_hybrid import HybridConfig, HybridForCausalLM

    for overrides in ({"num_local_experts": 0}, {"position_embedding_type": "rope"}):
        native = tiny_native("granitemoehybrid", **overrides)
        ours = import_native(native)
        assert ours.config.mlp_types[0] == ("dense" if "num_local_experts" in overrides else "moe")
        assert ours.config.attention_rope == ("position_embedding_type" in overrides)
        ids, mask = left_padded_batch(native.config.vocab_size)
        ref = native_logits(native, ids, mask)
        assert max_diff_real(ref, ours_logits(ours, ids, mask), mask) <= ATOL
        assert max_diff_real(ref, native_logits(export_native(ours), ids, mask), mask) <= ATOL
    dst = tmp_path / "out"
    family = get_family("granitemoehybrid")
    other = family.config_class(**{**family.tiny_config, "position_embedding_type": "alibi"})
    _assert_refused(
        lambda: import_native(family.model_class(other), dst), "position_embedding_type='alibi'", dst
    )
    ours = import_native(tiny_native("granitemoehybrid"))
    cfg = ours.config.to_dict()
    cfg.pop("layer_types")
    scales = [0.5, 0.7, 0.5]  # one residual_multiplier for every branch natively
    odd = HybridForCausalLM(HybridConfig.from_dict({**cfg, "mixer_output_scales": scales}))
    _assert_refused(
        lambda: export_native(odd, dst, to="granitemoehybrid"), r"mixer_output_scales\[1\]=0\.7", dst
    )


def test_nemotron_h_one_block_layers_and_refusals(tmp_path):
    """Each native layer is one block: ours has no MLP after Mamba-2 / attention and no mixer before an MLP /
    MoE; the MLPs are ungated relu², the attention has no RoPE; a layer with both has no counterpart."""
    from hf_hybrid import HybridConfig, HybridForCausalLM

    ours = import_native(tiny_native("nemotron_h"))
    c = ours.config
    assert list(zip(c.mixer_types, c.mlp_types)) == [
        ("mamba2", "none"),
        ("none", "moe"),
        ("attention", "none"),
        ("none", "dense"),
    ]
    assert not c.mlp_gated and c.hidden_act == "relu2" and not c.attention_rope
    assert ours.model.layers[1].mixer is None and ours.model.layers[3].mlp.gate_proj is None
    dst = tmp_path / "out"
    family = get_family("nemotron_h")
    latent = family.config_class(**{**family.tiny_config, "moe_latent_size": 16})
    _assert_refused(lambda: import_native(family.model_class(latent), dst), "moe_latent_size=16", dst)
    cfg = c.to_dict()
    cfg.pop("layer_types")
    both = HybridForCausalLM(HybridConfig.from_dict({**cfg, "mlp_types": ["dense", "moe", "none", "dense"]}))
    _assert_refused(
        lambda: export_native(both, dst, to="nemotron_h"),
        r"mixer_types\[0\]='mamba2' with "
        r"mlp_types",
        dst,
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_cost_formulas_match_the_built_modules(model_type):
    """The cost formulas know every option these families use (shared-expert size and gate, lightning gate and
    full-width norm, conv bias, ungated MLPs, MLP-only layers): formula = parameters counted on the built
    module."""
    from hf_hybrid.cost import estimate_cost, measure_module
    from hf_hybrid.registry import mixer_spec, mlp_spec

    ours = import_native(tiny_native(model_type))
    config = ours.config
    for i, (mixer, mlp) in enumerate(zip(config.mixer_types, config.mlp_types)):
        if mixer != "none":
            formula = mixer_spec(mixer).cost(config, i)
            assert measure_module(mixer_spec(mixer).cls, config, i) == (
                formula.params,
                formula.matmul_params,
            ), i
        if mlp != "none":
            formula = mlp_spec(mlp).cost(config, i)
            assert measure_module(mlp_spec(mlp).cls, config, i) == (formula.params, formula.matmul_params), i
    cost = estimate_cost(config)
    assert cost.exact
    assert cost.total_params == sum(p.numel() for p in ours.parameters())


def test_inspect_native_directory_equals_the_import(tmp_path, capsys):
    from hf_hybrid.cli import main
    from hf_hybrid.cost import estimate_cost

    src = tmp_path / "qwen3_next"
    tiny_native("qwen3_next").save_pretrained(src)
    capsys.readouterr()
    assert main(["inspect", str(src), "--json"]) == 0
    native_cost = json.loads(capsys.readouterr().out)
    assert native_cost == json.loads(estimate_cost(import_native(src).config).to_json())
    assert native_cost["total_params"] == sum(p.numel() for p in tiny_native("qwen3_next").parameters())


def test_minimax_like_preset_exports_to_minimax():
    """minimax-like is MiniMax-Text-01's shape and function (7:1 lightning : softmax, α = 160^¼ residuals);
    with full RoPE (transformers' MiniMax rotates the whole head) it maps onto transformers' MiniMaxConfig."""
    from hf_hybrid.presets import preset_config

    cfg = preset_config("minimax-like", rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    native = get_family("minimax").native_config(cfg)
    assert native.layer_types.count("full_attention") == 10 and native.layer_types[7] == "full_attention"
    assert (
        native.num_local_experts == 32
        and native.num_experts_per_tok == 2
        and native.intermediate_size == 9216
    )
    assert abs(native.linear_attn_alpha_factor - 160**0.25) < 1e-12 and native.linear_attn_beta_factor == 1.0
    assert native.mlp_alpha_factor == native.full_attn_alpha_factor == native.linear_attn_alpha_factor


def test_mamba_init_only_fields_do_not_block_export():
    """mamba_dt_min / mamba_dt_max / mamba_dt_init_floor only seed the dt initialisation: a model built with
    other values still exports to bamba (the clamp that does change the function is mamba_dt_limit)."""
    from hf_hybrid import HybridConfig

    cfg = import_native(tiny_native("bamba")).config.to_dict()
    cfg.pop("layer_types")
    other = HybridConfig.from_dict(
        {**cfg, "mamba_dt_min": 0.01, "mamba_dt_max": 0.2, "mamba_dt_init_floor": 1e-3}
    )
    assert get_family("bamba").native_config(other).time_step_limit == (0.0, float("inf"))
    clamped = HybridConfig.from_dict({**cfg, "mamba_dt_limit": [0.01, 10.0]})
    assert get_family("bamba").native_config(clamped).time_step_limit == (0.01, 10.0)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_ungated_experts_match_the_loop_and_transformers_kernels(implementation):
    """HybridUngatedExperts (mlp_gated=False): the eager path = the naive per-expert loop = transformers'
    has_gate=False kernels selected by experts_implementation."""
    from hf_hybrid.moe import HybridUngatedExperts, experts_forward_loop

    ours = import_native(tiny_native("nemotron_h"))
    experts = ours.model.layers[1].mlp.experts
    assert isinstance(experts, HybridUngatedExperts)
    torch.manual_seed(0)
    x = torch.randn(13, ours.config.hidden_size)
    index = torch.stack([torch.randperm(ours.config.num_experts)[:2] for _ in range(13)])
    weights = torch.rand(13, 2)
    with torch.no_grad():
        eager = experts(x, index, weights)
        loop = experts_forward_loop(experts, x, index, weights)
        ours.set_experts_implementation(implementation)
        assert experts.config._experts_implementation == implementation  # the dispatcher reads this
        kernel = experts(x, index, weights)
    torch.testing.assert_close(eager, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(kernel, loop, atol=1e-6, rtol=0)


def test_upcycle_refuses_ungated_mlps():
    from hf_hybrid.convert.upcycle import UpcycleOptions, check_upcycle

    config = import_native(tiny_native("nemotron_h", layers_block_type=["linear_attention", "mlp"])).config
    with pytest.raises(ValueError, match="mlp_gated=False"):
        check_upcycle(config, UpcycleOptions(num_experts=4, top_k=2))


def test_options_of_absent_layer_kinds_do_not_block_export():
    """attention_rope / attention_scaling matter only with softmax-attention layers, shared-expert options
    only with MoE layers: a pure Mamba-2 model exports to bamba whatever they say; with an attention layer
    NoPE is refused."""
    from hf_hybrid import HybridConfig

    cfg = import_native(tiny_native("bamba", attn_layer_indices=[])).config.to_dict()
    cfg.pop("layer_types")
    odd = {
        "attention_rope": False,
        "attention_scaling": 0.5,
        "num_shared_experts": 1,
        "shared_expert_gate": True,
    }
    get_family("bamba").native_config(HybridConfig.from_dict({**cfg, **odd}))
    with_attention = {**cfg, "mixer_types": ["mamba2", "attention", "mamba2"], "attention_rope": False}
    with pytest.raises(NativeConversionError, match="attention_rope=False"):
        get_family("bamba").native_config(HybridConfig.from_dict(with_attention))


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10 s on a shared CPU
def test_exported_qwen3_next_loads_without_hf_hybrid(tmp_path):
    import os
    import subprocess
    import sys

    native = tiny_native("qwen3_next")
    export_native(import_native(native), tmp_path / "out")
    ids, mask = left_padded_batch(native.config.vocab_size)
    torch.save({"ids": ids, "mask": mask, "pos": positions(mask)}, tmp_path / "batch.pt")
    script = (
        "import sys, torch\nimport transformers.models.qwen3_next.modeling_qwen3_next as m\nfor n in "
        "('torch_chunk_gated_delta_rule', 'torch_recurrent_gated_delta_rule', 'causal_conv1d_fn',\n       "
        "   'causal_conv1d_update'):\n    setattr(m, n, getattr(getattr(m, n), '__wrapped__', getattr(m, "
        "n)))  # fla-core's kernels need a GPU\nfrom transformers import AutoModelForCausalLM\nmodel = "
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()\nb = "
        f"torch.load({str(tmp_path / 'batch.pt')!r})\nwith torch.no_grad():\n    out = "
        "model(input_ids=b['ids'], attention_mask=b['mask'], position_ids=b['pos'], "
        f"use_cache=False).logits\ntorch.save(out, {str(tmp_path / 'logits.pt')!r})\nassert 'hf_hybrid' "
        "not in sys.modules, 'hf_hybrid was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert max_diff_real(native_logits(native, ids, mask), torch.load(tmp_path / "logits.pt"), mask) <= ATOL


def test_olmo_hybrid_refusals_name_the_option_and_write_nothing(tmp_path):
    """OLMo Hybrid's options are refused where a family lacks them, and its own limits are named: partial
    RoPE (it rotates the whole head), a pre-norm attention layer, an MoE layer."""
    from hf_hybrid import HybridConfig, HybridForCausalLM

    dst = tmp_path / "out"
    family = get_family("olmo_hybrid")
    partial = family.config_class(
        **{
            **family.tiny_config,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        }
    )
    _assert_refused(
        lambda: import_native(family.model_class(partial), dst), r"partial_rotary_factor'\]=0\.5", dst
    )
    ours = import_native(tiny_native("olmo_hybrid"))
    cfg = ours.config.to_dict()
    cfg.pop("layer_types")
    pre = HybridForCausalLM(HybridConfig.from_dict({**cfg, "norm_placement": None}))
    _assert_refused(lambda: export_native(pre, dst, to="olmo_hybrid"), r"norm_placement\[3\]='pre'", dst)
    half = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    rotated = HybridForCausalLM(HybridConfig.from_dict({**cfg, "rope_parameters": half}))
    _assert_refused(lambda: export_native(rotated, dst, to="olmo_hybrid"), "partial_rotary_factor", dst)
    # and the families without these options refuse them by name
    _assert_refused(lambda: export_native(ours, dst, to="qwen3_next"), "norm_placement", dst)
    no_post = HybridForCausalLM(
        HybridConfig.from_dict({**cfg, "norm_placement": None, "use_qk_norm": True, "qk_norm_scope": "head"})
    )
    _assert_refused(lambda: export_native(no_post, dst, to="qwen3_next"), "gdn_allow_neg_eigval=True", dst)


def test_nemotron_h_dt_clamp_with_a_non_default_limit(tmp_path):
    """Δ's clamp comes from time_step_limit on transformers 5.25 and from time_step_min before
    (compat.nemotron_h_dt_clamp): with a limit that binds at both ends, import and export agree with the
    native model on every version."""
    from hf_hybrid import compat

    native = tiny_native("nemotron_h", time_step_min=0.02, time_step_limit=(0.05, 0.3))
    _randomise(native, 0.15)  # Δ spread wide enough for both ends of the limit to bind
    ours = import_native(native)
    if compat.nemotron_h_dt_clamp() == "time_step_limit":
        assert ours.config.mamba_dt_limit == [0.05, 0.3]
    else:
        assert ours.config.mamba_dt_limit == [0.02, float("inf")]
    ids, mask = left_padded_batch(native.config.vocab_size)
    assert max_diff_real(native_logits(native, ids, mask), ours_logits(ours, ids, mask), mask) <= ATOL
    export_native(ours, tmp_path / "out", to="nemotron_h")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["time_step_min"] == 0.02
    if compat.nemotron_h_dt_clamp() == "time_step_limit":
        assert tuple(saved["time_step_limit"]) == (0.05, 0.3)
