"""Hybridize a dense checkpoint: replace chosen attention layers by linear-time mixers initialised from the
attention weights (Mamba-in-Llama, LoLCATs, RADLADS), then recover quality by distillation
(``hf_hybrid.distill``).

    hf-hybrid hybridize SRC DST --pattern "3:1 gated_deltanet:attention"
    hf-hybrid hybridize SRC DST --attention-layers 2,5 --mixer mamba2
    hf-hybrid hybridize SRC DST --select kl --num-attention 2 --mixer gated_deltanet

``SRC`` is an hf_hybrid checkpoint or a dense Llama / Qwen2 / Qwen3 / Mistral one (imported on the way).

Which layers: ``pattern`` uses the config's own shorthand (``"3:1 gated_deltanet:attention"`` expands
cyclically over the layers, so on 6 layers ``"2:1 ..."`` keeps layers 2 and 5 and ``"5:1 ..."`` keeps layer
5); every name other than ``attention`` says which mixer replaces that layer. ``attention_layers=[2, 5]``
(with ``mixer=``) keeps those and replaces every other attention layer. :func:`rank_layers` measures, for each
attention layer, the KL to the source (or the LM-loss increase) when that layer alone is replaced by its
initialised mixer; the layers that hurt most stay attention (``--select kl --num-attention K``).

Initialisation (each mixer's ``hybridize_init`` hook in its own file, read through ``INIT_TABLE``, stating
what it inherits; the statement is printed and recorded in ``config.hf_hybrid_lineage["init"]``): the
attention's query / key / value / output projections become the mixer's (Mamba-in-Llama's Q→C, K→B, V→x for
Mamba-2), the mixer gets one head per query head of the same head dim, and GQA key / value heads are repeated
for the query heads that share them (``kv_repeat``). Qwen3's per-head q/k RMSNorm weights are folded into the
projection rows (exact under Gated DeltaNet's L2 norm, up to the SiLU of the short conv); the short convs
start as the identity (last tap 1). Gates and decays start at a stated value (the mixer's own init:
log-uniform decay rates, Mamba-2's dt range). What cannot be inherited is listed as dropped: RoPE (the linear
mixers have no positions), the softmax, q/k/v biases where the mixer has none. Nothing here is
function-preserving: the student starts near the teacher and stage 1 (attention transfer) closes the gap.

Every layer that is not replaced keeps its weights bit for bit (tests check it); MLPs, norms and embeddings
too. A mixer becomes convertible by declaring ``hybridize_init=HybridizeInit(geometry, apply, statement)``
in its spec (``kda`` does: q/k/v/o inherited as for linear attention, its per-channel decay and low-rank gates
at a stated init); the CLI offers a mixer only when it is registered with one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..card import source_name as card_source_name
from ..configuration_hybrid import HybridConfig, _expand_pattern
from ..mixers.attention import SOFTMAX_KINDS
from ..mixers.from_attention import identity_conv_  # noqa: F401  (re-exported)
from ..registry import HybridizeInit, mixer_specs
from .checkpoint import as_dtype, check_dst, check_layer_indices, write_checkpoint
from .source import derived_lineage, load_source, source_config

# HybridAttention layers (q/k/v/o projections to inherit) and MLA layers (their per-head q/k/v read through
# the latent: AttentionWeights.from_mla)
REPLACEABLE = ("attention", "sliding_attention", "mla")


# ------------------------------------------------------------------------------------------------------------
# the attention weights of one layer


@dataclass
class AttentionWeights:
    """One ``HybridAttention`` layer's weights, per head (fp32). ``h`` query heads, ``hkv`` key/value heads,
    head dim ``d``, hidden size ``H``. ``q_norm`` / ``k_norm`` [d] are Qwen3's per-head RMSNorm weights (None
    without)."""

    q: torch.Tensor  # [h, d, H]
    k: torch.Tensor  # [hkv, d, H]
    v: torch.Tensor  # [hkv, d, H]
    o: torch.Tensor  # [H, h·d]
    q_bias: torch.Tensor | None  # [h, d]
    k_bias: torch.Tensor | None  # [hkv, d]
    v_bias: torch.Tensor | None  # [hkv, d]
    gate: torch.Tensor | None  # [h, d, H]: the sigmoid output gate (attention_output_gate)
    q_norm: torch.Tensor | None  # [d]
    k_norm: torch.Tensor | None  # [d]

    @classmethod
    def from_module(cls, attn: nn.Module) -> AttentionWeights:
        if hasattr(attn, "kv_b_proj"):
            return cls.from_mla(attn)
        h, hkv, d = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        hidden = attn.q_proj.weight.shape[1]

        def per_head(t: torch.Tensor | None, heads: int, width: int) -> torch.Tensor | None:
            return None if t is None else t.detach().float().reshape(heads, width, *t.shape[1:])

        q, gate = per_head(attn.q_proj.weight, h, (2 if attn.output_gate else 1) * d), None
        qb = per_head(attn.q_proj.bias, h, (2 if attn.output_gate else 1) * d)
        if attn.output_gate:  # per head: d query rows, then d gate rows (HybridAttention.project)
            q, gate = q[:, :d], q[:, d:]
            qb = None if qb is None else qb[:, :d]
        return cls(
            q=q.reshape(h, d, hidden),
            k=per_head(attn.k_proj.weight, hkv, d),
            v=per_head(attn.v_proj.weight, hkv, d),
            o=attn.o_proj.weight.detach().float(),
            q_bias=qb,
            k_bias=per_head(attn.k_proj.bias, hkv, d),
            v_bias=per_head(attn.v_proj.bias, hkv, d),
            gate=gate,
            q_norm=None if attn.q_norm is None else attn.q_norm.weight.detach().float(),
            k_norm=None if attn.k_norm is None else attn.k_norm.weight.detach().float(),
        )

    @classmethod
    def from_mla(cls, mla: nn.Module) -> AttentionWeights:
        """An MLA layer's per-head maps from x, one key/value head per query head:
        ``q_h = [q_nope; q_pe]`` (``q_b · diag(w_q) · q_a`` with a q latent),
        ``k_h = [W_uk,h · diag(w_kv) · C; k_pe of h's rope key]``, ``v_h = W_uv,h · diag(w_kv) · C``
        (``C`` the latent rows of ``kv_a_proj_with_mqa``, ``w`` the latent norms' weights;
        their per-token 1/rms is dropped). Needs ``dn + dr == dv`` (one head dim)."""
        H, dn, dr, dv = mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        r, R = mla.kv_lora_rank, mla.rope_heads
        if getattr(mla, "output_gate", False):
            raise ValueError(
                f"MLA layer {mla.layer_idx}: mla_output_gate=True (a sigmoid gate on each head's output) has "
                "no counterpart in these per-head maps; allowed: mla_output_gate=False"
            )

        def weight(m: nn.Module) -> torch.Tensor:
            return m.weight.detach().float()

        def norm_weight(m: nn.Module, size: int) -> torch.Tensor:
            return weight(m) if hasattr(m, "weight") else torch.ones(size)

        if mla.q_lora_rank is None:
            q = weight(mla.q_proj)
        else:
            q = weight(mla.q_b_proj) @ (
                norm_weight(mla.q_a_layernorm, mla.q_lora_rank)[:, None] * weight(mla.q_a_proj)
            )
        kv_a = weight(mla.kv_a_proj_with_mqa)
        latent = norm_weight(mla.kv_a_layernorm, r)[:, None] * kv_a[:r]  # (r, D)
        k_pe = kv_a[r:].view(R, dr, -1).repeat_interleave(H // R, dim=0)  # (H, dr, D)
        kv = (weight(mla.kv_b_proj) @ latent).view(H, dn + dv, -1)
        k = torch.cat([kv[:, :dn], k_pe], dim=1)
        return cls(
            q=q.view(H, dn + dr, -1),
            k=k,
            v=kv[:, dn:],
            o=weight(mla.o_proj),
            q_bias=None,
            k_bias=None,
            v_bias=None,
            gate=None,
            q_norm=None,
            k_norm=None,
        )

    @property
    def heads(self) -> int:
        return self.q.shape[0]

    @property
    def kv_repeat(self) -> int:
        return self.q.shape[0] // self.k.shape[0]

    def query(self, *, scale: float = 1.0) -> torch.Tensor:
        """[h·d, H]: query rows with the q_norm weight folded in, times ``scale``."""
        q = self.q if self.q_norm is None else self.q * self.q_norm[None, :, None]
        return (q * scale).reshape(-1, self.q.shape[-1])

    def key(self) -> torch.Tensor:
        """[h·d, H]: key rows (k_norm folded in), KV heads repeated for the query heads that share them."""
        k = self.k if self.k_norm is None else self.k * self.k_norm[None, :, None]
        return k.repeat_interleave(self.kv_repeat, dim=0).reshape(-1, k.shape[-1])

    def value(self) -> torch.Tensor:
        """[h·d, H]: value rows, KV heads repeated."""
        return self.v.repeat_interleave(self.kv_repeat, dim=0).reshape(-1, self.v.shape[-1])

    def biases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q, k, v) biases [h·d] each, expanded like the weights (k_norm / q_norm folded); None without
        biases."""
        if self.q_bias is None:
            return None
        qb = self.q_bias if self.q_norm is None else self.q_bias * self.q_norm
        kb = self.k_bias if self.k_norm is None else self.k_bias * self.k_norm
        rep = self.kv_repeat
        return (
            qb.reshape(-1),
            kb.repeat_interleave(rep, 0).reshape(-1),
            self.v_bias.repeat_interleave(rep, 0).reshape(-1),
        )


# ------------------------------------------------------------------------------------------------------------
# the per-mixer table


# How attention becomes a mixer kind is the kind's own knowledge: its spec's ``hybridize_init`` hook (a
# HybridizeInit with ``geometry``, ``apply`` and ``statement``, declared in the kind's file).
MixerInit = HybridizeInit


class _InitTable(Mapping):
    """``{mixer: HybridizeInit}`` of every registered mixer whose spec declares a ``hybridize_init`` hook
    (read-only, read from the registry on access)."""

    def _table(self) -> dict[str, HybridizeInit]:
        return {n: s.hybridize_init for n, s in mixer_specs().items() if s.hybridize_init is not None}

    def __getitem__(self, name: str) -> HybridizeInit:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


INIT_TABLE: Mapping[str, HybridizeInit] = _InitTable()


def available_mixers() -> list[str]:
    """Mixers hybridize can convert attention into in this process: registered with a ``hybridize_init``."""
    return list(INIT_TABLE)


# ------------------------------------------------------------------------------------------------------------
# the plan: which layers become which mixer


@dataclass
class HybridizePlan:
    """``targets[i]``: the mixer replacing layer ``i`` (only replaced layers are keys); ``mixer_types``: the
    student's list; ``overrides``: config fields set on the student (geometry + the caller's
    ``mixer_config``)."""

    targets: dict[int, str]
    mixer_types: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m in REPLACEABLE]


def plan_hybridize(
    config: HybridConfig,
    *,
    pattern: str | None = None,
    attention_layers: list[int] | tuple[int, ...] | None = None,
    mixer: str | None = None,
    mixer_config: dict[str, Any] | None = None,
) -> HybridizePlan:
    """Validate a request against ``config`` (errors name the argument, the value and what is allowed); writes
    nothing. Give ``pattern`` (the config's shorthand), or ``attention_layers`` with ``mixer``."""
    allowed = available_mixers()
    types = list(config.mixer_types)
    n = len(types)
    replaceable = [i for i, t in enumerate(types) if t in REPLACEABLE]
    if not replaceable:
        raise ValueError(f"hybridize: the source has no attention layers to replace (mixer_types={types})")
    if (pattern is None) == (attention_layers is None):
        raise ValueError(
            "hybridize: give exactly one of pattern (e.g. '3:1 gated_deltanet:attention') or "
            "attention_layers (e.g. [2, 5]) with mixer"
        )

    def check_mixer(name: str, where: str) -> None:
        if name not in allowed:
            raise ValueError(
                f"hybridize: {where}={name!r} is not a mixer hybridize can "
                f"initialise from attention; choose one of: {', '.join(allowed)}"
            )

    if pattern is not None:
        wanted = _expand_pattern(
            pattern, n, "pattern", tuple(dict.fromkeys([*REPLACEABLE, *allowed, *types]))
        )
        if mixer is not None:
            others = sorted({m for m in wanted if m not in REPLACEABLE and m != mixer})
            if others:
                raise ValueError(
                    f"hybridize: pattern {pattern!r} names {others} but "
                    f"mixer={mixer!r}; leave mixer out when the pattern names the mixers"
                )
        names_attention = any(m in REPLACEABLE for m in re.split(r"[\s:,]+", pattern.strip()))
        if names_attention and not any(m in REPLACEABLE for m in wanted):
            raise ValueError(
                f"hybridize: pattern {pattern!r} asks to keep attention layers, but over the "
                f"source's {n} layers it expands to {wanted}, which keeps none (the period "
                "is longer than the model); use a shorter period or attention_layers=[...]"
            )
        targets = {}
        for i, (old, new) in enumerate(zip(types, wanted)):
            if new == old or (old in REPLACEABLE and new in REPLACEABLE):
                continue  # kept as it is
            if old not in REPLACEABLE:
                raise ValueError(
                    f"hybridize: pattern {pattern!r} puts {new!r} at layer {i}, "
                    f"which is {old!r} in the source; only attention layers "
                    f"({replaceable}) can be replaced — name {old!r} at that position"
                )
            check_mixer(new, f"pattern layer {i}")
            targets[i] = new
    else:
        if mixer is None:
            raise ValueError(f"hybridize: attention_layers needs mixer=; choose one of: {', '.join(allowed)}")
        check_mixer(mixer, "mixer")
        keep = check_layer_indices(attention_layers, n, what="hybridize: attention_layers")
        not_attention = [(i, types[i]) for i in keep if types[i] not in REPLACEABLE]
        if not_attention:
            raise ValueError(
                "hybridize: attention_layers must name attention layers of the source; "
                + ", ".join(f"layer {i} is {t!r}" for i, t in not_attention)
                + f"; attention layers: {replaceable}"
            )
        targets = {i: mixer for i in replaceable if i not in keep}
    if not targets:
        raise ValueError(
            f"hybridize: nothing to replace — the request keeps every attention layer ({replaceable})"
        )
    mla_targets = sorted(i for i in targets if types[i] == "mla")
    if mla_targets:
        dqk, dv = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
        if not dqk == dv == config.head_dim:
            raise ValueError(
                f"hybridize: head dims cannot map — MLA layers {mla_targets} have q/k head dim "
                f"qk_nope_head_dim + qk_rope_head_dim = {dqk} and v_head_dim={dv}; the new mixer takes one "
                f"head dim per head (head_dim={config.head_dim}): allowed when all three are equal (as "
                "hf_hybrid.convert.mla makes them)"
            )
        if config.attention_bias:
            raise ValueError(
                f"hybridize: MLA layers {mla_targets} have attention_bias=True (biases on the latent "
                "projections), which the new mixers cannot inherit; allowed: False"
            )

    overrides: dict[str, Any] = {}
    for name in sorted(set(targets.values())):
        geometry = INIT_TABLE[name].geometry(config)
        already = [i for i, t in enumerate(types) if t == name]
        for key, value in geometry.items():
            have = getattr(config, key) if already else value  # an unused outside kind's field is absent
            if have != value:
                raise ValueError(
                    f"hybridize: head dims cannot map — layers {already} are already {name!r} "
                    f"with {key}={have}, but inheriting the attention's heads needs "
                    f"{key}={value} (num_attention_heads={config.num_attention_heads}, "
                    f"head_dim={config.head_dim}); one {key} applies to every {name!r} layer"
                )
        overrides.update(geometry)
    for key, value in (mixer_config or {}).items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                "hybridize: head dims cannot map — mixer_config sets "
                f"{key}={value!r}, but inheriting the attention's heads needs "
                f"{key}={overrides[key]} (one head per query head, head_dim={config.head_dim})"
            )
        declared = {f.name for m in set(targets.values()) for f in mixer_specs()[m].config_fields}
        if not hasattr(config, key) and key not in declared:
            raise ValueError(f"hybridize: mixer_config names {key!r}, which is not a HybridConfig field")
        overrides[key] = value
    mixer_types = [targets.get(i, t) for i, t in enumerate(types)]
    return HybridizePlan(targets=targets, mixer_types=mixer_types, overrides=overrides)


def student_config(config: HybridConfig, plan: HybridizePlan) -> HybridConfig:
    d = config.to_dict()
    d.pop("layer_types", None)
    d.update(plan.overrides, mixer_types=plan.mixer_types)
    if config.attention_logit_multipliers is not None:  # a layer that leaves softmax attention has no logits
        d["attention_logit_multipliers"] = [
            m if t in SOFTMAX_KINDS else 1.0
            for m, t in zip(config.attention_logit_multipliers, plan.mixer_types)
        ]
    new = HybridConfig.from_dict(d)
    new._attn_implementation = config._attn_implementation
    return new


def init_statements(config: HybridConfig, mixers: list[str] | set[str]) -> dict[str, dict[str, list[str]]]:
    """Per mixer: what is inherited from the attention, what is new (with its init), what is dropped."""
    return {m: INIT_TABLE[m].statement(config) for m in sorted(set(mixers))}


def format_statements(statements: dict[str, dict[str, list[str]]]) -> str:
    lines = []
    for mixer, parts in statements.items():
        lines.append(f"{mixer}:")
        for key in ("inherited", "new", "dropped"):
            for item in parts.get(key, []):
                lines.append(f"  {key:9s} {item}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# the model


def hybridize_model(
    model,
    *,
    pattern: str | None = None,
    attention_layers: list[int] | tuple[int, ...] | None = None,
    mixer: str | None = None,
    mixer_config: dict[str, Any] | None = None,
    seed: int = 0,
    lineage_options: dict[str, Any] | None = None,
):
    """Hybridize an in-memory ``HybridForCausalLM`` (left untouched): a new model in the source's dtype and
    device whose chosen attention layers are replaced (see the module docstring). New tensors come from the
    model's ``_init_weights`` under ``torch.manual_seed(seed)`` (the global RNG state is restored), then the
    inherited ones are written over them; every other tensor is copied from the source."""
    from ..modeling_hybrid import HybridForCausalLM

    config = model.config
    plan = plan_hybridize(
        config, pattern=pattern, attention_layers=attention_layers, mixer=mixer, mixer_config=mixer_config
    )
    new_config = student_config(config, plan)
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = HybridForCausalLM(new_config)
    replaced = {f"model.layers.{i}.mixer." for i in plan.targets}
    state = {
        k: v.detach().clone().float()
        for k, v in model.state_dict().items()
        if not any(k.startswith(p) for p in replaced)
    }
    result = new.load_state_dict(state, strict=False)
    stray = [k for k in result.missing_keys if not any(k.startswith(p) for p in replaced)]
    if config.tie_word_embeddings:
        stray = [k for k in stray if k != "lm_head.weight"]
    if stray or result.unexpected_keys:
        raise RuntimeError(f"internal error: hybridized model does not match the source: {result}")
    notes: dict[int, list[str]] = {}
    for i, name in plan.targets.items():
        weights = AttentionWeights.from_module(model.model.layers[i].mixer)
        layer_notes = INIT_TABLE[name].apply(new.model.layers[i].mixer, weights, new_config)
        if config.mixer_types[i] == "mla":
            layer_notes = [
                *(layer_notes or []),
                "from MLA: per-head q/k/v read through the latent (kv_b · kv_a), one key/value head per "
                "query head"
                + (
                    ", latent norm weights folded (their per-token 1/rms dropped)"
                    if config.mla_latent_norm
                    else ""
                ),
            ]
        if layer_notes:
            notes[i] = layer_notes
    new = new.to(device=param.device, dtype=param.dtype)
    new.train(model.training)
    statements = init_statements(new_config, plan.targets.values())
    options = {
        "pattern": pattern,
        "attention_layers": plan.attention_layers,
        "replaced": {str(i): m for i, m in sorted(plan.targets.items())},
        "mixer_config": dict(mixer_config or {}),
        "seed": seed,
        **(lineage_options or {}),
    }
    lineage = derived_lineage(dict(config.hf_hybrid_lineage or {}), None, "hybridize", options)
    lineage["init"] = statements
    if notes:
        lineage["init_notes"] = {str(i): v for i, v in notes.items()}
    new.config.hf_hybrid_lineage = lineage
    return new


def hybridize(
    model_or_dir,
    dst: str | os.PathLike | None = None,
    *,
    pattern: str | None = None,
    attention_layers: list[int] | tuple[int, ...] | None = None,
    mixer: str | None = None,
    mixer_config: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
):
    """Hybridize a model or checkpoint directory (hf_hybrid, or Llama / Qwen2 / Qwen3 / Mistral imported on
    the way). With ``dst``: save there (model card with the lineage and init statements) and return the path;
    without: return the model. Every check runs before anything is written."""
    if isinstance(model_or_dir, nn.Module):
        new = hybridize_model(
            model_or_dir,
            pattern=pattern,
            attention_layers=attention_layers,
            mixer=mixer,
            mixer_config=mixer_config,
            seed=seed,
        )
        return new if dst is None else write_checkpoint(new, dst, dtype=as_dtype(dtype) if dtype else None)
    src = model_or_dir
    if dst is not None:
        check_dst(dst)
    config, _ = source_config(src)
    plan_hybridize(
        config, pattern=pattern, attention_layers=attention_layers, mixer=mixer, mixer_config=mixer_config
    )
    model, source_dtype = load_source(src, dtype=torch.float32)
    new = hybridize_model(
        model,
        pattern=pattern,
        attention_layers=attention_layers,
        mixer=mixer,
        mixer_config=mixer_config,
        seed=seed,
    )
    lineage = new.config.hf_hybrid_lineage
    lineage.setdefault("base_model", card_source_name(src))
    lineage["source"] = os.fspath(src)
    if dst is None:
        return new
    return write_checkpoint(new, dst, src=src, dtype=as_dtype(dtype) if dtype is not None else source_dtype)


# ------------------------------------------------------------------------------------------------------------
# measured layer selection


@torch.no_grad()
def distillation_gap(student, teacher, blocks: torch.Tensor, *, batch_size: int = 4) -> dict[str, float]:
    """Token-mean KL(teacher ‖ student) of the next-token distributions and both LM losses on ``blocks`` [N,
    T] (eval mode, fp32 softmax)."""
    import torch.nn.functional as F

    kl = s_loss = t_loss = 0.0
    count = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(next(student.parameters()).device)
        s = student(input_ids=ids, labels=ids, use_cache=False)
        t = teacher(input_ids=ids, labels=ids, use_cache=False)
        n = ids[:, 1:].numel()
        t_logp = F.log_softmax(t.logits[:, :-1].float(), -1)
        s_logp = F.log_softmax(s.logits[:, :-1].float(), -1)
        kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
        s_loss += float(s.lm_loss) * n
        t_loss += float(t.lm_loss) * n
        count += n
    return {
        "kl": kl / count,
        "loss": s_loss / count,
        "teacher_loss": t_loss / count,
        "loss_increase": (s_loss - t_loss) / count,
    }


def rank_layers(
    teacher,
    blocks: torch.Tensor,
    *,
    mixer: str,
    criterion: str = "kl",
    mixer_config: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """For each attention layer ``i`` of ``teacher``: replace it alone by its initialised ``mixer`` and
    measure the KL to the teacher and the LM-loss increase on ``blocks``. Sorted by ``criterion`` (``kl`` |
    ``loss``), the layer that hurts most first: those are the ones to keep as attention."""
    if criterion not in ("kl", "loss"):
        raise ValueError(f"rank_layers: criterion={criterion!r} is not known; choose kl or loss")
    was = teacher.training
    teacher.eval()
    attention = [i for i, t in enumerate(teacher.config.mixer_types) if t in REPLACEABLE]
    rows = []
    try:
        for i in attention:
            keep = [j for j in attention if j != i]
            student = hybridize_model(
                teacher, attention_layers=keep, mixer=mixer, mixer_config=mixer_config, seed=seed
            ).eval()
            gap = distillation_gap(student, teacher, blocks, batch_size=batch_size)
            rows.append({"layer": i, "kl": gap["kl"], "loss_increase": gap["loss_increase"]})
            del student
    finally:
        teacher.train(was)
    key = "kl" if criterion == "kl" else "loss_increase"
    return sorted(rows, key=lambda r: -r[key])


def format_ranking(rows: list[dict[str, Any]], keep: int) -> str:
    lines = ["rank  layer  KL(teacher‖student)  LM-loss increase   (layer alone replaced)"]
    for rank, r in enumerate(rows):
        mark = "  <- keeps attention" if rank < keep else ""
        lines.append(f"{rank + 1:4d}  {r['layer']:5d}  {r['kl']:19.4f}  {r['loss_increase']:16.4f}{mark}")
    return "\n".join(lines)


def selection_blocks(src: str | os.PathLike, *, context: int = 256, blocks: int = 8) -> torch.Tensor:
    """Held-out text (``hf_hybrid.data``'s local source) tokenised with ``src``'s tokenizer: [blocks,
    context]."""
    from transformers import AutoTokenizer

    from ..data import build_lm_datasets

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(src))
    _, held = build_lm_datasets(
        tokenizer,
        context,
        max_train_chars=20_000,
        max_eval_blocks=blocks,
        max_eval_chars=blocks * context * 8,
    )
    return held.blocks


__all__ = [
    "AttentionWeights",
    "HybridizePlan",
    "INIT_TABLE",
    "MixerInit",
    "available_mixers",
    "distillation_gap",
    "format_ranking",
    "format_statements",
    "hybridize",
    "hybridize_model",
    "init_statements",
    "plan_hybridize",
    "rank_layers",
    "student_config",
]
