"""Training-time companions of ``hf_hybrid.moe``: aux-loss-free bias updates, expert-load logging, heatmaps.

- ``AuxFreeBiasCallback``: DeepSeek-V3's auxiliary-loss-free balancing, ``bias += rate * sign(mean_load -
  load)`` once per optimizer step, from the load summed over the step's micro-batches and **all ranks**.
- ``ExpertLoadLoggingCallback``: per-layer ``moe/layer{i}/load_max_over_mean``, ``load_cv``, ``load_min`` (and
  ``drop_frac`` with a capacity factor) in the Trainer logs, so a collapsed router is visible; optionally a
  JSONL file of the raw loads that ``hf-hybrid expert-load --log`` turns into a heatmap.
- ``plot_expert_load_heatmap(load [L, E], path)``, ``read_load_log``, ``measure_expert_load``: what
  ``hf-hybrid expert-load`` (``hf_hybrid.cli.moe``) draws and prints.

Both callbacks work on any model that contains ``HybridMoE`` layers (bare, DDP-wrapped, or under a PEFT
adapter).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .moe import HybridMoE, HybridTopKRouter

# ------------------------------------------------------------------------------------------------------------
# aux-loss-free bias


def _moe_layers(model: nn.Module) -> list[HybridMoE]:
    return sorted((m for m in model.modules() if isinstance(m, HybridMoE)), key=lambda m: m.layer_idx)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _in_dsa_dense_warmup(model: nn.Module) -> bool:
    """True when a DSA layer of ``model`` runs in the dense warm-up now (``model.dsa_mode("dense_warmup")`` or
    its config's ``dsa_mode``)."""
    from .mixers.dsa import dsa_layers

    return any(m.in_dense_warmup for m in dsa_layers(model))


@torch.no_grad()
def update_expert_bias(
    model: nn.Module, rate: float | None = None, *, all_reduce: bool = True
) -> dict[int, torch.Tensor]:
    """One aux-loss-free balancing step for every top-k ``HybridTopKRouter`` in ``model``.

    ``bias_i += rate * sign(mean_j(load_j) - load_i)``: over-loaded experts become less attractive,
    under-loaded ones more. ``load`` is the routers' ``pending_counts`` (routed assignments of real tokens
    summed over the training forwards since the last update), summed across ranks with one all-reduce for all
    layers, then reset. ``rate`` defaults to each router's ``config.router_bias_update_rate``; routers with
    rate 0 and hash routers are left alone (their counts are still reset), and nothing moves while a DSA layer
    is in dense warm-up (only the indexers train then). Gradient checkpointing's replay of a forward during
    the backward is not counted (``HybridMoE`` skips it), so each token counts once with or without
    checkpointing.

    Why the all-reduce matters under DDP: with ``broadcast_buffers=True`` (the default) DDP copies rank 0's
    buffers, ``e_score_correction_bias`` included, over every other rank before each forward. If each rank
    updated its bias from its own load, every rank but 0 would silently lose its update and all ranks would
    route with rank 0's view of the load. Since every rank here applies the *same* update computed from the
    *global* load, the broadcast copies identical values and is harmless (and ``broadcast_buffers=False`` is
    equally safe). The counts themselves are plain attributes, not buffers, precisely so that the broadcast
    cannot overwrite them.

    Returns the applied update per layer index (``{layer_idx: delta [E]}``), for logging and tests. Every rank
    must call it (it is collective when torch.distributed is initialised and ``all_reduce`` is True).
    """
    layers = [m for m in _moe_layers(model) if m.router_module.routing == "topk"]
    if not layers:
        return {}
    if _in_dsa_dense_warmup(model):
        # DeepSeek's dense warm-up trains the indexers alone on their KL: the routing is frozen like every
        # other weight, so the bias must not move either (the counts of the warm-up forwards are discarded).
        for m in layers:
            m.router_module.pending_counts = None
        return {}
    routers = [m.router_module for m in layers]
    device = routers[0].e_score_correction_bias.device
    counts_LE = torch.stack(
        [
            (r.pending_counts if r.pending_counts is not None else torch.zeros(r.num_experts)).to(device)
            for r in routers
        ]
    )
    if all_reduce:
        _all_reduce_sum(counts_LE)
    deltas = {}
    for router, counts_E in zip(routers, counts_LE):
        router.pending_counts = None
        layer_rate = router.bias_update_rate if rate is None else rate
        if layer_rate <= 0 or counts_E.sum() <= 0:
            continue
        delta_E = layer_rate * torch.sign(counts_E.mean() - counts_E)
        router.e_score_correction_bias.add_(delta_E.to(router.e_score_correction_bias))
        deltas[router.layer_idx] = delta_E
    return deltas


class AuxFreeBiasCallback(TrainerCallback):
    """Aux-loss-free balancing (DeepSeek-V3): update every router's ``e_score_correction_bias`` once per
    optimizer step.

    Runs in ``on_step_end`` (after the optimizer step, once per ``gradient_accumulation_steps``
    micro-batches), from the load accumulated during the step's forwards and all-reduced across ranks; see
    ``update_expert_bias`` for why this keeps every rank's bias identical under DDP's buffer broadcast.
    ``rate=None`` uses the config's ``router_bias_update_rate``; set ``router_aux_loss_coef=0`` alongside to
    train without the Switch loss, as DeepSeek-V3 does (keeping a small ``router_seq_aux_loss_coef``).
    """

    def __init__(self, rate: float | None = None, *, all_reduce: bool = True):
        self.rate = rate
        self.all_reduce = all_reduce
        self.last_update: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.last_update = update_expert_bias(model, self.rate, all_reduce=self.all_reduce)
        return control


# ------------------------------------------------------------------------------------------------------------
# load statistics and logging


def load_metrics(load_E: torch.Tensor) -> dict[str, float]:
    """Balance of one layer's load (counts or fractions): all relative to the mean, so 1 / 0 / 1 is perfect
    for any E.

    ``load_max_over_mean`` (1 = balanced, E = every token on one expert), ``load_cv`` (std / mean, population
    std), ``load_min`` (min / mean; 0 means a dead expert).
    """
    load_E = load_E.detach().double().cpu()
    mean = load_E.mean().clamp_min(1e-30)
    return {
        "load_max_over_mean": float(load_E.max() / mean),
        "load_cv": float(load_E.std(unbiased=False) / mean),
        "load_min": float(load_E.min() / mean),
    }


@torch.no_grad()
def collect_expert_load(
    model: nn.Module, *, source: str = "log", all_reduce: bool = True, reset: bool = True
) -> dict[int, torch.Tensor]:
    """Per-layer expert counts [E] (fp32, CPU) from the model's ``HybridMoE`` layers.

    ``source="log"``: counts accumulated by training forwards since the last collection (reset unless
    ``reset=False``), summed over ranks; ``source="last"``: the last forward's counts (any mode), this rank
    only.
    """
    layers = _moe_layers(model)
    if source == "last":
        return {m.layer_idx: m.last_counts.float().cpu() for m in layers if m.last_counts is not None}
    if source != "log":
        raise ValueError(f"collect_expert_load(source={source!r}): choose 'log' or 'last'")
    routers: list[HybridTopKRouter] = [m.router_module for m in layers]
    if not routers or all(r.log_counts is None for r in routers):
        return {}
    device = routers[0].e_score_correction_bias.device
    counts_LE = torch.stack(
        [
            (r.log_counts if r.log_counts is not None else torch.zeros(r.num_experts)).to(device)
            for r in routers
        ]
    )
    if all_reduce:
        _all_reduce_sum(counts_LE)
    if reset:
        for r in routers:
            r.log_counts = None
    return {m.layer_idx: c.float().cpu() for m, c in zip(layers, counts_LE)}


class ExpertLoadLoggingCallback(TrainerCallback):
    """Adds ``moe/layer{i}/load_max_over_mean``, ``moe/layer{i}/load_cv``, ``moe/layer{i}/load_min`` (and
    ``moe/layer{i}/drop_frac`` with a capacity factor, from the last forward) to each Trainer log, from the
    load of all training forwards since the previous log, summed over ranks.

    The Trainer hands the same ``logs`` dict to every callback in order and has already stored a copy in
    ``state.log_history``; this callback fills in both, but reporters registered *before* it (wandb,
    tensorboard…) will not see the keys: add it with ``install_moe_callbacks(trainer)`` (which puts it first)
    or pass it in ``Trainer(callbacks=...)`` and move it to the front. ``jsonl_path`` (or ``save_jsonl=True``
    for ``<output_dir>/expert_load.jsonl``) also appends ``{"step", "load": [[...E...] per layer], "layers"}``
    lines, written by the main process, for ``hf-hybrid expert-load --log``.
    """

    def __init__(self, *, all_reduce: bool = True, jsonl_path: str | None = None, save_jsonl: bool = False):
        self.all_reduce = all_reduce
        self.jsonl_path = jsonl_path
        self.save_jsonl = save_jsonl
        self._drops: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return control
        counts = collect_expert_load(model, source="log", all_reduce=self.all_reduce)
        if not counts:
            return control
        stats: dict[str, float] = {}
        for layer_idx, counts_E in counts.items():
            for name, value in load_metrics(counts_E).items():
                stats[f"moe/layer{layer_idx}/{name}"] = value
        for m in _moe_layers(model):
            if m.last_drops is not None and m.last_counts is not None:
                stats[f"moe/layer{m.layer_idx}/drop_frac"] = float(
                    m.last_drops.sum() / m.last_counts.sum().clamp_min(1)
                )
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
        path = self.jsonl_path or (
            str(Path(args.output_dir) / "expert_load.jsonl") if self.save_jsonl and args.output_dir else None
        )
        if path and state.is_world_process_zero:
            layers = sorted(counts)
            record = {
                "step": state.global_step,
                "layers": layers,
                "load": [(counts[i] / counts[i].sum().clamp_min(1)).tolist() for i in layers],
            }
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return control


def install_moe_callbacks(
    trainer, *, bias_rate: float | None = None, logging: bool = True, **log_kwargs
) -> None:
    """Add the MoE callbacks to a ``Trainer``: the load logger first in the list (so every reporter sees its
    keys) and the bias callback when a rate is given or any router has ``router_bias_update_rate > 0``."""
    model = trainer.model
    if bias_rate is not None or any(m.router_module.bias_update_rate > 0 for m in _moe_layers(model)):
        trainer.add_callback(AuxFreeBiasCallback(bias_rate))
    if logging:
        trainer.callback_handler.callbacks.insert(0, ExpertLoadLoggingCallback(**log_kwargs))


# ------------------------------------------------------------------------------------------------------------
# heatmap


def plot_expert_load_heatmap(
    load: Any, path: str | Path, *, title: str | None = None, layer_ids: Sequence[int] | None = None
) -> Path:
    """Write a PNG heatmap of expert load, one row per layer: ``load [L, E]`` (counts or fractions; tensor,
    array or nested lists). Each row is shown relative to its mean (1 = balanced share), so layers compare at
    a glance and a collapsed router shows as one bright cell in a dark row. matplotlib is imported lazily (Agg
    canvas, no pyplot, so no global backend is changed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_expert_load_heatmap needs matplotlib: pip install 'hf-hybrid[plot]'") from exc

    load_LE = torch.as_tensor(load, dtype=torch.float64)
    if load_LE.dim() == 1:
        load_LE = load_LE[None]
    if load_LE.dim() != 2:
        raise ValueError(
            f"plot_expert_load_heatmap: load must be [layers, experts], got shape {tuple(load_LE.shape)}"
        )
    L, E = load_LE.shape
    rel_LE = load_LE / load_LE.mean(dim=1, keepdim=True).clamp_min(1e-30)
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(L))

    fig = Figure(figsize=(min(2 + 0.25 * E, 20), min(1.5 + 0.35 * L, 14)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(
        rel_LE.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=max(2.0, float(rel_LE.max()))
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layer_ids])
    if E <= 64:
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6 if E > 16 else 8)
    cv = (load_LE.std(dim=1, unbiased=False) / load_LE.mean(dim=1).clamp_min(1e-30)).mean()
    ax.set_title(title or f"expert load / mean  (mean CV {float(cv):.2f})")
    fig.colorbar(image, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------------------------------
# load logs and measurements (what hf-hybrid expert-load, in hf_hybrid.cli.moe, reads)


def read_load_log(path: str | Path, step: int | None = None) -> tuple[list[int], list[list[float]]]:
    """Loads from a JSON or JSONL file: ``[[...E...], ...]``, ``{"layer_idx": [...E...]}``, ``{"load": [...],
    "layers": [...]}``, or the JSONL written by ``ExpertLoadLoggingCallback`` (the last line, or the one at
    ``step``). Returns ``(layer_ids, load [L][E])``."""
    text = Path(path).read_text().strip()
    if not text:
        raise ValueError(f"{path}: empty load log")
    try:
        records = [json.loads(text)]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if step is not None:
        chosen = [r for r in records if isinstance(r, dict) and r.get("step") == step]
        if not chosen:
            raise ValueError(f"{path}: no record with step={step}")
        record = chosen[-1]
    else:
        record = records[-1]
    if isinstance(record, dict) and "load" in record:
        load = record["load"]
        layers = record.get("layers", list(range(len(load))))
    elif isinstance(record, dict):
        layers = sorted(int(k) for k in record)
        load = [record[str(i)] if str(i) in record else record[i] for i in layers]
    elif isinstance(record, list):
        load, layers = record, list(range(len(record)))
    else:
        raise ValueError(f"{path}: cannot read expert loads from a {type(record).__name__}")
    return [int(i) for i in layers], [[float(v) for v in row] for row in load]


@torch.no_grad()
def measure_expert_load(
    model: nn.Module, input_ids: torch.Tensor, *, seq_len: int = 512
) -> dict[int, torch.Tensor]:
    """Run ``input_ids`` ([N] or [1, N]) through ``model`` in eval mode in windows of ``seq_len`` tokens and
    sum each MoE layer's routed-assignment counts (read from the modules, not the outputs). Returns
    ``{layer_idx: counts [E]}``."""
    model.eval()
    ids = input_ids.reshape(-1)
    device = next(model.parameters()).device
    totals: dict[int, torch.Tensor] = {}
    for start in range(0, ids.numel(), seq_len):
        window = ids[start : start + seq_len][None].to(device)
        model(input_ids=window, use_cache=False)
        for layer_idx, counts_E in collect_expert_load(model, source="last").items():
            totals[layer_idx] = totals.get(layer_idx, 0) + counts_E
    return totals


__all__ = [
    "AuxFreeBiasCallback",
    "ExpertLoadLoggingCallback",
    "update_expert_bias",
    "collect_expert_load",
    "load_metrics",
    "install_moe_callbacks",
    "plot_expert_load_heatmap",
    "read_load_log",
    "measure_expert_load",
]
