"""Dense → MoE upcycling (issue 9): exact starts, granular upcycling, noise / Drop-Upcycling, symmetry
breaking, errors, files, CLI, and the recipe end to end.

Tolerance: fp32 logits within 1e-5 of the source (the same maths summed in another order: experts' weighted
sum, scaled ``down_proj``).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import main as cli_main
from hf_hybrid.convert.upcycle import UpcycleOptions, upcycle, upcycle_mlp, upcycle_model
from hf_hybrid.moe import HybridMoE

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def dense_model(seed: int = 0, **overrides) -> HybridForCausalLM:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )  # larger init: logits far from zero
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return HybridForCausalLM(HybridConfig(**kwargs)).eval()


def quiet_upcycle(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return upcycle_model(model, **kwargs).eval()


@pytest.fixture(scope="module")
def dense():
    return dense_model()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (3, 13))


def max_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def moe_layers(model) -> list[HybridMoE]:
    return [m for m in model.modules() if isinstance(m, HybridMoE)]


# ---- exact starts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_renormalised_topk_is_exact_for_any_router(dense, ids, router, top_k):
    moe = quiet_upcycle(dense, num_experts=4, top_k=top_k, router=router)
    assert max_diff(moe, dense, ids) < ATOL
    # "any router": replace it by a large random one; the renormalised weights still sum to 1 over copies.
    with torch.no_grad():
        for layer in moe_layers(moe):
            layer.router.weight.normal_(std=3.0)
    assert max_diff(moe, dense, ids) < ATOL
    assert moe.config.norm_topk_prob and moe.config.num_shared_experts == 0


@pytest.mark.parametrize("router,expected_scale", [("softmax", 4 / 2), ("sigmoid", 2 / 2)])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_no_renormalisation_zero_router_rescaled_down_proj(dense, ids, router, expected_scale, scaling):
    moe = quiet_upcycle(
        dense, num_experts=4, top_k=2, router=router, renormalize=False, routed_scaling=scaling
    )
    assert max_diff(moe, dense, ids) < ATOL
    layer = moe_layers(moe)[0]
    assert torch.count_nonzero(layer.router.weight) == 0
    dense_down = dense.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(
        layer.experts.down_proj[3], dense_down * expected_scale / scaling, atol=0, rtol=1e-6
    )
    assert not moe.config.norm_topk_prob


@pytest.mark.parametrize("renormalize", [True, False])
def test_shared_expert_halves_shared_and_routed(dense, ids, renormalize):
    moe = quiet_upcycle(dense, num_experts=4, top_k=2, shared_expert=True, renormalize=renormalize)
    assert max_diff(moe, dense, ids) < ATOL
    layer, mlp = moe_layers(moe)[0], dense.model.layers[0].mlp
    torch.testing.assert_close(layer.shared_experts.down_proj.weight, mlp.down_proj.weight * 0.5)
    torch.testing.assert_close(layer.shared_experts.gate_proj.weight, mlp.gate_proj.weight)
    routed_scale = 0.5 * (1.0 if renormalize else 4 / 2)
    torch.testing.assert_close(layer.experts.down_proj[1], mlp.down_proj.weight * routed_scale)
    assert moe.config.num_shared_experts == 1


def test_upcycled_training_loss_and_outputs_follow_the_loss_rule(dense, ids):
    moe = quiet_upcycle(dense, num_experts=4, top_k=2).train()
    out = moe(ids, labels=ids)
    assert out.aux_loss is not None and out.z_loss is not None
    expected = (
        out.lm_loss
        + moe.config.router_aux_loss_coef * out.aux_loss
        + moe.config.router_z_loss_coef * out.z_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert moe.config.router_aux_loss_coef == 1e-2 and moe.config.router_z_loss_coef == 1e-3
    assert moe.config.moe_capacity_factor is None  # dropless


def test_only_chosen_layers_and_everything_else_copied(dense, ids):
    moe = quiet_upcycle(dense, num_experts=3, top_k=2, layers=(1,))
    assert moe.config.mlp_types == ["dense", "moe"]
    src = dense.state_dict()
    for name, tensor in moe.state_dict().items():
        if ".layers.1.mlp." not in name:
            assert torch.equal(tensor, src[name]), name
    assert max_diff(moe, dense, ids) < ATOL
    # fresh tensors: training the MoE never touches the source
    assert moe.model.embed_tokens.weight.data_ptr() != dense.model.embed_tokens.weight.data_ptr()


# ---- granular upcycling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(granularity=2),
        dict(granularity=4, router="sigmoid"),
        dict(granularity=3, renormalize=False),
        dict(granularity=2, renormalize=False, router="sigmoid", routed_scaling=2.5),
        dict(granularity=2, shared_expert=True),
        dict(granularity=2, group_limited=True),
        dict(granularity=4, group_limited=True, renormalize=False),
    ],
)
def test_granular_upcycling_is_exact_with_virtual_groups(dense, ids, kwargs):
    moe = quiet_upcycle(dense, num_experts=4, top_k=2, **kwargs)
    G = kwargs["granularity"]
    assert moe.config.num_experts == 4 * G and moe.config.num_experts_per_tok == 2 * G
    assert moe.config.moe_intermediate_size == 48 // G
    assert max_diff(moe, dense, ids) < ATOL
    router = moe_layers(moe)[0].router.weight.view(4, G, -1)
    assert torch.equal(router, router[:, :1].expand_as(router))  # one row per copy, shared by its shards


def test_clamped_dense_mlps_upcycle_into_clamped_experts(ids):
    """mlp_swiglu_limit (GLM-5-Next's clamp) carries over to the routed experts: still exact, granular too."""
    dense = dense_model(mlp_swiglu_limit=0.5)
    for kwargs in (dict(), dict(granularity=2, shared_expert=True)):
        moe = quiet_upcycle(dense, num_experts=4, top_k=2, **kwargs)
        assert moe.config.moe_swiglu_limit == 0.5 and moe.config.mlp_swiglu_limit == 0.5
        assert max_diff(moe, dense, ids) < ATOL
    assert max_diff(dense, dense_model(), ids) > 1e-3  # the clamp is reached on this input


def test_granular_selection_takes_whole_copies(dense, ids):
    """The guarantee behind granular exactness: every token's top-(k·G) is made of whole copies (G contiguous
    experts) — by tie order without group limiting, structurally with it."""
    for group_limited in (False, True):
        moe = quiet_upcycle(dense, num_experts=4, top_k=2, granularity=3, group_limited=group_limited)
        x = torch.randn(50, 32)
        for layer in moe_layers(moe):
            _, _, index = layer.router(x)
            copies = index // 3
            for row in range(index.shape[0]):
                counts = torch.bincount(copies[row], minlength=4)
                assert set(counts.tolist()) <= {0, 3}


def test_granular_exactness_needs_the_virtual_group_router(dense, ids):
    """Independent router rows per shard break whole-copy selection, hence exactness (what we do not claim);
    with group-limited routing the same router stays exact only while shards of a copy keep equal weights, so
    there we check whole-copy selection, which no router can break."""
    moe = quiet_upcycle(dense, num_experts=4, top_k=2, granularity=2)
    with torch.no_grad():
        for layer in moe_layers(moe):
            layer.router.weight.normal_(std=1.0)
    assert max_diff(moe, dense, ids) > 1e-3
    limited = quiet_upcycle(dense, num_experts=4, top_k=2, granularity=2, group_limited=True)
    with torch.no_grad():
        for layer in moe_layers(limited):
            layer.router.weight.normal_(std=1.0)
            _, _, index = layer.router(torch.randn(40, 32))
            for row in index // 2:
                assert set(torch.bincount(row, minlength=4).tolist()) <= {0, 2}


# ---- noise, Drop-Upcycling, router init --------------------------------------------------------------------


def dense_weights(dense, layer: int = 0):
    mlp = dense.model.layers[layer].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def test_noise_makes_experts_differ_by_the_promised_amount(dense):
    gate, up, down = dense_weights(dense)
    opts = UpcycleOptions(num_experts=4, top_k=2, noise=0.05)
    out = upcycle_mlp(gate, up, down, opts, router_std=0.0, generator=torch.Generator().manual_seed(0))
    gates = out.gate_up_proj[:, :48]
    for e in range(4):
        delta = gates[e] - gate
        assert 0.8 < (delta.std() / (0.05 * gate.std())).item() < 1.2
        for f in range(e):
            assert not torch.allclose(gates[e], gates[f])


@pytest.mark.parametrize("rate,granularity", [(0.5, 1), (0.25, 2)])
def test_drop_upcycling_redraws_fraction_r_and_keeps_the_rest(dense, rate, granularity):
    gate, up, down = dense_weights(dense)
    E, G = 4, granularity
    i_f = gate.shape[0] // G
    opts = UpcycleOptions(num_experts=E, top_k=2, granularity=G, drop_upcycling=rate)
    out = upcycle_mlp(gate, up, down, opts, router_std=0.0, generator=torch.Generator().manual_seed(0))
    scale = opts.down_scale()
    sets = []
    for j in range(E * G):
        g = j % G
        redrawn = out.redrawn[j]
        assert redrawn.numel() == round(rate * i_f)  # the fraction re-drawn is r
        kept = torch.ones(i_f, dtype=torch.bool)
        kept[redrawn] = False
        shard = slice(g * i_f, (g + 1) * i_f)
        # kept neurons equal the dense ones: gate/up rows, down columns (times the exactness scale)
        assert torch.equal(out.gate_up_proj[j, :i_f][kept], gate[shard][kept])
        assert torch.equal(out.gate_up_proj[j, i_f:][kept], up[shard][kept])
        torch.testing.assert_close(out.down_proj[j][:, kept], down[:, shard][:, kept] * scale, atol=0, rtol=0)
        # re-drawn neurons are new values
        assert not torch.isclose(out.gate_up_proj[j, :i_f][~kept], gate[shard][~kept]).any()
        sets.append(frozenset(redrawn.tolist()))
    assert len(set(sets)) > 1  # different neurons per expert
    # re-drawn values follow the dense matrix's statistics
    redrawn_gate = torch.cat([out.gate_up_proj[j, :i_f][out.redrawn[j]] for j in range(E * G)])
    assert abs(redrawn_gate.std().item() / gate.std().item() - 1) < 0.2


def test_router_init_defaults_and_symmetry_notes(dense):
    renorm = quiet_upcycle(dense, num_experts=4, top_k=2)
    w = moe_layers(renorm)[0].router.weight
    assert 0.5 * 0.2 < w.std().item() < 2 * 0.2  # initializer_range of the source config
    zero = quiet_upcycle(dense, num_experts=4, top_k=2, renormalize=False)
    assert torch.count_nonzero(moe_layers(zero)[0].router.weight) == 0
    custom = quiet_upcycle(dense, num_experts=4, top_k=2, renormalize=False, router_init_std=0.01)
    assert 0.005 < moe_layers(custom)[0].router.weight.std().item() < 0.02
    assert custom.config.hf_hybrid_lineage["options"]["exact_start"] is False
    with pytest.warns(UserWarning, match="never trains the router"):
        upcycle_model(dense, num_experts=4, top_k=1)
    with pytest.warns(UserWarning, match="first top_k copies"):
        upcycle_model(dense, num_experts=4, top_k=2, renormalize=False)


def test_zero_router_sends_every_token_to_the_first_copies(dense, ids):
    """Documented tie-breaking: with a zero router every token goes to experts 0..k-1 (lowest index)."""
    moe = quiet_upcycle(dense, num_experts=4, top_k=2, renormalize=False)
    with torch.no_grad():
        out = moe(ids)
    for load in out.layer_stats["expert_load"].values():
        torch.testing.assert_close(load, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def real_batches(vocab_size: int, n: int = 2, seq: int = 32) -> torch.Tensor:
    from hf_hybrid.data import byte_tokenizer, load_text_splits, tokenize_documents

    text = load_text_splits("auto").train[0][:4000]
    ids = torch.tensor(tokenize_documents(byte_tokenizer(), [text])[: n * seq]).view(n, seq)
    return ids.clamp_max(vocab_size - 1)


@pytest.mark.parametrize("kwargs", [dict(), dict(renormalize=False), dict(granularity=2, top_k=1)])
def test_one_optimizer_step_on_real_text_moves_the_router(kwargs):
    dense = dense_model(vocab_size=257, initializer_range=0.02)
    moe = quiet_upcycle(dense, **{"num_experts": 4, "top_k": 2, **kwargs}).train()
    ids = real_batches(257)
    before = [m.router.weight.detach().clone() for m in moe_layers(moe)]
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    moe(ids, labels=ids).loss.backward()
    opt.step()
    for old, layer in zip(before, moe_layers(moe)):
        assert (layer.router.weight - old).abs().max() > 1e-5


def test_identical_copies_give_the_router_no_lm_gradient_at_step_zero():
    """The caveat the balancing loss exists for: with renormalisation the LM loss alone sends ~0 to the
    router."""
    dense = dense_model(
        vocab_size=257, initializer_range=0.02, router_aux_loss_coef=0.0, router_z_loss_coef=0.0
    )
    moe = quiet_upcycle(dense, num_experts=4, top_k=2).train()
    ids = real_batches(257)
    moe(ids, labels=ids).loss.backward()
    for layer in moe_layers(moe):
        assert layer.router.weight.grad.abs().max() < 1e-6
        assert layer.experts.gate_up_proj.grad.abs().max() > 1e-6


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.fixture
def dense_dir(tmp_path, dense):
    path = tmp_path / "dense"
    dense.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, top_k=0), "top_k=0"),
        (dict(num_experts=4, top_k=5), "top_k=5"),
        (dict(num_experts=0, top_k=1), "num_experts=0"),
        (dict(num_experts=4, top_k=2, layers=[0, 7]), r"layers \[7\] do not exist"),
        (dict(num_experts=4, top_k=2, granularity=5), "granularity=5 must divide"),
        (dict(num_experts=4, top_k=2, drop_upcycling=1.5), "drop_upcycling"),
        (dict(num_experts=4, top_k=2, router="relu"), "router='relu'"),
        (dict(num_experts=4, top_k=2, group_limited=True), "group_limited needs granularity"),
    ],
)
def test_bad_options_fail_before_anything_is_written(dense_dir, tmp_path, kwargs, match):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        upcycle(dense_dir, dst, **kwargs)
    assert not dst.exists()


def test_bad_sources_and_destinations(tmp_path, dense_dir):
    dst = tmp_path / "out"
    none_mlp = dense_model(mlp_types=["none", "none"])
    none_mlp.save_pretrained(tmp_path / "no_mlp")
    with pytest.raises(ValueError, match="no dense MLP layers"):
        upcycle(tmp_path / "no_mlp", dst, num_experts=2, top_k=1)
    partial = dense_model(mlp_types=["none", "dense"])
    partial.save_pretrained(tmp_path / "partial")
    with pytest.raises(ValueError, match=r"layers \[0\] have no dense MLP"):
        upcycle(tmp_path / "partial", dst, num_experts=2, top_k=1, layers=[0, 1])
    moe = quiet_upcycle(dense_model(), num_experts=2, top_k=1)
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(tmp_path / "moe", dst, num_experts=2, top_k=1)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not supported"):
        upcycle(tmp_path / "gpt2", dst, num_experts=2, top_k=1)
    (tmp_path / "mixtral").mkdir()
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="is a native family: import it with"):
        upcycle(tmp_path / "mixtral", dst, num_experts=2, top_k=1)
    with pytest.raises(FileNotFoundError):
        upcycle(tmp_path / "missing", dst, num_experts=2, top_k=1)
    assert not dst.exists()
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        upcycle(dense_dir, dst, num_experts=2, top_k=1)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


# ---- files, lineage, card, CLI -----------------------------------------------------------------------------


def tiny_llama(path: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_upcycle_a_llama_checkpoint_end_to_end(tmp_path):
    llama = tiny_llama(tmp_path / "llama")
    dst = upcycle(tmp_path / "llama", tmp_path / "moe", num_experts=4, top_k=2, shared_expert=True)
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, HybridForCausalLM) and model.config.mlp_types == ["moe", "moe"]
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=ATOL, rtol=0)
    lineage = model.config.hf_hybrid_lineage
    assert lineage["recipe"] == "upcycle" and lineage["base_model"] == str(tmp_path / "llama")
    assert lineage["previous_recipes"] == ["import"]
    assert lineage["options"]["num_experts"] == 4 and lineage["options"]["exact_start"] is True
    card = (dst / "README.md").read_text()
    assert "upcycle" in card and "num_experts" in card and "moe" in card


def test_cli_upcycle_and_inspect(tmp_path, dense_dir, capsys):
    dst = tmp_path / "cli"
    code = cli_main(
        [
            "upcycle",
            str(dense_dir),
            str(dst),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--granularity",
            "2",
            "--no-renormalize",
            "--router",
            "sigmoid",
            "--layers",
            "1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "exact start: True" in out and "before:" in out and "after:" in out
    config = HybridConfig.from_pretrained(dst)
    assert (
        config.mlp_types == ["dense", "moe"]
        and config.num_experts == 8
        and config.router_scoring_func == "sigmoid"
    )
    assert cli_main(["inspect", str(dst), "--context", "128"]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "active" in text
    # errors come back as one line and exit status 2, nothing written
    assert (
        cli_main(["upcycle", str(dense_dir), str(tmp_path / "bad"), "--num-experts", "2", "--top-k", "3"])
        == 2
    )
    assert "top_k=3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_upcycle_keeps_the_source_dtype_and_tokenizer(tmp_path):
    from hf_hybrid.data import byte_tokenizer

    model = dense_model(vocab_size=257).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    dst = upcycle(tmp_path / "src", tmp_path / "dst", num_experts=2, top_k=2)
    assert (dst / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.router.e_score_correction_bias.dtype == torch.float32


# ---- the shared real checkpoint and the recipe -------------------------------------------------------------


def test_real_checkpoint_upcycles_exactly(shakespeare_checkpoint, tmp_path):
    """The real model's logits reach ~20, where fp32 rounding of the same maths in another order is already
    ~1e-5 (its own eager vs SDPA attention differ by that much): the bound is 1e-5 or twice that measured
    floor."""
    from hf_hybrid.convert.source import load_source

    dense, source_dtype = load_source(shakespeare_checkpoint, dtype=torch.float32)
    # its config says float32 (stored bf16): transformers' default dtype rule
    assert source_dtype == torch.float32
    moe = quiet_upcycle(dense, num_experts=4, top_k=2, granularity=2, shared_expert=True)
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, 64))
    with torch.no_grad():
        ref = dense(ids).logits
        dense.config._attn_implementation = "eager"
        floor = (dense(ids).logits - ref).abs().max().item()
        dense.config._attn_implementation = "sdpa"
    assert floor < 2e-5
    assert max_diff(moe, dense, ids) <= max(ATOL, 2 * floor)


def load_recipe():
    spec = importlib.util.spec_from_file_location("upcycle_recipe", REPO / "recipes" / "upcycle" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_runs_end_to_end_on_a_tiny_model(tmp_path):
    from hf_hybrid.data import byte_tokenizer

    src = tmp_path / "src"
    dense_model(vocab_size=257, initializer_range=0.02).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    recipe = yaml.safe_load((REPO / "recipes" / "upcycle" / "config.yaml").read_text())
    recipe["source"] = str(src)
    recipe["upcycle"].update(num_experts=4, top_k=2)
    recipe["data"].update(block_size=32, max_train_chars=20_000, eval_blocks=4)
    recipe["training"].update(max_steps=3, per_device_train_batch_size=2, logging_steps=1)
    recipe["eval"] = {"prompts": 4, "prompt_lines": 2, "max_new_tokens": 6, "lines": 16}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = load_recipe().main(["--config", str(config), "--output-dir", str(out)])
    m = result["metrics"]
    assert result["exact_start"] and abs(m["upcycled_start_eval_loss"] - m["source_eval_loss"]) < 1e-4
    assert m["train_steps"] == 3 and "dense_continued_eval_loss" in m
    assert m["active_params"] < m["total_params"]
    # the exact start generates what the source does and scores each held-out line as it does
    assert m["upcycled_start_agreement"] == 1.0
    assert m["upcycled_start_doc_bits_per_byte"] == pytest.approx(m["source_doc_bits_per_byte"], abs=1e-4)
    loads = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
    assert loads and len(loads[-1]["load"]) == 2  # the load logging callback ran, both MoE layers
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.hf_hybrid_lineage["metrics"]["moe_eval_loss"] == m["moe_eval_loss"]
    card = (out / "model" / "README.md").read_text()
    assert "moe_eval_loss" in card and "dense_continued_eval_loss" in card
    summary = json.loads((out / "metrics.json").read_text())
    history = summary["results"]["moe"]["logged_losses"]
    assert len(history) == 3
