"""Recovering a hybridized student from its dense teacher, with ``transformers.Trainer`` (recipes/hybridize).

Stage 1, **attention transfer** (LoLCATs / Mamba-in-Llama's first stage): the teacher is frozen; for every
replaced layer ``i`` the student's new mixer gets the teacher's own input to layer ``i``'s attention (the
normed hidden state, so every layer trains in parallel and independently of the others) and learns to
reproduce that attention's output. Loss: the sum over layers of each token's squared error relative to the
teacher output's mean square at that token (so layers and tokens of different output scale weigh alike),
averaged over the tokens that carry a label. Only the new mixers' parameters train (everything else has
``requires_grad=False``).
:class:`AttentionTransfer` is an ``nn.Module`` whose forward returns that loss, so a plain ``Trainer`` (and
DDP) trains it.

Stage 2, **distillation**: end to end, ``KL(teacher ‖ student)`` of the next-token distributions at
temperature ``τ`` (times τ², Hinton's scaling), plus ``lm_weight`` × the LM loss; the whole student or a LoRA
adapter (``peft``) trains. :class:`DistillationTrainer` is a ``Trainer`` whose ``compute_loss`` does that.

Both losses are token sums normalised by the Trainer's ``num_items_in_batch`` when it passes one (the count of
labels over the accumulated micro-batches), so gradient accumulation gives the same update as one large batch;
without it they are token means (and the Trainer divides by the accumulation steps). The student is called
without ``labels``, so its auxiliary terms (MoE balance, DSA indexer KL) are attached and weighted per
micro-batch like every client's (``hf_hybrid.aux_loss``). Packed batches (``position_ids`` restarting, or
``cu_seq_lens_*`` from a padding-free collator) reach teacher and student unchanged, so documents never see
each other. Each logs its components (``nmse/layer{i}``, ``kl``, ``lm``) averaged since the last log.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .mixers.base import LayerOutputs, MixerContext

# What a model forward takes from a batch besides the ids: the padding mask and the packing metadata of
# padding-free collators (DataCollatorWithFlattening, TRL's padding_free).
_MODEL_INPUTS = (
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "seq_idx",
)


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch's forward inputs (no labels): ``input_ids`` and whatever of ``_MODEL_INPUTS`` it carries."""
    out = {"input_ids": inputs["input_ids"]}
    out.update({k: inputs[k] for k in _MODEL_INPUTS if inputs.get(k) is not None})
    return out


def _label_weights(
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shape,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T-1] float weights: position t counts when it predicts a real label (labels[:, t+1] != -100);
    without labels, when both t and t+1 are real tokens (a pad predicts nothing, left padding included) of
    the same document (a packed row's next document starts at position 0)."""
    if labels is not None:
        return (labels[:, 1:] != -100).float()
    weights = torch.ones(shape[0], shape[1] - 1)
    if attention_mask is not None:
        mask = attention_mask.float()
        weights = mask[:, 1:] * mask[:, :-1]
    if position_ids is not None and position_ids.shape[-1] == shape[1]:
        weights = weights.to(position_ids.device) * (position_ids[:, 1:] != 0).float()
    return weights


def _normaliser(weights: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=weights.device).clamp(min=1)
    return weights.sum().clamp(min=1)


class _Components:
    """Running means of loss components between two Trainer logs."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self.values.setdefault(name, []).append(float(value))

    def pop(self) -> dict[str, float]:
        out = {k: round(sum(v) / len(v), 6) for k, v in self.values.items() if v}
        self.values = {}
        return out


# ------------------------------------------------------------------------------------------------------------
# stage 1


class AttentionTransfer(nn.Module):
    """Teacher (frozen) + the student's new mixers. ``forward(input_ids, attention_mask=None, labels=None)``
    returns ``{"loss": Σ_i nMSE_i, "mse": {i: ...}}`` (see the module docstring). ``layers`` are the replaced
    layer indices; the mixers are the student's own modules, so training this trains the student in place."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: list[int]):
        super().__init__()
        if not layers:
            raise ValueError("AttentionTransfer: no replaced layers to train")
        self.teacher = teacher
        self.layers = list(layers)
        self.mixers = nn.ModuleDict({str(i): student.model.layers[i].mixer for i in self.layers})
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.components = _Components()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (no dropout) while the mixers train
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch=None,
        **kwargs,
    ) -> dict[str, Any]:
        """``kwargs``: the packing metadata of a padding-free batch (``position_ids``, ``cu_seq_lens_*``,
        ...), handed to the teacher; anything else is refused."""
        unknown = sorted(set(kwargs) - set(_MODEL_INPUTS))
        if unknown:
            raise TypeError(f"AttentionTransfer.forward got unexpected keyword arguments {unknown}")
        inputs = model_inputs({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        with torch.no_grad():
            captured = self.teacher.model(**inputs, use_cache=False, output_mixer_io=self.layers).mixer_io
        weights = _label_weights(labels, attention_mask, input_ids.shape, inputs.get("position_ids"))
        weights = weights.to(input_ids.device)
        denom = _normaliser(weights, num_items_in_batch)
        loss = 0.0
        per_layer = {}
        for i in self.layers:
            x, ctx, target = captured[i]
            ctx = student_context(ctx, attention_mask, x.shape[1])
            out = self.mixers[str(i)](x.detach(), ctx)
            # each token's error relative to the teacher output's mean square there: a token sum, so it
            # normalises by num_items_in_batch like the LM loss (a per-batch scale would not)
            err = (out.float() - target.float()).pow(2).mean(-1)[:, :-1]  # (B, T-1)
            rel = err / target.float().pow(2).mean(-1)[:, :-1].clamp(min=1e-12)
            loss = loss + (rel * weights).sum() / denom
            per_layer[i] = (rel * weights).sum().detach() / weights.sum().clamp(min=1)
            if self.training:
                self.components.add(f"nmse/layer{i}", per_layer[i])
        return {"loss": loss, "nmse": per_layer}


def student_context(ctx: MixerContext, attention_mask: torch.Tensor | None, length: int) -> MixerContext:
    """The teacher's per-forward context, as a recurrent mixer needs it: no cache, and the padding mask the
    model builds for recurrent layers (an all-attention teacher builds none)."""
    padding = ctx.padding_mask
    if padding is None and attention_mask is not None and attention_mask.ndim == 2:
        mask = attention_mask[:, -length:].bool()
        padding = None if bool(mask.all()) else mask
    batch = dataclasses.replace(
        ctx.batch, padding_mask=padding, cache=None, past_length=0, mixer_io_layers=frozenset()
    )
    # its own auxiliary terms, statistics and mixer_io; the other collected outputs shared with the teacher's
    out = ctx.outputs
    outputs = LayerOutputs(router_logits=out.router_logits, attentions=out.attentions, dsa_topk=out.dsa_topk)
    return MixerContext(batch=batch, outputs=outputs)


class TransferTrainer(Trainer):
    """A ``Trainer`` for :class:`AttentionTransfer` that also logs each layer's normalised MSE."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if "loss" in logs and isinstance(model, AttentionTransfer):
            logs.update(model.components.pop())
        super().log(logs, start_time)


def freeze_all_but(model: nn.Module, layers: list[int]) -> tuple[int, int]:
    """Stage 1's rule: only the mixers of ``layers`` train. Returns ``(trainable, frozen)`` parameter
    counts."""
    prefixes = tuple(f"model.layers.{i}.mixer." for i in layers)
    trainable = frozen = 0
    for name, p in model.named_parameters():
        on = name.startswith(prefixes)
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
        frozen += 0 if on else p.numel()
    if trainable == 0:
        raise ValueError(f"freeze_all_but: layers {layers} have no mixer parameters")
    return trainable, frozen


@torch.no_grad()
def transfer_error(
    teacher: nn.Module, student: nn.Module, layers: list[int], blocks: torch.Tensor, *, batch_size: int = 4
) -> dict[int, float]:
    """Held-out normalised MSE of each new mixer against its attention layer (teacher inputs), eval mode."""
    module = AttentionTransfer(teacher, student, layers)
    was = student.training
    module.eval()
    sums = {i: 0.0 for i in layers}
    count = 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size].to(next(student.parameters()).device)
            out = module(input_ids=ids, labels=ids)
            for i in layers:
                sums[i] += float(out["nmse"][i]) * ids.shape[0]
            count += ids.shape[0]
    finally:
        student.train(was)
    return {i: v / count for i, v in sums.items()}


# ------------------------------------------------------------------------------------------------------------
# stage 2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    denom: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Σ_t w_t · τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) / denom over the next-token positions
    ([B, T, V] logits; weights [B, T-1])."""
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
    return (kl * weights).sum() * temperature**2 / denom


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``KL(teacher ‖ student)`` (+ ``lm_weight`` × LM loss); see the module
    docstring. ``model`` is the student (or a PEFT model around it); ``teacher`` is frozen and kept in eval
    mode."""

    def __init__(self, *args, teacher: nn.Module, temperature: float = 1.0, lm_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if temperature <= 0:
            raise ValueError(f"DistillationTrainer: temperature={temperature} must be > 0")
        if lm_weight < 0:
            raise ValueError(f"DistillationTrainer: lm_weight={lm_weight} must be >= 0")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.to(self.args.device)
        self.temperature = float(temperature)
        self.lm_weight = float(lm_weight)
        self.components = _Components()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forward = model_inputs(inputs)
        input_ids, labels = forward["input_ids"], inputs.get("labels")
        with torch.no_grad():
            teacher_logits = self.teacher(**forward, use_cache=False).logits
        # No labels: this trainer builds the loss, so the student's auxiliary terms are attached.
        outputs = model(**forward, use_cache=False)
        weights = _label_weights(
            labels, forward.get("attention_mask"), input_ids.shape, forward.get("position_ids")
        )
        weights = weights.to(input_ids.device)
        denom = _normaliser(weights, num_items_in_batch)
        kl = distillation_loss(outputs.logits, teacher_logits, weights, denom, temperature=self.temperature)
        loss = kl
        lm = None
        if self.lm_weight > 0 and labels is not None:
            nll = F.cross_entropy(
                outputs.logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(outputs.logits.device),
                ignore_index=-100,
                reduction="sum",
            )
            lm = nll / denom
            loss = loss + self.lm_weight * lm
        if model.training:
            # Per-token means for the log, whatever the normaliser.
            scale = float(denom) / float(weights.sum().clamp(min=1))
            self.components.add("kl", kl.detach() * scale)
            if lm is not None:
                self.components.add("lm", lm.detach() * scale)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.components.pop())
        super().log(logs, start_time)


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
):
    """A PEFT LoRA adapter on ``model`` (hf_hybrid's default targets: every attention / linear-mixer / MLP
    projection) — stage 2 with ``train: lora``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    return get_peft_model(model, config)


# The keys of a recipe's distillation section that are not TrainingArguments fields.
DISTILL_KEYS = ("train", "temperature", "lm_weight", "lora")


def distill_stage(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    data_collator,
    cfg: dict[str, Any],
    *,
    output_dir: str,
    section: str,
    **overrides: Any,
) -> tuple[nn.Module, DistillationTrainer]:
    """A conversion recipe's distillation stage, from its YAML section ``cfg`` (named ``section`` in errors):
    ``train`` (``full``: the whole student; ``lora``: a LoRA adapter of ``lora.r`` / ``lora.alpha``, merged
    after), ``temperature``, ``lm_weight``; every other key is a ``TrainingArguments`` field, with
    ``overrides`` (``TrainingArguments`` fields too) over them. Returns the trained student (LoRA merged) and
    the trainer."""
    from .training import training_arguments

    args = {k: v for k, v in cfg.items() if k not in DISTILL_KEYS}
    mode = cfg.get("train", "full")
    model = student
    if mode == "lora":
        lora = dict(cfg.get("lora") or {})
        model = add_lora(student, r=int(lora.get("r", 16)), alpha=int(lora.get("alpha", 32)))
    elif mode != "full":
        raise SystemExit(f"{section}.train={mode!r} is not known; choose full or lora")
    trainer = DistillationTrainer(
        model=model,
        teacher=teacher,
        # packed rows' position_ids (the document boundaries) must reach the model
        args=training_arguments(output_dir, **{"remove_unused_columns": False, **args, **overrides}),
        train_dataset=train_dataset,
        data_collator=data_collator,
        temperature=float(cfg.get("temperature", 1.0)),
        lm_weight=float(cfg.get("lm_weight", 0.0)),
    )
    trainer.train()
    if mode == "lora":
        model = model.merge_and_unload()
    return model, trainer


__all__ = [
    "model_inputs",
    "AttentionTransfer",
    "TransferTrainer",
    "DistillationTrainer",
    "distillation_loss",
    "freeze_all_but",
    "transfer_error",
    "student_context",
    "add_lora",
    "DISTILL_KEYS",
    "distill_stage",
]
