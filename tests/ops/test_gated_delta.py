"""Gated delta rule: chunked torch form and decode step against the per-token spec, plus dispatch.

Every parity test compares the output, the final state and the gradient of every input (q, k, v, g, beta,
initial_state) through a random linear loss, at lengths that are not multiples of the chunk size.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid.ops import fla_support
from hf_hybrid.ops.gated_delta import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
    unit_lower_inverse,
)

# Tolerances, as a fraction of the reference tensor's largest magnitude:
# fp32 — both paths compute in fp32 and differ only in summation order (chunk matmuls vs token loop).
FP32_TOL = 1e-5
# bf16 inputs — the op still computes in fp32; only the final cast of o to bf16 rounds (2^-8 relative), x2
# margin.
BF16_TOL = 2**-7

INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{name}: max error {err:.2e} of max |ref| {scale.item():.2e} exceeds {tol:.0e}"


def make_inputs(batch=2, length=37, hk=2, hv=2, dk=16, dv=24, init=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    inputs = {
        "q": randn(batch, length, hk, dk),
        "k": F.normalize(randn(batch, length, hk, dk), dim=-1),
        "v": randn(batch, length, hv, dv),
        "g": F.logsigmoid(randn(batch, length, hv) + 2.0),  # decays mostly in (0.5, 1), some strong
        "beta": torch.rand(batch, length, hv, generator=gen),
        "initial_state": randn(batch, hv, dk, dv) if init else None,
    }
    return {n: None if x is None else x.to(dtype).requires_grad_() for n, x in inputs.items()}


def run(fn, inputs, **kwargs):
    """(o, final_state, {input name: grad}) of fn through the loss Σ o·w_o + Σ S·w_s (fixed random
    weights)."""
    o, state = fn(
        *(inputs[n] for n in INPUT_NAMES[:5]),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(123)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum() + (
        state * torch.randn(state.shape, generator=gen)
    ).sum()
    names = [n for n in INPUT_NAMES if inputs[n] is not None]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    return o, state, dict(zip(names, grads))


def check_all(actual, expected, tol=FP32_TOL):
    check("o", actual[0], expected[0], tol)
    check("final_state", actual[1], expected[1], tol)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        check(f"d{name}", actual[2][name], expected[2][name], tol)


@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("length", [37, 100])
def test_chunk_matches_naive(length, chunk_size, init):
    inputs = make_inputs(length=length, init=init)
    expected = run(naive_recurrent_gated_delta_rule, inputs)
    check_all(run(chunk_gated_delta_rule, inputs, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_gva_matches_naive(use_qk_l2norm):
    """Hv = 2 Hk: value head h reads q/k head h // 2; unnormalised q/k when the op normalises them."""
    inputs = make_inputs(length=37, hk=2, hv=4, seed=1)
    if use_qk_l2norm:
        with torch.no_grad():
            inputs["k"].mul_(3.0)
    expected = run(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=use_qk_l2norm)
    check_all(run(chunk_gated_delta_rule, inputs, use_qk_l2norm=use_qk_l2norm, chunk_size=16), expected)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_negative_eigenvalues_match_naive(chunk_size):
    """β ∈ (0, 2) (``gdn_allow_neg_eigval``, OLMo Hybrid): I - β k kᵀ has the eigenvalue 1 - β < 0 along k;
    the chunked WY form is the same algebra, so it matches the recurrence there too (output, state, every
    gradient)."""
    inputs = make_inputs(length=53, hk=2, hv=4, seed=4)
    with torch.no_grad():
        inputs["beta"].mul_(2.0)
    assert inputs["beta"].max() > 1.5
    expected = run(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=True)
    check_all(run(chunk_gated_delta_rule, inputs, use_qk_l2norm=True, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_float64_matches_naive(use_qk_l2norm):
    """float64 inputs stay float64 through the chunked form, with or without the in-op L2 norm (the norm once
    cast q/k to fp32 and the chunk matmuls then failed on mixed dtypes)."""
    inputs = make_inputs(length=37, dtype=torch.float64, seed=2)
    expected = run(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=use_qk_l2norm)
    actual = run(chunk_gated_delta_rule, inputs, use_qk_l2norm=use_qk_l2norm, chunk_size=16)
    assert actual[0].dtype == torch.float64
    check_all(actual, expected, tol=1e-10)


def test_naive_matches_transformers_reference():
    """Our spec agrees with transformers' Qwen3-Next recurrence (independent code; GVA convention
    included)."""
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = {n: None if x is None else x.detach() for n, x in make_inputs(hk=1, hv=2, seed=2).items()}
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    ours, ours_state = naive_recurrent_gated_delta_rule(
        *args, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=True
    )
    # unwrap: with fla-core installed, transformers swaps its reference for fla's kernel behind this name
    reference = inspect.unwrap(qwen3_next.torch_recurrent_gated_delta_rule)
    theirs, theirs_state = reference(
        *args, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    check("o", ours, theirs, FP32_TOL)
    check("final_state", ours_state, theirs_state, FP32_TOL)


def test_strong_decay_does_not_overflow():
    """g = -30 per step makes exp(b_j) underflow and exp(-b_j) overflow within a chunk: masks come first."""
    inputs = make_inputs(length=100, seed=3)
    with torch.no_grad():
        inputs["g"].copy_(torch.where(torch.rand(inputs["g"].shape) < 0.5, -30.0, -0.01))
    expected = run(naive_recurrent_gated_delta_rule, inputs)
    actual = run(chunk_gated_delta_rule, inputs, chunk_size=64)
    assert all(torch.isfinite(x).all() for x in (actual[0], actual[1], *actual[2].values()))
    check_all(actual, expected)


@pytest.mark.parametrize(
    "fn", [chunk_gated_delta_rule, naive_recurrent_gated_delta_rule], ids=["chunk", "naive"]
)
def test_varlen_matches_documents_alone(fn):
    """3 packed documents of odd lengths = each document run alone from its own initial state."""
    lengths = [13, 1, 23]
    cu_seqlens = torch.tensor([0, 13, 14, 37], dtype=torch.int32)
    packed = make_inputs(batch=1, length=sum(lengths), hk=1, hv=2, seed=4)
    packed["initial_state"] = torch.randn(3, 2, 16, 24).requires_grad_()
    actual = run(fn, packed, cu_seqlens=cu_seqlens, chunk_size=16)

    # reference: the same leaf tensors, sliced per document, through the naive spec one document at a time
    outs, states = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o, s = naive_recurrent_gated_delta_rule(
            *(packed[x][:, start:end] for x in INPUT_NAMES[:5]),
            initial_state=packed["initial_state"][n : n + 1],
            output_final_state=True,
        )
        outs.append(o)
        states.append(s)
    o, state = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (
        state * torch.randn(state.shape, generator=gen)
    ).sum()
    grads = torch.autograd.grad(loss, [packed[n] for n in INPUT_NAMES])
    check_all(actual, (o, state, dict(zip(INPUT_NAMES, grads))))


def test_step_decode_matches_naive():
    """Chunked prefill then token-by-token decode steps = one naive pass over the whole sequence."""
    inputs = {n: x.detach() for n, x in make_inputs(length=40, hk=1, hv=2, seed=5).items()}
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    expected, expected_state = naive_recurrent_gated_delta_rule(
        *args, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=True
    )
    prefill = 29
    o, state = chunk_gated_delta_rule(
        *(x[:, :prefill] for x in args),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        use_qk_l2norm=True,
        chunk_size=16,
    )
    outs = [o]
    for t in range(prefill, 40):
        o_t, state = recurrent_gated_delta_rule_step(*(x[:, t] for x in args), state, use_qk_l2norm=True)
        outs.append(o_t[:, None])
    check("o", torch.cat(outs, dim=1), expected, FP32_TOL)
    check("final_state", state, expected_state, FP32_TOL)


def test_bf16_forward():
    inputs = {n: x.detach() for n, x in make_inputs(length=100, seed=6).items()}
    bf16 = {n: x.to(torch.bfloat16) for n, x in inputs.items()}
    args = [bf16[n] for n in INPUT_NAMES[:5]]
    o, state = chunk_gated_delta_rule(*args, initial_state=bf16["initial_state"], output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    # the reference sees the same bf16-rounded inputs, in fp32
    expected, expected_state = naive_recurrent_gated_delta_rule(
        *(x.float() for x in args), initial_state=bf16["initial_state"].float(), output_final_state=True
    )
    check("o", o, expected, BF16_TOL)
    check("final_state", state, expected_state, FP32_TOL)  # the state is never rounded to bf16


@pytest.mark.parametrize("size", [1, 5, 16, 37, 64])
def test_unit_lower_inverse(size):
    """(I + A)^-1 for the delta rule's A = tril(beta_i k_i·k_j, -1), in fp64 so only the algorithm is
    tested."""
    gen = torch.Generator().manual_seed(size)
    k = F.normalize(torch.randn(3, 2, size, 16, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(3, 2, size, 1, generator=gen, dtype=torch.float64)
    a = (beta * k @ k.transpose(-1, -2)).tril(-1)
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) + a)
    check("inverse", unit_lower_inverse(a), expected, 1e-12)


def test_torch_compile_traces_without_graph_breaks():
    """Through the dispatcher (backend choice and its logging included), with the hand-written backwards."""
    inputs = make_inputs(length=37, hk=1, hv=2, seed=7)
    compiled = torch.compile(gated_delta_rule, backend="aot_eager", fullgraph=True)
    check_all(run(compiled, inputs, chunk_size=16), run(chunk_gated_delta_rule, inputs, chunk_size=16))


def test_dispatch_on_cpu(caplog):
    inputs = make_inputs(length=20, seed=8)
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    expected = chunk_gated_delta_rule(*args, initial_state=inputs["initial_state"])[0]
    fla_support._logged.discard("gated_delta_rule:cpu")
    with caplog.at_level(logging.INFO, logger="hf_hybrid"):
        for _ in range(2):
            o, state = gated_delta_rule(*args, initial_state=inputs["initial_state"], backend="auto")
            assert state is None
            check("o", o, expected, 0.0)  # auto on CPU is exactly the torch path
    assert sum("not on CUDA" in r.getMessage() for r in caplog.records) == 1  # logged once
    check(
        "o",
        gated_delta_rule(*args, initial_state=inputs["initial_state"], backend="naive")[0],
        expected,
        FP32_TOL,
    )
    with pytest.raises(ValueError, match="choose one of: auto, torch, naive, fla"):
        gated_delta_rule(*args, backend="triton")


def test_shape_errors_speak_clearly():
    x = make_inputs(length=5, hk=2, hv=3)
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
    x = make_inputs(length=5)
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"][..., :1])
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=torch.tensor([0, 5]))
