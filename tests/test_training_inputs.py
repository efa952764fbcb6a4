"""Training inputs that used to be accepted and silently ignored or mishandled (issue 22 items 6, 7, 9, 10):
packed and left-padded batches under distillation, ``shift_labels``, ``return_dict=False``, the config's
``output_hidden_states``, misspelled config fields, head arguments sent to the backbone, a plain
``DynamicCache`` on a recurrent model, and the model card under TRL's trainers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.card import parse_front_matter
from hf_hybrid.distill import AttentionTransfer, DistillationTrainer
from hf_hybrid.presets import preset_config

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def tiny(name="tiny-attention", seed=0, **kw) -> HybridForCausalLM:
    config = preset_config(name, **{**TINY, **kw})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return HybridForCausalLM(config)


def ids(n, seed):
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def distiller(tmp_path):
    from transformers import TrainingArguments

    student = tiny("tiny-hybrid", seed=1).train()  # Gated DeltaNet : attention, recurrent packing
    teacher = tiny(seed=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return DistillationTrainer(model=student, teacher=teacher, lm_weight=0.5, args=args)


# ---- distillation ------------------------------------------------------------------------------------------


def test_distillation_of_a_packed_row_is_each_document_alone(distiller):
    """A padding-free batch (one row, positions restarting) reaches teacher and student: its loss is the sum
    of the documents' losses computed alone — nothing leaks from one document into the next."""
    a, b = ids(9, 0), ids(7, 1)
    packed = {
        "input_ids": torch.cat([a, b], 1),
        "position_ids": torch.cat([torch.arange(9), torch.arange(7)])[None],
        "labels": torch.cat([a, b], 1).clone(),
    }
    packed["labels"][0, 9] = -100  # the collator's separator: B's first token is predicted by nothing
    n = torch.tensor(int((packed["labels"][:, 1:] != -100).sum()))
    model = distiller.model
    whole = distiller.compute_loss(model, packed, num_items_in_batch=n)
    alone = sum(
        distiller.compute_loss(model, {"input_ids": x, "labels": x}, num_items_in_batch=n) for x in (a, b)
    )
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_distillation_without_labels_counts_no_prediction_made_from_a_pad(distiller):
    """Left padding without labels: the prediction of a row's first token from the pad before it is not part
    of the loss; the padded batch is the rows alone."""
    a, b = ids(9, 3), ids(6, 4)
    batch = {
        "input_ids": torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)]),
        "attention_mask": torch.cat(
            [torch.ones(1, 9), torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1)]
        ).long(),
    }
    n = torch.tensor(8 + 5)
    model = distiller.model
    distiller.lm_weight = 0.0
    whole = distiller.compute_loss(model, batch, num_items_in_batch=n)
    alone = sum(distiller.compute_loss(model, {"input_ids": x}, num_items_in_batch=n) for x in (a, b))
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_attention_transfer_is_a_token_sum_packed_and_accumulated():
    """Stage 1 normalises each token's error by the teacher output there: two micro-batches add up to the
    whole batch (gradient accumulation with num_items_in_batch), and a packed row is its documents alone."""
    teacher = tiny("tiny-attention", seed=2, num_hidden_layers=2)
    student = tiny("tiny-hybrid", seed=1, num_hidden_layers=2, mixer_types=["gated_deltanet", "attention"])
    module = AttentionTransfer(teacher, student, [0]).train()
    rows = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(5))
    n = torch.tensor(4 * 9)
    whole = module(rows, labels=rows, num_items_in_batch=n)["loss"]
    parts = sum(module(r, labels=r, num_items_in_batch=n)["loss"] for r in rows.split(2))
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-6)
    a, b = ids(9, 6), ids(7, 7)
    labels = torch.cat([a, b], 1).clone()
    labels[0, 9] = -100
    position_ids = torch.cat([torch.arange(9), torch.arange(7)])[None]
    m = torch.tensor(8 + 6)
    packed = module(torch.cat([a, b], 1), labels=labels, position_ids=position_ids, num_items_in_batch=m)[
        "loss"
    ]
    alone = sum(module(x, labels=x, num_items_in_batch=m)["loss"] for x in (a, b))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        module(a, labels=a, postion_ids=position_ids)


# ---- inputs the forward used to ignore ---------------------------------------------------------------------


def test_shift_labels_return_dict_and_the_configs_output_hidden_states():
    model = tiny().train()
    x = ids(12, 8)
    labels = x.clone()
    labels[0, :3] = -100
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # what context-parallel collators send
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, model(x, labels=labels).loss)
    as_tuple = model(x, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model(x, labels=labels).loss)
    model.config.output_hidden_states = True
    out = model(x)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert model(x, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize(
    "typo, meant", [("num_expert", "num_experts"), ("n_shared_experts", "num_shared_experts")]
)
def test_a_misspelled_config_field_is_refused(typo, meant):
    with pytest.raises(ValueError, match=rf"{typo}=1 is not a field \(did you mean '{meant}'\?\)"):
        HybridConfig(**{typo: 1})
    HybridConfig(my_own_note="kept")  # a foreign field no closer to ours is stored, as transformers does


def test_the_backbone_names_a_head_argument_and_a_plain_dynamic_cache_is_refused():
    from transformers import DynamicCache

    model = tiny("tiny-hybrid")
    x = ids(6, 9)
    with pytest.raises(TypeError, match="'labels', an argument of the causal-LM head"):
        model.model(x, labels=x)
    with pytest.raises(TypeError, match=r"no room for recurrent .* pass hf_hybrid.cache.HybridCache"):
        model(x, past_key_values=DynamicCache(), use_cache=True)


def test_trl_sft_trainer_keeps_our_model_card(tmp_path):
    """TRL's trainers override ``create_model_card``; our card (front matter, layer table) stays, with TRL's
    own summary appended."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_hybrid.data import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny(
        "tiny-moe", vocab_size=len(tok), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, max_length=32,
    )  # fmt: skip
    data = Dataset.from_dict({"text": ["To be, or not to be.", "That is the question."]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Model Card for None" not in card
    meta = parse_front_matter(card)
    assert meta["library_name"] == "hf-hybrid" and "moe" in meta["tags"], meta
