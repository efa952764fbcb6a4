"""Auxiliary losses that reach their parameters whatever loss the client builds (Megatron's
MoEAuxLossAutoScaler).

A layer's auxiliary terms (MoE balance, z-loss, sequence balance; DSA indexer KL) are attached to the layer's
output activation: :func:`attach_aux_loss` is the identity in forward, and in backward it adds the gradient of
``weight · term`` to the gradient flowing into the activation. So any loss built on the backbone's hidden
states — our head's, TRL's fused LM head, a custom loop's — trains the routers and indexers, and each term is
counted exactly once: our head adds only the *values* of the terms to its ``loss`` (for logging), never their
gradients.

The gradient of a loss is scaled by whatever the client does to it (``Trainer`` divides it by the accumulation
steps or multiplies it by the world size; AMP multiplies it by its loss scale). The attached terms follow the
same scale: our head passes its ``loss`` through :func:`probe_loss_scale`, whose backward — which runs before
any layer's, since the loss is the root of the graph — records ``d(final loss)/d(loss) · weight`` in the
forward's :class:`AuxLossScale`; every attachment multiplies its term's gradient by that. A client that
builds its own loss from the logits or the backbone (TRL's DPO, a custom loop) has no probe; the terms then
enter with the model's scale for such losses (``model.set_aux_loss_scale``, default 1: a plain per-micro-batch
mean). ``Trainer`` (and every TRL trainer, its subclasses) sets it to ``1 / gradient_accumulation_steps`` for
each step in which it divides the loss by the accumulation steps (``hf_hybrid.trainer_patch``), so the
attached terms are averaged over the accumulated micro-batches like the client's own loss.
"""

from __future__ import annotations

import torch


class AuxLossScale:
    """The factor the attached auxiliary gradients of one forward are multiplied by: what a probe records,
    else ``default`` (the model's scale for losses built without our head)."""

    def __init__(self, default: float = 1.0) -> None:
        self.value: torch.Tensor | None = None
        self.default = float(default)

    def get(self, like: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return torch.full((), self.default, dtype=like.dtype, device=like.device)
        return self.value.to(dtype=like.dtype, device=like.device)


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, scale: AuxLossScale) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux) * ctx.scale.get(aux), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, scale: AuxLossScale) -> torch.Tensor:
    """``hidden`` unchanged; in backward, ``d aux`` (times ``scale``) flows into ``aux``'s graph as if ``aux``
    had been added to the loss. ``aux`` is a scalar (already weighted by its coefficient)."""
    if not aux.requires_grad:
        return hidden
    return _AttachAuxLoss.apply(hidden, aux, scale)


class _ProbeLossScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: torch.Tensor, scale: AuxLossScale, weight: float) -> torch.Tensor:
        ctx.scale, ctx.weight = scale, weight
        return loss.clone()  # a view would forbid the in-place scaling Trainer applies to the loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.scale.value = grad.detach() * ctx.weight
        return grad, None, None


def probe_loss_scale(loss: torch.Tensor, scale: AuxLossScale, weight: float = 1.0) -> torch.Tensor:
    """``loss`` unchanged; its backward sets ``scale.value = d(final)/d(loss) · weight`` before the layers'
    backward."""
    if not loss.requires_grad:
        return loss
    return _ProbeLossScale.apply(loss, scale, float(weight))


__all__ = ["AuxLossScale", "attach_aux_loss", "probe_loss_scale"]
