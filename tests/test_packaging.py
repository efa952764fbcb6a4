"""The built wheel is what a user installs: it must carry the card template, state its licence as SPDX, build
without setuptools deprecation warnings, and work from an ordinary (non-editable) install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("hf_hybrid-*.whl")
    return path, proc.stdout + proc.stderr


def test_wheel_carries_the_card_template_and_an_spdx_licence(wheel):
    path, log = wheel
    assert "BuildBackendWarning" not in log and "deprecated" not in log.lower(), log
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert "hf_hybrid/templates/model_card.md" in names
        packaged = zf.read("hf_hybrid/templates/model_card.md").decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    # the console script parses before `import hf_hybrid` (fast --help): its launcher ships beside the package
    assert "hf_hybrid_cli.py" in names and "hf-hybrid = hf_hybrid_cli:main" in entry_points
    assert packaged == (ROOT / "model_cards" / "hf_hybrid_card.md").read_text(encoding="utf-8")
    assert "License-Expression: Apache-2.0" in metadata
    assert (
        "Requires-Dist: transformers<5.26,>=5.23" in metadata
        or "Requires-Dist: transformers>=5.23,<5.26" in metadata
    )


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    path, _ = wheel
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import hf_hybrid, torch, os\nfrom hf_hybrid.card import template_text\nfrom "
        "hf_hybrid.presets import preset_config\nassert "
        f"hf_hybrid.__file__.startswith({str(target)!r}), hf_hybrid.__file__\nassert '${{' in "
        "template_text()\nm = hf_hybrid.HybridForCausalLM(preset_config('tiny-hybrid', "
        "vocab_size=64))\nm.save_pretrained('ckpt')\nassert os.path.isfile('ckpt/README.md') "
        "and os.path.isfile('ckpt/model.safetensors')\nprint('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
