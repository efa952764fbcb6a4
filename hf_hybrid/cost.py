"""Cost of a design before training it: parameters (total / active), cache bytes, FLOPs per token.

``estimate_cost(config)`` walks the layers; each layer's token mixer and MLP are costed by the ``cost``
function of their spec in ``hf_hybrid.registry``, declared next to the class in the kind's own file (the
records it returns, :class:`MixerCost` and :class:`MLPCost`, live in ``hf_hybrid.specs``)::

    def my_mixer_cost(config, layer_idx) -> MixerCost:
        return MixerCost(params=..., matmul_params=..., cache_per_token=..., state_elements=...,
                         flops=lambda c: ...)

    @register_mixer("my_mixer", layer_type=..., cost=my_mixer_cost)

Conventions (all per layer, in elements, times ``dtype_bytes`` for bytes):

- ``cache_per_token``: elements appended to the cache per token (K and V, MLA's latent, DSA's indexer key);
  ``cache_window`` caps the number of cached tokens (sliding window).
- ``state_elements``: constant per-sequence state (short-conv tail + recurrent state of linear mixers);
  ``state_fp32_elements`` of them (the recurrent state) are stored in fp32 whatever the model dtype, as the
  mixers keep them, the rest (the conv tail) in the model dtype.
- FLOPs are forward FLOPs for one token at context ``c``: ``2 · (active matmul weights + lm_head)`` plus each
  mixer's ``flops(c)`` (attention scores and values, recurrent state updates) and, with hyper-connection
  streams, their per-token contractions (collapse, output, mHC's mixing). Training is about 3× that.

Parameter counts are exact: when a layer's mixer / MLP class is registered, it is built on the meta device
and its parameters are counted (no memory); the kinds' formulas are the fallback for types not implemented
yet, and ``tests/test_cost.py`` checks every formula against the built module of each registered type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .configuration_hybrid import HybridConfig
from .hyper_connections import hyper_connection_params, hyper_head_params
from .registry import mixer_spec, mlp_spec
from .specs import MixerCost, MLPCost, _zero_flops, format_tokens

DEFAULT_CONTEXTS = (4096, 32768, 131072)


# ------------------------------------------------------------------------------------------------------------
# measured parameter counts


def measure_module(cls: Callable | None, config: HybridConfig, layer_idx: int) -> tuple[int, int] | None:
    """(params, matmul params) of ``cls(config, layer_idx)`` built on the meta device (no memory), or None
    when there is no class or it cannot be built there. Matmul params = parameters with ≥ 2 dims."""
    if cls is None:
        return None
    try:
        with torch.device("meta"):
            module = cls(config, layer_idx)
    except Exception:  # a module that cannot be built on meta: fall back to the formula
        return None
    params = [p for p in module.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.ndim >= 2)


# ------------------------------------------------------------------------------------------------------------
# the report


def _plus_per_token(flops: Callable[[int], float], per_token: float) -> Callable[[int], float]:
    """A layer's FLOPs at a context plus a context-independent per-token amount."""
    return lambda context: flops(context) + per_token


@dataclass
class LayerCost:
    index: int
    mixer: str
    mlp: str
    params: int  # mixer + MLP + the layer's norms
    active_params: int
    matmul_params: int  # active weights multiplied once per token
    cache_per_token: int  # elements
    cache_window: int | None
    state_elements: int
    exact: bool  # counted on the built modules
    flops: Callable[[int], float] = field(repr=False, default=_zero_flops)
    state_fp32_elements: int = 0


@dataclass
class CostReport:
    contexts: tuple[int, ...]
    dtype_bytes: int
    total_params: int
    active_params: int
    embedding_params: int
    lm_head_matmul_params: int
    layers: list[LayerCost]
    exact: bool
    state_dtype_bytes: int | None = None
    lm_head_params: int = 0  # 0 when tied to the embedding
    # weights each token multiplies once outside the layers: the iHC stream-collapsing head (hc_head.fn)
    head_matmul_params: int = 0
    head_flops: int = 0  # per token, besides its matmul: collapsing the hyper-connection streams
    notes: list[str] = field(default_factory=list)  # warnings about the design (e.g. a DSA that costs more)

    @property
    def active_non_embedding_params(self) -> int:
        """Active parameters without the embedding and the (untied) LM head: the figure model cards publish
        (MiniMax-01's "45.9 B activated", Qwen3-Next's "A3B")."""
        return self.active_params - self.embedding_params - self.lm_head_params

    # ---- derived numbers -----------------------------------------------------------------------------------
    @property
    def mixer_types(self) -> list[str]:
        return list(dict.fromkeys(layer.mixer for layer in self.layers))

    def state_bytes(self, layer: LayerCost) -> int:
        """Per-sequence state bytes of one layer: the recurrent state in fp32 and the conv tail in the cache
        dtype, as the mixers store them; ``state_dtype_bytes`` (when given) overrides both."""
        if self.state_dtype_bytes is not None:
            return layer.state_elements * self.state_dtype_bytes
        fp32 = layer.state_fp32_elements
        return (layer.state_elements - fp32) * self.dtype_bytes + fp32 * 4

    def cache_bytes(self, context: int, mixer: str | None = None) -> int:
        """Cache + state bytes of one sequence at ``context`` tokens, for one mixer type or the whole
        model."""
        total = 0
        for layer in self.layers:
            if mixer is not None and layer.mixer != mixer:
                continue
            tokens = context if layer.cache_window is None else min(context, layer.cache_window)
            total += tokens * layer.cache_per_token * self.dtype_bytes + self.state_bytes(layer)
        return total

    def flops_per_token(self, context: int) -> float:
        matmul = (
            sum(layer.matmul_params for layer in self.layers)
            + self.lm_head_matmul_params
            + self.head_matmul_params
        )
        return 2.0 * matmul + self.head_flops + sum(layer.flops(context) for layer in self.layers)

    def by_mixer(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for mixer in self.mixer_types:
            layers = [layer for layer in self.layers if layer.mixer == mixer]
            windows = {layer.cache_window for layer in layers}
            rows[mixer] = {
                "layers": len(layers),
                "params": sum(layer.params for layer in layers),
                # the largest per-layer figure: layers reading another layer's keys/values (kv_source_layers)
                # cache nothing of their own, and layers_caching says how many layers hold a cache
                "cache_bytes_per_token_per_layer": max(layer.cache_per_token for layer in layers)
                * self.dtype_bytes,
                "layers_caching": sum(1 for layer in layers if layer.cache_per_token),
                "cache_window": next(iter(windows)) if len(windows) == 1 else sorted(w or 0 for w in windows),
                "state_bytes_per_sequence_per_layer": self.state_bytes(layers[0]),
                "bytes_per_sequence": {c: self.cache_bytes(c, mixer) for c in self.contexts},
            }
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "active_non_embedding_params": self.active_non_embedding_params,
            "embedding_params": self.embedding_params,
            "params_exact": self.exact,
            "dtype_bytes": self.dtype_bytes,
            "contexts": list(self.contexts),
            "layer_pattern": compress_pattern([layer.mixer for layer in self.layers]),
            "mlp_pattern": compress_pattern([layer.mlp for layer in self.layers]),
            "cache_by_mixer": {
                m: {**row, "bytes_per_sequence": {str(c): b for c, b in row["bytes_per_sequence"].items()}}
                for m, row in self.by_mixer().items()
            },
            "cache_bytes_per_sequence": {str(c): self.cache_bytes(c) for c in self.contexts},
            "flops_per_token": {str(c): self.flops_per_token(c) for c in self.contexts},
            "notes": list(self.notes),
            "layers": [
                {
                    "index": layer.index,
                    "mixer": layer.mixer,
                    "mlp": layer.mlp,
                    "params": layer.params,
                    "active_params": layer.active_params,
                    "cache_elements_per_token": layer.cache_per_token,
                    "cache_window": layer.cache_window,
                    "state_elements": layer.state_elements,
                    "state_fp32_elements": layer.state_fp32_elements,
                }
                for layer in self.layers
            ],
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        kwargs.setdefault("ensure_ascii", False)
        return json.dumps(self.to_dict(), **kwargs)

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the cache / FLOPs table (shared by the text table and the model card)."""
        header = ["mixer", "layers", "cache/token/layer", "state/seq/layer"] + [
            f"@{format_tokens(c)}" for c in self.contexts
        ]
        rows = []
        for mixer, row in self.by_mixer().items():
            per_token = row["cache_bytes_per_token_per_layer"]
            window = row["cache_window"]
            per_token_text = format_bytes(per_token) if per_token else "-"
            if per_token and isinstance(window, int) and window:
                per_token_text += f" (≤{format_tokens(window)} tok)"
            if per_token and row["layers_caching"] < row["layers"]:
                per_token_text += f" ({row['layers_caching']} caching)"  # the others share KV
            state = row["state_bytes_per_sequence_per_layer"]
            rows.append(
                [mixer, str(row["layers"]), per_token_text, format_bytes(state) if state else "-"]
                + [format_bytes(row["bytes_per_sequence"][c]) for c in self.contexts]
            )
        rows.append(
            ["cache total / sequence", str(len(self.layers)), "", ""]
            + [format_bytes(self.cache_bytes(c)) for c in self.contexts]
        )
        rows.append(
            ["FLOPs / token (fwd)", "", "", ""]
            + [format_count(self.flops_per_token(c)) for c in self.contexts]
        )
        return header, rows

    def to_text(self) -> str:
        exact = (
            "exact, counted on the built modules" if self.exact else "from formulas (some types not built)"
        )
        lines = [
            f"layers      {len(self.layers)}: {compress_pattern([layer.mixer for layer in self.layers])}",
            f"MLPs        {compress_pattern([layer.mlp for layer in self.layers])}",
            f"parameters  total {format_count(self.total_params)} ({self.total_params:,}), "
            f"active {format_count(self.active_params)} ({self.active_params:,}; "
            f"{format_count(self.active_non_embedding_params)} without embeddings); "
            f"embeddings {format_count(self.embedding_params)}  [{exact}]",
            f"cache dtype {self.dtype_bytes} bytes/element; bytes are per sequence unless marked per token",
            "",
        ]
        header, rows = self.table_rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        lines.append(fmt(header))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(r) for r in rows)
        lines.extend(f"warning: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str, *, max_context: int | None = None) -> str:
        """Cache + state memory of one sequence vs context, one line per mixer type and the total
        (log-log)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        top = max_context or max(self.contexts)
        xs = sorted(
            {int(round(2**e)) for e in [i / 4 for i in range(4 * 7, 4 * int(math.log2(max(top, 256))) + 1)]}
        )
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mixer in self.mixer_types:
            ax.plot(xs, [max(self.cache_bytes(x, mixer), 1) for x in xs], label=mixer)
        ax.plot(xs, [max(self.cache_bytes(x), 1) for x in xs], "k--", label="total")
        for c in self.contexts:
            ax.axvline(c, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"cache + state per sequence (bytes, {self.dtype_bytes} B/element)")
        ax.set_title(f"{compress_pattern([layer.mixer for layer in self.layers])}")
        ax.legend()
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def estimate_cost(
    config: HybridConfig | dict[str, Any],
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    dtype_bytes: int = 2,
    *,
    state_dtype_bytes: int | None = None,
    measure: bool = True,
    notes: bool = True,
) -> CostReport:
    """Parameters, cache and FLOPs of ``config`` (a ``HybridConfig`` or its keyword arguments).

    ``measure=False`` uses the formulas only (no module is built, even on meta). ``notes``: warn (in
    ``report.notes``) about what the numbers show against the design's intent (``cost_notes``)."""
    if isinstance(config, dict):
        config = HybridConfig(**config)
    contexts = tuple(int(c) for c in contexts)
    if not contexts or any(c <= 0 for c in contexts):
        raise ValueError(f"contexts={contexts!r} must be positive token counts")
    h = config.hidden_size
    layers: list[LayerCost] = []
    all_exact = True
    for i, (mixer, mlp) in enumerate(zip(config.mixer_types, config.mlp_types)):
        mixer_kind, mlp_kind = mixer_spec(mixer), mlp_spec(mlp)
        for kind, spec in (("mixer", mixer_kind), ("MLP", mlp_kind)):
            if spec.cost is None:
                raise ValueError(
                    f"{kind} type {spec.name!r} declares no cost function; pass cost=fn(config, "
                    f"layer_idx) to its hf_hybrid.registry.register_{kind.lower()}(...)"
                )
        mc = mixer_kind.cost(config, i)
        pc = mlp_kind.cost(config, i)
        mixer_params, mixer_matmul = mc.params, mc.matmul_params
        mlp_params, mlp_matmul = pc.params, pc.matmul_params
        exact = True
        measured = measure_module(mixer_kind.cls, config, i) if measure else None
        if measured is not None:
            mixer_params, mixer_matmul = measured
        elif mixer_kind.cls is not None:  # a kind without a module (an MLP-only layer): its zero is exact
            exact = False
        if mlp_kind.cls is not None:  # a kind without a module (a mixer-only layer) costs nothing
            measured = measure_module(mlp_kind.cls, config, i) if measure else None
            if measured is not None:
                mlp_params, mlp_matmul = measured
            else:
                exact = False
        norms = (h if mixer_kind.cls is not None else 0) + (h if mlp_kind.cls is not None else 0)
        # "sandwich" placement: a second RMSNorm on each branch's output; residual gates: w [h] per branch
        placement = (getattr(config, "norm_placement", None) or ["pre"] * config.num_hidden_layers)[i]
        extra = int(placement == "sandwich") + int(bool(getattr(config, "residual_gates", False)))
        norms += extra * norms
        gated = (getattr(config, "gated_norms", None) or ["none"] * config.num_hidden_layers)[i]
        # a low-rank gated norm adds its gate's two matmuls, h·r each
        gate_matmul = 2 * h * (config.gated_norm_rank or 0)
        gate_matmul *= (gated in ("mixer", "both") and mixer_kind.cls is not None) + (
            gated in ("mlp", "both") and mlp_kind.cls is not None
        )
        norms += gate_matmul
        # hyper-connection residual streams: each branch's stream weights (fn is a matmul per token)
        hc_params, hc_matmul, hc_flops = hyper_connection_params(
            config, i, mixer_kind.cls is not None, mlp_kind.cls is not None
        )
        params = norms + mixer_params + mlp_params + hc_params
        layers.append(
            LayerCost(
                index=i,
                mixer=mixer,
                mlp=mlp,
                params=params,
                active_params=params - pc.inactive_params,
                matmul_params=mixer_matmul + mlp_matmul + gate_matmul + hc_matmul - pc.inactive_params,
                cache_per_token=mc.cache_per_token,
                cache_window=mc.cache_window,
                state_elements=mc.state_elements,
                state_fp32_elements=mc.state_fp32_elements,
                exact=exact,
                flops=mc.flops if not hc_flops else _plus_per_token(mc.flops, hc_flops),
            )
        )
        all_exact &= exact
    embedding = config.vocab_size * h
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
    rope_scale = (
        next(iter(config.rope_dims())) // 2 if config.rope_learned_scale else 0
    )  # model.rope_log_scale
    head_params, head_matmul, head_flops = hyper_head_params(config)
    total = embedding + lm_head + h + rope_scale + head_params + sum(layer.params for layer in layers)
    active = total - sum(layer.params - layer.active_params for layer in layers)
    return CostReport(
        contexts=contexts,
        dtype_bytes=dtype_bytes,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        lm_head_matmul_params=config.vocab_size * h,
        layers=layers,
        exact=all_exact,
        state_dtype_bytes=state_dtype_bytes,
        lm_head_params=lm_head,
        head_matmul_params=head_matmul,
        head_flops=head_flops,
        notes=cost_notes(config, contexts) if notes else [],
    )


def cost_notes(config: HybridConfig, contexts: Sequence[int]) -> list[str]:
    """Warnings about what the numbers show against the design's intent at ``contexts``, from the
    ``cost_notes`` hooks of the mixer kinds the config uses (e.g. a sparse DSA that needs more FLOPs per
    token than its dense base). Empty when there is nothing to warn about."""

    def estimate(other: HybridConfig, at: Sequence[int]) -> CostReport:
        return estimate_cost(other, at, measure=False, notes=False)

    notes: list[str] = []
    for name in dict.fromkeys(config.mixer_types):
        spec = mixer_spec(name)
        if spec.cost_notes is not None:
            notes.extend(spec.cost_notes(config, contexts, estimate))
    return notes


# ------------------------------------------------------------------------------------------------------------
# formatting helpers (shared with the model card)


def compress_pattern(names: Sequence[str]) -> str:
    """``[g, g, g, a, g, g, g, a]`` -> ``"(3×g, a)×2"``; ``[d, m, m]`` -> ``"d, 2×m"``."""
    runs: list[tuple[str, int]] = []
    for name in names:
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    tokens = [name if n == 1 else f"{n}×{name}" for name, n in runs]
    # Adjacent runs differ, so a repeating period has at least two runs.
    for period in range(2, len(tokens) // 2 + 1):
        if len(tokens) % period == 0 and tokens == tokens[:period] * (len(tokens) // period):
            return f"({', '.join(tokens[:period])})×{len(tokens) // period}"
    return ", ".join(tokens)


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


__all__ = [
    "CostReport",
    "LayerCost",
    "MixerCost",
    "MLPCost",
    "compress_pattern",
    "estimate_cost",
]
