"""Living with the supported transformers range (5.23 to 5.24): the cache's two names, and no deprecation
noise.

These tests run unchanged on both ends of the range (`.ci/run` runs the suite under each); whatever differs
between the versions is in `hf_hybrid.compat`, and the tests below check its promises from the outside.
"""

from __future__ import annotations

import copy
import logging as std_logging
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_hybrid import HybridForCausalLM, HybridForSequenceClassification, HybridModel, compat
from hf_hybrid.cache import HybridCache

# Every model kind whose cache layers differ: attention KV, GDN conv + recurrent state, MLA latent, DSA
# indexer keys.
KINDS = {
    "gdn-attention-moe": (
        "tiny-hybrid",
        dict(mlp_pattern="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "mla": ("tiny-mla", {}),
    "dsa": ("tiny-dsa", {}),
    "mamba2": ("tiny-mamba2", {}),
}


def _model(tiny_config, kind: str, cls=HybridForCausalLM):
    preset, overrides = KINDS[kind]
    torch.manual_seed(0)
    return cls(tiny_config(preset, vocab_size=96, **overrides)).eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_and_past_key_values_are_the_same_argument(kind, tiny_config):
    model = _model(tiny_config, kind)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefill = model(ids[:, :-1], use_cache=True)
        cache = compat.output_cache(prefill)
        assert isinstance(cache, HybridCache) and cache.get_seq_length() == 8
        twin = copy.deepcopy(cache)
        by_new_name = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        by_old_name = model(ids[:, -1:], past_key_values=twin, use_cache=True).logits[:, -1]
    # fp32 on the same inputs: the two calls run the same code; decode vs full forward differs only by
    # summation order
    assert torch.equal(by_new_name, by_old_name)
    assert (by_new_name - full).abs().max().item() <= 1e-5
    assert cache.get_seq_length() == twin.get_seq_length() == 9  # both names really advanced the cache


def test_the_backbone_and_every_head_take_both_names(tiny_config):
    config = tiny_config("tiny-hybrid", vocab_size=96, num_labels=3, pad_token_id=0)
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    for cls in (HybridModel, HybridForCausalLM, HybridForSequenceClassification):
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():
            cache = compat.output_cache(model(ids[:, :5], use_cache=True))
            new = model(ids[:, 5:], cache=copy.deepcopy(cache), use_cache=True)
            old = model(ids[:, 5:], past_key_values=cache, use_cache=True)
        first = new.last_hidden_state if cls is HybridModel else new.logits
        second = old.last_hidden_state if cls is HybridModel else old.logits
        assert torch.equal(first, second), cls.__name__


def test_two_different_caches_under_both_names_is_an_error(tiny_config):
    model = _model(tiny_config, "gdn-attention-moe")
    ids = torch.randint(0, 96, (1, 4))
    a, b = HybridCache(config=model.config), HybridCache(config=model.config)
    with pytest.raises(ValueError, match=r"both cache= and past_key_values="):
        model(ids, cache=a, past_key_values=b, use_cache=True)
    with pytest.raises(ValueError, match=r"both cache= and past_key_values="):
        model.model(ids, cache=a, past_key_values=b, use_cache=True)


def test_outputs_name_the_cache_as_the_installed_transformers_does(tiny_config):
    model = _model(tiny_config, "gdn-attention-moe")
    ids = torch.randint(0, 96, (1, 4))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        base = model.model(ids, use_cache=True)
    for output in (out, base):
        assert compat.CACHE_NAME in output.keys()  # what generate() of this version looks up
        assert compat.OTHER_CACHE_NAME not in output.keys()
        assert output[compat.CACHE_NAME] is output.cache
        assert output.past_key_values is output.cache  # the other name still reads
    # the cache name matches transformers' own outputs
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert compat.CACHE_NAME in {f for f in CausalLMOutputWithPast.__dataclass_fields__}


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_really_uses_the_cache(kind, tiny_config):
    """Greedy ``generate()`` (which passes the cache under this version's name and reads it back) equals a
    loop of full forwards without any cache; a dropped or ignored cache decodes from an empty state and
    differs."""
    model = _model(tiny_config, kind)
    prompt = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


class _Capture(std_logging.Handler):
    def __init__(self):
        super().__init__(level=std_logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _deprecations(caught, captured: _Capture) -> list[str]:
    found = [m for m in captured.messages if "deprecat" in m.lower()]
    for w in caught:
        if issubclass(w.category, (FutureWarning, DeprecationWarning)):
            text = f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
            if "transformers" in text or "hf_hybrid" in text:
                found.append(text)
    return found


def test_no_deprecation_from_transformers(tiny_config, tmp_path):
    """forward / generate / save / load / Trainer on the installed transformers emit no deprecation, neither
    as a Python warning nor on the ``transformers`` logger (5.24's rename shims use ``logger.warning_once``),
    so the next rename fails this test while it is still a warning."""
    # a shim that already spoke in this process speaks again
    transformers.utils.logging.warning_once.cache_clear()
    capture = _Capture()
    tf_logger = std_logging.getLogger("transformers")
    tf_logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kind in KINDS:
                model = _model(tiny_config, kind)
                ids = torch.randint(1, 96, (2, 8))
                mask = torch.ones_like(ids)
                mask[0, :2] = 0
                with torch.no_grad():
                    out = model(ids, attention_mask=mask, use_cache=True)
                    model(
                        ids[:, -1:],
                        attention_mask=torch.ones(2, 9, dtype=torch.long),
                        cache=compat.output_cache(out),
                        use_cache=True,
                    )
                    model.generate(
                        ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
                    )
                model.train()
                model(ids, labels=ids).loss.backward()
                model.save_pretrained(tmp_path / kind)
                AutoModelForCausalLM.from_pretrained(tmp_path / kind)

            model = _model(tiny_config, "gdn-attention-moe").train()
            rows = [{"input_ids": list(range(1, 17)), "labels": list(range(1, 17))}] * 8
            args = TrainingArguments(
                output_dir=str(tmp_path / "run"),
                max_steps=2,
                per_device_train_batch_size=4,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
            )
            Trainer(model=model, args=args, train_dataset=rows).train()
    finally:
        tf_logger.removeHandler(capture)
    assert _deprecations(caught, capture) == []
