"""Kimi Delta Attention: chunked torch form and decode step against the per-token spec, the spec against
transformers' Kimi Linear reference, long-context bf16 stability, plus dispatch.

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
from hf_hybrid.ops.kda import chunk_kda, kda, naive_recurrent_kda, recurrent_kda_step

# Tolerances, as a fraction of the reference tensor's largest magnitude:
# fp32 — both paths compute in fp32 and differ only in summation order (chunk matmuls vs token loop).
FP32_TOL = 1e-5
# bf16 inputs — the op still computes in fp32 on the bf16-rounded inputs, so against the fp32 spec on the same
# rounded inputs only the final cast of o to bf16 rounds (2^-8 relative); x2 margin.
BF16_TOL = 2**-7
# the fp32 state after thousands of tokens: fp32 summation-order differences grow with the number of chunks
# (~sqrt(T/C) · 2^-24 per element), still far below 1e-4 of the largest entry at 32K tokens.
LONG_STATE_TOL = 1e-4

INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{name}: not finite"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{name}: max error {err:.2e} of max |ref| {scale.item():.2e} exceeds {tol:.0e}"


def kimi_gate(shape, gen, strong: bool = False) -> torch.Tensor:
    """Log decays as Kimi Linear's gate makes them: -exp(A_log) · softplus(x + dt_bias), A in [1, 16].

    ``strong``: a wider pre-activation in half the channels, so those decay by tens of nats per token while
    the other half keeps almost everything — cumulative decays inside a chunk far beyond exp's fp32 range (88
    nats) next to channels that barely decay.
    """
    a = torch.empty(shape[-2], 1).uniform_(1, 16, generator=gen)  # per head, as A_log
    x = torch.randn(shape, generator=gen) - 4.0
    if strong:
        mild = torch.arange(shape[-1]) % 2 == 0  # (Dk,)
        x = torch.where(mild, x - 6.0, 4.0 * x + 12.0)
    return -a * F.softplus(x)


def make_inputs(batch=2, length=37, hk=2, hv=2, dk=16, dv=24, init=True, seed=0, strong=False):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    inputs = {
        "q": randn(batch, length, hk, dk),
        "k": F.normalize(randn(batch, length, hk, dk), dim=-1),
        "v": randn(batch, length, hv, dv),
        "g": kimi_gate((batch, length, hv, dk), gen, strong),
        "beta": torch.rand(batch, length, hv, generator=gen),
        "initial_state": randn(batch, hv, dk, dv) if init else None,
    }
    return {n: None if x is None else x.requires_grad_() for n, x in inputs.items()}


def loss_of(o: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return (o.float() * torch.randn(o.shape, generator=gen)).sum() + (
        state * torch.randn(state.shape, generator=gen)
    ).sum()


def run(fn, inputs, **kwargs):
    """(o, final_state, {input name: grad}) of fn through the loss Σ o·w_o + Σ S·w_s (fixed random
    weights)."""
    o, state = fn(
        *(inputs[n] for n in INPUT_NAMES[:5]),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        **kwargs,
    )
    names = [n for n in INPUT_NAMES if inputs[n] is not None]
    grads = torch.autograd.grad(loss_of(o, state), [inputs[n] for n in names])
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
    expected = run(naive_recurrent_kda, inputs)
    check_all(run(chunk_kda, inputs, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("chunk_size", [5, 24])
def test_chunk_sizes_that_are_not_powers_of_two(chunk_size):
    """The per-channel scores halve the chunk down to single tokens: other sizes are zero-padded first."""
    inputs = make_inputs(length=37, seed=9)
    check_all(run(chunk_kda, inputs, chunk_size=chunk_size), run(naive_recurrent_kda, inputs))


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_gva_matches_naive(use_qk_l2norm):
    """Hv = 2 Hk: value head h reads q/k head h // 2; unnormalised q/k when the op normalises them."""
    inputs = make_inputs(length=37, hk=2, hv=4, seed=1)
    if use_qk_l2norm:
        with torch.no_grad():
            inputs["k"].mul_(3.0)
    expected = run(naive_recurrent_kda, inputs, use_qk_l2norm=use_qk_l2norm)
    check_all(run(chunk_kda, inputs, use_qk_l2norm=use_qk_l2norm, chunk_size=16), expected)


def test_channel_decay_is_per_channel():
    """The spec really decays each key channel by its own factor: KDA with g equal over channels is the gated
    delta rule (one decay per head), and a different g in one channel changes the result."""
    from hf_hybrid.ops.gated_delta import naive_recurrent_gated_delta_rule

    inputs = {n: x.detach() for n, x in make_inputs(length=20, seed=10).items()}
    g_head = inputs["g"][..., 0]  # (B, T, H)
    args = [inputs[n] for n in ("q", "k", "v")]
    ours, ours_state = naive_recurrent_kda(
        *args,
        g_head[..., None].expand_as(inputs["g"]),
        inputs["beta"],
        initial_state=inputs["initial_state"],
        output_final_state=True,
    )
    gdn, gdn_state = naive_recurrent_gated_delta_rule(
        *args, g_head, inputs["beta"], initial_state=inputs["initial_state"], output_final_state=True
    )
    check("o", ours, gdn, FP32_TOL)
    check("final_state", ours_state, gdn_state, FP32_TOL)
    changed = g_head[..., None].expand_as(inputs["g"]).clone()
    changed[..., 3] = -5.0
    other = naive_recurrent_kda(*args, changed, inputs["beta"], initial_state=inputs["initial_state"])[0]
    assert (other - ours).abs().max() > 1e-3


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_naive_matches_transformers_reference(use_qk_l2norm):
    """Our spec and chunk form agree with transformers' Kimi Linear recurrence and chunk reference
    (independent code). transformers' references have no GVA and a fixed scale Dk^-0.5."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    inputs = {n: x.detach() for n, x in make_inputs(length=45, seed=2).items()}
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    ours, ours_state = naive_recurrent_kda(
        *args, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=use_qk_l2norm
    )
    # unwrap: with fla-core installed, transformers may swap its reference for fla's kernel behind these names
    for name in ("recurrent_kimi_delta_attention", "chunk_kimi_delta_attention"):
        reference = inspect.unwrap(getattr(kimi, name))
        theirs, theirs_state = reference(
            *args,
            initial_state=inputs["initial_state"],
            output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
        )
        check(f"o vs {name}", ours, theirs, FP32_TOL)
        check(f"final_state vs {name}", ours_state, theirs_state, FP32_TOL)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_per_channel_decay_does_not_overflow(chunk_size):
    """Some channels lose tens of nats per token, others almost nothing: inside a chunk the cumulative decay
    passes exp's fp32 range (88 nats) by far, per channel. Nothing may overflow, and the result is the
    spec's."""
    inputs = make_inputs(length=100, seed=3, strong=True)
    with torch.no_grad():
        chunk_sum = inputs["g"][:, :chunk_size].sum(1)  # cumulative log decay over the first chunk
        assert chunk_sum.min() < -2 * 88 and chunk_sum.max() > -1, (
            "the test must mix extreme and mild channels"
        )
    expected = run(naive_recurrent_kda, inputs)
    check_all(run(chunk_kda, inputs, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("fn", [chunk_kda, naive_recurrent_kda], ids=["chunk", "naive"])
def test_varlen_matches_documents_alone(fn):
    """3 packed documents of odd lengths = each document run alone from its own initial state."""
    cu_seqlens = torch.tensor([0, 13, 14, 37], dtype=torch.int32)
    packed = make_inputs(batch=1, length=37, hk=1, hv=2, seed=4)
    packed["initial_state"] = torch.randn(3, 2, 16, 24).requires_grad_()
    actual = run(fn, packed, cu_seqlens=cu_seqlens, chunk_size=16)

    # reference: the same leaf tensors, sliced per document, through the naive spec one document at a time
    outs, states = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o, s = naive_recurrent_kda(
            *(packed[x][:, start:end] for x in INPUT_NAMES[:5]),
            initial_state=packed["initial_state"][n : n + 1],
            output_final_state=True,
        )
        outs.append(o)
        states.append(s)
    o, state = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    grads = torch.autograd.grad(loss_of(o, state), [packed[n] for n in INPUT_NAMES])
    check_all(actual, (o, state, dict(zip(INPUT_NAMES, grads))))


def test_step_decode_matches_naive():
    """Chunked prefill then token-by-token decode steps = one naive pass over the whole sequence."""
    inputs = {n: x.detach() for n, x in make_inputs(length=40, hk=1, hv=2, seed=5).items()}
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    expected, expected_state = naive_recurrent_kda(
        *args, initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm=True
    )
    prefill = 29
    o, state = chunk_kda(
        *(x[:, :prefill] for x in args),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        use_qk_l2norm=True,
        chunk_size=16,
    )
    outs = [o]
    for t in range(prefill, 40):
        o_t, state = recurrent_kda_step(*(x[:, t] for x in args), state, use_qk_l2norm=True)
        outs.append(o_t[:, None])
    check("o", torch.cat(outs, dim=1), expected, FP32_TOL)
    check("final_state", state, expected_state, FP32_TOL)


def test_empty_sequence_returns_the_initial_state():
    inputs = {n: x.detach() for n, x in make_inputs(length=0, seed=11).items()}
    o, state = chunk_kda(
        *(inputs[n] for n in INPUT_NAMES[:5]), initial_state=inputs["initial_state"], output_final_state=True
    )
    assert o.shape == (2, 0, 2, 24)
    check("final_state", state, inputs["initial_state"], 0.0)


def _bf16_long_context(length: int, chunk_size: int = 64):
    """bf16 inputs with Kimi-like (partly extreme) decays over ``length`` tokens: the chunk path's output and
    state against the fp32 spec on the same bf16-rounded inputs, and a finite backward."""
    inputs = make_inputs(batch=1, length=length, hk=1, hv=2, dk=16, dv=16, seed=6, strong=True)
    bf16 = {n: x.detach().to(torch.bfloat16).requires_grad_() for n, x in inputs.items()}
    o, state = chunk_kda(
        *(bf16[n] for n in INPUT_NAMES[:5]),
        initial_state=bf16["initial_state"],
        output_final_state=True,
        use_qk_l2norm=True,
        chunk_size=chunk_size,
    )
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    with torch.no_grad():
        expected, expected_state = naive_recurrent_kda(
            *(bf16[n].float() for n in INPUT_NAMES[:5]),
            initial_state=bf16["initial_state"].float(),
            output_final_state=True,
            use_qk_l2norm=True,
        )
    check("o", o, expected, BF16_TOL)
    check("final_state", state, expected_state, LONG_STATE_TOL)  # the state is never rounded to bf16
    grads = torch.autograd.grad(loss_of(o, state), [bf16[n] for n in INPUT_NAMES])
    for name, grad in zip(INPUT_NAMES, grads):
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all(), f"d{name} is not finite"


def test_bf16_long_context_is_stable():
    _bf16_long_context(3000)


@pytest.mark.slow
def test_bf16_32k_context_is_stable():
    _bf16_long_context(32768)


def test_torch_compile_traces_without_graph_breaks():
    """Through the dispatcher (backend choice and its logging included), with the hand-written backwards."""
    inputs = make_inputs(length=37, hk=1, hv=2, seed=7)
    compiled = torch.compile(kda, backend="aot_eager", fullgraph=True)
    check_all(run(compiled, inputs, chunk_size=16), run(chunk_kda, inputs, chunk_size=16))


def test_dispatch_on_cpu(caplog):
    inputs = make_inputs(length=20, seed=8)
    args = [inputs[n] for n in INPUT_NAMES[:5]]
    expected = chunk_kda(*args, initial_state=inputs["initial_state"])[0]
    fla_support._logged.discard("kda:cpu")
    with caplog.at_level(logging.INFO, logger="hf_hybrid"):
        for _ in range(2):
            o, state = kda(*args, initial_state=inputs["initial_state"], backend="auto")
            assert state is None
            check("o", o, expected, 0.0)  # auto on CPU is exactly the torch path
    assert sum("not on CUDA" in r.getMessage() for r in caplog.records) == 1  # logged once
    check("o", kda(*args, initial_state=inputs["initial_state"], backend="naive")[0], expected, FP32_TOL)
    with pytest.raises(ValueError, match="choose one of: auto, torch, naive, fla"):
        kda(*args, backend="triton")


def test_forced_fla_names_a_broken_kda_module(monkeypatch):
    """fla-core importing but its KDA module broken: forcing fla says so; GDN is not affected."""
    monkeypatch.setattr(fla_support, "fla_import_error", lambda: None)
    monkeypatch.setitem(
        fla_support._op_import_errors, "kda", "fla-core's fla.ops.kda failed to import (boom)"
    )
    x = make_inputs(length=4)
    with pytest.raises(RuntimeError, match="backend='fla' was requested but fla-core's fla.ops.kda failed"):
        kda(*(x[n] for n in INPUT_NAMES[:5]), backend="fla")
    assert fla_support.fla_refusal("gated_delta_rule", (x["q"],), gated=True) is None


def test_fla_is_not_used_for_key_dims_it_cannot_take(monkeypatch):
    """fla-core's chunk_kda asserts Dk <= 256: forcing fla says so up front; ``auto`` would use the torch
    path."""
    monkeypatch.setattr(fla_support, "fla_import_error", lambda: None)
    monkeypatch.setitem(fla_support._op_import_errors, "kda", None)
    x = make_inputs(batch=1, length=3, hk=1, hv=1, dk=272, dv=4, init=False)
    with pytest.raises(
        RuntimeError, match="backend='fla' was requested but fla-core's chunk_kda takes key head"
    ):
        kda(*(x[n] for n in INPUT_NAMES[:5]), backend="fla")


def test_shape_errors_speak_clearly():
    x = make_inputs(length=5, hk=2, hv=3)
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])
    x = make_inputs(length=5)
    with pytest.raises(ValueError, match="one log decay per value head and key channel"):
        chunk_kda(x["q"], x["k"], x["v"], x["g"][..., 0], x["beta"])
    with pytest.raises(ValueError, match="beta must be"):
        chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"][..., :1])
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=torch.tensor([0, 5]))
