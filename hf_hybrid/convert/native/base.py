"""The declarative mapping between a transformers native family and hf_hybrid: one table per family drives
import, export and the tests (see ``hf_hybrid/convert/native/__init__.py`` for how to add a family).

A :class:`NativeFamily` holds

- ``config_rules``: how each native config option maps onto ``HybridConfig`` fields and back
  (:func:`same`, :func:`rename`, :func:`native_fixed`, :func:`ours_fixed`, :class:`Custom`). Native options
  that no rule names and that :attr:`NativeFamily.ignored_options` does not list must keep their default
  value, else the import refuses naming the option and value. On export, the native config is re-imported and
  compared with the source ``HybridConfig`` field by field (:func:`functional_fields`): any field the family
  cannot express is named.
- weight rules (:class:`W`), model-wide (``model_rules``, absolute names) and per layer, keyed by our mixer
  type (``mixer_rules``) and MLP type (``mlp_rules``) plus ``layer_rules`` for every layer (norms). Layer
  templates are relative to ``native_layer_prefix`` / ``model.layers.{i}.``. A rule renames one tensor,
  renames every tensor under a prefix (names ending in ``"."``), or splits / fuses / transforms tensors with a
  pair of functions ``to_ours(tensors, ctx) -> tensors`` and ``to_native(tensors, ctx) -> tensors`` that must
  be inverse to each other (``tests/test_native_families.py`` / ``test_native_recurrent.py`` check
  import∘export = identity per family).

Both directions go through the in-memory state dict of the native class (``from_pretrained`` on import,
``save_pretrained`` on export), so transformers' own on-disk conventions (per-expert names, fused at load time
by ``conversion_mapping.py``; fp32 routers) are handled by transformers itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from ... import compat
from ..checkpoint import UnsupportedCheckpointError


class NativeConversionError(UnsupportedCheckpointError):
    """A native checkpoint or config cannot be imported, or an hf_hybrid model cannot be exported, exactly."""


def fail(message: str) -> None:
    raise NativeConversionError(message)


# ---- config rules ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigRule:
    """Base: ``to_ours(native_cfg) -> dict`` of HybridConfig kwargs, ``to_native(hybrid_cfg) -> dict`` of
    native kwargs, ``native_options``: the native options this rule accounts for."""

    def native_options(self) -> tuple[str, ...]:
        return ()

    def to_ours(self, native, family: NativeFamily) -> dict[str, Any]:
        return {}

    def to_native(self, ours, family: NativeFamily) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Rename(ConfigRule):
    native: str
    ours: str

    def native_options(self):
        return (self.native,)

    def to_ours(self, native, family):
        return {self.ours: copy.deepcopy(getattr(native, self.native))}

    def to_native(self, ours, family):
        return {self.native: copy.deepcopy(_our_value(ours, self.ours))}


def _our_value(ours, name: str):
    """``ours.<name>``, or the field's default when the config leaves it out (``output_router_logits`` exists
    only on configs with MoE layers, so that clients never take a dense model for an MoE)."""
    if hasattr(ours, name):
        return getattr(ours, name)
    fields = getattr(type(ours), "__dataclass_fields__", {})
    if name in fields:
        return fields[name].default
    from ...registry import config_field_defaults

    defaults = config_field_defaults()
    if name in defaults:
        return defaults[name]
    raise AttributeError(f"{type(ours).__name__} has no field {name!r}")


@contextlib.contextmanager
def torch_reference_functions(modules: Iterable[ModuleType], functions: Iterable[str]) -> Iterator[None]:
    """Inside the block, transformers' modeling ``modules`` call the torch function behind each of their
    kernel-dispatching ``functions`` (``compat.torch_reference``) instead of the fla-core / causal-conv1d
    kernels bound at import time whenever those are installed, which fail on CPU tensors (a family's
    ``native_context``). A function a module lacks is left alone; all restored on exit."""
    functions = tuple(functions)
    saved = []
    try:
        for module in modules:
            for fn in functions:
                current = getattr(module, fn, None)
                wrapped = compat.torch_reference(current)
                if wrapped is not None and wrapped is not current:
                    saved.append((module, fn, current))
                    setattr(module, fn, wrapped)
        yield
    finally:
        for module, fn, current in reversed(saved):
            setattr(module, fn, current)


def same(*names: str) -> list[ConfigRule]:
    """Options spelled the same on both sides."""
    return [Rename(n, n) for n in names]


def rename(native: str, ours: str) -> ConfigRule:
    return Rename(native, ours)


@dataclass(frozen=True)
class NativeFixed(ConfigRule):
    """A native option hf_hybrid supports only at one value (``allowed``: the accepted values; the first is
    written on export). The import refuses any other value, naming the option, the value and why."""

    native: str
    allowed: tuple[Any, ...]
    why: str = ""

    def native_options(self):
        return (self.native,)

    def to_ours(self, native, family):
        value = getattr(native, self.native, self.allowed[0])
        if value not in self.allowed:
            why = f" ({self.why})" if self.why else ""
            fail(
                f"{family.model_type}: {family.config_name}.{self.native}={value!r} has no "
                f"counterpart in hf_hybrid{why}; supported: {', '.join(repr(a) for a in self.allowed)}"
            )
        return {}

    def to_native(self, ours, family):
        return {self.native: self.allowed[0]}


def native_fixed(native: str, *allowed: Any, why: str = "") -> ConfigRule:
    return NativeFixed(native, tuple(allowed), why)


@dataclass(frozen=True)
class OursFixed(ConfigRule):
    """A HybridConfig field the family always has at ``value`` (set on import; the export's round-trip check
    refuses any other value)."""

    ours: str
    value: Any

    def to_ours(self, native, family):
        return {self.ours: self.value}


def ours_fixed(**values: Any) -> list[ConfigRule]:
    return [OursFixed(k, v) for k, v in values.items()]


@dataclass(frozen=True)
class Custom(ConfigRule):
    """Anything else (per-layer lists, derived sizes): two functions and the native options they read."""

    reads: tuple[str, ...]
    to_ours_fn: Callable[[Any], dict[str, Any]]
    to_native_fn: Callable[[Any], dict[str, Any]]

    def native_options(self):
        return self.reads

    def to_ours(self, native, family):
        return self.to_ours_fn(native)

    def to_native(self, ours, family):
        return self.to_native_fn(ours)


# Options of any family that do not change the function a checkpoint computes.
COMMON_IGNORED_OPTIONS = (
    "initializer_range",
    "use_cache",
    "output_router_logits",
    "router_aux_loss_coef",
    "attention_dropout",
)

# HybridConfig fields that never change the function (training coefficients, backends, bookkeeping): the
# export's round-trip comparison skips them.
NON_FUNCTIONAL_FIELDS = frozenset(
    {
        "initializer_range",
        "use_cache",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_seq_aux_loss_coef",
        "router_bias_update_rate",
        "router_jitter_noise",
        "index_loss_coef",
        "dsa_backend",
        "dsa_query_chunk",
        "linear_backend",
        "linear_chunk_size",
        "mla_decode",
        "mamba_dt_min",  # dt initialisation only (Mamba-2, GDN, KDA) (the clamp is mamba_dt_limit)
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "attention_dropout",
        "hf_hybrid_lineage",
        "hf_hybrid_format_version",
        "layer_types",
        "dtype",
    }
)


def kind_functional_fields(spec, cfg) -> set[str]:
    """The config fields that decide the function of a layer of kind ``spec`` under ``cfg``: its spec's
    ``functional_fields`` hook, else the fields the kind declares."""
    if spec.functional_fields is not None:
        return set(spec.functional_fields(cfg))
    return {f.name for f in spec.config_fields}


def functional_fields(cfg) -> dict[str, Any]:
    """The HybridConfig fields that decide the function of ``cfg``'s layers, with their values: fields of
    layer kinds ``cfg`` does not use (each kind names its own: :func:`kind_functional_fields`) and
    :data:`NON_FUNCTIONAL_FIELDS` are left out. Fields that new options add are included by default (a new
    option is functional unless listed here)."""
    from transformers import PreTrainedConfig

    from ...configuration_hybrid import HybridConfig
    from ...registry import config_field_defaults, mixer_specs, mlp_specs

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    names = {f.name for f in dataclasses.fields(HybridConfig)} | set(config_field_defaults())
    names = {n for n in names if hasattr(cfg, n)} - NON_FUNCTIONAL_FIELDS - base
    drop: set[str] = set()
    keep: set[str] = set()
    for specs, used in ((mixer_specs(), cfg.mixer_types), (mlp_specs(), cfg.mlp_types)):
        for name, spec in specs.items():
            (keep if name in used else drop).update(kind_functional_fields(spec, cfg))
    names = (names - drop) | (keep & names)
    effective = dict(_EFFECTIVE)
    for spec in (*mixer_specs().values(), *mlp_specs().values()):
        effective.update({f.name: f.effective for f in spec.config_fields if f.effective is not None})
    return {n: effective[n](cfg) if n in effective else getattr(cfg, n) for n in sorted(names)}


# Fields whose different spellings mean the same function (None = "the default of another field"); a kind's
# fields say so themselves (ConfigField.effective).
_EFFECTIVE: dict[str, Callable[[Any], Any]] = {
    "rope_parameters": lambda c: _effective_rope(c),
}


# ---- weight rules ------------------------------------------------------------------------------------------

Transform = Callable[[list[torch.Tensor], "RuleContext"], list[torch.Tensor]]


@dataclass(frozen=True)
class RuleContext:
    """What a transform may read: both configs and the layer index (None for model-wide rules)."""

    ours: Any
    native: Any
    layer: int | None


@dataclass(frozen=True)
class W:
    """One weight rule. ``native`` / ``ours``: one name or a tuple of names (templates, ``{i}`` = layer index
    in model-wide rules). A single pair of names ending in ``"."`` renames every tensor under that prefix.
    With ``to_ours`` / ``to_native`` (inverse functions on lists of tensors) the rule splits, fuses or
    transforms; without them, the names pair up one to one. ``when(ctx) -> bool`` limits a rule to some
    layers/configs."""

    native: str | tuple[str, ...]
    ours: str | tuple[str, ...]
    to_ours: Transform | None = None
    to_native: Transform | None = None
    when: Callable[[RuleContext], bool] | None = None

    @property
    def native_names(self) -> tuple[str, ...]:
        return (self.native,) if isinstance(self.native, str) else tuple(self.native)

    @property
    def ours_names(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)

    @property
    def is_prefix(self) -> bool:
        return len(self.native_names) == 1 and self.native_names[0].endswith(".")


def permute_rows(index_fn: Callable[[RuleContext], torch.Tensor]) -> tuple[Transform, Transform]:
    """A row permutation ``w_ours = w_native[index]`` and its inverse, for ``W(..., *permute_rows(fn))``."""

    def to_ours(ts, ctx):
        return [ts[0][index_fn(ctx).to(ts[0].device)]]

    def to_native(ts, ctx):
        index = index_fn(ctx)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel())
        return [ts[0][inverse.to(ts[0].device)]]

    return to_ours, to_native


def add_constant(value: float) -> tuple[Transform, Transform]:
    """``w_ours = w_native + value`` and back (zero-centred ``(1 + w)`` RMSNorm weights:
    ``add_constant(1.0)``)."""
    return (lambda ts, ctx: [ts[0] + value]), (lambda ts, ctx: [ts[0] - value])


def split_rows(sizes_fn: Callable[[RuleContext], Sequence[int]]) -> tuple[Transform, Transform]:
    """One native tensor ↔ several of ours, cut along dim 0 (``W(native_name, (a, b), *split_rows(fn))``)."""
    return (
        lambda ts, ctx: list(torch.split(ts[0], list(sizes_fn(ctx)), dim=0)),
        lambda ts, ctx: [torch.cat(ts, dim=0)],
    )


def zero_filled(shape_fn: Callable[[RuleContext], Sequence[int]], what: str) -> tuple[Transform, Transform]:
    """A tensor of ours with no native counterpart that must be zero: ``W((), our_name, *zero_filled(fn,
    what))``. Import creates zeros (fp32); export refuses a non-zero tensor, naming ``what`` and the layer."""

    def to_ours(ts, ctx):
        return [torch.zeros(tuple(shape_fn(ctx)), dtype=torch.float32)]

    def to_native(ts, ctx):
        if bool(ts[0].detach().ne(0).any()):
            where = f" in layer {ctx.layer}" if ctx.layer is not None else ""
            fail(f"{what}{where} is non-zero, which the native family cannot express")
        return []

    return to_ours, to_native


# ---- the family --------------------------------------------------------------------------------------------

RuleList = Sequence[W]


@dataclass
class NativeFamily:
    """Everything hf_hybrid knows about one transformers ``model_type``.

    ``config_rules``: :class:`ConfigRule` list. ``ignored_options``: native options that do not change the
    function (besides :data:`COMMON_IGNORED_OPTIONS`). ``model_rules``: absolute-name weight rules.
    ``layer_rules``: rules for every layer; ``mixer_rules`` / ``mlp_rules``: keyed by
    ``HybridConfig.mixer_types[i]`` / ``mlp_types[i]``. ``ignored_native_keys``: regexes of native tensors
    dropped on import (named in a note). ``tiny_config``: kwargs of a tiny native config for tests (fp32, a
    forward in milliseconds). ``exactness``: one line for the README. ``check_ours(cfg)``: extra refusals on
    export (return an error message or None).
    """

    model_type: str
    config_rules: list[ConfigRule]
    model_rules: RuleList
    layer_rules: RuleList = ()
    mixer_rules: dict[str, RuleList] = field(default_factory=dict)
    mlp_rules: dict[str, RuleList] = field(default_factory=dict)
    ignored_options: tuple[str, ...] = ()
    ignored_native_keys: tuple[str, ...] = (r"(^|\.)rotary_emb\.",)
    native_layer_prefix: str = "model.layers.{i}."
    tiny_config: dict[str, Any] = field(default_factory=dict)
    exactness: str = "exact (fp32 ≤ 1e-5)"
    check_ours: Callable[[Any], str | None] | None = None
    # fix up a freshly built native model (e.g. fp32 buffers)
    prepare_native: Callable[[Any], Any] | None = None
    # Regexes of native tensors whose native -> ours -> native trip rounds in fp32 (zero-centred norm weights:
    # w -> fl(1 + w) -> fl(1 + w) - 1 moves w by up to half an ulp of 1 + w, while 1 + w itself, the function,
    # is kept).
    rounding_native_weights: tuple[str, ...] = ()
    # A context manager factory under which the native model runs on CPU (transformers' own torch kernels
    # instead of an optional kernel package it would pick up, e.g. fla-core for qwen3_next); None: nothing
    # needed.
    native_context: Callable[[], Any] | None = None
    # The first transformers release that has the family (None: every supported release).
    min_transformers: str | None = None
    # Native fields the config class derives itself when they are absent, spelled differently across the
    # releases serving engines pin: the export leaves them out of config.json where they equal that
    # derivation, so each release derives its own (DeepSeek-V3.2's layer_types: "deepseek_sparse_attention"
    # in transformers 5.16, which rejects the "indexed_attention" of later releases).
    derived_native_fields: tuple[str, ...] = ()
    # Rewrites the written config.json (a dict, in place or returned) with keys serving engines read from it
    # besides transformers' own fields (Qwen3-Next's top-level partial_rotary_factor for SGLang).
    engine_keys: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Vision-language wrappers: what the import drops (named in its note).
    wrapper_note: str = "model.visual.* and mtp.*"

    def model_config(self, native_config):
        """The config ``model_class`` is built from, for the family's (text) config: itself, or a wrapper's
        config around it (a family whose decoder has no class of its own)."""
        return native_config

    def complete_native_state(self, native_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The export's state dict plus whatever ``model_class`` holds beyond the decoder (nothing here)."""
        return state

    def portable_config(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The written config.json (a dict) as every transformers release that has the family reads it: the
        ``derived_native_fields`` left out where the config class derives the same value without them; a
        subclass also respells values the config class normalises differently across releases (GLM-5-Next's
        DSA ``layer_types``); then ``engine_keys``. The export checks that the result reads back as the config
        written."""
        for key in self.derived_native_fields:
            if key in raw:
                without = {k: v for k, v in raw.items() if k != key}
                if getattr(self.config_class.from_dict(without), key, None) == raw[key]:
                    raw = without
        return raw if self.engine_keys is None else self.engine_keys(raw)

    # ---- classes ----
    @property
    def available(self) -> bool:
        """Whether the installed transformers has this family."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return self.model_type in CONFIG_MAPPING_NAMES

    @property
    def config_class(self):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not self.available:
            import transformers

            fail(
                f"model_type={self.model_type!r} needs transformers >= {self.min_transformers or '?'} "
                f"(installed: {transformers.__version__})"
            )
        return CONFIG_MAPPING[self.model_type]

    @property
    def config_name(self) -> str:
        return self.config_class.__name__

    @property
    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM._model_mapping[self.config_class]

    # ---- config ----
    def hybrid_kwargs(self, native) -> dict[str, Any]:
        """HybridConfig kwargs for the native config ``native``; refuses options without a counterpart."""
        if getattr(native, "model_type", None) != self.model_type:
            fail(
                f"expected a {self.model_type} config, got model_type={getattr(native, 'model_type', None)!r}"
            )
        self._check_unmapped(native)
        kwargs: dict[str, Any] = {}
        for rule in self.config_rules:
            kwargs.update(rule.to_ours(native, self))
        # copies: a config class that fills in a dict it is given (rope_parameters) must not edit the source
        return copy.deepcopy(kwargs)

    def hybrid_config(self, native, **extra):
        from ...configuration_hybrid import HybridConfig

        kwargs = self.hybrid_kwargs(native)
        kwargs.update(extra)
        from huggingface_hub.errors import StrictDataclassError

        try:
            return HybridConfig(**kwargs)
        except (ValueError, TypeError, StrictDataclassError) as err:
            fail(f"{self.model_type}: the config does not map onto HybridConfig: {err}")

    def _check_unmapped(self, native) -> None:
        from transformers import PreTrainedConfig

        base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        mapped = {o for rule in self.config_rules for o in rule.native_options()}
        ignored = set(COMMON_IGNORED_OPTIONS) | set(self.ignored_options)
        defaults = self.config_class()
        for f in dataclasses.fields(self.config_class):
            name = f.name
            if name in base or name in mapped or name in ignored:
                continue
            value, default = getattr(native, name, None), getattr(defaults, name, None)
            if value != default:
                fail(
                    f"{self.model_type}: {self.config_name}.{name}={value!r} has no counterpart in hf_hybrid "
                    f"(only the default {default!r} can be imported exactly)"
                )

    def native_config(self, ours):
        """The native config for the HybridConfig ``ours``; refuses what the family cannot express, naming the
        HybridConfig field (and layer) that has no counterpart."""
        if self.check_ours is not None:
            message = self.check_ours(ours)
            if message:
                fail(f"cannot export to {self.model_type}: {message}")
        kwargs: dict[str, Any] = {}
        for rule in self.config_rules:
            kwargs.update(rule.to_native(ours, self))
        # Copies (a native config class fills in the dicts it is given: Qwen3-Next adds
        # partial_rotary_factor=0.25 to rope_parameters, and must not do so to ours).
        kwargs = _explicit_native_kwargs(copy.deepcopy(kwargs), self.config_class)
        from huggingface_hub.errors import StrictDataclassError

        try:
            native = self.config_class(**kwargs)
            # What a reader of the exported config.json gets: save_pretrained writes only the fields that
            # differ from the class's defaults, and the class fills in the rest again on load.
            on_disk = self.config_class.from_dict(native.to_diff_dict())
        except (ValueError, TypeError, StrictDataclassError) as err:
            fail(f"cannot export to {self.model_type}: {self._rejection(err, kwargs)}")
        want = functional_fields(ours)
        for reloaded in (native, on_disk):
            got = functional_fields(self.hybrid_config(reloaded))
            diffs = sorted((n for n in want if want[n] != got.get(n)), key=lambda n: n not in _STRUCTURAL)
            if diffs:
                parts = []
                for name in diffs[:4]:
                    parts.append(_describe_difference(name, want[name], got.get(name)))
                fail(f"cannot export to {self.model_type}: " + "\n  ".join(parts))  # one difference a line
        return native

    def _rejection(self, err: Exception, kwargs: dict[str, Any]) -> str:
        """A native config's validation error as a reason a person reads: our field (when a rename maps it),
        the value this model has, and what the native field needs."""
        text = str(err)
        match = re.search(r"field '(\w+)'", text, flags=re.IGNORECASE)
        if match is None:
            return f"{self.config_name} rejects the mapped options ({text.splitlines()[0][:100]})"
        name = match.group(1)
        expected = re.search(r"expected ([\w\[\], |]+?), got", text)
        needs = f"needs {expected.group(1)}" if expected else "does not accept it"
        ours = [r.ours for r in self.config_rules if isinstance(r, Rename) and r.native == name]
        if not ours:
            return f"{self.config_name}.{name}={kwargs.get(name)!r}: the field {needs}"
        target = self.config_name if ours[0] == name else f"{self.config_name}.{name}"
        return f"HybridConfig.{ours[0]}={kwargs.get(name)!r}: {target} {needs}"

    # ---- weights ----
    def _rules_for_layer(self, ours, i: int) -> list[W]:
        mixer, mlp = ours.mixer_types[i], ours.mlp_types[i]
        if mixer not in self.mixer_rules:
            fail(
                f"cannot map layer {i}: mixer_types[{i}]={mixer!r} has no counterpart in {self.model_type} "
                f"(it has: {', '.join(self.mixer_rules)})"
            )
        if mlp not in self.mlp_rules:
            fail(
                f"cannot map layer {i}: mlp_types[{i}]={mlp!r} has no counterpart in {self.model_type} "
                f"(it has: {', '.join(self.mlp_rules)})"
            )
        return [*self.layer_rules, *self.mixer_rules[mixer], *self.mlp_rules[mlp]]

    def _bound_rules(self, ours, native) -> list[tuple[W, RuleContext, str, str]]:
        """Every rule with its context and the native / our name prefixes its names are relative to."""
        bound = [(r, RuleContext(ours, native, None), "", "") for r in self.model_rules]
        for i in range(ours.num_hidden_layers):
            ctx = RuleContext(ours, native, i)
            for r in self._rules_for_layer(ours, i):
                bound.append((r, ctx, self.native_layer_prefix.format(i=i), f"model.layers.{i}."))
        return [b for b in bound if b[0].when is None or b[0].when(b[1])]

    def name_map(self, names: list[str], ours, native) -> dict[str, str]:
        """native tensor name -> our name for the tensors ``names`` of a native checkpoint, by the same rules
        as :meth:`convert_state` (ignored native keys are left out), without reading a tensor: for families
        whose rules only rename (the dense attention families; ``import_dense`` reads their safetensors
        through it)."""
        transforming = [r for r, *_ in self._bound_rules(ours, native) if r.to_ours is not None]
        if transforming:
            raise RuntimeError(f"internal error: {self.model_type} transforms weights ({transforming[0]})")
        ours_to_native = self.convert_state({n: n for n in names}, ours, native, to="ours")
        return {native_name: ours_name for ours_name, native_name in ours_to_native.items()}

    def convert_state(
        self, state: dict[str, torch.Tensor], ours, native, *, to: str
    ) -> dict[str, torch.Tensor]:
        """Map a whole state dict ``to="ours"`` (from native names) or ``to="native"`` (from ours). Every
        source tensor must be consumed by exactly one rule (or be an ignored native key on import)."""
        assert to in ("ours", "native")
        remaining = dict(state)
        if to == "ours":
            for name in list(remaining):
                if any(re.search(p, name) for p in self.ignored_native_keys):
                    remaining.pop(name)
        out: dict[str, torch.Tensor] = {}
        for rule, ctx, npre, opre in self._bound_rules(ours, native):
            fmt = {"i": ctx.layer} if ctx.layer is not None else {}
            src_names = [npre + n.format(**fmt) for n in rule.native_names]
            dst_names = [opre + n.format(**fmt) for n in rule.ours_names]
            fn = rule.to_ours
            if to == "native":
                src_names, dst_names, fn = dst_names, src_names, rule.to_native
            if rule.is_prefix:
                (sp,), (dp,) = src_names, dst_names
                for name in [n for n in remaining if n.startswith(sp)]:
                    out[dp + name[len(sp) :]] = remaining.pop(name)
                continue
            missing = [n for n in src_names if n not in remaining]
            if missing:
                side = "native checkpoint" if to == "ours" else "hf_hybrid model"
                fail(f"the {side} has no tensor {missing[0]} (needed by the {self.model_type} mapping)")
            tensors = [remaining.pop(n) for n in src_names]
            if fn is not None:
                tensors = fn(tensors, ctx)
            if len(tensors) != len(dst_names):
                raise RuntimeError(f"internal error: rule {rule} produced {len(tensors)} tensors")
            out.update(zip(dst_names, tensors))
        if remaining:
            side = "native checkpoint" if to == "ours" else "hf_hybrid model"
            names = sorted(remaining)
            fail(
                f"{len(names)} tensor(s) of the {side} have no counterpart in the {self.model_type} mapping: "
                + ", ".join(names[:6])
            )
        return out


_STRUCTURAL = ("mixer_types", "mlp_types", "hyper_connections")


def _explicit_native_kwargs(kwargs: dict[str, Any], config_class) -> dict[str, Any]:
    """The native config kwargs of an export, made explicit where a native class would fill in a default of
    its own: ``rope_parameters`` always names its ``partial_rotary_factor`` (1.0 when ours rotates the whole
    head; Qwen3-Next / Qwen3.5 default to 0.25), and an option we leave at ``None`` (unused by any of our
    layers, e.g. ``shared_expert_intermediate_size`` of a model without MoE layers) is left to the native
    class's default rather than passed as ``None`` to a field whose type has no ``None``. Whatever is lost
    this way, the round trip through the written config (:meth:`NativeFamily.native_config`) names."""
    rope = kwargs.get("rope_parameters")
    if isinstance(rope, dict):
        kwargs["rope_parameters"] = {**rope, "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}
    # fields whose type has no None (``shared_expert_intermediate_size: int``); ``q_lora_rank: int | None``
    # keeps a None we pass
    no_none = {f.name for f in dataclasses.fields(config_class) if "None" not in str(f.type)}
    return {k: v for k, v in kwargs.items() if not (v is None and k in no_none)}


def _effective_rope(cfg):
    rope = dict(cfg.rope_parameters or {})
    rope.setdefault("partial_rotary_factor", 1.0)
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in rope.items()}


def _describe_difference(name: str, want: Any, got: Any) -> str:
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (a, b) in enumerate(zip(want, got)):
            if a != b:
                return (
                    f"HybridConfig.{name}[{i}]={a!r} (layer {i}) has no counterpart (it would become {b!r})"
                )
    return f"HybridConfig.{name}={want!r} has no counterpart (it would become {got!r})"


@dataclass
class VisionWrapperFamily(NativeFamily):
    """A family whose text decoder has no causal-LM class of its own in transformers: its model class is the
    vision-language wrapper ``wrapper_class`` (a name in ``transformers``). Import loads the wrapper and
    keeps the decoder; export builds the wrapper (``model_config``: the wrapper config around the text config,
    with the smallest vision tower the wrapper accepts) and fills the tensors matching
    ``placeholder_weights`` (a regex) with zeros: a placeholder tower, the text function exact."""

    wrapper_class: str = ""
    placeholder_weights: str = ""

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.wrapper_class)

    def complete_native_state(self, native_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The placeholder vision tower: zeros of the shapes the wrapper has."""
        out = dict(state)
        for name, t in native_model.state_dict().items():
            if name not in out and re.match(self.placeholder_weights, name):
                out[name] = torch.zeros(t.shape, dtype=torch.float32)
        return out


def build_empty(model_class, config):
    """``model_class(config)`` with parameters on the meta device (no memory, no random init) and buffers real
    (the non-persistent RoPE tables are computed in ``__init__`` and are not in any state dict)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_class(config)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Assign ``state`` to a model made by :func:`build_empty`; every parameter and persistent buffer must be
    covered (tied weights excepted), nothing left over."""
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    tie = getattr(model, "tie_weights", None)
    if getattr(model.config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        fail(f"{what}: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    if tied and callable(tie):
        model.lm_head.weight = model.get_input_embeddings().weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        fail(f"{what}: tensors left unset (on the meta device): {leftover[:5]}")
