"""Each layer kind declares its own config fields in its file; the config stays flat and identical.

``tests/data/configs_before_kind_fields.json`` holds ``to_dict()`` (and the keys ``save_pretrained``
writes) of configs built while every per-kind field was still a typed field of ``HybridConfig``: the same
configs built now, and those dicts loaded as old checkpoints, must give the same dicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from hf_hybrid import HybridConfig, HybridForCausalLM, peft_support, registry
from hf_hybrid.config_choices import FIELD_CHOICES
from hf_hybrid.convert.hybridize import INIT_TABLE, available_mixers, hybridize_model
from hf_hybrid.convert.native.base import functional_fields
from hf_hybrid.presets import preset_config
from hf_hybrid.registry import ConfigField, HybridizeInit, register_mixer

BEFORE = json.loads((Path(__file__).parent / "data" / "configs_before_kind_fields.json").read_text())
CASES = [(name, rec, lambda name=name: preset_config(name)) for name, rec in BEFORE["presets"].items()] + [
    (name, rec, lambda rec=rec: HybridConfig(**rec["kwargs"])) for name, rec in BEFORE["kwargs"].items()
]


# Options added after the snapshot (hyper-connection streams, KV sharing, the HY-V4 / Mistral-Large-4 / AXK2 /
# Ergo layer options, indexer pooling), at their defaults: a config that does not use them carries them at
# these values, and an old checkpoint without them loads to these values.
ADDED_SINCE = {
    "residual_gates": False,
    "hyper_connections": "none",
    "hc_mult": 4,
    "hc_eps": 1e-06,
    "hc_magnitude": 2.0,
    "hc_sinkhorn_iters": 20,
    "kv_source_layers": None,
    "final_logit_softcapping": None,
    "query_log_scaling": False,
    "rope_learned_scale": False,
    "mla_output_gate": False,
    "mla_gate_proj": False,
    "index_pool_size": 1,
    "index_q_norm": False,
    "moe_expert_norm": False,
    "shared_expert_norm": False,
    "moe_swiglu_limit": None,
    "mlp_swiglu_limit": None,
    "kda_gate_lower_bound": None,
    "attention_logit_multipliers": None,
}


def _dict(config: HybridConfig) -> dict:
    out = json.loads(json.dumps(config.to_dict(), default=str))  # as written to config.json
    out.pop("transformers_version")
    for name, default in ADDED_SINCE.items():
        assert out.pop(name) == default, name
    return out


def _saved_keys(config: HybridConfig) -> list[str]:
    saved = config.to_diff_dict()
    saved.pop("transformers_version")
    return sorted(set(saved) - set(ADDED_SINCE))


@pytest.mark.parametrize("name,rec,build", CASES, ids=[c[0] for c in CASES])
def test_configs_build_save_and_load_as_before(name, rec, build):
    config = build()
    assert _dict(config) == rec["to_dict"]
    assert _saved_keys(config) == rec["saved_keys"]
    # the dict of an old checkpoint loads into the same config
    assert _dict(HybridConfig.from_dict(rec["to_dict"])) == rec["to_dict"]


def test_an_old_checkpoint_config_loads_and_saves_the_same_keys(tmp_path):
    rec = BEFORE["presets"]["deepseek-v3.2-like"]
    on_disk = {k: rec["to_dict"][k] for k in rec["saved_keys"]}
    (tmp_path / "config.json").write_text(json.dumps(on_disk))
    config = HybridConfig.from_pretrained(tmp_path)
    assert (
        config.index_topk == rec["to_dict"]["index_topk"]
        and config.kv_lora_rank == rec["to_dict"]["kv_lora_rank"]
    )
    config.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    again.pop("transformers_version")
    assert {k: again.pop(k) for k in ADDED_SINCE} == ADDED_SINCE
    assert again == on_disk


def test_per_kind_fields_keep_their_checks_and_derived_defaults():
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = HybridConfig(**kw)
    with pytest.raises(
        Exception, match=r"HybridConfig.linear_decay='bogus' is not allowed; choose one of: none"
    ):
        HybridConfig(**kw, linear_decay="bogus")
    with pytest.raises(Exception, match=r"HybridConfig.router_aux_loss_coef=-1.0 must be >= 0"):
        HybridConfig(**kw, router_aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match=r"did you mean 'gdn_num_key_heads'"):
        HybridConfig(**kw, gdn_num_key_head=2)
    # derived defaults, as before
    assert (config.gdn_num_key_heads, config.kda_gate_rank, config.moe_intermediate_size) == (2, 8, 32)
    assert not hasattr(config, "output_router_logits")  # no MoE layer: no switch (TRL reads hasattr)
    assert HybridConfig(**kw, mlp_pattern="moe").output_router_logits is False


# ---- an outside kind declares its fields and the converters' hooks in its own spec -------------------------


def _shift_cost(config, layer_idx):
    from hf_hybrid.registry import MixerCost

    h = config.hidden_size
    return MixerCost(params=2 * h * h, matmul_params=2 * h * h)


class _Shift(nn.Module):
    """out = W_o · W_v · (x shifted by ``shift_width`` tokens): attention-free, reads no cache."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.width = config.shift_width
        self.shift_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, ctx):
        shifted = torch.nn.functional.pad(hidden_states, (0, 0, self.width, 0))[:, : hidden_states.shape[1]]
        return self.o_proj(self.shift_proj(shifted))


def _shift_apply(mixer, w, config):
    with torch.no_grad():
        mixer.shift_proj.weight.copy_(w.value()[: config.hidden_size])  # the value heads (no GQA here)
        mixer.o_proj.weight.copy_(w.o)
    return ["a toy note"]


SHIFT_INIT = HybridizeInit(
    geometry=lambda config: {"shift_width": 1},
    apply=_shift_apply,
    statement=lambda config: {"inherited": ["shift_proj ← W_v", "o_proj ← W_o"], "new": [], "dropped": []},
)


@pytest.fixture
def shift_kind():
    register_mixer(
        "toy_shift",
        layer_type="moe",
        cost=_shift_cost,
        config_fields=[ConfigField("shift_width", 2, "int", choices=(1, 2))],
        hybridize_init=SHIFT_INIT,
        lora_targets=("shift_proj",),
        functional_fields=lambda config: ("shift_width",),
    )(_Shift)
    yield
    for table in (registry._MIXERS, registry.MIXER_REGISTRY):
        table.pop("toy_shift", None)
    peft_support._refresh()


def test_an_outside_kinds_field_is_set_checked_and_only_on_configs_that_use_it(shift_kind):
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = HybridConfig(**kw, mixer_pattern="toy_shift,attention")
    assert config.shift_width == 2 and config.to_dict()["shift_width"] == 2
    assert not hasattr(HybridConfig(**kw), "shift_width")
    with pytest.raises(Exception, match=r"HybridConfig.shift_width=3 is not allowed; choose one of: 1, 2"):
        HybridConfig(**kw, mixer_pattern="toy_shift,attention", shift_width=3)
    assert FIELD_CHOICES["shift_width"] == (1, 2)
    assert "shift_width" in functional_fields(config) and "shift_width" not in functional_fields(
        HybridConfig(**kw)
    )


def test_hybridize_and_lora_pick_up_an_outside_kinds_hooks(shift_kind):
    from peft import LoraConfig, get_peft_model

    assert "toy_shift" in available_mixers() and INIT_TABLE["toy_shift"] is SHIFT_INIT
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    teacher = HybridForCausalLM(HybridConfig(**kw)).eval()
    student = hybridize_model(teacher, attention_layers=[1], mixer="toy_shift")
    assert student.config.mixer_types == ["toy_shift", "attention"] and student.config.shift_width == 1
    mixer, attn = student.model.layers[0].mixer, teacher.model.layers[0].mixer
    assert torch.equal(mixer.o_proj.weight, attn.o_proj.weight)
    assert torch.equal(mixer.shift_proj.weight, attn.v_proj.weight)
    assert student.config.hf_hybrid_lineage["init"]["toy_shift"]["inherited"] == [
        "shift_proj ← W_v",
        "o_proj ← W_o",
    ]

    assert "shift_proj" in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["hf_hybrid"]
    peft_model = get_peft_model(student, LoraConfig(task_type="CAUSAL_LM", r=2))
    adapted = {n for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert any("layers.0.mixer.shift_proj.lora_A" in n for n in adapted), sorted(adapted)


# ---- an outside kind takes part in the cross-layer options only when it declares their hooks ---------------


class _Plain(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, ctx):
        return self.o_proj(hidden_states)


@pytest.fixture
def toy_kv_kind():
    def register(**hooks):
        register_mixer(
            "toy_kv", layer_type="full_attention", mask="full_attention", cost=_shift_cost, **hooks
        )(_Plain)

    yield register
    for table in (registry._MIXERS, registry.MIXER_REGISTRY):
        table.pop("toy_kv", None)
    peft_support._refresh()


def test_an_outside_kind_opts_into_kv_sharing_nope_rope_dims_and_cost_notes(toy_kv_kind):
    from hf_hybrid.cost import estimate_cost
    from hf_hybrid.registry import KVKind

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    kw["mixer_types"] = ["attention", "toy_kv", "toy_kv"]  # attention rotates head_dim = 8 channels
    # no hooks: nothing to share, no NoPE, no rotary dims, no notes
    toy_kv_kind()
    config = HybridConfig(**kw)
    assert config.kv_kind(1) is None and config.rope_dims() == {8}
    assert estimate_cost(config, [64], measure=False).notes == []
    with pytest.raises(
        Exception, match=r"layer 2 \(mixer_types\[2\]='toy_kv': nothing to share\) cannot read"
    ):
        HybridConfig(**kw, kv_source_layers=[0, 1, 1])
    with pytest.raises(
        Exception, match=r"nope_layers names layer 1, whose mixer_types\[1\]='toy_kv' is neither"
    ):
        HybridConfig(**kw, nope_layers=[1])

    # it declares what it caches, its rotary dims, that it takes NoPE, and a cost note: each is honoured
    def notes(config, contexts, estimate):
        flops = estimate(config, contexts).flops_per_token(contexts[0])
        return [f"toy note: {flops:.0f} FLOPs/token at {contexts[0]}"]

    toy_kv_kind(
        kv_kind=lambda config, i: KVKind("toy_kv", i not in (config.nope_layers or ())),
        rope_dims=lambda config, i: set() if i in (config.nope_layers or ()) else {4},
        accepts_nope=lambda config, i: True,
        cost_notes=notes,
    )
    config = HybridConfig(**kw, kv_source_layers=[0, 1, 1])
    assert config.shares_kv(2) and config.kv_sharing_modes == [None, "store", "reuse"]
    assert config.rope_dims() == {4, 8}
    report = estimate_cost(config, [64], measure=False)
    assert report.notes == [f"toy note: {report.flops_per_token(64):.0f} FLOPs/token at 64"]
    with pytest.raises(
        Exception, match=r"rope_learned_scale=True needs every rotating layer .* rotates \[4, 8\]"
    ):
        HybridConfig(**kw, rope_learned_scale=True)
    # only layers of the same KV kind and RoPE use share: not attention's K/V, not a NoPE toy layer's
    with pytest.raises(
        Exception, match=r"layer 1 \(mixer_types\[1\]='toy_kv': toy_kv, RoPE\) cannot read the "
    ):
        HybridConfig(**kw, kv_source_layers=[0, 0, 2])
    with pytest.raises(
        Exception, match=r"toy_kv, RoPE\) cannot read the keys/values of layer 1 \(.*toy_kv, NoPE\)"
    ):
        HybridConfig(**kw, kv_source_layers=[0, 1, 1], nope_layers=[1])
    assert HybridConfig(**kw, nope_layers=[1, 2]).rope_dims() == {8}


# ---- no file outside a kind's own spells its name ----------------------------------------------------------

# The package's central files: they loop over specs. Converters that produce a kind, the presets and the CLI
# (which offers choices) may name kinds.
CENTRAL_FILES = (
    "modeling_hybrid.py",
    "configuration_hybrid.py",
    "config_choices.py",
    "cost.py",
    "cache.py",
    "card.py",
    "testing.py",
    "registry.py",
    "specs.py",
    "aux_loss.py",
    "layers.py",
    "peft_support.py",
    "compat.py",
    "training.py",
    "trainer_patch.py",
    "mixers/base.py",
    "mixers/recurrent.py",
    "mixers/from_attention.py",
    "convert/native/base.py",
)
# (file, string) -> (how many times, why): what remains, each with its reason.
ALLOWED = {
    ("configuration_hybrid.py", "attention"): (1, "the default mixer of a layer"),
    ("configuration_hybrid.py", "dense"): (2, "the default MLP of a layer, and first_k_dense's"),
    ("configuration_hybrid.py", "none"): (4, "a gated_norms / hyper_connections value, not the kind"),
    ("modeling_hybrid.py", "none"): (3, "a gated_norms / hyper_connections value, not the kind"),
    ("config_choices.py", "none"): (1, "a hyper_connections value, not the kind"),
    ("card.py", "none"): (1, "a hyper_connections value, not the kind"),
    ("modeling_hybrid.py", "sliding_attention"): (1, "transformers' mask name, not the kind"),
    ("specs.py", "sliding_attention"): (2, "transformers' layer type and mask names, not the kind"),
    ("specs.py", "linear_attention"): (1, "transformers' layer type name, not the kind"),
    ("specs.py", "moe"): (1, "transformers' layer type name, not the kind"),
    ("cost.py", "none"): (1, "a gated_norms value, not the kind"),
    ("testing.py", "attention"): (1, "the kit's companion layer around the kind under test"),
    ("testing.py", "dense"): (1, "the kit's companion MLP around the kind under test"),
    ("training.py", "none"): (1, "TrainingArguments(report_to='none'), not the kind"),
}


def test_no_central_file_spells_a_builtin_kinds_name():
    import ast

    package = Path(__file__).resolve().parents[1] / "hf_hybrid"
    kinds = {s.name for s in (*registry.mixer_specs().values(), *registry.mlp_specs().values()) if s.builtin}
    found: dict[tuple[str, str], list[int]] = {}
    for name in CENTRAL_FILES:
        for node in ast.walk(ast.parse((package / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in kinds:
                found.setdefault((name, node.value), []).append(node.lineno)
    new = {key: lines for key, lines in found.items() if key not in ALLOWED or len(lines) > ALLOWED[key][0]}
    assert not new, f"built-in kind names in central files (loop over the specs instead): {new}"
    gone = {key for key in ALLOWED if len(found.get(key, ())) < ALLOWED[key][0]}
    assert not gone, f"allowed occurrences that no longer exist (lower or remove them in ALLOWED): {gone}"
