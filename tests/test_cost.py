"""Cost inspector: exact parameter counts, hand-computed cache and FLOPs for known configs, formulas vs built
modules."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hf_hybrid import HybridConfig, HybridForCausalLM, registry
from hf_hybrid.compat import output_cache
from hf_hybrid.cost import MixerCost, compress_pattern, estimate_cost, measure_module
from hf_hybrid.presets import PRESETS, preset_config
from hf_hybrid.registry import mixer_spec, mixer_specs, mlp_spec, mlp_specs


def _built_params(config) -> int:
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny-attention", {}),
        (
            "tiny-attention",
            {
                "tie_word_embeddings": True,
                "attention_bias": True,
                "use_qk_norm": True,
                "attention_output_gate": True,
                "mlp_bias": True,
            },
        ),
        ("tiny-sliding", {}),
        ("tiny-hybrid", {}),
        ("tiny-mamba2", {}),
        (
            "tiny-linear",
            {"linear_decay": "per_channel", "linear_feature_map": "elu", "linear_conv_kernel_size": 4},
        ),
        ("tiny-mla", {}),
        ("tiny-dsa", {}),
        ("tiny-moe", {}),
    ],
)
def test_total_equals_built_model(name, overrides, tiny_config):
    config = tiny_config(name, **overrides)
    report = estimate_cost(config)
    assert report.exact
    assert report.total_params == _built_params(config)


# Every formula must agree with the module it describes once that module exists: the formulas are what
# `inspect` falls back to for designs whose mixers are not built here.
FORMULA_CASES = [
    ("attention", "tiny-attention", {}),
    (
        "attention",
        "tiny-attention",
        {"attention_bias": True, "use_qk_norm": True, "attention_output_gate": True},
    ),
    ("sliding_attention", "tiny-sliding", {}),
    ("mla", "tiny-mla", {}),
    ("mla", "tiny-mla", {"q_lora_rank": None, "attention_bias": True}),
    ("dsa", "tiny-dsa", {}),
    ("dsa", "tiny-dsa", {"q_lora_rank": None}),
    ("dsa", "tiny-dsa", {"dsa_base": "attention"}),
    ("gated_deltanet", "tiny-gdn", {}),
    (
        "gated_deltanet",
        "tiny-gdn",
        {"gdn_num_key_heads": 1, "gdn_key_head_dim": 8, "gdn_conv_kernel_size": 2},
    ),
    ("mamba2", "tiny-mamba2", {}),
    ("mamba2", "tiny-mamba2", {"mamba_n_groups": 2, "mamba_conv_kernel_size": 3}),
    ("linear_attention", "tiny-linear", {}),
    (
        "linear_attention",
        "tiny-linear",
        {"linear_decay": "scalar", "linear_feature_map": "elu", "linear_conv_kernel_size": 4},
    ),
    (
        "linear_attention",
        "tiny-linear",
        {"linear_decay": "per_channel", "linear_feature_map": "random_features"},
    ),
]


@pytest.mark.parametrize("mixer,preset,overrides", FORMULA_CASES)
def test_mixer_formula_matches_module(mixer, preset, overrides):
    config = preset_config(preset, **overrides)
    i = config.mixer_types.index(mixer)
    formula = mixer_spec(mixer).cost(config, i)
    assert measure_module(mixer_spec(mixer).cls, config, i) == (formula.params, formula.matmul_params)


@pytest.mark.parametrize(
    "mlp,overrides",
    [
        ("dense", {}),
        ("dense", {"mlp_bias": True}),
        ("moe", {}),
        ("moe", {"num_shared_experts": 0, "moe_routing": "hash"}),
    ],
)
def test_mlp_formula_matches_module(mlp, overrides):
    config = preset_config("tiny-moe", **overrides)
    i = config.mlp_types.index(mlp)
    formula = mlp_spec(mlp).cost(config, i)
    assert measure_module(mlp_spec(mlp).cls, config, i) == (formula.params, formula.matmul_params)


def test_llama_7b_like():
    report = estimate_cost(preset_config("llama-7b-like"), contexts=(4096,))
    assert report.total_params == report.active_params == 6_738_415_616  # Llama-2-7B
    assert f"{report.total_params / 1e9:.2f}" == "6.74"
    # K and V: 2 · 32 heads · 128 dims · 2 bytes = 16 KiB per token per layer; 32 layers; 4096 tokens = 2 GiB.
    assert report.by_mixer()["attention"]["cache_bytes_per_token_per_layer"] == 16384
    assert report.cache_bytes(4096) == 2 * 2**30
    # FLOPs/token: 2 · (all weights but the input embedding) + 32 layers · 2·2·4096·32·128.
    matmul = 6_738_415_616 - 32000 * 4096 - 4096 - 32 * 2 * 4096  # no embedding lookup, no norm weights
    assert report.flops_per_token(4096) == 2 * matmul + 32 * 4 * 4096 * 32 * 128


def test_small_gqa_by_hand():
    config = HybridConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    report = estimate_cost(config, contexts=(10, 100))
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k, v (2 KV heads × 16), o
    mlp = 3 * 64 * 128
    layer = attn + mlp + 2 * 64
    assert report.total_params == 2 * layer + 2 * 1000 * 64 + 64 == 202_048
    assert [layer_.params for layer_ in report.layers] == [layer, layer]
    # 2 (K, V) · 2 KV heads · 16 dims · 2 bytes = 128 B per token per layer
    assert report.cache_bytes(100) == 100 * 128 * 2
    assert report.flops_per_token(10) == 2 * (2 * (attn + mlp) + 1000 * 64) + 2 * 4 * 10 * 4 * 16


def test_sliding_window_caps_cache():
    report = estimate_cost(preset_config("tiny-sliding"), contexts=(8, 16, 1000))
    rows = report.by_mixer()
    per_token = 2 * 2 * 16 * 2
    assert rows["sliding_attention"]["bytes_per_sequence"] == {
        8: 3 * 8 * per_token,
        16: 3 * 16 * per_token,
        1000: 3 * 16 * per_token,
    }
    assert rows["attention"]["bytes_per_sequence"][1000] == 1000 * per_token


def test_moe_with_shared_experts_by_hand():
    config = preset_config("tiny-moe")  # 4 layers, first dense; E=4, k=2, I=32, 1 shared expert, H=64
    report = estimate_cost(config, measure=False)
    expert = 3 * 64 * 32
    moe = 4 * 64 + 4 * expert + 1 * expert  # router + routed experts + shared expert
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64
    dense = 3 * 64 * 128
    total = 2 * 512 * 64 + 64 + 4 * (attn + 2 * 64) + dense + 3 * moe
    assert report.total_params == total == 232_768
    assert report.active_params == total - 3 * (4 - 2) * expert == 195_904
    assert report.layers[1].active_params == report.layers[1].params - 2 * expert
    assert report.cache_bytes(4096) == 4 * 4096 * 128


def test_mla_by_hand():
    config = preset_config("tiny-mla")  # H=64, 4 heads, q_lora 32, kv_lora 32, nope 16, rope 8, v 16
    report = estimate_cost(config, contexts=(1000,), measure=False)
    mla = 64 * 32 + 32 + 32 * 4 * 24 + 64 * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * 64
    assert mixer_spec("mla").cost(config, 0).params == mla == 15_936
    # cached per token: the latent (32) and the shared rope key (8)
    assert report.by_mixer()["mla"]["cache_bytes_per_token_per_layer"] == (32 + 8) * 2
    assert report.cache_bytes(1000) == 2 * 1000 * 40 * 2


def test_dsa_adds_indexer_keys_and_caps_attention():
    config = preset_config("tiny-dsa")  # MLA base, indexer 2 heads × 16, top-8
    cost = mixer_spec("dsa").cost(config, 0)
    mla = mixer_spec("mla").cost(config, 0)
    assert cost.cache_per_token == mla.cache_per_token + 16
    assert cost.params == mla.params + 32 * 2 * 16 + 64 * 16 + 2 * 16 + 64 * 2
    # sparse mode runs latent MQA: each of the 4 heads scores min(context, top-k) cached [c_kv, k_pe] (32 + 8
    # wide) and sums c_kv (32 wide); + the indexer over every token
    qk, v = 32 + 8, 32
    assert cost.flops(1000) == 2 * 8 * 4 * (qk + v) + 2 * 1000 * 2 * (16 + 1)
    assert cost.flops(4) == 2 * 4 * 4 * (qk + v) + 2 * 4 * 2 * (16 + 1)
    # dense warm-up runs the expanded (naive MLA) attention over every token
    warm = mixer_spec("dsa").cost(preset_config("tiny-dsa", dsa_mode="dense_warmup"), 0)
    assert warm.flops(1000) == 2 * 1000 * 4 * (16 + 8 + 16) + 2 * 1000 * 2 * (16 + 1)


def test_dsa_on_mla_flops_follow_latent_mqa_at_deepseek_v32_scale():
    """The review's figure: counting expanded heads (dn + dr + dv = 320 wide) instead of the latent MQA the
    code runs (r + dr + r = 1088 wide) under-counted 24.6 GFLOP/token for deepseek-v3.2-like (61 layers, 128
    heads, k=2048)."""
    v32 = estimate_cost(preset_config("deepseek-v3.2-like"), contexts=(4096,), measure=False)
    per_layer = 2.0 * 2048 * 128 * ((512 + 64 + 512) - (128 + 64 + 128))
    assert per_layer * 61 / 1e9 == pytest.approx(24.6, abs=0.05)
    indexer = 2.0 * 4096 * 64 * (128 + 1) * 61
    attention = 2.0 * 2048 * 128 * (512 + 64 + 512) * 61
    mla = estimate_cost(preset_config("deepseek-v3-like"), contexts=(4096,), measure=False)
    idx_matmul = 2.0 * 61 * (1536 * 64 * 128 + 7168 * 128 + 7168 * 64)
    dense_attention = 2.0 * 4096 * 128 * (128 + 64 + 128) * 61
    assert v32.flops_per_token(4096) == pytest.approx(
        mla.flops_per_token(4096) - dense_attention + attention + indexer + idx_matmul, rel=1e-12
    )


def test_recurrent_state_formulas():
    gdn = mixer_spec("gated_deltanet").cost(preset_config("tiny-gdn"), 0)  # Hk=2, Hv=4, Dk=Dv=16, K=4
    assert gdn.cache_per_token == 0
    assert gdn.state_elements == (2 * 2 * 16 + 4 * 16) * 3 + 4 * 16 * 16
    mamba = mixer_spec("mamba2").cost(preset_config("tiny-mamba2"), 0)  # 8 heads × P=16, G=1, N=16, K=4
    assert mamba.state_elements == (8 * 16 + 2 * 1 * 16) * 3 + 8 * 16 * 16
    lin = mixer_spec("linear_attention").cost(
        preset_config("tiny-linear"), 0
    )  # 4 heads × 16, identity, no conv
    assert lin.state_elements == 4 * 16 * 16
    pos = mixer_spec("linear_attention").cost(
        preset_config("tiny-linear", linear_feature_map="elu", linear_conv_kernel_size=4), 0
    )
    assert pos.state_elements == 4 * 16 * 16 + 4 * 16 + 3 * 4 * 16 * 3  # + normaliser + conv tail
    report = estimate_cost(preset_config("tiny-hybrid"), contexts=(10, 10_000))
    gdn_bytes = report.by_mixer()["gated_deltanet"]["bytes_per_sequence"]
    # constant in the context; the recurrent state is stored in fp32 (4 B), the conv tail in the cache dtype
    # (2 B)
    assert gdn.state_fp32_elements == 4 * 16 * 16 and mamba.state_fp32_elements == 8 * 16 * 16
    assert lin.state_fp32_elements == 4 * 16 * 16 and pos.state_fp32_elements == 4 * 16 * 16 + 4 * 16
    conv = gdn.state_elements - gdn.state_fp32_elements
    assert gdn_bytes[10] == gdn_bytes[10_000] == 3 * (conv * 2 + gdn.state_fp32_elements * 4)
    forced = estimate_cost(preset_config("tiny-hybrid"), contexts=(10,), state_dtype_bytes=2)
    assert forced.by_mixer()["gated_deltanet"]["bytes_per_sequence"][10] == 3 * gdn.state_elements * 2


def test_recurrent_state_bytes_match_a_real_cache():
    """The inspector's per-layer state bytes equal the bytes of the cache a bf16 model really fills."""
    for name in ("tiny-gdn", "tiny-mamba2"):
        config = preset_config(name, vocab_size=64)
        model = HybridForCausalLM(config).to(torch.bfloat16).eval()
        cache = output_cache(model(torch.randint(0, 64, (1, 5)), use_cache=True))
        layer = cache.layers[0]
        real = sum(t.numel() * t.element_size() for t in (layer.conv_states[0], layer.recurrent_states[0]))
        report = estimate_cost(config, contexts=(5,), dtype_bytes=2)
        assert report.by_mixer()[config.mixer_types[0]]["state_bytes_per_sequence_per_layer"] == real


def test_published_shapes_are_in_range():
    ds = estimate_cost(preset_config("deepseek-v3-like"), measure=False)
    assert 668e9 < ds.total_params < 674e9  # DeepSeek-V3: 671 B total (without MTP)
    assert 36e9 < ds.active_params < 39e9  # 37 B activated
    qn = estimate_cost(preset_config("qwen3-next-like"), measure=False)
    assert 79e9 < qn.total_params < 82e9 and 2.9e9 < qn.active_params < 4.0e9  # Qwen3-Next-80B-A3B


def test_every_preset_is_costed_and_every_mixer_type_has_a_function():
    assert all(spec.cost is not None for spec in (*mixer_specs().values(), *mlp_specs().values()))
    for name in PRESETS:
        report = estimate_cost(preset_config(name), measure=False)
        assert report.total_params >= report.active_params > 0


def test_registry_extension(monkeypatch):
    calls = []

    def fake(config, layer_idx):
        calls.append(layer_idx)
        return MixerCost(params=7, matmul_params=5, cache_per_token=3, flops=lambda c: 11.0 * c)

    monkeypatch.setitem(
        registry._MIXERS, "attention", dataclasses.replace(mixer_spec("attention"), cost=fake)
    )
    config = preset_config("tiny-attention")
    report = estimate_cost(config, contexts=(2,), measure=False)
    assert calls == [0, 1]
    assert report.cache_bytes(2) == 2 * 2 * 3 * 2
    assert report.flops_per_token(2) == 2 * (2 * (5 + 3 * 64 * 128) + 512 * 64) + 2 * 22.0


def test_outputs_text_json_plot(tmp_path):
    report = estimate_cost(preset_config("qwen3-next-like"), contexts=(4096, 32768))
    text = report.to_text()
    assert "gated_deltanet" in text and "attention" in text and "@32K" in text and "active" in text
    data = json.loads(report.to_json())
    assert data["total_params"] == report.total_params and len(data["layers"]) == 48
    assert set(data["cache_bytes_per_sequence"]) == {"4096", "32768"}
    path = report.plot(str(tmp_path / "cache.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compress_pattern():
    assert compress_pattern(["g", "g", "g", "a"] * 3) == "(3×g, a)×3"
    assert compress_pattern(["a"] * 5) == "5×a"
    assert compress_pattern(["d", "m", "m"]) == "d, 2×m"
    assert compress_pattern(["g", "g", "a", "g"]) == "2×g, a, g"


def test_a_dsa_indexer_wider_than_its_savings_is_warned_about(capsys):
    """A small model with the default indexer (8 heads × 64, wider than its 4 × 32 attention) costs more
    FLOPs/token in sparse mode than dense at every context: the inspector, its JSON and convert-dsa say so;
    a narrow indexer at long context does not warn."""
    from hf_hybrid.cli import main

    small = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    wide = HybridConfig(**small, mixer_types=["dsa", "dsa"], dsa_base="attention", index_topk=256)
    report = estimate_cost(wide, contexts=(4096, 131072))
    assert len(report.notes) == 1 and "8×64 indexer costs more than top-256 saves" in report.notes[0]
    assert "every given context" in report.notes[0]
    assert "warning: sparse DSA costs more" in report.to_text() and json.loads(report.to_json())["notes"]
    # the warning is about the trained (sparse) model, whatever mode the checkpoint is saved in
    assert estimate_cost(HybridConfig(**wide.to_dict() | {"dsa_mode": "dense"}), (4096,)).notes
    narrow = HybridConfig(
        **small, mixer_types=["dsa", "dsa"], dsa_base="attention", index_topk=256, index_n_heads=1,
        index_head_dim=16,
    )  # fmt: skip
    assert estimate_cost(narrow, contexts=(131072,)).notes == []
    assert estimate_cost(HybridConfig(**small), contexts=(4096,)).notes == []  # no DSA: nothing to say
    assert main(["inspect", "tiny-attention", "--context", "1K"]) == 0
    assert "warning" not in capsys.readouterr().out
