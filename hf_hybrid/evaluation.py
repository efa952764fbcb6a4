"""How close a converted model stays to its source, judged by generation as well as by likelihood: the one
evaluation every conversion recipe (upcycle, DSA, hybridize, MLA) reports beside held-out perplexity.

For any two causal LMs that share a tokenizer (hf_hybrid models and transformers' own), in eval mode, fp32
softmax, deterministic (greedy, no sampling):

- **greedy agreement** (:func:`compare_generations`): held-out prompts (a few consecutive lines of held-out
  text, ending at a line end; :func:`heldout_prompts`), continued greedily by ``generate()`` for
  ``max_new_tokens`` tokens in left-padded batches (so the converted model's cached decode is what is
  judged). Per prompt, the number of leading generated tokens equal to the source's (until the first
  divergence; a sequence that stopped at the eos token is padded with the pad id, so two that stop together
  agree to the end); reported as the mean in tokens and as a fraction of ``max_new_tokens``. **Next-line exact
  match**: the converted model's first generated line (up to and including the first newline; the whole
  continuation when the source wrote no newline) equals the source's. Each model's next line is also compared
  with the held-out text's true next line (``next_line_reference``).
- **KL to the source** (:func:`kl_to_source`): the mean over predicted tokens of KL(source ‖ converted) of the
  next-token distributions on held-out blocks, in nats.
- **per-document bits/byte** (:func:`document_bits_per_byte`): each held-out document (by default each
  non-empty held-out line, :func:`heldout_lines`) scored alone from its first token (predicted after the
  document start token, the way training separates documents): −Σ log2 p(token) over the document's tokens,
  divided by the UTF-8 bytes of its text. Unlike block perplexity this sees every document start, where a
  model that only trained on contiguous blocks is weakest.

:class:`ConversionEval` computes the source's side once (its continuations, its bits/byte) and measures any
number of converted models against it; ``ConversionEval.measure(model)`` returns one flat dict of all of
the above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .data import document_start_id, split_documents

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------------------
# held-out text


def heldout_lines(texts: Sequence[str], max_lines: int | None = 512) -> list[str]:
    """The non-empty lines of ``texts`` (trailing spaces dropped), each one document; ``max_lines``: that
    many, evenly spaced over all of them (deterministic)."""
    lines = split_documents(texts, "line")
    return _evenly(lines, max_lines)


def heldout_prompts(
    texts: Sequence[str], num_prompts: int = 64, *, prompt_lines: int = 4
) -> list[tuple[str, str]]:
    """``(prompt, next_line)`` pairs: ``prompt_lines`` consecutive lines of held-out text (blank lines kept),
    ending with a newline, whose next line is non-empty; ``num_prompts`` of them, evenly spaced over the
    text (deterministic)."""
    if prompt_lines < 1:
        raise ValueError(f"prompt_lines={prompt_lines} must be >= 1")
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1")
    pairs = []
    for text in texts:
        lines = text.replace("\r\n", "\n").split("\n")
        for i in range(prompt_lines, len(lines)):
            window = lines[i - prompt_lines : i]
            if lines[i].strip() and any(w.strip() for w in window):
                pairs.append(("\n".join(window) + "\n", lines[i].rstrip()))
    if not pairs:
        raise ValueError(f"held-out text has no {prompt_lines} lines followed by a non-empty line")
    return _evenly(pairs, num_prompts)


def _evenly(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


# ------------------------------------------------------------------------------------------------------------
# likelihood


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model(**kwargs).logits


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def kl_to_source(source, converted, blocks: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean over the predicted tokens of ``blocks`` ``[N, T]`` (every position but the last of each row) of
    KL(source ‖ converted) of the next-token distributions, in nats (eval mode, fp32 log-softmax)."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"kl_to_source: blocks must be [N, T] with T >= 2, got {tuple(blocks.shape)}")
    with _eval_mode(source, converted):
        total, count = 0.0, 0
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size]
            t = F.log_softmax(_logits(source, ids.to(_device(source)))[:, :-1].float(), -1)
            s = F.log_softmax(_logits(converted, ids.to(_device(converted)))[:, :-1].float(), -1)
            total += float((t.exp() * (t - s.to(t.device))).sum())
            count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def document_bits_per_byte(
    model, tokenizer, documents: Sequence[str], *, batch_size: int = 16
) -> dict[str, float]:
    """Each document alone: ``[start] + tokens(document)`` (``start``: the bos token, else eos), right-padded
    in batches with an attention mask; −Σ log2 p over the document's tokens (all of them, the first one
    included) divided by the UTF-8 bytes of all documents. Returns ``bits_per_byte``, ``bits``, ``bytes``,
    ``tokens``, ``documents`` and ``bits_per_byte_first16`` / ``bits_per_byte_rest`` — the bits of each
    document's first 16 tokens and of the rest, each over all bytes (they sum to ``bits_per_byte``)."""
    docs = [d for d in documents if d]
    if not docs:
        raise ValueError("document_bits_per_byte: no non-empty documents")
    start = document_start_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    bits = first = 0.0
    tokens = 0
    device = _device(model)
    with _eval_mode(model):
        for i in range(0, len(encoded), batch_size):
            seqs = [[start, *e] for e in encoded[i : i + batch_size]]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logp = F.log_softmax(_logits(model, ids.to(device), mask.to(device))[:, :-1].float(), -1)
            target = ids[:, 1:].to(device)
            nll = -logp.gather(-1, target[..., None])[..., 0]  # (B, W-1) nats
            valid = mask[:, 1:].to(device).bool()
            early = valid & (torch.arange(width - 1, device=device) < 16)
            bits += float(nll[valid].sum()) / LN2
            first += float(nll[early].sum()) / LN2
            tokens += int(valid.sum())
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "bits_per_byte": bits / n_bytes,
        "bits_per_byte_first16": first / n_bytes,
        "bits_per_byte_rest": (bits - first) / n_bytes,
        "bits": bits,
        "bytes": float(n_bytes),
        "tokens": float(tokens),
        "documents": float(len(docs)),
    }


# ------------------------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16
) -> torch.Tensor:
    """``[N, max_new_tokens]`` greedy continuations of ``prompts`` by ``model.generate()`` (left-padded
    batches with an attention mask, ``do_sample=False``); a sequence that stopped early is padded with the pad
    id (the eos token when the tokenizer has no pad token)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("greedy_continuations: the tokenizer has neither a pad nor an eos token to pad with")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    start = document_start_id(tokenizer)
    device = _device(model)
    out = torch.full((len(encoded), max_new_tokens), int(pad), dtype=torch.long)
    with _eval_mode(model):
        for i in range(0, len(encoded), batch_size):
            seqs = [[start, *e] for e in encoded[i : i + batch_size]]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=int(pad),
                num_beams=1,
            )[:, width:].cpu()
            out[i : i + len(seqs), : gen.shape[1]] = gen
    return out


def agreement_lengths(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per row of two ``[N, L]`` token tensors: the number of leading positions where they are equal (``L``
    when they never differ)."""
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(
            f"agreement_lengths: both must be [N, L] of one shape, got {tuple(reference.shape)} and "
            f"{tuple(candidate.shape)}"
        )
    length = reference.shape[1]
    index = torch.arange(length, device=reference.device).expand_as(reference)
    return torch.where(reference != candidate, index, length).min(1).values


def first_line(text: str) -> str:
    """``text`` up to and including its first newline (all of it when it has none)."""
    cut = text.find("\n")
    return text if cut < 0 else text[: cut + 1]


def compare_generations(reference: torch.Tensor, candidate: torch.Tensor, tokenizer) -> dict[str, float]:
    """Greedy agreement of ``candidate`` with ``reference`` (both ``[N, L]``, from
    :func:`greedy_continuations`): ``agreement_tokens`` (mean leading equal tokens), ``agreement_fraction``
    (that over ``L``), ``full_agreement`` (share of prompts equal to the end), ``next_line_match`` (share of
    prompts whose first generated line is the reference's, :func:`first_line`)."""
    lengths = agreement_lengths(reference, candidate).float()
    ref_text = tokenizer.batch_decode(reference, skip_special_tokens=True)
    cand_text = tokenizer.batch_decode(candidate, skip_special_tokens=True)
    matches = [first_line(r) == first_line(c) for r, c in zip(ref_text, cand_text, strict=True)]
    return {
        "agreement_tokens": float(lengths.mean()),
        "agreement_fraction": float(lengths.mean()) / reference.shape[1],
        "full_agreement": float((lengths == reference.shape[1]).float().mean()),
        "next_line_match": sum(matches) / len(matches),
    }


def next_line_reference(continuations: torch.Tensor, tokenizer, next_lines: Sequence[str]) -> float:
    """Share of prompts whose first generated line (newline dropped, trailing spaces too) is the held-out
    text's true next line."""
    texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
    hits = [first_line(t).rstrip() == ref for t, ref in zip(texts, next_lines, strict=True)]
    return sum(hits) / len(hits)


# ------------------------------------------------------------------------------------------------------------
# everything, once for the source


# A recipe's ``eval:`` keys and the ConversionEval field each sets.
RECIPE_EVAL_KEYS = {
    "prompts": "num_prompts",
    "prompt_lines": "prompt_lines",
    "max_new_tokens": "max_new_tokens",
    "lines": "max_lines",
    "batch_size": "batch_size",
}


@dataclass
class ConversionEval:
    """The source's side computed once; :meth:`measure` scores a converted model against it.

    ``heldout``: held-out documents (texts); the prompts and per-line documents are cut from them.
    ``blocks``: held-out token blocks ``[N, T]`` for the KL (the recipes' perplexity blocks)."""

    source: Any
    tokenizer: Any
    heldout: Sequence[str]
    blocks: torch.Tensor | None = None
    num_prompts: int = 64
    prompt_lines: int = 4
    max_new_tokens: int = 32
    max_lines: int | None = 512
    batch_size: int = 16
    kl_batch_size: int = 4
    _ref: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_recipe(
        cls,
        source,
        tokenizer,
        heldout: Sequence[str],
        blocks,
        cfg: dict[str, Any] | None,
        *,
        kl_batch_size: int,
    ) -> ConversionEval:
        """From a recipe's ``eval:`` section (:data:`RECIPE_EVAL_KEYS`: ``prompts``, ``prompt_lines``,
        ``max_new_tokens``, ``lines``, ``batch_size``); a key the section leaves out keeps the field's default
        above."""
        cfg = cfg or {}
        kwargs = {name: cfg[key] for key, name in RECIPE_EVAL_KEYS.items() if key in cfg}
        kwargs = {name: value if name == "max_lines" else int(value) for name, value in kwargs.items()}
        return cls(source, tokenizer, heldout, blocks, kl_batch_size=kl_batch_size, **kwargs)

    def __post_init__(self):
        pairs = heldout_prompts(self.heldout, self.num_prompts, prompt_lines=self.prompt_lines)
        self.prompts = [p for p, _ in pairs]
        self.next_lines = [n for _, n in pairs]
        self.lines = heldout_lines(self.heldout, self.max_lines)

    def _reference(self) -> dict[str, Any]:
        if not self._ref:
            cont = greedy_continuations(
                self.source,
                self.tokenizer,
                self.prompts,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
            self._ref["continuations"] = cont
            self._ref["bpb"] = document_bits_per_byte(
                self.source, self.tokenizer, self.lines, batch_size=self.batch_size
            )
            self._ref["next_line_reference"] = next_line_reference(cont, self.tokenizer, self.next_lines)
        return self._ref

    def source_metrics(self) -> dict[str, float]:
        """The source's own bits/byte and next-line accuracy on the held-out text."""
        ref = self._reference()
        return {
            "doc_bits_per_byte": ref["bpb"]["bits_per_byte"],
            "doc_bits_per_byte_first16": ref["bpb"]["bits_per_byte_first16"],
            "next_line_reference": ref["next_line_reference"],
        }

    def measure(self, model) -> dict[str, float]:
        """Generation agreement with the source, KL to the source (when ``blocks`` are given) and per-document
        bits/byte of ``model``."""
        ref = self._reference()
        cont = greedy_continuations(
            model,
            self.tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        bpb = document_bits_per_byte(model, self.tokenizer, self.lines, batch_size=self.batch_size)
        out = compare_generations(ref["continuations"], cont, self.tokenizer)
        out["next_line_reference"] = next_line_reference(cont, self.tokenizer, self.next_lines)
        out["doc_bits_per_byte"] = bpb["bits_per_byte"]
        out["doc_bits_per_byte_first16"] = bpb["bits_per_byte_first16"]
        if self.blocks is not None:
            out["kl_to_source"] = kl_to_source(self.source, model, self.blocks, batch_size=self.kl_batch_size)
        return out

    def measure_all(self, model, eval_ds, *, batch_size: int, is_source: bool = False) -> dict[str, float]:
        """Held-out block perplexity of ``model`` on ``eval_ds`` (``hf_hybrid.training.evaluate_perplexity``)
        with :meth:`measure` against the source, or with :meth:`source_metrics` for the source itself
        (``is_source``)."""
        from .training import evaluate_perplexity

        ppl = evaluate_perplexity(model, eval_ds, batch_size=batch_size)
        out = {"eval_loss": ppl["loss"], "eval_perplexity": ppl["perplexity"]}
        return {**out, **(self.source_metrics() if is_source else self.measure(model))}

    def describe(self) -> str:
        """One line: what is measured on how much text."""
        return (
            f"{len(self.prompts)} prompts of {self.prompt_lines} held-out lines, "
            f"{self.max_new_tokens} greedy tokens each; {len(self.lines)} held-out lines as documents"
            + (
                f"; KL on {self.blocks.shape[0]} blocks of {self.blocks.shape[1]}"
                if self.blocks is not None
                else ""
            )
        )


class _eval_mode:
    """Puts models in eval mode for a block and restores each one's mode after."""

    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.modes, strict=True):
            m.train(mode)


__all__ = [
    "RECIPE_EVAL_KEYS",
    "ConversionEval",
    "heldout_lines",
    "heldout_prompts",
    "kl_to_source",
    "document_bits_per_byte",
    "greedy_continuations",
    "agreement_lengths",
    "first_line",
    "compare_generations",
    "next_line_reference",
]
