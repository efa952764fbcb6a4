"""DeepSeek Sparse Attention (DSA) ops: indexer scores, exact top-k, sparse attention, indexer losses.

Pure functions, no modules, no config. ``naive`` is the spec; ``torch_ops`` / ``indexer`` are the chunked
torch paths (CPU and GPU); ``triton_kernels`` holds the GPU kernels and is imported only when asked for,
so this package imports without triton.

Shapes: q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K] (key positions, -1 = unused),
q_I [B, T, HI, DI], k_I [B, S, DI], w [B, T, HI]; S = P + T, query t at absolute position P + t.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .indexer import (
    attention_mass_in_selection,
    indexer_kl_dense,
    indexer_kl_sparse,
    indexer_logits,
    indexer_recall_at_k,
    indexer_topk,
    topk_indices_packed,
)
from .naive import (
    dense_causal_attention_naive,
    indexer_scores_naive,
    sparse_attention_naive,
    ties_at_topk_cut,
    topk_indices,
)
from .torch_ops import dense_visible_attention, sparse_attention_torch

logger = logging.getLogger("hf_hybrid")

BACKENDS = ("auto", "torch", "naive", "triton")
_announced: set[tuple[str, str, str]] = set()


def triton_available() -> bool:
    """True when triton is installed (it is imported only once a Triton backend is actually used)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(op: str, backend: str, device: torch.device, choices: tuple[str, ...] = BACKENDS) -> str:
    """ "auto" -> "triton" on CUDA when triton is installed, else "torch"; one log line per (op, choice,
    device)."""
    if backend not in choices:
        raise ValueError(f"{op} backend={backend!r} is not known; choose one of: {', '.join(choices)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
        if backend == "triton":
            why = "CUDA tensors and triton installed"
        else:
            why = "triton is not installed" if device.type == "cuda" else f"{device.type} tensors"
    else:
        why = "requested"
    key = (op, backend, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info("hf_hybrid DSA %s: using the %s backend on %s (%s)", op, backend, device.type, why)
    return backend


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    *,
    scale: float,
    backend: str = "auto",
    return_lse: bool = False,
    query_chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected keys only; one selection shared by all heads.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv], idx [B, T, K] int (-1 = unused slot, distinct
    positions per row) -> o [B, T, H, Dv] (+ lse [B, T, H] fp32 with ``return_lse``).
    ``backend``: "auto" (Triton on CUDA when triton is installed, else the chunked torch path), "torch",
    "naive" (dense masked reference, O(T·S) memory) or "triton". ``query_chunk`` applies to "torch" only.
    """
    backend = resolve_backend("sparse attention", backend, q.device)
    if backend == "triton":
        from .triton_kernels import sparse_attention_triton

        return sparse_attention_triton(q, k, v, idx, scale=scale, return_lse=return_lse)
    if backend == "naive":
        return sparse_attention_naive(q, k, v, idx, scale=scale, return_lse=return_lse)
    return sparse_attention_torch(q, k, v, idx, scale=scale, return_lse=return_lse, query_chunk=query_chunk)


__all__ = [
    "BACKENDS",
    "dense_visible_attention",
    "attention_mass_in_selection",
    "dense_causal_attention_naive",
    "indexer_kl_dense",
    "indexer_kl_sparse",
    "indexer_logits",
    "indexer_recall_at_k",
    "indexer_scores_naive",
    "indexer_topk",
    "sparse_attention",
    "sparse_attention_naive",
    "sparse_attention_torch",
    "ties_at_topk_cut",
    "topk_indices",
    "resolve_backend",
    "topk_indices_packed",
    "triton_available",
]
