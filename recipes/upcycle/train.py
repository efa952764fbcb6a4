"""Upcycle a dense checkpoint to MoE and continue training it, against dense continued training at equal
tokens.

    python recipes/upcycle/train.py --config recipes/upcycle/config.yaml [--source DIR] [--max-steps N]
                                    [--output-dir DIR] [--eval-blocks N] [--no-dense] [--overwrite]
    accelerate launch --num_processes 2 recipes/upcycle/train.py --config recipes/upcycle/config.yaml   # DDP

Steps: load the source (an hf_hybrid checkpoint, or a Llama / Qwen2 / Qwen3 / Mistral one imported on the way)
in fp32 with its tokenizer; cut the local text (``hf_hybrid.data``: Shakespeare with hamlet + tempest held
out, else pydoc) into blocks; measure the source's held-out LM loss; upcycle (``hf_hybrid.convert.upcycle``,
options from ``upcycle:``) and check the start is exact where it should be; continue training the dense source
and the MoE with the same ``TrainingArguments`` (same data order, schedule and tokens) — the MoE with its
balancing losses (aux 1e-2, z 1e-3) and the expert-load callbacks of ``hf_hybrid.moe_training`` (load in the
Trainer logs and in ``expert_load.jsonl``); print both held-out LM losses (eval mode: LM loss alone); save the
MoE with its lineage and the measured metrics in its model card, and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, Trainer, default_data_collator

import hf_hybrid
from hf_hybrid.convert.source import load_source
from hf_hybrid.convert.upcycle import UpcycleOptions, upcycle_model
from hf_hybrid.cost import estimate_cost, format_count
from hf_hybrid.data import apply_data_arguments, recipe_blocks, recipe_source
from hf_hybrid.evaluation import ConversionEval
from hf_hybrid.moe_training import collect_expert_load, install_moe_callbacks, load_metrics
from hf_hybrid.training import evaluate_perplexity, logged_losses, training_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")), help="recipe YAML")
    p.add_argument(
        "--source",
        default=None,
        help="source checkpoint directory (default: the config's `source`)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--eval-blocks", type=int, default=None, help="override data.eval_blocks")
    p.add_argument("--max-train-chars", type=int, default=None, help="override data.max_train_chars")
    p.add_argument("--no-dense", action="store_true", help="skip the dense continued-training baseline")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise SystemExit(f"{output_dir} exists and is not empty; pass --overwrite or choose --output-dir")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def judged_line(m: dict[str, float]) -> str:
    return (
        f"vs source: KL {m['kl_to_source']:.4f}, greedy agreement {m['agreement_fraction']:.3f}, next line "
        f"{m['next_line_match']:.3f}; per-line bits/byte {m['doc_bits_per_byte']:.4f}"
    )


def train(model, targs, train_ds, *, moe: bool, jsonl: Path | None):
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator)
    if moe:
        install_moe_callbacks(trainer, jsonl_path=str(jsonl) if jsonl else None)
    start = time.time()
    trainer.train()
    return trainer, time.time() - start


def load_summary(model, eval_ds, batch_size: int) -> dict[int, dict[str, float]]:
    """Expert load on the held-out set (eval mode, no training side effects), per MoE layer."""
    from hf_hybrid.moe_training import measure_expert_load

    ids = eval_ds.blocks.reshape(-1)
    counts = measure_expert_load(model, ids, seq_len=eval_ds.blocks.shape[1])
    return {i: load_metrics(c) for i, c in sorted(counts.items())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = yaml.safe_load(Path(args.config).read_text())
    data_cfg = dict(recipe.get("data") or {})
    train_cfg = dict(recipe.get("training") or {})
    up_cfg = dict(recipe.get("upcycle") or {})
    try:
        source = recipe_source(args.source or recipe.get("source", "auto"))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/upcycle"))
    if args.max_steps is not None:
        train_cfg["max_steps"] = args.max_steps
    apply_data_arguments(data_cfg, args, ("eval_blocks", "max_train_chars"))
    compare_dense = bool(recipe.get("compare_dense", True)) and not args.no_dense

    targs = training_arguments(str(output_dir / "trainer"), **train_cfg)
    is_main = targs.process_index == 0
    log = print if is_main else (lambda *a, **k: None)
    if is_main:
        prepare_output(output_dir, args.overwrite)
    start = time.time()

    # ---- source, tokenizer, data ---------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    dense, source_dtype = load_source(source, dtype=torch.float32)
    log(f"source: {source} ({source_dtype} weights, trained here in float32)")
    train_ds, eval_ds, splits = recipe_blocks(
        tokenizer, data_cfg, int(data_cfg.get("block_size", 256)), log=log
    )
    data_name = splits.name
    eval_bs = int(recipe.get("eval_batch_size", 8))
    base = evaluate_perplexity(dense, eval_ds, batch_size=eval_bs)
    # judged against the source (hf_hybrid.evaluation): greedy agreement, next line, KL, per-line bits/byte
    judge = ConversionEval.from_recipe(
        copy.deepcopy(dense),  # the source as it was, whatever the MoE built from it shares and trains
        tokenizer,
        splits.eval,
        eval_ds.blocks,
        recipe.get("eval"),
        kl_batch_size=eval_bs,
    )
    source_judged = judge.source_metrics()
    log(
        f"source held-out LM loss {base['loss']:.4f} (ppl {base['perplexity']:.2f}); per-line bits/byte "
        f"{source_judged['doc_bits_per_byte']:.4f} ({judge.describe()})"
    )

    # ---- upcycle -------------------------------------------------------------------------------------------
    opts = UpcycleOptions(**{**up_cfg, "layers": tuple(up_cfg["layers"]) if up_cfg.get("layers") else None})
    for note in opts.notes(dense.config):
        log(f"note: {note}")
    torch.manual_seed(targs.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes were printed above
        moe = upcycle_model(dense, opts)
    exact = opts.exact_start(dense.config)
    start_eval = evaluate_perplexity(moe, eval_ds, batch_size=eval_bs)
    start_judged = judge.measure(moe)
    gap = abs(start_eval["loss"] - base["loss"])
    log(
        f"upcycled: {moe.config.num_experts} experts, top-{moe.config.num_experts_per_tok}, exact "
        f"start: {exact}; held-out LM loss at start {start_eval['loss']:.4f} (|Δ| vs source {gap:.2e}); "
        f"{judged_line(start_judged)}"
    )
    if exact and gap > 1e-4:
        raise SystemExit(f"internal error: an exact upcycle changed the held-out loss by {gap:.2e}")
    cost_dense = estimate_cost(dense.config, contexts=(data_cfg.get("block_size", 256),))
    cost_moe = estimate_cost(moe.config, contexts=(data_cfg.get("block_size", 256),))
    log(
        f"params: dense {format_count(cost_dense.total_params)}; MoE total "
        f"{format_count(cost_moe.total_params)}, active {format_count(cost_moe.active_params)}"
    )

    # ---- continued training: dense baseline and MoE, same arguments ----------------------------------------
    results: dict[str, Any] = {}
    if compare_dense:
        dense_run = copy.deepcopy(dense)
        trainer, seconds = train(dense_run, targs, train_ds, moe=False, jsonl=None)
        after = evaluate_perplexity(dense_run, eval_ds, batch_size=eval_bs)
        results["dense"] = {
            "eval_loss": after["loss"],
            "eval_perplexity": after["perplexity"],
            **judge.measure(dense_run),
            "train_seconds": seconds,
            "logged_losses": logged_losses(trainer),
        }
        log(
            f"dense continued: held-out LM loss {after['loss']:.4f} "
            f"(ppl {after['perplexity']:.2f}), {seconds:.0f} s; {judged_line(results['dense'])}"
        )
        del dense_run, trainer
    jsonl = output_dir / "expert_load.jsonl"
    trainer, seconds = train(moe, targs, train_ds, moe=True, jsonl=jsonl if is_main else None)
    collect_expert_load(moe, source="log")  # drop counts left over from the last log interval
    after = evaluate_perplexity(moe, eval_ds, batch_size=eval_bs)
    load = load_summary(moe, eval_ds, eval_bs)
    results["moe"] = {
        "eval_loss": after["loss"],
        "eval_perplexity": after["perplexity"],
        **judge.measure(moe),
        "train_seconds": seconds,
        "logged_losses": logged_losses(trainer),
        "eval_expert_load": load,
    }
    log(
        "MoE continued:   held-out LM loss "
        f"{after['loss']:.4f} (ppl {after['perplexity']:.2f}), {seconds:.0f} s; {judged_line(results['moe'])}"
    )

    steps = trainer.state.global_step
    tokens = (
        steps
        * targs.per_device_train_batch_size
        * targs.gradient_accumulation_steps
        * targs.world_size
        * train_ds.blocks.shape[1]
    )
    rows = [("source (dense, before)", base["loss"], ""), ("MoE at start (upcycled)", start_eval["loss"], "")]
    if "dense" in results:
        rows.append((f"dense, +{steps} steps", results["dense"]["eval_loss"], ""))
    rows.append((f"MoE, +{steps} steps", results["moe"]["eval_loss"], ""))
    log("")
    log(
        f"held-out LM loss (eval mode, {int(base['tokens']):,} "
        f"tokens), after {steps} steps = {tokens:,} tokens each:"
    )
    for name, loss, _ in rows:
        log(f"  {name:28s} {loss:.4f}  ppl {math.exp(loss):8.2f}")
    log("expert load on held-out text (max/mean, cv, min/mean):")
    for i, m in load.items():
        log(f"  layer {i}: {m['load_max_over_mean']:.2f}  {m['load_cv']:.3f}  {m['load_min']:.2f}")

    metrics = {
        "source_eval_loss": round(base["loss"], 4),
        "source_doc_bits_per_byte": round(source_judged["doc_bits_per_byte"], 4),
        "upcycled_start_doc_bits_per_byte": round(start_judged["doc_bits_per_byte"], 4),
        "upcycled_start_agreement": round(start_judged["agreement_fraction"], 4),
        "moe_doc_bits_per_byte": round(results["moe"]["doc_bits_per_byte"], 4),
        "moe_agreement": round(results["moe"]["agreement_fraction"], 4),
        "moe_next_line_match": round(results["moe"]["next_line_match"], 4),
        "moe_kl_to_source": round(results["moe"]["kl_to_source"], 4),
        "upcycled_start_eval_loss": round(start_eval["loss"], 4),
        "moe_eval_loss": round(results["moe"]["eval_loss"], 4),
        "moe_eval_perplexity": round(results["moe"]["eval_perplexity"], 2),
        "train_steps": steps,
        "train_tokens": tokens,
        "total_params": cost_moe.total_params,
        "active_params": cost_moe.active_params,
    }
    if "dense" in results:
        metrics["dense_continued_eval_loss"] = round(results["dense"]["eval_loss"], 4)
        metrics["dense_continued_doc_bits_per_byte"] = round(results["dense"]["doc_bits_per_byte"], 4)
        metrics["dense_continued_agreement"] = round(results["dense"]["agreement_fraction"], 4)
    if is_main:
        lineage = moe.config.hf_hybrid_lineage
        lineage.setdefault("base_model", str(source))
        lineage["source"] = str(source)
        lineage["training"] = {
            "recipe": "recipes/upcycle",
            "config": Path(args.config).name,
            "data": data_name,
            "steps": steps,
            "tokens": tokens,
            "learning_rate": targs.learning_rate,
            "block_size": train_ds.blocks.shape[1],
        }
        lineage["metrics"] = metrics
        model_dir = output_dir / "model"
        moe.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        summary = {
            "metrics": metrics,
            "results": results,
            "exact_start": exact,
            "start": {**start_eval, **start_judged},
            "source_judged": source_judged,
            "options": opts.as_dict(),
            "wall_seconds": round(time.time() - start, 1),
        }
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        log(
            f"saved the MoE (model card, lineage, metrics) to {model_dir}; metrics in "
            f"{output_dir / 'metrics.json'}"
        )
    return {
        "metrics": metrics,
        "results": results,
        "exact_start": exact,
        "hf_hybrid_version": hf_hybrid.__version__,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
