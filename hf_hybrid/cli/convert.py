"""``hf-hybrid`` subcommands that write a checkpoint: ``import``, ``export``, ``upcycle``, ``convert-dsa``,
``hybridize``, ``mla``. Each handler calls the library function of the same job (``hf_hybrid.convert.*``)
with keyword arguments and prints a summary: what was written, and the cost before and after."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import add_trust_flag, layers_arg, options_kwargs

if TYPE_CHECKING:
    from ..configuration_hybrid import HybridConfig

# Allowed values of the options below, spelled here so that building the parser imports no torch (``--help``
# answers at once); tests/test_cli.py checks them against the library's own tuples.
ROUTER_CHOICES = ("softmax", "sigmoid")  # hf_hybrid.convert.upcycle.ROUTERS
SELECTOR_CHOICES = ("indexer", "structured")  # hf_hybrid.convert.dsa.SELECTORS
MODE_CHOICES = ("sparse", "dense_warmup", "dense")  # hf_hybrid.convert.dsa.MODES
ROPE_SELECT_CHOICES = ("uniform", "frequency", "norm")  # hf_hybrid.convert.mla.ROPE_SELECT
ROPE_KEY_CHOICES = ("per_kv_head", "shared")  # hf_hybrid.convert.mla.ROPE_KEYS
FACTORIZATION_CHOICES = ("joint", "separate")  # hf_hybrid.convert.mla.FACTORIZATIONS


COST_CONTEXTS = (4096, 131072)  # the contexts of the before / after lines


def cost_line(config: HybridConfig, contexts: tuple[int, ...] = COST_CONTEXTS) -> str:
    from ..cost import estimate_cost, format_count, format_tokens

    report = estimate_cost(config, contexts=contexts)
    flops = ", ".join(f"{format_count(report.flops_per_token(c))} @{format_tokens(c)}" for c in contexts)
    return (
        f"total {format_count(report.total_params)}, active "
        f"{format_count(report.active_params)} params; FLOPs/token {flops}"
    )


def _cache_line(config: HybridConfig, context: int = 32768) -> str:
    from ..cost import estimate_cost, format_bytes

    report = estimate_cost(config, contexts=(context,))
    return f"cache {format_bytes(report.cache_bytes(context) / context)}/token at {context // 1024}K (bf16)"


def _replaced_text(replaced: dict[str, str]) -> str:
    """``{"0": "gated_deltanet", "1": "gated_deltanet", "3": "mamba2"}`` -> ``layers 0, 1 -> gated_deltanet;
    layer 3 -> mamba2``."""
    by_mixer: dict[str, list[str]] = {}
    for layer, mixer in sorted(replaced.items(), key=lambda item: int(item[0])):
        by_mixer.setdefault(mixer, []).append(layer)
    parts = [f"layer{'s' if len(ls) > 1 else ''} {', '.join(ls)} -> {m}" for m, ls in by_mixer.items()]
    return "; ".join(parts) or "no layer replaced"


def _parse_attention_layers(text: str) -> tuple[int, ...]:
    if text.strip() == "":
        return ()
    return layers_arg(text)


# ---- handlers ----------------------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from ..convert.import_dense import SUPPORTED, import_dense

    config_path = Path(args.src) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
    if model_type in SUPPORTED or model_type is None:
        dst = import_dense(args.src, args.dst, dtype=args.dtype, base_model=args.base_model)
    else:
        from ..convert.native import import_native

        import_native(args.src, args.dst, dtype=args.dtype, base_model=args.base_model)
        dst = args.dst
    print(f"imported {args.src} -> {dst}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..convert.native import export_native

    native = export_native(args.src, args.dst, to=args.to, dtype=args.dtype)
    print(f"exported {args.src} -> {args.dst} ({native.config.model_type})")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    """``hf-hybrid upcycle``: see ``hf_hybrid.convert.upcycle``."""
    from ..configuration_hybrid import HybridConfig
    from ..convert.source import source_config
    from ..convert.upcycle import UpcycleOptions, upcycle

    opts = options_kwargs(
        UpcycleOptions,
        args,
        renormalize=not args.no_renormalize,
        omit=("router_aux_loss_coef", "router_z_loss_coef"),  # the config's values
    )
    before, _ = source_config(args.src)
    for note in UpcycleOptions(**opts).notes(before):
        print(f"note: {note}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed above
        dst = upcycle(args.src, args.dst, dtype=args.dtype, **opts)
    after = HybridConfig.from_pretrained(str(dst))
    lineage = after.hf_hybrid_lineage or {}
    print(
        f"upcycled {args.src} -> {dst}: layers {lineage.get('options', {}).get('layers')}, "
        f"{after.num_experts} experts top-{after.num_experts_per_tok}, exact start: "
        f"{lineage.get('options', {}).get('exact_start')}"
    )
    print(f"  before: {cost_line(before)}")
    print(f"  after:  {cost_line(after)}")
    return 0


def cmd_convert_dsa(args: argparse.Namespace) -> int:
    """``hf-hybrid convert-dsa``: see ``hf_hybrid.convert.dsa``."""
    from ..configuration_hybrid import HybridConfig
    from ..convert.dsa import DSAOptions, convert_to_dsa
    from ..convert.source import source_config

    opts = DSAOptions(**options_kwargs(DSAOptions, args))
    before, _ = source_config(args.src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst = convert_to_dsa(args.src, args.dst, opts, dtype=args.dtype)
    after = HybridConfig.from_pretrained(str(dst))
    options: dict[str, Any] = (after.hf_hybrid_lineage or {}).get("options", {})
    print(
        f"converted {args.src} -> {dst}: layers {options.get('layers')} -> dsa (base "
        f"{after.dsa_base}), top-k {after.index_topk}, indexer "
        f"{after.index_n_heads}×{after.index_head_dim}, saved in mode {after.dsa_mode!r}"
    )
    print(f"  before: {cost_line(before)}")
    print(f"  after:  {cost_line(after)} (dsa_mode {after.dsa_mode!r})")
    if after.dsa_mode != "sparse":
        sparse = HybridConfig.from_dict({**after.to_dict(), "dsa_mode": "sparse"})
        print(f"  sparse: {cost_line(sparse)} (once the indexers are trained)")
    from ..cost import cost_notes

    for note in cost_notes(after, COST_CONTEXTS):
        print(f"  warning: {note}")
    if after.dsa_mode != "sparse":
        print("  next: train the indexers (recipes/dsa: dense warm-up, then sparse training)")
    return 0


def cmd_hybridize(args: argparse.Namespace) -> int:
    """``hf-hybrid hybridize``: see ``hf_hybrid.convert.hybridize``."""
    import torch

    from ..configuration_hybrid import HybridConfig
    from ..convert.checkpoint import check_dst
    from ..convert.hybridize import (
        REPLACEABLE,
        available_mixers,
        format_ranking,
        format_statements,
        hybridize,
        plan_hybridize,
        rank_layers,
        selection_blocks,
    )
    from ..convert.source import load_source, source_config

    given = [x is not None for x in (args.pattern, args.attention_layers, args.select)]
    if sum(given) != 1:
        raise ValueError("hybridize: give exactly one of --pattern, --attention-layers or --select")
    if args.select is not None and args.num_attention is None:
        raise ValueError("hybridize: --select needs --num-attention K (how many attention layers to keep)")
    before, _ = source_config(args.src)
    check_dst(args.dst)
    attention_layers = args.attention_layers
    mixer = args.mixer
    if args.select is not None:
        mixer = mixer or "gated_deltanet"
        n_att = sum(t in REPLACEABLE for t in before.mixer_types)
        if not 0 <= args.num_attention < n_att:
            raise ValueError(
                f"hybridize: --num-attention {args.num_attention} must be in [0, {n_att - 1}] "
                f"(the source has {n_att} attention layers)"
            )
        plan_hybridize(before, attention_layers=[], mixer=mixer)  # mixer and geometry checks before the work
        teacher, _ = load_source(args.src, dtype=torch.float32)
        blocks = selection_blocks(args.src, context=args.select_context, blocks=args.select_blocks)
        rows = rank_layers(teacher, blocks, mixer=mixer, criterion=args.select, seed=args.seed)
        print(
            f"layer ranking by {args.select} on {blocks.shape[0]} "
            f"held-out blocks of {blocks.shape[1]} tokens:"
        )
        print(format_ranking(rows, args.num_attention))
        attention_layers = sorted(r["layer"] for r in rows[: args.num_attention])
    elif attention_layers is not None and mixer is None:
        raise ValueError(f"hybridize: --attention-layers needs --mixer ({'|'.join(available_mixers())})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst = hybridize(
            args.src,
            args.dst,
            pattern=args.pattern,
            attention_layers=attention_layers,
            mixer=mixer,
            seed=args.seed,
            dtype=args.dtype,
        )
    after = HybridConfig.from_pretrained(str(dst))
    lineage = after.hf_hybrid_lineage or {}
    opts = lineage.get("options", {})
    kept = ", ".join(map(str, opts.get("attention_layers") or [])) or "none"
    replaced = _replaced_text(opts.get("replaced") or {})
    print(f"hybridized {args.src} -> {dst}: {replaced}; attention kept: {kept}")
    print(format_statements(lineage.get("init", {})))
    for i, notes in (lineage.get("init_notes") or {}).items():
        print(f"  layer {i}: {'; '.join(notes)}")
    print(f"  before: {cost_line(before, (32768,))}; {_cache_line(before)}")
    print(f"  after:  {cost_line(after, (32768,))}; {_cache_line(after)}")
    print("  next: recipes/hybridize/train.py (attention transfer, then distillation)")
    return 0


def cmd_mla(args: argparse.Namespace) -> int:
    """``hf-hybrid mla``: see ``hf_hybrid.convert.mla``."""
    from ..configuration_hybrid import HybridConfig
    from ..convert.checkpoint import check_dst
    from ..convert.hybridize import selection_blocks
    from ..convert.mla import MLAOptions, cache_bytes_at, check_mla, kv_bytes_per_token, mla
    from ..convert.source import source_config
    from ..cost import format_bytes

    opts = MLAOptions(**options_kwargs(MLAOptions, args))
    before, _ = source_config(args.src)
    check_dst(args.dst)
    check_mla(before, opts)  # every refusal before the calibration text is read
    calibration = None
    blocks = args.calibration_blocks
    if blocks is None and opts.needs_calibration:
        blocks = 8
    if blocks:
        calibration = selection_blocks(args.src, context=args.calibration_context, blocks=blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst = mla(args.src, args.dst, opts, calibration=calibration, dtype=args.dtype)
    after = HybridConfig.from_pretrained(str(dst))
    o = (after.hf_hybrid_lineage or {}).get("options", {})
    print(
        f"converted {args.src} -> {dst}: layers {o.get('layers')} -> mla (kv_lora_rank {after.kv_lora_rank}, "
        f"rope {after.qk_rope_head_dim} dims × {after.mla_rope_heads} key(s), nope {after.qk_nope_head_dim}, "
        f"q_lora_rank {after.q_lora_rank}), exact start: {o.get('exact_start')}"
    )
    kb, ka = kv_bytes_per_token(before), kv_bytes_per_token(after)
    print(
        f"  KV cache (bf16, all layers): {format_bytes(kb)}/token -> {format_bytes(ka)}/token "
        f"({100 * ka / kb:.1f} % of the source); at 32K: {format_bytes(cache_bytes_at(before))} -> "
        f"{format_bytes(cache_bytes_at(after))}"
    )
    print(f"  before: {cost_line(before, (32768,))}; {_cache_line(before)}")
    print(f"  after:  {cost_line(after, (32768,))}; {_cache_line(after)}")
    if not o.get("exact_start"):
        print("  next: recipes/mla/train.py (distillation from the source heals the approximation)")
    return 0


# ---- parsers -----------------------------------------------------------------------------------------------


DST_HELP = "new output directory (must not exist or be empty)"


def _conversion_parser(sub, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that writes a new checkpoint DST from SRC: its parser with those two arguments."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help=DST_HELP)
    return p


def _finish_conversion_parser(p: argparse.ArgumentParser, handler) -> None:
    """The arguments every converter ends with (the saved dtype, ``--trust-remote-code``) and its handler."""
    p.add_argument("--dtype", default=None, help="save in this dtype (default: the source's)")
    add_trust_flag(p)
    p.set_defaults(func=handler)


def add_parsers(sub) -> None:
    """Add ``import``, ``export``, ``upcycle``, ``convert-dsa``, ``hybridize`` and ``mla`` to an ``argparse``
    subparsers object."""
    p = _conversion_parser(
        sub,
        "import",
        help="import a Llama/Qwen2/Qwen3/Mistral or native-family (qwen3_moe, deepseek_v3, ...) checkpoint",
        description="Import a checkpoint saved by transformers (safetensors only) as an "
        "hf_hybrid checkpoint with identical logits.",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="cast weights (float32, bfloat16, float16); default: the source config's dtype, else as stored",
    )
    p.add_argument("--base-model", default=None, help="name recorded as base model (e.g. the Hub id of SRC)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="export an hf_hybrid checkpoint to a native transformers family",
        description="Write an hf_hybrid checkpoint as a native transformers family (qwen3_moe, "
        "deepseek_v3, ...) with identical logits, loadable and servable without hf_hybrid. "
        "Refuses, writing nothing, when a layer or option has no counterpart in the family.",
    )
    p.add_argument("src", metavar="SRC", help="hf_hybrid checkpoint directory")
    p.add_argument("dst", metavar="DST", help=DST_HELP)
    p.add_argument(
        "--to", default=None, metavar="FAMILY", help="target model_type (default: the family that fits)"
    )
    p.add_argument(
        "--dtype", default=None, help="cast weights (float32, bfloat16, float16); default: as saved"
    )
    add_trust_flag(p)
    p.set_defaults(func=cmd_export)

    p = _conversion_parser(
        sub,
        "upcycle",
        help="turn a dense checkpoint into an MoE one (experts start as copies of the dense MLP)",
        description="Upcycle the dense MLPs of SRC (hf_hybrid, or Llama/Qwen2/Qwen3/Mistral imported "
        "on the way) into MoE layers. Without --noise/--drop-upcycling (and with a zero "
        "router when --no-renormalize) the result computes the same function as SRC.",
    )
    p.add_argument("--num-experts", type=int, required=True, help="E: copies of the dense MLP")
    p.add_argument("--top-k", type=int, required=True, help="k: copies each token is routed to")
    p.add_argument(
        "--shared-expert",
        action="store_true",
        help="add an always-on shared expert (dense and routed halved)",
    )
    p.add_argument(
        "--granularity", type=int, default=1, help="G: split each copy into G experts (E·G experts, top-k·G)"
    )
    p.add_argument(
        "--group-limited",
        action="store_true",
        help="with G > 1: group-limited routing, one group per copy (whole copies selected structurally)",
    )
    p.add_argument(
        "--drop-upcycling",
        type=float,
        default=0.0,
        metavar="R",
        help="re-draw a fraction R of each expert's neurons (Drop-Upcycling; not function-preserving)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="S",
        help="Gaussian noise of S·std(W) on expert weights (not function-preserving)",
    )
    p.add_argument(
        "--layers", type=layers_arg, default=None, help="comma-separated layers (default: every dense MLP)"
    )
    p.add_argument(
        "--router", choices=ROUTER_CHOICES, default="softmax", help="router scores (default softmax)"
    )
    p.add_argument(
        "--no-renormalize",
        action="store_true",
        help="do not renormalise the top-k weights (router starts at zero; down_proj rescaled)",
    )
    p.add_argument(
        "--routed-scaling", type=float, default=1.0, metavar="F", help="routed scaling factor (default 1)"
    )
    p.add_argument(
        "--router-init-std",
        type=float,
        default=None,
        metavar="S",
        help="router init std (default: initializer_range when renormalising, else 0 for an exact start)",
    )
    p.add_argument("--seed", type=int, default=0)
    _finish_conversion_parser(p, cmd_upcycle)

    p = _conversion_parser(
        sub,
        "convert-dsa",
        help="turn attention or MLA layers into DeepSeek Sparse Attention layers (fresh indexers)",
        description="Convert the attention (or MLA) layers of SRC (hf_hybrid, or "
        "Llama/Qwen2/Qwen3/Mistral imported on the way) into DSA layers with fresh "
        "lightning indexers. Saved in dsa_mode 'dense' (the source's function) by "
        "default: train the indexers with recipes/dsa before switching to 'sparse'.",
    )
    p.add_argument("--index-topk", type=int, required=True, help="k: keys each query attends to")
    p.add_argument(
        "--index-heads", type=int, default=None, help="indexer heads (default: the config's index_n_heads)"
    )
    p.add_argument(
        "--index-head-dim", type=int, default=None, help="indexer head dim (default: the config's)"
    )
    p.add_argument(
        "--layers",
        type=layers_arg,
        default=None,
        help="comma-separated layers (default: every full attention or MLA layer)",
    )
    p.add_argument("--selector", choices=SELECTOR_CHOICES, default="indexer")
    p.add_argument(
        "--mode",
        choices=MODE_CHOICES,
        default="dense",
        help="dsa_mode to save (default dense; see --help text)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the indexers' initialisation")
    p.add_argument(
        "--index-norm-eps",
        type=float,
        default=None,
        help="eps of the indexer key LayerNorm (default: the config's; 1e-6 to export to deepseek_v32)",
    )
    _finish_conversion_parser(p, cmd_convert_dsa)

    p = _conversion_parser(
        sub,
        "hybridize",
        help="replace attention layers by linear-time mixers initialised from the attention weights",
        description="Replace attention layers of SRC (hf_hybrid, or Llama/Qwen2/Qwen3/Mistral "
        "imported on the way) by linear-time mixers whose projections start from "
        "the attention's q/k/v/o (what is inherited is printed and recorded in "
        "the card). Recover quality with recipes/hybridize/train.py.",
    )
    p.add_argument(
        "--pattern",
        default=None,
        help="the config's pattern shorthand, e.g. '3:1 gated_deltanet:attention' (cyclic over layers)",
    )
    p.add_argument(
        "--attention-layers",
        type=_parse_attention_layers,
        default=None,
        metavar="I,J",
        help="attention layers to keep (comma-separated; '' keeps none); the others get --mixer",
    )
    p.add_argument(
        "--mixer",
        default=None,
        help="mixer for --attention-layers / --select: gated_deltanet, kda, mamba2, linear_attention, or a "
        "registered plug-in mixer",
    )
    p.add_argument(
        "--select",
        choices=("kl", "loss"),
        default=None,
        help="choose the attention layers to keep by measuring each layer replaced alone",
    )
    p.add_argument(
        "--num-attention", type=int, default=None, metavar="K", help="with --select: layers to keep"
    )
    p.add_argument("--select-blocks", type=int, default=8, help="held-out blocks for --select (default 8)")
    p.add_argument(
        "--select-context", type=int, default=256, help="tokens per block for --select (default 256)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the new tensors' initialisation")
    _finish_conversion_parser(p, cmd_hybridize)

    p = _conversion_parser(
        sub,
        "mla",
        help="turn attention layers into multi-head latent attention (MLA) layers by weight surgery",
        description="Convert the full attention layers of SRC (hf_hybrid, or Llama/Qwen2/Qwen3/Mistral "
        "imported on the way) into MLA layers: partial RoPE, low-rank key/value latent (SVD), "
        "optional q latent. --lossless gives the source's function exactly; every other "
        "setting is an approximation of it, healed by recipes/mla/train.py.",
    )
    p.add_argument(
        "--lossless",
        action="store_true",
        help="identity setting: all RoPE pairs, one rope key per kv head, full rank, no latent norms",
    )
    p.add_argument("--kv-lora-rank", type=int, default=None, help="latent rank r (default: full rank)")
    p.add_argument(
        "--rope-dims", type=int, default=None, help="rotary channels kept per head (even; default: all)"
    )
    p.add_argument(
        "--rope-select",
        choices=ROPE_SELECT_CHOICES,
        default="uniform",
        help="which RoPE pairs stay rotary: every d/dr-th (uniform), the fastest (frequency), or the "
        "largest |q|·|k| on calibration text (norm)",
    )
    p.add_argument(
        "--rope-keys",
        choices=ROPE_KEY_CHOICES,
        default="per_kv_head",
        help="one rope key per kv head, or one shared key (DeepSeek's layout, needed by the exports)",
    )
    p.add_argument(
        "--factorization", choices=FACTORIZATION_CHOICES, default="joint", help="SVD of [K; V] or each"
    )
    p.add_argument(
        "--activation-aware", action="store_true", help="weight the SVDs by calibration activations"
    )
    p.add_argument("--q-lora-rank", type=int, default=None, help="query latent rank (default: q_proj kept)")
    p.add_argument(
        "--latent-norm",
        action="store_true",
        help="DeepSeek's q_a/kv_a RMSNorms (needed to export to deepseek_v3/v32; not function-preserving)",
    )
    p.add_argument(
        "--layers",
        type=layers_arg,
        default=None,
        help="comma-separated layers (default: every attention layer)",
    )
    p.add_argument(
        "--calibration-blocks",
        type=int,
        default=None,
        help="held-out text blocks for calibration (default: 8 when --rope-select norm / --activation-aware)",
    )
    p.add_argument("--calibration-context", type=int, default=256, help="tokens per calibration block")
    _finish_conversion_parser(p, cmd_mla)
