"""The GPU tests' error bound (tests/gpu/gpu_checks.py) on the CPU: rounding to bf16 passes it, a few wrong
rows fail it even where the norm-wise error alone would pass."""

from __future__ import annotations

import torch
from gpu_checks import bound_for, check, rel_error, row_errors


def _reference(rows: int = 4096, dim: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # rows of different magnitudes, as attention outputs and gradients have
    return torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g).add(0.1)


def test_bf16_rounding_passes_row_by_row():
    ref = _reference()
    out = ref.to(torch.bfloat16)
    result = check("o", out, ref, torch.bfloat16)
    assert result["pass"], result
    # round-to-nearest keeps every row within u of its own norm: a quarter of the 4u bound
    assert result["worst_row_error"] <= 2.0**-8 < bound_for(torch.bfloat16)
    # noise of a few roundings of intermediates (4 independent ones of up to u each) passes as well
    noisy = ref
    for _ in range(4):
        noisy = noisy.to(torch.bfloat16).float() * (1 + (torch.rand_like(ref) - 0.5) * 2.0**-8)
    assert check("o", noisy.to(torch.bfloat16), ref, torch.bfloat16)["pass"]


def test_one_wrong_row_fails_though_the_normwise_error_passes():
    ref = _reference()
    out = ref.to(torch.bfloat16).float()
    out[1234] = torch.roll(ref[1234], 1)  # one row wrong by O(1): e.g. another key's values
    bound = bound_for(torch.bfloat16)
    assert rel_error(out, ref) <= bound  # the norm-wise bound alone would let it through
    result = check("o", out, ref, torch.bfloat16)
    assert not result["pass"] and result["worst_row"] == 1234 and result["worst_row_error"] > 10 * bound


def test_rows_near_zero_are_measured_against_a_typical_row():
    ref = _reference(64, 16)
    ref[3] = 0.0  # e.g. the gradient of a key no query selected
    out = ref.to(torch.bfloat16).float()
    out[3] = 1e-3 * ref.norm(dim=-1).mean() / 4  # a rounding-sized residue: not an infinite relative error
    assert row_errors(out, ref)[3] < bound_for(torch.bfloat16)
    out[5] = float("nan")  # an unwritten (poisoned) element never passes
    assert row_errors(out, ref)[5].isnan() and not check("o", out, ref, torch.bfloat16)["pass"]
