"""Shared fixtures: tiny configs (from ``hf_hybrid.presets``), the project's ``shared/`` directory (skips
cleanly when it is absent), and the small real checkpoint in it. Add fixtures for everyone here; keep them
cheap."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_hybrid  # noqa: F401  (registers the model family)
from hf_hybrid.data import find_shared_dir
from hf_hybrid.mixers import MIXER_REGISTRY
from hf_hybrid.presets import preset_config

SHAKESPEARE_CHECKPOINT = "data/checkpoints/llama-shakespeare-6m"


def require_mixers(config) -> None:
    """Skip the calling test when ``config`` uses a mixer type this checkout does not register yet."""
    missing = sorted({m for m in config.mixer_types if m not in MIXER_REGISTRY})
    if missing:
        pytest.skip(f"mixer type(s) not implemented yet: {', '.join(missing)}")


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config("tiny-hybrid", vocab_size=300)`` -> HybridConfig of a preset (skips when one of
    its mixers is not registered)."""

    def make(name: str = "tiny-attention", **overrides):
        config = preset_config(name, **overrides)
        require_mixers(config)
        return config

    return make


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (or ``$HF_HYBRID_SHARED_DIR``); the test is skipped when it is
    absent."""
    path = find_shared_dir()
    if path is None:
        pytest.skip("../shared is not present beside this checkout")
    return path


@pytest.fixture(scope="session")
def shakespeare_checkpoint(shared_dir: Path) -> Path:
    """The small dense Llama trained on Shakespeare (bf16 safetensors + tokenizer), skipped when absent."""
    path = shared_dir / SHAKESPEARE_CHECKPOINT
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is not present")
    return path
