"""DSA indexer pooling (``index_pool_size``, GLM-5-Next's ``index_kpool``): the batched selection against the
per-query spec, against transformers' own ``Glm5NextTextIndexer`` with the same weights, and the test kit's
invariance checks in a mix of its own (cached decode, left padding, packing, save/load, generate, gradients,
cost). Selections are compared as sets of key positions (the order inside a selection is irrelevant to
attention); the model tolerance is fp32 1e-5 as in tests/test_dsa.py."""

from __future__ import annotations

import pytest
import torch

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.mixers.dsa import LightningIndexer, index_ties
from hf_hybrid.ops.dsa import ties_at_topk_cut
from hf_hybrid.ops.dsa.naive import pooled_topk_naive
from hf_hybrid.ops.dsa.pooling import pool_ends, pooled_keys, pooled_scores, pooled_topk
from hf_hybrid.testing import check_layer_kind

HI, DI = 3, 8


def _sets(idx: torch.Tensor) -> list[list[list[int]]]:
    return [[sorted(v for v in row.tolist() if v >= 0) for row in b] for b in idx]


@pytest.mark.parametrize(("pool", "topk", "past"), [(2, 4, 0), (3, 6, 5), (4, 8, 0), (4, 4, 7)])
def test_pooled_topk_equals_the_per_query_spec(pool, topk, past):
    torch.manual_seed(pool * 10 + past)
    B, S = 2, 23
    T = S - past
    q, k, g = torch.randn(B, T, HI, DI), torch.randn(B, S, DI), torch.randn(B, S, DI)
    ape, w = torch.randn(pool, DI), torch.randn(B, T, HI)
    # row 0: two packed documents (the second starts at 9); row 1: left padding of 4
    doc = torch.tensor([[0] * 9 + [9] * (S - 9), [4] * S])
    key_start = doc[:, past:]
    ends = pool_ends(doc, S, pool, batch=B, device=q.device)
    got = pooled_topk(
        q,
        pooled_keys(k, g, ape, ends, pool),
        w,
        ends,
        pool=pool,
        topk=topk,
        q_offset=past,
        key_start=key_start,
    )
    assert got.shape[-1] == (topk // pool) * pool + pool - 1
    want = pooled_topk_naive(q, k, g, ape, w, pool=pool, topk=topk, q_offset=past, key_start=key_start)
    assert _sets(got) == want
    # the selections really are sparse and really pool: a query late in a document skips some pools
    assert any(len(r) < (past + t - int(key_start[0, t]) + 1) for t, r in enumerate(want[0]))


def _glm5_next():
    return pytest.importorskip(
        "transformers.models.glm5_next.modeling_glm5_next", reason="this transformers has no glm5_next"
    )


def test_matches_transformers_glm5_next_indexer_with_the_same_weights():
    mod = _glm5_next()
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig

    pool, topk, hidden, q_rank = 4, 8, 32, 16
    tcfg = Glm5NextTextConfig(
        hidden_size=hidden,
        index_n_heads=HI,
        index_head_dim=DI,
        index_topk=topk,
        q_lora_rank=q_rank,
        index_kpool=pool,
        index_kpool_always_select_tail=True,
    )
    torch.manual_seed(0)
    theirs = mod.Glm5NextTextIndexer(tcfg, 0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours_cfg = HybridConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        num_hidden_layers=1,
        mixer_types=["dsa"],
        index_n_heads=HI,
        index_head_dim=DI,
        index_topk=topk,
        index_pool_size=pool,
        index_norm_eps=1e-6,
    )
    ours = LightningIndexer(ours_cfg, query_dim=q_rank, rope_dim=0).eval()  # GLM-5-Next's indexer: NoPE
    ours.load_state_dict(
        {
            "wq.weight": theirs.wq_b.weight,
            "wk.weight": theirs.wk.weight,
            "k_norm.weight": theirs.k_norm.weight,
            "k_norm.bias": theirs.k_norm.bias,
            "weights_proj.weight": theirs.weights_proj.weight,
            "pool_gate.weight": theirs.index_kpool_compress_gate,
            "pool_ape": theirs.index_kpool_compress_ape,
        }
    )
    B, S = 3, 29
    x, q_res = torch.randn(B, S, hidden), torch.randn(B, S, q_rank)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :6] = False  # left padding: pools start at each row's first real token
    mask[2, :1] = False
    with torch.no_grad():
        want = theirs(x, q_res, mask, None)
        q, kg, w = ours(x, q_res, ctx=None)
        first = mask.long().argmax(-1)
        ends = pool_ends(first[:, None].expand(-1, S), S, pool, batch=B, device=x.device)
        pooled = pooled_keys(*kg.split(DI, dim=-1), ours.pool_ape, ends, pool)
        key_start = first[:, None].expand(-1, S)
        got = pooled_topk(q, pooled, w, ends, pool=pool, topk=topk, q_offset=0, key_start=key_start)
        tied = ties_at_topk_cut(
            pooled_scores(q, pooled, w, ends, q_offset=0, key_start=key_start), topk // pool
        )
    compared = 0
    for b in range(B):
        for t in range(S):
            if not mask[b, t] or tied[b, t]:  # padded queries: transformers selects nothing; ties: any order
                continue
            assert sorted(v for v in got[b, t].tolist() if v >= 0) == sorted(
                v for v in want[b, t].tolist() if v >= 0
            ), (b, t)
            compared += 1
    assert compared > 0.8 * int(mask.sum())


POOLED = {"index_n_heads": 2, "index_head_dim": 8, "index_topk": 4, "index_pool_size": 2}


@pytest.mark.parametrize("base", ["mla", "attention"])
def test_invariance_kit_in_a_mix_of_its_own(base):
    run = check_layer_kind(
        config_overrides=dict(
            POOLED,
            num_hidden_layers=3,
            mixer_types=["dsa", "attention", "dsa"],
            dsa_base=base,
            q_lora_rank=16 if base == "mla" else None,
        )
    )
    assert {"decode", "padding", "packing", "save_load", "generate", "gradients", "cost"} <= set(run)


def test_pooling_changes_the_selection_and_shared_layers_reuse_it():
    def build(pool, **kw):
        torch.manual_seed(0)
        cfg = dict(POOLED, index_pool_size=pool, index_topk=4, **kw)
        return HybridForCausalLM(
            HybridConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=8,
                mixer_types=["dsa", "dsa"],
                **cfg,
            )
        ).eval()

    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        a = build(2)(ids).logits
        b = build(1)(ids).logits
        shared = build(2, dsa_indexer_types=["full", "shared"])
        shared(ids)
    assert (a - b).abs().max() > 1e-4
    assert "pool_gate" not in str(dict(build(1).named_parameters()).keys())
    assert index_ties(shared, input_ids=ids) is not None


def test_config_errors_name_the_field_and_value():
    # (transformers wraps a validator's ValueError in its strict-dataclass error, as in tests/test_dsa.py)
    base = dict(num_hidden_layers=1, mixer_types=["dsa"], hidden_size=32, num_attention_heads=4)
    with pytest.raises(Exception, match=r"index_topk=6 must be a multiple of index_pool_size=4"):
        HybridConfig(**base, index_topk=6, index_pool_size=4)
    with pytest.raises(Exception, match=r"index_pool_size=2 .*dsa_selector='structured'"):
        HybridConfig(**base, index_topk=4, index_pool_size=2, dsa_selector="structured")
    with pytest.raises(Exception, match=r"dsa_mode='dense_warmup' with index_pool_size=2"):
        HybridConfig(**base, index_topk=4, index_pool_size=2, dsa_mode="dense_warmup")
    with pytest.raises(Exception, match=r"index_pool_size=0 must be a positive integer"):
        HybridConfig(**base, index_pool_size=0)
