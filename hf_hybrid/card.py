"""Model cards: architecture, lineage and cost of an hf_hybrid checkpoint, rendered from ``model_cards/``.

``HybridPreTrainedModel.save_pretrained`` writes one (``README.md``) when the target directory has none; a
user's README is never overwritten (``write_model_card`` refuses unless ``overwrite=True``; ``hf-hybrid card
DIR`` needs ``--force``). The template is ``model_cards/hf_hybrid_card.md`` in a source checkout, with an
identical copy shipped in the package (``hf_hybrid/templates/model_card.md``) for installed copies; a test
keeps the two identical. The template uses ``string.Template`` placeholders (``${name}``), so it needs no
template engine.
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .configuration_hybrid import HybridConfig
from .cost import compress_pattern, estimate_cost, format_count
from .files import honour_umask
from .registry import mixer_spec, mlp_spec

TEMPLATE_NAME = "hf_hybrid_card.md"
_REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME
_PLACEHOLDER_ID = "path/or/repo-id"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_DIR = re.compile(r"models--([\w.-]+?)--([\w.-]+)(?:/|$)")


def template_text() -> str:
    """The card template: the checkout's ``model_cards/`` copy when present, else the packaged one."""
    if _REPO_TEMPLATE.is_file():
        return _REPO_TEMPLATE.read_text(encoding="utf-8")
    return resources.files(__package__).joinpath("templates/model_card.md").read_text(encoding="utf-8")


def _hub_id(value: Any) -> str | None:
    """The Hub repo id (``owner/name``) behind a lineage's ``base_model``, else None: the Hub's ``base_model``
    metadata must name a Hub model, while lineage may record a local directory. A local copy in the Hub cache
    (``.../models--owner--name/snapshots/<sha>``) gives its repo id; any other local path gives None."""
    if not isinstance(value, str):
        return None
    cached = _HUB_CACHE_DIR.search(value.replace(os.sep, "/"))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if _HUB_ID.match(value) and not value.startswith((".", "/", "~")) and not os.path.exists(value):
        return value
    return None


def source_name(src: Any) -> str:
    """How lineage records a source: a local directory as its absolute path (so that a relative path such as
    ``outputs/main`` is never mistaken for a Hub id), anything else as given."""
    text = os.fspath(src)
    return os.path.abspath(text) if os.path.exists(text) else text


def base_model_text(value: Any) -> str | None:
    """How a card's text names the base model: its Hub id, else a local directory's name only (a card is
    published; the absolute path of the machine it was made on means nothing to its readers)."""
    if not value:
        return None
    hub = _hub_id(value)
    return hub if hub else f"a local checkpoint ({os.path.basename(str(value).rstrip('/'))})"


def card_tags(config: HybridConfig) -> list[str]:
    tags = ["hf-hybrid", "hybrid"]
    for mixer in dict.fromkeys(config.mixer_types):
        tags.append(mixer.replace("_", "-"))
    for mlp in dict.fromkeys(config.mlp_types):
        tag = mlp_spec(mlp).tag
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def _front_matter(config: HybridConfig, extra_tags: list[str] | None) -> str:
    lineage = config.hf_hybrid_lineage or {}
    tags = card_tags(config)
    for tag in extra_tags or []:
        if tag not in tags:
            tags.append(tag)
    data: dict[str, Any] = {"library_name": "hf-hybrid", "tags": tags, "pipeline_tag": "text-generation"}
    base = _hub_id(lineage.get("base_model"))
    if base:
        data["base_model"] = base
    if lineage.get("license"):
        data["license"] = lineage["license"]
    return yaml.safe_dump(data, sort_keys=False).strip()


def _add_kind_rows(rows: list[tuple[str, str]], specs: list[Any], config: HybridConfig) -> None:
    """Each kind describes itself (its registry spec's ``describe``); rows several kinds share (the attention
    heads of attention, sliding-window and DSA layers) appear once."""
    for spec in specs:
        for row in spec.describe(config) if spec.describe else ():
            if row not in rows:
                rows.append(row)


def _settings(config: HybridConfig) -> list[tuple[str, str]]:
    rope = config.rope_parameters or {}
    rows = [
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("vocabulary", str(config.vocab_size)),
        ("max positions", str(config.max_position_embeddings)),
        ("tied embeddings", str(bool(config.tie_word_embeddings)).lower()),
        ("RoPE", ", ".join(f"{k}={v}" for k, v in rope.items())),
    ]
    _add_kind_rows(rows, [mixer_spec(m) for m in dict.fromkeys(config.mixer_types)], config)
    scaled = (
        config.residual_from_norm
        or config.mixer_residual_scales
        or config.mixer_output_scales
        or config.mlp_residual_scale != 1
        or config.mlp_output_scale != 1
    )
    if scaled:
        where = "the input norm's output" if config.residual_from_norm else "the layer input"
        rows.append(("residuals", f"α·residual + β·branch, residual = {where}"))
    if config.hyper_connections != "none":  # hyper-connection residual streams
        form = {"ihc": "independent (iHC)", "mhc": "manifold-constrained (mHC, Sinkhorn-mixed)"}
        rows.append(
            ("residuals", f"{config.hc_mult} hyper-connection streams, {form[config.hyper_connections]}")
        )
    multipliers = [
        (n, getattr(config, n)) for n in ("embedding_multiplier", "logits_scaling") if getattr(config, n) != 1
    ]
    if multipliers:
        rows.append(("multipliers", ", ".join(f"{n} {v}" for n, v in multipliers)))
    if config.kv_source_layers is not None:  # cross-layer KV sharing: which layer reads whose keys/values
        shared = [f"{i}←{j}" for i, j in enumerate(config.kv_source_layers) if i != j]
        rows.append(("KV sharing", f"layer←source {', '.join(shared)} (a shared KV is cached once)"))
    extras = [
        n
        for n, on in (
            ("query log-position scaling", config.query_log_scaling),
            ("indexer query LayerNorm", config.index_q_norm),
            ("learned RoPE frequency scale", config.rope_learned_scale),
            (
                f"logit softcapping {config.final_logit_softcapping}",
                config.final_logit_softcapping is not None,
            ),
        )
        if on
    ]
    if extras:
        rows.append(("options", ", ".join(extras)))
    _add_kind_rows(rows, [mlp_spec(m) for m in dict.fromkeys(config.mlp_types)], config)
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _lineage(config: HybridConfig, metrics: dict[str, Any] | None) -> str:
    lineage = dict(config.hf_hybrid_lineage or {})
    merged_metrics = {**(lineage.pop("metrics", None) or {}), **(metrics or {})}
    lines = []
    if not lineage:
        lines.append(
            "No lineage recorded (a model built from a config and trained from scratch, or not yet trained)."
        )
    else:
        for key in ("base_model", "base_architecture", "recipe"):
            if key in lineage:
                value = lineage.pop(key)
                value = base_model_text(value) if key == "base_model" else value
                lines.append(f"- **{key.replace('_', ' ')}**: `{value}`")
        if isinstance(lineage.get("source"), str):  # a local path: its name only (see base_model_text)
            lineage["source"] = base_model_text(lineage["source"])
        for key, value in lineage.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
            lines.append(f"- **{key.replace('_', ' ')}**: `{text}`")
    if merged_metrics:
        lines.append("")
        lines.append(
            _markdown_table(["metric", "value"], [[k, _metric_text(v)] for k, v in merged_metrics.items()])
        )
    return "\n".join(lines)


def _metric_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(
    config: HybridConfig,
    *,
    metrics: dict[str, Any] | None = None,
    model_id: str | None = None,
    extra_tags: list[str] | None = None,
) -> str:
    """The model card (Markdown with YAML front matter) of ``config``.

    ``metrics`` (e.g. ``{"eval_perplexity": 12.3}``) are shown with any ``metrics`` in
    ``config.hf_hybrid_lineage``; ``model_id`` is the name used in the loading example (the Hub repo id when
    pushing)."""
    try:
        report = estimate_cost(config)
    except (
        ValueError
    ) as err:  # a mixer type without a cost function yet: never block save_pretrained on the card
        report, cost_error = None, str(err)
    if report is not None:
        cost_header, cost_rows = report.table_rows()
        layer_params = [format_count(layer.params) for layer in report.layers]
        total = f"{format_count(report.total_params)} ({report.total_params:,})"
        active = f"{format_count(report.active_params)} ({report.active_params:,})"
        params_note = "exact count" if report.exact else "from formulas"
        cost_table = _markdown_table(cost_header, cost_rows)
        dtype_bytes = report.dtype_bytes
    else:
        layer_params = ["?"] * config.num_hidden_layers
        total = active = "unknown"
        params_note = "cost not available"
        cost_table = f"Cost not available: {cost_error}"
        dtype_bytes = 2
    layer_rows = [
        f"| {i} | {mixer} | {mlp} | {n} |"
        for i, (mixer, mlp, n) in enumerate(zip(config.mixer_types, config.mlp_types, layer_params))
    ]
    lineage = config.hf_hybrid_lineage or {}
    title = config.name_or_path.rstrip("/").split("/")[-1] if model_id is None else model_id.split("/")[-1]
    if not title or title.startswith(".tmp-"):
        title = "hf_hybrid model"
    base = lineage.get("base_model")
    summary = (
        f"A hybrid decoder built with hf-hybrid ({total.split(' (')[0]} parameters, "
        f"{active.split(' (')[0]} active): {compress_pattern(config.mixer_types)}."
    )
    if base:
        recipe = lineage.get("recipe", "unknown")
        summary += f" Derived from {base_model_text(base)} (recipe: {recipe})."
    from . import __version__

    outside = config.outside_kind_modules() or {}
    modules = sorted({m for kinds in outside.values() for m in kinds.values()})
    if modules:
        kinds = ", ".join(f"`{k}` ({m})" for kinds in outside.values() for k, m in kinds.items())
        load_intro = (
            "hf_hybrid models load through the transformers Auto classes once the package is imported\n"
            "(`pip install hf-hybrid`). This model's layers also use kinds defined outside hf_hybrid: "
            f"{kinds}.\nPut the module(s) named there on the Python path and pass `trust_remote_code=True`, "
            "which imports them (and so runs their code):"
        )
    else:
        load_intro = (
            "hf_hybrid models load through the transformers Auto classes once the package is imported\n"
            "(`pip install hf-hybrid`; no `trust_remote_code`):"
        )

    values = {
        "front_matter": _front_matter(config, extra_tags),
        "title": title,
        "summary": summary,
        "settings_rows": "\n".join(f"| {k} | {v} |" for k, v in _settings(config)),
        "layer_pattern": compress_pattern(config.mixer_types),
        "mlp_pattern": compress_pattern(config.mlp_types),
        "layer_rows": "\n".join(layer_rows),
        "total_params": total,
        "active_params": active,
        "params_note": params_note,
        "dtype_bytes": str(dtype_bytes),
        "cost_table": cost_table,
        "lineage": _lineage(config, metrics),
        "model_id": model_id or _PLACEHOLDER_ID,
        "version": __version__,
        "load_intro": load_intro,
        "load_kwargs": ", trust_remote_code=True" if modules else "",
        "inspect_flag": " --trust-remote-code" if modules else "",
    }
    return string.Template(template_text()).substitute(values)


def write_model_card(
    config: HybridConfig,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    metrics: dict[str, Any] | None = None,
    model_id: str | None = None,
) -> Path:
    """Write ``README.md`` into ``directory``; refuses (``FileExistsError``) to replace an existing one unless
    ``overwrite``. Returns the card's path."""
    path = Path(directory) / "README.md"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (hf-hybrid card --force) to replace it")
    text = render_model_card(config, metrics=metrics, model_id=model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename, so an interrupted write never leaves half a card.
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".md", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    honour_umask(tmp)  # mkstemp makes it 0600
    os.replace(tmp, path)
    return path


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (between the leading ``---`` lines)."""
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if not match:
        raise ValueError("model card has no YAML front matter")
    return yaml.safe_load(match.group(1)) or {}


def push_to_hub_with_card(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> Any:
    """transformers' ``push_to_hub`` flow, but the uploaded README.md is our card unless the Hub repo already
    has one (transformers replaces it by the Hub's card or a generic "🤗 transformers model" card in every
    case).

    A card already on the Hub is kept (with the tags added), as transformers does: never clobber a user's
    card."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import EntryNotFoundError
    from transformers.utils import hub as hf_hub

    tags = list(tags or []) + [t for t in (model.model_tags or []) if t not in (tags or [])]
    repo_id = hf_hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    try:
        remote_card = ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:
        remote_card = None
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        readme = os.path.join(tmp_dir, "README.md")
        if remote_card is not None:
            if remote_card.data.tags is None:
                remote_card.data.tags = []
            remote_card.data.tags.extend(t for t in tags if t not in remote_card.data.tags)
            remote_card.save(readme)
        else:
            text = render_model_card(model.config, model_id=repo_id, extra_tags=tags)
            with open(readme, "w", encoding="utf-8") as f:
                f.write(text)
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


__all__ = [
    "render_model_card",
    "write_model_card",
    "parse_front_matter",
    "push_to_hub_with_card",
    "template_text",
]


# ---- Trainer.create_model_card / Trainer.push_to_hub -------------------------------------------------------
# Trainer.push_to_hub saves the model (which writes our card) and then calls Trainer.create_model_card, which
# overwrites README.md with transformers' generic training summary. For an hf_hybrid model we keep our card
# and append that summary (hyperparameters, results) below it (patched in by hf_hybrid/trainer_patch.py).


def _unwrapped_hybrid(trainer) -> Any:
    """The trained model when it is an hf_hybrid model itself (a PEFT wrapper keeps its own card), else None.
    Told by its config: the card does not import the model (which imports the card)."""
    from transformers import PreTrainedModel

    model = (
        trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    )
    is_hybrid = isinstance(model, PreTrainedModel) and isinstance(
        getattr(model, "config", None), HybridConfig
    )
    return model if is_hybrid else None


def merge_training_summary(card: str, summary: str) -> str:
    """Our card with the body of transformers' training summary (its front matter dropped) appended."""
    body = re.sub(r"^---\n.*?\n---\n", "", summary, count=1, flags=re.DOTALL).strip()
    return card.rstrip() + "\n\n## Training (transformers Trainer)\n\n" + body + "\n" if body else card


def patch_create_model_card(cls) -> None:
    """``Trainer.create_model_card`` (and so ``Trainer.push_to_hub``) keeps our card for an hf_hybrid model,
    with transformers' training summary appended (applied by ``hf_hybrid.trainer_patch``)."""
    if getattr(cls.create_model_card, "_hf_hybrid", False):
        return
    original = cls.create_model_card

    def create_model_card(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = _unwrapped_hybrid(self)
        path = os.path.join(self.args.output_dir, "README.md")
        if model is None or not self.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            summary = f.read()
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = render_model_card(
            model.config, model_id=self.hub_model_id if self.args.push_to_hub else None, extra_tags=tags
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(merge_training_summary(card, summary))

    create_model_card._hf_hybrid = True
    create_model_card.__doc__ = original.__doc__
    cls.create_model_card = create_model_card
