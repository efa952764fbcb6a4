"""Auxiliary terms whose gradient reaches their parameters when a client builds the loss itself.

The loss rule (README, "Loss rule"): one optimizer step minimises

    LM loss over the step's predicted tokens
      + Σ_term coefficient · (term averaged over the step's micro-batches)

where a term (MoE balance, z-loss, sequence balance; DSA indexer KL) is first averaged over the layers that
produce it. Two ways a micro-batch's terms get into the gradient, never both:

- **In ``loss``**: the causal-LM head given ``labels`` adds ``w · Σ coefficient · term`` to its ``loss`` with
  the terms' graph, so whatever the loop does to ``loss`` (divide by the accumulation steps, multiply by the
  world size, an AMP loss scale, ``torch.compile``) applies to them too.
- **Attached** (Megatron's ``MoEAuxLossAutoScaler`` pattern): when the model builds no loss (no ``labels``:
  TRL's DPO, a loss from the logits; or the backbone called directly: TRL's fused LM head), each layer
  attaches ``w · coefficient / layers · term`` to its output activation with :func:`attach_aux_loss` — the
  identity in forward; in backward the term's own gradient (scale 1: what the loop does to its loss does not
  reach it, so ``w`` carries the loop's scale) is added to its parameters'.
  The returned terms (and router logits) are then detached values, so a client that also adds
  ``coef · outputs.aux_loss`` (transformers' MoE convention) counts nothing twice.

``w`` is the weight of one micro-batch (``model.set_aux_loss_scale``): 1 by default; ``1 / accumulation
steps`` when the loop accumulates (``Trainer`` and every TRL trainer set it for each step:
``hf_hybrid.trainer_patch``).
It is a plain number known at forward time and multiplied in forward, so ``torch.compile`` sees it (a change
recompiles) instead of reading mutable state inside a backward.
"""

from __future__ import annotations

import torch


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``hidden`` unchanged; in backward, ``d aux = 1`` flows into ``aux``'s graph, as if ``aux`` (a scalar,
    already weighted) had been added to the loss that is backpropagated."""
    if not aux.requires_grad:
        return hidden
    return _AttachAuxLoss.apply(hidden, aux)


__all__ = ["attach_aux_loss"]
