"""Hybridize (issue 18): attention layers -> linear-time mixers initialised from the attention weights,
measured layer selection, attention transfer and distillation with the Trainer, the recipe end to end, the
CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import build_parser
from hf_hybrid.cli import main as cli_main
from hf_hybrid.convert.hybridize import (
    INIT_TABLE,
    available_mixers,
    hybridize,
    hybridize_model,
    plan_hybridize,
    rank_layers,
)
from hf_hybrid.data import PackedBlocks, byte_tokenizer
from hf_hybrid.distill import (
    AttentionTransfer,
    DistillationTrainer,
    TransferTrainer,
    add_lora,
    freeze_all_but,
    transfer_error,
)
from hf_hybrid.mixers import MIXER_REGISTRY
from hf_hybrid.ops.conv import causal_conv1d
from hf_hybrid.training import training_arguments

REPO = Path(__file__).resolve().parents[1]
H, HEADS, KV, D = 32, 4, 2, 8
MIXERS = ["gated_deltanet", "mamba2", "linear_attention"] + (["kda"] if "kda" in MIXER_REGISTRY else [])


def source_model(n_layers: int = 4, seed: int = 0, **overrides) -> HybridForCausalLM:
    kwargs = dict(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return HybridForCausalLM(HybridConfig(**kwargs)).eval()


@pytest.fixture(scope="module")
def src():
    return source_model()


def ids(n: int = 4, t: int = 24, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def expanded(w: torch.Tensor, heads: int, rep: int) -> torch.Tensor:
    """[heads·d, H] rows with every head repeated rep times (the GQA expansion, written the obvious way)."""
    blocks = w.reshape(heads, -1, w.shape[-1])
    return torch.cat([blocks[j // rep] for j in range(heads * rep)])


# ---- initialisation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_inherited_projections_equal_the_source_weights(src, mixer):
    student = hybridize_model(src, attention_layers=[1], mixer=mixer)
    rep = HEADS // KV
    for i in (0, 2, 3):
        attn, new = src.model.layers[i].mixer, student.model.layers[i].mixer
        q, k, v, o = (getattr(attn, f"{n}_proj").weight for n in "qkvo")
        k_exp, v_exp = expanded(k, KV, rep), expanded(v, KV, rep)
        n = HEADS * D
        if mixer == "gated_deltanet":
            w = new.in_proj_qkvz.weight
            assert (
                torch.equal(w[:n], q)
                and torch.equal(w[n : 2 * n], k_exp)
                and torch.equal(w[2 * n : 3 * n], v_exp)
            )
            assert torch.equal(new.out_proj.weight, o)
            assert torch.count_nonzero(new.in_proj_ba.weight) == 0  # β = ½, a = 0 as stated
            cfg = student.config
            assert (cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_head_dim) == (HEADS, HEADS, D)
        elif mixer == "mamba2":
            w = new.in_proj.weight  # z, x, B, C, dt
            assert torch.equal(w[n : 2 * n], v_exp)  # x ← V
            assert torch.equal(w[2 * n : 3 * n], k_exp)  # B ← K
            assert torch.allclose(w[3 * n : 4 * n], q * D**-0.5, rtol=0, atol=0)  # C ← Q·d^-½
            assert torch.count_nonzero(w[4 * n :]) == 0 and torch.count_nonzero(new.D) == 0
            assert torch.equal(new.out_proj.weight, o)
            assert (student.config.mamba_num_heads, student.config.mamba_n_groups) == (HEADS, HEADS)
        else:  # linear_attention, kda
            assert torch.equal(new.q_proj.weight, q) and torch.equal(new.k_proj.weight, k_exp)
            assert torch.equal(new.v_proj.weight, v_exp) and torch.equal(new.o_proj.weight, o)
        if mixer == "kda":
            assert (
                torch.count_nonzero(new.b_proj.weight) == 0
                and torch.count_nonzero(new.forget_gate.f_b_proj.weight) == 0
            )
            assert (student.config.kda_num_heads, student.config.kda_head_dim) == (HEADS, D)
        if getattr(new, "conv1d", None) is not None:  # identity: last tap 1, the others 0
            w = new.conv1d.weight
            assert torch.equal(w[:, 0, -1], torch.ones(w.shape[0])) and torch.count_nonzero(w[:, 0, :-1]) == 0
    statement = student.config.hf_hybrid_lineage["init"][mixer]
    assert statement["inherited"] and statement["new"] and statement["dropped"]
    assert any("W_o" in s for s in statement["inherited"])
    assert student.config.hf_hybrid_lineage["recipe"] == "hybridize"


def test_identity_conv_passes_the_current_token_through():
    x = torch.randn(2, 9, 6)
    weight = torch.zeros(6, 4)
    weight[:, -1] = 1.0
    y, _ = causal_conv1d(x, weight, None, activation=None)
    assert torch.equal(y, x)


def test_qwen3_qk_norm_weight_is_folded_and_biases_reach_the_mamba_conv():
    src = source_model(use_qk_norm=True, attention_bias=True)
    with torch.no_grad():
        for layer in src.model.layers:
            layer.mixer.q_norm.weight.uniform_(0.5, 2.0)
            layer.mixer.k_norm.weight.uniform_(0.5, 2.0)
    attn = src.model.layers[0].mixer
    gdn_model = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    gdn = gdn_model.model.layers[0].mixer
    lineage = gdn_model.config.hf_hybrid_lineage  # GDN has no projection biases: said per layer and per mixer
    assert lineage["init_notes"] == {str(i): ["q/k/v biases dropped"] for i in range(3)}
    assert any("biases" in s for s in lineage["init"]["gated_deltanet"]["dropped"])
    q_rows = gdn.in_proj_qkvz.weight[: HEADS * D].reshape(HEADS, D, H)
    assert torch.allclose(q_rows, attn.q_proj.weight.reshape(HEADS, D, H) * attn.q_norm.weight[None, :, None])
    mamba = hybridize_model(src, attention_layers=[3], mixer="mamba2").model.layers[0].mixer
    n = HEADS * D
    bias = mamba.conv1d.bias  # conv over [x, B, C]
    assert torch.equal(bias[:n], expanded(attn.v_proj.bias[:, None], KV, HEADS // KV)[:, 0])
    assert torch.allclose(bias[2 * n :], attn.q_proj.bias * attn.q_norm.weight.repeat(HEADS) * D**-0.5)


def test_unchanged_layers_and_shared_tensors_are_bit_identical(src):
    before = {k: v.clone() for k, v in src.state_dict().items()}
    student = hybridize_model(src, pattern="1:1 gated_deltanet:attention")
    assert student.config.mixer_types == ["gated_deltanet", "attention", "gated_deltanet", "attention"]
    s_state = student.state_dict()
    for key, value in src.state_dict().items():
        if key.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")):
            continue
        assert torch.equal(s_state[key], value), key
        assert torch.equal(value, before[key]), f"source changed: {key}"
    assert src.config.mixer_types == ["attention"] * 4


def test_pattern_expands_like_the_config():
    config = source_model(6).config
    assert plan_hybridize(config, pattern="2:1 gated_deltanet:attention").attention_layers == [2, 5]
    assert plan_hybridize(config, pattern="5:1 mamba2:attention").attention_layers == [5]
    plan = plan_hybridize(config, pattern="1:1:1 gated_deltanet:mamba2:attention")
    assert plan.targets == {0: "gated_deltanet", 1: "mamba2", 3: "gated_deltanet", 4: "mamba2"}
    assert plan_hybridize(config, attention_layers=[], mixer="mamba2").attention_layers == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="5:1 gated_deltanet:attention"), r"keeps none"),
        (dict(attention_layers=[1], mixer="gdn"), r"mixer='gdn' is not a mixer.*gated_deltanet"),
        (dict(pattern="3:1 kda_x:attention"), r"not known"),
        (dict(attention_layers=[0, 7], mixer="mamba2"), r"\[7\] do not exist.*0\.\.3"),
        (dict(attention_layers=[1]), r"needs mixer="),
        (dict(attention_layers=[0, 1, 2, 3], mixer="mamba2"), r"nothing to replace"),
        (dict(pattern="attention"), r"nothing to replace"),
        (dict(pattern="1:1 gated_deltanet:attention", attention_layers=[1]), r"exactly one"),
        (dict(pattern="1:1 gated_deltanet:attention", mixer="mamba2"), r"leave mixer out"),
        (
            dict(attention_layers=[1], mixer="linear_attention", mixer_config={"linear_head_dim": 4}),
            r"head dims cannot map.*linear_head_dim=4",
        ),
        (
            dict(attention_layers=[1], mixer="linear_attention", mixer_config={"linear_hed_dim": 4}),
            r"not a "
            r"HybridConfig",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(src, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_hybridize(src.config, **kwargs)


def test_existing_linear_layers_convert_further_or_explain_why_not():
    # A hybrid source (like an imported qwen3_next): its GDN layers match the attention's heads, so the
    # remaining attention layers can become GDN too; the existing GDN layer is kept bit for bit.
    geometry = INIT_TABLE["gated_deltanet"].geometry(source_model().config)
    src = source_model(mixer_types=["gated_deltanet", "attention", "attention", "attention"], **geometry)
    student = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    assert student.config.mixer_types == ["gated_deltanet"] * 3 + ["attention"]
    for key, value in src.model.layers[0].state_dict().items():
        assert torch.equal(student.model.layers[0].state_dict()[key], value)
    other = source_model(
        mixer_types=["gated_deltanet", "attention", "attention", "attention"], gdn_num_key_heads=2
    )
    with pytest.raises(
        ValueError, match=r"head dims cannot map.*layers \[0\].*gdn_num_key_heads=2.*needs.*=4"
    ):
        hybridize_model(other, attention_layers=[3], mixer="gated_deltanet")
    with pytest.raises(ValueError, match=r"layer 0, which is 'gated_deltanet'"):
        plan_hybridize(other.config, pattern="1:1 mamba2:attention")


def test_kda_is_offered_only_when_registered_and_initialisable():
    # The parser lists the mixers in its help without loading the registry (a fast --help); the library
    # checks --mixer against available_mixers() (test_cli_hybridize_and_errors).
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    help_text = " ".join(sub.choices["hybridize"].format_help().split())
    choices = available_mixers()
    assert all(m in help_text for m in choices)
    assert ("kda" in choices) == ("kda" in MIXER_REGISTRY and "kda" in INIT_TABLE)
    assert set(MIXERS) <= set(choices)


# ---- layer selection ---------------------------------------------------------------------------------------


def test_rank_layers_puts_the_layer_that_matters_first(src):
    teacher = source_model(seed=3)
    with torch.no_grad():
        teacher.model.layers[1].mixer.o_proj.weight.zero_()  # layer 1's attention contributes nothing
        teacher.model.layers[2].mixer.o_proj.weight.mul_(10.0)  # layer 2's dominates
        for i in (0, 3):
            teacher.model.layers[i].mixer.o_proj.weight.mul_(0.1)
    rows = rank_layers(teacher, ids(2, 16), mixer="linear_attention")
    assert sorted(r["layer"] for r in rows) == [0, 1, 2, 3]
    assert rows[0]["layer"] == 2 and rows[-1]["layer"] == 1
    # replacing a layer whose output is zero changes nothing (o_proj inherited: 0)
    assert rows[-1]["kl"] < 1e-3
    assert all(a["kl"] >= b["kl"] for a, b in zip(rows, rows[1:]))


# ---- stage 1 and stage 2 -----------------------------------------------------------------------------------


def blocks_dataset(n: int = 16, t: int = 24, vocab: int = 64) -> PackedBlocks:
    return PackedBlocks(ids(n, t, seed=5, vocab=vocab).flatten(), t)


def args(tmp_path, name, **kw):
    base = dict(
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=2,
        disable_tqdm=True,
        weight_decay=0.0,
    )
    return training_arguments(str(tmp_path / name), **{**base, **kw})


@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "linear_attention"])
def test_stage1_moves_only_new_parameters_and_lowers_the_mse(src, tmp_path, mixer):
    student = hybridize_model(src, attention_layers=[1, 3], mixer=mixer)
    teacher_before = {k: v.clone() for k, v in src.state_dict().items()}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    held = ids(4, 24, seed=9)
    err0 = transfer_error(src, student, [0, 2], held)
    freeze_all_but(student, [0, 2])
    trainer = TransferTrainer(
        model=AttentionTransfer(src, student, [0, 2]),
        args=args(tmp_path, "s1", max_steps=12),
        train_dataset=blocks_dataset(),
    )
    trainer.train()
    err1 = transfer_error(src, student, [0, 2], held)
    assert all(err1[i] < 0.8 * err0[i] for i in (0, 2)), (err0, err1)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")) for k in moved)
    assert all(torch.equal(v, teacher_before[k]) for k, v in src.state_dict().items())
    assert any("nmse/layer0" in e for e in trainer.state.log_history)


def _kl(student, teacher, x) -> float:
    from hf_hybrid.convert.hybridize import distillation_gap

    return distillation_gap(student.eval(), teacher, x)["kl"]


def test_stage2_lowers_the_kl_full_and_lora(src, tmp_path):
    held = ids(4, 24, seed=9)
    student = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    kl0 = _kl(student, src, held)
    trainer = DistillationTrainer(
        model=student.train(),
        teacher=src,
        args=args(tmp_path, "s2", learning_rate=3e-3),
        train_dataset=blocks_dataset(),
        lm_weight=0.1,
    )
    trainer.train()
    kl1 = _kl(student, src, held)
    assert kl1 < 0.8 * kl0, (kl0, kl1)
    assert {"kl", "lm"} <= set(next(e for e in trainer.state.log_history if "kl" in e))

    student = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    base = {k: v.clone() for k, v in student.state_dict().items()}
    peft_model = add_lora(student, r=4, alpha=8)
    DistillationTrainer(
        model=peft_model,
        teacher=src,
        args=args(tmp_path, "s2-lora", learning_rate=1e-2),
        train_dataset=blocks_dataset(),
    ).train()
    assert all(
        torch.equal(p, base[k.replace("base_model.model.", "").replace(".base_layer", "")])
        for k, p in peft_model.named_parameters()
        if "lora_" not in k
    )
    merged = peft_model.merge_and_unload()
    assert _kl(merged, src, held) < kl0


def test_distill_stage_reads_its_section_and_returns_the_merged_student(src, tmp_path):
    """The recipes' distillation stage: the loss options and the LoRA adapter from the section, the rest
    TrainingArguments (overrides on top, packed rows' columns kept); an unknown ``train`` is refused by its
    section's name before anything runs."""
    from hf_hybrid.distill import distill_stage

    with pytest.raises(SystemExit, match=r"heal.train='qlora' is not known; choose full or lora"):
        distill_stage(None, None, None, None, {"train": "qlora"}, output_dir=str(tmp_path), section="heal")
    student = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    cfg = {"train": "lora", "lora": {"r": 4, "alpha": 8}, "temperature": 2.0, "lm_weight": 0.5}
    cfg.update(max_steps=2, per_device_train_batch_size=4, disable_tqdm=True, seed=1)
    merged, trainer = distill_stage(
        student, src, blocks_dataset(), None, cfg, output_dir=str(tmp_path / "s2"), section="heal", seed=7
    )
    assert type(merged) is type(student) and not any("lora_" in k for k in merged.state_dict())
    assert (trainer.temperature, trainer.lm_weight, trainer.state.global_step) == (2.0, 0.5, 2)
    assert (trainer.args.seed, trainer.args.remove_unused_columns) == (7, False)


def test_stage2_gradient_accumulation_matches_one_batch(src, tmp_path):
    data = blocks_dataset(8)
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        student = hybridize_model(src, attention_layers=[3], mixer="linear_attention").train()
        DistillationTrainer(
            model=student,
            teacher=src,
            train_dataset=data,
            lm_weight=0.5,
            args=args(
                tmp_path,
                f"ga{ga}",
                max_steps=1,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                learning_rate=1e-2,
                max_grad_norm=1e9,
                optim="sgd",
            ),
        ).train()
        results.append(student.model.layers[0].mixer.q_proj.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6), (results[0] - results[1]).abs().max()


# ---- recipe and CLI, end to end on a tiny Qwen3 ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    tokenizer = byte_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    path = tmp_path_factory.mktemp("qwen3") / "src"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_recipe_runs_end_to_end_on_a_tiny_qwen3(qwen3_dir, tmp_path):
    from importlib import util

    spec = util.spec_from_file_location("hybridize_recipe", REPO / "recipes/hybridize/train.py")
    recipe = util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = yaml.safe_load((REPO / "recipes/hybridize/config.yaml").read_text())
    config["data"] = {"source": "pydoc", "context": 32, "max_train_chars": 20000, "eval_blocks": 4}
    config["select"] = {"num_attention": 1, "criterion": "kl", "blocks": 2}
    config["hybridize"]["mixer"] = "gated_deltanet"
    config["eval"] = {"prompts": 4, "prompt_lines": 2, "max_new_tokens": 4, "lines": 16}
    for stage in ("stage1", "stage2", "scratch"):
        config[stage].update(per_device_train_batch_size=2, logging_steps=2, disable_tqdm=True)
    config["stage1"]["max_steps"] = 3
    config["stage2"]["max_steps"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "student"
    summary = recipe.main(
        [
            "--config",
            str(path),
            "--source",
            str(qwen3_dir),
            "--output",
            str(out),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert set(summary["rows"]) == {"source", "init", "stage1", "stage2", "scratch"}
    # trained on document-aligned packed rows (the default), judged by generation and per-line bits/byte
    assert summary["metrics"]["stage2_doc_bits_per_byte"] > 0
    assert 0 <= summary["rows"]["stage2"]["agreement_fraction"] <= 1
    assert summary["rows"]["stage2"]["kl_to_source"] < summary["rows"]["init"]["kl_to_source"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.mixer_types.count("attention") == 1
    lineage = loaded.config.hf_hybrid_lineage
    assert lineage["recipe"] == "hybridize" and lineage["base_model_type"] == "qwen3"
    assert {"stage1", "stage2"} <= set(lineage["training"])
    assert lineage["metrics"]["stage2_perplexity"] == round(summary["rows"]["stage2"]["eval_perplexity"], 3)
    assert len(lineage["options"]["selection"]["ranking"]) == 3
    assert "q ← W_q (q_norm weight folded in)" in lineage["init"]["gated_deltanet"]["inherited"]
    card = (out / "README.md").read_text()
    assert "hybridize" in card and "q ← W_q" in card and "stage2_perplexity" in card
    x = ids(1, 16, vocab=loaded.config.vocab_size)
    with torch.no_grad():
        assert torch.isfinite(loaded(x).logits).all()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["layout"]


def load_recipe():
    from importlib import util

    spec = util.spec_from_file_location("hybridize_recipe", REPO / "recipes/hybridize/train.py")
    recipe = util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_recipe_seed_flag_sets_every_stage_and_the_ranking(qwen3_dir, tmp_path, monkeypatch):
    recipe = load_recipe()
    config = yaml.safe_load((REPO / "recipes/hybridize/config.yaml").read_text())
    sections = ("hybridize", "stage1", "stage2", "scratch")
    default = recipe.apply_overrides(config, recipe.parse_args([]))
    assert [default[s]["seed"] for s in sections] == [config[s]["seed"] for s in sections]
    seeded = recipe.apply_overrides(config, recipe.parse_args(["--seed", "7"]))
    assert [seeded[s]["seed"] for s in sections] == [7, 7, 7, 7]
    assert [config[s]["seed"] for s in sections] != [7, 7, 7, 7]  # the YAML itself is not edited

    # the layer ranking initialises each candidate mixer with the same seed
    seen = {}

    class Stop(Exception):
        pass

    def fake_rank_layers(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(recipe, "rank_layers", fake_rank_layers)
    config["data"] = {"source": "pydoc", "context": 32, "max_train_chars": 20000, "eval_blocks": 2}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--config", str(path), "--source", str(qwen3_dir), "--num-attention", "1", "--seed", "5"]
    with pytest.raises(Stop):
        recipe.main([*argv, "--output-dir", str(tmp_path / "run")])
    assert seen["seed"] == 5


def test_cli_hybridize_and_errors(qwen3_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli_main(["hybridize", str(qwen3_dir), str(dst), "--pattern", "2:1 mamba2:attention"]) == 0
    text = capsys.readouterr().out
    assert "x ← W_v" in text and "C ← W_q" in text and "cache" in text
    assert "layers 0, 1 -> mamba2; attention kept: 2" in text and "{" not in text  # readable, not a dict
    reloaded = HybridForCausalLM.from_pretrained(dst)
    assert reloaded.config.mixer_types == ["mamba2", "mamba2", "attention"]
    assert cli_main(["inspect", str(dst), "--context", "32K"]) == 0
    assert (
        cli_main(
            [
                "hybridize",
                str(qwen3_dir),
                str(tmp_path / "b"),
                "--attention-layers",
                "0,9",
                "--mixer",
                "gated_deltanet",
            ]
        )
        == 2
    )
    assert "do not exist" in capsys.readouterr().err
    assert (
        cli_main(["hybridize", str(qwen3_dir), str(tmp_path / "c"), "--pattern", "5:1 mamba2:attention"]) == 2
    )
    assert "keeps none" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    argv = ["hybridize", str(qwen3_dir), str(tmp_path / "d"), "--attention-layers", "1", "--mixer", "gdn"]
    assert cli_main(argv) == 2  # the library names the mixer and the choices (the parser loads no registry)
    err = capsys.readouterr().err
    assert "'gdn'" in err and "gated_deltanet" in err and not (tmp_path / "d").exists(), err
    hybrid = hybridize(qwen3_dir, attention_layers=[2], mixer="linear_attention")
    assert hybrid.config.hf_hybrid_lineage["source"] == str(qwen3_dir)


def test_cli_select_prints_the_ranking_and_keeps_the_top_layers(qwen3_dir, tmp_path, capsys):
    dst = tmp_path / "sel"
    assert (
        cli_main(
            [
                "hybridize",
                str(qwen3_dir),
                str(dst),
                "--select",
                "kl",
                "--num-attention",
                "1",
                "--mixer",
                "linear_attention",
                "--select-blocks",
                "2",
                "--select-context",
                "32",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    ranking = [line.split() for line in text.splitlines() if line.strip().endswith("<- keeps attention")]
    assert len(ranking) == 1
    kept = int(ranking[0][1])
    assert HybridConfig.from_pretrained(dst).mixer_types[kept] == "attention"
    assert cli_main(["hybridize", str(qwen3_dir), str(tmp_path / "x"), "--select", "kl"]) == 2
    assert "--num-attention" in capsys.readouterr().err


def test_student_context_gives_recurrent_mixers_the_padding_mask():
    from hf_hybrid.distill import student_context
    from hf_hybrid.mixers.base import MixerContext

    ctx = MixerContext(
        padding_mask=None,
        attention_mask_2d=None,
        masks={},
        position_ids=torch.zeros(2, 4),
        cu_seqlens=None,
        max_seqlen=None,
        rope=None,
        cache=object(),
        past_length=3,
    )
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    new = student_context(ctx, mask, 4)
    assert torch.equal(new.padding_mask, mask.bool()) and new.cache is None and new.past_length == 0
    assert student_context(ctx, torch.ones(2, 4, dtype=torch.long), 4).padding_mask is None


def test_attention_output_gate_becomes_the_gdn_gate():
    src = source_model(attention_output_gate=True)  # Qwen3-Next's gated attention
    attn = src.model.layers[0].mixer
    student = hybridize_model(src, attention_layers=[3], mixer="gated_deltanet")
    w = student.model.layers[0].mixer.in_proj_qkvz.weight
    n = HEADS * D
    q_and_gate = attn.q_proj.weight.reshape(HEADS, 2 * D, H)
    assert torch.equal(w[:n], q_and_gate[:, :D].reshape(n, H))
    assert torch.equal(w[3 * n :], q_and_gate[:, D:].reshape(n, H))
    assert any(
        s.startswith("z (output gate) ←")
        for s in student.config.hf_hybrid_lineage["init"]["gated_deltanet"]["inherited"]
    )


def test_an_imported_qwen3_next_converts_its_attention_layers_further(tmp_path):
    """Issue #18 item 6: any import is a source. A tiny native qwen3_next (GDN : gated attention 3:1) → import
    → its first attention layer becomes KDA (or Mamba-2); its GDN layers, the kept attention layer, norms and
    MoE are copied bit for bit; a GDN target whose heads cannot match the existing GDN layers is refused by
    name."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from hf_hybrid.convert.native import import_native
    from hf_hybrid.convert.native.qwen3_next import native_torch_kernels

    cfg = Qwen3NextConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    torch.manual_seed(0)
    with native_torch_kernels():
        src = import_native(Qwen3NextForCausalLM(cfg).eval()).eval()
    attention = [i for i, m in enumerate(src.config.mixer_types) if m == "attention"]
    assert len(attention) == 2 and "gated_deltanet" in src.config.mixer_types
    for mixer in ("kda", "mamba2"):
        new = hybridize_model(src, attention_layers=attention[1:], mixer=mixer)
        assert (
            new.config.mixer_types[attention[0]] == mixer
            and new.config.mixer_types[attention[1]] == "attention"
        )
        for i, (a, b) in enumerate(zip(src.model.layers, new.model.layers)):
            if i != attention[0]:
                sa, sb = a.state_dict(), b.state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (mixer, i)
        assert new.config.hf_hybrid_lineage["init"]
        ids = torch.randint(1, 96, (2, 12))
        new.train()
        new(ids, labels=ids).loss.backward()
        grads = [p.grad for p in new.model.layers[attention[0]].mixer.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match=r"already 'gated_deltanet' with gdn_num_key_heads=2"):
        hybridize_model(src, attention_layers=attention[1:], mixer="gated_deltanet")
