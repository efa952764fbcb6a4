"""Importing dense transformers checkpoints: exact logits, config mapping, carried files, lineage,
refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from hf_hybrid import HybridForCausalLM
from hf_hybrid.card import parse_front_matter
from hf_hybrid.convert import import_dense
from hf_hybrid.convert.import_dense import UnsupportedCheckpointError
from hf_hybrid.data import byte_tokenizer

TOL = 1e-5  # fp32 max abs logits difference
COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    # Llama: tied embeddings, llama3 RoPE scaling, MLP bias, sharded checkpoint.
    "llama": lambda: LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, mlp_bias=True
    ),
    # Qwen2: q/k/v biases, layer-wise sliding window (layers >= max_window_layers slide), linear RoPE scaling.
    "qwen2": lambda: Qwen2Config(
        **COMMON,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    # Qwen3: q/k RMSNorm, head_dim != hidden / heads, YaRN.
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24, rope_parameters=YARN_ROPE),
    # Mistral: a sliding window on every layer.
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8, bos_token_id=0, eos_token_id=0),
}
EXPECTED_MIXERS = {
    "llama": ["attention"] * 3,
    "qwen2": ["attention", "sliding_attention", "sliding_attention"],
    "qwen3": ["attention"] * 3,
    "mistral": ["sliding_attention"] * 3,
}


def _save_source(config, directory: Path, *, shard: bool = False, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: perturb everything so each weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(directory, max_shard_size="60KB" if shard else "50GB")
    return directory


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _max_abs_diff(src: Path, dst: Path, ids: torch.Tensor) -> float:
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours = HybridForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    return (_logits(ref, ids) - _logits(ours, ids)).abs().max().item()


@pytest.mark.parametrize("arch", list(CASES))
def test_import_matches_source_logits(arch, tmp_path):
    src = _save_source(CASES[arch](), tmp_path / "src", shard=arch == "llama")
    if arch == "llama":
        assert (src / "model.safetensors.index.json").is_file()
    tok = byte_tokenizer()
    tok.save_pretrained(src)
    dst = import_dense(src, tmp_path / "dst")

    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > window 8 and > 32
    err = _max_abs_diff(src, dst, ids)
    print(f"{arch}: max abs logits diff {err:.3g}")
    assert err <= TOL

    ours = HybridForCausalLM.from_pretrained(dst)
    assert ours.config.mixer_types == EXPECTED_MIXERS[arch]
    assert ours.config.sliding_window == (8 if arch in ("qwen2", "mistral") else None)
    lineage = ours.config.hf_hybrid_lineage
    assert lineage["recipe"] == "import" and lineage["base_model_type"] == arch
    assert lineage["base_architecture"].lower().startswith(arch)
    # tokenizer, generation config and a card with the lineage come along
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (dst / name).is_file(), name
    card = (dst / "README.md").read_text()
    assert parse_front_matter(card)["library_name"] == "hf-hybrid"
    assert "recipe" in card and "import" in card


def test_import_keeps_or_casts_dtype(tmp_path):
    src = _save_source(CASES["qwen3"](), tmp_path / "src", dtype=torch.bfloat16)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# source card\n")
    dst = import_dense(src, tmp_path / "kept")
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    dst32 = import_dense(src, tmp_path / "fp32", dtype="float32", base_model="Qwen/Qwen3-0.6B")
    with safe_open(str(dst32 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mixer.q_norm.weight").dtype == torch.float32
    # a Hub-like base model name goes into the card's metadata
    meta = parse_front_matter((dst32 / "README.md").read_text())
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["license"] == "apache-2.0"  # the source's licence
    ids = torch.randint(0, 300, (1, 24))
    assert _max_abs_diff(src, dst32, ids) <= TOL


def test_qwen2_without_sliding_and_mistral_without_window(tmp_path):
    qwen = _save_source(Qwen2Config(**COMMON, use_sliding_window=False, sliding_window=8), tmp_path / "q")
    mistral = _save_source(MistralConfig(**COMMON, sliding_window=None), tmp_path / "m")
    for src in (qwen, mistral):
        dst = import_dense(src, tmp_path / f"{src.name}-dst")
        config = json.loads((dst / "config.json").read_text())
        assert config["mixer_types"] == ["attention"] * 3 and config["sliding_window"] is None
        assert _max_abs_diff(src, dst, torch.randint(0, 300, (1, 20))) <= TOL


def test_shakespeare_checkpoint_parity(shakespeare_checkpoint, tmp_path):
    dst = import_dense(shakespeare_checkpoint, tmp_path / "dst")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer " * 3
    ids = tok(text, return_tensors="pt").input_ids
    err = _max_abs_diff(shakespeare_checkpoint, dst, ids)
    print(f"llama-shakespeare-6m: max abs logits diff {err:.3g}")
    assert err <= TOL
    # config.json says float32 and the tensors are stored in bf16: transformers loads float32 by default, so
    # must we
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(shakespeare_checkpoint).eval()
    ours = HybridForCausalLM.from_pretrained(dst).eval()
    assert ref.dtype == ours.dtype == ours.config.dtype == torch.float32
    default_err = (_logits(ref, ids) - _logits(ours, ids)).abs().max().item()
    print(f"llama-shakespeare-6m, default dtype: max abs logits diff {default_err:.3g}")
    assert default_err <= TOL


def test_import_dtype_follows_transformers_auto_rule(tmp_path):
    """The config's dtype wins over the stored one (like from_pretrained(dtype="auto")); without one, the
    stored dtype."""
    src = _save_source(CASES["llama"](), tmp_path / "src", dtype=torch.bfloat16)
    raw = json.loads((src / "config.json").read_text())
    assert raw["dtype"] == "bfloat16"
    raw["dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(raw))
    dst = import_dense(src, tmp_path / "declared")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"
    ids = torch.randint(0, 300, (1, 16))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ours = HybridForCausalLM.from_pretrained(dst).eval()
    assert ref.dtype == ours.dtype == torch.float32
    assert (_logits(ref, ids) - _logits(ours, ids)).abs().max().item() <= TOL
    del raw["dtype"]
    (src / "config.json").write_text(json.dumps(raw))
    dst = import_dense(src, tmp_path / "stored")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


# ---- refusals: a clear error and nothing written -----------------------------------------------------------


def _write_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def _refused(src: Path, tmp_path: Path, match: str, exc=UnsupportedCheckpointError):
    dst = tmp_path / "dst"
    with pytest.raises(exc, match=match):
        import_dense(src, dst)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # no temporary leftovers


def test_refuses_moe_and_unknown_types(tmp_path):
    # native families point to import_native; other sparse MoE types to importing a dense sibling and
    # upcycling
    _refused(_write_config(tmp_path / "moe", model_type="qwen3_moe"), tmp_path, "import_native")
    _refused(_write_config(tmp_path / "dbrx", model_type="dbrx"), tmp_path, "upcycle")
    _refused(_write_config(tmp_path / "gpt2", model_type="gpt2"), tmp_path, "not supported")


def test_refuses_missing_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path, "config.json", FileNotFoundError)
    _refused(tmp_path / "nowhere", tmp_path, "not a directory", FileNotFoundError)
    src = tmp_path / "noweights"
    CASES["llama"]().save_pretrained(src)
    _refused(src, tmp_path, "nothing to import")


def test_refuses_pickle_weights(tmp_path):
    src = tmp_path / "pickled"
    CASES["llama"]().save_pretrained(src)
    # Never unpickled: the mere presence of only a .bin is refused before any read.
    (src / "pytorch_model.bin").write_bytes(b"not read")
    _refused(src, tmp_path, "pickle")


def test_refuses_what_would_not_match(tmp_path):
    src = _save_source(LlamaConfig(**COMMON, attention_bias=True), tmp_path / "bias")
    _refused(src, tmp_path, "o_proj")
    dyn = LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )
    _refused(_save_source(dyn, tmp_path / "dynamic"), tmp_path, "dynamic")
    # a checkpoint whose tensors do not fit its config
    src = _save_source(CASES["qwen3"](), tmp_path / "broken")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    _refused(src, tmp_path, "shape")


def test_refuses_non_empty_destination(tmp_path):
    src = _save_source(CASES["llama"](), tmp_path / "src")
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_dense(src, dst)
    assert os.listdir(dst) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_dense(src, empty) == empty and (empty / "config.json").is_file()
