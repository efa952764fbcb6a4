"""Issue #13: auxiliary terms that reach their parameters whatever loss the client builds, gradient
accumulation, router logits / attentions in the backbone's output, packed input given as cu_seq_lens only, no
dense mask for sparse DSA, gradient checkpointing (reentrant or not) with auxiliary terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_hybrid.modeling_hybrid as modeling
from hf_hybrid import HybridForCausalLM
from hf_hybrid.moe import HybridMoE
from hf_hybrid.presets import preset_config

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(
    mlp_pattern="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=0
)


def build(name: str, seed: int = 0, attn: str = "sdpa", **overrides) -> HybridForCausalLM:
    config = preset_config(name, **{**TINY, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return HybridForCausalLM(config)


def moe_model(**overrides) -> HybridForCausalLM:
    kw = dict(MOE, router_aux_loss_coef=0.1, router_z_loss_coef=0.05, router_seq_aux_loss_coef=0.02)
    kw.update(overrides)
    return build("tiny-moe", **kw).train()


def dsa_model(**overrides) -> HybridForCausalLM:
    return build("tiny-dsa", index_topk=4, **overrides).train()


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, got) if g is not None}


def assert_same_grads(a: dict, b: dict, atol=1e-6, rtol=1e-5) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def batch(n=4, t=12, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- the aux terms reach their parameters through any loss -------------------------------------------------


@pytest.mark.parametrize("kind", ["moe", "dsa"])
def test_a_client_loss_built_on_the_backbone_trains_routers_and_indexers(kind):
    """A custom loop (or TRL) computes its own LM loss from ``model.model``'s hidden states: the balance / z /
    sequence / indexer terms still train their parameters, with exactly the gradients of our head's loss."""
    model = moe_model() if kind == "moe" else dsa_model()
    ids = batch()
    ours = grads(model, model(ids, labels=ids).loss)
    hidden = model.model(ids).last_hidden_state
    logits = model.lm_head(hidden)
    own = F.cross_entropy(logits[:, :-1].reshape(-1, 64).float(), ids[:, 1:].reshape(-1))
    theirs = grads(model, own)
    assert_same_grads(ours, theirs)
    aux_params = [n for n in ours if ("router" in n if kind == "moe" else ".indexer." in n)]
    assert aux_params and all(ours[n].abs().sum() > 0 for n in aux_params)


def test_loss_values_keep_the_loss_rule_and_eval_is_lm_only():
    model = moe_model()
    ids = batch()
    out = model(ids, labels=ids)
    expected = out.lm_loss + 0.1 * out.aux_loss + 0.05 * out.z_loss + 0.02 * out.seq_aux_loss
    torch.testing.assert_close(out.loss, expected)
    model.eval()
    out = model(ids, labels=ids)
    assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)
    # eval: the LM gradient only, nothing attached
    assert grads(model.train(), model.eval()(ids, labels=ids).loss)


def test_each_aux_term_gradient_matches_its_definition():
    """Gradient of our loss = gradient of (LM + Σ coef · term) computed by hand from the reported terms."""
    model = moe_model()
    ids = batch()
    out = model(ids, labels=ids)
    ours = grads(model, out.loss)
    model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
    model.config.router_seq_aux_loss_coef = 0.0  # nothing attached: the terms' graphs are plain tensors now
    ref_out = model(ids, labels=ids)
    manual = ref_out.lm_loss + 0.1 * ref_out.aux_loss + 0.05 * ref_out.z_loss + 0.02 * ref_out.seq_aux_loss
    assert_same_grads(ours, grads(model, manual))


# ---- gradient accumulation ---------------------------------------------------------------------------------


def _accumulated(model, ids, steps: int) -> dict[str, torch.Tensor]:
    """What Trainer does with num_items_in_batch: one backward per micro-batch of the model's own loss, no
    division, the micro-batch weight 1 / steps (the README's rule for such a loop)."""
    total = int((ids[:, 1:] != -100).sum())
    acc: dict[str, torch.Tensor] = {}
    model.set_aux_loss_scale(1.0 / steps)
    for micro in ids.chunk(steps):
        g = grads(model, model(micro, labels=micro, num_items_in_batch=torch.tensor(total)).loss)
        for n, v in g.items():
            acc[n] = acc[n] + v if n in acc else v
    model.set_aux_loss_scale(1.0)
    return acc


@pytest.mark.parametrize("term", ["z", "indexer"])
def test_token_additive_terms_give_the_same_gradient_for_any_accumulation(term):
    """LM, z-loss and indexer KL add over tokens: GA 1, 2, 4 on the same 8 equal-length sequences give the
    same gradients (the review measured z-loss gradients 0.55 / 1.10 / 2.21)."""
    if term == "z":
        model = moe_model(router_aux_loss_coef=0.0, router_seq_aux_loss_coef=0.0, router_z_loss_coef=0.5)
    else:
        model = dsa_model(index_loss_coef=1.0)
    ids = batch(n=8)
    one = _accumulated(model, ids, 1)
    for steps in (2, 4):
        assert_same_grads(_accumulated(model, ids, steps), one, atol=1e-6, rtol=1e-4)


def test_switch_balance_loss_does_not_grow_with_micro_batches():
    """The Switch loss is per micro-batch (a product of means): identical micro-batches give the GA-1
    gradient."""
    model = moe_model(router_z_loss_coef=0.0, router_seq_aux_loss_coef=0.0, router_aux_loss_coef=1.0)
    ids = batch(n=2).repeat(4, 1)
    router = [n for n, _ in model.named_parameters() if "router" in n]
    one = _accumulated(model, ids[:2], 1)
    four = _accumulated(model, ids, 4)
    for name in router:
        torch.testing.assert_close(four[name], one[name], atol=1e-6, rtol=1e-4)


# ---- router logits / attentions in the backbone's output ---------------------------------------------------


def test_router_logits_come_from_the_backbone_output():
    model = moe_model().eval()
    ids = batch(n=2, t=6)
    out = model.model(ids, output_router_logits=True)
    n_moe = sum(m == "moe" for m in model.config.mlp_types)
    assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (12, 4)
    assert out.router_logits[0].dtype == torch.float32
    head = model(ids, output_router_logits=True)
    for a, b in zip(head.router_logits, out.router_logits):
        torch.testing.assert_close(a, b)
    assert model.model(ids).router_logits is None
    dense = build("tiny-attention").eval()
    assert dense.model(ids, output_router_logits=True).router_logits is None  # never taken for an MoE


def test_a_caller_building_a_balance_loss_from_router_logits_counts_nothing_twice():
    """TRL's fused head asks the backbone for router logits and adds Mixtral's balance loss computed from
    them; a custom loop adds ``coef · outputs.aux_loss``. The attached terms are the model's, counted once:
    the router logits and terms come back detached, so those additions change the loss value, not the
    gradient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = moe_model()
    ids = batch()
    out = model.model(ids, output_router_logits=True)
    assert not any(r.requires_grad for r in out.router_logits)
    assert not any(v.requires_grad for v in out.aux_terms.values())
    lm = F.cross_entropy(model.lm_head(out.last_hidden_state)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    mixtral = load_balancing_loss_func(out.router_logits, 4, 2, None)
    got = grads(model, lm + 0.1 * mixtral + 0.1 * out.aux_terms["router_aux_loss"])
    expected = grads(model, model(ids, labels=ids).loss)  # our head: LM + every term, once
    assert_same_grads(got, expected)


def test_output_attentions_eager_returns_weights_and_other_backends_refuse():
    model = build("tiny-hybrid", attn="eager").eval()  # 3 GDN : 1 attention
    ids = batch(n=2, t=7)
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 4 and len(out.hidden_states) == 5
    assert [a is None for a in out.attentions] == [m != "attention" for m in model.config.mixer_types]
    probs = out.attentions[3]
    assert probs.shape == (2, 4, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
    assert probs[..., 0, 1:].abs().max() == 0  # causal
    mla = build("tiny-mla", attn="eager").eval()
    assert mla(ids, output_attentions=True).attentions[0].shape == (2, 4, 7, 7)
    sdpa = build("tiny-hybrid", attn="sdpa").eval()
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*layers 3 \(attention\).*eager"):
        sdpa(ids, output_attentions=True)
    assert sdpa(ids, output_hidden_states=True).hidden_states is not None


# ---- packed input given as cu_seq_lens only; no dense mask for sparse DSA ----------------------------------


@pytest.mark.parametrize("name", ["tiny-attention", "tiny-mla", "tiny-dsa", "tiny-hybrid"])
def test_packed_with_cu_seq_lens_only_equals_each_document_alone(name):
    model = build(name, index_topk=4).eval() if name == "tiny-dsa" else build(name).eval()
    docs = [torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 7)]
    cu = torch.tensor([0, 9, 14, 21], dtype=torch.int32)
    with torch.no_grad():
        packed = model(
            torch.cat(docs)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
        )
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed.logits[0], alone, atol=1e-5, rtol=0)


def test_sparse_dsa_builds_no_dense_mask(monkeypatch):
    """Sparse DSA attends over its selection only: with left padding (the case where sdpa would materialise a
    [B, 1, T, S] mask) the causal-mask builder is never called, and the padded rows still equal their prompts
    alone."""
    calls = []
    original = modeling.create_causal_mask

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "create_causal_mask", spy)
    model = build("tiny-dsa", index_topk=4).eval()
    ids = batch(n=2, t=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
    assert not calls
    torch.testing.assert_close(out[1, 4:], alone[0], atol=1e-5, rtol=0)
    build("tiny-dsa", dsa_mode="dense").eval()(ids, attention_mask=mask)
    assert calls  # dense mode attends densely and needs it


# ---- gradient checkpointing --------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["moe", "dsa"])
def test_checkpointing_keeps_aux_gradients_and_counts(kind, reentrant):
    model = moe_model() if kind == "moe" else dsa_model()
    ids = batch()
    plain = grads(model, model(ids, labels=ids).loss)
    routers = [m.router for m in model.modules() if isinstance(m, HybridMoE)]
    for r in routers:
        r.pending_counts = None
    model(ids, labels=ids).loss.backward()
    counts = [r.pending_counts.clone() for r in routers]
    model.zero_grad()
    for r in routers:
        r.pending_counts = None
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model(ids, labels=ids).loss.backward()  # (reentrant checkpointing supports .backward() only, not .grad())
    checkpointed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_same_grads(checkpointed, plain, atol=1e-6, rtol=1e-4)
    for r, c in zip(routers, counts):  # the backward replays each layer: token counts must not double
        torch.testing.assert_close(r.pending_counts, c)


def test_reentrant_checkpointing_refuses_dsa_dense_warmup_clearly():
    from hf_hybrid.convert.dsa import freeze_all_but_indexers

    model = dsa_model(dsa_mode="dense_warmup")
    freeze_all_but_indexers(model)
    ids = batch()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(
        ValueError, match="use_reentrant=True cannot train DSA's dense warm-up.*use_reentrant': False"
    ):
        model(ids, labels=ids)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.indexer_loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".indexer." in n)


# ---- output_mixer_io: what a layer's mixer saw and produced, as an output (no forward hooks) ---------------


def test_output_mixer_io_returns_each_layers_mixer_input_context_and_output():
    model = build("tiny-hybrid").eval()
    ids = batch(n=2, t=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model.model(
            ids, attention_mask=mask, use_cache=False, output_hidden_states=True, output_mixer_io=[1, 3]
        )
        assert sorted(out.mixer_io) == [1, 3]
        for i, (x, ctx, y) in out.mixer_io.items():
            layer = model.model.layers[i]
            torch.testing.assert_close(x, layer.input_layernorm(out.hidden_states[i]), atol=0, rtol=0)
            torch.testing.assert_close(layer.mixer(x, ctx), y, atol=1e-6, rtol=0)
        plain = model.model(ids, attention_mask=mask)
    assert plain.mixer_io is None
    torch.testing.assert_close(plain.last_hidden_state, out.last_hidden_state, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"output_mixer_io=\[1, 9\]: \[9\] are not layer indices \(0\.\.3\)"):
        model.model(ids, output_mixer_io=[1, 9])


# ---- a client-built loss under Trainer's gradient accumulation ---------------------------------------------


class _LogitsLossTrainer:
    """A Trainer whose loss the client builds from the logits (as TRL's DPO does): Trainer divides it by the
    accumulation steps, and no probe sees it."""

    @staticmethod
    def make(model, tmp_path, steps: int, batch: int):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        captured = {}

        class Capture(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                captured.update(
                    {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                )

        class LogitsLoss(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                ids = inputs["input_ids"]
                logits = model(input_ids=ids).logits
                return F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
                )

        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{steps}"),
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=steps,
            learning_rate=0.0,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_drop_last=True,
        )
        data = [{"input_ids": row} for row in batch_ids()]
        trainer = LogitsLoss(model=model, args=args, train_dataset=data, callbacks=[Capture()])
        return trainer, captured


def batch_ids():
    return batch(n=4, t=12, seed=3)


@pytest.mark.parametrize("kind", ["moe", "dsa"])
def test_a_client_loss_under_gradient_accumulation_keeps_the_aux_gradients(kind, tmp_path):
    """GA 1 × 4 rows and GA 2 × 2 rows of the same 4 rows give the same router / indexer gradients: Trainer
    divides the client's loss by the accumulation steps, and the attached terms are divided likewise (they
    grew 2× before)."""
    if kind == "moe":
        make = lambda: moe_model(
            router_aux_loss_coef=0.0, router_seq_aux_loss_coef=0.0, router_z_loss_coef=0.5
        )
    else:
        make = lambda: dsa_model(index_loss_coef=1.0)
    grads_by_ga = {}
    for steps, rows in ((1, 4), (2, 2)):
        model = make()
        trainer, captured = _LogitsLossTrainer.make(model, tmp_path, steps, rows)
        trainer.train()
        grads_by_ga[steps] = captured
        assert model._aux_loss_scales == (1.0, 1.0)  # restored after each step
    aux = [n for n in grads_by_ga[1] if ("router" in n if kind == "moe" else ".indexer." in n)]
    assert aux and all(grads_by_ga[1][n].abs().sum() > 0 for n in aux)
    assert_same_grads(grads_by_ga[2], grads_by_ga[1], atol=1e-6, rtol=1e-4)


def test_set_aux_loss_scale_scales_the_attached_gradient_of_a_client_loss():
    model = moe_model(router_aux_loss_coef=0.0, router_seq_aux_loss_coef=0.0, router_z_loss_coef=0.5)
    ids = batch()
    router = [n for n, _ in model.named_parameters() if n.endswith("router.weight")]
    one = grads(model, model.model(ids).last_hidden_state.sum() * 0)  # the attached z-loss alone reaches them
    assert model.set_aux_loss_scale(0.25) == 1.0
    quarter = grads(model, model.model(ids).last_hidden_state.sum() * 0)
    for name in router:
        torch.testing.assert_close(quarter[name], 0.25 * one[name])
    with pytest.raises(ValueError, match=r"value=0 must be a positive number"):
        model.set_aux_loss_scale(0)
