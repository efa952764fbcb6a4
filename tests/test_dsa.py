"""DeepSeek Sparse Attention in the model (issue 6): exactness, decoding, padding/packing, training modes.

Op-level parity (naive dense-masked vs gathered torch path vs Triton, exact streaming top-k, KL losses) is in
tests/ops/. Tolerance: fp32 1e-5 absolute (same maths, different summation order: latent MQA vs expanded
heads).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridCache, HybridConfig, HybridForCausalLM
from hf_hybrid.mixers.dsa import structured_indices

ATOL = 1e-5

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    index_n_heads=2,
    index_head_dim=8,
    dsa_local_window=2,
    dsa_global_tokens=1,
)
BASES = ["mla", "attention"]


def dsa_config(base: str, **overrides) -> HybridConfig:
    kwargs = dict(COMMON, mixer_types=["dsa", "dsa"], dsa_base=base, index_topk=4)
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def dense_twin(model: HybridForCausalLM, base: str) -> HybridForCausalLM:
    """The same weights without indexers, as the dense base mixer."""
    dense = HybridForCausalLM(HybridConfig(**COMMON, mixer_types=[base] * 2)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".indexer." not in k}
    dense.load_state_dict(state, strict=True)
    return dense


def build(base: str, seed: int = 0, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    return HybridForCausalLM(dsa_config(base, **overrides)).eval()


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("selector", ["indexer", "structured"])
def test_topk_at_least_sequence_length_equals_dense_base_exactly(base, selector):
    model = build(base, index_topk=64, dsa_selector=selector)
    dense = dense_twin(model, base)
    ids = torch.randint(0, 64, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding must be excluded from the selection too
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = dense(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_small_topk_really_differs_from_dense(base):
    model = build(base, index_topk=3)
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        diff = (model(ids).logits - dense_twin(model, base)(ids).logits).abs()
    assert diff[0, :3].max() < ATOL  # the first 3 queries see at most 3 keys: nothing dropped
    assert diff[0, 8:].max() > 1e-3


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("selector", ["indexer", "structured"])
def test_prefill_plus_cached_decode_equals_full_forward(base, selector):
    model = build(base, dsa_selector=selector)
    ids = torch.randint(0, 64, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = HybridCache(config=model.config)
        steps = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, 14):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)
    layer = cache.layers[0]
    assert layer.indexer_keys.shape == (2, 14, COMMON["index_head_dim"])


@pytest.mark.parametrize("base", BASES)
def test_left_padded_row_equals_alone_and_generation(base):
    model = build(base)
    seqs = [torch.randint(1, 64, (n,)) for n in (10, 6)]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 10 - len(s) :], mask[i, 10 - len(s) :] = s, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            torch.testing.assert_close(batch[i][mask[i].bool()], model(s[None]).logits[0], atol=ATOL, rtol=0)
    model.generation_config.pad_token_id = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=5, do_sample=False)
        assert out[i, 10:].tolist() == alone[0, len(s) :].tolist()


@pytest.mark.parametrize("base", BASES)
def test_packed_documents_do_not_see_each_other(base):
    model = build(base)
    seqs = [torch.randint(1, 64, (n,)) for n in (9, 5, 7)]
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(packed_ids, position_ids=position_ids).logits[0]
        alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_dense_warmup_loss_is_indexer_kl_and_only_the_indexer_learns(base):
    model = build(base, dsa_mode="dense_warmup").train()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, labels=ids)
    assert out.indexer_loss is not None and torch.equal(out.loss, out.indexer_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (".indexer." in name), name
    # Dense warm-up attends densely: outputs equal the dense base.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_twin(model, base)(ids).logits, atol=ATOL, rtol=0)
    assert model(ids, labels=ids).loss.item() == pytest.approx(model(ids, labels=ids).lm_loss.item())


@pytest.mark.parametrize("base", BASES)
def test_sparse_training_lm_loss_sends_no_gradient_into_the_indexer(base):
    # index_loss_coef=0: the KL is still reported but not attached to the layers, so out.lm_loss is the LM
    # term alone
    model = build(base, dsa_mode="sparse", index_loss_coef=0.0).train()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, labels=ids)
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    rest = [p for n, p in model.named_parameters() if ".indexer." not in n]
    lm_grads = torch.autograd.grad(out.lm_loss, indexer + rest, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in lm_grads[: len(indexer)])
    assert any(g is not None and g.abs().sum() > 0 for g in lm_grads[len(indexer) :])
    kl_grads = torch.autograd.grad(out.indexer_loss, indexer + rest, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in kl_grads[: len(indexer)])
    assert all(g is None or g.abs().sum() == 0 for g in kl_grads[len(indexer) :])
    # with a coefficient the KL reaches the indexer through our loss (labels), or attached to the layers when
    # the client builds the loss from the logits (hf_hybrid/aux_loss.py) — 0.5 × its gradient either way
    model.config.index_loss_coef = 0.5
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.indexer_loss)
    via_loss = torch.autograd.grad(out.loss, indexer, allow_unused=True, retain_graph=True)
    kl = torch.autograd.grad(out.indexer_loss, indexer, allow_unused=True)
    logits = model(ids).logits
    own = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    via_client = torch.autograd.grad(own, indexer, allow_unused=True)
    for g, c, k in zip(via_loss, via_client, kl):
        if k is not None:
            torch.testing.assert_close(g, 0.5 * k)
            torch.testing.assert_close(c, 0.5 * k)


def test_decode_attends_to_k_tokens_not_the_whole_context(monkeypatch):
    import hf_hybrid.mixers.dsa as dsa_module

    widths = []
    original = dsa_module.sparse_attention

    def spy(q, k, v, idx, **kwargs):
        widths.append((idx.shape[-1], int((idx >= 0).sum(-1).max())))
        return original(q, k, v, idx, **kwargs)

    monkeypatch.setattr(dsa_module, "sparse_attention", spy)
    model = build("mla", index_topk=4)
    ids = torch.randint(0, 64, (1, 40))
    cache = HybridCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :39], past_key_values=cache, use_cache=True)
        widths.clear()
        model(ids[:, 39:], past_key_values=cache, use_cache=True)
    assert widths and all(w == (4, 4) for w in widths)


def test_mla_decode_reads_k_latent_rows_not_a_copy_of_the_cache():
    """A DSA-on-MLA decode step gathers the k selected latent rows; it used to concatenate the whole [c_kv,
    k_pe] history (S·(r + dr) per layer per token) every step. Every tensor an op creates during the step is
    recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widest = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.dim() >= 2:
                    self.widest.append((o.numel(), o.shape[-1], str(func)))
            return out

    model = build("mla", index_topk=4)
    s, r, dr = 200, COMMON["kv_lora_rank"], COMMON["qk_rope_head_dim"]
    ids = torch.randint(0, 64, (1, s + 1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = HybridCache(config=model.config)
        model(ids[:, :s], past_key_values=cache, use_cache=True)
        with Sizes() as sizes:
            step = model(ids[:, s:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)
    copies = [x for x in sizes.widest if x[1] == r + dr and x[0] >= s * (r + dr)]
    assert not copies, f"decode built latent tensors of the whole history: {copies[:3]}"


def test_structured_selector_keeps_anchors_window_and_strides():
    idx = structured_indices(1, 1, 99, None, topk=10, window=4, anchors=2, device=torch.device("cpu"))[0, 0]
    kept = sorted(i for i in idx.tolist() if i >= 0)
    assert kept[:2] == [0, 1] and kept[-4:] == [96, 97, 98, 99]
    assert len(kept) == len(set(kept)) == 10 and all(0 <= i <= 99 for i in kept)
    middle = kept[2:-4]
    assert all(2 <= i < 96 for i in middle) and len(middle) == 4
    early = structured_indices(1, 3, 0, None, topk=10, window=4, anchors=2, device=torch.device("cpu"))[0]
    for t, row in enumerate(early.tolist()):
        assert sorted(i for i in row if i >= 0) == list(range(t + 1))  # causal, nothing from the future


def test_save_load_and_config_errors(tmp_path):
    model = build("mla")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(Exception, match=r"index_topk=0 must be a positive integer"):
        dsa_config("mla", index_topk=0)
    with pytest.raises(
        Exception,
        match=r"dsa_mode='warm' is not allowed; choose one of: sparse, "
        r"dense_warmup, dense",
    ):
        dsa_config("mla", dsa_mode="warm")


# ---- run-time modes: model.dsa_mode(...) switches the layers, never the config -----------------------------


def same_weights(model: HybridForCausalLM, **config_overrides) -> HybridForCausalLM:
    """A model built with ``config_overrides`` holding ``model``'s weights (the config-time twin of a run-time
    mode)."""
    twin = HybridForCausalLM(HybridConfig.from_dict({**model.config.to_dict(), **config_overrides})).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


@pytest.mark.parametrize("base", BASES)
def test_runtime_mode_equals_the_config_twin_and_leaves_the_config_alone(base, tmp_path):
    model = build(base, dsa_mode="dense", index_topk=6)
    ids = torch.randint(1, 64, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with model.dsa_mode("sparse", index_topk=3) as switch:
            assert {m.mode for m in switch.layers} == {"sparse"} and {m.topk for m in switch.layers} == {3}
            sparse = model(ids, attention_mask=mask).logits
            model.save_pretrained(tmp_path / "saved")
        back = model(ids, attention_mask=mask).logits
        twin = same_weights(model, dsa_mode="sparse", index_topk=3)(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(sparse[real], twin[real], atol=ATOL, rtol=0)
    assert (sparse[real] - dense[real]).abs().max() > 1e-3  # k=3 of 16 really cuts attention
    torch.testing.assert_close(back, dense, atol=0, rtol=0)  # the context manager restored dense mode
    assert (model.config.dsa_mode, model.config.index_topk) == ("dense", 6)
    saved = HybridConfig.from_pretrained(tmp_path / "saved")
    assert (saved.dsa_mode, saved.index_topk) == ("dense", 6)  # what the user chose, not the run-time mode


@pytest.mark.parametrize("base", BASES)
def test_runtime_dense_mode_on_a_sparse_config_gets_its_causal_mask(base, monkeypatch):
    """A sparse config builds no dense mask; switched to dense at run time the layers read one again (without
    it eager attention would see the future), so padded rows still equal their prompts alone."""
    from hf_hybrid import modeling_hybrid as modeling

    calls = []
    original = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build(base, dsa_mode="sparse", index_topk=3)
    model.config._attn_implementation = "eager"
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert not calls
        model.dsa_mode("dense")
        out = model(ids, attention_mask=mask).logits
        assert calls
        twin = same_weights(model, dsa_mode="dense")
        twin.config._attn_implementation = "eager"
        torch.testing.assert_close(out, twin(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1, 4:], model(ids[1:, 4:]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_runtime_dense_warmup_follows_the_loss_rule(base):
    model = build(base, dsa_mode="dense").train()
    ids = torch.randint(0, 64, (2, 12))
    assert model(ids, labels=ids).indexer_loss is None
    for name in ("dense_warmup", "warmup"):
        with model.dsa_mode(name):
            out = model(ids, labels=ids)
            assert out.indexer_loss is not None and torch.equal(out.loss, out.indexer_loss)
    out = model(ids, labels=ids)
    assert out.indexer_loss is None and torch.equal(out.loss, out.lm_loss)


def test_runtime_mode_errors_name_the_value():
    model = build("mla")
    with pytest.raises(
        ValueError,
        match=r"dsa_mode='warm' is not allowed; choose one of: sparse, "
        r"dense_warmup, dense",
    ):
        model.dsa_mode("warm")
    with pytest.raises(ValueError, match=r"index_topk=0 must be a positive integer"):
        model.dsa_mode("sparse", index_topk=0)
    dense = HybridForCausalLM(HybridConfig(**COMMON, mixer_types=["mla", "mla"]))
    with pytest.raises(ValueError, match=r"HybridForCausalLM has no DSA layers"):
        dense.dsa_mode("sparse")


@pytest.mark.parametrize("base", BASES)
def test_indexer_kl_gradient_with_shared_layers_matches_its_definition(base):
    """Layers marked "shared" have no indexer and record no KL: the attached gradient averages over the layers
    that do, like the reported ``indexer_loss`` (gradient of ``loss`` = gradient of LM + coef · indexer_loss
    by hand)."""
    model = build(
        base,
        num_hidden_layers=3,
        mixer_types=["dsa"] * 3,
        dsa_indexer_types=["full", "shared", "full"],
        index_loss_coef=0.5,
    ).train()
    ids = torch.randint(0, 64, (2, 12))
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(model(ids, labels=ids).loss, params, allow_unused=True)
    model.config.index_loss_coef = 0.0  # nothing attached now: the KL's graph is a plain tensor
    ref = model(ids, labels=ids)
    manual = torch.autograd.grad(ref.lm_loss + 0.5 * ref.indexer_loss, params, allow_unused=True)
    for a, b in zip(ours, manual):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ties_at_topk_cut_matches_the_definition():
    """The public tie check: a row is tied when its k-th and (k+1)-th best visible scores are equal (brute
    force over rows with exact zeros, -0.0, -inf and short rows)."""
    from hf_hybrid.ops.dsa import ties_at_topk_cut

    gen = torch.Generator().manual_seed(0)
    scores = torch.relu(torch.randn(64, 9, generator=gen)).round(decimals=1)  # many exact ties
    scores[::5, -3:] = float("-inf")  # rows with few visible keys
    scores[3] = torch.tensor([0.0, -0.0, 1.0, 2.0, 0.5, float("-inf"), 3.0, 4.0, 5.0])
    for k in (1, 3, 5, 9, 12):
        got = ties_at_topk_cut(scores, k)
        for r, row in enumerate(scores.tolist()):
            visible = sorted((x for x in row if x != float("-inf")), reverse=True)
            want = len(visible) > k and visible[k - 1] == visible[k]
            assert bool(got[r]) == want, (k, r, row)


@pytest.mark.parametrize("base", BASES)
def test_index_ties_finds_the_tied_queries(base):
    """``index_ties`` reports (layer, row, query) where the selection depends on tie-breaking: none when k
    covers the context, every query past k when the indexer scores are all zero (its weights zeroed). (A
    random model at init has ties too: with 2 indexer heads, ReLU zeros at the cut are common.)"""
    from hf_hybrid.mixers.dsa import index_ties

    model = build(base)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with model.dsa_mode("sparse", index_topk=10):
        assert index_ties(model, input_ids=ids, attention_mask=mask) == []
    with torch.no_grad():
        model.model.layers[1].mixer.indexer.weights_proj.weight.zero_()
    ties = [t for t in index_ties(model, input_ids=ids, attention_mask=mask) if t[0] == 1]
    # k = 4: row 0 has queries 4..9 with > 4 visible keys, row 1 (first real token 3) queries 7..9
    assert ties == [(1, 0, t) for t in range(4, 10)] + [(1, 1, t) for t in range(7, 10)]
    assert all(not hasattr(m, "_select") or "_select" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("shared", [False, True])
def test_dense_dispatch_at_topk_ge_keys_equals_the_sparse_path_with_gradients(base, shared, monkeypatch):
    """With index_topk >= S every query's selection holds all the keys it may see, so sparse mode runs dense
    attention through SDPA instead of the gather path. Forward, every gradient and the indexer loss (still
    computed on the selection) equal the sparse path's, with left padding. fp32: only the summation order
    differs (SDPA vs the chunked gather), hence 1e-5 / 1e-4 rather than bit equality."""
    from hf_hybrid.mixers import dsa as dsa_mod
    from hf_hybrid.ops.dsa import sparse_attention

    extra = {"dsa_indexer_types": ["full", "shared"]} if shared else {}
    model = build(base, index_topk=64, dsa_mode="sparse", index_loss_coef=0.5, **extra).train()
    ids = torch.randint(0, 64, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    calls = []
    real_dense = dsa_mod.dense_visible_attention
    monkeypatch.setattr(
        dsa_mod, "dense_visible_attention", lambda *a, **k: calls.append(1) or real_dense(*a, **k)
    )
    fast, fast_grads = run()
    assert len(calls) == 2  # both layers dispatched to dense attention

    def sparse_only(self, q, k, v, idx, key_start, ctx):
        return sparse_attention(q, k, v, idx, scale=self.scaling, backend="torch")

    monkeypatch.setattr(dsa_mod._DSAMixin, "_attend_selected", sparse_only)
    ref, ref_grads = run()
    valid = mask.bool()
    torch.testing.assert_close(fast.logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-5)
    for name in ("loss", "lm_loss", "indexer_loss"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    assert fast.indexer_loss > 0 and set(fast_grads) == set(ref_grads)
    assert any(".indexer." in n for n in fast_grads)  # the indexer still learns from its KL
    for name, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_dense_visible_attention_equals_sparse_attention_over_every_visible_key():
    """The op itself against its reference, with GQA, a query offset (chunked prefill) and packed documents
    (key_start), including a query that sees no key (o = 0 in both)."""
    from hf_hybrid.ops.dsa import dense_visible_attention, sparse_attention_naive
    from hf_hybrid.ops.dsa.naive import visible_mask

    torch.manual_seed(0)
    B, T, S, H, Hkv, D, Dv = 2, 5, 9, 4, 2, 8, 6
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, Dv)
    key_start = torch.tensor([[0, 0, 6, 6, 6], [9, 4, 4, 4, 4]])  # row 1, query 0: starts past itself
    visible = visible_mask(T, 0, S, q_offset=4, key_start=key_start, device=q.device)
    keys = torch.arange(S).expand(B, T, S)
    idx = torch.where(visible, keys, -1)
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_args = [x.clone().requires_grad_() for x in (q, k, v)]
    out = dense_visible_attention(*args, scale=0.3, q_offset=4, key_start=key_start)
    ref = sparse_attention_naive(*ref_args, idx, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert out[1, 0].abs().sum() == 0
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, ref_args, grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
