"""What the GPU correctness tests compare with, and how: poisoned allocations, and an error bound that holds
row by row as well as for the whole tensor.

A low-precision result is bounded by 4u relative for a dtype of unit roundoff u (one rounding of the output is
≈ u/√3 in norm; the kernels round a few intermediates — p, ds, chunk states — to the input dtype, as
FlashAttention does); a wrong index, mask or missing term is O(1). fp32 paths differ only in summation order:
1e-5.

Why per row: a norm-wise bound ‖out − ref‖ / ‖ref‖ ≤ 4u averages over the whole tensor, so a few wrong rows
(one query's output, one key's gradient) of a large tensor pass it — one O(1)-wrong row among 4096 moves the
norm-wise error by only ~1/64 ≈ 4u of bf16. :func:`row_errors` measures each row (the last dimension, e.g. one
head of one token) against the larger of its own norm and the tensor's RMS row norm: rounding keeps every row
within a few u of its own magnitude, while a wrong row is off by O(1) of a typical row. (The floor at the RMS
row norm keeps rows that are nearly zero in the reference — the gradient of a key no query selected — from
turning rounding of large operands into a huge relative error.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_BOUND = 1e-5


def bound_for(dtype: torch.dtype) -> float:
    """4u for a low-precision dtype of unit roundoff u, else the fp32 bound."""
    return 4 * UNIT_ROUNDOFF[dtype] if dtype in UNIT_ROUNDOFF else FP32_BOUND


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (NaN if out has a non-finite element: NaN never passes)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(out.isfinite().all()):
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row (every index but the last dimension): ‖out_r − ref_r‖ / max(‖ref_r‖, RMS over rows of
    ‖ref_r‖), fp64, flat [rows]; NaN where out has a non-finite element."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise ValueError(f"row_errors: out {tuple(out.shape)} and ref {tuple(ref.shape)} differ in shape")
    if ref.dim() == 0:
        out, ref = out.reshape(1, 1), ref.reshape(1, 1)
    out, ref = out.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    norms = ref.norm(dim=-1)
    floor = norms.square().mean().sqrt().clamp_min(1e-30)
    err = (out - ref).norm(dim=-1) / torch.maximum(norms, floor)
    return torch.where(out.isfinite().all(dim=-1), err, torch.full_like(err, float("nan")))


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, bound: float | None = None):
    """The comparison of one tensor: {tensor, error (norm-wise), worst_row, worst_row_error, floor (the error
    of merely rounding ref to out's dtype), bound, pass} — pass needs both the norm-wise and every row's
    error within the bound (NaN fails)."""
    b = bound_for(dtype) if bound is None else bound
    err = rel_error(out, ref)
    rows = row_errors(out, ref)
    worst = int(rows.nan_to_num(float("inf")).argmax())
    worst_err = float(rows[worst])
    floor = rel_error(ref.to(out.dtype), ref) if out.dtype != ref.dtype else 0.0
    ok = bool(err <= b) and bool((rows <= b).all())  # NaN compares False
    return {
        "tensor": name,
        "error": err,
        "worst_row": worst,
        "worst_row_error": worst_err,
        "floor": floor,
        "bound": b,
        "pass": ok,
    }


def assert_close(what: str, outs: dict, refs: dict, dtype: torch.dtype, bound: float | None = None) -> None:
    """Every named tensor of ``outs`` within the bound of ``refs[name]``, norm-wise and row by row."""
    results = [check(name, out, refs[name], dtype, bound) for name, out in outs.items()]
    failed = [r for r in results if not r["pass"]]
    assert not failed, f"{what} ({str(dtype).removeprefix('torch.')}): " + "; ".join(
        f"{r['tensor']}: error {r['error']:.3g}, worst row {r['worst_row']} {r['worst_row_error']:.3g} "
        f"(bound {r['bound']:.3g}, rounding floor {r['floor']:.3g})"
        for r in failed
    )


@contextlib.contextmanager
def poisoned():
    """While active, every ``torch.empty*`` result is filled with NaN (integers: their maximum), so an output
    element that a kernel never writes shows up as non-finite (torch's deterministic mode, warn-only: nothing
    else changes)."""
    was_on, was_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@dataclass(frozen=True)
class Device:
    """Where the checks run: the device, whether it is CUDA, the low-precision dtypes checked there."""

    device: torch.device
    cuda: bool
    low_dtypes: tuple[torch.dtype, ...]

    def pick(self, gpu, toy):
        """The GPU sizes on CUDA, the toy sizes on the CPU."""
        return gpu if self.cuda else toy

    def need(self, dtype: torch.dtype) -> None:
        if dtype not in self.low_dtypes:
            why = "not a checked dtype" if self.cuda else "Triton's interpreter has no correct bf16 tl.dot"
            pytest.skip(f"{dtype} is not checked on {self.device.type}: {why}")


# every low-precision dtype either device checks; a test skips the ones its device does not
LOW_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
