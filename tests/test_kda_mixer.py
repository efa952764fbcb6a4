"""Kimi Delta Attention in the model (issue 15): save/load, bf16, the config fields, cost, MLA without RoPE
(Kimi Linear's MLA), and the layer against transformers' own ``KimiLinearDeltaAttention`` with the same
weights. The invariance tests every recurrent mixer gets (cached decode, padding, packing, generate, beam
search, training) run on the KDA models ("kda", "kimi_like", "kda_attention") in tests/test_linear_mixers.py.

The op-level parity (chunked torch vs the step-by-step recurrence, every gradient) is in
tests/ops/test_kda.py. Tolerance: fp32, 1e-5 absolute — the chunked and step paths compute the same sums in
another order.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_linear_mixers import MIXERS, build, tiny  # the KDA models are in its table too

from hf_hybrid import HybridCache, HybridConfig, HybridForCausalLM
from hf_hybrid.cost import estimate_cost, measure_module
from hf_hybrid.mixers import MIXER_REGISTRY
from hf_hybrid.mixers.base import MixerContext
from hf_hybrid.presets import preset_config
from hf_hybrid.registry import mixer_spec

ATOL = 1e-5


def test_save_load_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("kimi_like")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer_types == model.config.mixer_types and loaded.config.mla_use_rope is False
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_training_step_is_finite_and_keeps_the_state_in_fp32():
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny(**MIXERS["kda"], linear_chunk_size=64)).to(torch.bfloat16).train()
    ids = torch.randint(0, 64, (1, 2048))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad.float()).all()
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        model.eval()(ids[:, :8], cache=cache, use_cache=True)
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32  # what the cost inspector counts


# ---- config, cost, presets ---------------------------------------------------------------------------------


def test_config_defaults_and_errors():
    config = HybridConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mixer_pattern="kda")
    assert (config.kda_num_heads, config.kda_head_dim, config.kda_gate_rank) == (4, 16, 16)
    assert config.layer_types == ["linear_attention"] * 2 and config.has_recurrent_layers
    # @strict wraps validator errors in its own exception type; the message is ours
    with pytest.raises(Exception, match=r"HybridConfig.kda_head_dim=0 must be a positive integer"):
        HybridConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mixer_pattern="kda", kda_head_dim=0
        )
    with pytest.raises(Exception, match=r"HybridConfig.kda_conv_kernel_size=-1 must be a positive integer"):
        HybridConfig(num_hidden_layers=2, mixer_pattern="kda", kda_conv_kernel_size=-1)


def test_cost_formula_matches_module_and_counts_the_state_in_fp32():
    config = preset_config("tiny-kda", kda_gate_rank=8, kda_conv_kernel_size=3)
    formula = mixer_spec("kda").cost(config, 0)
    assert measure_module(mixer_spec("kda").cls, config, 0) == (formula.params, formula.matmul_params)
    h, d, k = 4, 16, 3  # tiny-kda: 4 heads of 16
    assert (
        formula.state_elements == 3 * h * d * (k - 1) + h * d * d and formula.state_fp32_elements == h * d * d
    )
    report = estimate_cost(config, contexts=(10, 10_000), dtype_bytes=2)
    per_layer = report.by_mixer()["kda"]["state_bytes_per_sequence_per_layer"]
    assert per_layer == 3 * h * d * (k - 1) * 2 + h * d * d * 4  # conv tail in bf16, recurrent state in fp32
    assert report.cache_bytes(10) == report.cache_bytes(10_000) == 2 * per_layer
    # the same figure as the model's own cache holds after a forward (fp32 model: everything is 4 bytes)
    model = HybridForCausalLM(config).eval()
    cache = HybridCache(config=config)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 5)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    held = layer.conv_states[0].numel() * layer.conv_states[0].element_size()
    held += layer.recurrent_states[0].numel() * layer.recurrent_states[0].element_size()
    assert (
        held == estimate_cost(config, dtype_bytes=4).by_mixer()["kda"]["state_bytes_per_sequence_per_layer"]
    )


def test_kimi_linear_like_matches_the_published_model():
    """48B-A3B as published; the exact figures equal transformers' own KimiLinearForCausalLM built on the meta
    device from the published config.json (49,122,675,072 total; 3,484,453,248 with 8 + 1 experts per
    token)."""
    report = estimate_cost(preset_config("kimi-linear-like"))
    assert report.total_params == 49_122_675_072
    assert report.active_params == 3_484_453_248
    assert report.layers[3].mixer == "mla" and report.layers[26].mixer == "mla"
    assert sum(layer.mixer == "kda" for layer in report.layers) == 20
    # MLA caches the latent (512) + shared key (64) per token; KDA only its constant state
    assert report.by_mixer()["mla"]["cache_bytes_per_token_per_layer"] == (512 + 64) * 2


def _ctx(cache=None, past_length=0, rope=None) -> MixerContext:
    return MixerContext(
        padding_mask=None,
        attention_mask_2d=None,
        masks={},
        position_ids=None,
        cu_seqlens=None,
        max_seqlen=None,
        rope=rope,
        cache=cache,
        past_length=past_length,
    )


# ---- MLA without RoPE --------------------------------------------------------------------------------------


def test_mla_without_rope_never_rotates():
    """NoPE MLA never asks for cos/sin (``rope=None`` in the context would fail) and equals MLA with RoPE at
    the identity rotation (cos = 1, sin = 0); real rotations change the RoPE layer's output."""
    config = tiny(
        mixer_types=["mla"],
        num_hidden_layers=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    )
    torch.manual_seed(0)
    rope_layer = MIXER_REGISTRY["mla"](config, 0).eval()
    nope_layer = MIXER_REGISTRY["mla"](tiny(**{**config.to_diff_dict(), "mla_use_rope": False}), 0).eval()
    nope_layer.load_state_dict(rope_layer.state_dict())
    x = torch.randn(2, 7, 32)
    identity = lambda dim: (torch.ones(2, 7, dim), torch.zeros(2, 7, dim))  # noqa: E731
    angles = torch.randn(2, 7, 2)
    rotation = lambda dim: (angles.repeat(1, 1, 2).cos(), angles.repeat(1, 1, 2).sin())  # noqa: E731
    with torch.no_grad():
        nope = nope_layer(x, _ctx(rope=None))
        torch.testing.assert_close(nope, rope_layer(x, _ctx(rope=identity)), atol=ATOL, rtol=0)
        assert (rope_layer(x, _ctx(rope=rotation)) - nope).abs().max() > 1e-3


# ---- against transformers' own layer -----------------------------------------------------------------------


@pytest.fixture
def kimi_reference(monkeypatch):
    """transformers' Kimi Linear modeling with fla-core hidden: with fla installed, its module-level KDA and
    conv functions are fla's Triton kernels (chosen at import), which fail on CPU; use the torch references
    they wrap."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    for name in (
        "chunk_kimi_delta_attention",
        "recurrent_kimi_delta_attention",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    ):
        monkeypatch.setattr(kimi, name, inspect.unwrap(getattr(kimi, name)))
    return kimi


def test_layer_equals_transformers_kimi_delta_attention(kimi_reference):
    """The strongest check: transformers' KimiLinearDeltaAttention with the same weights (a rename, and
    A_log's reshape), prefill and then cached decode steps, fp32, 1e-5."""
    from transformers import DynamicCache, KimiLinearConfig

    ref_config = KimiLinearConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        linear_attn_config={
            "num_heads": 2,
            "head_dim": 8,
            "short_conv_kernel_size": 4,
            "kda_layers": [1],
            "full_attn_layers": [],
        },
    )
    torch.manual_seed(0)
    ref = kimi_reference.KimiLinearDeltaAttention(ref_config, 0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.forget_gate.A_log.uniform_(0, 1)
    config = tiny(mixer_types=["kda"], num_hidden_layers=1, kda_gate_rank=8)
    ours = MIXER_REGISTRY["kda"](config, 0).eval()
    state = {name: p for name, p in ref.state_dict().items()}
    state["forget_gate.A_log"] = state["forget_gate.A_log"].flatten()
    ours.load_state_dict(state, strict=True)

    x = torch.randn(2, 11, 32)
    # the cache goes positionally: the layer's keyword is cache_params on transformers 5.23 and cache on 5.24
    ref_cache, our_cache = DynamicCache(config=ref_config), HybridCache(config=config)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x[:, :8], _ctx(our_cache)), ref(x[:, :8], ref_cache), atol=ATOL, rtol=0
        )
        for t in range(8, 11):
            step = ours(x[:, t : t + 1], _ctx(our_cache, past_length=t))
            torch.testing.assert_close(step, ref(x[:, t : t + 1], ref_cache), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x, _ctx()), ref(x), atol=ATOL, rtol=0)
