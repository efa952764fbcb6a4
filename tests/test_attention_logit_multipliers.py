"""``attention_logit_multipliers``: a per-layer factor on the q·k logits of softmax attention layers (Ergo's
``global_attention_scale``). Against a naive attention written out (outputs and every gradient) under each of
transformers' kernels this machine runs, against the same model with q_proj scaled instead (RoPE, sliding
window), the test kit's invariance checks in a mix of its own, and the refusals. fp32, 1e-5 as elsewhere
(same maths, another summation order)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_hybrid import HybridForCausalLM
from hf_hybrid.convert.native.base import functional_fields
from hf_hybrid.testing import check_layer_kind, tiny_config

ATOL = 1e-5
MULTIPLIERS = [0.5, 3.0]


def _naive_attention(mixer, x, real, window):
    """softmax(q·kᵀ · d^-0.5 · m + mask) v through o_proj, written out: x [B, T, H], real [B, T] bool;
    no RoPE, no norms (the model below has neither)."""
    b, t, _ = x.shape
    h, hkv, d = mixer.num_heads, mixer.num_key_value_heads, mixer.head_dim
    q = mixer.q_proj(x).view(b, t, h, d).transpose(1, 2)  # (B, h, T, d)
    k = mixer.k_proj(x).view(b, t, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    v = mixer.v_proj(x).view(b, t, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    m = MULTIPLIERS[mixer.layer_idx]
    scores = q @ k.transpose(2, 3) * d**-0.5 * m  # (B, h, T, T)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (j <= i) & (j > i - window if window else True) & real[:, None, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num()  # a padded query sees none
    return mixer.o_proj((probs @ v).transpose(1, 2).reshape(b, t, h * d))


def _kernels() -> list[str]:
    out = ["eager", "sdpa"]
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            out.append("flash_attention_2")
        except ImportError:
            pass
    return out


def _mixer_io(model, ids, mask) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's mixer input and output in one forward (the output keeps its graph)."""
    seen = {}
    hooks = [
        layer.mixer.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, layer in enumerate(model.model.layers)
    ]
    model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("implementation", _kernels())
def test_each_kernel_equals_the_naive_attention_with_gradients(implementation):
    device = "cuda" if implementation == "flash_attention_2" else "cpu"
    dtype = torch.bfloat16 if implementation == "flash_attention_2" else torch.float32
    atol = 2e-2 if dtype == torch.bfloat16 else ATOL  # bf16: 8 mantissa bits, outputs of order 1
    config = tiny_config(
        mixer_types=["sliding_attention", "attention"],
        sliding_window=3,
        attention_rope=False,
        attention_logit_multipliers=MULTIPLIERS,
    )
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = HybridForCausalLM(config).to(device, dtype).eval()
    ids = torch.randint(1, config.vocab_size, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    real = mask.bool()
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        grads = []
        for path in ("kernel", "naive"):
            model.zero_grad()
            x, out = _mixer_io(model, ids, mask)[i]  # layer i's weights reach the loss only through out
            if path == "naive":
                out = _naive_attention(mixer, x.detach(), real, 3 if i == 0 else None)
            else:
                kernel_out = out
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(i)).to(out)
            (out[real] * weight[real]).sum().backward()
            grads.append({n: p.grad.detach().float().clone() for n, p in mixer.named_parameters()})
        naive = out
        torch.testing.assert_close(kernel_out[real].float(), naive[real].float(), atol=atol, rtol=0)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=atol, rtol=0, msg=name)


def test_a_multiplier_equals_scaling_q_proj_with_rope_and_a_window():
    """Without q/k norms a factor m on the logits is q_proj (and its bias) scaled by m: with RoPE, a window,
    GQA, qkv bias and left padding, the model with multipliers equals the plain model so edited."""
    kw = dict(
        mixer_types=["attention", "sliding_attention", "attention"],
        num_hidden_layers=3,
        sliding_window=3,
        attention_bias=True,
    )
    multipliers = [2.5, 0.25, 1.0]
    torch.manual_seed(0)
    ours = HybridForCausalLM(tiny_config(**kw, attention_logit_multipliers=multipliers)).eval()
    plain = HybridForCausalLM(tiny_config(**kw)).eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    unscaled = HybridForCausalLM(tiny_config(**kw)).eval()
    unscaled.load_state_dict(state)  # the same weights without the multipliers: other logits
    for i, m in enumerate(multipliers):
        for name in ("weight", "bias"):
            state[f"model.layers.{i}.mixer.q_proj.{name}"] = (
                state[f"model.layers.{i}.mixer.q_proj.{name}"] * m
            )
    plain.load_state_dict(state)
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
        c = unscaled(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    assert (a[real] - c[real]).abs().max() > 1e-3


MIX = {
    "mixer_types": ["sliding_attention", "gated_deltanet", "attention"],
    "num_hidden_layers": 3,
    "sliding_window": 3,
    "use_qk_norm": True,
    "nope_layers": [2],
    "attention_logit_multipliers": [1.5, 1.0, 4.0],
}


def test_the_kit_passes_on_a_mix_using_multipliers():
    """Every check of the kit (decode, two-piece prefill, padding, packing, batch, generate, beam search,
    save/load, cost, gradients, aux terms) on sliding + GDN + global NoPE attention with multipliers."""
    from hf_hybrid.testing import CHECKS

    assert check_layer_kind(config_overrides=MIX) == list(CHECKS)


def test_validation_default_and_old_checkpoints(tmp_path):
    kw = dict(mixer_types=["gated_deltanet", "attention"])
    cases = [
        ({"attention_logit_multipliers": [1.0]}, r"attention_logit_multipliers=\[1.0\] must be None or 2"),
        ({"attention_logit_multipliers": [1.0, 0.0]}, r"must be None or 2 positive numbers"),
        ({"attention_logit_multipliers": [1.0, "2"]}, r"must be None or 2 positive numbers"),
        (
            {"attention_logit_multipliers": [2.0, 1.0]},
            r"attention_logit_multipliers\[0\]=2.0: layer 0 is mixer_types\[0\]='gated_deltanet'",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(Exception, match=message):
            tiny_config(**kw, **overrides)
    assert tiny_config(**kw).attention_logit_multipliers is None  # the default
    # 1 on a layer without softmax attention is allowed; all ones is the default's function
    ones = tiny_config(**kw, attention_logit_multipliers=[1.0, 1.0])
    assert functional_fields(ones) == functional_fields(tiny_config(**kw))
    # a checkpoint saved before the option loads with it at None, the same logits
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(**kw)).eval()
    model.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    on_disk.pop("attention_logit_multipliers", None)
    (tmp_path / "config.json").write_text(json.dumps(on_disk))
    again = HybridForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.attention_logit_multipliers is None
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # the card / inspect rows say it
    from hf_hybrid.registry import mixer_spec

    rows = dict(mixer_spec("attention").describe(tiny_config(**kw, attention_logit_multipliers=[1.0, 2.0])))
    assert "logit multipliers [1.0, 2.0]" in rows["attention"]


@pytest.mark.slow  # flex_attention compiles its kernel: ~13 s on a shared CPU (and has no CPU backward)
def test_flex_attention_honours_the_multipliers():
    """flex_attention's outputs equal eager's (checked against the naive attention above) with multipliers."""
    config = tiny_config(
        mixer_types=["sliding_attention", "attention"],
        sliding_window=3,
        attention_rope=False,
        attention_logit_multipliers=MULTIPLIERS,
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("flex_attention")
        flex = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(flex[real], eager[real], atol=ATOL, rtol=0)


def test_recipes_on_a_model_with_multipliers():
    """hybridize: a layer that leaves softmax attention leaves its multiplier (it has no logits), the kept
    attention layers keep theirs; DSA conversion (DSA layers take no multiplier) is refused naming it."""
    from hf_hybrid.convert.dsa import convert_model_to_dsa
    from hf_hybrid.convert.hybridize import hybridize_model

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(attention_logit_multipliers=[2.0, 3.0])).eval()
    student = hybridize_model(model, attention_layers=[1], mixer="gated_deltanet")
    assert student.config.mixer_types == ["gated_deltanet", "attention"]
    assert student.config.attention_logit_multipliers == [1.0, 3.0]
    assert student.model.layers[1].mixer.scaling == model.model.layers[1].mixer.scaling
    with pytest.raises(
        Exception, match=r"attention_logit_multipliers\[0\]=2.0: layer 0 is mixer_types\[0\]='dsa'"
    ):
        convert_model_to_dsa(model, index_topk=4)


def test_an_export_without_the_option_refuses_it_by_name(tmp_path):
    from hf_hybrid.convert.native import NativeConversionError, export_native

    model = HybridForCausalLM(tiny_config(attention_logit_multipliers=[2.0, 1.0]))
    with pytest.raises(
        NativeConversionError, match=r"attention_logit_multipliers=\[2.0, 1.0\] has no counterpart"
    ):
        export_native(model, tmp_path / "out", to="llama")
    assert not (tmp_path / "out").exists()
