"""Helpers around ``transformers.Trainer`` for hf_hybrid models: CPU-friendly arguments, held-out perplexity,
a text sample. The recipes in ``recipes/`` compose these; nothing here is needed to use a model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

# Defaults for small models trained from scratch: a high learning rate with warm-up and cosine decay, no
# checkpoints or external loggers unless asked for (the recipes save the final model themselves).
TRAINING_DEFAULTS: dict[str, Any] = dict(
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    weight_decay=0.1,
    adam_beta2=0.95,
    max_grad_norm=1.0,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    logging_steps=10,
    save_strategy="no",
    eval_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
    seed=0,
    disable_tqdm=False,
)


def training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` with ``TRAINING_DEFAULTS`` under ``overrides`` (any ``TrainingArguments``
    field)."""
    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = accelerator or torch.backends.mps.is_available()
    defaults = {
        **TRAINING_DEFAULTS,
        # Without use_cpu=True, TrainingArguments on a machine without an accelerator ignores the process
        # group that torchrun / accelerate launch set up: every rank then trains alone as "rank 0" (and all of
        # them save).
        "use_cpu": not accelerator,
        # Pinned memory only helps (and only works without a warning) when batches go to a GPU.
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    return TrainingArguments(output_dir=output_dir, **{**defaults, **overrides})


def logged_losses(trainer) -> list[float]:
    """Training losses logged by a ``Trainer``, in order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Token-weighted mean LM loss (nats/token) and perplexity of ``model`` on a dataset of
    ``{"input_ids", "labels"}`` blocks, in eval mode (there the model's ``loss`` is the LM loss alone, so
    perplexity compares fairly across dense, MoE and DSA models). ``progress``: a tqdm bar over batches."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size)
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    try:
        for i, batch in enumerate(
            tqdm(loader, desc="held-out perplexity", total=n_batches, disable=not progress, leave=False)
        ):
            if max_batches is not None and i >= max_batches:
                break
            input_ids = batch["input_ids"].to(device)
            labels = batch.get("labels", batch["input_ids"]).to(device)
            out = model(input_ids=input_ids, labels=labels, use_cache=False)
            lm_loss = getattr(out, "lm_loss", None)
            loss = out.loss if lm_loss is None else lm_loss
            n = int((labels[:, 1:] != -100).sum())  # predicted tokens (the model shifts labels by one)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_perplexity: the dataset has no tokens to predict")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": float(count)}


@torch.no_grad()
def generate_sample(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """Prompt + a sampled continuation (``temperature == 0``: greedy), decoded to text."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=top_k)
        else:
            kwargs.update(do_sample=False)
        out = model.generate(**inputs, **kwargs)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_summary(output_dir: Path, summary: dict[str, Any], *, start: float, log=print) -> dict[str, Any]:
    """A recipe's last step: ``summary`` with ``wall_seconds`` (since ``start``, a ``time.time()``) written to
    ``output_dir/metrics.json``, and one line saying where. Returns ``summary``."""
    summary["wall_seconds"] = round(time.time() - start, 1)
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"metrics in {output_dir / 'metrics.json'}; wall {summary['wall_seconds']:.0f} s")
    return summary


__all__ = [
    "TRAINING_DEFAULTS",
    "write_summary",
    "training_arguments",
    "logged_losses",
    "evaluate_perplexity",
    "generate_sample",
]
