"""``kimi_linear`` ↔ hf_hybrid beyond the shared checks (tests/test_native_families.py runs the tiny default
model through import / decode / export / round trip): the family's variants, its config details (A_log's
shape, NoPE MLA, the latent norms' eps, the never-tied head), refusals, bf16 round trip, cost / ``hf-hybrid
inspect`` and the ``kimi-linear-like`` preset against transformers' config.

The native model runs under the family's ``native_context`` (transformers' torch KDA / conv functions instead
of fla-core's Triton kernels, which fail on CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_hybrid.convert.native import (
    NativeConversionError,
    export_native,
    get_family,
    import_native,
    native_to_hybrid_config,
)

ATOL = 1e-5
FAMILY = get_family("kimi_linear")


def tiny_native(seed: int = 0, std: float = 0.1, **overrides):
    """A tiny KimiLinearForCausalLM, fp32, eval, every weight ~ N(0, std²), norm weights around 1 and the
    correction bias non-zero (a mapping that dropped it would still pass at its zero init)."""
    config = FAMILY.config_class(**{**FAMILY.tiny_config, **overrides})
    model = FAMILY.model_class(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        learned = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        for name, p in [*model.named_parameters(), *learned]:
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


def left_padded(vocab: int, seed: int = 1, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def native_logits(model, ids, mask):
    # use_cache=False: transformers' KimiLinearModel asks its cache for the past length when no position_ids
    # are given, which fails for a model without any full-attention layer
    with torch.no_grad(), FAMILY.native_context():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def ours_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def max_diff(a, b, mask) -> float:
    return (a - b)[mask.bool()].abs().max().item()


# ---- the mapping -------------------------------------------------------------------------------------------


def test_config_and_weights_map_as_documented():
    native = tiny_native()
    ours = import_native(native)
    c = ours.config
    assert c.mixer_types == ["kda", "kda", "mla", "kda"] and c.mlp_types == ["dense", "moe", "moe", "moe"]
    assert (c.kda_num_heads, c.kda_head_dim, c.kda_gate_rank, c.kda_conv_kernel_size) == (2, 8, 8, 4)
    assert c.mla_use_rope is False and c.mla_norm_eps == 1e-6 and c.rms_norm_eps == 1e-5
    assert (c.router_scoring_func, c.n_group, c.topk_group, c.routed_scaling_factor) == (
        "sigmoid",
        2,
        1,
        2.446,
    )
    assert c.num_shared_experts == 1 and not c.shared_expert_gate and c.num_experts == 8
    # A_log: [1, 1, H, 1] natively, [H] here, the same numbers
    a_native = native.model.layers[0].self_attn.forget_gate.A_log
    a_ours = ours.model.layers[0].mixer.forget_gate.A_log
    assert a_native.shape == (1, 1, 2, 1) and a_ours.shape == (2,)
    assert torch.equal(a_native.flatten(), a_ours)
    # the MLA latent norms really use eps 1e-6 on both sides (rms_norm_eps is 1e-5 here)
    assert native.model.layers[2].self_attn.kv_a_layernorm.variance_epsilon == 1e-6
    assert ours.model.layers[2].mixer.kv_a_layernorm.variance_epsilon == 1e-6


@pytest.mark.parametrize(
    "overrides",
    [
        {"q_lora_rank": 12},  # q-LoRA with its latent norm
        {"attention_bias": True},  # biases on q_a / kv_a / o_proj
        # the zero-wide shared MLP transformers still builds
        {"n_shared_experts": 0, "norm_topk_prob": False},
        {"n_shared_experts": 2, "n_group": 1, "topk_group": 1},
        {"linear_conv_kernel_dim": 3, "linear_num_heads": 4, "linear_head_dim": 4},
        {
            "layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
            "mlp_layer_types": ["sparse", "dense", "sparse", "dense"],
        },
        {"layer_types": ["linear_attention"] * 4},
        {"tie_word_embeddings": True},  # a flag KimiLinearForCausalLM does not act on
    ],
    ids=["q_lora", "bias", "no_shared", "two_shared", "kda_shapes", "layout", "all_kda", "tie_flag"],
)
def test_variants_import_and_export_exactly(overrides):
    native = tiny_native(**overrides)
    a = {k: v.detach().clone() for k, v in native.state_dict().items()}  # taken before any conversion
    ours = import_native(native)
    ids, mask = left_padded(native.config.vocab_size)
    ref = native_logits(native, ids, mask)
    assert max_diff(ref, ours_logits(ours, ids, mask), mask) <= ATOL
    back = export_native(ours, to="kimi_linear")
    assert back.config.layer_types == native.config.layer_types
    assert back.config.mlp_layer_types == native.config.mlp_layer_types
    b = back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(native_logits(back, ids, mask), ref)


def test_every_layer_on_the_native_inputs_equals_the_native_layer_with_large_weights():
    """With weights ~ N(0, 0.2²) the logits gap grows to ~1e-5 through four layers (fp32 rounding of ~2e-7 per
    mixer, amplified by the next layers; transformers' own chunked-vs-recurrent KDA spread on the same input
    is of the same order). Fed the native model's own inputs, layer by layer, each of our mixers matches to
    rounding and each residual + MLP exactly: the mapping hides nothing behind that amplification."""
    native = tiny_native(std=0.2, q_lora_rank=12)
    ours = import_native(native)
    ids, mask = left_padded(native.config.vocab_size)
    real = mask.bool()
    ref: dict = {}
    for i, layer in enumerate(native.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: ref.__setitem__(i, o))
        layer.self_attn.register_forward_hook(
            lambda m, a, o, i=i: ref.__setitem__(f"mixer{i}", o[0] if isinstance(o, tuple) else o)
        )
    native_logits(native, ids, mask)
    gaps: dict = {}

    def use_native(key):
        def hook(module, args, out):
            gaps[key] = ((out - ref[key])[real].abs().max() / ref[key][real].abs().max()).item()
            return ref[key]  # the next module reads the native value

        return hook

    for i, layer in enumerate(ours.model.layers):
        layer.mixer.register_forward_hook(use_native(f"mixer{i}"))
        layer.register_forward_hook(use_native(i))
    ours_logits(ours, ids, mask)
    assert len(gaps) == 8
    for i in range(4):
        assert gaps[f"mixer{i}"] <= 1e-6, (i, ours.config.mixer_types[i], gaps[f"mixer{i}"])
        assert gaps[i] <= 1e-6, (i, gaps[i])  # measured: 0 (the same fp32 operations on the same inputs)


def test_cached_decode_with_a_q_lora_mla_equals_native_generate():
    native = tiny_native(q_lora_rank=12, layer_types=["linear_attention", "full_attention"] * 2)
    ours = import_native(native)
    ids, mask = left_padded(native.config.vocab_size, length=9)
    kw = dict(
        max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=mask, **kw)
        with FAMILY.native_context():
            out_native = native.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, out_native.sequences)
    assert (torch.stack(out.logits, 1) - torch.stack(out_native.logits, 1)).abs().max().item() <= ATOL
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)
    full = ours_logits(ours, out.sequences, full_mask)[:, ids.shape[1] - 1 : -1]
    assert (full - torch.stack(out.logits, 1)).abs().max().item() <= ATOL


def test_native_context_restores_the_module():
    import transformers.models.kimi_linear.modeling_kimi_linear as kimi

    before = kimi.chunk_kimi_delta_attention
    with FAMILY.native_context():
        assert not hasattr(kimi.chunk_kimi_delta_attention, "__wrapped__")  # transformers' torch function
    assert kimi.chunk_kimi_delta_attention is before


def test_bf16_directory_round_trip(tmp_path):
    """A bf16 checkpoint (5.24 keeps the router, its bias and dt_bias in fp32) → import → export: the tensors
    and dtypes transformers loads from the source."""
    native = tiny_native().to(torch.bfloat16)
    native.save_pretrained(tmp_path / "src")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src").state_dict()
    import_native(tmp_path / "src", tmp_path / "hyb")
    export_native(tmp_path / "hyb", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "kimi_linear"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert back.keys() == source.keys()
    for name, t in source.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# ---- refusals ----------------------------------------------------------------------------------------------


def _assert_refused(fn, match, dst):
    with pytest.raises(NativeConversionError, match=match):
        fn()
    assert not dst.exists(), "a refused conversion must write nothing"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"hidden_act": "gelu"},
            r"KimiLinearConfig\.hidden_act='gelu' has no counterpart.*supported: 'silu'",
        ),
        ({"num_key_value_heads": 2}, r"num_key_value_heads=2 differs from num_attention_heads=4"),
        (
            {"layer_types": ["linear_attention", "sliding_attention", "full_attention", "linear_attention"]},
            r"KimiLinearConfig\.layer_types\[1\]='sliding_attention' has no counterpart",
        ),
    ],
)
def test_import_refuses_options_without_counterpart(overrides, message, tmp_path):
    config = FAMILY.config_class(**{**FAMILY.tiny_config, **overrides})
    with pytest.raises(NativeConversionError, match=message):
        native_to_hybrid_config(config)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "kimi_linear"}))
    _assert_refused(lambda: import_native(src, tmp_path / "dst"), message, tmp_path / "dst")


def _variant(ours, **changes):
    from hf_hybrid import HybridConfig, HybridForCausalLM

    cfg = ours.config.to_dict()
    for key in ("layer_types", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    torch.manual_seed(0)
    return HybridForCausalLM(HybridConfig.from_dict({**cfg, **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"mixer_types": ["kda", "gated_deltanet", "mla", "kda"]},
            r"mixer_types\[1\]='gated_deltanet' \(layer 1\) has no counterpart",
        ),
        (
            {"mlp_types": ["dense", "moe", "none", "moe"]},
            r"mlp_types\[2\]='none' \(layer 2\) has no "
            r"counterpart",
        ),
        ({"kda_gate_rank": 6}, r"kda_gate_rank=6 differs from kda_head_dim=8"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings=True"),
        ({"mla_use_rope": True}, r"HybridConfig\.mla_use_rope=True has no counterpart"),
        ({"mla_norm_eps": None}, r"HybridConfig\.mla_norm_eps=1e-05 has no counterpart"),
        (
            {"router_scoring_func": "softmax"},
            r"HybridConfig\.router_scoring_func='softmax' has no counterpart",
        ),
        ({"shared_expert_gate": True}, r"HybridConfig\.shared_expert_gate=True has no counterpart"),
    ],
)
def test_export_refuses_layouts_kimi_linear_cannot_express(changes, message, tmp_path):
    ours = import_native(tiny_native())
    other = _variant(ours, **changes)
    _assert_refused(
        lambda: export_native(other, tmp_path / "out", to="kimi_linear"), message, tmp_path / "out"
    )


def test_kda_fields_only_matter_with_kda_layers():
    """An all-MLA model's kda_* fields describe no layer: a kda_gate_rank kimi_linear cannot express is no
    reason to refuse it (with a KDA layer it is, above)."""
    ours = import_native(tiny_native(layer_types=["full_attention"] * 4))
    other = _variant(ours, kda_gate_rank=3)
    other.load_state_dict(ours.state_dict())
    ids, mask = left_padded(ours.config.vocab_size)
    back = export_native(other, to="kimi_linear")
    assert back.config.layer_types == ["full_attention"] * 4
    assert max_diff(native_logits(back, ids, mask), ours_logits(ours, ids, mask), mask) <= ATOL


def test_export_refuses_a_non_zero_expert_bias_it_can_carry_but_not_a_mismatch(tmp_path):
    """The correction bias is carried (not refused, unlike qwen3_moe); a shared MLP wider than
    n_shared_experts · moe_intermediate_size has no counterpart."""
    ours = import_native(tiny_native())
    assert ours.model.layers[1].mlp.router.e_score_correction_bias.abs().max() > 0
    export_native(ours, to="kimi_linear")
    wide = _variant(ours, shared_expert_intermediate_size=24)
    _assert_refused(
        lambda: export_native(wide, tmp_path / "out", to="kimi_linear"),
        r"HybridConfig\.shared_expert_intermediate_size=24 has no counterpart",
        tmp_path / "out",
    )


# ---- cost, inspect, preset ---------------------------------------------------------------------------------


def test_cost_equals_the_built_models():
    """The inspector's count (KDA, NoPE MLA with q-LoRA, MoE with shared expert) = the parameters of our
    import = those of transformers' model; KDA layers cache a constant state, MLA ones (r + dr) numbers per
    token."""
    from hf_hybrid.cost import estimate_cost

    native = tiny_native(q_lora_rank=12)
    ours = import_native(native)
    cost = estimate_cost(ours.config, dtype_bytes=4)
    assert cost.exact
    assert cost.total_params == sum(p.numel() for p in ours.parameters())
    assert cost.total_params == sum(p.numel() for p in native.parameters())
    mla = cost.by_mixer()["mla"]["cache_bytes_per_token_per_layer"]
    assert mla == (16 + 4) * 4  # kv_lora_rank + qk_rope_head_dim, fp32


def test_cli_inspect_native_directory_equals_the_import(tmp_path, capsys):
    from hf_hybrid.cli import main
    from hf_hybrid.cost import estimate_cost

    native = tiny_native()
    native.save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "src"), "--json"]) == 0
    native_cost = json.loads(capsys.readouterr().out)
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "hyb")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "hyb"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == native_cost
    assert main(["export", str(tmp_path / "hyb"), str(tmp_path / "nat")]) == 0  # the family from the lineage
    assert json.loads((tmp_path / "nat" / "config.json").read_text())["model_type"] == "kimi_linear"
    assert native_cost == json.loads(estimate_cost(native_to_hybrid_config(tmp_path / "src")).to_json())
    assert native_cost["total_params"] == sum(p.numel() for p in native.parameters())


# moonshotai/Kimi-Linear-48B-A3B-Instruct's linear_attn_config (1-indexed layers, as the checkpoint writes
# them)
_PUBLISHED_LINEAR_ATTN = {
    "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
    "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)],
    "head_dim": 128,
    "num_heads": 32,
    "short_conv_kernel_size": 4,
}


def test_kimi_linear_like_preset_is_transformers_kimi_linear_config():
    """The preset exports to a KimiLinearConfig whose sizes are transformers' defaults (the published 48B-A3B)
    and whose layer layout is the checkpoint's linear_attn_config; importing that config gives the preset's
    cost."""
    from hf_hybrid.cost import estimate_cost
    from hf_hybrid.presets import preset_config

    preset = preset_config("kimi-linear-like")
    native = FAMILY.native_config(preset)  # refuses anything kimi_linear cannot express
    published = FAMILY.config_class(linear_attn_config=_PUBLISHED_LINEAR_ATTN, first_k_dense_replace=1)
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "num_local_experts",
        "num_experts_per_tok",
        "n_shared_experts",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "rms_norm_eps",
        "linear_head_dim",
        "linear_num_heads",
        "linear_conv_kernel_dim",
        "layer_types",
        "mlp_layer_types",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(native, name) == getattr(published, name), name
    imported = estimate_cost(native_to_hybrid_config(published))
    assert imported.total_params == estimate_cost(preset).total_params == 49_122_675_072
    assert imported.active_params == 3_484_453_248
