"""Linear-time mixers in the model (issue 4): cache and decoding, padding and packing, hybrids, numerics.

The op-level parity (chunked torch vs the step-by-step recurrence, every gradient) is in tests/ops/.
Tolerance: fp32, 1e-5 absolute — the chunked and step paths compute the same sums in another order.
"""

from __future__ import annotations

import pytest
import torch

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid import testing as kit

ATOL = 1e-5

MIXERS = {
    "gated_deltanet": dict(mixer_types=["gated_deltanet"] * 2),
    "gdn_gva": dict(mixer_types=["gated_deltanet"] * 2, gdn_num_key_heads=1, gdn_num_value_heads=4),
    "mamba2": dict(mixer_types=["mamba2"] * 2, mamba_n_groups=2),
    "linear_identity": dict(mixer_types=["linear_attention"] * 2),
    "linear_elu_conv_decay": dict(
        mixer_types=["linear_attention"] * 2,
        linear_feature_map="elu",
        linear_decay="scalar",
        linear_conv_kernel_size=3,
    ),
    "linear_performer_gla": dict(
        mixer_types=["linear_attention"] * 2,
        linear_feature_map="random_features",
        linear_decay="per_channel",
        linear_random_features=16,
    ),
    "hybrid_3to1_gdn": dict(num_hidden_layers=4, mixer_pattern="3:1 gated_deltanet:attention"),
    "nemotron_like": dict(
        num_hidden_layers=4,
        mixer_types=["mamba2", "attention", "mamba2", "mamba2"],
        mlp_types=["none", "dense", "none", "dense"],
    ),
    # MiniMax's lightning attention with its scaled residuals from the input norm
    "lightning": dict(
        num_hidden_layers=3,
        mixer_types=["linear_attention", "attention", "linear_attention"],
        linear_decay="fixed_slope",
        linear_qkv_activation="silu",
        linear_scale=1.0,
        linear_norm_scope="full",
        linear_output_gate=True,
        residual_from_norm=True,
        mixer_residual_scales=[1.5, 0.8, 1.5],
        mixer_output_scales=[0.7, 1.2, 0.7],
        mlp_residual_scale=1.3,
        mlp_output_scale=0.9,
    ),
    # Nemotron-H's one-block layers: MLP-only layers, ungated relu² MLPs, attention without RoPE
    "nemotron_blocks": dict(
        num_hidden_layers=4,
        mixer_types=["mamba2", "none", "attention", "none"],
        mlp_types=["none", "dense", "none", "dense"],
        mlp_gated=False,
        hidden_act="relu2",
        attention_rope=False,
    ),
    # Kimi Delta Attention (issue 15); tests/test_kda_mixer.py has its own checks
    "kda": dict(mixer_types=["kda"] * 2),
    # Kimi Linear's shape in miniature: KDA, KDA, KDA, MLA without RoPE, MoE after the first layer
    "kimi_like": dict(
        num_hidden_layers=4,
        mixer_pattern="3:1 kda:mla",
        mla_use_rope=False,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        mlp_pattern="moe",
        first_k_dense=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_shared_experts=1,
        router_scoring_func="sigmoid",
    ),
    "kda_attention": dict(num_hidden_layers=4, mixer_pattern="3:1 kda:attention"),
    # OLMo Hybrid's options in a mix of their own: post-norm blocks (x + norm(f(x))) on any mixer and MLP
    # kind, GDN with β ∈ (0, 2) and its own output-norm eps
    "post_norm_mix": dict(
        num_hidden_layers=4,
        mixer_types=["gated_deltanet", "attention", "mamba2", "gated_deltanet"],
        mlp_types=["dense", "dense", "none", "dense"],
        norm_placement=["post", "post", "pre", "pre"],
        gdn_allow_neg_eigval=True,
        gdn_norm_eps=1e-5,
        use_qk_norm=True,
        qk_norm_scope="full",
    ),
    # learned attention sinks in a mix of their own (global and sliding attention beside a recurrent layer)
    "attention_sinks_mix": dict(
        num_hidden_layers=3,
        mixer_types=["attention", "gated_deltanet", "sliding_attention"],
        sliding_window=4,
        attention_sinks=True,
    ),
    # low-rank gated RMSNorms in a mix of their own (on either branch, pre- and post-norm layers)
    "gated_norm_mix": dict(
        num_hidden_layers=3,
        mixer_types=["attention", "gated_deltanet", "mamba2"],
        mlp_types=["dense", "dense", "none"],
        gated_norms=["both", "mlp", "mixer"],
        gated_norm_rank=4,
        norm_placement=["pre", "post", "pre"],
    ),
    # per-layer NoPE in a mix of its own: a global NoPE layer between RoPE sliding / global layers
    "per_layer_nope": dict(
        num_hidden_layers=4,
        mixer_types=["sliding_attention", "attention", "gated_deltanet", "attention"],
        sliding_window=4,
        nope_layers=[1],
    ),
}


def tiny(**overrides) -> HybridConfig:
    return kit.tiny_config(**overrides)  # the kit's tiny sizes (chunk size 4: several chunks per sequence)


def build(name: str, seed: int = 0, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    return HybridForCausalLM(tiny(**MIXERS[name], **overrides)).eval()


# The invariance suite (hf_hybrid.testing, the kit any layer kind runs) on each stack above.


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_full_forward_equals_prefill_then_token_by_token_decode(name):
    kit.check_decode(build(name), ATOL)


@pytest.mark.parametrize(
    "name",
    [
        "gated_deltanet",
        "mamba2",
        "linear_elu_conv_decay",
        "hybrid_3to1_gdn",
        "kda",
        "kimi_like",
        "post_norm_mix",
        "per_layer_nope",
        "attention_sinks_mix",
        "gated_norm_mix",
    ],
)
def test_prefill_in_two_pieces_equals_one_prefill(name):
    kit.check_two_piece_prefill(build(name), ATOL)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_padding_never_leaks(name):
    """Left and right padding with garbage in the padded slots, and a left-padded batch of one."""
    kit.check_padding(build(name), ATOL)


@pytest.mark.parametrize(
    "name",
    [
        "gated_deltanet",
        "mamba2",
        "linear_elu_conv_decay",
        "hybrid_3to1_gdn",
        "lightning",
        "nemotron_blocks",
        "kda",
        "kimi_like",
        "post_norm_mix",
        "per_layer_nope",
        "attention_sinks_mix",
        "gated_norm_mix",
    ],
)
def test_packed_equals_each_sequence_alone(name):
    """position_ids alone, DataCollatorWithFlattening with position ids, and with its flash kwargs."""
    kit.check_packing(build(name), ATOL)


@pytest.mark.parametrize(
    "name", ["gated_deltanet", "mamba2", "linear_identity", "hybrid_3to1_gdn", "kda", "kimi_like"]
)
def test_generate_works_for_pure_recurrent_stacks_and_hybrids(name):
    """A left-padded batch generates what each prompt generates alone, and the same without the cache."""
    kit.check_generate(build(name), ATOL)


@pytest.mark.parametrize("name", ["hybrid_3to1_gdn", "kimi_like"])
def test_beam_search_reorders_recurrent_states(name):
    kit.check_beam_search(build(name), ATOL)


def test_gdn_output_is_norm_then_gate_and_mamba_is_gate_then_norm():
    gdn = build("gated_deltanet").model.layers[0].mixer
    mamba = build("mamba2").model.layers[0].mixer
    assert gdn.norm.norm_before_gate is True
    assert mamba.norm.norm_before_gate is False
    # The order matters numerically: the two conventions differ on the same input.
    x, z = torch.randn(2, 3, gdn.head_v_dim), torch.randn(2, 3, gdn.head_v_dim)
    a = gdn.norm(x, z)
    gdn.norm.norm_before_gate = False
    b = gdn.norm(x, z)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2", "linear_elu_conv_decay"])
def test_bf16_training_step_long_sequence_is_finite(name):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny(**MIXERS[name], linear_chunk_size=64)).to(torch.bfloat16).train()
    ids = torch.randint(0, 64, (1, 8192))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad.float()).all()


# KDA's 3:1 hybrid learns more slowly here: 15 steps reach 0.71 of the first loss (GDN's: 0.64), 25 reach 0.49
@pytest.mark.parametrize(
    ("name", "steps", "ratio"), [("hybrid_3to1_gdn", 15, 0.7), ("kda_attention", 25, 0.6)]
)
def test_training_loss_falls_on_repeated_batch(name, steps, ratio):
    model = build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < ratio * losses[0]


def test_save_load_roundtrip_recurrent(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("linear_performer_gla")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mamba2_layer_equals_transformers_mamba2_mixer():
    """An independent reference: transformers' own Mamba-2 layer with the same weights (fp32, 1e-5)."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as ReferenceMixer

    from hf_hybrid.mixers.base import MixerContext
    from hf_hybrid.mixers.mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    ref = ReferenceMixer(
        Mamba2Config(
            hidden_size=32,
            num_heads=4,
            head_dim=8,
            expand=1,
            state_size=8,
            n_groups=2,
            chunk_size=4,
            layer_norm_epsilon=1e-6,
            num_hidden_layers=1,
        ),
        0,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.A_log.uniform_(0, 1)
        ref.dt_bias.uniform_(-2, 0)
    ours = Mamba2Mixer(tiny(**MIXERS["mamba2"], mamba_expand=1), 0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 13, 32)
    ctx = MixerContext(
        padding_mask=None,
        attention_mask_2d=None,
        masks={},
        position_ids=None,
        cu_seqlens=None,
        max_seqlen=None,
        rope=None,
        cache=None,
        past_length=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-gdn", "tiny-mamba2", "tiny-linear"])
def test_training_step_under_cpu_bf16_autocast(preset):
    """Trainer / TRL with bf16=True on CPU run the forward under autocast: the chunked forms' hand-written
    backwards once met bf16 and fp32 operands ("Input dtypes must be the same") and crashed."""
    from hf_hybrid.presets import preset_config

    torch.manual_seed(0)
    model = HybridForCausalLM(
        preset_config(preset, vocab_size=64, hidden_size=32, intermediate_size=64)
    ).train()
    ids = torch.randint(0, 64, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(reference[name]).all(), name
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert (reference[name] - p.grad).abs().max() / scale < 0.1, name  # bf16 matmuls elsewhere, fp32 here


def test_post_norm_layer_and_negative_eigenvalue_gdn_equal_their_written_out_definitions():
    """The naive references, written out from the modules' parts: a "post" layer is h = x + norm₁(f(x)),
    out = h + norm₂(mlp(h)); a GDN with gdn_allow_neg_eigval equals the same GDN fed 2·sigmoid(b), i.e. the
    step-by-step recurrence with β doubled; gdn_norm_eps reaches the output norm."""
    from hf_hybrid.ops.delta_rule import naive_recurrent_gated_delta_rule

    model = build("post_norm_mix")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    layer = model.model.layers[0]
    assert layer.input_layernorm is None and layer.post_attention_layernorm is None
    assert layer.mixer.norm.eps == 1e-5
    x = torch.randn(2, 9, 32)
    captured = {}

    def grab(module, args, output):
        captured["ctx"] = args[1]

    handle = layer.register_forward_hook(grab)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), use_cache=False)  # the context of a forward of this shape
    handle.remove()
    ctx = captured["ctx"]
    with torch.no_grad():
        mixed = layer.mixer(x, ctx)
        h = x + layer.post_mixer_layernorm(mixed)
        want = h + layer.post_mlp_layernorm(layer.mlp(h, ctx))
        torch.testing.assert_close(layer(x, ctx), want, atol=0, rtol=0)

        # the GDN by hand: projections, conv, then the recurrence with β = 2·sigmoid(b)
        gdn = layer.mixer
        mixed_qkv, z = gdn.in_proj_qkvz(x).split([2 * gdn.key_dim + gdn.value_dim, gdn.value_dim], dim=-1)
        b_logit, a = gdn.in_proj_ba(x).float().chunk(2, dim=-1)
        conv = torch.nn.functional.conv1d(
            torch.nn.functional.pad(mixed_qkv.transpose(1, 2), (gdn.conv1d.kernel_size[0] - 1, 0)),
            gdn.conv1d.weight,
            groups=gdn.conv1d.groups,
        )
        q, k, v = (
            torch.nn.functional.silu(conv)
            .transpose(1, 2)
            .split([gdn.key_dim, gdn.key_dim, gdn.value_dim], -1)
        )
        g = -gdn.A_log.exp() * torch.nn.functional.softplus(a + gdn.dt_bias)
        o, _ = naive_recurrent_gated_delta_rule(
            q.reshape(2, 9, gdn.num_k_heads, -1),
            k.reshape(2, 9, gdn.num_k_heads, -1),
            v.reshape(2, 9, gdn.num_v_heads, -1),
            g,
            2.0 * b_logit.sigmoid(),
            use_qk_l2norm=True,
        )
        o = gdn.norm(o, z.reshape(2, 9, gdn.num_v_heads, -1))
        torch.testing.assert_close(gdn(x, ctx), gdn.out_proj(o.reshape(2, 9, -1)), atol=ATOL, rtol=0)


def test_per_layer_nope_equals_its_definition():
    """nope_layers=[i]: layer i is the same attention with RoPE switched off (its module equals one built with
    attention_rope=False, given the same weights and inputs), the other layers keep RoPE, and the model's
    function really changes (RoPE was on there before)."""
    model = build("per_layer_nope")
    assert [getattr(layer.mixer, "use_rope", None) for layer in model.model.layers] == [
        True,
        False,
        None,
        True,
    ]
    ids = torch.randint(0, 64, (2, 11))
    no_rope_anywhere = HybridForCausalLM(
        tiny(**{**MIXERS["per_layer_nope"], "nope_layers": None}, attention_rope=False)
    )
    with_rope = HybridForCausalLM(tiny(**{**MIXERS["per_layer_nope"], "nope_layers": None}))
    for other in (no_rope_anywhere, with_rope):
        other.load_state_dict(model.state_dict())
        other.eval()
    captured = {}

    def grab(name):
        def hook(module, args, output):
            captured[name] = (args, output)

        return hook

    hooks = [
        model.model.layers[1].mixer.register_forward_hook(grab("ours")),
        no_rope_anywhere.model.layers[1].mixer.register_forward_hook(grab("nope")),
    ]
    with torch.no_grad():
        out = model(ids, use_cache=False).logits  # no cache: the mixer is called again below
        no_rope_anywhere(ids, use_cache=False)
        # layer 1 of the NoPE-everywhere model, fed layer 1's input in ours, gives ours' layer-1 output
        ours_in, ours_out = captured["ours"]
        assert torch.equal(no_rope_anywhere.model.layers[1].mixer(*ours_in), ours_out)
        assert (out - with_rope(ids).logits).abs().max() > 1e-4
    for h in hooks:
        h.remove()
    with pytest.raises(
        Exception, match=r"nope_layers names layer 2, whose mixer_types\[2\]='gated_deltanet'"
    ):
        tiny(**{**MIXERS["per_layer_nope"], "nope_layers": [2]})
    with pytest.raises(Exception, match=r"nope_layers=\[1, 7\]: 7 is not a layer index"):
        tiny(**{**MIXERS["per_layer_nope"], "nope_layers": [1, 7]})


def test_attention_sinks_equal_their_definition_and_transformers_gpt_oss():
    """Sinks: softmax over [q·k scores, sink_h] with the sink's probability dropped (the written-out
    reference), equal to transformers' own gpt-oss eager attention on the same module and inputs; a model with
    sinks computes the same logits under sdpa and eager (sinks run eager; sdpa's mask=None is rebuilt as the
    causal mask), differs from the same weights without sinks, and its cost formula counts the sink logits."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    from hf_hybrid.cost import measure_module
    from hf_hybrid.mixers.attention import HybridAttention, eager_attention_forward
    from hf_hybrid.registry import mixer_spec

    config = tiny(**MIXERS["attention_sinks_mix"])
    attn = HybridAttention(config, 0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        attn.sinks.normal_(std=2.0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6).clone()
    mask[1, :, :, :2] = False  # left padding in row 1
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out, probs = eager_attention_forward(attn, q, k, v, mask, scaling=8**-0.5)
        ref, ref_probs = gpt_oss_eager(attn, q, k, v, additive, scaling=8**-0.5)
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ kk.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
        with_sink = torch.cat([scores, attn.sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)], dim=-1)
        written_out = (with_sink.softmax(-1)[..., :-1] @ vv).transpose(1, 2)
    torch.testing.assert_close(out, written_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    assert probs.sum(-1).max() < 1.0  # weight went to the sink

    spec = mixer_spec("attention")
    assert measure_module(spec.cls, config, 0)[0] == spec.cost(config, 0).params

    ids = torch.randint(0, 64, (2, 9))
    logits = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = tiny(**MIXERS["attention_sinks_mix"])
        cfg._attn_implementation = impl
        model = HybridForCausalLM(cfg).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            for layer in (model.model.layers[0], model.model.layers[2]):
                layer.mixer.sinks.normal_(std=2.0, generator=torch.Generator().manual_seed(1))
            logits[impl] = model(ids).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=ATOL, rtol=0)
    plain = HybridForCausalLM(tiny(**{**MIXERS["attention_sinks_mix"], "attention_sinks": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("sinks")})
    with torch.no_grad():
        assert (plain(ids).logits - logits["eager"]).abs().max() > 1e-3


def test_low_rank_gated_norm_equals_transformers_axk2_and_the_cost_counts_it():
    """LowRankGatedRMSNorm = transformers' AXK2GatedRMSNorm on the same weights (y = RMSNorm(x),
    y · sigmoid(fc2(silu(fc1(y))))); the layers get it where gated_norms says; the cost formula counts the
    gates; bad values are named."""
    from transformers import AXK2Config
    from transformers.models.axk2.modeling_axk2 import AXK2GatedRMSNorm

    from hf_hybrid.cost import estimate_cost
    from hf_hybrid.layers import LowRankGatedRMSNorm, RMSNorm

    theirs = AXK2GatedRMSNorm(AXK2Config(hidden_size=32, gated_norm_rank=4, rms_norm_eps=1e-6))
    ours = LowRankGatedRMSNorm(32, 4, eps=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        ours.norm.weight.copy_(theirs.norm.weight)
        ours.gate_down.weight.copy_(theirs.mlp.fc1.weight)
        ours.gate_up.weight.copy_(theirs.mlp.fc2.weight)
        x = torch.randn(3, 5, 32)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)

    model = build("gated_norm_mix")
    kinds = [
        [type(getattr(layer, n, None)).__name__ for n in ("input_layernorm", "post_attention_layernorm")]
        for layer in model.model.layers
    ]
    assert kinds[0] == ["LowRankGatedRMSNorm", "LowRankGatedRMSNorm"]
    assert isinstance(model.model.layers[1].post_mlp_layernorm, LowRankGatedRMSNorm)  # a post-norm layer
    assert isinstance(model.model.layers[1].post_mixer_layernorm, RMSNorm)
    assert isinstance(model.model.layers[2].input_layernorm, LowRankGatedRMSNorm)
    cost = estimate_cost(model.config)
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    for overrides, message in (
        ({"gated_norms": ["both", "mlp"]}, r"gated_norms has 2 entries but num_hidden_layers=3"),
        ({"gated_norms": ["both", "mlp", "input"]}, r"gated_norms\[2\]='input' is not allowed"),
        ({"gated_norm_rank": None}, r"gated_norm_rank=None must be a positive integer"),
    ):
        with pytest.raises(Exception, match=message):
            tiny(**{**MIXERS["gated_norm_mix"], **overrides})
