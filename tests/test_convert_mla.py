"""Dense → MLA conversion (issue 27): the identity setting, compression as a controlled approximation of it,
refusals before anything is written, lineage, CLI, the chain to DSA and the DeepSeek exports, composition with
hybridize.

Tolerances: fp32. ``ATOL = 1e-5`` on logits where the converted model computes the source's function in a
different order (scores split into nope + rope parts, values through an identity latent; fp64 surgery cast
to fp32); logits here are O(1) and move by ~1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import main as cli_main
from hf_hybrid.convert.mla import MLAOptions, kv_bytes_per_token, mla, mla_model
from hf_hybrid.convert.source import load_source

ATOL = 1e-5


def llama(tmp_path, *, kv_heads: int = 2, name: str = "llama", layers: int = 2, **overrides):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        initializer_range=0.1,
        **overrides,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def left_padded(seed: int = 1, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def cached_decode(model, ids, mask, steps: int = 4):
    """Greedy-free decode: prefill, then feed fixed tokens one at a time; logits of every fed position."""
    new = torch.randint(1, 96, (ids.shape[0], steps), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1:]]
        for i in range(steps):
            mask = torch.cat([mask, torch.ones_like(new[:, i : i + 1])], dim=1)
            out = model(new[:, i : i + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


# ---- identity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4, 1])  # GQA, MHA, MQA
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lossless_equals_the_source(tmp_path, kv_heads, attn):
    src, path = llama(tmp_path, kv_heads=kv_heads)
    dst = mla(path, tmp_path / "mla", lossless=True)
    model = HybridForCausalLM.from_pretrained(dst, attn_implementation=attn).eval()
    c = model.config
    assert c.mixer_types == ["mla", "mla"] and c.qk_nope_head_dim == 0 and c.qk_rope_head_dim == 16
    assert c.mla_rope_heads == kv_heads and c.kv_lora_rank == kv_heads * 16 and not c.mla_latent_norm
    assert c.hf_hybrid_lineage["recipe"] == "mla" and c.hf_hybrid_lineage["options"]["exact_start"]
    ids, mask = left_padded()
    with torch.no_grad():
        want = src(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    for decode in ("absorbed", "naive"):
        for m in model.modules():
            if hasattr(m, "kv_b_proj"):
                m.config.mla_decode = decode
        torch.testing.assert_close(
            cached_decode(model, ids, mask), cached_decode(src, ids, mask), atol=ATOL, rtol=0
        )
    # the identity caches exactly what the source caches
    source_cfg = load_source(path)[0].config
    assert kv_bytes_per_token(c) == kv_bytes_per_token(source_cfg)


def test_lossless_carries_attention_logit_multipliers():
    """A layer's logit multiplier (attention_logit_multipliers) moves into its MLA query weights: the lossless
    conversion of one layer of two still equals the source, the other keeps its multiplier."""
    from hf_hybrid.testing import tiny_config

    torch.manual_seed(0)
    src = HybridForCausalLM(tiny_config(vocab_size=96, attention_logit_multipliers=[2.5, 0.5])).eval()
    model = mla_model(src, lossless=True, layers=(0,)).eval()
    assert model.config.mixer_types == ["mla", "attention"]
    assert model.config.attention_logit_multipliers == [1.0, 0.5]
    ids, mask = left_padded()
    with torch.no_grad():
        want, got = src(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_lossless_rejects_lossy_options():
    with pytest.raises(ValueError, match="lossless=True.*kv_lora_rank=8"):
        MLAOptions(lossless=True, kv_lora_rank=8).validate()


# ---- compression: controlled approximations ----------------------------------------------------------------


def kl_to(src, model, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(src(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    src, path = llama(tmp_path_factory.mktemp("src"), layers=2)
    return src, load_source(path, dtype=torch.float32)[0]


def test_full_rank_partial_rope_is_exact_at_position_zero_only(source_model):
    """Dropping RoPE from some pairs changes nothing for a one-token input, and something for longer ones."""
    src, hybrid = source_model
    model = mla_model(hybrid, rope_dims=8)
    assert model.config.qk_nope_head_dim == 8 and model.config.mla_rope_pairs is None  # uniform stride 2
    ids = torch.randint(1, 96, (2, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, atol=ATOL, rtol=0)
    assert kl_to(src, model, torch.randint(1, 96, (2, 24))) > 1e-6


@pytest.mark.parametrize(
    "opts",
    [
        dict(rope_dims=8, kv_lora_rank=24),
        dict(rope_dims=8, kv_lora_rank=24, factorization="separate"),
        dict(rope_dims=8, kv_lora_rank=24, rope_select="frequency"),
        dict(rope_dims=8, kv_lora_rank=24, rope_keys="shared", q_lora_rank=32, latent_norm=True),
        dict(rope_dims=8, kv_lora_rank=24, activation_aware=True, rope_select="norm"),
    ],
)
def test_compression_is_an_approximation_that_shrinks_the_cache(source_model, opts):
    src, hybrid = source_model
    calib = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(3))
    model = mla_model(hybrid, calibration=calib, **opts)
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    kl = kl_to(src, model, ids)
    assert 0 < kl < 1.0  # a nearby model, not a random one
    assert kv_bytes_per_token(model.config) < kv_bytes_per_token(hybrid.config)
    lineage = model.config.hf_hybrid_lineage
    assert lineage["options"]["exact_start"] is False and lineage["approximation"]
    if opts.get("rope_select") == "frequency":  # DeepSeek's layout through a smaller rope base (next test)
        assert model.config.mla_rope_pairs is None and model.config.rope_parameters["rope_theta"] == 100.0


def test_fastest_pairs_become_deepseeks_layout_through_the_rope_base(source_model):
    """Keeping the fastest dr/2 of d pairs equals the RoPE table of size dr at base θ^(dr/d): the rebased
    model computes what the explicit ``mla_rope_pairs`` model computes; with attention layers left (one base
    for all) the pairs are kept explicitly instead."""
    _, hybrid = source_model
    rebased = mla_model(hybrid, rope_dims=8, kv_lora_rank=24, rope_select="frequency")
    d = rebased.config.to_dict()
    d.pop("layer_types")
    d.update(mla_rope_pairs=[0, 1, 2, 3], rope_parameters=dict(hybrid.config.rope_parameters))
    explicit = HybridForCausalLM(HybridConfig.from_dict(d)).eval()
    explicit.load_state_dict(rebased.state_dict())
    ids = torch.randint(1, 96, (2, 64), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(64)[None].expand(2, -1) * 400  # far positions: any frequency error would grow
    with torch.no_grad():
        torch.testing.assert_close(
            rebased(ids, position_ids=positions).logits,
            explicit(ids, position_ids=positions).logits,
            atol=ATOL,
            rtol=0,
        )
    partial = mla_model(hybrid, rope_dims=8, kv_lora_rank=24, rope_select="frequency", layers=(1,))
    assert partial.config.mla_rope_pairs == [0, 1, 2, 3]
    assert partial.config.rope_parameters == hybrid.config.rope_parameters


def test_rank_error_falls_with_the_rank(source_model):
    """More latent rank, closer to the source: the errors the SVD leaves decrease monotonically."""
    src, hybrid = source_model
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    kls = [kl_to(src, mla_model(hybrid, kv_lora_rank=r), ids) for r in (8, 16, 32)]
    assert kls[0] > kls[1] > kls[2] and kls[2] < 1e-9  # 32 = G·d full rank, all pairs rotary: exact


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, opts, match",
    [
        (dict(), dict(kv_lora_rank=999), "kv_lora_rank=999 is larger than possible.*allowed: 1..32"),
        (dict(), dict(q_lora_rank=999), "q_lora_rank=999 is larger than possible"),
        (dict(), dict(layers=(7,)), r"layers \[7\] do not exist"),
        (dict(), dict(rope_dims=6), "rope_dims=6 must divide head_dim=16"),
        (dict(), dict(rope_dims=32), "rope_dims=32 is larger than head_dim=16"),
        (dict(), dict(rope_select="fastest"), "rope_select='fastest' is not known"),
        (dict(), dict(rope_select="norm", rope_dims=8), "need calibration"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, overrides, opts, match):
    _, path = llama(tmp_path, **overrides)
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        mla(path, dst, **opts)
    assert not dst.exists()


def test_sliding_window_is_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="no full attention layers.*sliding-window"):
        mla(tmp_path / "mistral", tmp_path / "out", lossless=True)
    with pytest.raises(ValueError, match="layer 0 is 'sliding_attention'.*sliding_window=8"):
        mla(tmp_path / "mistral", tmp_path / "out", lossless=True, layers=(0,))
    assert not (tmp_path / "out").exists()


def test_qwen2_attention_bias_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match="attention_bias=True.*allowed: False"):
        mla(tmp_path / "qwen2", tmp_path / "out", lossless=True)
    assert not (tmp_path / "out").exists()


def test_qwen3_qk_norm_is_refused(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "qwen3")
    with pytest.raises(ValueError, match="use_qk_norm=True.*not linear"):
        mla(tmp_path / "qwen3", tmp_path / "out", lossless=True)
    assert not (tmp_path / "out").exists()


# ---- files, lineage, CLI -----------------------------------------------------------------------------------


def test_cli_mla_writes_lineage_and_card(tmp_path, capsys):
    _, path = llama(tmp_path)
    dst = tmp_path / "out"
    argv = ["mla", str(path), str(dst), "--kv-lora-rank", "16", "--rope-dims", "8", "--layers", "1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "layers [1] -> mla" in out and "KV cache" in out
    config = HybridConfig.from_pretrained(dst)
    assert config.mixer_types == ["attention", "mla"] and config.kv_lora_rank == 16
    options = config.hf_hybrid_lineage["options"]
    assert options["rope_dims"] == 8 and options["layers"] == [1] and not options["exact_start"]
    card = (dst / "README.md").read_text()
    assert "mla" in card
    assert json.loads((dst / "config.json").read_text())["mla_rope_heads"] == 2
    assert cli_main(["mla", str(path), str(tmp_path / "bad"), "--kv-lora-rank", "999"]) == 2
    assert "kv_lora_rank=999" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli_main(["mla", str(path), str(tmp_path / "bad"), "--lossless", "--rope-dims", "8"]) == 2
    assert "lossless=True" in capsys.readouterr().err


# ---- the chain: dense -> MLA -> DSA -> deepseek_v32, dense -> MLA -> deepseek_v3 ---------------------------


def assert_known_to_pinned_transformers(config_json: Path, model_type: str) -> None:
    """Every key of the exported config.json is a field the transformers releases serving engines pin know
    (read from their wheels by scripts/transformers_config_fields.py; no network here)."""
    from test_serving_exports import assert_known_to_serving_pins

    assert_known_to_serving_pins(config_json, model_type)


def exportable_mla(tmp_path) -> Path:
    """A tiny GQA Llama converted to MLA in DeepSeek's layout (one rope key, q latent, latent norms)."""
    _, path = llama(tmp_path)
    return mla(
        path,
        tmp_path / "mla",
        rope_dims=8,
        rope_select="frequency",  # the fastest pairs: DeepSeek's layout through rope_theta^(dr/d)
        kv_lora_rank=24,
        rope_keys="shared",
        q_lora_rank=32,
        latent_norm=True,
    )


def test_chain_mla_to_deepseek_v3(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    from hf_hybrid.convert.native import export_native

    src = exportable_mla(tmp_path)
    ours = HybridForCausalLM.from_pretrained(src).eval()
    assert ours.config.mla_rope_pairs is None and ours.config.mla_rope_heads == 1
    assert ours.config.rope_parameters["rope_theta"] == 100.0
    export_native(src, tmp_path / "v3", to="deepseek_v3")
    native = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "v3").eval()
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(
            native(ids, attention_mask=mask).logits[mask.bool()],
            ours(ids, attention_mask=mask).logits[mask.bool()],
            atol=ATOL,
            rtol=0,
        )
    assert_known_to_pinned_transformers(tmp_path / "v3" / "config.json", "deepseek_v3")


def test_chain_mla_to_dsa_to_deepseek_v32(tmp_path):
    """dense -> MLA -> convert-dsa (sparse, DeepSeek's indexer eps) -> export: transformers' own
    DeepseekV32ForCausalLM computes the same logits. index_topk >= T here: a fresh indexer's ReLU scores tie
    at 0, and transformers' topk orders ties differently (the family's own tests cover index_topk < T on
    tie-free inputs)."""
    from transformers import DeepseekV32ForCausalLM

    from hf_hybrid.convert.dsa import convert_to_dsa

    src = exportable_mla(tmp_path)
    argv = ["convert-dsa", str(src), str(tmp_path / "dsa"), "--index-topk", "16", "--index-heads", "2"]
    assert cli_main([*argv, "--index-head-dim", "16", "--mode", "sparse", "--index-norm-eps", "1e-6"]) == 0
    assert cli_main(["export", str(tmp_path / "dsa"), str(tmp_path / "v32"), "--to", "deepseek_v32"]) == 0
    ours = HybridForCausalLM.from_pretrained(tmp_path / "dsa").eval()
    assert ours.config.mixer_types == ["dsa", "dsa"] and ours.config.hf_hybrid_lineage[
        "previous_recipes"
    ] == [
        "import",
        "mla",
    ]
    native = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "v32").eval()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
    assert_known_to_pinned_transformers(tmp_path / "v32" / "config.json", "deepseek_v32")
    with pytest.raises(ValueError, match="mla_rope_heads=2"):  # per-kv-head rope keys cannot become DSA
        convert_to_dsa(
            mla(llama(tmp_path, name="l2")[1], tmp_path / "m2", lossless=True), tmp_path / "d2", index_topk=8
        )


def test_exports_refuse_the_lossless_layout(tmp_path):
    from hf_hybrid.convert.native import export_native

    _, path = llama(tmp_path)
    dst = mla(path, tmp_path / "mla", lossless=True)
    with pytest.raises(ValueError, match="mla_rope_heads=2 has no counterpart"):
        export_native(dst, tmp_path / "v3", to="deepseek_v3")
    assert not (tmp_path / "v3").exists()


@pytest.mark.slow
def test_exports_load_under_pinned_transformers(tmp_path):
    """Load both exports with the transformers releases serving engines pin, in a subprocess whose
    ``PYTHONPATH`` puts an unpacked wheel first: ``HF_HYBRID_OLD_TRANSFORMERS=/dir/5.19.0:/dir/5.22.2`` (each
    holding a ``transformers/`` package, e.g. ``unzip transformers-5.19.0-py3-none-any.whl -d /dir/5.19.0``).
    No network. Skipped when the variable is unset."""
    import os
    import subprocess
    import sys

    roots = [p for p in os.environ.get("HF_HYBRID_OLD_TRANSFORMERS", "").split(":") if p]
    if not roots:
        pytest.skip("set HF_HYBRID_OLD_TRANSFORMERS to unpacked transformers wheels (see the docstring)")
    from hf_hybrid.convert.dsa import convert_to_dsa
    from hf_hybrid.convert.native import export_native

    src = exportable_mla(tmp_path)
    export_native(src, tmp_path / "v3", to="deepseek_v3")
    dsa = convert_to_dsa(
        src,
        tmp_path / "dsa",
        index_topk=16,
        index_heads=2,
        index_head_dim=16,
        mode="sparse",
        index_norm_eps=1e-6,
    )
    export_native(dsa, tmp_path / "v32", to="deepseek_v32")
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    for name, ours in (("v3", src), ("v32", dsa)):
        with torch.no_grad():
            torch.save(HybridForCausalLM.from_pretrained(ours).eval()(ids).logits, tmp_path / f"{name}.pt")
    script = f"""
import torch, transformers
from transformers import AutoModelForCausalLM
ids = torch.load("{tmp_path}/ids.pt")
for name in ("v3", "v32"):
    m = AutoModelForCausalLM.from_pretrained("{tmp_path}/" + name).eval()
    with torch.no_grad():
        diff = (m(ids).logits - torch.load("{tmp_path}/" + name + ".pt")).abs().max().item()
    assert diff <= {ATOL}, (transformers.__version__, name, diff)
print(transformers.__version__)
"""
    for root in roots:
        env = {**os.environ, "PYTHONPATH": root}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == Path(root).name or out.stdout.strip()


# ---- composition with hybridize ----------------------------------------------------------------------------


def test_hybridize_then_mla_gives_a_3_to_1_gdn_mla_hybrid(tmp_path, capsys):
    """Zebra-Llama's layout from a tiny Llama: hybridize 3:1 (GDN:attention), then the attention layers that
    remain become MLA. Every GDN tensor is carried bit for bit; the cache shrinks as the cost inspector
    says."""
    from hf_hybrid.convert.hybridize import hybridize

    _, path = llama(tmp_path, layers=8)
    hyb = hybridize(path, tmp_path / "hyb", pattern="3:1 gated_deltanet:attention")
    dst = mla(hyb, tmp_path / "zebra", kv_lora_rank=16, rope_dims=8, rope_keys="shared")
    config = HybridConfig.from_pretrained(dst)
    assert config.mixer_types == ["gated_deltanet"] * 3 + ["mla"] + ["gated_deltanet"] * 3 + ["mla"]
    before = HybridForCausalLM.from_pretrained(hyb).state_dict()
    after = HybridForCausalLM.from_pretrained(dst).state_dict()
    for key, value in before.items():
        if ".mixer." not in key or key.split(".")[2] not in ("3", "7"):
            assert torch.equal(after[key], value), key
    source = load_source(path)[0].config
    kv_src, kv_hyb, kv_out = (
        kv_bytes_per_token(c) for c in (source, HybridConfig.from_pretrained(hyb), config)
    )
    # per token, bf16: the source caches 8 layers × 2·G·d = 8 × 64 numbers; the 2 MLA layers r + dr = 24
    assert kv_src == 8 * 64 * 2 and kv_hyb == 2 * 64 * 2 and kv_out == 2 * 24 * 2
    print(
        f"KV bytes/token (bf16, growing cache only): source {kv_src:.0f}, 3:1 GDN:attention {kv_hyb:.0f}, "
        f"3:1 GDN:MLA {kv_out:.0f} ({100 * kv_out / kv_src:.1f} % of the source)"
    )
    assert config.hf_hybrid_lineage["previous_recipes"] == ["import", "hybridize"]


# ---- the recipe --------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~15 s: conversion, two evaluations and six distillation steps
def test_recipe_converts_heals_and_reports(tmp_path):
    """recipes/mla/train.py end to end on a tiny Llama with a byte tokenizer (pydoc text): the table's
    numbers come from the cost inspector, the lossless level is not healed (it is the source), a compressed
    level is healed by DistillationTrainer and gets closer to the source."""
    from importlib import util

    import yaml

    from hf_hybrid.data import byte_tokenizer

    repo = Path(__file__).resolve().parents[1]
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    spec = util.spec_from_file_location("mla_recipe", repo / "recipes/mla/train.py")
    recipe = util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = yaml.safe_load((repo / "recipes/mla/config.yaml").read_text())
    config["data"] = {"source": "pydoc", "context": 32, "max_train_chars": 20000, "eval_blocks": 4}
    config["levels"] = {"lossless": {"lossless": True}, "r8": {"kv_lora_rank": 8, "rope_dims": 8}}
    config["heal"].update(per_device_train_batch_size=4, max_steps=6, learning_rate=3e-3, disable_tqdm=True)
    config["eval"] = {"prompts": 4, "prompt_lines": 2, "max_new_tokens": 6, "lines": 16}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    summary = recipe.main(
        [
            "--config",
            str(tmp_path / "recipe.yaml"),
            "--source",
            str(tmp_path / "src"),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    lossless, r8 = summary["levels"]["lossless"], summary["levels"]["r8"]
    assert lossless["kv_bytes_per_token"] == summary["source_kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert r8["kv_bytes_per_token"] == 2 * (8 + 2 * 8) * 2 and r8["cache_bytes_32k"] == 32768 * 96
    assert lossless["healed"][0]["steps"] == 0 and lossless["init"]["kl_to_source"] < 1e-9
    assert r8["healed"][0]["steps"] == 6 and r8["healed"][0]["kl_to_source"] < r8["init"]["kl_to_source"]
    # the exact start generates what the source does; healing ran on document-aligned packed rows
    assert lossless["init"]["agreement_fraction"] == 1.0 and lossless["init"]["next_line_match"] == 1.0
    assert lossless["init"]["doc_bits_per_byte"] == pytest.approx(
        summary["source_metrics"]["doc_bits_per_byte"], rel=1e-5
    )
    assert summary["samples"] == "documents (paragraph), packed with boundaries"
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["levels"]["r8"]["options"]["rope_dims"]
        == 8
    )


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2"])
def test_mla_layers_hybridize_like_the_attention_they_came_from(source_model, mixer):
    """MLA layers can be hybridized further: their per-head q/k/v are read through the latent. The lossless
    MLA layer computes the source's maps, so hybridize inherits the same q/k/v/o from it as from the source's
    attention (the mixers' fresh tensors differ only by the RNG order of two different models)."""
    from hf_hybrid.convert.hybridize import AttentionWeights, hybridize_model

    _, hybrid = source_model
    lossless = mla_model(hybrid, lossless=True)
    att = AttentionWeights.from_module(hybrid.model.layers[0].mixer)
    lat = AttentionWeights.from_module(lossless.model.layers[0].mixer)
    for name in ("query", "key", "value"):
        torch.testing.assert_close(getattr(lat, name)(), getattr(att, name)(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lat.o, att.o, atol=0, rtol=0)
    student = hybridize_model(lossless, attention_layers=[1], mixer=mixer)
    assert student.config.mixer_types == [mixer, "mla"]
    assert "from MLA" in student.config.hf_hybrid_lineage["init_notes"]["0"][-1]
    # a compressed MLA in DeepSeek's layout hybridizes too (what its latent carries), pattern syntax included
    compressed = mla_model(hybrid, kv_lora_rank=16, rope_dims=8, q_lora_rank=32, latent_norm=True)
    student = hybridize_model(compressed, pattern=f"1:1 {mixer}:mla")
    assert student.config.mixer_types == [mixer, "mla"]
    ids = torch.randint(1, 96, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()
