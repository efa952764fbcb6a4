"""The ``hf-hybrid`` command: inspect / import / card, every subcommand listed, argparse only in
``hf_hybrid/cli/``, and one-line errors with exit status 2."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
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
def test_user_errors_are_short_lines_with_status_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()  # what, why, what to do: a line each at most, each <= 160 characters
    assert fragment in " ".join(err.split()) and len(lines) <= 3 and "Traceback" not in err
    assert max(map(len, lines)) <= 160, lines
    assert not Path("/tmp/never-written").exists()


def test_import_refusal_writes_nothing(capsys, tmp_path):
    src = tmp_path / "moe"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "dbrx"}))  # mixtral & co. import natively now
    code, _, err = run(capsys, "import", str(src), str(tmp_path / "out"))
    assert code == 2 and "model_type='dbrx'" in err and "supported" in err and not (tmp_path / "out").exists()


COMMANDS = (
    "inspect",
    "import",
    "export",
    "card",
    "upcycle",
    "convert-dsa",
    "hybridize",
    "mla",
    "expert-load",
)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.strip()}
    assert set(COMMANDS) <= listed, out
    assert set(cli.build_parser()._subparsers._group_actions[0].choices) == set(COMMANDS)


def test_only_the_cli_package_parses_arguments():
    """The library takes keyword arguments; argparse lives in ``hf_hybrid/cli/`` alone."""
    package = REPO / "hf_hybrid"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.is_relative_to(package / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], offenders
    assert (package / "cli" / "__init__.py").is_file()


def test_library_parse_errors_become_usage_errors(capsys):
    from hf_hybrid.convert.checkpoint import parse_layers

    assert parse_layers("1, 3,5") == (1, 3, 5) and parse_layers(None) is None
    with pytest.raises(ValueError, match="expected comma-separated layer indices"):
        parse_layers("1,x")
    for argv in (
        ["upcycle", "a", "b", "--num-experts", "2", "--top-k", "1", "--layers", "1,x"],
        ["convert-dsa", "a", "b", "--index-topk", "2", "--layers", "1,x"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert (
            exit_info.value.code == 2 and "argument --layers: --layers '1,x': expected comma-separated" in err
        )


def test_console_command_in_a_subprocess():
    """The installed ``hf-hybrid`` script (or ``python -m hf_hybrid.cli`` in a bare checkout): a user error
    exits 2 with one line on stderr and no traceback."""
    exe = shutil.which("hf-hybrid")
    base = [exe] if exe else [sys.executable, "-m", "hf_hybrid.cli"]
    bad = subprocess.run([*base, "inspect", "nope"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # ``python -m hf_hybrid.cli`` (this checkout: -m puts the working directory first on the path)
    help_ = subprocess.run(
        [sys.executable, "-m", "hf_hybrid.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert help_.returncode == 0 and all(command in help_.stdout for command in COMMANDS), help_.stderr


def test_expert_load_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from hf_hybrid.presets import preset_config

    model_dir = tmp_path / "dense"
    HybridForCausalLM(preset_config("tiny-attention")).save_pretrained(model_dir)
    capsys.readouterr()
    code, _, err = run(capsys, "expert-load", "--model", str(model_dir))
    assert code == 2
    assert err.strip() == ("hf-hybrid expert-load: error: --model needs --text FILE to run through the model")


def test_help_and_usage_errors_load_neither_torch_nor_transformers():
    """``hf-hybrid --help`` and argument errors answer before ``import hf_hybrid`` loads torch (seconds, more
    under load); a subcommand then runs with the package initialised as usual (Auto classes registered)."""
    code = """
import sys, hf_hybrid_cli
for argv in (["--help"], ["convert-dsa", "--help"], ["upcycle", "a", "b", "--layers", "x"], ["nope"]):
    try:
        hf_hybrid_cli.main(argv)
    except SystemExit as exit_:
        assert exit_.code == (0 if "--help" in argv else 2), (argv, exit_.code)
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    assert heavy == [], (argv, heavy)
    assert "hf_hybrid" not in sys.modules  # nothing half-initialised left behind
assert hf_hybrid_cli.main(["inspect", "tiny-hybrid", "--context", "1K"]) == 0
from transformers import AutoConfig
assert type(AutoConfig.for_model("hf_hybrid")).__name__ == "HybridConfig"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )


def test_choices_spelled_in_the_parser_are_the_librarys():
    from hf_hybrid.cli import convert as cli_convert
    from hf_hybrid.convert.dsa import MODES, SELECTORS
    from hf_hybrid.convert.hybridize import available_mixers
    from hf_hybrid.convert.upcycle import ROUTERS

    assert cli_convert.ROUTER_CHOICES == ROUTERS
    assert (cli_convert.SELECTOR_CHOICES, cli_convert.MODE_CHOICES) == (SELECTORS, MODES)
    from hf_hybrid.convert.mla import FACTORIZATIONS, ROPE_KEYS, ROPE_SELECT

    assert (cli_convert.ROPE_SELECT_CHOICES, cli_convert.ROPE_KEY_CHOICES) == (ROPE_SELECT, ROPE_KEYS)
    assert cli_convert.FACTORIZATION_CHOICES == FACTORIZATIONS
    hybridize_help = cli.build_parser()._subparsers._group_actions[0].choices["hybridize"].format_help()
    assert all(m in " ".join(hybridize_help.split()) for m in available_mixers())


def test_a_truncated_weight_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    from hf_hybrid.presets import preset_config

    monkeypatch.chdir(tmp_path)  # paths as a user types them
    tmp_path = Path(".")
    llama = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(llama)
    hybrid = tmp_path / "hybrid"
    HybridForCausalLM(preset_config("tiny-attention")).save_pretrained(hybrid)
    for directory in (llama, hybrid):
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    for argv in (
        ["import", str(llama), str(tmp_path / "o1")],
        ["upcycle", str(hybrid), str(tmp_path / "o2"), "--num-experts", "2", "--top-k", "2"],
        ["convert-dsa", str(hybrid), str(tmp_path / "o3"), "--index-topk", "4"],
        ["hybridize", str(llama), str(tmp_path / "o4"), "--attention-layers", "1", "--mixer", "mamba2"],
        ["export", str(hybrid), str(tmp_path / "o5")],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and len(err) <= 161, err
        assert "model.safetensors is truncated or corrupted" in err and "download it again" in err, err


def test_a_wrongly_typed_yaml_field_is_named_not_a_type_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: sixty\nnum_hidden_layers: 2\nnum_attention_heads: 4\n")
    assert cli.main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "hidden_size='sixty' must be a number" in err and err.count("\n") == 1, err


def test_options_are_built_from_the_parsed_arguments_and_a_missing_one_is_refused():
    """``options_kwargs`` takes each options field from the argument of its name; a field the parser lacks
    (and that is neither given nor omitted) is refused, not dropped."""
    from hf_hybrid.cli._common import options_kwargs
    from hf_hybrid.convert.dsa import DSAOptions
    from hf_hybrid.convert.upcycle import UpcycleOptions

    parser = cli.build_parser()
    args = parser.parse_args(["convert-dsa", "SRC", "DST", "--index-topk", "64", "--layers", "1,3"])
    assert DSAOptions(**options_kwargs(DSAOptions, args)) == DSAOptions(index_topk=64, layers=(1, 3))
    args = parser.parse_args(
        ["upcycle", "SRC", "DST", "--num-experts", "4", "--top-k", "2", "--no-renormalize"]
    )
    kwargs = options_kwargs(
        UpcycleOptions,
        args,
        renormalize=not args.no_renormalize,
        omit=("router_aux_loss_coef", "router_z_loss_coef"),
    )
    assert kwargs["renormalize"] is False and "router_z_loss_coef" not in kwargs
    with pytest.raises(TypeError, match=r"UpcycleOptions.router_aux_loss_coef is not an argument"):
        options_kwargs(UpcycleOptions, args, renormalize=True)
    with pytest.raises(TypeError, match="has no field renormalise"):
        options_kwargs(UpcycleOptions, args, renormalise=True)
