"""Hyper-connection residual streams (``hyper_connections``: iHC as HY-V4, mHC as GLM-5-Next): validation,
the naive reference, parity with transformers' own modules, the kit's invariance checks in a mix of their
own, fp32 weights, old checkpoints."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cost import estimate_cost
from hf_hybrid.hyper_connections import HyperConnection, HyperHead, naive_hyper_connection
from hf_hybrid.testing import check_layer_kind, tiny_config

# A mix of its own: softmax attention, MLA and Gated DeltaNet, dense and MoE MLPs, a mixer-only and an
# MLP-only layer (each branch present gets its own hyper-connection).
MIX = {
    "num_hidden_layers": 4,
    "mixer_types": ["attention", "mla", "gated_deltanet", "none"],
    "mlp_types": ["moe", "none", "dense", "moe"],
    "hc_mult": 3,
}
KINDS = ("ihc", "mhc")


def _tiny(kind: str, **kw) -> HybridConfig:
    return tiny_config(**{**MIX, "hyper_connections": kind, **kw})


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Stream weights away from their init (scale 0.01 / base 0 would hide mistakes in the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("_hc.", "hc_head.")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.ndim == 1 else 0.1))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hyper_connections", "hc", "hyper_connections='hc' is not allowed; choose one of: none, ihc, mhc"),
        ("hc_mult", 0, "hc_mult=0 must be a positive integer"),
        ("hc_eps", 0.0, "hc_eps=0.0 must be a positive number"),
        ("hc_sinkhorn_iters", 0, "hc_sinkhorn_iters=0 must be a positive integer"),
        ("residual_from_norm", True, "residual_from_norm=True with hyper_connections='ihc'"),
        ("mlp_output_scale", 0.5, "mlp_output_scale=0.5 with hyper_connections='ihc'"),
        ("residual_gates", True, "residual_gates=True with hyper_connections='ihc'"),
    ],
)
def test_config_refuses(field, value, match):
    kwargs = {"hyper_connections": "ihc", field: value}
    with pytest.raises(
        (ValueError, StrictDataclassClassValidationError), match=match.replace("(", r"\(").replace(")", r"\)")
    ):
        tiny_config(**kwargs)


def test_mhc_magnitude_is_fixed():
    with pytest.raises(
        (ValueError, StrictDataclassClassValidationError),
        match="hc_magnitude=3.0 with hyper_connections='mhc'",
    ):
        tiny_config(hyper_connections="mhc", hc_magnitude=3.0)


def test_default_is_off_and_unchanged():
    config = tiny_config()
    assert config.hyper_connections == "none"
    model = HybridForCausalLM(config)
    assert model.model.hc_head is None
    assert not any("_hc" in n or "hc_head" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_matches_naive_reference(kind):
    torch.manual_seed(0)
    config = _tiny(kind, hc_sinkhorn_iters=5)
    module = HyperConnection(config)
    torch.nn.init.normal_(module.fn, std=0.3)
    torch.nn.init.normal_(module.base, std=0.5)
    torch.nn.init.normal_(module.scale, std=1.0)
    streams = torch.randn(2, 3, config.hc_mult, config.hidden_size)
    w = torch.randn(config.hidden_size, config.hidden_size) / config.hidden_size**0.5

    def branch(x):
        return torch.tanh(x.to(w.dtype) @ w)

    post, comb, x = module(streams)
    got = module.expand(streams, branch(x), post, comb)
    want = naive_hyper_connection(module, streams, branch)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)  # fp32 vs a float64 reference
    if kind == "mhc":  # the stream mixing is (nearly) doubly stochastic after Sinkhorn
        torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), atol=1e-4, rtol=0)


def _transformers_pair(kind: str, hidden: int, n: int):
    """transformers' own hyper-connection and head for ``kind`` with a config of the same sizes."""
    if kind == "ihc":
        mod = pytest.importorskip("transformers.models.hy_v4.modeling_hy_v4")
        from transformers import HYV4Config

        cfg = HYV4Config(
            hidden_size=hidden, hc_mult=n, hc_magnitude=2.0, rms_norm_eps=1e-6, num_hidden_layers=1
        )
        return mod.HYV4HyperConnection(cfg), mod.HYV4HyperHead(cfg)
    mod = pytest.importorskip("transformers.models.glm5_next.modeling_glm5_next")
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig

    cfg = Glm5NextTextConfig(
        hidden_size=hidden, hc_mult=n, hc_sinkhorn_iters=7, rms_norm_eps=1e-6, num_hidden_layers=1
    )
    return mod.Glm5NextTextHyperConnection(cfg), mod.Glm5NextTextHyperHead()


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_transformers_modules(kind):
    """Same weights, same streams: transformers' HYV4HyperConnection / HyperHead (iHC) and
    Glm5NextTextHyperConnection / HyperHead (mHC) give the same collapsed input, and the decoder layer's
    stream update (written out as transformers' decoder layers do) the same new streams."""
    torch.manual_seed(1)
    config = _tiny(kind, hc_sinkhorn_iters=7)
    ours, head = HyperConnection(config), HyperHead(config)
    theirs, their_head = _transformers_pair(kind, config.hidden_size, config.hc_mult)
    with torch.no_grad():
        for p in (ours.fn, ours.base, ours.scale):
            p.normal_(std=0.3)
        theirs.fn.copy_(ours.fn)
        theirs.base.copy_(ours.base)
        theirs.scale.copy_(ours.scale)
        if kind == "ihc":
            for p in (head.fn, head.base, head.scale):
                p.normal_(std=0.3)
            their_head.hc_fn.copy_(head.fn)
            their_head.hc_base.copy_(head.base)
            their_head.hc_scale.copy_(head.scale)
    streams = torch.randn(2, 5, config.hc_mult, config.hidden_size)
    out = torch.randn(2, 5, config.hidden_size)
    post, comb, x = ours(streams)
    if kind == "ihc":
        t_post, t_x = theirs(streams)
        t_new = (t_post.float().unsqueeze(-1) * out.float().unsqueeze(-2) + streams.float()).to(streams.dtype)
    else:
        t_post, t_comb, t_x = theirs(streams)
        t_new = t_post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(t_comb.transpose(-1, -2), streams)
    torch.testing.assert_close(x, t_x, atol=0, rtol=0)
    torch.testing.assert_close(ours.expand(streams, out, post, comb), t_new, atol=1e-6, rtol=0)
    torch.testing.assert_close(head(streams), their_head(streams), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_invariance_kit_in_a_mix(kind):
    """The kit's cheap checks on the whole mix: a batch row = the row alone, save / load bit for bit, the cost
    inspector against the modules and the cache, gradients reaching every parameter (stream weights
    included), the MoE layers' auxiliary terms."""
    overrides = {**MIX, "hyper_connections": kind, "q_lora_rank": 12}
    checks = ["batch", "save_load", "cost", "gradients", "aux_terms"]
    assert check_layer_kind(config_overrides=overrides, checks=checks) == checks


@pytest.mark.parametrize("kind", KINDS)
def test_invariance_kit_sequence_checks(kind):
    """Cached decode = full forward, left / right padding, packing, generate, on attention + MoE / MLA +
    dense (the streams are per token: what these checks exercise is the cache and masks around them)."""
    overrides = {
        "mixer_types": ["attention", "mla"],
        "mlp_types": ["moe", "dense"],
        "hyper_connections": kind,
        "hc_mult": 2,
    }
    checks = ["decode", "padding", "packing", "generate"]
    assert check_layer_kind(config_overrides=overrides, checks=checks) == checks


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_invariance_kit_full(kind):
    """Every check of the kit on the whole mix (Gated DeltaNet's chunked form included)."""
    overrides = {**MIX, "hyper_connections": kind, "q_lora_rank": 12}
    assert check_layer_kind(config_overrides=overrides)


@pytest.mark.parametrize("kind", KINDS)
def test_cost_counts_the_stream_weights(kind):
    config = _tiny(kind)
    base = estimate_cost(tiny_config(**MIX))
    report = estimate_cost(config)
    model = HybridForCausalLM(config)
    hc = sum(p.numel() for n, p in model.named_parameters() if "_hc." in n or "hc_head." in n)
    assert hc > 0 and report.total_params - base.total_params == hc
    assert report.total_params == sum(p.numel() for p in model.parameters())
    # FLOPs: every stream weight with >= 2 dims (the branches' fn and iHC's head fn) is a matmul each token
    # runs once, on top of the layers' and the LM head's; and each token contracts its N streams: every
    # branch collapses them (N·H multiply-adds) and adds its output to each (N·H), mHC mixes them (N²·H), the
    # head collapses them once (N·H). Nothing here depends on the context.
    hc_matmul = sum(
        p.numel() for n, p in model.named_parameters() if ("_hc." in n or "hc_head." in n) and p.ndim >= 2
    )
    n, h = config.hc_mult, config.hidden_size
    branches = sum(isinstance(m, HyperConnection) for m in model.modules())
    per_branch = 2 * n * h + (n * n * h if kind == "mhc" else 0)
    streams = 2 * (branches * per_branch + n * h)
    for context in (1, 64):
        assert report.flops_per_token(context) - base.flops_per_token(context) == 2 * hc_matmul + streams


@pytest.mark.parametrize("kind", KINDS)
def test_stream_weights_stay_fp32(kind, tmp_path):
    torch.manual_seed(0)
    model = HybridForCausalLM(_tiny(kind))
    _randomise(model)
    model.save_pretrained(tmp_path)
    for loaded in (
        model.to(torch.bfloat16),
        HybridForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16),
    ):
        dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
        hc = {n for n in dtypes if "_hc." in n or "hc_head." in n}
        assert hc and all(dtypes[n] == torch.float32 for n in hc), dtypes
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
        ids = torch.randint(0, 64, (1, 6))
        assert torch.isfinite(loaded(ids).logits.float()).all()


def test_old_checkpoint_loads_and_off_is_todays_model(tmp_path):
    """A checkpoint saved without the fields loads (hyper_connections defaults to none) and gives the same
    logits; with hyper_connections set, the same layers differ (the option does something)."""
    torch.manual_seed(0)
    config = tiny_config(**{k: v for k, v in MIX.items() if k != "hc_mult"}, q_lora_rank=12)
    model = HybridForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    import json

    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    for key in [k for k in saved if k == "hyper_connections" or k.startswith("hc_")]:
        del saved[key]
    path.write_text(json.dumps(saved))
    again = HybridForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """The layers pass the streams [B, T, N, H] through transformers' checkpointing unchanged: the same loss
    and gradients with and without it (non-reentrant and reentrant)."""
    torch.manual_seed(0)
    config = tiny_config(
        mixer_types=["attention", "mla"], mlp_types=["moe", "dense"], hyper_connections=kind, hc_mult=2
    )
    model = HybridForCausalLM(config).train()
    _randomise(model)
    ids = torch.randint(0, 64, (2, 8))

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, want = grads()
    for reentrant in (False, True):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        got_loss, got = grads()
        model.activation_checkpointing_disable()
        torch.testing.assert_close(got_loss, loss, atol=0, rtol=0)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_model_card_names_the_streams():
    from hf_hybrid.card import render_model_card

    assert "3 hyper-connection streams, manifold-constrained" in render_model_card(_tiny("mhc"))
    assert "hyper-connection" not in render_model_card(tiny_config())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["ihc", "mhc"])
def test_fsdp2_shards_a_model_with_fp32_stream_weights(kind, dtype):
    """FSDP2 needs one dtype per unit: the stream modules (fp32 inside bf16 layers) are units of their own
    (``_no_split_modules``, which accelerate's transformer wrap policy reads), so a bf16 model shards and
    trains (before, FSDP2 refused it: "uniform original parameter dtype"). One rank: the loss is the unsharded
    one exactly; the gradients agree to the dtype's rounding (sharded parameters change the summation order):
    over all parameters within 4 ulps of the dtype (measured 1.2e-7 fp32, 4.4e-3 bf16 ≈ 1 ulp)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    script = repo / "tests" / "fsdp_hc_script.py"
    run = subprocess.run(
        [sys.executable, str(script), kind, dtype],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=repo,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    mixed = ["torch.bfloat16", "torch.float32"] if dtype == "bfloat16" else ["torch.float32"]
    assert out["dtypes"] == mixed
    assert out["units"] == 2 + 2 * 2 + 1  # layers, their mixer_hc / mlp_hc, the head
    assert out["losses"][0] == out["losses"][1]
    assert out["total"] <= 4 * torch.finfo(getattr(torch, dtype)).eps, out
