"""Hybridize a dense checkpoint and recover its quality by distillation (Mamba-in-Llama / LoLCATs style).

    python recipes/hybridize/train.py --config recipes/hybridize/config.yaml --source SRC --output DST
        [--pattern "5:1 mamba2:attention"] [--attention-layers 2,5 --mixer gated_deltanet]
        [--stage1-steps N] [--stage2-steps N] [--no-scratch] [--overwrite]

Steps:
0. load the source (hf_hybrid, or Llama / Qwen2 / Qwen3 / Mistral imported on the way) in fp32 with its
   tokenizer; training samples: ``data.mode: documents`` (default; ``data.document_unit`` documents
   packed into rows of ``data.context`` tokens with boundaries, each from its start:
   ``hf_hybrid.data.PackedDocuments``) or ``blocks`` (contiguous blocks of the joined text); held-out:
   blocks of ``data.context`` tokens (perplexity, KL) and the held-out text itself
   (``hf_hybrid.evaluation.ConversionEval``: greedy agreement with the source, next-line match, per-line
   bits/byte); measure the source;
1. choose the layers that stay attention (``hybridize.pattern`` / ``attention_layers``, or
   ``select.num_attention``: each attention layer replaced alone, ranked by the KL to the source — the ranking
   is printed) and hybridize (``hf_hybrid.convert.hybridize``: q/k/v/o inherited; the per-mixer statement is
   printed and saved);
2. **stage 1, attention transfer** (``hf_hybrid.distill.AttentionTransfer`` with a plain ``Trainer``): teacher
   frozen, only the new mixers train, on the normalised MSE to their attention layer's output given the
   teacher's inputs; held-out nMSE per layer before and after;
3. **stage 2, distillation** (``hf_hybrid.distill.DistillationTrainer``): KL to the teacher's logits (+
   optional LM loss), the whole student (``stage2.train: full``) or a LoRA adapter (``lora``, merged before
   saving);
4. **from scratch**: the student's architecture from random init, trained on the LM loss with the same number
   of tokens as stages 1 + 2 together (``scratch.enabled``);
5. after every stage: held-out perplexity, KL to the source, greedy agreement / next-line match with the
   source and per-line bits/byte (``hf_hybrid.evaluation``); cache bytes per token at 32K before / after
   (``hf-hybrid inspect``); the student is saved to ``--output`` with its tokenizer, the per-stage metrics in
   the card's lineage, and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, Trainer

from hf_hybrid.convert.checkpoint import parse_layers
from hf_hybrid.convert.hybridize import (
    format_ranking,
    format_statements,
    hybridize_model,
    rank_layers,
)
from hf_hybrid.convert.source import load_source
from hf_hybrid.cost import estimate_cost, format_bytes
from hf_hybrid.data import (
    add_data_mode_arguments,
    apply_data_arguments,
    build_train_dataset,
    recipe_blocks,
    recipe_source,
)
from hf_hybrid.distill import (
    AttentionTransfer,
    TransferTrainer,
    distill_stage,
    freeze_all_but,
    transfer_error,
)
from hf_hybrid.evaluation import ConversionEval
from hf_hybrid.modeling_hybrid import HybridForCausalLM
from hf_hybrid.training import training_arguments, write_summary

LONG_CONTEXT = 32768
# The packed rows carry position_ids (the document boundaries), which the Trainer would drop for a model whose
# forward names them only through **kwargs (AttentionTransfer); the datasets hold only model inputs.
KEEP_COLUMNS = {"remove_unused_columns": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")), help="recipe YAML")
    p.add_argument(
        "--source",
        default=None,
        help="source checkpoint directory (default: the config's `source`)",
    )
    p.add_argument("--output", default=None, help="where the student is saved (default: output_dir/model)")
    p.add_argument("--pattern", default=None, help="override hybridize.pattern")
    p.add_argument("--attention-layers", default=None, help="override hybridize.attention_layers (e.g. 2,5)")
    p.add_argument("--mixer", default=None, help="override hybridize.mixer")
    p.add_argument("--num-attention", type=int, default=None, help="override select.num_attention")
    p.add_argument("--stage1-steps", type=int, default=None)
    p.add_argument("--stage2-steps", type=int, default=None)
    p.add_argument("--stage2-train", choices=("full", "lora"), default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--eval-blocks", type=int, default=None)
    p.add_argument("--max-train-chars", type=int, default=None)
    add_data_mode_arguments(p)
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    p.add_argument(
        "--no-inherit",
        action="store_true",
        help="ablation: the new mixers start from random init (the model's own) instead of the attention",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="override every section's seed (hybridize and the layer ranking, stage1, stage2, scratch)",
    )
    p.add_argument("--output-dir", default=None, help="override output_dir (trainer files, metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def apply_overrides(recipe: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    r = copy.deepcopy(recipe)
    for section in ("hybridize", "select", "data", "stage1", "stage2", "scratch", "eval"):
        r[section] = dict(r.get(section) or {})
    h = r["hybridize"]
    if args.pattern is not None:
        h.update(pattern=args.pattern, attention_layers=None)
    if args.attention_layers is not None:
        h.update(attention_layers=list(parse_layers(args.attention_layers) or ()), pattern=None)
    if args.mixer is not None:
        h["mixer"] = args.mixer
    if args.num_attention is not None:
        r["select"]["num_attention"] = args.num_attention
        h.update(pattern=None, attention_layers=None)
    apply_data_arguments(
        r["data"], args, ("context", "eval_blocks", "max_train_chars", "mode", "document_unit")
    )
    if args.stage1_steps is not None:
        r["stage1"]["max_steps"] = args.stage1_steps
    if args.stage2_steps is not None:
        r["stage2"]["max_steps"] = args.stage2_steps
    if args.stage2_train is not None:
        r["stage2"]["train"] = args.stage2_train
    if args.no_scratch:
        r["scratch"]["enabled"] = False
    if args.no_inherit:
        r["hybridize"]["inherit"] = False
    if args.seed is not None:
        for section in ("hybridize", "stage1", "stage2", "scratch"):
            r[section]["seed"] = args.seed
    return r


def row_summary(row: dict[str, float]) -> str:
    text = f"ppl {row['eval_perplexity']:.2f}"
    if "kl_to_source" in row:
        text += (
            f", KL {row['kl_to_source']:.4f}, agreement {row['agreement_fraction']:.3f} "
            f"({row['agreement_tokens']:.1f} tokens), next line {row['next_line_match']:.3f}"
        )
    return text + f", doc bits/byte {row['doc_bits_per_byte']:.4f}"


def cache_per_token(config, context: int = LONG_CONTEXT) -> float:
    return estimate_cost(config, contexts=(context,)).cache_bytes(context) / context


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = apply_overrides(yaml.safe_load(Path(args.config).read_text()), args)
    h_cfg, sel_cfg, data_cfg = recipe["hybridize"], recipe["select"], recipe["data"]
    s1_cfg, s2_cfg, scratch_cfg = recipe["stage1"], recipe["stage2"], recipe["scratch"]
    try:
        source = recipe_source(args.source or recipe.get("source", "auto"))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/hybridize"))
    final_dir = Path(args.output) if args.output else output_dir / "model"
    for path in {output_dir, final_dir}:
        if path.exists() and any(path.iterdir()):
            if not args.overwrite:
                raise SystemExit(
                    f"{path} exists and is not empty; pass --overwrite or choose another directory"
                )
            shutil.rmtree(path)
    output_dir.mkdir(parents=True, exist_ok=True)
    eval_bs = int(recipe.get("eval_batch_size", 4))
    start = time.time()
    log = print

    # ---- 0. source and data --------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    teacher, source_dtype = load_source(source, dtype=torch.float32)
    context = int(data_cfg.get("context", 256))
    # contiguous blocks: the held-out perplexity blocks, and the training blocks the layer ranking uses
    block_ds, eval_ds, splits = recipe_blocks(tokenizer, data_cfg, context)
    data_mode, unit = data_cfg.get("mode", "documents"), data_cfg.get("document_unit", "paragraph")
    train_ds, collator = build_train_dataset(
        tokenizer, context, splits, mode=data_mode, unit=unit, max_chars=data_cfg.get("max_train_chars")
    )
    trained_on = (
        f"{len(train_ds)} rows of {context} packed from {train_ds.num_documents:,} {unit} documents "
        f"({train_ds.num_predicted:,} predicted tokens)"
        if data_mode == "documents"
        else f"{len(train_ds)} contiguous blocks of {context}"
    )
    log(
        f"source: {source} ({source_dtype}); data {splits.name}: training on {trained_on}; "
        f"{eval_ds.num_tokens:,} held-out ({len(eval_ds)} blocks of {context})"
    )
    judge = ConversionEval.from_recipe(
        teacher, tokenizer, splits.eval, eval_ds.blocks, recipe["eval"], kl_batch_size=eval_bs
    )
    log(f"judged against the source on: {judge.describe()}")
    rows: dict[str, dict[str, float]] = {}
    rows["source"] = judge.measure_all(teacher, eval_ds, batch_size=eval_bs, is_source=True)
    log(f"source: held-out {row_summary(rows['source'])}")

    # ---- 1. layers and hybridize ---------------------------------------------------------------------------
    ranking = None
    pattern, attention_layers, mixer = h_cfg.get("pattern"), h_cfg.get("attention_layers"), h_cfg.get("mixer")
    if sel_cfg.get("num_attention") is not None:
        mixer = mixer or "gated_deltanet"
        ranking = rank_layers(
            teacher,
            # ranked on training blocks: the held-out blocks are what the table then reports on
            block_ds.blocks[: int(sel_cfg.get("blocks", 4))],
            mixer=mixer,
            criterion=sel_cfg.get("criterion", "kl"),
            mixer_config=h_cfg.get("mixer_config"),
            seed=int(h_cfg.get("seed", 0)),
        )
        k = int(sel_cfg["num_attention"])
        log(f"layer ranking ({sel_cfg.get('criterion', 'kl')}, each layer replaced alone by {mixer}):")
        log(format_ranking(ranking, k))
        attention_layers, pattern = sorted(r["layer"] for r in ranking[:k]), None
    student = hybridize_model(
        teacher,
        pattern=pattern,
        attention_layers=attention_layers,
        mixer=mixer,
        mixer_config=h_cfg.get("mixer_config") or None,
        seed=int(h_cfg.get("seed", 0)),
    )
    lineage = student.config.hf_hybrid_lineage
    replaced = sorted(int(i) for i in lineage["options"]["replaced"])
    if not h_cfg.get("inherit", True):
        # Ablation: every new mixer from the model's own random init (a fresh model of the same config, seed +
        # 1).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(h_cfg.get("seed", 0)) + 1)
            fresh = HybridForCausalLM(student.config)
        for i in replaced:
            student.model.layers[i].mixer.load_state_dict(fresh.model.layers[i].mixer.state_dict())
        del fresh
        lineage["init"] = {
            m: {"new": ["every tensor: the model's random init (ablation, --no-inherit)"]}
            for m in lineage["init"]
        }
        lineage["options"]["inherit"] = False
    log(
        f"hybridized: layers {replaced} -> {lineage['options']['replaced']}, attention kept at "
        f"{lineage['options']['attention_layers']}"
    )
    log(format_statements(lineage["init"]))
    rows["init"] = judge.measure_all(student, eval_ds, batch_size=eval_bs)
    nmse_init = transfer_error(teacher, student, replaced, eval_ds.blocks, batch_size=eval_bs)
    log(
        f"student at init: {row_summary(rows['init'])}, "
        f"nMSE { ({i: round(v, 4) for i, v in nmse_init.items()}) }"
    )

    # ---- 2. stage 1: attention transfer --------------------------------------------------------------------
    trainable, frozen = freeze_all_but(student, replaced)
    transfer = AttentionTransfer(teacher, student, replaced)
    t0 = time.time()
    trainer = TransferTrainer(
        model=transfer,
        args=training_arguments(str(output_dir / "trainer-stage1"), **{**KEEP_COLUMNS, **s1_cfg}),
        train_dataset=train_ds,
        data_collator=collator,
    )
    trainer.train()
    s1_seconds, s1_steps = time.time() - t0, trainer.state.global_step
    s1_logs = trainer.state.log_history
    for p in student.parameters():
        p.requires_grad_(True)
    nmse_s1 = transfer_error(teacher, student, replaced, eval_ds.blocks, batch_size=eval_bs)
    rows["stage1"] = judge.measure_all(student, eval_ds, batch_size=eval_bs)
    log(
        f"stage 1: {s1_steps} steps in {s1_seconds:.0f} s ({trainable:,} params trained, {frozen:,} frozen); "
        f"{row_summary(rows['stage1'])}, "
        f"nMSE { ({i: round(v, 4) for i, v in nmse_s1.items()}) }"
    )

    # ---- 3. stage 2: distillation --------------------------------------------------------------------------
    mode = s2_cfg.get("train", "full")
    t0 = time.time()
    student, trainer = distill_stage(
        student,
        teacher,
        train_ds,
        collator,
        s2_cfg,
        output_dir=str(output_dir / "trainer-stage2"),
        section="stage2",
    )
    s2_seconds, s2_steps = time.time() - t0, trainer.state.global_step
    s2_logs = trainer.state.log_history
    rows["stage2"] = judge.measure_all(student, eval_ds, batch_size=eval_bs)
    log(f"stage 2 ({mode}): {s2_steps} steps in {s2_seconds:.0f} s; {row_summary(rows['stage2'])}")

    # ---- 4. from scratch, same tokens ----------------------------------------------------------------------
    s1_tokens = s1_steps * int(s1_cfg.get("per_device_train_batch_size", 16)) * context
    s2_tokens = s2_steps * int(s2_cfg.get("per_device_train_batch_size", 16)) * context
    scratch_logs = None
    if scratch_cfg.pop("enabled", True):
        bs = int(scratch_cfg.get("per_device_train_batch_size", 16))
        steps = max(1, round((s1_tokens + s2_tokens) / (bs * context)))
        torch.manual_seed(int(scratch_cfg.get("seed", 0)))
        cfg = copy.deepcopy(student.config)
        cfg.hf_hybrid_lineage = None
        scratch = HybridForCausalLM(cfg)
        t0 = time.time()
        trainer = Trainer(
            model=scratch,
            args=training_arguments(
                str(output_dir / "trainer-scratch"), **{**KEEP_COLUMNS, **scratch_cfg, "max_steps": steps}
            ),
            train_dataset=train_ds,
            data_collator=collator,
        )
        trainer.train()
        scratch_logs = trainer.state.log_history
        rows["scratch"] = judge.measure_all(scratch, eval_ds, batch_size=eval_bs)
        log(
            f"from scratch: {steps} steps ({steps * bs * context:,} tokens) in {time.time() - t0:.0f} s; "
            f"{row_summary(rows['scratch'])}"
        )

    # ---- 5. table, card, files -----------------------------------------------------------------------------
    before, after = cache_per_token(teacher.config), cache_per_token(student.config)
    label = pattern or f"attention at {lineage['options']['attention_layers']}, {mixer}"
    if not h_cfg.get("inherit", True):
        label += " (random init, no inheritance)"
    log("")
    log(
        "| layout | source | init | stage 1 | stage 2 | scratch "
        "(same tokens) | cache/token @32K before → after |"
    )
    log("|---|---:|---:|---:|---:|---:|---|")
    log(
        f"| {label} | {rows['source']['eval_perplexity']:.2f} | {rows['init']['eval_perplexity']:.2f} | "
        f"{rows['stage1']['eval_perplexity']:.2f} | {rows['stage2']['eval_perplexity']:.2f} | "
        f"{rows['scratch']['eval_perplexity'] if 'scratch' in rows else float('nan'):.2f} | "
        f"{format_bytes(before)} → {format_bytes(after)} |"
    )
    log("")
    log("| | source | init | stage 1 | stage 2 |")
    log("|---|---:|---:|---:|---:|")
    for key, name, digits in (
        ("kl_to_source", "KL to the source", 4),
        ("agreement_fraction", "greedy agreement (fraction)", 3),
        ("agreement_tokens", f"greedy agreement (tokens of {judge.max_new_tokens})", 2),
        ("next_line_match", "next line = source's", 3),
        ("next_line_reference", "next line = held-out text", 3),
        ("doc_bits_per_byte", "per-line bits/byte", 4),
        ("doc_bits_per_byte_first16", "  of which first 16 tokens", 4),
    ):
        cells = [rows[r].get(key) for r in ("source", "init", "stage1", "stage2")]
        log(f"| {name} | " + " | ".join("–" if c is None else f"{c:.{digits}f}" for c in cells) + " |")

    lineage.setdefault("base_model", str(source))
    lineage["source"] = str(source)
    if ranking is not None:
        lineage["options"]["selection"] = {"criterion": sel_cfg.get("criterion", "kl"), "ranking": ranking}
    lineage["training"] = {
        "recipe": "recipes/hybridize",
        "config": Path(args.config).name,
        "data": splits.name,
        "context": context,
        "samples": data_mode if data_mode == "blocks" else f"documents ({unit}), packed with boundaries",
        "stage1": {
            "objective": "attention transfer (normalised MSE, teacher inputs, new mixers only)",
            "steps": s1_steps,
            "tokens": s1_tokens,
            "learning_rate": s1_cfg.get("learning_rate"),
            "trainable_params": trainable,
        },
        "stage2": {
            "objective": f"KL to the teacher (T={s2_cfg.get('temperature', 1.0)}) + "
            f"{s2_cfg.get('lm_weight', 0.0)} × LM",
            "train": mode,
            "steps": s2_steps,
            "tokens": s2_tokens,
            "learning_rate": s2_cfg.get("learning_rate"),
        },
    }
    metrics = {
        "context": context,
        "source_perplexity": round(rows["source"]["eval_perplexity"], 3),
        "init_perplexity": round(rows["init"]["eval_perplexity"], 3),
        "stage1_perplexity": round(rows["stage1"]["eval_perplexity"], 3),
        "stage2_perplexity": round(rows["stage2"]["eval_perplexity"], 3),
        "init_kl": round(rows["init"]["kl_to_source"], 4),
        "stage1_kl": round(rows["stage1"]["kl_to_source"], 4),
        "stage2_kl": round(rows["stage2"]["kl_to_source"], 4),
        "stage1_nmse_before": {str(i): round(v, 4) for i, v in nmse_init.items()},
        "stage1_nmse_after": {str(i): round(v, 4) for i, v in nmse_s1.items()},
        **{
            f"{stage}_{key}": round(rows[stage][key], 4)
            for stage in ("source", "init", "stage1", "stage2")
            for key in (
                "agreement_fraction",
                "next_line_match",
                "doc_bits_per_byte",
            )
            if key in rows[stage]
        },
        "cache_bytes_per_token_32k_source": round(before, 1),
        "cache_bytes_per_token_32k": round(after, 1),
    }
    if "scratch" in rows:
        metrics["scratch_perplexity_same_tokens"] = round(rows["scratch"]["eval_perplexity"], 3)
    lineage["metrics"] = metrics
    student.config.hf_hybrid_lineage = lineage
    student.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    log(
        f"saved {final_dir} (card with lineage and metrics); "
        f"cache: hf-hybrid inspect {final_dir} --context 32K"
    )

    summary = {
        "source": str(source),
        "layout": label,
        "rows": rows,
        "metrics": metrics,
        "trainer_logs": {"stage1": s1_logs, "stage2": s2_logs, "scratch": scratch_logs},
    }
    return write_summary(output_dir, summary, start=start, log=log)


if __name__ == "__main__":
    main(sys.argv[1:])
