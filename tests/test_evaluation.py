"""hf_hybrid.evaluation (generation agreement, KL to the source, per-document bits/byte) and the
document-aligned training rows of hf_hybrid.data, on tiny models with a byte tokenizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_hybrid import HybridForCausalLM
from hf_hybrid.data import (
    PackedDocuments,
    byte_tokenizer,
    collate_packed,
    split_documents,
)
from hf_hybrid.evaluation import (
    ConversionEval,
    agreement_lengths,
    compare_generations,
    document_bits_per_byte,
    first_line,
    greedy_continuations,
    heldout_lines,
    heldout_prompts,
    kl_to_source,
)

TEXT = [
    "Ber.\nWho's there?\n\nFran.\nNay, answer me: stand, and unfold yourself.\n\nBer.\nLong live the King!\n"
    "\nFran.\nBernardo?\n\nBer.\nHe.\n\nFran.\nYou come most carefully upon your hour.\n",
    "Mira.\nIf by your art, my dearest father, you have\nPut the wild waters in this roar, allay them.\n"
    "\nPros.\nBe collected:\nNo more amazement: tell your piteous heart\nThere's no harm done.\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper next-token distributions than the init's, so greedy paths are not ties
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def hybrid(tokenizer):
    # module-scoped fixtures cannot use the function-scoped tiny_config factory: build the preset here
    from hf_hybrid.presets import preset_config

    torch.manual_seed(0)
    config = preset_config("tiny-hybrid", vocab_size=len(tokenizer))
    return HybridForCausalLM(config).eval()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return other


# ---- pieces ------------------------------------------------------------------------------------------------


def test_agreement_counts_tokens_until_the_first_divergence():
    ref = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1]])
    cand = torch.tensor([[5, 6, 0, 8, 9], [1, 2, 3, 4, 5], [2, 1, 1, 1, 1]])
    # row 0 diverges at index 2 (equal again later: not counted), row 1 never, row 2 at once
    assert agreement_lengths(ref, cand).tolist() == [2, 5, 0]


def test_compare_generations_by_hand(tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ref = torch.tensor([enc("ab\ncdef"), enc("xyz\nuvw"), enc("hello!!")])
    cand = torch.tensor([enc("ab\ncdXX"), enc("xyZ\nuvw"), enc("hello!!")])
    out = compare_generations(ref, cand, tokenizer)
    assert out["agreement_tokens"] == pytest.approx((5 + 2 + 7) / 3)
    assert out["agreement_fraction"] == pytest.approx((5 + 2 + 7) / 21)
    assert out["full_agreement"] == pytest.approx(1 / 3)
    # next line: "ab\n" equal, "xyz\n" vs "xyZ\n" not, "hello!!" (no newline: the whole text) equal
    assert out["next_line_match"] == pytest.approx(2 / 3)
    assert first_line("a\nb") == "a\n" and first_line("ab") == "ab"
    with pytest.raises(ValueError, match="one shape"):
        agreement_lengths(ref, cand[:, :3])


def test_heldout_prompts_and_lines_are_deterministic_and_end_at_a_line():
    pairs = heldout_prompts(TEXT, 5, prompt_lines=3)
    assert len(pairs) == 5 and pairs == heldout_prompts(TEXT, 5, prompt_lines=3)
    for prompt, nxt in pairs:
        assert prompt.endswith("\n") and prompt.count("\n") == 3 and nxt.strip() and "\n" not in nxt
    lines = heldout_lines(TEXT, None)
    assert lines[:3] == ["Ber.", "Who's there?", "Fran."] and all(lines)
    assert heldout_lines(TEXT, 4) == [lines[(i * len(lines)) // 4] for i in range(4)]
    with pytest.raises(ValueError, match="prompt_lines"):
        heldout_prompts(TEXT, 4, prompt_lines=0)


# ---- KL and bits/byte against naive references -------------------------------------------------------------


def test_kl_to_source_matches_a_naive_loop(llama):
    other = perturbed(llama)
    torch.manual_seed(3)
    blocks = torch.randint(1, 257, (3, 12))
    got = kl_to_source(llama, other, blocks, batch_size=2)
    terms = []
    with torch.no_grad():
        for row in blocks:
            p = llama(input_ids=row[None]).logits[0].double().softmax(-1)
            q = other(input_ids=row[None]).logits[0].double().softmax(-1)
            for t in range(row.numel() - 1):
                terms.append(float(sum(p[t, v] * math.log(p[t, v] / q[t, v]) for v in range(p.shape[1]))))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-4)  # fp32 log-softmax against fp64 sums
    assert got > 0 and kl_to_source(llama, llama, blocks) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("which", ["llama", "hybrid"])
def test_document_bits_per_byte_equals_the_naive_sum(which, request, tokenizer):
    model = request.getfixturevalue(which)
    docs = ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "He.", "é—ß"]  # multi-byte chars
    got = document_bits_per_byte(model, tokenizer, docs, batch_size=3)  # a padded batch, then a lone doc
    bits, first = 0.0, 0.0
    with torch.no_grad():
        for doc in docs:
            ids = [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                bits -= float(logp[t - 1, ids[t]]) / math.log(2)
                first -= float(logp[t - 1, ids[t]]) / math.log(2) if t <= 16 else 0.0
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["bytes"] == n_bytes and n_bytes > sum(map(len, docs))
    assert got["bits_per_byte"] == pytest.approx(bits / n_bytes, rel=1e-5)  # fp32 model, fp64 reference
    assert got["bits_per_byte_first16"] == pytest.approx(first / n_bytes, rel=1e-5)
    assert got["tokens"] == sum(len(tokenizer(d)["input_ids"]) for d in docs)


# ---- the whole evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "hybrid"])
def test_identical_models_agree_fully_and_a_perturbed_one_less(which, request, tokenizer):
    model = request.getfixturevalue(which)
    blocks = torch.tensor([list(TEXT[0].encode())[:24], list(TEXT[1].encode())[:24]])
    ev = ConversionEval(model, tokenizer, TEXT, blocks, num_prompts=6, prompt_lines=3, max_new_tokens=12)
    same = ev.measure(copy.deepcopy(model))
    assert same["agreement_fraction"] == 1.0 and same["agreement_tokens"] == 12.0
    assert same["next_line_match"] == 1.0 and same["full_agreement"] == 1.0
    assert same["kl_to_source"] == pytest.approx(0.0, abs=1e-6)
    assert same["doc_bits_per_byte"] == pytest.approx(ev.source_metrics()["doc_bits_per_byte"], rel=1e-6)
    worse = ev.measure(perturbed(model, scale=0.5))
    assert 0.0 <= worse["agreement_fraction"] < 1.0 and 0.0 <= worse["next_line_match"] <= 1.0
    assert worse["kl_to_source"] > 1e-3


def test_greedy_continuations_use_the_cache_and_left_padding(hybrid, tokenizer):
    """Batched, left-padded generate() gives each prompt's own greedy continuation (computed one token at a
    time without a cache)."""
    prompts = ["Ber.\nWho", "Fran.\nNay, answer me:\n"]
    got = greedy_continuations(hybrid, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    for row, prompt in enumerate(prompts):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(hybrid(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert got[row].tolist() == ids[-6:]


# ---- document-aligned training rows ------------------------------------------------------------------------


def test_from_recipe_reads_the_eval_section_and_measure_all_adds_perplexity(llama, tokenizer):
    """``ConversionEval.from_recipe``: the recipe's YAML names over the class's defaults; ``measure_all``: the
    held-out perplexity beside the judged metrics (the source's own, or against the source)."""
    from hf_hybrid.data import PackedBlocks
    from hf_hybrid.evaluation import RECIPE_EVAL_KEYS
    from hf_hybrid.training import evaluate_perplexity

    blocks = PackedBlocks(tokenizer("".join(TEXT), add_special_tokens=False)["input_ids"], 32)
    cfg = {"prompts": "3", "lines": None, "batch_size": 2, "unrelated": 1}
    ev = ConversionEval.from_recipe(llama, tokenizer, TEXT, blocks.blocks, cfg, kl_batch_size=3)
    default = ConversionEval(llama, tokenizer, TEXT)
    assert (ev.num_prompts, ev.max_lines, ev.batch_size, ev.kl_batch_size) == (3, None, 2, 3)
    assert (ev.prompt_lines, ev.max_new_tokens) == (default.prompt_lines, default.max_new_tokens)
    assert set(RECIPE_EVAL_KEYS.values()) <= set(ConversionEval.__dataclass_fields__)
    ppl = evaluate_perplexity(llama, blocks, batch_size=2)
    source = ev.measure_all(llama, blocks, batch_size=2, is_source=True)
    assert source == {"eval_loss": ppl["loss"], "eval_perplexity": ppl["perplexity"], **ev.source_metrics()}
    other = perturbed(llama)
    judged = ev.measure_all(other, blocks, batch_size=2)
    assert judged["kl_to_source"] > 0 and judged["eval_loss"] != ppl["loss"]


def test_packed_documents_rows_by_hand():
    ds = PackedDocuments([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]], 6, start_id=0, pad_id=99)
    assert ds.blocks.tolist() == [
        [0, 1, 2, 3, 99, 99],  # [4, 5] (3 with its start) does not fit the 2 left: padding
        [0, 4, 5, 99, 99, 99],  # the 8-token document starts a row and is cut at 6
        [0, 6, 7, 8, 9, 10],
        [11, 12, 99, 99, 99, 99],
    ]
    assert ds.position_ids.tolist()[0] == [0, 1, 2, 3, 0, 1]
    assert ds.labels.tolist()[0] == [-100, 1, 2, 3, -100, -100]
    assert ds.labels.tolist()[3] == [-100, 12, -100, -100, -100, -100]
    assert ds.num_documents == 3 and ds.num_predicted == 3 + 2 + 5 + 1
    batch = collate_packed([ds[0], ds[1]])
    assert batch["input_ids"].shape == (1, 12) and batch["position_ids"][0, 6].item() == 0
    assert split_documents(["a\nb\n\n\nc d\n  \ne\n"], "paragraph") == ["a\nb", "c d", "e"]
    assert split_documents(["a\n\nb "], "line") == ["a", "b"]
    with pytest.raises(ValueError, match="document unit 'word'"):
        split_documents(["a"], "word")


def test_a_packed_row_scores_each_document_as_if_alone(hybrid, tokenizer):
    """A collated batch of packed rows gives every document the logits it has alone (no attention or
    recurrent state across a boundary): the LM loss of the packed batch equals the documents' own."""
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in ("Who's there?", "He.", "Bernardo?")]
    ds = PackedDocuments(docs, 20, start_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id)
    batch = collate_packed([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = hybrid(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        # 13 + 4 tokens in the first row (3 of padding), the 10-token document starts the second
        for doc, start in zip(docs, (0, 13, 20), strict=True):
            ids = torch.tensor([[tokenizer.bos_token_id, *doc]])
            alone = hybrid(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[start : start + ids.shape[1]], alone, atol=1e-5, rtol=1e-4)
