"""A test kit for layer-kind authors, in the spirit of transformers' ``ModelTesterMixin``: the invariance
suite every built-in kind passes, runnable on any registered kind (mixer or MLP) in one call::

    from hf_hybrid.testing import check_layer_kind

    def test_my_mixer():
        check_layer_kind("my_mixer", config_overrides={"my_mixer_width": 8})

or one pytest case per check (a failure then names the check)::

    @pytest.mark.parametrize("check", CHECKS)
    def test_my_mixer(check):
        check_layer_kind("my_mixer", checks=[check])

Each check builds a tiny fp32 model whose layers all use the kind (``tiny_config``; an MLP kind sits behind
softmax attention) and raises ``AssertionError`` naming the kind, the check and what differed:

- ``decode``: prefill then token-by-token cached decoding gives the full forward's logits;
- ``two_piece_prefill``: a prefill in two cached pieces gives the one-piece logits;
- ``padding``: left and right padding (garbage in the padded slots, a padded batch of one too) change no real
  token's logits;
- ``packing``: documents packed in one row give each document's own logits, in every form transformers
  produces: ``position_ids`` alone, ``DataCollatorWithFlattening`` with position ids, and with its flash
  keyword arguments (``cu_seq_lens_*``);
- ``batch``: a row of a batch gives the logits it gives alone;
- ``generate``: ``generate()`` with the cache gives the tokens it gives without (greedy, left-padded batch),
  and each row of the batch the tokens it gives alone;
- ``beam_search``: beam search with the cache gives the tokens it gives without, and a cache reordered as beam
  search reorders it continues exactly as the reordered inputs do;
- ``save_load``: ``save_pretrained`` → ``from_pretrained`` gives the same logits, bit for bit;
- ``cost``: each kind's cost formula and the inspector's per-layer parameter counts equal the built modules',
  its matmul weights outside the layers (besides embedding and LM head) equal the model's, and the
  inspector's cache + state bytes equal the bytes the cache really holds after a forward;
- ``gradients``: one backward of the LM loss reaches every trainable parameter with a finite, non-zero
  gradient;
- ``aux_terms``: the auxiliary terms the kind declares (``aux_terms()``) enter the training loss with their
  coefficients, every recorded term is declared, and the gradient is the same whether the model adds them to
  its loss (``labels``) or attaches them while the client builds the LM loss from the logits.

Tolerance: fp32, ``atol=1e-5`` (``ATOL``) — cached and uncached paths, chunked and step-by-step forms, compute
the same sums in another order; nothing else differs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .cache import HybridCache
from .configuration_hybrid import HybridConfig
from .cost import estimate_cost
from .modeling_hybrid import HybridForCausalLM
from .registry import mixer_spec, mixer_specs, mlp_spec, mlp_specs

ATOL = 1e-5
VOCAB = 64

#: A tiny decoder; the built-in kinds' sizes are small enough that every check runs in well under a second.
TINY: Mapping[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "mamba_head_dim": 8,
    "mamba_state_size": 8,
    "kda_num_heads": 2,
    "kda_head_dim": 8,
    "kda_gate_rank": 6,
    "linear_chunk_size": 4,  # several chunks per sequence: the chunked form is really exercised
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
}


def tiny_config(mixer: str | None = None, *, mlp: str | None = None, **overrides: Any) -> HybridConfig:
    """A tiny config whose every layer uses ``mixer`` (default: attention) and ``mlp`` (default: dense);
    ``overrides`` (``mixer_types=``, ``mixer_pattern=``, the kind's own fields, ...) win."""
    kwargs: dict[str, Any] = dict(TINY)
    n = overrides.get("num_hidden_layers", kwargs["num_hidden_layers"])
    if "mixer_pattern" not in overrides:
        kwargs["mixer_types"] = [mixer or "attention"] * n
    if "mlp_pattern" not in overrides:
        kwargs["mlp_types"] = [mlp or "dense"] * n
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def _ids(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _pad(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


# ---- the checks: each takes a fresh eval-mode model and the tolerance -------------------------------------


@torch.no_grad()
def check_decode(model: HybridForCausalLM, atol: float = ATOL) -> None:
    ids = _ids(2, 14, seed=1)
    full = model(ids).logits
    cache = HybridCache(config=model.config)
    steps = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
    for t in range(5, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    _close(torch.cat(steps, 1), full, "prefill 5 + token-by-token decode vs full forward", atol)
    assert cache.get_seq_length() == ids.shape[1], f"cache length {cache.get_seq_length()} != {ids.shape[1]}"


@torch.no_grad()
def check_two_piece_prefill(model: HybridForCausalLM, atol: float = ATOL) -> None:
    ids = _ids(2, 15, seed=2)
    one = model(ids).logits
    cache = HybridCache(config=model.config)
    a = model(ids[:, :7], past_key_values=cache, use_cache=True).logits
    b = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    _close(torch.cat([a, b], 1), one, "prefill 7 + 8 vs one prefill of 15", atol)


@torch.no_grad()
def check_padding(model: HybridForCausalLM, atol: float = ATOL) -> None:
    seqs = [_ids(n, seed=3 + n) for n in (11, 6)]
    alone = [model(s[None]).logits[0] for s in seqs]
    for side in ("left", "right"):
        ids, mask = _pad(seqs, side)
        ids = torch.where(mask.bool(), ids, _ids(*ids.shape, seed=5))  # garbage in the padded slots
        batch = model(ids, attention_mask=mask).logits
        for i in range(len(seqs)):
            _close(batch[i][mask[i].bool()], alone[i], f"{side}-padded row {i} vs alone", atol)
    # a batch of one with padding (the mask must not be skipped because B == 1)
    ids = torch.cat([_ids(4, seed=6), seqs[1]])[None]
    mask = torch.tensor([[0] * 4 + [1] * len(seqs[1])])
    _close(model(ids, attention_mask=mask).logits[0, 4:], alone[1], "left-padded batch of one vs alone", atol)


@torch.no_grad()
def check_packing(model: HybridForCausalLM, atol: float = ATOL) -> None:
    from transformers import DataCollatorWithFlattening

    seqs = [_ids(n, seed=7 + n).tolist() for n in (9, 3, 6)]
    alone = torch.cat([model(torch.tensor(s)[None]).logits[0] for s in seqs])
    forms: dict[str, dict[str, torch.Tensor]] = {
        "position_ids only": {
            "input_ids": torch.tensor(sum(seqs, []))[None],
            "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
        }
    }
    for flash in (False, True):
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash, return_position_ids=True)
        batch = collator([{"input_ids": s} for s in seqs])
        name = "collator cu_seq_lens" if flash else "collator position_ids"
        forms[name] = {k: v for k, v in batch.items() if k != "labels"}
    for name, inputs in forms.items():
        _close(model(**inputs).logits[0], alone, f"packed ({name}) vs each document alone", atol)


@torch.no_grad()
def check_batch(model: HybridForCausalLM, atol: float = ATOL) -> None:
    ids = _ids(3, 10, seed=8)
    batch = model(ids).logits
    for i in range(ids.shape[0]):
        _close(batch[i], model(ids[i : i + 1]).logits[0], f"row {i} of a batch of 3 vs alone", atol)


def _generate(model: HybridForCausalLM, ids, mask, use_cache: bool, **kwargs) -> torch.Tensor:
    model.generation_config.pad_token_id = 0
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache, **kwargs
    )


@torch.no_grad()
def check_generate(model: HybridForCausalLM, atol: float = ATOL) -> None:
    prompts = [_ids(n, seed=9 + n) for n in (6, 3)]
    ids, mask = _pad(prompts, "left")
    cached, uncached = (_generate(model, ids, mask, use_cache) for use_cache in (True, False))
    assert torch.equal(cached, uncached), f"greedy generate with cache {cached} != without {uncached}"
    for i, p in enumerate(prompts):
        alone = _generate(model, p[None], torch.ones_like(p[None]), True)
        assert cached[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist(), (
            f"row {i} of a left-padded batch generates {cached[i, ids.shape[1] :].tolist()}, alone "
            f"{alone[0, len(p) :].tolist()}"
        )


@torch.no_grad()
def check_beam_search(model: HybridForCausalLM, atol: float = ATOL) -> None:
    ids = _ids(1, 4, seed=10)
    mask = torch.ones_like(ids)
    cached, uncached = (_generate(model, ids, mask, use_cache, num_beams=3) for use_cache in (True, False))
    assert torch.equal(cached, uncached), f"beam search with cache {cached} != without {uncached}"
    # the reorder itself, on a batch whose rows differ: continue from rows (2, 2, 0)
    batch = ids.repeat(3, 1)
    batch[1:, -1] = (batch[1:, -1] + torch.tensor([1, 2])) % VOCAB
    nxt = _ids(3, 1, seed=11)
    cache = HybridCache(config=model.config)
    model(batch, past_key_values=cache, use_cache=True)
    perm = torch.tensor([2, 2, 0])
    cache.reorder_cache(perm)
    stepped = model(nxt, past_key_values=cache, use_cache=True).logits
    direct = model(torch.cat([batch[perm], nxt], 1)).logits[:, -1:]
    _close(stepped, direct, "a step after reorder_cache vs the reordered inputs", atol)


@torch.no_grad()
def check_save_load(model: HybridForCausalLM, atol: float = ATOL) -> None:
    ids = _ids(2, 9, seed=12)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = HybridForCausalLM.from_pretrained(tmp).eval()
    same = torch.equal(loaded(ids).logits, model(ids).logits)
    assert same, "save_pretrained -> from_pretrained changed the logits"


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every floating-point tensor an object holds (attributes, lists, dicts), each tensor once
    (integer bookkeeping such as a window size is not cache)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or not obj.is_floating_point():
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@torch.no_grad()
def check_cost(model: HybridForCausalLM, atol: float = ATOL) -> None:
    config = model.config
    report = estimate_cost(config, dtype_bytes=4)  # an fp32 model: every cached element is 4 bytes
    # Below every cache window: between steps transformers keeps the last window - 1 tokens of a sliding
    # layer (the step's own token joins them), while the inspector counts the window a step attends over.
    tokens = min([12, *(c.cache_window - 1 for c in report.layers if c.cache_window)])
    assert report.exact, "the inspector could not build and count every layer's modules"
    total = sum(p.numel() for p in model.parameters())
    assert report.total_params == total, (
        f"inspector says {report.total_params} parameters, the model has {total}"
    )
    for i, (mixer, mlp) in enumerate(zip(config.mixer_types, config.mlp_types)):
        # the spec's formula (the inspector's answer when a module cannot be built) against the module
        layer = model.model.layers[i]
        for what, spec, module in (
            ("mixer", mixer_spec(mixer), getattr(layer, "mixer", None)),
            ("MLP", mlp_spec(mlp), getattr(layer, "mlp", None)),
        ):
            if spec.cost is None:
                raise AssertionError(f"{what} {spec.name!r} declares no cost function")
            formula = spec.cost(config, i)
            params = list(module.parameters()) if module is not None else []
            measured = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.ndim >= 2))
            assert (formula.params, formula.matmul_params) == measured, (
                f"layer {i}: the {what} {spec.name!r} cost formula says (params, matmul params) = "
                f"{(formula.params, formula.matmul_params)}, the built module has {measured}"
            )
    # the weights outside the layers that each token multiplies once (the embedding is a lookup, the LM head
    # is counted on its own): the FLOPs the inspector adds for them
    ends = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    layer_params = {id(p) for p in model.model.layers.parameters()}
    outside = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in ends | layer_params)
    assert report.head_matmul_params == outside, (
        f"the inspector counts {report.head_matmul_params} matmul weights outside the layers and the LM "
        f"head, the model has {outside}"
    )
    for layer, cost in zip(model.model.layers, report.layers):
        counted = sum(p.numel() for p in layer.parameters())
        assert cost.params == counted, (
            f"layer {cost.index} ({cost.mixer}, {cost.mlp}): inspector says {cost.params} parameters, the "
            f"module has {counted}"
        )
    cache = HybridCache(config=config)
    model(_ids(1, tokens, seed=13), past_key_values=cache, use_cache=True)
    for i, (layer, cost) in enumerate(zip(cache.layers, report.layers)):
        real = _tensor_bytes(layer, set())
        kept = tokens if cost.cache_window is None else min(tokens, cost.cache_window)
        expected = kept * cost.cache_per_token * report.dtype_bytes + report.state_bytes(cost)
        assert real == expected, (
            f"layer {i} ({cost.mixer}): the cache holds {real} bytes after {tokens} tokens, the inspector "
            f"says {expected}"
        )


def check_gradients(model: HybridForCausalLM, atol: float = ATOL) -> None:
    model.train()
    ids = _ids(2, 12, seed=14)
    model(ids, labels=ids).loss.backward()
    missing, bad, zero = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            bad.append(name)
        elif not p.grad.any():
            zero.append(name)
    assert not (missing or bad or zero), (
        f"after one backward: no gradient for {missing}, non-finite for {bad}, all-zero for {zero}"
    )


def check_aux_terms(model: HybridForCausalLM, atol: float = ATOL) -> None:
    """The auxiliary terms the kind's modules declare (``aux_terms() -> {name: coefficient}``) reach the
    objective: with ``labels`` the training-mode ``loss`` is ``lm_loss + Σ coefficient · term``; every
    recorded term is declared (an undeclared one trains nothing: record diagnostics with ``ctx.add_stat``);
    and the gradient is the same whether the model adds the terms to its ``loss`` or, without ``labels``,
    attaches them to the layers while the client builds the LM loss from the logits (TRL's DPO, a custom
    loop)."""
    model.train()
    ids = _ids(2, 12, seed=15)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(ids, labels=ids)
    declared: dict[str, float] = {}
    for module in model.modules():
        aux_terms = getattr(module, "aux_terms", None)
        if callable(aux_terms) and module is not model:
            declared.update(aux_terms())
    recorded = dict(out.aux_terms or {})
    undeclared = sorted(set(recorded) - set(declared))
    assert not undeclared, (
        f"terms {undeclared} are recorded (ctx.add_aux) but no module declares them in aux_terms()"
    )
    if any(getattr(m, "replaces_lm_loss", lambda: False)() for m in model.modules() if m is not model):
        return  # the terms are the whole objective (DSA's dense warm-up): nothing to compare with an LM loss
    for name in recorded:
        assert recorded[name].requires_grad, f"term {name!r} is recorded without its graph: it trains nothing"
    expected = out.lm_loss + sum(coef * recorded[name] for name, coef in declared.items() if name in recorded)
    _close(out.loss, expected, "training loss vs lm_loss + Σ coefficient · term", atol)
    in_loss = torch.autograd.grad(out.loss, params, allow_unused=True)
    logits = model(ids).logits  # no labels: the terms are attached to the layers
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    attached = torch.autograd.grad(lm, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, in_loss, attached):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            _close(
                b, a, f"gradient of {name}: terms attached (client's LM loss) vs in the model's loss", atol
            )


CHECKS: Mapping[str, Callable[..., None]] = {
    "decode": check_decode,
    "two_piece_prefill": check_two_piece_prefill,
    "padding": check_padding,
    "packing": check_packing,
    "batch": check_batch,
    "generate": check_generate,
    "beam_search": check_beam_search,
    "save_load": check_save_load,
    "cost": check_cost,
    "gradients": check_gradients,
    "aux_terms": check_aux_terms,
}


def check_layer_kind(
    mixer: str | None = None,
    *,
    mlp: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    checks: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    atol: float = ATOL,
    seed: int = 0,
) -> list[str]:
    """Run the invariance suite on a registered kind: ``mixer`` (a token-mixer name) or ``mlp`` (an MLP name),
    or both, or on the layers ``config_overrides`` spell out. ``config_overrides`` go to :func:`tiny_config`
    (the kind's own fields, a layer pattern that mixes it with others, ...); ``checks`` picks some of
    :data:`CHECKS` (default: all), ``skip`` leaves some out (say why in your test). Each check gets a freshly
    built model (seeded with ``seed``). Returns the names of the checks run; raises ``AssertionError`` naming
    the kind and the check at the first failure."""
    layers = {"mixer_types", "mixer_pattern", "mlp_types", "mlp_pattern"}
    if mixer is None and mlp is None and not layers & set(config_overrides or {}):
        raise ValueError(
            "check_layer_kind: name a mixer kind, an MLP kind, or the layers in config_overrides"
        )
    if mixer is not None and mixer not in mixer_specs():
        raise ValueError(
            f"check_layer_kind: mixer {mixer!r} is not registered; known: {', '.join(mixer_specs())}"
        )
    if mlp is not None and mlp not in mlp_specs():
        raise ValueError(f"check_layer_kind: MLP {mlp!r} is not registered; known: {', '.join(mlp_specs())}")
    names = list(CHECKS) if checks is None else list(checks)
    unknown = sorted(set(names) - set(CHECKS)) + sorted(set(skip) - set(CHECKS))
    if unknown:
        raise ValueError(f"check_layer_kind: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    config = tiny_config(mixer, mlp=mlp, **dict(config_overrides or {}))
    kind = ", ".join(f"{k} {v!r}" for k, v in (("mixer", mixer), ("MLP", mlp)) if v is not None) or (
        f"layers {config.mixer_types} / {config.mlp_types}"
    )
    run = []
    for name in names:
        if name in skip:
            continue
        torch.manual_seed(seed)
        model = HybridForCausalLM(config).eval()
        try:
            CHECKS[name](model, atol)
        except AssertionError as err:
            raise AssertionError(f"{kind}, check {name!r}: {err}") from None
        run.append(name)
    return run


__all__ = [
    "ATOL",
    "CHECKS",
    "TINY",
    "check_layer_kind",
    "tiny_config",
    "check_aux_terms",
    "check_batch",
    "check_beam_search",
    "check_cost",
    "check_decode",
    "check_generate",
    "check_gradients",
    "check_packing",
    "check_padding",
    "check_save_load",
    "check_two_piece_prefill",
]
