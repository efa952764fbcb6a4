"""What ``import hf_hybrid`` adds to transformers' ``Trainer`` (and so to TRL's trainers, its subclasses), for
hf_hybrid models only; every other model goes through the original methods untouched:

- ``create_model_card`` / ``push_to_hub`` keep our model card, with Trainer's training summary appended
  (``hf_hybrid.card.patch_create_model_card``);
- ``training_step`` tells the model how the step scales the loss it backpropagates: when Trainer divides a
  loss by the accumulation steps (a loss not normalised by ``num_items_in_batch``, e.g. DPO's, built from the
  logits), the attached auxiliary gradients are divided likewise (``model.set_aux_loss_scale``,
  ``hf_hybrid/aux_loss.py``), so router and indexer terms do not grow with gradient accumulation.

``transformers.trainer`` is heavy to import (~1.5 s), so the patch is applied when something else imports it,
not by ``import hf_hybrid``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys


def _hybrid_models(model) -> list:
    from .modeling_hybrid import HybridPreTrainedModel

    return [m for m in model.modules() if isinstance(m, HybridPreTrainedModel)]


def loss_scale_of_step(trainer, num_items_in_batch) -> float:
    """The factor ``Trainer.training_step`` applies to the loss ``compute_loss`` returns: ``1 / accumulation
    steps`` unless that loss is already normalised for them (transformers' own rule, 5.23 and 5.24)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (
            getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        ) or getattr(trainer, "compute_loss_func", None) is not None
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    steps = steps or trainer.args.gradient_accumulation_steps
    return 1.0 if scaled else 1.0 / max(1, int(steps))


def patch_training_step(cls) -> None:
    if getattr(cls.training_step, "_hf_hybrid", False):
        return
    original = cls.training_step

    @functools.wraps(original)
    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        # found once per model object (not a walk over every module at every step)
        seen = self.__dict__.get("_hf_hybrid_models")
        if seen is None or seen[0] is not model:
            seen = self.__dict__["_hf_hybrid_models"] = (model, _hybrid_models(model))
        models = seen[1]
        if not models:
            return original(self, model, inputs, num_items_in_batch, *args, **kwargs)
        scale = loss_scale_of_step(self, num_items_in_batch)
        previous = [m._aux_scale_without_probe for m in models]
        for m in models:
            m._aux_scale_without_probe = scale
        try:
            return original(self, model, inputs, num_items_in_batch, *args, **kwargs)
        finally:
            for m, value in zip(models, previous):
                m._aux_scale_without_probe = value

    training_step._hf_hybrid = True
    cls.training_step = training_step


def _patch(trainer_module) -> None:
    from .card import patch_create_model_card

    patch_create_model_card(trainer_module.Trainer)
    patch_training_step(trainer_module.Trainer)


class _TrainerImportHook:
    """Patches ``transformers.trainer`` right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch ``Trainer`` now if it is imported, else as soon as it is (called by ``import hf_hybrid``)."""
    if "transformers.trainer" in sys.modules:
        _patch(sys.modules["transformers.trainer"])
    elif not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())
