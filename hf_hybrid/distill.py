"""Recovering a hybridized student from its dense teacher, with ``transformers.Trainer`` (DESIGN.md §1 job 3).

Stage 1, **attention transfer** (LoLCATs / Mamba-in-Llama's first stage): the teacher is frozen; for every
replaced layer ``i`` the student's new mixer gets the teacher's own input to layer ``i``'s attention (the
normed hidden state, so every layer trains in parallel and independently of the others) and learns to
reproduce that attention's output. Loss: the sum over layers of the squared error, normalised per layer by the
teacher output's mean square (so layers of different output scale weigh alike), averaged over the tokens that
carry a label. Only the new mixers' parameters train (everything else has ``requires_grad=False``).
:class:`AttentionTransfer` is an ``nn.Module`` whose forward returns that loss, so a plain ``Trainer`` (and
DDP) trains it.

Stage 2, **distillation**: end to end, ``KL(teacher ‖ student)`` of the next-token distributions at
temperature ``τ`` (times τ², Hinton's scaling), plus ``lm_weight`` × the LM loss; the whole student or a LoRA
adapter (``peft``) trains. :class:`DistillationTrainer` is a ``Trainer`` whose ``compute_loss`` does that.

Both losses are token sums normalised by the Trainer's ``num_items_in_batch`` when it passes one (the count of
labels, DESIGN.md §12), so gradient accumulation gives the same update as one large batch; without it they are
token means (and the Trainer divides by the accumulation steps). Each logs its components (``mse/layer{i}``,
``kl``, ``lm``) averaged since the last log.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .mixers.base import MixerContext


def _label_weights(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape) -> torch.Tensor:
    """[B, T-1] float weights: position t counts when it predicts a real label (labels[:, t+1] != -100)."""
    if labels is not None:
        return (labels[:, 1:] != -100).float()
    if attention_mask is not None:
        return attention_mask[:, 1:].float()
    return torch.ones(shape[0], shape[1] - 1)


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
        with torch.no_grad():
            captured = self.teacher.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_mixer_io=self.layers,
            ).mixer_io
        weights = _label_weights(labels, attention_mask, input_ids.shape).to(input_ids.device)
        denom = _normaliser(weights, num_items_in_batch)
        loss = 0.0
        per_layer = {}
        for i in self.layers:
            x, ctx, target = captured[i]
            ctx = student_context(ctx, attention_mask, x.shape[1])
            out = self.mixers[str(i)](x.detach(), ctx)
            err = (out.float() - target.float()).pow(2).mean(-1)[:, :-1]  # (B, T-1)
            scale = (target.float().pow(2).mean(-1)[:, :-1] * weights).sum() / weights.sum().clamp(min=1)
            layer_loss = (err * weights).sum() / denom / scale.clamp(min=1e-12)
            loss = loss + layer_loss
            per_layer[i] = (
                (err * weights).sum().detach() / weights.sum().clamp(min=1) / scale.clamp(min=1e-12)
            )
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
    return dataclasses.replace(
        ctx,
        padding_mask=padding,
        cache=None,
        past_length=0,
        aux={},
        stats={},
        mixer_io_layers=frozenset(),
        mixer_io={},
    )


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
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if labels is not None and self.lm_weight > 0:
            kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**kwargs)
        weights = _label_weights(labels, attention_mask, input_ids.shape).to(input_ids.device)
        denom = _normaliser(weights, num_items_in_batch)
        kl = distillation_loss(outputs.logits, teacher_logits, weights, denom, temperature=self.temperature)
        loss = kl
        if self.lm_weight > 0 and labels is not None:
            loss = loss + self.lm_weight * outputs.lm_loss
        if model.training:
            # Per-token means for the log, whatever the normaliser.
            scale = float(denom) / float(weights.sum().clamp(min=1))
            self.components.add("kl", kl.detach() * scale)
            if self.lm_weight > 0 and labels is not None:
                self.components.add("lm", outputs.lm_loss.detach() * scale)
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


__all__ = [
    "AttentionTransfer",
    "TransferTrainer",
    "DistillationTrainer",
    "distillation_loss",
    "freeze_all_but",
    "transfer_error",
    "student_context",
    "add_lora",
]
