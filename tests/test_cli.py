"""The ``hf-hybrid`` command: inspect / import / card, plugins, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hybrid import HybridForCausalLM, cli
from hf_hybrid.card import parse_front_matter

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_preset_table_json_plot(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", "qwen3-next-like")
    assert code == 0 and "gated_deltanet" in out and "@128K" in out and "active" in out
    code, out, _ = run(capsys, "inspect", "tiny-sliding", "--context", "1K,8192", "--json")
    data = json.loads(out)
    assert (
        code == 0
        and data["contexts"] == [1024, 8192]
        and data["layer_pattern"] == "3×sliding_attention, attention"
    )
    png = tmp_path / "cache.png"
    code, out, _ = run(capsys, "inspect", "tiny-mla", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_dir_config_and_yaml(capsys, tmp_path, tiny_config):
    config = tiny_config("tiny-attention")
    model = HybridForCausalLM(config)
    model.save_pretrained(tmp_path / "ckpt")
    expected = sum(p.numel() for p in model.parameters())
    for target in (tmp_path / "ckpt", tmp_path / "ckpt" / "config.json"):
        code, out, _ = run(capsys, "inspect", str(target), "--json")
        assert code == 0 and json.loads(out)["total_params"] == expected
    plain = tmp_path / "design.yaml"
    plain.write_text(yaml.safe_dump({"preset": "tiny-attention", "num_hidden_layers": 3}))
    code, out, _ = run(capsys, "inspect", str(plain), "--json")
    assert code == 0 and len(json.loads(out)["layers"]) == 3
    code, out, _ = run(
        capsys, "inspect", str(REPO / "recipes" / "main" / "tiny.yaml")
    )  # a recipe's model section
    assert code == 0 and "attention" in out


def test_inspect_a_llama_checkpoint_dir(capsys, tmp_path):
    LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--json")
    attn = 2 * 32 * 32 + 2 * 32 * 16  # q, o (4 heads × 8) and k, v (2 KV heads × 8)
    layer = attn + 3 * 32 * 64 + 2 * 32
    assert code == 0 and json.loads(out)["total_params"] == 2 * layer + 2 * 100 * 32 + 32


def test_import_and_card_commands(capsys, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(src)
    dst = tmp_path / "imported"
    code, out, err = run(capsys, "import", str(src), str(dst), "--base-model", "org/llama-tiny")
    assert code == 0 and (dst / "model.safetensors").is_file(), err
    readme = dst / "README.md"
    assert parse_front_matter(readme.read_text())["base_model"] == "org/llama-tiny"

    readme.write_text("# hand-written\n")
    code, _, err = run(capsys, "card", str(dst))
    assert code == 2 and "--force" in err and readme.read_text() == "# hand-written\n"
    code, out, _ = run(capsys, "card", str(dst), "--force", "--metrics", '{"eval_perplexity": 9.5}')
    assert code == 0 and "eval_perplexity" in readme.read_text()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["inspect", "no-such-preset"], "not a directory, config file or preset"),
        (["import", "/nonexistent/src", "/tmp/never-written"], "not a directory"),
        (["card", "/nonexistent/dir"], "is not a directory"),
    ],
)
def test_user_errors_are_one_line_with_status_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not Path("/tmp/never-written").exists()


def test_import_refusal_writes_nothing(capsys, tmp_path):
    src = tmp_path / "moe"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "dbrx"}))  # mixtral & co. import natively now
    code, _, err = run(capsys, "import", str(src), str(tmp_path / "out"))
    assert code == 2 and "model_type='dbrx'" in err and "supported" in err and not (tmp_path / "out").exists()


def test_plugins(monkeypatch, capsys):
    plugin = types.ModuleType("fake_hf_hybrid_plugin")

    def register_cli(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    plugin.register_cli = register_cli
    monkeypatch.setitem(sys.modules, "fake_hf_hybrid_plugin", plugin)
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("hf_hybrid.convert.not_written_yet", "fake_hf_hybrid_plugin"))
    code, out, _ = run(capsys, "hello", "--name", "hybrid")
    assert code == 0 and out.strip() == "hello hybrid"


def test_plugin_with_a_broken_import_is_not_hidden(monkeypatch):
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("hf_hybrid.convert.not_written_yet",))
    cli.build_parser()  # the plugin module itself does not exist: skipped silently

    def failing_import(name, *args, **kwargs):  # the plugin exists but one of *its* imports is missing
        raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    monkeypatch.setattr(cli.importlib, "import_module", failing_import)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        cli.build_parser()


def test_known_plugins_register_when_present():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"inspect", "import", "card"} <= commands
    for module, command in (
        ("hf_hybrid.moe_training", "expert-load"),
        ("hf_hybrid.convert.upcycle", "upcycle"),
        ("hf_hybrid.convert.dsa", "convert-dsa"),
    ):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "register_cli"):
            assert command in commands, command


def test_console_command_in_a_subprocess():
    """The installed ``hf-hybrid`` script (or ``python -m hf_hybrid.cli`` in a bare checkout): a user error exits 2
    with one line on stderr and no traceback."""
    exe = shutil.which("hf-hybrid")
    base = [exe] if exe else [sys.executable, "-m", "hf_hybrid.cli"]
    bad = subprocess.run([*base, "inspect", "nope"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
