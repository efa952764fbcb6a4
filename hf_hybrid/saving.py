"""Saving and loading of hf_hybrid models: strict ``from_pretrained`` (a checkpoint that does not match the
model raises instead of being initialised randomly), atomic ``save_pretrained`` (a temporary sibling directory
moved into place) that writes a model card, run-time config switches saved as the model was built or loaded,
and ``push_to_hub`` with our card. ``HybridPreTrainedModel`` (``hf_hybrid.modeling_hybrid``) takes these
methods from :class:`HybridSaving`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from torch import nn

from .files import honour_umask
from .registry import trust_remote_code as _trusting

# Config fields that are run-time switches rather than architecture: saved as set at construction / loading.
_RUNTIME_CONFIG_FIELDS = ("output_router_logits",)


class HybridSaving:
    """The saving and loading methods of ``HybridPreTrainedModel`` (a mixin placed before transformers'
    ``PreTrainedModel``, whose methods these wrap through ``super()``)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, but missing, unexpected or mismatched weights raise
        (transformers would warn and initialise them randomly: a silently wrong model). Pass ``strict=False``
        to opt out. ``trust_remote_code=True`` lets a checkpoint whose layers use a kind defined outside
        hf_hybrid import the module its config recorded for that kind."""
        strict = kwargs.pop("strict", True)
        want_info = kwargs.pop("output_loading_info", False)
        with _trusting(kwargs.get("trust_remote_code")):
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            allowed = head_swap_allowance(cls, model)
            problems = []
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
                values = sorted(str(v) for v in (info.get(key) or []) if str(v) not in allowed.get(key, ()))
                if values:
                    shown = ", ".join(values[:8]) + (" ..." if len(values) > 8 else "")
                    problems.append(f"{key} ({len(values)}): {shown}")
            if problems:
                source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                raise ValueError(
                    f"{cls.__name__}.from_pretrained({source!r}): the checkpoint does not match the model — "
                    + "; ".join(problems)
                    + ". Refusing to initialise weights randomly (pass strict=False to load anyway)."
                )
        return (model, info) if want_info else model

    def post_init(self) -> None:
        super().post_init()
        # Runtime switches that clients flip on the shared config (TRL's SFT / DPO trainers set
        # output_router_logits=True on every MoE model they train): saved as the model was built or loaded.
        self._runtime_config_fields = {
            k: self.config.__dict__[k] for k in _RUNTIME_CONFIG_FIELDS if k in self.config.__dict__
        }

    @contextlib.contextmanager
    def _config_as_set(self):
        saved = getattr(self, "_runtime_config_fields", {})
        current = {k: self.config.__dict__[k] for k in _RUNTIME_CONFIG_FIELDS if k in self.config.__dict__}
        try:
            for k in current:
                if k in saved:
                    self.config.__dict__[k] = saved[k]
                else:
                    del self.config.__dict__[k]  # set by a client on a config that had none (no MoE layer)
            yield
        finally:
            self.config.__dict__.update(current)

    # Weights of a task head that a causal-LM checkpoint cannot have (e.g. ``score.weight``): the one mismatch
    # that strict loading accepts when such a head is put on a causal checkpoint (standard fine-tuning start).
    _task_head_keys: tuple[str, ...] = ()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Write to a temporary sibling directory first, then move files into place, so an interrupted save
        never leaves a half-written checkpoint. Also writes a model card when the directory has none yet."""
        save_directory = os.fspath(save_directory)
        if kwargs.pop("push_to_hub", False):
            # transformers' own path would overwrite README.md (ours or the user's) with the Hub's or a
            # generic card: save here as usual, then push through push_to_hub below.
            hub = {
                k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs
            }
            repo_id = hub.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.save_pretrained(save_directory, *args, **kwargs)
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)
            return None
        parent = os.path.dirname(os.path.abspath(save_directory)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-hf-hybrid-", dir=parent)
        try:
            with self._config_as_set():
                super().save_pretrained(tmp, *args, **kwargs)
            self._write_card_if_missing(tmp, save_directory)
            honour_umask(tmp)  # tempfile made it private; the files keep these modes when moved into place
            if not os.path.exists(save_directory):
                os.replace(tmp, save_directory)
                return
            new_names = set(os.listdir(tmp))
            # Weight files of an earlier save under other shard names would be loaded alongside the new ones.
            for name in os.listdir(save_directory):
                if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
                    if name not in new_names:
                        os.remove(os.path.join(save_directory, name))
            for name in new_names:
                dst = os.path.join(save_directory, name)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(tmp, name), dst)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def push_to_hub(self, repo_id: str, **kwargs):
        """``PreTrainedModel.push_to_hub``, except that the uploaded README.md is our model card when the Hub
        repo has none yet (transformers would upload a generic one); a card already on the Hub is kept."""
        from .card import push_to_hub_with_card

        return push_to_hub_with_card(self, repo_id, **kwargs)

    def _write_card_if_missing(self, tmp_dir: str, final_dir: str) -> None:
        if os.path.exists(os.path.join(final_dir, "README.md")):
            return  # never clobber a user's card
        try:
            from .card import write_model_card
        except ImportError:
            return
        write_model_card(self.config, tmp_dir)


def head_swap_allowance(cls: type, model: nn.Module) -> dict[str, set[str]]:
    """What strict loading tolerates when ``cls`` is not the class the checkpoint was saved from but a causal
    LM's checkpoint is loaded into a task head (``AutoModelForSequenceClassification``) or the bare backbone
    (``AutoModel``): exactly the head swap — the new head's weights missing (initialised fresh by
    transformers, to be fine-tuned) and the LM head unexpected. Everything else (a missing backbone weight, a
    wrong shape) stays an error."""
    saved_as = set(getattr(model.config, "architectures", None) or [])
    if cls.__name__ in saved_as or "HybridForCausalLM" not in saved_as:
        return {}
    return {"missing_keys": set(cls._task_head_keys), "unexpected_keys": {"lm_head.weight"}}


__all__ = ["HybridSaving", "head_swap_allowance"]
