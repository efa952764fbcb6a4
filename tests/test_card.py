"""Model cards: template copies, front matter, architecture table, never clobbering, and the push_to_hub
path."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import EntryNotFoundError

from hf_hybrid import HybridForCausalLM
from hf_hybrid.card import parse_front_matter, render_model_card, write_model_card

REPO = Path(__file__).resolve().parent.parent


def test_template_copies_are_identical():
    canonical = REPO / "model_cards" / "hf_hybrid_card.md"
    packaged = REPO / "hf_hybrid" / "templates" / "model_card.md"
    assert canonical.read_text() == packaged.read_text(), (
        "edit model_cards/hf_hybrid_card.md and copy it over"
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "templates/*.md" in pyproject  # shipped as package data


def _layer_rows(text: str) -> list[str]:
    section = text.split("| layer | mixer | MLP | parameters |", 1)[1].split("\n\n", 1)[0]
    return [line for line in section.strip().splitlines()[1:] if line.startswith("|")]


def test_card_front_matter_and_tables(tiny_config):
    config = tiny_config("tiny-hybrid")
    config.hf_hybrid_lineage = {
        "base_model": "meta-llama/Llama-3.2-1B",
        "base_architecture": "LlamaForCausalLM",
        "recipe": "import",
        "options": {"dtype": "bfloat16"},
        "metrics": {"eval_perplexity": 12.3456},
    }
    text = render_model_card(config, metrics={"mmlu": 0.25}, model_id="me/tiny")
    meta = parse_front_matter(text)
    assert meta["library_name"] == "hf-hybrid" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:2] == ["hf-hybrid", "hybrid"] and "gated-deltanet" in meta["tags"]
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    rows = _layer_rows(text)
    assert len(rows) == config.num_hidden_layers
    assert rows[3].split("|")[2].strip() == "attention"
    assert "3×gated_deltanet, attention" in text
    for expected in (
        "## Cost",
        "active",
        "@4K",
        "## Lineage",
        "LlamaForCausalLM",
        "12.35",
        "mmlu",
        "import hf_hybrid",
        "AutoModelForCausalLM",
        '"me/tiny"',
    ):
        assert expected in text, expected
    assert "$" not in text.replace("${", "")  # every placeholder was filled


def test_card_moe_tag_and_local_base_model(tiny_config, tmp_path):
    config = tiny_config("tiny-moe")
    config.hf_hybrid_lineage = {"base_model": str(tmp_path), "recipe": "upcycle"}
    meta = parse_front_matter(render_model_card(config))
    assert "moe" in meta["tags"]
    assert "base_model" not in meta  # a local path is lineage, not Hub metadata
    plain = render_model_card(tiny_config("tiny-attention"))
    assert "No lineage recorded" in plain


def test_card_without_a_cost_function_still_renders(tiny_config, monkeypatch):
    import dataclasses

    from hf_hybrid import registry

    # e.g. a new mixer type whose cost function is not written yet
    spec = dataclasses.replace(registry.mixer_spec("attention"), cost=None)
    monkeypatch.setitem(registry._MIXERS, "attention", spec)
    text = render_model_card(tiny_config("tiny-attention"))
    assert "Cost not available" in text and len(_layer_rows(text)) == 2
    assert parse_front_matter(text)["library_name"] == "hf-hybrid"


def test_save_pretrained_writes_card_once(tiny_config, tmp_path):
    model = HybridForCausalLM(tiny_config("tiny-attention"))
    model.save_pretrained(tmp_path / "m")
    readme = tmp_path / "m" / "README.md"
    assert parse_front_matter(readme.read_text())["library_name"] == "hf-hybrid"
    readme.write_text("# my own card\n")
    model.save_pretrained(tmp_path / "m")
    assert readme.read_text() == "# my own card\n"
    with pytest.raises(FileExistsError):
        write_model_card(model.config, tmp_path / "m")
    write_model_card(model.config, tmp_path / "m", overwrite=True)
    assert readme.read_text().startswith("---\nlibrary_name: hf-hybrid")


class _FakeRepo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


class _FakeApi:
    def create_repo(self, repo_id, **kwargs):
        return _FakeRepo(repo_id)


@pytest.fixture
def offline_hub(monkeypatch):
    """transformers' Hub calls replaced: no network; the upload records what it would send."""
    from transformers.utils import hub

    uploads = []

    def fake_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        files = sorted(p.name for p in Path(working_dir).iterdir())
        readme = Path(working_dir, "README.md").read_text() if "README.md" in files else None
        uploads.append({"repo_id": repo_id, "files": files, "readme": readme})

    monkeypatch.setattr(hub, "hf_api", lambda: _FakeApi())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    return uploads


def test_push_to_hub_uploads_our_card(tiny_config, offline_hub, monkeypatch):
    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md on the Hub")

    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, *a, **k: no_remote_card()))
    model = HybridForCausalLM(tiny_config("tiny-attention"))
    model.push_to_hub("me/tiny-hybrid")
    (upload,) = offline_hub
    assert "config.json" in upload["files"] and "model.safetensors" in upload["files"]
    assert upload["repo_id"] == "me/tiny-hybrid"
    meta = parse_front_matter(upload["readme"])
    assert meta["library_name"] == "hf-hybrid"
    assert '"me/tiny-hybrid"' in upload["readme"]


def test_push_to_hub_keeps_the_card_already_on_the_hub(tiny_config, offline_hub, monkeypatch):
    remote = ModelCard("---\nlicense: mit\n---\n# The owner's card\n")
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, *a, **k: remote))
    model = HybridForCausalLM(tiny_config("tiny-attention"))
    model.push_to_hub("me/tiny-hybrid", tags=["extra"])
    (upload,) = offline_hub
    assert "# The owner's card" in upload["readme"] and "extra" in upload["readme"]


def test_save_pretrained_with_push_to_hub_keeps_local_readme(tiny_config, offline_hub, monkeypatch, tmp_path):
    monkeypatch.setattr(
        ModelCard, "load", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(EntryNotFoundError("none")))
    )
    model = HybridForCausalLM(tiny_config("tiny-attention"))
    target = tmp_path / "local"
    target.mkdir()
    (target / "README.md").write_text("# mine\n")
    model.save_pretrained(target, push_to_hub=True, repo_id="me/x")
    assert (target / "README.md").read_text() == "# mine\n"
    assert (target / "config.json").is_file()
    (upload,) = offline_hub
    assert upload["repo_id"] == "me/x" and parse_front_matter(upload["readme"])["library_name"] == "hf-hybrid"


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_checkpoints_honour_the_umask(tmp_path, umask):
    """save_pretrained and the converters write through private temporary directories (0700) and
    safetensors writes 0600: what lands in place has the modes an ordinary mkdir / open would give."""
    import os

    from hf_hybrid.convert.upcycle import upcycle
    from hf_hybrid.presets import preset_config

    previous = os.umask(umask)
    try:
        HybridForCausalLM(preset_config("tiny-attention")).save_pretrained(tmp_path / "saved")
        upcycle(tmp_path / "saved", tmp_path / "moe", num_experts=2, top_k=2)
        HybridForCausalLM(preset_config("tiny-attention")).save_pretrained(tmp_path / "saved")  # over it
    finally:
        os.umask(previous)
    for directory in (tmp_path / "saved", tmp_path / "moe"):
        modes = _modes(directory)
        assert {"model.safetensors", "config.json", "README.md"} <= set(modes), modes
        for name, mode in modes.items():
            want = (0o777 if (directory / name).is_dir() else 0o666) & ~umask
            assert mode == want, (directory.name, name, oct(mode), oct(want))


def test_card_base_model_is_a_hub_id_or_absent(tmp_path):
    """A local source path never becomes the card's ``base_model`` (the Hub metadata names a Hub model) nor
    appears in full in the card; a Hub id, or a local copy in the Hub cache, does."""
    from hf_hybrid.card import _hub_id
    from hf_hybrid.convert.native import _export_card, get_family
    from hf_hybrid.presets import preset_config

    local = tmp_path / "my-llama"
    local.mkdir()
    cached = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/abc123"
    assert (
        _hub_id(str(local)) is None and _hub_id("outputs/main") is None or not Path("outputs/main").exists()
    )
    assert _hub_id(cached) == "Qwen/Qwen3-0.6B" and _hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    for base, want in (
        (str(local), None),
        (cached, "Qwen/Qwen3-0.6B"),
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ):
        config = preset_config("tiny-attention")
        config.hf_hybrid_lineage = {"base_model": base, "source": base, "recipe": "import"}
        for card in (render_model_card(config), _export_card(config, get_family("llama"), "dst")):
            assert parse_front_matter(card).get("base_model") == want, card
            assert str(tmp_path) not in card and "/home/u" not in card, card


def test_the_cards_usage_snippet_runs_as_written(tmp_path):
    """The card's Python block, with the checkpoint's path in place of the placeholder id, runs in a fresh
    interpreter against a locally saved model and tokenizer (what a reader copies from the Hub page)."""
    import re
    import subprocess
    import sys

    from hf_hybrid.card import _PLACEHOLDER_ID
    from hf_hybrid.data import byte_tokenizer
    from hf_hybrid.presets import preset_config

    out = tmp_path / "model"
    HybridForCausalLM(preset_config("tiny-hybrid", vocab_size=257)).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    card = (out / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert _PLACEHOLDER_ID in snippet and "import hf_hybrid" in snippet
    code = snippet.replace(_PLACEHOLDER_ID, str(out))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The quick brown fox"), proc.stdout
