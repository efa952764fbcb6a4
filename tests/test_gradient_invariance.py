"""The gradient-invariance matrix: one training objective, checked under every client.

The objective (README, "Loss rule") of one optimizer step is

    LM loss over the step's predicted tokens
      + Σ_term coefficient · (term averaged over the step's micro-batches)

(in DSA's dense warm-up the LM loss drops out). :func:`reference_aux_grads` writes the second half the
obvious way: it replays every training forward the client made (recorded by a hook on the backbone), asks for
the terms unattached, averages them over those forwards and backpropagates. Every cell of the matrix runs a
client for one optimizer step twice, with the coefficients and with them at zero, and checks **every
parameter's gradient**:

1. gradient(with coefficients) = gradient(coefficients 0) + reference — each term counted once, weighted
   1 / micro-batches, whatever the client does with the loss;
2. gradient(coefficients 0) is the same for 1 × 4, 2 × 2 and 4 × 1 rows of the same batch — the client's own
   loss is normalised over the step.

Tolerances: fp32 throughout; the sums run in another order in each setting (micro-batches, padding), so the
gradients agree to fp32 rounding of O(1) sums of O(100) terms: rtol 1e-4, atol 1e-6 (gradients are O(1e-2)).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid import HybridForCausalLM
from hf_hybrid.data import byte_tokenizer
from hf_hybrid.presets import preset_config

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(mlp_pattern="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
KINDS = {
    # Switch + z + sequence terms, and the aux-loss-free bias (its update is a callback, not a gradient)
    "moe": (
        "tiny-moe",
        dict(
            MOE,
            router_aux_loss_coef=0.1,
            router_z_loss_coef=0.05,
            router_seq_aux_loss_coef=0.02,
        ),
        dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, router_seq_aux_loss_coef=0.0),
    ),
    "moe_bias": (
        "tiny-moe",
        dict(
            MOE,
            router_scoring_func="sigmoid",
            router_bias_update_rate=1e-3,
            router_z_loss_coef=0.05,
            router_aux_loss_coef=0.0,
        ),
        dict(router_z_loss_coef=0.0),
    ),
    "dsa": ("tiny-dsa", dict(index_topk=4, index_loss_coef=0.5), dict(index_loss_coef=0.0)),
    "dsa_warmup": ("tiny-dsa", dict(index_topk=4, dsa_mode="dense_warmup"), None),
}
TEXTS = [
    "To be, or not to be, that is the question.",
    "Whether tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles.",
]
SPLITS = [(1, 4), (2, 2), (4, 1)]  # (gradient accumulation steps, rows per micro-batch): the same 4 rows
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def build(kind: str, vocab: int, *, zero: bool = False) -> HybridForCausalLM:
    name, extra, off = KINDS[kind]
    config = preset_config(name, vocab_size=vocab, **TINY, **{**extra, **(off if zero else {})})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = HybridForCausalLM(config)
    if kind == "dsa_warmup":  # DeepSeek's warm-up trains the indexers alone
        for n, p in model.named_parameters():
            p.requires_grad_(".indexer." in n)
    return model


# ---- recording what the client ran, and the reference ------------------------------------------------------


class Recorder:
    """Records the keyword inputs of every training forward of the backbone (grad enabled, training mode)."""

    def __init__(self, model: HybridForCausalLM):
        self.calls: list[dict] = []
        self.handle = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            assert not args, "the clients call the backbone with keywords"
            self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def remove(self):
        self.handle.remove()


_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
_FORWARD_KEYS += ("max_length_q", "max_length_k")


def reference_aux_grads(model: HybridForCausalLM, calls: list[dict]) -> dict[str, torch.Tensor]:
    """d/dθ of Σ_term coefficient · mean over the recorded forwards of the term: the obvious way, terms asked
    for unattached and added by hand."""
    model = copy.deepcopy(model).train()
    total = 0.0
    for kwargs in calls:
        inputs = {k: v for k, v in kwargs.items() if k in _FORWARD_KEYS and v is not None}
        out = model.model(**inputs, use_cache=False, attach_aux_loss=False)
        coefs = model.model.aux_coefficients()
        assert set(coefs) <= set(out.aux_terms), (coefs, list(out.aux_terms))
        total = total + sum(coef * out.aux_terms[name] for name, coef in coefs.items()) / len(calls)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(params, got)}


def assert_grads_close(got: dict, want: dict, *, what: str, rtol=RTOL, atol=ATOL) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in got:
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
        if p.requires_grad
    }


# ---- clients -----------------------------------------------------------------------------------------------


def _rows(tok):
    ids = [tok.encode(t) for t in TEXTS]
    return [{"input_ids": x} for x in ids]


def _pad_collate(tok):
    pad = tok.pad_token_id

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the positions of real tokens start at 0
            ids[i, n - len(r["input_ids"]) :] = torch.tensor(r["input_ids"])
            mask[i, n - len(r["input_ids"]) :] = 1
        # a row's first token is predicted by nothing (only by a pad on its left): no label, in every split
        first = mask.bool() & ~F.pad(mask, (1, 0))[:, :-1].bool()
        labels = ids.masked_fill((mask == 0) | first, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _trainer_args(cls, tmp_path, steps, rows, **kw):
    return cls(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=steps,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
        **kw,
    )


def _capture_callback(store: dict):
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            store.update(_grads(model))

    return Capture()


def run_head_trainer(model, tok, tmp_path, steps, rows):
    """Our head's loss through ``Trainer`` (labels, num_items_in_batch)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    store: dict = {}
    trainer = Trainer(
        model=model,
        args=_trainer_args(TrainingArguments, tmp_path, steps, rows, remove_unused_columns=False),
        train_dataset=Dataset.from_list(_rows(tok)),
        data_collator=_pad_collate(tok),
        callbacks=[_capture_callback(store)],
    )
    trainer.train()
    return store


def run_sft(model, tok, tmp_path, steps, rows, *, padding_free: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    store: dict = {}
    args = _trainer_args(
        SFTConfig,
        tmp_path,
        steps,
        rows,
        max_length=None if padding_free else 64,
        padding_free=padding_free,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tok,
        callbacks=[_capture_callback(store)],
    )
    trainer.train()
    return store


def run_dpo(model, tok, tmp_path, steps, rows):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    store: dict = {}
    data = Dataset.from_dict(
        {
            "prompt": [t[:12] for t in TEXTS],
            "chosen": [t[12:] for t in TEXTS],
            "rejected": [t[12:20] for t in TEXTS],
        }
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=_trainer_args(DPOConfig, tmp_path, steps, rows, bf16=False),
        train_dataset=data,
        processing_class=tok,
        callbacks=[_capture_callback(store)],
    )
    trainer.train()
    return store


def run_distill(model, tok, tmp_path, steps, rows):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_hybrid.distill import DistillationTrainer

    teacher_cfg = preset_config("tiny-attention", vocab_size=len(tok), **TINY)
    torch.manual_seed(1)
    teacher = HybridForCausalLM(teacher_cfg)
    store: dict = {}
    trainer = DistillationTrainer(
        model=model,
        teacher=teacher,
        lm_weight=0.5,
        args=_trainer_args(TrainingArguments, tmp_path, steps, rows, remove_unused_columns=False),
        train_dataset=Dataset.from_list(_rows(tok)),
        data_collator=_pad_collate(tok),
        callbacks=[_capture_callback(store)],
    )
    trainer.train()
    return store


def run_custom_loop(model, tok, tmp_path, steps, rows, *, moe_convention=False, compile=False, head=False):
    """A plain loop: the LM loss from the logits over the step's tokens (or our head's loss, a per-micro-batch
    mean, divided by the micro-batches), ``set_aux_loss_scale(1 / micro-batches)`` as the README says; with
    ``moe_convention`` it also adds ``coef · outputs.aux_loss``, as transformers' MoE families tell loops."""
    batch = _pad_collate(tok)(_rows(tok))
    model.train()
    model.set_aux_loss_scale(1.0 / steps)
    forward = torch.compile(model, backend="aot_eager") if compile else model
    total = (batch["labels"][:, 1:] != -100).sum()
    for i in range(steps):
        mb = {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}
        labels = mb.pop("labels")
        if head:
            out = forward(**mb, labels=labels)
            loss = out.loss / steps
        else:
            out = forward(**mb)
            logits = out.logits[:, :-1].flatten(0, 1)
            loss = (
                F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum") / total
            )
            if moe_convention and out.aux_loss is not None:
                loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
    model.set_aux_loss_scale(1.0)
    return _grads(model)


CLIENTS = {
    "head_trainer": run_head_trainer,
    "sft_padded": lambda *a: run_sft(*a, padding_free=False),
    "sft_packed": lambda *a: run_sft(*a, padding_free=True),
    "dpo": run_dpo,
    "distill": run_distill,
    "moe_convention": lambda *a: run_custom_loop(*a, moe_convention=True),
    "custom_loop": run_custom_loop,
    "custom_loop_compiled": lambda *a: run_custom_loop(*a, compile=True),
    "head_loop_compiled": lambda *a: run_custom_loop(*a, compile=True, head=True),
}
# Every client on the MoE model at every split; the other kinds on the clients that exercise their paths.
CELLS = [("moe", c) for c in CLIENTS if "compiled" not in c] + [
    ("moe", "custom_loop_compiled"),
    ("moe", "head_loop_compiled"),
    ("moe_bias", "sft_packed"),
    ("dsa", "head_trainer"),
    ("dsa", "sft_padded"),
    ("dsa", "custom_loop"),
    ("dsa_warmup", "head_trainer"),
    ("dsa_warmup", "custom_loop"),
    ("dsa_warmup", "sft_padded"),
]


def _run(kind, client, tok, tmp_path, steps, rows, *, zero):
    model = build(kind, len(tok), zero=zero)
    initial = copy.deepcopy(model)
    recorder = Recorder(model)
    try:
        got = CLIENTS[client](model, tok, tmp_path / f"{steps}x{rows}{'z' if zero else ''}", steps, rows)
    finally:
        recorder.remove()
    return initial, recorder.calls, got


@pytest.mark.parametrize("kind, client", CELLS)
def test_gradient_is_the_objective_under_every_client_and_split(kind, client, tok, tmp_path):
    off_by_split = {}
    for steps, rows in SPLITS if kind == "moe" and "compiled" not in client else SPLITS[1:2]:
        initial, calls, on = _run(kind, client, tok, tmp_path, steps, rows, zero=False)
        assert len(calls) == steps, (client, steps, len(calls))  # one training forward per micro-batch
        reference = reference_aux_grads(initial, calls)
        if KINDS[kind][2] is None:  # warm-up: the KL is the whole objective of the trainable indexers
            off = {n: torch.zeros_like(g) for n, g in reference.items()}
        else:
            off = _run(kind, client, tok, tmp_path, steps, rows, zero=True)[2]
        assert any(g.abs().sum() > 0 for g in reference.values()), "the auxiliary terms must train something"
        want = {n: off[n] + reference[n] for n in off}
        assert_grads_close(on, want, what=f"{kind}/{client} GA {steps}x{rows}")
        off_by_split[(steps, rows)] = off
    first, *rest = off_by_split.items()
    for split, off in rest:
        assert_grads_close(off, first[1], what=f"{kind}/{client} client loss, GA {split} vs {first[0]}")


# ---- rows about one setting --------------------------------------------------------------------------------


def test_a_client_loss_in_dsa_warmup_trains_the_indexers(tok):
    """A CE built from ``model(ids).logits`` in dense warm-up, all but the indexers frozen: the backward
    runs (the logits depend on the attached KL) and the indexers get exactly the KL's gradient."""
    model = build("dsa_warmup", len(tok))
    batch = _pad_collate(tok)(_rows(tok))
    recorder = Recorder(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    recorder.remove()
    assert out.logits.requires_grad
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).backward()
    reference = reference_aux_grads(build("dsa_warmup", len(tok)), recorder.calls)
    assert_grads_close(_grads(model), reference, what="warm-up client loss")
    assert all(g.abs().sum() > 0 for n, g in reference.items() if ".indexer." in n and "weight" in n)


@pytest.mark.parametrize("mixers", ["gated_deltanet,kda,attention", "kda,kda,attention"])
def test_bf16_autocast_trains_gdn_and_kda_close_to_fp32(mixers, tok, tmp_path):
    """Trainer's ``bf16=True`` on CPU (TRL's default) autocasts the forward: the delta-rule layers turn it off
    and run their own precisions (KDA crashed here). The gradients are finite and within bf16's reach of fp32:
    a relative Frobenius error per tensor ≤ 0.1. Why that bound: bf16 keeps 8 significant bits (2^-9 ≈ 2e-3
    per rounding) and the projections around the recurrences run in it; a decay parameter's gradient (A_log,
    dt_bias) is a sum over every token and channel whose terms largely cancel, so its relative error is the
    rounding times the ratio Σ|terms| / |Σ terms| — measured up to 0.053 on these tiny models, against 0.01
    for the projection weights."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    def run(bf16: bool):
        config = preset_config(
            "tiny-hybrid", vocab_size=len(tok), **TINY, num_hidden_layers=3, mixer_types=mixers.split(",")
        )
        torch.manual_seed(0)
        model = HybridForCausalLM(config)
        store: dict = {}
        args = _trainer_args(
            TrainingArguments, tmp_path / str(bf16), 1, 4, remove_unused_columns=False, bf16=bf16
        )
        Trainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(_rows(tok)),
            data_collator=_pad_collate(tok),
            callbacks=[_capture_callback(store)],
        ).train()
        return store

    low, full = run(True), run(False)
    for name, g in full.items():
        assert torch.isfinite(low[name]).all(), name
        err = (low[name].float() - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= 0.1, f"{name}: relative error {err:.3g}"


def test_a_ddp_world_divides_the_aux_terms_inside_a_token_normalised_loss():
    """Trainer multiplies a loss normalised by the step's tokens (over every rank) by the world size and DDP
    averages: the terms inside our head's ``loss`` are divided by it, the attached ones are not (they do not
    pass through that loss)."""
    from types import SimpleNamespace

    from hf_hybrid.trainer_patch import aux_scales_of_step

    def trainer(world, average=True):
        args = SimpleNamespace(gradient_accumulation_steps=4, average_tokens_across_devices=average, n_gpu=0)
        return SimpleNamespace(
            args=args,
            current_gradient_accumulation_steps=4,
            accelerator=SimpleNamespace(num_processes=world, scaler=None),
            model_accepts_loss_kwargs=True,
            compute_loss_func=None,
            get_tp_size=lambda: 1,
        )

    assert aux_scales_of_step(trainer(2), 100) == (0.25, 0.125)
    assert aux_scales_of_step(trainer(2), None) == (0.25, 0.25)  # a per-micro-batch loss is not multiplied
    assert aux_scales_of_step(trainer(2, average=False), 100) == (0.25, 0.25)
    assert math.isclose(aux_scales_of_step(trainer(1), 100)[1], 0.25)


def test_a_two_process_ddp_step_is_the_objective(tok, tmp_path):
    """DDP over gloo, 2 ranks × gradient accumulation 2 × 1 row: the all-reduced gradient is the LM gradient
    over every token both ranks predicted (Trainer normalises by the tokens of every rank and multiplies by
    the world size) plus the terms averaged over all 4 micro-batches of both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(repo / "tests" / "ddp_grad_script.py"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert_grads_close(ranks[0]["grads"], ranks[1]["grads"], what="DDP ranks", rtol=0, atol=0)
    calls = [c for r in ranks for c in r["calls"]]
    assert len(calls) == 4
    model = build("moe", len(tok))
    lm = reference_lm_grads(model, calls)
    reference = reference_aux_grads(model, calls)
    want = {n: lm[n] + reference[n] for n in lm}
    assert_grads_close(ranks[0]["grads"], want, what="DDP 2 ranks x GA 2")


def reference_lm_grads(model: HybridForCausalLM, calls: list[dict]) -> dict[str, torch.Tensor]:
    """d/dθ of the LM loss over every token the recorded forwards predict (labels as ``_pad_collate`` makes
    them: real tokens that follow a real token), summed and divided by their count: the obvious way."""
    model = copy.deepcopy(model).train()
    total, count = 0.0, 0
    for kwargs in calls:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=False, attach_aux_loss=False)
        logits = model.lm_head(out.last_hidden_state)[:, :-1]
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        total = total + F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
        count += int(keep.sum())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(total / count, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(params, got)}
