"""Simple GLA (Mamba-2 / linear attention / per-channel GLA): chunked torch form and decode step against the
per-token spec, the spec against the quadratic (attention) form, plus dispatch.

Parity tests compare the output, the final state and the gradient of every input (q, k, v, g,
initial_state) through a random linear loss, at lengths that are not multiples of the chunk size.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid.ops import fla_support
from hf_hybrid.ops.simple_gla import (
    chunk_simple_gla,
    naive_recurrent_simple_gla,
    recurrent_simple_gla_step,
    simple_gla,
)

# Tolerances, as a fraction of the reference tensor's largest magnitude:
# fp32 — both paths compute in fp32 and differ only in summation order (chunk matmuls vs token loop).
FP32_TOL = 1e-5
# bf16 inputs — the op still computes in fp32; only the final cast of o to bf16 rounds (2^-8 relative), x2
# margin.
BF16_TOL = 2**-7

INPUT_NAMES = ("q", "k", "v", "g", "initial_state")
G_KINDS = ("none", "scalar", "channel")


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{name}: max error {err:.2e} of max |ref| {scale.item():.2e} exceeds {tol:.0e}"


def make_inputs(g_kind="scalar", batch=2, length=37, heads=2, dk=16, dv=24, init=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    g_shape = {"none": None, "scalar": (batch, length, heads), "channel": (batch, length, heads, dk)}[g_kind]
    inputs = {
        "q": randn(batch, length, heads, dk),
        "k": randn(batch, length, heads, dk) / dk**0.5,
        "v": randn(batch, length, heads, dv),
        "g": None if g_shape is None else F.logsigmoid(randn(*g_shape) + 2.0),
        "initial_state": randn(batch, heads, dk, dv) if init else None,
    }
    return {n: None if x is None else x.requires_grad_() for n, x in inputs.items()}


def run(fn, inputs, **kwargs):
    """(o, final_state, {input name: grad}) of fn through the loss Σ o·w_o + Σ S·w_s (fixed random
    weights)."""
    o, state = fn(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["g"],
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
@pytest.mark.parametrize("g_kind", G_KINDS)
def test_chunk_matches_naive(g_kind, length, chunk_size, init):
    inputs = make_inputs(g_kind, length=length, init=init)
    check_all(run(chunk_simple_gla, inputs, chunk_size=chunk_size), run(naive_recurrent_simple_gla, inputs))


@pytest.mark.parametrize("g_kind", ["scalar", "channel"])
def test_strong_decay_does_not_overflow(g_kind):
    """g = -30 on half the steps: exp(-b_j) would overflow within a chunk; masks and segment sums come
    first."""
    inputs = make_inputs(g_kind, length=100, seed=3)
    with torch.no_grad():
        mask = torch.rand(inputs["g"].shape, generator=torch.Generator().manual_seed(0)) < 0.5
        inputs["g"].copy_(torch.where(mask, -30.0, -0.01))
    actual = run(chunk_simple_gla, inputs, chunk_size=64)
    assert all(torch.isfinite(x).all() for x in (actual[0], actual[1], *actual[2].values()))
    # per-channel decay only: its cross-sub-block scores subtract chunk prefix sums, |b| ~ 1000 here where
    # fp32 spacing is 6e-5 (see _per_channel_scores); the scalar path sums segments exactly
    check_all(actual, run(naive_recurrent_simple_gla, inputs), FP32_TOL if g_kind == "scalar" else 1e-4)


def test_naive_matches_quadratic_form_mamba2_mapping():
    """The spec against the attention form of SSD (Mamba-2), computed in fp64 independently of the loop:
    y = (L ∘ C Bᵀ) (Δ·x) + exp(cumsum ΔA) C h0, L[i, j] = exp(Σ_{j<s<=i} Δ_s A). Groups: B, C shared by
    heads."""
    gen = torch.Generator().manual_seed(9)
    batch, length, heads, groups, d_state, head_dim = 2, 37, 4, 2, 8, 6
    x = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=torch.float64)
    dt = F.softplus(torch.randn(batch, length, heads, generator=gen, dtype=torch.float64))
    a = -torch.rand(heads, generator=gen, dtype=torch.float64) * 2
    b_ssm = torch.randn(batch, length, groups, d_state, generator=gen, dtype=torch.float64)
    c_ssm = torch.randn(batch, length, groups, d_state, generator=gen, dtype=torch.float64)
    h0 = torch.randn(batch, heads, d_state, head_dim, generator=gen, dtype=torch.float64)
    to_heads = lambda t: t.repeat_interleave(heads // groups, dim=2)  # the caller broadcasts groups to heads
    q, k, v, g = to_heads(c_ssm), to_heads(b_ssm), dt[..., None] * x, dt * a

    y, h = naive_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)

    cum = g.cumsum(1).transpose(1, 2)  # (B, H, T)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, T, T)
    scores = torch.einsum("bihn,bjhn->bhij", q, k) * decay
    expected = torch.einsum("bhij,bjhp->bihp", scores, v)
    expected = expected + torch.einsum("bihn,bhnp,bhi->bihp", q, h0, cum.exp())
    to_end = (cum[..., -1:] - cum).exp()  # (B, H, T)
    expected_h = cum[..., -1, None, None].exp() * h0 + torch.einsum("bjhn,bjhp,bhj->bhnp", k, v, to_end)
    check("y", y, expected, 1e-12)
    check("final_state", h, expected_h, 1e-12)


@pytest.mark.parametrize("g_kind", G_KINDS)
@pytest.mark.parametrize("fn", [chunk_simple_gla, naive_recurrent_simple_gla], ids=["chunk", "naive"])
def test_varlen_matches_documents_alone(fn, g_kind):
    """3 packed documents of odd lengths = each document run alone from its own initial state."""
    cu_seqlens = torch.tensor([0, 13, 14, 37], dtype=torch.int32)
    packed = make_inputs(g_kind, batch=1, length=37, seed=4)
    packed["initial_state"] = torch.randn(3, 2, 16, 24).requires_grad_()
    actual = run(fn, packed, cu_seqlens=cu_seqlens, chunk_size=16)

    outs, states = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        doc = [None if packed[x] is None else packed[x][:, start:end] for x in ("q", "k", "v", "g")]
        o, s = naive_recurrent_simple_gla(
            *doc, initial_state=packed["initial_state"][n : n + 1], output_final_state=True
        )
        outs.append(o)
        states.append(s)
    o, state = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (
        state * torch.randn(state.shape, generator=gen)
    ).sum()
    names = [n for n in INPUT_NAMES if packed[n] is not None]
    grads = torch.autograd.grad(loss, [packed[n] for n in names])
    check_all(actual, (o, state, dict(zip(names, grads))))


@pytest.mark.parametrize("g_kind", G_KINDS)
def test_step_decode_matches_naive(g_kind):
    """Chunked prefill then token-by-token decode steps = one naive pass over the whole sequence."""
    inputs = {n: None if x is None else x.detach() for n, x in make_inputs(g_kind, length=40, seed=5).items()}
    args = [inputs[n] for n in ("q", "k", "v", "g")]
    expected, expected_state = naive_recurrent_simple_gla(
        *args, initial_state=inputs["initial_state"], output_final_state=True
    )
    prefill = 29
    o, state = chunk_simple_gla(
        *(None if x is None else x[:, :prefill] for x in args),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        chunk_size=16,
    )
    outs = [o]
    for t in range(prefill, 40):
        o_t, state = recurrent_simple_gla_step(*(None if x is None else x[:, t] for x in args), state)
        outs.append(o_t[:, None])
    check("o", torch.cat(outs, dim=1), expected, FP32_TOL)
    check("final_state", state, expected_state, FP32_TOL)


@pytest.mark.parametrize("g_kind", G_KINDS)
def test_bf16_forward(g_kind):
    inputs = {
        n: None if x is None else x.detach().bfloat16() for n, x in make_inputs(g_kind, length=100).items()
    }
    args = [inputs[n] for n in ("q", "k", "v", "g")]
    o, state = chunk_simple_gla(*args, initial_state=inputs["initial_state"], output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    # the reference sees the same bf16-rounded inputs, in fp32
    expected, expected_state = naive_recurrent_simple_gla(
        *(None if x is None else x.float() for x in args),
        initial_state=inputs["initial_state"].float(),
        output_final_state=True,
    )
    check("o", o, expected, BF16_TOL)
    check("final_state", state, expected_state, FP32_TOL)  # the state is never rounded to bf16


def test_torch_compile_traces_without_graph_breaks():
    inputs = make_inputs("scalar", length=37, seed=7)
    compiled = torch.compile(simple_gla, backend="aot_eager", fullgraph=True)  # dispatcher included
    check_all(run(compiled, inputs, chunk_size=16), run(chunk_simple_gla, inputs, chunk_size=16))


def test_dispatch_on_cpu(caplog):
    inputs = make_inputs("scalar", length=20, seed=8)
    args = [inputs[n] for n in ("q", "k", "v", "g")]
    expected = chunk_simple_gla(*args, initial_state=inputs["initial_state"])[0]
    fla_support._logged.discard("simple_gla:cpu")
    with caplog.at_level(logging.INFO, logger="hf_hybrid"):
        for _ in range(2):
            check("o", simple_gla(*args, initial_state=inputs["initial_state"])[0], expected, 0.0)
    assert sum("not on CUDA" in r.getMessage() for r in caplog.records) == 1  # logged once
    check(
        "o", simple_gla(*args, initial_state=inputs["initial_state"], backend="naive")[0], expected, FP32_TOL
    )
    with pytest.raises(ValueError, match="choose one of"):
        simple_gla(*args, backend="cuda")


def test_shape_errors_speak_clearly():
    x = make_inputs("scalar", length=5)
    with pytest.raises(ValueError, match="g must be"):
        chunk_simple_gla(x["q"], x["k"], x["v"], x["g"][..., :1])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"][:, :1])
    with pytest.raises(ValueError, match="end at T=5"):
        chunk_simple_gla(x["q"][:1], x["k"][:1], x["v"][:1], x["g"][:1], cu_seqlens=torch.tensor([0, 4]))
