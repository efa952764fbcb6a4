"""Convert a dense checkpoint to MLA at several compression levels and heal each by distillation.

    python recipes/mla/train.py --config recipes/mla/config.yaml [--source SRC] [--levels lossless,r32-rope16]
        [--seeds 0,1,2] [--steps N] [--heal-train full|lora] [--save] [--overwrite]

Steps:
0. load the source (hf_hybrid, or Llama / Qwen2 / Qwen3 / Mistral imported on the way) in fp32 with its
   tokenizer; healing samples: ``data.mode: documents`` (default; ``data.document_unit`` documents packed
   into rows of ``data.context`` tokens with boundaries, each from its start) or ``blocks`` (contiguous
   blocks of the joined text); held-out blocks of ``data.context`` tokens (perplexity, KL) and the held-out
   text itself (``hf_hybrid.evaluation.ConversionEval``: greedy agreement with the source, next-line match,
   per-line bits/byte); the source measured;
1. for each level (``levels:``, ``MLAOptions`` fields): convert every attention layer
   (``hf_hybrid.convert.mla.mla_model``; calibration activations from ``calibration_blocks`` training blocks
   when the level asks for them); held-out perplexity, KL and the generation metrics at init;
2. for each seed: heal with ``hf_hybrid.distill.DistillationTrainer`` (KL to the source's logits, + optional
   LM loss; the whole student or a LoRA adapter, merged after) — the project's one training stack; held-out
   perplexity and KL after;
   An exact start (``--lossless``) is not healed: it is the source already;
3. the table: per level, KV bytes per token (the growing cache, bf16) and the whole cache of one sequence at
   32K from the cost inspector, perplexity / KL at init and after healing (mean ± half the spread over seeds),
   tokens spent; ``metrics.json`` with every number and Trainer log.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer

from hf_hybrid.convert.mla import MLAOptions, cache_bytes_at, kv_bytes_per_token, mla_model
from hf_hybrid.convert.source import load_source
from hf_hybrid.cost import format_bytes
from hf_hybrid.data import (
    add_data_mode_arguments,
    apply_data_arguments,
    build_train_dataset,
    find_shared_dir,
    recipe_blocks,
)
from hf_hybrid.distill import distill_stage
from hf_hybrid.evaluation import ConversionEval
from hf_hybrid.training import write_summary

REPO = Path(__file__).resolve().parents[2]
LONG_CONTEXT = 32768


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")), help="recipe YAML")
    p.add_argument("--source", default=None, help="override source (checkpoint directory)")
    p.add_argument("--levels", default=None, help="comma-separated level names of the config (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated healing seeds (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="override heal.max_steps")
    p.add_argument("--heal-train", choices=("full", "lora"), default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--eval-blocks", type=int, default=None)
    p.add_argument("--max-train-chars", type=int, default=None)
    add_data_mode_arguments(p)
    p.add_argument("--save", action="store_true", help="save each healed model")
    p.add_argument("--no-heal", action="store_true", help="conversion and init metrics only (ablations)")
    p.add_argument("--output-dir", default=None, help="override output_dir (trainer files, metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def resolve_path(value: str) -> Path:
    """A path as given, else relative to the repository root; ``../shared/...`` also through
    ``find_shared_dir`` (``$HF_HYBRID_SHARED_DIR`` for a checkout elsewhere)."""
    path = Path(value)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    if len(parts) > 2 and parts[:2] == ("..", "shared") and not (REPO / path).exists():
        shared = find_shared_dir()
        if shared is not None:
            return shared.joinpath(*parts[2:])
    return REPO / path


def apply_overrides(recipe: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    r["data"] = dict(r.get("data") or {})
    r["heal"] = dict(r.get("heal") or {})
    levels = dict(r.get("levels") or {})
    if args.levels is not None:
        names = [n.strip() for n in args.levels.split(",") if n.strip()]
        unknown = [n for n in names if n not in levels]
        if unknown:
            raise SystemExit(f"--levels {unknown} are not in the config; choose from: {', '.join(levels)}")
        levels = {n: levels[n] for n in names}
    r["levels"] = levels
    if args.seeds is not None:
        r["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    apply_data_arguments(
        r["data"], args, ("context", "eval_blocks", "max_train_chars", "mode", "document_unit")
    )
    if args.steps is not None:
        r["heal"]["max_steps"] = args.steps
    if args.heal_train is not None:
        r["heal"]["train"] = args.heal_train
    if args.save:
        r["save"] = True
    if args.no_heal:
        r["seeds"] = []
    return r


def heal(student, teacher, train_ds, collator, cfg: dict[str, Any], seed: int, output_dir: Path):
    """Stage-2 distillation (KL to the source) with the project's DistillationTrainer; returns the healed
    model (LoRA merged), steps and the Trainer log."""
    model, trainer = distill_stage(
        student, teacher, train_ds, collator, cfg, output_dir=str(output_dir), section="heal", seed=seed
    )
    return model, trainer.state.global_step, trainer.state.log_history


def mean_spread(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = apply_overrides(yaml.safe_load(Path(args.config).read_text()), args)
    data_cfg, heal_cfg, levels = recipe["data"], recipe["heal"], recipe["levels"]
    seeds = list(recipe.get("seeds") if recipe.get("seeds") is not None else [0])
    source = resolve_path(args.source or recipe["source"])
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/mla"))
    if output_dir.exists() and any(output_dir.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{output_dir} exists and is not empty; pass --overwrite or choose another")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    eval_bs = int(recipe.get("eval_batch_size", 4))
    start = time.time()
    log = print
    options = {name: MLAOptions(**{**opts, "layers": None}) for name, opts in levels.items()}
    for opts in options.values():
        opts.validate()  # every level checked before any work

    # ---- 0. source and data --------------------------------------------------------------------------------
    if not (source / "tokenizer_config.json").is_file() and not (source / "tokenizer.json").is_file():
        raise SystemExit(f"{source} has no tokenizer; the recipe tokenises with the checkpoint's own")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    teacher, source_dtype = load_source(source, dtype=torch.float32)
    context = int(data_cfg.get("context", 256))
    # contiguous blocks: the held-out perplexity blocks, and the calibration blocks of the SVDs
    block_ds, eval_ds, splits = recipe_blocks(tokenizer, data_cfg, context)
    calibration = block_ds.blocks[: int(recipe.get("calibration_blocks", 8))]
    data_mode, unit = data_cfg.get("mode", "documents"), data_cfg.get("document_unit", "paragraph")
    train_ds, collator = build_train_dataset(
        tokenizer, context, splits, mode=data_mode, unit=unit, max_chars=data_cfg.get("max_train_chars")
    )
    trained_on = (
        f"{len(train_ds)} rows of {context} packed from {train_ds.num_documents:,} {unit} documents"
        if data_mode == "documents"
        else f"{len(train_ds)} contiguous blocks of {context}"
    )
    log(
        f"source: {source} ({source_dtype}); data {splits.name}: healing on {trained_on}; "
        f"{eval_ds.num_tokens:,} held-out ({len(eval_ds)} blocks of {context})"
    )
    judge = ConversionEval.from_recipe(
        teacher, tokenizer, splits.eval, eval_ds.blocks, recipe.get("eval"), kl_batch_size=eval_bs
    )
    log(f"judged against the source on: {judge.describe()}")
    src_row = judge.measure_all(teacher, eval_ds, batch_size=eval_bs, is_source=True)
    src_kv, src_cache = kv_bytes_per_token(teacher.config), cache_bytes_at(teacher.config, LONG_CONTEXT)
    log(
        f"source: held-out ppl {src_row['eval_perplexity']:.2f}; KV {src_kv} B/token, "
        f"{format_bytes(src_cache)} @32K"
    )

    # ---- 1-2. convert, measure, heal, measure --------------------------------------------------------------
    results: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        t0 = time.time()
        converted = mla_model(teacher, opts, calibration=calibration if opts.needs_calibration else None)
        init = judge.measure_all(converted, eval_ds, batch_size=eval_bs)
        kv, cache = kv_bytes_per_token(converted.config), cache_bytes_at(converted.config, LONG_CONTEXT)
        log(
            f"[{name}] converted in {time.time() - t0:.1f} s: KV {kv} B/token ({100 * kv / src_kv:.1f} %), "
            f"{format_bytes(cache)} @32K; init ppl {init['eval_perplexity']:.2f}, "
            f"KL {init['kl_to_source']:.4f}, agreement {init['agreement_fraction']:.3f}, next line "
            f"{init['next_line_match']:.3f}, doc bits/byte {init['doc_bits_per_byte']:.4f}"
        )
        runs = []
        if converted.config.hf_hybrid_lineage["options"]["exact_start"]:
            # The source's function already: KL = 0, and Adam would turn its ~0 gradients into lr-sized steps
            # away from it (measured: ppl 45.42 -> 45.19, KL 0 -> 0.016 after 4 steps). Nothing to heal.
            log(f"[{name}] exact start: not healed")
            runs.append({"seed": None, "steps": 0, "tokens": 0, **init, "trainer_log": []})
        for seed in [] if runs else seeds:
            student = copy.deepcopy(converted)
            t0 = time.time()
            healed, steps, logs = heal(
                student,
                teacher,
                train_ds,
                collator,
                heal_cfg,
                seed,
                output_dir / "trainer" / f"{name}-seed{seed}",
            )
            after = judge.measure_all(healed, eval_ds, batch_size=eval_bs)
            tokens = steps * int(heal_cfg.get("per_device_train_batch_size", 8)) * context
            log(
                f"[{name}] seed {seed}: healed {steps} steps ({tokens:,} tokens) in "
                f"{time.time() - t0:.0f} s; "
                f"ppl {after['eval_perplexity']:.2f}, KL {after['kl_to_source']:.4f}, agreement "
                f"{after['agreement_fraction']:.3f}, next line {after['next_line_match']:.3f}, doc bits/byte "
                f"{after['doc_bits_per_byte']:.4f}"
            )
            runs.append({"seed": seed, "steps": steps, "tokens": tokens, **after, "trainer_log": logs})
            if recipe.get("save"):
                healed.config.hf_hybrid_lineage["training"] = {
                    "recipe": "recipes/mla",
                    "objective": f"KL to the source (T={heal_cfg.get('temperature', 1.0)}) + "
                    f"{heal_cfg.get('lm_weight', 0.0)} × LM",
                    "train": heal_cfg.get("train", "full"),
                    "steps": steps,
                    "tokens": tokens,
                    "seed": seed,
                }
                healed.save_pretrained(output_dir / f"{name}-seed{seed}")
                tokenizer.save_pretrained(output_dir / f"{name}-seed{seed}")
        results[name] = {
            "options": opts.as_dict(),
            "kv_bytes_per_token": kv,
            "cache_bytes_32k": cache,
            "init": init,
            "healed": runs,
        }

    # ---- 3. table ------------------------------------------------------------------------------------------
    log("")
    log(
        "| level | KV B/token (bf16) | cache @32K | ppl init | ppl healed | KL init | KL healed | "
        "healing tokens |"
    )
    log("|---|---:|---:|---:|---:|---:|---:|---:|")
    log(
        f"| source | {src_kv} | {format_bytes(src_cache)} | {src_row['eval_perplexity']:.2f} "
        "| – | – | – | – |"
    )
    for name, r in results.items():
        ppl = [x["eval_perplexity"] for x in r["healed"]] or [float("nan")]
        kl = [x["kl_to_source"] for x in r["healed"]] or [float("nan")]
        log(
            f"| {name} | {r['kv_bytes_per_token']} ({100 * r['kv_bytes_per_token'] / src_kv:.1f} %) | "
            f"{format_bytes(r['cache_bytes_32k'])} | {r['init']['eval_perplexity']:.2f} | "
            f"{mean_spread(ppl)} | "
            f"{r['init']['kl_to_source']:.4f} | {mean_spread(kl, 4)} | "
            f"{r['healed'][0]['tokens'] if r['healed'] else 0:,} × {len(r['healed'])} |"
        )
    log("")
    log(
        "| level | agreement init | agreement healed | next line init | next line healed | "
        "bits/byte init | bits/byte healed |"
    )
    log("|---|---:|---:|---:|---:|---:|---:|")
    log(f"| source | – | – | – | – | {src_row['doc_bits_per_byte']:.4f} | – |")
    for name, r in results.items():
        cells = []
        for key, digits in (
            ("agreement_fraction", 3),
            ("next_line_match", 3),
            ("doc_bits_per_byte", 4),
        ):
            healed = [x[key] for x in r["healed"]] or [float("nan")]
            cells += [f"{r['init'][key]:.{digits}f}", mean_spread(healed, digits)]
        log(f"| {name} | " + " | ".join(cells) + " |")
    summary = {
        "source": str(source),
        "context": context,
        "samples": data_mode if data_mode == "blocks" else f"documents ({unit}), packed with boundaries",
        "source_metrics": src_row,
        "seeds": seeds,
        "source_perplexity": src_row["eval_perplexity"],
        "source_kv_bytes_per_token": src_kv,
        "source_cache_bytes_32k": src_cache,
        "levels": results,
    }
    return write_summary(output_dir, summary, start=start, log=log)


if __name__ == "__main__":
    main(sys.argv[1:])
