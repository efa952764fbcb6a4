"""PEFT LoRA with our registered default targets: train, save, reload, merge — on a hybrid (GDN +
attention)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from hf_hybrid import HybridForCausalLM
from hf_hybrid.peft_support import LORA_TARGET_MODULES

TOL = 1e-5


def _adapted(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_defaults_are_registered():
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["hf_hybrid"] == list(LORA_TARGET_MODULES)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("tiny-hybrid", {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                         "gate_proj", "up_proj", "down_proj"}),
        ("tiny-mla", {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj"}),
        ("tiny-mamba2", {"in_proj", "out_proj"}),
        ("tiny-moe", {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # dense + shared experts
    ],
)  # fmt: skip
def test_default_targets_cover_each_family(preset, expected, tiny_config):
    config = tiny_config(preset)
    if "moe" in config.mlp_types:
        pytest.importorskip("hf_hybrid.moe")
    model = get_peft_model(HybridForCausalLM(config), LoraConfig(task_type="CAUSAL_LM", r=4))
    assert expected <= _adapted(model)


MLA_MOE_HYBRID = dict(
    mixer_pattern="gated_deltanet,mla,attention,mla",
    mlp_pattern="moe",
    first_k_dense=1,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    num_shared_experts=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)


# peft.get_peft_model / PeftModel.from_pretrained: the path that works on every supported transformers (5.24's
# own add_adapter / load_adapter demand a peft that is not released yet).
@pytest.mark.parametrize("overrides", [{}, MLA_MOE_HYBRID], ids=["gdn-attention", "gdn-mla-attention-moe"])
def test_lora_trains_saves_reloads_and_merges(overrides, tiny_config, tmp_path):
    torch.manual_seed(0)
    config = tiny_config("tiny-hybrid", vocab_size=128, **overrides)
    base = HybridForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # a tiny memorisation task: the adapter alone must lower the loss
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses

    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        HybridForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    assert (_logits(reloaded, ids) - adapted).abs().max().item() <= TOL

    merged = reloaded.merge_and_unload()
    assert not _adapted(merged)
    assert (_logits(merged, ids) - adapted).abs().max().item() <= TOL
    merged.save_pretrained(tmp_path / "merged")  # a plain hf_hybrid checkpoint again, strict to load
    again = HybridForCausalLM.from_pretrained(tmp_path / "merged")
    assert (_logits(again, ids) - adapted).abs().max().item() <= TOL
