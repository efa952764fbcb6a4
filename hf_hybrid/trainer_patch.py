"""What ``import hf_hybrid`` adds to transformers' ``Trainer`` and every subclass of it (TRL's trainers, our
``DistillationTrainer``), for hf_hybrid models only; every other model goes through the original methods
untouched:

- ``create_model_card`` / ``push_to_hub`` keep our model card, with the trainer's own summary appended
  (``hf_hybrid.card.patch_create_model_card``), also where a subclass overrides ``create_model_card`` (TRL);
- ``training_step`` gives the model the weight of one micro-batch's auxiliary terms in the step's objective
  (``model.set_aux_loss_scale``, ``hf_hybrid/aux_loss.py``): ``1 / accumulation steps``, so router and
  indexer terms are averaged over the accumulated micro-batches whichever client builds the loss — times the
  fp16 loss scale for attached gradients, and over the world size where Trainer multiplies a
  token-normalised loss by it.

``transformers.trainer`` is heavy to import (~1.5 s), so the patch is applied when something else imports it,
not by ``import hf_hybrid``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

from transformers.utils import logging

logger = logging.get_logger(__name__)


def _hybrid_models(model) -> list:
    from .modeling_hybrid import HybridPreTrainedModel

    return [m for m in model.modules() if isinstance(m, HybridPreTrainedModel)]


def aux_scales_of_step(trainer, num_items_in_batch) -> tuple[float, float]:
    """``(attached, in_loss)`` micro-batch weights for one ``Trainer.training_step`` (see
    ``HybridPreTrainedModel.set_aux_loss_scale``): ``1 / accumulation steps``; the attached gradients also
    carry the fp16 GradScaler's scale (they do not pass through the scaled loss); a loss normalised by
    ``num_items_in_batch`` is multiplied by the world size in ``Trainer.compute_loss`` (DDP then averages), so
    the terms inside it are divided by it (transformers' own rule, 5.23 and 5.24)."""
    steps = (
        getattr(trainer, "current_gradient_accumulation_steps", None)
        or trainer.args.gradient_accumulation_steps
    )
    base = 1.0 / max(1, int(steps))
    attached = base
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        attached *= float(scaler.get_scale())
    world = 1
    if (
        getattr(trainer.args, "average_tokens_across_devices", False)
        and (
            getattr(trainer, "model_accepts_loss_kwargs", False)
            or getattr(trainer, "compute_loss_func", None)
        )
        and num_items_in_batch is not None
    ):
        accelerator = getattr(trainer, "accelerator", None)
        tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        world = (accelerator.num_processes // tp) if accelerator is not None else 1
        if trainer.args.n_gpu > 1:
            world = trainer.args.n_gpu
    return attached, base / max(1, world)


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
        attached, in_loss = aux_scales_of_step(self, num_items_in_batch)
        if not self.__dict__.get("_hf_hybrid_logged"):
            self.__dict__["_hf_hybrid_logged"] = True
            logger.info(
                f"hf_hybrid: auxiliary loss terms weighted {in_loss:g} per micro-batch "
                f"({type(self).__name__}, gradient accumulation {self.args.gradient_accumulation_steps})"
            )
        previous = [m._aux_loss_scales for m in models]
        for m in models:
            m._aux_loss_scales = (attached, in_loss)
        try:
            return original(self, model, inputs, num_items_in_batch, *args, **kwargs)
        finally:
            for m, value in zip(models, previous):
                m._aux_loss_scales = value

    training_step._hf_hybrid = True
    cls.training_step = training_step


def _patch_class(cls) -> None:
    """Patch ``cls`` where it defines the method itself (a subclass that overrides ``create_model_card`` or
    ``training_step``, as TRL's trainers do, would otherwise bypass the patch on ``Trainer``)."""
    from .card import patch_create_model_card

    if "create_model_card" in cls.__dict__:
        patch_create_model_card(cls)
    if "training_step" in cls.__dict__:
        patch_training_step(cls)


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _patch(trainer_module) -> None:
    trainer = trainer_module.Trainer
    _patch_class(trainer)
    for sub in _all_subclasses(trainer):  # defined before hf_hybrid was imported
        _patch_class(sub)
    hook = trainer.__dict__.get("__init_subclass__")
    if not getattr(getattr(hook, "__func__", None), "_hf_hybrid", False):
        previous = hook

        def __init_subclass__(sub, **kwargs):  # defined later (e.g. TRL imported after hf_hybrid)
            if previous is not None:
                previous.__func__(sub, **kwargs)
            else:
                super(trainer, sub).__init_subclass__(**kwargs)
            _patch_class(sub)

        __init_subclass__._hf_hybrid = True
        trainer.__init_subclass__ = classmethod(__init_subclass__)


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
