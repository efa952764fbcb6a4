"""Convert a dense checkpoint to DeepSeek Sparse Attention by continued training (DeepSeek-V3.2-Exp's two
stages).

    python recipes/dsa/train.py --config recipes/dsa/config.yaml [--source DIR] [--topk 128,256]
                                [--warmup-steps N] [--sparse-steps N] [--eval-blocks N] [--output-dir DIR]
                                [--overwrite]

Steps (DeepSeek-V3.2-Exp's continued pre-training, at toy scale):
0. load the source (hf_hybrid, or Llama / Qwen2 / Qwen3 / Mistral imported on the way) in fp32 with its
   tokenizer; cut the local text into blocks of ``data.context`` tokens; measure the dense source's held-out
   perplexity; convert every attention / MLA layer to DSA (``hf_hybrid.convert.dsa``: weights copied, fresh
   indexers).
1. **dense warm-up**: every weight but the indexers frozen (``requires_grad=False``),
   ``model.dsa_mode("dense_warmup")``: attention stays dense and the loss is the indexer's KL to the
   head-summed main attention alone (lr 1e-3, DeepSeek's). The warm-up does not depend on ``index_topk``, so
   it runs once for every k.
2. **sparse training**, once per k: ``model.dsa_mode("sparse", index_topk=k)``, everything trainable, loss =
   LM + KL over the selected set; the indexer's input is detached (the model does that), so the LM loss trains
   the model and the KL the indexer. DeepSeek's lr 7.3e-6 was ~1/30 of V3's pre-training peak (2.2e-4); the
   config scales it the same way for a toy model pre-trained near 3e-3 (1e-4).

Measured before warm-up, after warm-up and after the sparse stage, for each k, on the held-out blocks in eval
mode (sparse): indexer recall@k against the top-k of the true head-summed attention and the attention mass
inside the selected set (the DSA mixers' ``collect_metrics``; averaged over layers and queries, and also over
the queries that see more than k keys — the first k queries of a block keep every key, so they score 1 by
construction), and the held-out perplexity of the sparse model against the dense source at the same context,
and of the same weights with dense attention (the sparse stage is also continued LM training — here at a
longer context than the toy source was trained on — so this column separates the cost of the selection from
the gain of the training). Printed as a table, logged through the Trainer (``log_history``) and written to
``metrics.json``; each final model is saved in ``"sparse"`` mode with its lineage and metrics in the model
card.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, Trainer, default_data_collator

from hf_hybrid.convert.dsa import (
    DSAOptions,
    convert_model_to_dsa,
    freeze_all_but_indexers,
    set_collect_metrics,
    unfreeze_all,
)
from hf_hybrid.convert.source import load_source
from hf_hybrid.cost import estimate_cost, format_count
from hf_hybrid.data import PackedBlocks, apply_data_arguments, recipe_blocks, recipe_source
from hf_hybrid.evaluation import ConversionEval
from hf_hybrid.training import training_arguments, write_summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")), help="recipe YAML")
    p.add_argument(
        "--source",
        default=None,
        help="source checkpoint directory (default: the config's `source`)",
    )
    p.add_argument("--topk", default=None, help="override convert.index_topk (comma-separated, e.g. 128,256)")
    p.add_argument("--warmup-steps", type=int, default=None, help="override warmup.max_steps")
    p.add_argument("--sparse-steps", type=int, default=None, help="override sparse.max_steps")
    p.add_argument("--eval-blocks", type=int, default=None, help="override data.eval_blocks")
    p.add_argument("--context", type=int, default=None, help="override data.context")
    p.add_argument("--max-train-chars", type=int, default=None, help="override data.max_train_chars")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


class ComponentLossTrainer(Trainer):
    """A ``Trainer`` that also logs the mean ``lm_loss`` and ``indexer_loss`` of the steps since the last log
    (the logged ``loss`` is their weighted sum in the sparse stage and the KL alone in the warm-up)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._components: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            for name in ("lm_loss", "indexer_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._components.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._components:
            logs.update({name: round(sum(v) / len(v), 5) for name, v in self._components.items()})
            self._components = {}
        super().log(logs, start_time)


@torch.no_grad()
def held_out_pass(model, eval_ds: PackedBlocks, batch_size: int) -> tuple[float, dict[str, list[float]]]:
    """Token-weighted mean LM loss over the held-out blocks (eval mode) and the per-forward layer means of the
    DSA statistics the model recorded (empty unless ``collect_metrics`` is on)."""
    total, count = 0.0, 0
    stats: dict[str, list[float]] = {"dsa_recall": [], "dsa_mass": []}
    device = next(model.parameters()).device
    for start in range(0, len(eval_ds), batch_size):
        ids = eval_ds.blocks[start : start + batch_size].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids[:, 1:].numel()
        total += float(out.lm_loss) * n
        count += n
        for name in stats:
            per_layer = (out.layer_stats or {}).get(name)
            if per_layer:
                stats[name].append(sum(per_layer.values()) / len(per_layer))
    return total / count, stats


def measure(
    model, eval_ds: PackedBlocks, *, topk: int | None, batch_size: int = 1, dsa_metrics: bool = True
) -> dict[str, float]:
    """Held-out LM loss / perplexity (eval mode). For DSA models: in sparse mode at ``topk``, with recall@k
    and attention mass in the selection averaged over layers and queries (``*_past_k``: over the queries that
    see more than k keys), and again with dense attention (``dense_attention_*``): the same weights without
    the sparsity, so the cost of the selection is separated from the effect of the training itself."""
    was_training = model.training
    model.eval()
    has_dsa = "dsa" in model.config.mixer_types
    result: dict[str, float] = {}
    try:
        if not has_dsa:
            loss, stats = held_out_pass(model, eval_ds, batch_size)
        else:
            # Run-time modes: the config (what a checkpoint saves) is never touched here.
            with model.dsa_mode("dense"):
                dense_loss, _ = held_out_pass(model, eval_ds, batch_size)
            result["dense_attention_eval_loss"] = dense_loss
            result["dense_attention_eval_perplexity"] = math.exp(min(dense_loss, 80.0))
            with model.dsa_mode("sparse", index_topk=topk):
                set_collect_metrics(model, dsa_metrics)
                try:
                    loss, stats = held_out_pass(model, eval_ds, batch_size)
                finally:
                    set_collect_metrics(model, False)
    finally:
        model.train(was_training)
    result.update(eval_loss=loss, eval_perplexity=math.exp(min(loss, 80.0)))
    T = eval_ds.blocks.shape[1]
    if stats["dsa_recall"]:
        trivially_kept = min(topk, T) / T  # queries t < k see at most k keys: all kept, recall = mass = 1
        for name, key in (("dsa_recall", "recall_at_k"), ("dsa_mass", "attention_mass")):
            mean = sum(stats[name]) / len(stats[name])
            result[key] = mean
            if trivially_kept < 1:
                result[key + "_past_k"] = (mean - trivially_kept) / (1 - trivially_kept)
    return result


def run_stage(model, stage_cfg: dict[str, Any], train_ds, output_dir: Path, name: str):
    targs = training_arguments(str(output_dir / f"trainer-{name}"), **stage_cfg)
    trainer = ComponentLossTrainer(
        model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator
    )
    start = time.time()
    trainer.train()
    return trainer, time.time() - start


def warmup_stage(model, stage_cfg: dict[str, Any], train_ds, output_dir: Path):
    """Stage 1: only the indexers train, on the dense-attention KL; the rest stays bit-identical."""
    trainable, frozen = freeze_all_but_indexers(model)
    try:
        with model.dsa_mode("dense_warmup"):  # back to the saved mode (dense) afterwards
            trainer, seconds = run_stage(model, stage_cfg, train_ds, output_dir, "warmup")
    finally:
        unfreeze_all(model)
    return trainer, seconds, (trainable, frozen)


def sparse_stage(model, stage_cfg: dict[str, Any], train_ds, output_dir: Path, topk: int):
    """Stage 2: sparse attention at ``topk``; LM loss for the model, KL over the selection for the indexer."""
    model.dsa_mode("sparse", index_topk=topk)  # run-time state of this copy from now on
    unfreeze_all(model)
    return run_stage(model, stage_cfg, train_ds, output_dir, f"sparse-k{topk}")


def parse_topk(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = yaml.safe_load(Path(args.config).read_text())
    data_cfg = dict(recipe.get("data") or {})
    conv_cfg = dict(recipe.get("convert") or {})
    warm_cfg = dict(recipe.get("warmup") or {})
    sparse_cfg = dict(recipe.get("sparse") or {})
    try:
        source = recipe_source(args.source or recipe.get("source", "auto"))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/dsa"))
    apply_data_arguments(data_cfg, args, ("eval_blocks", "context", "max_train_chars"))
    if args.warmup_steps is not None:
        warm_cfg["max_steps"] = args.warmup_steps
    if args.sparse_steps is not None:
        sparse_cfg["max_steps"] = args.sparse_steps
    topks = parse_topk(args.topk if args.topk is not None else conv_cfg.pop("index_topk", 256))
    conv_cfg.pop("index_topk", None)
    eval_bs = int(recipe.get("eval_batch_size", 1))

    if output_dir.exists() and any(output_dir.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{output_dir} exists and is not empty; pass --overwrite or choose --output-dir")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = print

    # ---- source, data, conversion --------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    dense, source_dtype = load_source(source, dtype=torch.float32)
    log(f"source: {source} ({source_dtype} weights, trained here in float32)")
    train_ds, eval_ds, splits = recipe_blocks(
        tokenizer, data_cfg, int(data_cfg.get("context", 1024)), log=log
    )
    data_name = splits.name
    context = train_ds.blocks.shape[1]
    dense_eval = measure(dense, eval_ds, topk=None, batch_size=eval_bs)
    # judged against the dense source (hf_hybrid.evaluation); prompts longer than k exercise the selection
    ev = {"prompts": 32, "prompt_lines": 48, "batch_size": 8, **(recipe.get("eval") or {})}
    judge = ConversionEval.from_recipe(
        dense, tokenizer, splits.eval, eval_ds.blocks, ev, kl_batch_size=eval_bs
    )
    dense_eval.update(judge.source_metrics())
    log(
        f"dense source: held-out loss {dense_eval['eval_loss']:.4f}, "
        f"ppl {dense_eval['eval_perplexity']:.2f} at context {context}; per-line bits/byte "
        f"{dense_eval['doc_bits_per_byte']:.4f} ({judge.describe()})"
    )
    judged: dict[str, dict[str, float]] = {}

    def judge_sparse(stage: str, k: int, m) -> None:
        with m.dsa_mode("sparse", index_topk=k):
            judged[f"{stage}, k={k}"] = r = judge.measure(m)
        log(
            f"  k={k:4d} {stage:16s} vs source: KL {r['kl_to_source']:.4f}, greedy agreement "
            f"{r['agreement_fraction']:.3f} ({r['agreement_tokens']:.1f} tokens), next line "
            f"{r['next_line_match']:.3f}; per-line bits/byte {r['doc_bits_per_byte']:.4f}"
        )

    torch.manual_seed(int(conv_cfg.get("seed", 0)))
    model = convert_model_to_dsa(dense, DSAOptions(index_topk=topks[0], **conv_cfg))
    cost_dense = estimate_cost(dense.config, contexts=(context, 131072))
    cost_dsa = estimate_cost(model.config, contexts=(context, 131072))
    log(
        f"converted {model.config.mixer_types.count('dsa')} layers to DSA (base "
        f"{model.config.dsa_base}), indexer {model.config.index_n_heads}×{model.config.index_head_dim}; "
        f"params {format_count(cost_dense.total_params)} -> {format_count(cost_dsa.total_params)}"
    )

    rows: list[dict[str, Any]] = []

    def record(stage: str, k: int, m) -> dict[str, Any]:
        r = {"stage": stage, "topk": k, **measure(m, eval_ds, topk=k, batch_size=eval_bs)}
        rows.append(r)
        log(
            f"  k={k:4d} {stage:16s} recall@k {r['recall_at_k']:.3f} (past k "
            f"{r.get('recall_at_k_past_k', 1):.3f})  mass {r['attention_mass']:.3f} (past k "
            f"{r.get('attention_mass_past_k', 1):.3f})  ppl {r['eval_perplexity']:.2f} (same weights dense "
            f"{r['dense_attention_eval_perplexity']:.2f}, source {dense_eval['eval_perplexity']:.2f})"
        )
        return r

    log("before warm-up:")
    for k in topks:
        record("before warm-up", k, model)
        judge_sparse("before warm-up", k, model)

    # ---- stage 1: dense warm-up (shared by every k) --------------------------------------------------------
    trainer, seconds, (trainable, frozen) = warmup_stage(model, warm_cfg, train_ds, output_dir)
    warm_steps = trainer.state.global_step
    log(
        f"dense warm-up: {warm_steps} steps in "
        f"{seconds:.0f} s, {trainable:,} indexer parameters trained, {frozen:,} frozen"
    )
    log("after warm-up:")
    for k in topks:
        r = record("after warm-up", k, model)
        trainer.log({f"dsa_k{k}/{name}": round(v, 5) for name, v in r.items() if isinstance(v, float)})
    stage_logs = {"warmup": trainer.state.log_history}

    # ---- stage 2: sparse training, per k -------------------------------------------------------------------
    finals = {}
    for k in topks:
        model_k = copy.deepcopy(model)
        trainer, seconds = sparse_stage(model_k, sparse_cfg, train_ds, output_dir, k)
        log(f"sparse training k={k}: {trainer.state.global_step} steps in {seconds:.0f} s")
        r = record("after sparse", k, model_k)
        judge_sparse("after sparse", k, model_k)
        trainer.log({f"dsa_k{k}/{name}": round(v, 5) for name, v in r.items() if isinstance(v, float)})
        stage_logs[f"sparse_k{k}"] = trainer.state.log_history
        finals[k] = (model_k, r, trainer.state.global_step)

    # ---- table, metrics, models ----------------------------------------------------------------------------
    log("")
    log(
        f"DSA conversion of {source.name}, context {context}, {len(eval_ds)} "
        f"held-out blocks; dense source ppl {dense_eval['eval_perplexity']:.2f}"
    )
    log(
        "| k | stage | recall@k | recall@k (t≥k) | attn mass | attn mass (t≥k) "
        "| sparse ppl | same weights, dense attention ppl | dense source ppl |"
    )
    log("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        log(
            f"| {r['topk']} | {r['stage']} | {r['recall_at_k']:.3f} | {r.get('recall_at_k_past_k', 1):.3f} | "
            f"{r['attention_mass']:.3f} | {r.get('attention_mass_past_k', 1):.3f} | "
            f"{r['eval_perplexity']:.2f} | {r['dense_attention_eval_perplexity']:.2f} | "
            f"{dense_eval['eval_perplexity']:.2f} |"
        )

    log("")
    log(
        "| model | KL to source | greedy agreement | next line = source's | per-line bits/byte "
        f"(source {dense_eval['doc_bits_per_byte']:.4f}) |"
    )
    log("|---|---:|---:|---:|---:|")
    for name, j in judged.items():
        log(
            f"| {name} | {j['kl_to_source']:.4f} | {j['agreement_fraction']:.3f} | "
            f"{j['next_line_match']:.3f} | {j['doc_bits_per_byte']:.4f} |"
        )

    for k, (model_k, r, steps) in finals.items():
        # What the checkpoint is: sparse at k (recorded in the config; the run-time mode already is that).
        model_k.dsa_mode("sparse", index_topk=k, save=True)
        lineage = model_k.config.hf_hybrid_lineage
        lineage.setdefault("base_model", str(source))
        lineage["source"] = str(source)
        lineage["options"] = {**lineage.get("options", {}), "index_topk": k, "mode": "sparse"}
        lineage["training"] = {
            "recipe": "recipes/dsa",
            "config": Path(args.config).name,
            "data": data_name,
            "context": context,
            "warmup": {"steps": warm_steps, "learning_rate": warm_cfg.get("learning_rate")},
            "sparse": {"steps": steps, "learning_rate": sparse_cfg.get("learning_rate")},
        }
        before = next(x for x in rows if x["topk"] == k and x["stage"] == "before warm-up")
        warm = next(x for x in rows if x["topk"] == k and x["stage"] == "after warm-up")
        lineage["metrics"] = {
            "context": context,
            "dense_source_perplexity": round(dense_eval["eval_perplexity"], 3),
            "sparse_perplexity": round(r["eval_perplexity"], 3),
            "dense_attention_perplexity": round(r["dense_attention_eval_perplexity"], 3),
            "recall_at_k": round(r["recall_at_k"], 4),
            "attention_mass": round(r["attention_mass"], 4),
            "recall_at_k_after_warmup": round(warm["recall_at_k"], 4),
            "recall_at_k_before_warmup": round(before["recall_at_k"], 4),
            **{
                f"{key}": round(judged[f"after sparse, k={k}"][key], 4)
                for key in ("kl_to_source", "agreement_fraction", "next_line_match", "doc_bits_per_byte")
            },
        }
        model_dir = output_dir / f"k{k}"
        model_k.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        log(f"saved {model_dir} (dsa_mode='sparse', index_topk={k}) with its model card")

    summary = {
        "source": str(source),
        "context": context,
        "dense_source": dense_eval,
        "rows": rows,
        "judged": judged,
        "trainer_logs": stage_logs,
    }
    return write_summary(output_dir, summary, start=start, log=log)


if __name__ == "__main__":
    main(sys.argv[1:])
