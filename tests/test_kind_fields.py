"""Each layer kind declares its own config fields in its file; the config stays flat and identical.

``tests/data/configs_before_kind_fields.json`` holds ``to_dict()`` (and the keys ``save_pretrained``
writes) of configs built while every per-kind field was still a typed field of ``HybridConfig``: the same
configs built now, and those dicts loaded as old checkpoints, must give the same dicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_hybrid import HybridConfig
from hf_hybrid.presets import preset_config

BEFORE = json.loads((Path(__file__).parent / "data" / "configs_before_kind_fields.json").read_text())
CASES = [(name, rec, lambda name=name: preset_config(name)) for name, rec in BEFORE["presets"].items()] + [
    (name, rec, lambda rec=rec: HybridConfig(**rec["kwargs"])) for name, rec in BEFORE["kwargs"].items()
]


def _dict(config: HybridConfig) -> dict:
    out = json.loads(json.dumps(config.to_dict(), default=str))  # as written to config.json
    out.pop("transformers_version")
    return out


@pytest.mark.parametrize("name,rec,build", CASES, ids=[c[0] for c in CASES])
def test_configs_build_save_and_load_as_before(name, rec, build):
    config = build()
    assert _dict(config) == rec["to_dict"]
    saved = config.to_diff_dict()
    saved.pop("transformers_version")
    assert sorted(saved) == rec["saved_keys"]
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
