"""transformers' native families ↔ hf_hybrid, driven by each family's table in ``hf_hybrid.convert.native``.

For every registered family: a tiny random native model (transformers' own classes, fp32) → import → logits
equal (≤ 1e-5, left padding), cached decode = full forward; export → reload with plain transformers → logits
equal; import∘export = identity on the weights. Plus refusals, files on disk, and ``hf-hybrid inspect`` on a
native dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridCache
from hf_hybrid.convert.native import (
    FAMILY_MODULES,
    NEEDS_MISSING_LAYER,
    NativeConversionError,
    export_native,
    get_family,
    import_native,
    native_to_hybrid_config,
)
from hf_hybrid.mixers.dsa import dsa_layers, index_ties

ATOL = 1e-5
T = 12
DSA_FAMILIES = ("deepseek_v32", "glm_moe_dsa", "hy_v4", "axk2")

# model_type -> context manager factory to run that family's *native* model on CPU (e.g. hide fla-core).
NATIVE_CONTEXT: dict[str, contextlib.AbstractContextManager] = {}


def native_context(model_type: str):
    factory = NATIVE_CONTEXT.get(model_type) or get_family(model_type).native_context
    return factory() if factory is not None else contextlib.nullcontext()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every path matters (norm weights around 1, router biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # parameters, and the one buffer that is a learned quantity (fixed buffers such as RoPE tables or
        # MiniMax's decay slopes keep their values)
        buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        for name, p in [*model.named_parameters(), *buffers]:
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def build_native(model_type: str, seed: int = 0, wrapper: dict | None = None, **overrides):
    """A tiny random native model of ``model_type`` (its tiny config with ``overrides``), in the class
    transformers has for it: a vision-language wrapper's class around a text decoder without one of its own
    (``wrapper``: attributes set on the wrapper's config)."""
    family = get_family(model_type)
    config = family.model_config(family.config_class(**{**family.tiny_config, **overrides}))
    for key, value in (wrapper or {}).items():
        setattr(config, key, value)
    with native_context(model_type):
        model = family.model_class(config)
    randomise(model, seed)
    return model.eval()


def batch(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def logits(model, ids, mask, model_type: str | None = None):
    ctx = native_context(model_type) if model_type else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return model(input_ids=ids, attention_mask=mask).logits


def assert_close_on_real(a, b, mask, what: str) -> None:
    real = mask.bool()
    err = (a[real] - b[real]).abs().max().item()
    assert err <= ATOL, f"{what}: max |Δlogits| = {err:.3g} > {ATOL}"


def assert_no_index_ties(hybrid, ids, mask) -> None:
    """DSA: transformers' torch.topk and our selection (ties toward the most recent key) agree when no query
    has a tie at its top-k cut; check that this input has none (so the equality below is not luck)."""
    assert any(getattr(m, "indexer", None) is not None for m in dsa_layers(hybrid)), "no DSA indexer"
    ties = index_ties(hybrid, input_ids=ids, attention_mask=mask)
    assert ties == [], f"tied indexer scores at the top-k cut (layer, row, query): {ties[:5]}"


def tie_free_batch(hybrid, length: int = 12):
    """A left-padded batch (2 rows, the second padded by 4) without tied indexer scores at any DSA layer's
    top-k cut (the first of the seeds 1..29 that has none)."""
    for seed in range(1, 30):
        ids = torch.randint(
            3, hybrid.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed)
        )
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding
        if not index_ties(hybrid, input_ids=ids, attention_mask=mask):
            return ids, mask
    raise AssertionError("no tie-free input found")


def max_err(a, b, mask) -> float:
    return (a - b)[mask.bool()].abs().max().item()


def assert_cached_decode_equals_full_forward(hybrid, ids, mask, prefill: int = 5) -> HybridCache:
    """Prefill ``prefill`` tokens, then one token a step through one cache: the full forward's logits
    (≤ ATOL on real tokens). Returns the cache."""
    with torch.no_grad():
        full = hybrid(input_ids=ids, attention_mask=mask).logits
        cache = HybridCache(config=hybrid.config)
        step = [hybrid(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache)]
        for t in range(prefill, ids.shape[1]):
            step.append(
                hybrid(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            )
    assert max_err(torch.cat([out.logits for out in step], 1), full, mask) <= ATOL
    return cache


# Families whose native modeling needs fla-core's kernels patched out on CPU: tests/test_native_recurrent.py
# runs the same checks on them under that patch. Every other registered family is tested here.
# mistral_large4_text (tests/test_native_mistral_large4.py): its decoder lives in a vision-language class and
# its query scaling reads absolute positions, which the native model must be given. glm5_next_text
# (tests/test_native_glm5_next.py) and hy_v4_vl_text (tests/test_native_hy_v4_vl.py): their decoders live in
# vision-language classes too.
TESTED_ELSEWHERE = (
    "qwen3_next",
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "bamba",
    "olmo_hybrid",
    "mistral_large4_text",
    "glm5_next_text",
    "hy_v4_vl_text",
)


@pytest.fixture(params=sorted(set(FAMILY_MODULES) - set(TESTED_ELSEWHERE)))
def model_type(request):
    family = get_family(request.param)
    if not family.available:
        pytest.skip(f"{request.param} needs transformers >= {family.min_transformers}, not installed here")
    return request.param


# ---- exactness ---------------------------------------------------------------------------------------------


def test_import_logits_equal_with_left_padding(model_type):
    native = build_native(model_type)
    hybrid = import_native(native)
    ids, mask = batch(native.config.vocab_size)
    if model_type in DSA_FAMILIES:
        assert hybrid.config.index_topk < T  # sparse selection really happens
        assert_no_index_ties(hybrid, ids, mask)
    assert_close_on_real(logits(native, ids, mask, model_type), logits(hybrid, ids, mask), mask, "import")


@pytest.mark.parametrize("dsa_topk", [64])
def test_dsa_dense_limit_equal(dsa_topk):
    """k ≥ T: DSA equals dense MLA attention; equal to transformers whatever the ties."""
    for model_type in DSA_FAMILIES:
        native = build_native(model_type, index_topk=dsa_topk)
        hybrid = import_native(native)
        ids, mask = batch(native.config.vocab_size)
        assert_close_on_real(
            logits(native, ids, mask, model_type), logits(hybrid, ids, mask), mask, model_type
        )


def test_cached_decode_equals_full_forward(model_type):
    native = build_native(model_type)
    hybrid = import_native(native)
    ids, mask = batch(native.config.vocab_size)
    with torch.no_grad():
        out = hybrid.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    full = logits(hybrid, out.sequences, full_mask)
    for step, step_logits in enumerate(out.logits):
        err = (step_logits - full[:, T - 1 + step]).abs().max().item()
        assert err <= ATOL, f"decode step {step}: max |Δ| = {err:.3g}"
    with torch.no_grad(), native_context(model_type):
        native_out = native.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert torch.equal(native_out, out.sequences)


def test_export_reloads_with_transformers_and_matches(model_type, tmp_path):
    native = build_native(model_type)
    hybrid = import_native(native)
    export_native(hybrid, tmp_path / "exported", to=model_type)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == model_type
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "placeholder" not in card  # a text-only class
    with native_context(model_type):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(reloaded) is get_family(model_type).model_class
    ids, mask = batch(native.config.vocab_size)
    assert_close_on_real(
        logits(native, ids, mask, model_type), logits(reloaded, ids, mask, model_type), mask, "export"
    )
    # fp32 where transformers keeps it fp32 (routers, correction biases): already fp32 here, checked via dtype
    # kept
    for name, t in reloaded.state_dict().items():
        assert t.dtype == native.state_dict()[name].dtype, name


def shared_storage(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of ``b``'s parameters and buffers whose storage is also used by a tensor of ``a``."""
    ptrs = {t.untyped_storage().data_ptr() for t in [*a.parameters(), *a.buffers()]}
    named = [*b.named_parameters(), *b.named_buffers()]
    return [n for n, t in named if t.numel() and t.untyped_storage().data_ptr() in ptrs]


def test_in_memory_conversions_own_their_storage(model_type):
    """import_native(model) / export_native(model) return models that share no memory with their source:
    editing one must not edit the other."""
    native = build_native(model_type)
    hybrid = import_native(native)
    assert shared_storage(native, hybrid) == []
    back = export_native(hybrid, to=model_type)
    assert shared_storage(hybrid, back) == []
    before = back.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        hybrid.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(back.get_input_embeddings().weight, before)


def test_import_export_identity_on_weights(model_type):
    native = build_native(model_type)
    a = {k: v.detach().clone() for k, v in native.state_dict().items()}  # before: the conversions own copies
    hybrid = import_native(native)
    ours = {k: v.detach().clone() for k, v in hybrid.state_dict().items()}
    back = export_native(hybrid, to=model_type)
    b = back.state_dict()
    assert set(a) == set(b)
    rounding = get_family(model_type).rounding_native_weights
    for name in a:
        if any(re.search(p, name) for p in rounding):
            # fp32 rounding of the mapping (e.g. w -> 1 + w): at most half an ulp of the mapped value
            bound = 2.0**-24 * (1.0 + float(a[name].abs().max()))
            assert (a[name] - b[name]).abs().max().item() <= bound, name
            continue
        assert torch.equal(a[name], b[name]), name
    again = import_native(back)
    for name, t in ours.items():
        assert torch.equal(t, again.state_dict()[name]), name


# ---- files, CLI, inspect -----------------------------------------------------------------------------------


def _save_native_dir(model_type: str, path: Path) -> Path:
    native = build_native(model_type)
    native.save_pretrained(path, max_shard_size="20KB")  # several shards
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return path


def test_import_directory_sharded_with_tokenizer_and_lineage(tmp_path):
    src = _save_native_dir("deepseek_v3", tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    import_native(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert (dst / "tokenizer_config.json").is_file() and (dst / "generation_config.json").is_file()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "hf_hybrid"
    assert cfg["hf_hybrid_lineage"]["base_model_type"] == "deepseek_v3"
    assert cfg["hf_hybrid_lineage"]["license"] == "apache-2.0"
    assert "deepseek_v3" in (dst / "README.md").read_text()
    # export from the directory (family chosen from the lineage), tokenizer carried again
    export_native(dst, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    assert "deepseek_v3" in (tmp_path / "back" / "README.md").read_text()


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10 s on a shared CPU
def test_exported_dir_loads_without_hf_hybrid(tmp_path):
    native = build_native("qwen3_moe")
    export_native(import_native(native), tmp_path / "out")
    ids, mask = batch(native.config.vocab_size)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\nm = "
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()\nb = "
        f"torch.load({str(tmp_path / 'batch.pt')!r})\nwith torch.no_grad(): out = m(input_ids=b['ids'], "
        f"attention_mask=b['mask']).logits\ntorch.save(out, {str(tmp_path / 'logits.pt')!r})\nassert "
        "'hf_hybrid' not in sys.modules, 'hf_hybrid was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert_close_on_real(logits(native, ids, mask), torch.load(tmp_path / "logits.pt"), mask, "subprocess")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32", "glm_moe_dsa", "axk2"])
def test_rope_interleave_false_imports_as_transformers_reads_it(model_type):
    """DeepSeek-V3's ``rope_interleave=False`` rotates halves; DeepSeek-V3.2, GLM-MoE-DSA and AXK2 rotate
    interleaved pairs whatever the flag says (transformers never reads it there, nor does vLLM): a config
    carrying it imports as the model transformers runs."""
    native = build_native(model_type, rope_interleave=False)
    hybrid = import_native(native)
    ids, mask = tie_free_batch(hybrid)
    assert max_err(logits(hybrid, ids, mask), logits(native, ids, mask, model_type), mask) <= ATOL


def test_deepseek_v32_indexer_follows_indexer_rope_interleave_as_the_engines_do(monkeypatch):
    """A DeepSeek-V3.2 config saying ``indexer_rope_interleave=True`` (GLM-5-shaped checkpoints are published
    so): vLLM and SGLang rotate its indexer on interleaved pairs, transformers' DeepSeek-V3.2 ignores the flag
    and rotates halves. The import keeps the served function: equal to transformers' model with its indexer
    rotation made to pair, not to the model as transformers runs it."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as modeling

    native = build_native("deepseek_v32", indexer_rope_interleave=True)
    hybrid = import_native(native)
    ids, mask = tie_free_batch(hybrid)
    as_transformers_runs_it = logits(native, ids, mask)

    def paired(q, k, cos, sin, unsqueeze_dim=1):  # the indexer's rotation (the attention's already pairs)
        return modeling.apply_rotary_pos_emb_interleave(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", paired)
    served = logits(native, ids, mask)
    assert max_err(logits(hybrid, ids, mask), served, mask) <= ATOL
    assert max_err(as_transformers_runs_it, served, mask) > 1e-3


def test_hy_v4_keeps_the_checkpoints_interleaved_rope_under_every_release():
    """vLLM, SGLang and transformers 5.25 rotate HY-V4's RoPE on interleaved pairs, 5.23 / 5.24 by halves:
    the conversion keeps the checkpoint's function whatever release is installed. The import equals
    transformers' model made to pair (the family's native_context), and on 5.23 / 5.24 the model as that
    release runs it is another function (so the context is not a no-op there)."""
    from hf_hybrid.convert.native.hy_v4 import native_rope_in_halves

    native = build_native("hy_v4")
    hybrid = import_native(native)
    ids, mask = tie_free_batch(hybrid)
    paired = logits(native, ids, mask, "hy_v4")
    assert max_err(logits(hybrid, ids, mask), paired, mask) <= ATOL
    as_installed = logits(native, ids, mask)
    if native_rope_in_halves():
        assert max_err(as_installed, paired, mask) > 1e-3
    else:
        assert torch.equal(as_installed, paired)


@pytest.mark.parametrize("family", ["qwen3_moe", "minimax_m2", "hy_v4", "axk2"])
def test_cli_import_export_and_inspect(family, tmp_path, capsys):
    from hf_hybrid.cli import main
    from hf_hybrid.cost import estimate_cost

    src = _save_native_dir(family, tmp_path / "src")
    assert main(["import", str(src), str(tmp_path / "hyb")]) == 0
    assert main(["export", str(tmp_path / "hyb"), str(tmp_path / "nat"), "--to", family]) == 0
    assert json.loads((tmp_path / "nat" / "config.json").read_text())["model_type"] == family
    ids, mask = batch(96)
    native = AutoModelForCausalLM.from_pretrained(src).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "nat").eval()
    a, b = native.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Weights loaded from safetensors are views of the mapped file: where a tensor starts in it (its
    # alignment) can change which vectorised kernel sums fp32 products (~1e-7 apart). In fresh memory both
    # are the same.
    with torch.no_grad():
        for model in (native, back):
            for p in model.parameters():
                p.data = p.data.clone()
    assert torch.equal(logits(native, ids, mask), logits(back, ids, mask))
    capsys.readouterr()
    assert main(["inspect", str(src), "--json"]) == 0
    native_cost = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tmp_path / "hyb"), "--json"]) == 0
    imported_cost = json.loads(capsys.readouterr().out)
    assert native_cost == imported_cost
    assert native_cost == json.loads(estimate_cost(native_to_hybrid_config(src)).to_json())


# ---- refusals (nothing written) ----------------------------------------------------------------------------


def test_refuses_unknown_model_type(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(NativeConversionError, match="model_type='gpt2'.*supported"):
        import_native(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "model_type, overrides, message",
    [
        ("olmoe", {"attention_bias": True}, r"OlmoeConfig\.attention_bias=True"),
        ("deepseek_v3", {"pretraining_tp": 2}, r"DeepseekV3Config\.pretraining_tp=2"),
        ("qwen3_moe", {"use_sliding_window": True}, r"Qwen3MoeConfig\.use_sliding_window=True"),
        ("deepseek_v3", {"num_key_value_heads": 2}, r"num_key_value_heads=2 differs"),
    ],
)
def test_refuses_native_options_without_counterpart(model_type, overrides, message):
    family = get_family(model_type)
    config = family.config_class(**{**family.tiny_config, **overrides})
    with pytest.raises(NativeConversionError, match=message):
        native_to_hybrid_config(config)


def test_refuses_unmapped_native_option():
    """A native option that no rule names and that is not at its default is refused, naming it and its
    value."""
    import dataclasses

    olmoe = get_family("olmoe")
    without_clip = dataclasses.replace(
        olmoe, config_rules=[r for r in olmoe.config_rules if "clip_qkv" not in r.native_options()]
    )
    config = olmoe.config_class(**olmoe.tiny_config)
    assert config.clip_qkv == 0.3
    with pytest.raises(NativeConversionError, match=r"OlmoeConfig\.clip_qkv=0\.3 has no counterpart"):
        without_clip.hybrid_config(config)


def test_export_refuses_layout_without_counterpart(tmp_path):
    native = build_native("qwen3_moe")
    hybrid = import_native(native)
    cfg = hybrid.config
    mixed = cfg.to_dict()
    from hf_hybrid import HybridConfig
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        mixed.pop(key, None)
    mixed["mixer_types"] = ["attention", "gated_deltanet", "attention"]
    other = HybridForCausalLM(HybridConfig(**mixed))
    with pytest.raises(NativeConversionError, match=r"mixer_types\[1\]='gated_deltanet' \(layer 1\)"):
        export_native(other, tmp_path / "out", to="qwen3_moe")
    assert not (tmp_path / "out").exists()
    gated = {**mixed, "mixer_types": ["attention"] * 3, "attention_output_gate": True}
    with pytest.raises(NativeConversionError, match=r"attention_output_gate=True"):
        export_native(HybridForCausalLM(HybridConfig(**gated)), tmp_path / "out", to="qwen3_moe")
    with pytest.raises(
        NativeConversionError,
        match=r"e_score_correction_bias \(aux-loss-free bias\) in "
        r"layer 0 is non-zero",
    ):
        with torch.no_grad():
            hybrid.model.layers[0].mlp.router.e_score_correction_bias.fill_(0.5)
        export_native(hybrid, tmp_path / "out", to="qwen3_moe")
    assert not (tmp_path / "out").exists()


def test_export_refuses_existing_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        export_native(import_native(build_native("mixtral")), tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("deepseek_v3", {"q_lora_rank": None}),
        ("deepseek_v3", {"n_shared_experts": 0, "norm_topk_prob": False}),
        ("deepseek_v32", {"first_k_dense_replace": 0, "n_shared_experts": 2}),
        ("deepseek_v3", {"rope_interleave": False, "attention_bias": True}),
        (
            "deepseek_v3",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                }
            },
        ),
        ("mixtral", {"sliding_window": 5}),
        ("minimax_m2", {"rotary_dim": 4, "rope_parameters": None}),  # released checkpoints' spelling
        ("minimax_m2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),  # full RoPE
        ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    ],
)
def test_variants_exact(model_type, overrides):
    """Options of a family beyond its tiny default: each imports exactly and round-trips."""
    native = build_native(model_type, **overrides)
    hybrid = import_native(native)
    ids, mask = batch(native.config.vocab_size)
    assert_close_on_real(
        logits(native, ids, mask, model_type), logits(hybrid, ids, mask), mask, str(overrides)
    )
    back = export_native(hybrid, to=model_type)
    assert_close_on_real(logits(native, ids, mask), logits(back, ids, mask), mask, f"export {overrides}")


# ---- recipes on imports (upcycle, DSA conversion) then export ----------------------------------------------


def test_recipe_upcycle_qwen3_import_exports_as_qwen3_moe(tmp_path):
    """Dense Qwen3 → import → upcycle (exact start: renormalised top-k) → export as qwen3_moe: same logits as
    the dense Qwen3 it started from, in transformers' own Qwen3MoeForCausalLM."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_hybrid.convert.import_dense import import_dense
    from hf_hybrid.convert.upcycle import upcycle_model
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    dense = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    randomise(dense)
    dense.eval().save_pretrained(tmp_path / "qwen3")
    import_dense(tmp_path / "qwen3", tmp_path / "hyb")
    upcycled = upcycle_model(
        HybridForCausalLM.from_pretrained(tmp_path / "hyb"), num_experts=4, top_k=2
    ).eval()
    with torch.no_grad():  # a trained router would not be zero: make the routing non-trivial
        for layer in upcycled.model.layers:
            layer.mlp.router.weight.normal_(std=0.5)
    moe = export_native(upcycled, tmp_path / "qwen3_moe", to="qwen3_moe")
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3_moe").eval()
    ids, mask = batch(96)
    ref = logits(dense, ids, mask)
    assert_close_on_real(ref, logits(upcycled, ids, mask), mask, "upcycled vs dense")
    assert_close_on_real(ref, logits(reloaded, ids, mask), mask, "exported qwen3_moe vs dense")


def test_recipe_deepseek_v3_import_to_dsa_exports_as_deepseek_v32():
    """DeepSeek-V3 → import → convert to DSA (fresh indexers, sparse) → export as deepseek_v32 (the V3 → V3.2
    path): with k ≥ T it equals V3; with k < T it equals the converted model (checked tie-free)."""
    from hf_hybrid.convert.dsa import convert_model_to_dsa

    v3 = build_native("deepseek_v3")
    hybrid = import_native(v3)
    ids, mask = batch(v3.config.vocab_size)
    options = dict(index_heads=8, index_head_dim=16, mode="sparse", seed=3)
    refused = convert_model_to_dsa(hybrid, index_topk=64, **options)
    with pytest.raises(NativeConversionError, match=r"index_norm_eps=1e-05 has no counterpart"):
        export_native(refused, to="deepseek_v32")
    for topk in (64, 5):
        dsa = convert_model_to_dsa(hybrid, index_topk=topk, index_norm_eps=1e-6, **options).eval()
        randomise(dsa.model.layers[0].mixer.indexer, seed=topk)  # a trained indexer is not at its init
        for layer in dsa.model.layers[1:]:
            layer.mixer.indexer.load_state_dict(dsa.model.layers[0].mixer.indexer.state_dict())
        v32 = export_native(dsa, to="deepseek_v32")
        assert type(v32).__name__ == "DeepseekV32ForCausalLM"
        if topk < T:
            assert_no_index_ties(dsa, ids, mask)
            gap = (logits(v32, ids, mask) - logits(v3, ids, mask))[mask.bool()].abs().max().item()
            assert gap > 1e-3, "k < T should change the function (the selection must really prune)"
        else:
            assert_close_on_real(logits(v3, ids, mask), logits(v32, ids, mask), mask, "V3.2 at k>=T vs V3")
        assert_close_on_real(logits(dsa, ids, mask), logits(v32, ids, mask), mask, f"k={topk}")


@pytest.mark.parametrize("model_type", ["olmoe", "glm_moe_dsa"])
def test_cost_formulas_match_modules_for_new_options(model_type):
    """The cost formulas know the new options: full-width q/k norm (olmoe), DSA layers without an indexer
    (glm)."""
    from hf_hybrid.cost import measure_module
    from hf_hybrid.registry import mixer_spec

    family = get_family(model_type)
    config = family.hybrid_config(family.config_class(**family.tiny_config))
    for i, mixer in enumerate(config.mixer_types):
        formula = mixer_spec(mixer).cost(config, i)
        assert measure_module(mixer_spec(mixer).cls, config, i) == (formula.params, formula.matmul_params), i
    if model_type == "glm_moe_dsa":
        full, shared = mixer_spec("dsa").cost(config, 0), mixer_spec("dsa").cost(config, 1)
        assert full.cache_per_token - shared.cache_per_token == config.index_head_dim


def test_bf16_directory_round_trip_keeps_fp32_routers(tmp_path):
    """A bf16 checkpoint whose router and correction bias transformers keeps in fp32 (5.24; 5.23 loads the
    router in the checkpoint's dtype): import → export → the same tensors and dtypes as transformers loads the
    source."""
    native = build_native("deepseek_v3").to(torch.bfloat16)
    native.save_pretrained(tmp_path / "src")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src").state_dict()
    import_native(tmp_path / "src", tmp_path / "hyb")
    export_native(tmp_path / "hyb", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for name, t in source.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_new_config_options_validate_with_clear_errors():
    from hf_hybrid import HybridConfig

    base = dict(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        mixer_types=["dsa"] * 3,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )
    cases = [
        (dict(dsa_indexer_types=["shared", "full", "full"]), r"dsa_indexer_types\[0\]='shared' reuses"),
        (dict(dsa_indexer_types=["full", "reuse", "full"]), r"dsa_indexer_types\[1\]='reuse' is not allowed"),
        (dict(dsa_indexer_types=["full", "shared"]), r"dsa_indexer_types has 2 entries"),
        (dict(qk_norm_scope="layer"), r"qk_norm_scope='layer' is not allowed"),
        (dict(clip_qkv=0.0), r"clip_qkv=0.0 must be > 0"),
        (dict(mla_norm_eps=-1.0), r"mla_norm_eps=-1.0 must be > 0"),
    ]
    from huggingface_hub.errors import StrictDataclassClassValidationError

    for overrides, message in cases:
        with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
            HybridConfig(**{**base, **overrides})
    ok = HybridConfig(**base, dsa_indexer_types=["full", "shared", "shared"])
    from hf_hybrid.mixers.dsa import dsa_layer_has_indexer

    assert [dsa_layer_has_indexer(ok, i) for i in range(3)] == [True, False, False]
    assert dsa_layer_has_indexer(HybridConfig(**base), 2)  # default: every DSA layer has its indexer


def test_mixtral_import_keeps_training_settings():
    native = build_native("mixtral", router_aux_loss_coef=0.02, router_jitter_noise=0.1)
    cfg = import_native(native).config
    assert (cfg.router_aux_loss_coef, cfg.router_jitter_noise) == (0.02, 0.1)


def test_dsa_index_reuse_survives_gradient_checkpointing():
    """A 'shared' DSA layer reads the top-k of *its* source layer, also when layers are recomputed in
    backward."""
    native = build_native("glm_moe_dsa")
    hybrid = import_native(native).train()  # no dropout in these configs: train mode changes no value
    ids, mask = batch(native.config.vocab_size)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            hybrid.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hybrid.zero_grad()
        out = hybrid(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in hybrid.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_cli_export_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    from hf_hybrid import HybridConfig
    from hf_hybrid.cli import main
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    model = HybridForCausalLM(
        HybridConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mixer_types=["attention", "gated_deltanet"],
        )
    )
    model.save_pretrained(tmp_path / "mix")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "mix"), str(tmp_path / "out"), "--to", "llama"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # one difference a line
    assert "mixer_types[1]='gated_deltanet' (layer 1)" in lines[0] and max(map(len, lines)) <= 160, err
    # no family fits: a short summary (the closest families), every family's reasons with --verbose
    assert main(["export", str(tmp_path / "mix"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "no native family expresses this model" in lines[0] and "--verbose" in lines[-1]
    assert len(lines) <= 5 and max(map(len, lines)) <= 160, err
    # GDN + attention: the GDN families are the closest
    assert lines[1].split(":")[0].strip() in {"qwen3_next", "olmo_hybrid", "qwen3_5_text"}, err
    assert main(["--verbose", "export", str(tmp_path / "mix"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    from hf_hybrid.convert.native import FAMILY_MODULES, get_family

    # every family this transformers has (one it lacks cannot be a target)
    assert all(f"  {f}: " in err for f in FAMILY_MODULES if get_family(f).available), err
    assert not (tmp_path / "out").exists()


def test_minimax_m2_export_refuses_what_it_cannot_express(tmp_path):
    """A softmax router, a shared expert or a per-head q/k norm has no MiniMax-M2 counterpart: named, and
    nothing written."""
    from hf_hybrid import HybridConfig
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    cfg = import_native(build_native("minimax_m2")).config.to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    cases = [
        ({"router_scoring_func": "softmax"}, r"router_scoring_func='softmax'"),
        ({"num_shared_experts": 1}, r"num_shared_experts=1"),
        ({"qk_norm_scope": "head"}, r"qk_norm_scope='head'"),
        ({"mlp_types": ["dense", "moe"]}, r"mlp_types\[0\]='dense'"),
    ]
    for overrides, message in cases:
        model = HybridForCausalLM(HybridConfig(**{**cfg, **overrides}))
        with pytest.raises(NativeConversionError, match=message):
            export_native(model, tmp_path / "out", to="minimax_m2")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(NEEDS_MISSING_LAYER))
def test_families_needing_a_missing_layer_are_refused_naming_it(model_type, tmp_path, capsys):
    """deepseek_v4, qwen4_exp, falcon_h1, lfm2(_moe) / lfm3, kolibri1_1, axk2, mistral_large4,
    glm5_next, ergo: refused on import (directory, CLI, in-memory config where transformers has the class)
    naming the layer or feature hf_hybrid lacks; nothing written."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from hf_hybrid.cli import main

    layer = re.escape(NEEDS_MISSING_LAYER[model_type])
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(NativeConversionError, match=rf"model_type='{model_type}' .*needs {layer}"):
        import_native(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    capsys.readouterr()
    assert main(["import", str(src), str(tmp_path / "dst")]) == 2
    assert NEEDS_MISSING_LAYER[model_type] in " ".join(capsys.readouterr().err.split())  # lines wrap at 160
    assert main(["inspect", str(src)]) == 2
    assert NEEDS_MISSING_LAYER[model_type] in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "dst").exists()
    if model_type in CONFIG_MAPPING_NAMES:  # the installed transformers has the family
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        with pytest.raises(NativeConversionError, match=layer):
            native_to_hybrid_config(CONFIG_MAPPING[model_type]())


def test_minicpm5_moe_variants_cli_and_refusals(tmp_path):
    """MiniCPM5-MoE (transformers >= 5.25): all-sparse without a shared expert and dense-heavy layouts import
    and export exactly; CLI round trip; partial RoPE (native) and an ungated attention (ours) are refused by
    name, nothing written."""
    family = get_family("minicpm5_moe")
    if not family.available:
        pytest.skip("minicpm5_moe needs transformers >= 5.25, not installed here")
    from hf_hybrid import HybridConfig
    from hf_hybrid.cli import main
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    ids, mask = batch(96)
    for overrides in (
        {"mlp_layer_types": ["sparse"] * 3, "n_shared_experts": 2},
        {"mlp_layer_types": ["dense", "dense", "sparse"], "n_group": 1, "norm_topk_prob": False},
    ):
        native = build_native("minicpm5_moe", **overrides)
        hybrid = import_native(native)
        ref = logits(native, ids, mask)
        assert_close_on_real(ref, logits(hybrid, ids, mask), mask, str(overrides))
        assert torch.equal(ref, logits(export_native(hybrid, to="minicpm5_moe"), ids, mask))
    src = _save_native_dir("minicpm5_moe", tmp_path / "src")
    assert main(["import", str(src), str(tmp_path / "hyb")]) == 0
    assert main(["export", str(tmp_path / "hyb"), str(tmp_path / "nat")]) == 0  # family from the lineage
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "nat").eval()
    assert type(back) is family.model_class
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids, mask), logits(back, ids, mask)
    )
    partial = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(NativeConversionError, match=r"partial_rotary_factor'\]=0\.5"):
        native_to_hybrid_config(family.config_class(**{**family.tiny_config, "rope_parameters": partial}))
    cfg = import_native(build_native("minicpm5_moe")).config.to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    ungated = HybridForCausalLM(HybridConfig(**{**cfg, "attention_output_gate": False}))
    with pytest.raises(NativeConversionError, match=r"attention_output_gate=False"):
        export_native(ungated, tmp_path / "out", to="minicpm5_moe")
    assert not (tmp_path / "out").exists()


def test_a_native_config_validation_error_is_a_readable_reason(tmp_path, capsys):
    """A native config class's own validation error (a TypeError inside transformers) becomes a reason naming
    our field, the value and what the native field needs; an export refusal never shows a raw error."""
    from transformers import Qwen3NextConfig

    from hf_hybrid import HybridForCausalLM
    from hf_hybrid.cli import main
    from hf_hybrid.convert.native import get_family
    from hf_hybrid.presets import preset_config

    try:
        Qwen3NextConfig(shared_expert_intermediate_size=None)
    except Exception as err:  # huggingface_hub's strict dataclass validation error
        raw = err
    else:
        pytest.skip("this transformers accepts shared_expert_intermediate_size=None")
    reason = get_family("qwen3_next")._rejection(raw, {"shared_expert_intermediate_size": None})
    assert reason == "HybridConfig.shared_expert_intermediate_size=None: Qwen3NextConfig needs int", reason
    HybridForCausalLM(preset_config("tiny-hybrid")).save_pretrained(tmp_path / "gdn")  # ungated attention
    capsys.readouterr()
    assert main(["export", str(tmp_path / "gdn"), str(tmp_path / "out"), "--to", "qwen3_next"]) == 2
    err = capsys.readouterr().err.strip()
    assert "attention_output_gate=False" in err and "Error" not in err.split("error:", 1)[1], err
    assert max(map(len, err.splitlines())) <= 160 and not (tmp_path / "out").exists()


def test_ergo_variants_cli_and_refusals(tmp_path):
    """Ergo (transformers >= 5.25): global layers with RoPE (the same parameters as the sliding ones), an
    all-sparse and a dense-heavy layout, no global_attention_scale (the tiny config has one: the generic tests
    run it) import and export exactly; CLI round trip with the family from the lineage; a non-positive global
    scale (native), plain pre-norm layers and logit multipliers ergo cannot express (ours) are refused by
    name, nothing written."""
    family = get_family("ergo")
    if not family.available:
        pytest.skip("ergo needs transformers >= 5.25, not installed here")
    from hf_hybrid import HybridConfig
    from hf_hybrid.cli import main
    from hf_hybrid.modeling_hybrid import HybridForCausalLM

    ids, mask = batch(96)
    rope = {"rope_type": "default", "rope_theta": 1e4}
    for overrides in (
        {"rope_parameters": {"sliding_attention": rope, "full_attention": dict(rope)}},
        {"mlp_layer_types": ["sparse"] * 4},
        {"mlp_layer_types": ["dense", "dense", "dense", "sparse"], "global_attention_every_n_layers": 4},
        {"global_attention_scale": None},
    ):
        native = build_native("ergo", **overrides)
        hybrid = import_native(native)
        if "rope_parameters" in overrides:
            assert hybrid.config.nope_layers is None
        scale = native.config.global_attention_scale
        assert hybrid.config.attention_logit_multipliers == (
            None
            if scale is None
            else [scale if t == "full_attention" else 1.0 for t in native.config.layer_types]
        )
        ref = logits(native, ids, mask)
        assert_close_on_real(ref, logits(hybrid, ids, mask), mask, str(overrides))
        assert torch.equal(ref, logits(export_native(hybrid, to="ergo"), ids, mask))
    src = _save_native_dir("ergo", tmp_path / "src")
    assert main(["import", str(src), str(tmp_path / "hyb")]) == 0
    assert main(["export", str(tmp_path / "hyb"), str(tmp_path / "nat")]) == 0  # family from the lineage
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "nat").eval()
    assert type(back) is family.model_class
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(src).eval(), ids, mask), logits(back, ids, mask)
    )
    with pytest.raises(NativeConversionError, match=r"global_attention_scale=-2\.0 .*None or a number > 0"):
        native_to_hybrid_config(family.config_class(**{**family.tiny_config, "global_attention_scale": -2.0}))
    cfg = import_native(build_native("ergo")).config.to_dict()
    for key in ("layer_types", "hf_hybrid_lineage", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    assert cfg["mixer_types"] == ["sliding_attention", "attention"] * 2
    for overrides, message in (
        ({"norm_placement": None}, r"norm_placement=None"),
        (
            {"attention_logit_multipliers": [1.5, 2.0, 1.0, 2.0]},
            r"attention_logit_multipliers\[0\]=1\.5 \(sliding",
        ),
        (
            {"attention_logit_multipliers": [1.0, 2.0, 1.0, 3.0]},
            r"global layers \[1, 3\] have \[2\.0, 3\.0\]",
        ),
    ):
        with pytest.raises(NativeConversionError, match=message):
            export_native(
                HybridForCausalLM(HybridConfig(**{**cfg, **overrides})), tmp_path / "out", to="ergo"
            )
        assert not (tmp_path / "out").exists()


def test_axk2_grouped_routing_and_all_sparse_layouts():
    """A.X-K2's larger releases route within expert groups (n_group / topk_group), A.X-K2-Light without
    (None, our n_group = 1): both, and an all-MoE layout, import and export exactly (inputs checked tie-free
    at the indexer's top-k cut)."""
    for overrides in (
        {"n_group": 2, "topk_group": 1},
        {"mlp_layer_types": ["sparse"] * 3, "n_shared_experts": 2},
    ):
        native = build_native("axk2", **overrides)
        hybrid = import_native(native)
        assert hybrid.config.gated_norms == [
            "both" if t == "sparse" else "mixer" for t in native.config.mlp_layer_types
        ]
        # an input whose indexer scores have no tie at the cut (transformers' torch.topk orders ties freely)
        ids, mask = next(
            (i, m)
            for i, m in (batch(96, seed) for seed in range(1, 20))
            if not index_ties(hybrid, input_ids=i, attention_mask=m)
        )
        ref = logits(native, ids, mask)
        assert_close_on_real(ref, logits(hybrid, ids, mask), mask, str(overrides))
        assert torch.equal(ref, logits(export_native(hybrid, to="axk2"), ids, mask))
    light = import_native(build_native("axk2")).config
    assert (light.n_group, light.topk_group) == (1, 1)
    assert get_family("axk2").native_config(light).n_group is None
