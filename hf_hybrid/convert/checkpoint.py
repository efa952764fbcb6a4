"""Reading and writing checkpoint directories, for every converter (import_dense, the native families,
upcycle, DSA conversion, hybridize): safetensors only (loading a pickle can run code), the files carried over
beside the weights, the source's licence, atomic writes (a refused or failed write leaves no destination
behind), rebuilding a model around a converted state dict, and the option parsing the converters share
(dtypes, layer lists). Reading the source as an hf_hybrid model is ``hf_hybrid.convert.source``."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ..files import honour_umask

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a converted checkpoint keeps from its source (tokenizer, chat template, generation defaults).
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class UnsupportedCheckpointError(ValueError):
    """The source checkpoint cannot be converted (unsupported architecture, unsafe or missing weights,
    ...)."""


def fail(message: str) -> None:
    raise UnsupportedCheckpointError(message)


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of ``src`` (sharded or single); a pickle-only or empty directory is refused."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({src / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            fail(f"{index} lists shards that are not in {src}: {', '.join(missing)}")
        return files
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in src.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        fail(
            f"{src} has only pickle-based weights ({', '.join(pickled[:3])}); hf_hybrid "
            "reads safetensors only, because loading a pickle can run arbitrary code. "
            "Convert it in an environment you trust (load it with transformers and "
            "save_pretrained(..., safe_serialization=True)), then import that copy"
        )
    fail(f"{src} has no model.safetensors or model.safetensors.index.json: nothing to import")
    raise AssertionError  # unreachable


def carried_files(src: Path) -> list[Path]:
    return [src / name for name in CARRIED_FILES if (src / name).is_file()]


def copy_carried_files(src: str | os.PathLike | None, dst: Path, *, overwrite: bool = False) -> None:
    """Copy the source's tokenizer / chat template / generation files (:data:`CARRIED_FILES`) into ``dst``.
    Files ``dst`` already has (written by ``save_pretrained``, e.g. ``generation_config.json``) are kept
    unless ``overwrite`` (a model built from a config rather than loaded has default generation settings: the
    source's win)."""
    for path in carried_files(Path(src)) if src is not None else ():
        if overwrite or not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)


def source_license(src: Path) -> str | None:
    """The ``license`` of the source's model card front matter, if any."""
    readme = src / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    license_ = data.get("license") if isinstance(data, dict) else None
    return license_ if isinstance(license_, str) else None


def write_atomically(dst: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp_dir)`` into a sibling temporary directory, then rename it to ``dst`` (an empty or missing
    directory, checked by the caller), so a refused or failed write leaves no ``dst`` behind. Returns
    ``dst``."""
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    try:
        write(tmp)
        honour_umask(tmp)  # tempfile made it private (0700); give it the modes of an ordinary mkdir
        if dst.exists():
            dst.rmdir()  # empty, checked by the caller
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def check_dst(dst: str | os.PathLike) -> Path:
    """``dst`` must not exist (or be an empty directory)."""
    path = Path(dst)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    return path


def write_checkpoint(
    model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None, dtype=None
) -> Path:
    """Save ``model`` (cast to ``dtype``), its model card, and the carried files of ``src`` to ``dst``
    atomically. ``dst`` must not exist or be empty."""
    dst = check_dst(dst)
    if dtype is not None:
        model = model.to(dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        copy_carried_files(src, tmp)

    return write_atomically(dst, write)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a dtype or None passes through); ``ValueError`` for anything
    else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (try float32, bfloat16, float16)")
    return value


def check_layer_indices(layers, n: int, *, what: str) -> list[int]:
    """``layers`` sorted and deduplicated; ``ValueError`` naming ``what`` (e.g. ``"upcycle: layers"``) for an
    entry that is not an integer or not a layer of an ``n``-layer model."""
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"{what} entry {i!r} must be an integer layer index")
    layers = sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} do not exist; the model has layers 0..{n - 1}")
    return layers


def rebuild_model(model, config, state: dict[str, torch.Tensor]):
    """A new ``HybridForCausalLM(config)`` holding exactly ``state`` (built on meta: no init, no extra
    memory), on the source model's device."""
    from ..modeling_hybrid import HybridForCausalLM

    device = next(model.parameters()).device
    with torch.device("meta"):
        new = HybridForCausalLM(config)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    result = new.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise RuntimeError(f"internal error: rebuilt model does not match its state: {result}")
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    leftover = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device: {leftover[:5]}")
    new.train(model.training)
    return new


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,5"`` -> ``(1, 3, 5)``; ``None`` stays ``None``. Raises ``ValueError`` (the CLI makes it a usage
    error)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices, e.g. 1,3,5") from None


__all__ = [
    "CARRIED_FILES",
    "UnsupportedCheckpointError",
    "as_dtype",
    "carried_files",
    "check_dst",
    "copy_carried_files",
    "check_layer_indices",
    "parse_layers",
    "rebuild_model",
    "fail",
    "source_license",
    "weight_files",
    "write_atomically",
    "write_checkpoint",
]
