"""Packed documents (``cu_seqlens``) for recurrent ops, done once for every op.

Convention (FlashAttention's): ``cu_seqlens`` [N + 1] int32, ``cu_seqlens[0] == 0``, non-decreasing,
``cu_seqlens[-1] == T``; the batch dimension is 1 and the T tokens are N documents back to back.

Every recurrent op here handles packing the same way: unpack to a right-padded [N, Lmax, ...] batch whose
padding is *neutral* (zeros: g = 0 keeps the state, beta = 0 / k = 0 writes nothing), run the batched op with
one initial state per document, and repack. Zero padding sits after each document's last token, so it cannot
change that document's outputs or its final state.

Legend: T packed tokens, N documents, L = Lmax the longest document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenIndex:
    """Index tensors that move tokens between the packed row and the padded batch.

    - ``lengths_N``: tokens per document.
    - ``gather_NL``: for each padded slot, the packed position it reads (0 for padding, then masked).
    - ``valid_NL``: True where the padded slot holds a real token.
    - ``scatter_T``: for each packed token, its flat position ``n * L + i`` in the padded batch.
    """

    lengths_N: torch.Tensor
    gather_NL: torch.Tensor
    valid_NL: torch.Tensor
    scatter_T: torch.Tensor
    max_len: int

    @property
    def num_docs(self) -> int:
        return self.lengths_N.shape[0]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int) -> None:
    """Raise a clear error when ``cu_seqlens`` cannot describe a packed row of ``total`` tokens."""
    if batch != 1:
        raise ValueError(
            f"cu_seqlens packs documents into one row, so the batch size must be 1 (got {batch})"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with N + 1 >= 2 entries (got shape {tuple(cu_seqlens.shape)})"
        )
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an integer tensor (got {cu_seqlens.dtype})")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total} (got {first} ... {last})")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def varlen_index(cu_seqlens: torch.Tensor, total: int) -> VarlenIndex:
    """Build the :class:`VarlenIndex` of ``cu_seqlens`` [N + 1] for a packed row of ``total`` tokens."""
    cu = cu_seqlens.to(torch.long)
    lengths_N = cu[1:] - cu[:-1]
    num_docs = lengths_N.shape[0]
    # one host sync: the padded length decides tensor shapes. At least 1 so empty documents still run.
    max_len = max(int(lengths_N.max()), 1) if num_docs else 1
    pos_L = torch.arange(max_len, device=cu.device)
    valid_NL = pos_L[None, :] < lengths_N[:, None]
    gather_NL = torch.where(valid_NL, cu[:-1, None] + pos_L[None, :], 0)
    doc_T = torch.repeat_interleave(torch.arange(num_docs, device=cu.device), lengths_N, output_size=total)
    scatter_T = doc_T * max_len + (torch.arange(total, device=cu.device) - cu[doc_T])
    return VarlenIndex(lengths_N, gather_NL, valid_NL, scatter_T, max_len)


def unpack(x: torch.Tensor, index: VarlenIndex) -> torch.Tensor:
    """[1, T, ...] packed row -> [N, L, ...] right-padded batch with zeros in the padding."""
    x_NL = x[0][index.gather_NL]
    mask = index.valid_NL.view(*index.valid_NL.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, x_NL, x_NL.new_zeros(()))


def pack(x: torch.Tensor, index: VarlenIndex) -> torch.Tensor:
    """[N, L, ...] right-padded batch -> [1, T, ...] packed row (the padding is dropped)."""
    return x.flatten(0, 1)[index.scatter_T].unsqueeze(0)


def run_varlen(
    op: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    tensors: Sequence[torch.Tensor | None],
    cu_seqlens: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a recurrent ``op(*tensors, cu_seqlens=None, **kwargs) -> (o, final_state)`` on packed documents.

    ``tensors`` are per-token [1, T, ...] (None entries pass through); ``kwargs`` (``initial_state`` [N, ...]
    included) go to ``op`` unchanged. Returns ``o`` packed back to [1, T, ...] and the op's per-document
    final state [N, ...].
    """
    first = next(t for t in tensors if t is not None)
    check_cu_seqlens(cu_seqlens, total=first.shape[1], batch=first.shape[0])
    index = varlen_index(cu_seqlens, first.shape[1])
    initial_state = kwargs.get("initial_state")
    if initial_state is not None and initial_state.shape[0] != index.num_docs:
        raise ValueError(
            f"initial_state has {initial_state.shape[0]} rows "
            f"but cu_seqlens describes {index.num_docs} documents"
        )
    padded = [None if t is None else unpack(t, index) for t in tensors]
    o, final_state = op(*padded, cu_seqlens=None, **kwargs)
    return pack(o, index), final_state


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a packed row from its ``position_ids`` [1, T].

    A document starts at t = 0, where ``position_ids`` is 0, and wherever it does not increase by exactly one
    (so a packed row whose next document does not restart at 0 is still split). Returns int32 [N + 1].
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"position_ids must be [1, T] for a packed row (got {tuple(position_ids.shape)})")
    pos_T = position_ids[0]
    total = pos_T.shape[0]
    starts_T = torch.ones(total, dtype=torch.bool, device=pos_T.device)
    if total > 1:
        starts_T[1:] = (pos_T[1:] == 0) | (pos_T[1:] != pos_T[:-1] + 1)
    starts = torch.nonzero(starts_T).flatten()
    end = torch.tensor([total], device=pos_T.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)
