"""Triton DSA sparse attention against the torch path: forward (o, lse) and backward (dq, dk, dv).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before the kernel module
is imported (the env var is read when ``@triton.jit`` wraps a function). Shapes are tiny and blocks large;
bf16 is not tested here because the interpreter's bf16 ``tl.dot`` is wrong.

Tolerances:
- fp32: 2e-5 absolute/relative. Both sides compute in fp32 (kernel dots use ``input_precision="ieee"``),
  they differ only in summation order (online softmax, atomics).
- fp16: the reference is the torch path on the *same fp16 inputs upcast to fp32*. The kernel rounds p (and
  ds in the backward) to fp16 before each tensor-core product, as FlashAttention does, and rounds outputs to
  fp16; fp16's unit roundoff is u = 2^-11 ≈ 4.9e-4, so each output element is off by a few u times the
  magnitude of what it sums. We require max|err| ≤ 4u · max|ref| + u per tensor, i.e. a few ulps at the
  tensor's scale (measured: 1–3.5× the error of merely rounding the reference to fp16); a wrong index, mask
  or missing term is O(1). lse stays fp32 with exact fp16 products accumulated in fp32: 1e-5.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# Without a GPU the kernels need the interpreter, and triton's own @jit helpers (tl.zeros, tl.max, ...) are
# built for it only when the variable was set before triton's first import. In a full test session
# something (transformers → torch._dynamo) usually imports triton first, so then this file re-runs itself
# in a fresh process and the in-process copies of its tests are skipped.
RERUN_IN_FRESH_PROCESS = not torch.cuda.is_available() and not isinstance(
    triton.language.zeros, InterpretedFunction
)
in_process = pytest.mark.skipif(RERUN_IN_FRESH_PROCESS, reason="run by test_in_fresh_interpreter_process")

from hf_hybrid.ops.dsa import indexer_topk, sparse_attention, sparse_attention_torch  # noqa: E402
from hf_hybrid.ops.dsa.indexer import _indexer_logits_block  # noqa: E402
from hf_hybrid.ops.dsa.naive import indexer_scores_naive, topk_indices  # noqa: E402

if not RERUN_IN_FRESH_PROCESS:
    from hf_hybrid.ops.dsa.triton_kernels import (  # noqa: E402
        indexer_logits_block_triton,
        sparse_attention_triton,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U16 = 2.0**-11


def _case(B, T, P, H, Hkv, Dqk, Dv, topk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = P + T
    q = torch.randn(B, T, H, Dqk, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, S, Hkv, Dqk, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, S, Hkv, Dv, generator=g).to(DEVICE, dtype).requires_grad_()
    q_I, k_I = torch.randn(B, T, 2, 8, generator=g), torch.randn(B, S, 8, generator=g)
    idx = indexer_topk(q_I, k_I, torch.rand(B, T, 2, generator=g), topk=topk).to(DEVICE)
    return q, k, v, idx


def _run(fn, q, k, v, idx, scale, seed=1):
    """o, lse and the gradients of Σ o·dO + Σ lse·dlse (so the lse path of the backward is checked too)."""
    o, lse = fn(q, k, v, idx, scale=scale, return_lse=True)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum() + (lse * dlse).sum(), (q, k, v))
    return (o, lse, *grads)


def _reference(q, k, v, idx, scale):
    """Torch path on fp32 copies of the same inputs; gradients w.r.t. those copies."""
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    return _run(sparse_attention_torch, q32, k32, v32, idx, scale)


CASES = [
    # B, T, P, H, Hkv, Dqk, Dv, topk
    pytest.param(2, 11, 6, 4, 2, 32, 32, 7, id="gqa"),
    pytest.param(1, 9, 4, 4, 1, 40, 32, 6, id="mqa-latent-40/32"),
    pytest.param(1, 6, 10, 2, 1, 200, 160, 20, id="mqa-sliced-dims"),  # Dqk, Dv walked in several slices
    pytest.param(1, 5, 3, 80, 1, 16, 16, 5, id="many-heads"),  # G = 80 > 64: two head blocks per group
]


@in_process
@pytest.mark.parametrize("B,T,P,H,Hkv,Dqk,Dv,topk", CASES)
def test_triton_matches_torch_fp32(B, T, P, H, Hkv, Dqk, Dv, topk):
    q, k, v, idx = _case(B, T, P, H, Hkv, Dqk, Dv, topk, torch.float32)
    scale = Dqk**-0.5
    got = _run(sparse_attention_triton, q, k, v, idx, scale)
    want = _reference(q, k, v, idx, scale)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@in_process
@pytest.mark.parametrize("B,T,P,H,Hkv,Dqk,Dv,topk", CASES[:2])
def test_triton_matches_torch_fp16(B, T, P, H, Hkv, Dqk, Dv, topk):
    q, k, v, idx = _case(B, T, P, H, Hkv, Dqk, Dv, topk, torch.float16)
    scale = Dqk**-0.5
    got = _run(sparse_attention_triton, q, k, v, idx, scale)
    want = _reference(q, k, v, idx, scale)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        if name == "lse":
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            continue
        assert a.dtype == torch.float16, name
        err = (a.float() - b).abs().max().item()
        bound = 4 * U16 * b.abs().max().item() + U16
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"


@in_process
def test_triton_empty_selection_and_unused_slots():
    q, k, v, idx = _case(1, 4, 2, 4, 1, 16, 16, 4, torch.float32)
    idx = idx.clone()
    idx[0, 1] = -1  # nothing selected
    idx[0, 2, 1:] = -1  # one key only
    got = _run(sparse_attention_triton, q, k, v, idx, 0.25)
    want = _reference(q, k, v, idx, 0.25)
    assert torch.all(got[0][0, 1] == 0) and torch.all(got[1][0, 1] == float("-inf"))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@in_process
def test_dispatcher_runs_triton_backend():
    q, k, v, idx = _case(1, 5, 3, 4, 2, 16, 16, 4, torch.float32)
    o = sparse_attention(q, k, v, idx, scale=0.25, backend="triton")
    torch.testing.assert_close(o, sparse_attention_torch(q, k, v, idx, scale=0.25), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------ indexer logits


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_indexer_logits_match_torch(dtype):
    g = torch.Generator().manual_seed(3)
    q_I = torch.randn(2, 37, 3, 24, generator=g).to(DEVICE, dtype)
    k_I = torch.randn(2, 70, 24, generator=g).to(DEVICE, dtype)
    w = torch.randn(2, 37, 3, generator=g).to(DEVICE, dtype)
    got = indexer_logits_block_triton(q_I, k_I, w)
    want = _indexer_logits_block(q_I, k_I, w)  # fp32 math on the same (rounded) inputs
    # fp16: exact products, fp32 accumulation in another order
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_streaming_topk_equals_naive_with_ties(dtype):
    # small multiples of 1/4: exact in fp16 and in every summation order, many exact ties (ReLU zeros)
    g = torch.Generator().manual_seed(4)
    B, T, P = 2, 21, 9
    q_I = torch.randint(-2, 3, (B, T, 3, 8), generator=g).float() / 2
    k_I = torch.randint(-2, 3, (B, P + T, 8), generator=g).float() / 2
    w = torch.randint(-1, 3, (B, T, 3), generator=g).float() / 4
    want = topk_indices(indexer_scores_naive(q_I, k_I, w), 6)
    args = (x.to(DEVICE, dtype) for x in (q_I, k_I, w))
    got = indexer_topk(*args, topk=6, query_chunk=8, key_chunk=16, backend="triton")
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(not RERUN_IN_FRESH_PROCESS, reason="this process already runs the kernels")
def test_in_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 12, out.stdout[-2000:]  # every kernel test ran there
