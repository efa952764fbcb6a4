"""Real clients on tiny models of every kind (issue #13): TRL's SFTTrainer (packed padding-free and padded)
and DPOTrainer, lm-eval-harness' HFLM with a local loglikelihood_rolling task, pipeline("text-generation"),
and Trainer.create_model_card / push_to_hub (upload mocked, offline)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_hybrid import HybridForCausalLM
from hf_hybrid.card import parse_front_matter
from hf_hybrid.data import byte_tokenizer
from hf_hybrid.presets import preset_config

KINDS = {
    "dense": ("tiny-attention", {}),
    "moe": ("tiny-moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "dsa": ("tiny-dsa", dict(index_topk=4)),
    "hybrid": ("tiny-hybrid", {}),  # 3 Gated DeltaNet : 1 attention
    "mla": ("tiny-mla", {}),
}
TEXTS = [("To be, or not to be, that is the question. " * (1 + i % 3)).strip() for i in range(24)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny(kind: str, vocab: int, seed: int = 0, **overrides) -> HybridForCausalLM:
    name, extra = KINDS[kind]
    config = preset_config(
        name,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{**extra, **overrides},
    )
    torch.manual_seed(seed)
    return HybridForCausalLM(config)


def _trl_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_pin_memory=False,
        bf16=False,
        seed=0,
        **kw,
    )


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---- TRL ---------------------------------------------------------------------------------------------------


def _sft(kind, packing, tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny(kind, len(tok))
    args = _trl_args(SFTConfig, tmp_path, packing=packing, max_length=64)
    as_built = dict(model.config.__dict__)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tok
    )
    trainer.current_gradient_accumulation_steps = 1  # set by train(); compute_loss reads it
    return model, trainer, as_built


DEFAULT_SFT = {(k, True) for k in KINDS} | {("moe", False), ("hybrid", False)}


@pytest.mark.parametrize(
    "kind, packing",
    [
        (k, p) if (k, p) in DEFAULT_SFT else pytest.param(k, p, marks=pytest.mark.slow)
        for k in KINDS
        for p in (True, False)
    ],
)
def test_trl_sft_trains_and_saves_the_config_as_set(kind, packing, tok, tmp_path):
    model, trainer, before = _sft(kind, packing, tok, tmp_path)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # TRL adds (and logs) Mixtral's balance loss for an MoE only: a dense hybrid is never taken for one
    assert any("aux_loss" in h for h in trainer.state.log_history) == (kind == "moe")
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    # TRL sets output_router_logits=True on the live config of an MoE; the checkpoint keeps what the user
    # built
    assert saved.get("output_router_logits", "absent") == before.get("output_router_logits", "absent")
    assert saved["router_aux_loss_coef"] == before["router_aux_loss_coef"]
    reloaded = HybridForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([tok.encode("To be")])
    torch.testing.assert_close(reloaded.eval()(ids).logits, model.eval()(ids).logits)


def test_trl_sft_counts_each_aux_term_once_same_gradients_as_our_forward(tok, tmp_path):
    """Under TRL's fused LM head: the backbone attaches our balance, z-loss and sequence terms and returns the
    router logits detached, so the Mixtral balance loss TRL computes from them adds a value, not a second
    gradient. The gradient equals our own forward's loss with the same terms."""
    model, trainer, _ = _sft("moe", True, tok, tmp_path)
    cfg = model.config
    cfg.router_z_loss_coef, cfg.router_seq_aux_loss_coef = 0.05, 0.02
    for moe in (m for m in model.modules() if hasattr(m, "z_loss_coef")):  # read when the layers were built
        moe.z_loss_coef, moe.seq_aux_loss_coef = 0.05, 0.02
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free packing
    n = (batch["labels"][:, 1:] != -100).sum()
    params = {k: p for k, p in model.named_parameters()}
    trl_loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    trl = torch.autograd.grad(trl_loss, list(params.values()), allow_unused=True)

    model_in = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**model_in, labels=batch["labels"], num_items_in_batch=n, use_cache=False)
    ref = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    for (name, _), a, b in zip(params.items(), trl, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    router = [name for name, g in zip(params, trl) if "router" in name and g is not None]
    assert router and all(g.abs().sum() > 0 for name, g in zip(params, trl) if name in router)


@pytest.mark.parametrize("kind", list(KINDS))
def test_trl_dpo_trains(kind, tok, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = tiny(kind, len(tok))
    data = Dataset.from_dict(
        {"prompt": ["Q: to be? A:"] * 16, "chosen": [" yes, to be."] * 16, "rejected": [" no"] * 16}
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=_trl_args(DPOConfig, tmp_path),
        train_dataset=data,
        processing_class=tok,
    )
    trainer.train()
    losses = _losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # policy == reference at step 0: log 2, plus TRL's weighted balance loss for an MoE
    aux = trainer.state.log_history[0].get("aux_loss", 0.0) * model.config.router_aux_loss_coef
    assert losses[0] == pytest.approx(math.log(2) + aux, abs=1e-3)


# ---- lm-eval-harness, pipeline -----------------------------------------------------------------------------

ROLLING_TASK = """task: hf_hybrid_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: byte_perplexity
  - metric: word_perplexity
"""
DOCS = ["To be, or not to be, that is the question.", "Whether tis nobler in the mind to suffer the slings."]


def _rolling(lm_model, tok, tmp_path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "task"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS))
    (task_dir / "task.yaml").write_text(ROLLING_TASK.format(data=task_dir / "data.jsonl"))
    lm = HFLM(pretrained=lm_model.eval(), tokenizer=tok, batch_size=2, max_length=64)
    # indexing lm-eval's own tasks: ~15 s
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["hf_hybrid_rolling"], task_manager=manager)
    return out["results"]["hf_hybrid_rolling"]


def _own_byte_perplexity(model, tok) -> float:
    """exp(-Σ log p / bytes) with each document scored after the end-of-text token, as lm-eval's rolling task
    does."""
    total, nbytes = 0.0, 0
    with torch.no_grad():
        for text in DOCS:
            ids = torch.tensor([[tok.eos_token_id] + tok.encode(text)])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            total += logp.gather(1, ids[0, 1:, None]).sum().item()
            nbytes += len(text.encode())
    return math.exp(-total / nbytes)


def test_lm_eval_rolling_gives_our_own_loglikelihood(tok, tmp_path):
    model = tiny("hybrid", len(tok))
    res = _rolling(model, tok, tmp_path)
    assert res["byte_perplexity,none"] == pytest.approx(_own_byte_perplexity(model, tok), rel=1e-4)


def test_lm_eval_an_imported_checkpoint_gives_the_source_numbers(tok, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_hybrid.convert import import_dense

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=256,
            eos_token_id=256,
        )
    )
    source.save_pretrained(tmp_path / "llama")
    import_dense(tmp_path / "llama", tmp_path / "imported")
    ref = _rolling(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), tok, tmp_path)
    ours = _rolling(HybridForCausalLM.from_pretrained(tmp_path / "imported"), tok, tmp_path)
    for metric in ("byte_perplexity,none", "word_perplexity,none"):
        assert ours[metric] == pytest.approx(ref[metric], rel=1e-5), metric


@pytest.mark.parametrize("kind", list(KINDS))
def test_lm_eval_rolling_on_every_kind(kind, tok, tmp_path):
    model = tiny(kind, len(tok))
    res = _rolling(model, tok, tmp_path)
    assert res["byte_perplexity,none"] == pytest.approx(_own_byte_perplexity(model, tok), rel=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_text_generation_pipeline_matches_generate(kind, tok):
    from transformers import pipeline

    model = tiny(kind, len(tok)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    text = pipe("To be", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([tok.encode("To be")])
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert text == tok.decode(expected)


# ---- Trainer's card ----------------------------------------------------------------------------------------


def test_trainer_create_model_card_and_push_to_hub_keep_our_card(tok, tmp_path, monkeypatch):
    from transformers import Trainer
    from transformers import trainer as trainer_module

    from hf_hybrid.training import training_arguments

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"user/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, (Path(folder_path) / "README.md").read_text()))
            return SimpleNamespace(commit_url="https://example.invalid/commit")

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    model = tiny("moe", len(tok))
    ids = torch.randint(0, 256, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = training_arguments(
        str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        push_to_hub=True,
        hub_model_id="tiny-moe",
        logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.push_to_hub(commit_message="test")
    assert uploads and uploads[-1][0] == "user/tiny-moe"
    for card in (uploads[-1][1], (tmp_path / "run" / "README.md").read_text()):
        meta = parse_front_matter(card)
        assert meta["library_name"] == "hf-hybrid", meta
        assert "moe" in meta["tags"]
        assert "## Training (transformers Trainer)" in card  # Trainer's summary is kept below our card
        assert "learning_rate" in card
