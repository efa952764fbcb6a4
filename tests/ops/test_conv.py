"""Causal depthwise conv: against a per-tap reference, split/step invariance, packing and padding that never
leak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_hybrid.ops.conv import causal_conv1d, causal_conv1d_step

# fp32: the same few products summed in a different order (conv1d kernel vs the explicit taps).
FP32_TOL = 1e-6


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def reference(x, weight, bias, activation, initial_state):
    """y_t = act(bias + Σ_i w[:, i] x_{t-K+1+i}) over [initial_state, x]; final state = last K-1 inputs."""
    batch, length, channels = x.shape
    width = weight.shape[1] - 1
    x_ext = torch.cat([initial_state.transpose(1, 2), x], dim=1)  # (B, K-1+T, C)
    ys = []
    for t in range(length):
        y = sum(weight[:, i] * x_ext[:, t + i] for i in range(width + 1))
        y = y + (0 if bias is None else bias)
        ys.append(F.silu(y) if activation == "silu" else y)
    return torch.stack(ys, dim=1), x_ext[:, x_ext.shape[1] - width :].transpose(1, 2)


def make(batch=2, length=11, channels=6, width=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen)
    weight = torch.randn(channels, width, generator=gen)
    bias = torch.randn(channels, generator=gen)
    state = torch.randn(batch, channels, width - 1, generator=gen)
    return x, weight, bias, state


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference(width, activation, with_state):
    x, weight, bias, state = make(width=width)
    state = state if with_state else torch.zeros_like(state)
    y, final = causal_conv1d(
        x, weight, bias, activation=activation, initial_state=state if with_state else None
    )
    y_ref, final_ref = reference(x, weight, bias, activation, state)
    close(y, y_ref)
    close(final, final_ref)


def test_split_and_step_decode_match_full():
    """Full pass = prefill of 7 tokens + continuation from its state = prefill + one step per token."""
    x, weight, bias, state = make(length=11)
    y_full, final_full = causal_conv1d(x, weight, bias, initial_state=state)
    y_a, mid = causal_conv1d(x[:, :7], weight, bias, initial_state=state)
    y_b, final_b = causal_conv1d(x[:, 7:], weight, bias, initial_state=mid)
    close(torch.cat([y_a, y_b], dim=1), y_full)
    close(final_b, final_full)
    steps, running = [], mid
    for t in range(7, 11):
        y_t, running = causal_conv1d_step(x[:, t], running, weight, bias)
        steps.append(y_t)
    close(torch.stack(steps, dim=1), y_full[:, 7:])
    close(running, final_full)


def test_packed_documents_do_not_see_each_other():
    """cu_seqlens: each document = run alone from its own initial state; gradients of everything match."""
    x, weight, bias, _ = make(batch=1, length=16, seed=1)
    states = torch.randn(3, x.shape[2], weight.shape[1] - 1)
    cu_seqlens = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, states)]
    y, final = causal_conv1d(*leaves[:3], initial_state=leaves[3], cu_seqlens=cu_seqlens)

    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias, states)]
    ys, finals = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        y_n, f_n = causal_conv1d(
            ref_leaves[0][:, start:end], *ref_leaves[1:3], initial_state=ref_leaves[3][n : n + 1]
        )
        ys.append(y_n)
        finals.append(f_n)
    y_ref, final_ref = torch.cat(ys, dim=1), torch.cat(finals, dim=0)
    close(y, y_ref)
    close(final, final_ref)
    w_y, w_f = torch.randn(y.shape), torch.randn(final.shape)
    grads = torch.autograd.grad((y * w_y).sum() + (final * w_f).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (final_ref * w_f).sum(), ref_leaves)
    for g, g_ref in zip(grads, grads_ref):
        close(g, g_ref)


def test_right_padding_does_not_leak():
    """Garbage in right-padded slots changes nothing; the final state is the last K-1 *real* inputs."""
    x, weight, bias, state = make(batch=2, length=9, seed=2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False  # row 0: 6 real tokens then padding
    x_padded = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    y, final = causal_conv1d(x_padded, weight, bias, initial_state=state, padding_mask=mask)
    y0, final0 = causal_conv1d(x[:1, :6], weight, bias, initial_state=state[:1])
    y1, final1 = causal_conv1d(x[1:], weight, bias, initial_state=state[1:])
    close(y[0, :6], y0[0])
    assert (y[0, 6:] == 0).all()
    close(y[1], y1[0])
    close(final, torch.cat([final0, final1]))


def test_left_padding_equals_zero_initial_state():
    """Left padding (prefill of a left-padded batch) = the real tokens alone from a zero state."""
    x, weight, bias, _ = make(batch=2, length=9, seed=3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :7] = False  # row 0: only 2 real tokens, fewer than K-1 = 3
    x_padded = torch.where(mask[..., None], x, torch.full_like(x, -1e4))
    y, final = causal_conv1d(x_padded, weight, bias, padding_mask=mask)
    y0, final0 = causal_conv1d(x[:1, 7:], weight, bias)
    close(y[0, 7:], y0[0])
    assert (y[0, :7] == 0).all()
    close(final[0], final0[0])


def test_row_without_real_tokens_keeps_its_state():
    x, weight, bias, state = make(batch=2, length=5, seed=4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    _, final = causal_conv1d(x, weight, bias, initial_state=state, padding_mask=mask)
    close(final[1], state[1])


def test_errors_speak_clearly():
    x, weight, bias, state = make()
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, weight.T, bias)
    with pytest.raises(ValueError, match="not both"):
        causal_conv1d(x[:1], weight, bias, cu_seqlens=torch.tensor([0, 11]), padding_mask=torch.ones(1, 11))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, activation="gelu")


def test_cu_seqlens_from_position_ids():
    """A document starts at t = 0, where the position is 0, and where it does not increase by one."""
    from hf_hybrid.ops.varlen import cu_seqlens_from_position_ids

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 7, 8, 3, 0]])
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 8, 9, 10]
    assert cu_seqlens_from_position_ids(torch.tensor([[4, 5, 6]])).tolist() == [0, 3]
