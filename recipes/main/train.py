"""The main job: train a small hybrid from scratch on local text with ``transformers.Trainer``.

    python recipes/main/train.py --config recipes/main/tiny.yaml [--max-steps 5] [--output-dir DIR]
    accelerate launch --multi_gpu --num_processes 2 recipes/main/train.py --config recipes/main/tiny.yaml  #
    DDP

(On CPU, ``--multi_gpu`` still works: torchrun + gloo; ``--cpu`` alone starts one process, accelerate needs
mpirun for multi-CPU.)

Steps: read the YAML (``model`` = HybridConfig arguments, ``data``, ``training`` = TrainingArguments fields),
train a byte-level BPE on the training split, print the design's cost, train, report held-out perplexity
before and after, generate a sample, and save model + tokenizer + model card (with the metrics as lineage) to
``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Trainer, default_data_collator

import hf_hybrid
from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import config_kwargs_from_mapping
from hf_hybrid.cost import estimate_cost
from hf_hybrid.data import SOURCES, apply_data_arguments, load_text_splits, recipe_blocks, train_tokenizer
from hf_hybrid.training import evaluate_perplexity, generate_sample, logged_losses, training_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("tiny.yaml")), help="recipe YAML")
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--eval-blocks", type=int, default=None, help="override data.eval_blocks")
    p.add_argument("--max-train-chars", type=int, default=None, help="override data.max_train_chars")
    p.add_argument("--source", default=None, choices=SOURCES, help="override data.source")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = yaml.safe_load(Path(args.config).read_text())
    data_cfg = dict(recipe.get("data") or {})
    train_cfg = dict(recipe.get("training") or {})
    sample_cfg = dict(recipe.get("sample") or {})
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/main"))
    if args.max_steps is not None:
        train_cfg["max_steps"] = args.max_steps
    apply_data_arguments(data_cfg, args, ("eval_blocks", "max_train_chars", "source"))

    # Trainer writes nothing of its own here (save_strategy "no"); the model is saved below.
    targs = training_arguments(str(output_dir), **train_cfg)
    is_main = targs.process_index == 0
    log = print if is_main else (lambda *a, **k: None)
    torch.manual_seed(targs.seed)
    start = time.time()

    # ---- data and tokenizer --------------------------------------------------------------------------------
    splits = load_text_splits(data_cfg.get("source", "auto"))
    log(f"data: {splits.summary}")
    tokenizer = train_tokenizer(splits.train, data_cfg.get("vocab_size", 2048), progress=is_main)
    block = int(data_cfg.get("block_size", 128))
    train_ds, eval_ds, _ = recipe_blocks(tokenizer, data_cfg, block, splits=splits, progress=is_main)
    log(
        f"tokens: {train_ds.num_tokens:,} for training in {len(train_ds)} blocks of {block}, "
        f"{eval_ds.num_tokens:,} held out; BPE vocab {len(tokenizer)} trained on the training split"
    )

    # ---- model ---------------------------------------------------------------------------------------------
    model_kwargs = config_kwargs_from_mapping(recipe.get("model") or {}, source=args.config)
    eos = tokenizer.eos_token_id
    config = HybridConfig(
        **{
            **model_kwargs,
            "vocab_size": len(tokenizer),
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        }
    )
    model = HybridForCausalLM(config)
    report = estimate_cost(config, contexts=(block, 4096, 32768))
    log("\n" + report.to_text() + "\n")

    before = evaluate_perplexity(model, eval_ds, progress=is_main)
    log(f"held-out perplexity before training: {before['perplexity']:.1f} (loss {before['loss']:.3f})")

    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator)
    train_start = time.time()
    trainer.train()
    train_seconds = time.time() - train_start

    after = evaluate_perplexity(model, eval_ds, progress=is_main)
    losses = logged_losses(trainer)
    prompt = sample_cfg.get("prompt", "\n")
    if isinstance(prompt, dict):
        prompt = prompt.get(splits.name, next(iter(prompt.values())))
    sample = generate_sample(
        model,
        tokenizer,
        prompt,
        max_new_tokens=int(sample_cfg.get("max_new_tokens", 64)),
        temperature=float(sample_cfg.get("temperature", 0.8)),
    )
    metrics = {
        "eval_loss": round(after["loss"], 4),
        "eval_perplexity": round(after["perplexity"], 2),
        "eval_perplexity_at_init": round(before["perplexity"], 2),
        "eval_tokens": int(after["tokens"]),
        "train_steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step
        * targs.per_device_train_batch_size
        * block
        * targs.gradient_accumulation_steps
        * targs.world_size,
        "first_logged_loss": round(losses[0], 4) if losses else None,
        "last_logged_loss": round(losses[-1], 4) if losses else None,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "world_size": targs.world_size,
    }
    log(
        f"held-out perplexity after training: {after['perplexity']:.2f} (loss {after['loss']:.3f}); "
        f"training {train_seconds:.0f} s, {metrics['train_steps']} steps"
    )
    log("sample:\n" + sample + "\n")

    if is_main:
        config.hf_hybrid_lineage = {
            "recipe": "recipes/main",
            "recipe_config": Path(args.config).name,
            "data": splits.name,
            "options": {
                "block_size": block,
                "vocab_size": len(tokenizer),
                "max_steps": metrics["train_steps"],
                "learning_rate": targs.learning_rate,
            },
            "metrics": {k: metrics[k] for k in ("eval_perplexity", "eval_loss", "train_tokens")},
            "hf_hybrid_version": hf_hybrid.__version__,
        }
        readme = output_dir / "README.md"
        if readme.is_file() and "This card was generated by hf-hybrid" in readme.read_text(encoding="utf-8"):
            readme.unlink()  # our own card from an earlier run: regenerate it with the new metrics
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "metrics.json").write_text(json.dumps({**metrics, "sample": sample}, indent=2))
        log(f"saved model, tokenizer and model card to {output_dir}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
