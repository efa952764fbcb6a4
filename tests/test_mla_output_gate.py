"""The gated MLA output (``mla_output_gate``, AXK2's attention) as an option of its own: the layer against a
reference written out by hand, against transformers' ``AXK2Attention`` with the same weights, the test kit's
invariance checks in a mix (MLA and DSA on MLA beside GQA attention), and the refusals. fp32, 1e-5 as in
tests/test_mla.py (same maths, different summation order)."""

from __future__ import annotations

import pytest
import torch

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.convert.native import NativeConversionError, export_native
from hf_hybrid.testing import check_layer_kind

ATOL = 1e-5
MLA = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=1,
    q_lora_rank=12,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    mixer_types=["mla"],
)


def test_gated_output_equals_the_formula_written_out():
    torch.manual_seed(0)
    cfg = HybridConfig(**MLA, mla_output_gate=True)
    model = HybridForCausalLM(cfg).eval()
    mla = model.model.layers[0].mixer
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.3)
    # run the layer inside the model (RoPE, masks, context) and read its input and output
    seen = {}
    mla.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        model(inputs_embeds=torch.randn(2, 7, 32))
    x, got = seen["x"], seen["out"]
    H, dn, dr, dv, rq = 4, 8, 4, 6, 12
    with torch.no_grad():
        raw = mla.q_a_proj(x)
        normed = mla.q_a_layernorm(raw)
        qg = (torch.cat([normed, raw], -1) @ mla.q_b_proj.weight.T).view(2, 7, H, dn + dr + dv)
        q, g = qg[..., : dn + dr], qg[..., dn + dr :]
        c, k_pe = mla.kv_a_proj_with_mqa(x).split([16, dr], -1)
        kv = mla.kv_b_proj(mla.kv_a_layernorm(c)).view(2, 7, H, dn + dv)
        # RoPE: rotate-half on the rope channels at positions 0..6 (theta 10000, table of size dr)
        inv = 1.0 / (10000.0 ** (torch.arange(0, dr, 2).float() / dr))
        ang = torch.arange(7).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rot(t):
            a, b = t[..., : dr // 2], t[..., dr // 2 :]
            return t * cos[:, None] + torch.cat([-b, a], -1) * sin[:, None]

        qq = torch.cat([q[..., :dn], rot(q[..., dn:])], -1)
        kk = torch.cat([kv[..., :dn], rot(k_pe[:, :, None].expand(-1, -1, H, -1))], -1)
        s = torch.einsum("bthd,bshd->bhts", qq, kk) * (dn + dr) ** -0.5
        s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), kv[..., dn:])
        want = mla.o_proj((o * torch.sigmoid(g)).reshape(2, 7, H * dv))
    assert mla.q_b_proj.weight.shape == (H * (dn + dr + dv), 2 * rq)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_matches_transformers_axk2_attention():
    """The option alone against transformers' ``AXK2Attention`` (same weights; its indexer keeps every token
    at index_topk >= T, so it is plain gated MLA). The whole axk2 family (gated output, gated norms, DSA) is
    compared in tests/test_native_families.py."""
    mod = pytest.importorskip(
        "transformers.models.axk2.modeling_axk2", reason="this transformers has no axk2"
    )
    from transformers.models.axk2.configuration_axk2 import AXK2Config

    from hf_hybrid.convert.native.axk2 import _q_gate_rows
    from hf_hybrid.convert.native.base import RuleContext
    from hf_hybrid.convert.native.deepseek import _kv_a_rows

    tcfg = AXK2Config(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        index_topk=64,
        index_n_heads=2,
        index_head_dim=8,
        num_hidden_layers=1,
        rms_norm_eps=1e-6,
    )
    tcfg._attn_implementation = "eager"
    torch.manual_seed(1)
    theirs = mod.AXK2Attention(tcfg, 0).eval()
    for name, p in theirs.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.3)
    cfg = HybridConfig(**MLA, mla_output_gate=True, mla_norm_eps=1e-6)
    model = HybridForCausalLM(cfg).eval()
    ours = model.model.layers[0].mixer
    ctx = RuleContext(cfg, tcfg, 0)
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("indexer.")}
    state["q_b_proj.weight"] = state.pop("q_gate_proj.weight")[_q_gate_rows(ctx)]
    state["kv_a_proj_with_mqa.weight"] = state["kv_a_proj_with_mqa.weight"][_kv_a_rows(ctx)]
    ours.load_state_dict(state)
    x = torch.randn(2, 9, 32)
    rotary = mod.AXK2RotaryEmbedding(tcfg)
    pos = torch.arange(9)[None].expand(2, -1)
    mask = torch.zeros(2, 1, 9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    seen = {}
    ours.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        model(inputs_embeds=x)
        want, _ = theirs(seen["x"], rotary(seen["x"], pos), mask, position_ids=pos)
    torch.testing.assert_close(seen["out"], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("base_mix", [["mla", "attention", "dsa"]])
def test_invariance_kit_in_a_mix_of_its_own(base_mix):
    run = check_layer_kind(
        config_overrides=dict(
            num_hidden_layers=3,
            mixer_types=base_mix,
            q_lora_rank=12,
            mla_output_gate=True,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
        )
    )
    assert {"decode", "padding", "packing", "save_load", "generate", "gradients", "cost"} <= set(run)


def test_refusals_name_the_field(tmp_path):
    with pytest.raises(Exception, match=r"mla_output_gate=True needs a q latent .*q_lora_rank=None"):
        HybridConfig(**{**MLA, "q_lora_rank": None}, mla_output_gate=True)
    dsa = dict(
        MLA, mixer_types=["dsa"], index_n_heads=2, index_head_dim=8, index_topk=4, mla_output_gate=True
    )
    model = HybridForCausalLM(HybridConfig(**dsa))
    # deepseek_v32 has no gated output; axk2 has it but gates its norms too
    with pytest.raises(NativeConversionError, match=r"mla_output_gate"):
        export_native(model, tmp_path / "v32", to="deepseek_v32")
    with pytest.raises(NativeConversionError, match=r"gated_norms=None"):
        export_native(model, tmp_path / "axk2", to="axk2")
    assert not (tmp_path / "v32").exists() and not (tmp_path / "axk2").exists()
