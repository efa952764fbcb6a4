"""fla-core's kernels against our chunked torch path (fwd and bwd, bf16 against fp32), and whether ``auto``
picks fla only where fla serves: where we predict fla refuses a backward, fla itself must refuse it. fla-core
needs CUDA: these skip on the CPU (its CPU-interpreter parity run is tests/ops/test_fla_interpreter.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_checks import assert_close, poisoned

pytestmark = pytest.mark.gpu

# T not a multiple of the chunk size; bench_linear's H and D, so fla's autotuning (keyed on them) runs once
B, T, H, D = 1, 2000, 16, 128


def _ops():
    """label: (op name for fla_support, fn(*inputs, backend), inputs(rn, g), gated); g (index 3) stays
    fp32."""
    from hf_hybrid.ops.delta_rule import gated_delta_rule
    from hf_hybrid.ops.simple_gla import simple_gla

    return {
        "gated_delta_rule": (
            "gated_delta_rule",
            lambda q, k, v, gl, beta, backend: gated_delta_rule(
                q, k, v, gl, beta, use_qk_l2norm=True, backend=backend
            )[0],
            lambda rn, g: [
                rn(B, T, H, D),
                rn(B, T, H, D),
                rn(B, T, H, D),
                F.logsigmoid(rn(B, T, H) + 3),
                torch.rand(B, T, H, device="cuda", generator=g),
            ],
            True,
        ),
        "simple_gla (Mamba-2 form)": (
            "simple_gla",
            lambda q, k, v, gl, backend: simple_gla(q, k, v, gl, scale=1.0 / D, backend=backend)[0],
            lambda rn, g: [rn(B, T, H, D), rn(B, T, H, D), rn(B, T, H, D), F.logsigmoid(rn(B, T, H) + 3)],
            True,
        ),
        "linear attention": (
            "simple_gla",
            lambda q, k, v, backend: simple_gla(q, k, v, None, backend=backend)[0],
            lambda rn, g: [rn(B, T, H, D), rn(B, T, H, D) / 8, rn(B, T, H, D)],
            False,
        ),
    }


def _fla_direct(op_name: str, leaves):
    """fla's own kernel, bypassing our refusal check."""
    from hf_hybrid.ops.delta_rule import fla_chunk_gated_delta_rule
    from hf_hybrid.ops.simple_gla.fla import fla_chunk_simple_gla

    if op_name == "gated_delta_rule":
        return fla_chunk_gated_delta_rule(*leaves, use_qk_l2norm=True)[0]
    return fla_chunk_simple_gla(*leaves, scale=1.0 / D)[0]


@pytest.mark.parametrize("name", ["gated_delta_rule", "simple_gla (Mamba-2 form)", "linear attention"])
def test_fla_against_our_chunked_path(gpu, name):
    from hf_hybrid.ops import fla_support

    if not gpu.cuda:
        pytest.skip(
            "fla-core needs CUDA (its CPU-interpreter parity run is tests/ops/test_fla_interpreter.py)"
        )
    error = fla_support.fla_import_error()
    if error is not None:
        pytest.skip(f"fla-core is not usable: {error}")
    dtype = torch.bfloat16
    op_name, op, inputs_fn, gated = _ops()[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    rn = lambda *s: torch.randn(*s, device="cuda", generator=g)
    low = [x if i == 3 else x.to(dtype) for i, x in enumerate(inputs_fn(rn, g))]
    leaves32 = [x.detach().float().requires_grad_() for x in low]
    ref = op(*leaves32, backend="torch")
    d_o = rn(*ref.shape)
    ref_grads = {f"d{i}": gr for i, gr in enumerate(torch.autograd.grad((ref * d_o).sum(), leaves32))}
    with torch.no_grad(), poisoned():
        outs = {"o (fla)": op(*low, backend="fla"), "o (torch)": op(*low, backend="torch")}
    assert_close(name + " fwd", outs, {k: ref for k in outs}, dtype)

    leaves = [x.detach().requires_grad_() for x in low]
    refusal = fla_support.fla_refusal(op_name, tuple(leaves), gated=gated)
    try:
        with poisoned():
            # where we predict a refusal, ask fla itself (bypassing our check) whether it refuses
            o = op(*leaves, backend="fla") if refusal is None else _fla_direct(op_name, leaves)
            grads = torch.autograd.grad((o.float() * d_o).sum(), leaves)
    except Exception as err:
        assert refusal is not None, f"fla's backward failed where we predicted it runs: {err!r}"
    else:
        assert refusal is None, (
            f"fla ran a backward we predicted it refuses ({refusal}): the rule is too strict"
        )
        assert_close(name + " bwd (fla)", {f"d{i}": gr for i, gr in enumerate(grads)}, ref_grads, dtype)
    with poisoned():
        o = op(*leaves, backend="torch")
        grads = torch.autograd.grad((o.float() * d_o).sum(), leaves)
    assert_close(name + " bwd (torch)", {f"d{i}": gr for i, gr in enumerate(grads)}, ref_grads, dtype)
