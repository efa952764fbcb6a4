"""Training on real local text: data and tokenizer, Trainer (single process and DDP over gloo), perplexity,
sampling, and the main recipe end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, default_data_collator

from hf_hybrid import HybridForCausalLM
from hf_hybrid.card import parse_front_matter
from hf_hybrid.data import (
    EOS_TOKEN,
    PackedBlocks,
    build_lm_datasets,
    byte_tokenizer,
    load_text_splits,
    train_tokenizer,
)
from hf_hybrid.training import evaluate_perplexity, generate_sample, logged_losses, training_arguments

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pydoc_data():
    splits = load_text_splits("pydoc")
    tokenizer = train_tokenizer(splits.train, vocab_size=512, max_chars=300_000)
    train, held = build_lm_datasets(tokenizer, 64, source=splits, max_train_chars=300_000, max_eval_blocks=16)
    return tokenizer, train, held


def test_text_sources_and_tokenizers(pydoc_data):
    pydoc = load_text_splits("pydoc")
    assert pydoc.train and pydoc.eval and not set(pydoc.train) & set(pydoc.eval)
    tok = byte_tokenizer()
    assert len(tok) == 257 and tok.eos_token == EOS_TOKEN
    text = "def f(x):\n    return x ** 2  # ünïcode"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text  # bytes, lossless
    bpe, train, held = pydoc_data
    assert len(bpe) == 512 and bpe.decode(bpe(text).input_ids) == text
    assert train.blocks.shape[1] == 64 and len(held) == 16
    assert torch.equal(train[0]["input_ids"], train[0]["labels"])
    assert int((train.blocks == bpe.eos_token_id).sum()) > 0  # documents are separated by eos


def test_shipped_shakespeare_is_always_there():
    splits = load_text_splits("shakespeare-small")
    assert splits.name == "shakespeare" and len(splits.train) == 6 and len(splits.eval) == 1
    assert "PROSPERO" in splits.eval[0] and "shipped" in splits.summary
    assert sum(splits.num_chars) < 1_000_000  # kept small: it is in the repository
    with pytest.raises(ValueError, match="shakespeare-small"):
        load_text_splits("shakespear")


def test_shakespeare_split(shared_dir):
    splits = load_text_splits("auto")
    assert splits.name == "shakespeare" and len(splits.eval) == 2 and len(splits.train) == 40
    assert any("HAMLET" in doc[:2000].upper() for doc in splits.eval)


def test_packed_blocks():
    blocks = PackedBlocks(list(range(23)), 5)
    assert len(blocks) == 4 and blocks[3]["input_ids"].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="no block"):
        PackedBlocks([1, 2], 5)


def test_recipe_data_overrides_and_blocks(capsys):
    """A recipe's command line writes only the data.* values it was given (``--data-mode`` is ``data.mode``);
    ``recipe_blocks`` builds the blocks ``build_lm_datasets`` builds from the section's limits."""
    from argparse import Namespace

    from hf_hybrid.data import apply_data_arguments, recipe_blocks

    cfg = {"context": 64, "mode": "documents", "eval_blocks": 3}
    args = Namespace(context=None, eval_blocks=2, data_mode="blocks", source="SRC/checkpoint")
    apply_data_arguments(cfg, args, ("context", "eval_blocks", "mode"))
    assert cfg == {"context": 64, "mode": "blocks", "eval_blocks": 2}  # source: not asked for, untouched
    with pytest.raises(AttributeError):
        apply_data_arguments(cfg, args, ("max_train_chars",))
    tokenizer = byte_tokenizer()
    cfg = {"source": "pydoc", "max_train_chars": 20_000, "eval_blocks": 2}
    train, held, splits = recipe_blocks(tokenizer, cfg, 32, log=print)
    ref_train, ref_held = build_lm_datasets(
        tokenizer, 32, source="pydoc", max_train_chars=20_000, max_eval_blocks=2
    )
    assert splits.name == "pydoc" and torch.equal(train.blocks, ref_train.blocks)
    assert torch.equal(held.blocks, ref_held.blocks) and len(held) == 2
    assert capsys.readouterr().out.strip().endswith("held-out tokens (2 blocks)")


def test_trainer_loss_falls_on_real_text(pydoc_data, tiny_config, tmp_path):
    tokenizer, train, held = pydoc_data
    torch.manual_seed(0)
    config = tiny_config("tiny-hybrid", vocab_size=len(tokenizer))  # 3 Gated DeltaNet : 1 attention
    model = HybridForCausalLM(config)
    before = evaluate_perplexity(model, held)
    assert abs(before["loss"] - math.log(len(tokenizer))) < 0.3  # an untrained model is about uniform
    args = training_arguments(
        str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=8,
        logging_steps=5,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.8, losses
    after = evaluate_perplexity(model, held)
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    sample = generate_sample(model, tokenizer, "The ", max_new_tokens=12)
    assert sample.startswith("The ") and len(sample) > 4
    assert generate_sample(model, tokenizer, "The ", max_new_tokens=12) == sample  # seeded


def test_ddp_two_processes_gloo(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU runs torchrun + gloo (``--cpu`` alone would
    run a single process: accelerate needs mpirun for multi-CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "ddp_train_script.py"), str(tmp_path), "8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    written = sorted(p.name for p in tmp_path.glob("rank*.json"))  # did training finish before a failure?
    assert proc.returncode == 0, (written, proc.stderr[-3000:])
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced: identical replicas
    losses = ranks[0]["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses


def _load_recipe():
    spec = importlib.util.spec_from_file_location("main_recipe", REPO / "recipes" / "main" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_recipe_smoke(tmp_path, capsys):
    recipe = _load_recipe()
    out = tmp_path / "run"
    args = ["--max-steps", "5", "--eval-blocks", "4", "--max-train-chars", "200000", "--source", "pydoc"]
    metrics = recipe.main([*args, "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert (
        "FLOPs / token" in printed
        and "held-out perplexity after training" in printed
        and "sample:" in printed
    )
    assert metrics["train_steps"] == 5 and math.isfinite(metrics["eval_perplexity"])
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_at_init"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no empty trainer/ folder
    card = (out / "README.md").read_text()
    assert parse_front_matter(card)["library_name"] == "hf-hybrid" and "eval_perplexity" in card
    model = HybridForCausalLM.from_pretrained(out)
    assert model.config.hf_hybrid_lineage["recipe"] == "recipes/main"
    # a second run into the same directory refreshes its own card (not a user's)
    recipe.main(["--max-steps", "2", "--eval-blocks", "2", "--max-train-chars", "100000", "--source", "pydoc",
                 "--output-dir", str(out)])  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 2
    assert "| train_tokens | 4096 |" in (out / "README.md").read_text()


@pytest.mark.slow
def test_fsdp2_two_processes_gloo_trains_and_reloads_the_sharded_checkpoint_exactly(tmp_path):
    """FSDP2 (``fully_shard`` per decoder layer) on 2 CPU processes trains a hybrid MoE; the sharded DCP
    checkpoint reloads into a fresh sharded model bit for bit. (accelerate 1.15 turns FSDP on only for
    accelerator devices: ``Trainer(fsdp=True)`` on CPU silently runs DDP, so the script shards with torch
    directly; see its docstring.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "fsdp_train_script.py"), str(tmp_path), "6",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["param_types"] == ["DTensor"]
        assert r["local_numel"] * 2 == r["full_numel"]  # each rank holds half of every parameter
        assert r["next_loss"] < r["first_loss"] - 0.1, r
        assert r["diff_fresh_vs_trained"] > 1e-3  # the fresh model really differs before loading
        assert r["diff_reloaded_vs_trained"] == 0.0 and r["reloaded_loss"] == r["next_loss"]
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(r["shard_files"])
