"""Core model (issue 2): config, attention variants, inputs, generation, save/load, errors, loss rule.

Tolerances: fp32 everywhere; 1e-5 absolute for paths that compute the same maths in another order (cached
decode vs full forward, eager vs sdpa, padded vs alone); exact equality where the arithmetic is identical
(save/load).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithFlattening,
)

import hf_hybrid
from hf_hybrid import HybridConfig, HybridForCausalLM, HybridModel
from hf_hybrid import testing as kit

ATOL = 1e-5  # fp32, same maths in a different order


def tiny(**overrides) -> HybridConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def build(config: HybridConfig, seed: int = 0, attn: str = "sdpa") -> HybridForCausalLM:
    torch.manual_seed(seed)
    config._attn_implementation = attn
    return HybridForCausalLM(config).eval()


VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "qwen2_bias": dict(attention_bias=True),
    "qwen3_qknorm": dict(use_qk_norm=True),
    "qwen3next_gate_partial_rope": dict(
        attention_output_gate=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    ),
    "sliding": dict(mixer_types=["sliding_attention", "attention"], sliding_window=5),
    "untied_no_mlp": dict(tie_word_embeddings=False, mlp_types=["none", "dense"]),
}


# ------------------------------------------------------------------------------------------------------------
# registration and config


def test_auto_classes_resolve_our_classes(tmp_path):
    config = tiny()
    assert isinstance(AutoConfig.for_model("hf_hybrid"), HybridConfig)
    assert type(AutoModel.from_config(config)) is HybridModel
    assert type(AutoModelForCausalLM.from_config(config)) is HybridForCausalLM
    cls_model = AutoModelForSequenceClassification.from_config(tiny(num_labels=3, pad_token_id=0))
    out = cls_model(torch.randint(1, 64, (2, 7)))
    assert out.logits.shape == (2, 3)


def test_pattern_shorthand_expands_and_only_lists_are_saved(tmp_path):
    config = tiny(
        num_hidden_layers=8,
        mixer_pattern="3:1 sliding_attention:attention",
        sliding_window=4,
        mlp_pattern="none,dense",
        first_k_dense=1,
    )
    assert config.mixer_types == ["sliding_attention"] * 3 + ["attention"] + ["sliding_attention"] * 3 + [
        "attention"
    ]
    assert config.mlp_types == ["dense", "dense"] + ["none", "dense"] * 3
    assert config.layer_types[3] == "full_attention" and config.layer_types[0] == "sliding_attention"
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "mixer_pattern" not in saved and "mlp_pattern" not in saved and "first_k_dense" not in saved
    assert saved["mixer_types"] == config.mixer_types
    assert saved["hf_hybrid_format_version"] == hf_hybrid.configuration_hybrid.FORMAT_VERSION
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.mixer_types == config.mixer_types and reloaded.mlp_types == config.mlp_types


def test_layer_types_checked_on_reload(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["layer_types"] = ["sliding_attention", "full_attention"]
    path.write_text(json.dumps(data))
    with pytest.raises(Exception, match="layer_types.*disagrees with mixer_types"):
        AutoConfig.from_pretrained(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["hf_hybrid_format_version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hf_hybrid_format_version=999"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(mixer_types=["attention", "gdn"]),
            r"mixer_types\[1\]='gdn' is not a known mixer type; choose "
            r"one of: attention",
        ),
        (dict(mixer_types=["attention"] * 3), r"mixer_types has 3 entries but num_hidden_layers=2"),
        (dict(mlp_types=["dense", "ffn"]), r"mlp_types\[1\]='ffn' is not a known mlp type"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3 must divide num_attention_heads=4"),
        (
            dict(mixer_types=["sliding_attention"] * 2, sliding_window=0),
            r"sliding_window=0 must be a positive",
        ),
        (dict(mixer_types=["sliding_attention"] * 2), r"sliding_window=None must be a positive"),
        (
            dict(hidden_size=30),
            r"head_dim is required: hidden_size=30 is not divisible by "
            r"num_attention_heads=4",
        ),
        (dict(hidden_act="swish2"), r"hidden_act='swish2' is not allowed; choose one of"),
        (dict(mixer_pattern="2:1 attention"), r"counts and names must pair up"),
        (dict(mixer_pattern="attention,mamba"), r"names 'mamba', which is not known"),
        (dict(first_k_dense=5), r"first_k_dense=5 must be an int in \[0, 2\]"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3}),
            r"partial_rotary_factor'\]=0.3",
        ),
        (dict(vocab_size=0), r"vocab_size=0 must be a positive integer"),
        (dict(norm_placement=["pre", "after"]), r"norm_placement\[1\]='after' is not allowed; choose one of"),
        (dict(norm_placement=["post"]), r"norm_placement has 1 entries but num_hidden_layers=2"),
        (dict(mixer_types=["gated_deltanet"] * 2, gdn_norm_eps=0.0), r"gdn_norm_eps=0.0 must be > 0"),
    ],
)
def test_invalid_config_fails_at_construction_naming_field_value_and_choices(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny(**overrides)


# ------------------------------------------------------------------------------------------------------------
# attention variants: cached decode == full forward, eager == sdpa


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_plus_token_by_token_decode_equals_full_forward(name):
    kit.check_decode(build(tiny(**VARIANTS[name])), ATOL)  # hf_hybrid.testing, the kit every kind runs


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_eager_equals_sdpa(name):
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        a = build(tiny(**VARIANTS[name]), attn="eager")(ids, attention_mask=mask).logits
        b = build(tiny(**VARIANTS[name]), attn="sdpa")(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL, rtol=0)


def test_switching_attn_implementation_really_changes_the_path(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args, **kwargs):
        calls.append("sdpa")
        return original(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    config = tiny()
    torch.manual_seed(0)
    model = HybridForCausalLM._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        eager = model(ids).logits
        assert calls == []
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(ids).logits
    assert calls == ["sdpa"] * config.num_hidden_layers
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=0)


def test_sliding_window_layer_does_not_see_past_the_window():
    model = build(
        tiny(num_hidden_layers=1, mixer_types=["sliding_attention"], sliding_window=4, mlp_types=["none"])
    )
    ids = torch.randint(1, 64, (1, 12))
    other = ids.clone()
    other[0, 0] = 0
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    # window 4: position t attends to (t-4, t]; position 0 is visible from t = 0..3 only.
    assert (a[0, :4] - b[0, :4]).abs().max() > 1e-4
    torch.testing.assert_close(a[0, 4:], b[0, 4:], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# inputs: padding, packing, labels, logits_to_keep


@pytest.mark.parametrize("name", ["gqa", "sliding"])
def test_padded_batch_row_equals_sequence_alone(name):
    """Left and right padding (garbage in the padded slots) and a left-padded batch of one."""
    kit.check_padding(build(tiny(**VARIANTS[name])), ATOL)


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_packed_sequences_from_data_collator_with_flattening_do_not_leak(flash_kwargs):
    model = build(tiny(**VARIANTS["gqa"]))
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (7, 4, 9)]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_position_ids=True)
    batch = collator([{"input_ids": s, "labels": s} for s in seqs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        alone = torch.cat([model(torch.tensor(s)[None]).logits[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    # The packed loss ignores the first token of each document (-100 from the collator).
    assert (batch["labels"] == -100).sum() == len(seqs)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_labels_minus_100_are_ignored_and_logits_to_keep():
    model = build(tiny())
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = out.logits
        manual = torch.nn.functional.cross_entropy(logits[:, 4:-1].reshape(-1, 64), ids[:, 5:].reshape(-1))
        torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=0)
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last[:, 0], logits[:, -1], atol=ATOL, rtol=0)


def test_loss_rule_eval_mode_is_lm_loss_alone():
    model = build(tiny())
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    assert out.lm_loss is not None and torch.equal(out.loss, out.lm_loss)
    model.train()
    out = model(ids, labels=ids)
    # A dense model has no auxiliary terms: training loss is the LM loss too.
    assert torch.equal(out.loss, out.lm_loss) and out.aux_loss is None


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 64, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = build(tiny(**VARIANTS["sliding"]))
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=0)


def test_tied_and_untied_heads():
    tied = build(tiny(tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = build(tiny(tie_word_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("name", ["gqa", "sliding", "qwen3next_gate_partial_rope"])
def test_batched_left_padded_generation_equals_each_prompt_alone(name):
    """Each row of a left-padded batch generates what it generates alone, and the same without the cache."""
    kit.check_generate(build(tiny(**VARIANTS[name])), ATOL)


def test_generate_greedy_matches_manual_argmax_loop():
    model = build(tiny())
    ids = torch.randint(1, 64, (1, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_generate_sampling_and_beam_search():
    model = build(tiny(**VARIANTS["sliding"]))
    ids = torch.randint(1, 64, (2, 5))
    torch.manual_seed(1)
    a = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10)
    torch.manual_seed(1)
    b = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10)
    assert a.shape == (2, 10) and torch.equal(a, b)
    beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, num_return_sequences=2)
    assert beams.shape == (4, 10)
    # The best beam scores at least as well as greedy under the model.
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)

    def logprob(seq):
        with torch.no_grad():
            lp = model(seq).logits.log_softmax(-1)[:, 4:-1]
        return lp.gather(-1, seq[:, 5:, None]).sum()

    assert logprob(beams[0:1]) >= logprob(greedy[0:1]) - 1e-4


def test_torch_compile_forward_matches_eager():
    model = build(tiny())
    ids = torch.randint(0, 64, (2, 9))
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_identical_logits_safetensors_only(tmp_path):
    model = build(tiny(**VARIANTS["qwen3next_gate_partial_rope"]))
    model.save_pretrained(tmp_path / "ckpt")
    files = os.listdir(tmp_path / "ckpt")
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-hf-hybrid")]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    model = build(tiny())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mu, "safe_save_file", boom, raising=False)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def _tamper(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing_keys"),
        (lambda t: t.__setitem__("model.layers.1.extra.weight", torch.zeros(3)), "unexpected_keys"),
        (lambda t: t.__setitem__("model.norm.weight", torch.ones(7)), "mismatch|size"),
    ],
)
def test_loading_is_strict(tmp_path, tamper, message):
    build(tiny()).save_pretrained(tmp_path)
    _tamper(tmp_path, tamper)
    with pytest.raises(Exception, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_task_head_on_a_causal_checkpoint_is_the_one_allowed_mismatch(tmp_path, tied):
    """AutoModelForSequenceClassification / AutoModel from a causal checkpoint: the head swap (score.weight
    new, lm_head.weight dropped) loads; the backbone keeps the causal model's weights; any other mismatch
    still raises."""
    causal = build(tiny(tie_word_embeddings=tied, pad_token_id=0))
    causal.save_pretrained(tmp_path / "lm")
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)
    backbone = AutoModel.from_pretrained(tmp_path / "lm")
    for name, tensor in causal.model.state_dict().items():
        torch.testing.assert_close(clf.model.state_dict()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(backbone.state_dict()[name], tensor, rtol=0, atol=0)
    ids = torch.randint(1, 64, (2, 7))
    assert clf(ids).logits.shape == (2, 3)
    clf.save_pretrained(tmp_path / "clf")  # a classification checkpoint: its own head is required again
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    _tamper(tmp_path / "clf", lambda t: t.pop("score.weight"))
    with pytest.raises(ValueError, match="missing_keys.*score.weight"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    _tamper(tmp_path / "lm", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing_keys.*up_proj"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3)


def test_truncated_weights_file_raises(tmp_path):
    build(tiny()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError, match="file not fully covered|incomplete"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_into_existing_directory_keeps_user_files(tmp_path):
    (tmp_path / "README.md").write_text("my card")
    (tmp_path / "notes.txt").write_text("keep me")
    build(tiny()).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my card"
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_moe_registered_by_import_alone_and_router_logits_output():
    # `import hf_hybrid` must be enough to build and load an MoE model.
    model = build(tiny(mlp_types=["dense", "moe"], num_experts=4, num_experts_per_tok=2))
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (12, 4)
    assert model(ids).router_logits is None


@pytest.mark.parametrize("kind", ["mamba2", "gated_deltanet", "kda"])
def test_selective_state_mixers_read_the_dt_init_range_from_the_config(kind):
    """One dt initialisation for Mamba-2, GDN and KDA, from ``mamba_dt_min/max/init_floor`` (not
    hard-coded)."""
    from hf_hybrid.presets import preset_config

    config = preset_config("tiny-hybrid", mixer_pattern=kind, mamba_dt_min=0.02, mamba_dt_max=0.03)
    torch.manual_seed(0)
    model = HybridForCausalLM(config)
    dt_bias = [p for n, p in model.named_parameters() if n.endswith("dt_bias")]
    assert dt_bias
    for p in dt_bias:
        dt = torch.nn.functional.softplus(p.detach().float())
        assert dt.min() >= 0.02 - 1e-6 and dt.max() <= 0.03 + 1e-6, (dt.min(), dt.max())
    floored = HybridForCausalLM(
        preset_config(
            "tiny-hybrid", mixer_pattern=kind, mamba_dt_min=1e-6, mamba_dt_max=2e-6, mamba_dt_init_floor=0.5
        )
    )
    for n, p in floored.named_parameters():
        if n.endswith("dt_bias"):
            torch.testing.assert_close(
                torch.nn.functional.softplus(p.detach().float()), torch.full_like(p, 0.5)
            )


def test_a_misspelled_keyword_raises_and_a_foreign_one_is_named_once(caplog):
    """An ignored keyword would silently change the result (``atention_mask``: no padding mask): a close match
    to a real argument raises naming it; what clients pass along that this model does not use is warned about;
    tokenizers' token_type_ids and TRL's seq_idx are ignored on purpose."""
    import logging

    import transformers

    from hf_hybrid.presets import preset_config

    model = HybridForCausalLM(preset_config("tiny-attention")).eval()
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(ids)
    for typo, meant in (
        ("atention_mask", "attention_mask"),
        ("lables", "labels"),
        ("output_attention", "output_attentions"),
    ):
        with pytest.raises(
            TypeError, match=rf"unexpected keyword argument '{typo}'; did you mean '{meant}'\?"
        ):
            model(ids, **{typo: mask})
    with torch.no_grad():
        plain = model(ids).logits
        same = model(ids, token_type_ids=torch.zeros_like(ids), seq_idx=torch.zeros_like(ids)).logits
        assert torch.equal(plain, same)
        transformers.utils.logging.warning_once.cache_clear()  # it speaks once per process
        with caplog.at_level(logging.WARNING, logger="hf_hybrid"):
            model(ids, fused_lm_head=True)
    assert "ignores keyword arguments it does not use: fused_lm_head" in caplog.text
