"""Reading and writing checkpoint directories, for every converter (import_dense, the native families, upcycle,
DSA conversion): safetensors only (loading a pickle can run code), the files carried over beside the weights, the
source's licence, and atomic writes (a refused or failed write leaves no destination behind)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

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
    """The source checkpoint cannot be converted (unsupported architecture, unsafe or missing weights, ...)."""


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
            f"{src} has only pickle-based weights ({', '.join(pickled[:3])}); hf_hybrid reads safetensors only, because "
            "loading a pickle can run arbitrary code. Convert it in an environment you trust (load it with "
            "transformers and save_pretrained(..., safe_serialization=True)), then import that copy"
        )
    fail(f"{src} has no model.safetensors or model.safetensors.index.json: nothing to import")
    raise AssertionError  # unreachable


def carried_files(src: Path) -> list[Path]:
    return [src / name for name in CARRIED_FILES if (src / name).is_file()]


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
    directory, checked by the caller), so a refused or failed write leaves no ``dst`` behind. Returns ``dst``."""
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    try:
        write(tmp)
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


def write_checkpoint(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None, dtype=None) -> Path:
    """Save ``model`` (cast to ``dtype``), its model card, and the carried files of ``src`` to ``dst`` atomically.
    ``dst`` must not exist or be empty."""
    dst = check_dst(dst)
    if dtype is not None:
        model = model.to(dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for path in carried_files(Path(src)) if src is not None else ():
            if not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)

    return write_atomically(dst, write)


__all__ = [
    "CARRIED_FILES",
    "UnsupportedCheckpointError",
    "carried_files",
    "check_dst",
    "fail",
    "source_license",
    "weight_files",
    "write_atomically",
    "write_checkpoint",
]
