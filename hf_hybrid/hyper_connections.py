"""Hyper-connection residual streams (``HybridConfig.hyper_connections``): ``hc_mult`` copies of the residual
stream instead of one.

Per branch (mixer or MLP), from the ``N`` streams ``s [B, T, N, H]`` of a token, a one-layer perceptron on
``RMS-normalised flatten(s)`` (no weight) gives

- ``pre [N]``: ``sigmoid(·) + eps``, collapses the streams into the branch input ``Σ_n pre_n s_n``;
- ``post [N]``: ``magnitude · sigmoid(·)`` (+ eps for iHC), spreads the branch output ``y`` over the streams;
- mHC only, ``comb [N, N]``: ``softmax(·) + eps`` projected towards a doubly stochastic matrix by
  ``hc_sinkhorn_iters`` Sinkhorn-Knopp steps, mixes the streams: ``s'_j = Σ_i comb_ij s_i + post_j y``.
  iHC keeps each stream: ``s'_j = s_j + post_j y``.

The model copies the embeddings into the ``N`` streams and collapses them before the final norm: iHC with
learned weights (``HyperHead``), mHC with the mean. Everything is per token (positions, padding, packing and
the cache are untouched). The weights are computed in fp32 and the parameters stay fp32 whatever the model
dtype (HY-V4 keeps them fp32; so do we for mHC, whose GLM-5-Next projection ``fn`` is stored in the model
dtype there but also used in fp32). Mirrors ``HYV4HyperConnection`` / ``HYV4HyperHead`` (iHC) and
``Glm5NextTextHyperConnection`` / ``Glm5NextTextHyperHead`` (mHC) of transformers, including where each
rounds to the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Parameters of these modules stay fp32 through loading (transformers' ``_keep_in_fp32_modules_strict``
# patterns) and dtype casts (``_apply`` below).
FP32_MODULE_NAMES = ("mixer_hc", "mlp_hc", "hc_head")


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)


class _Fp32Params(nn.Module):
    def _apply(self, fn, recurse: bool = True):
        # Keep the parameters fp32 through model.to(bf16) / .half(): stash before the cast, restore after.
        saved = {name: p.data for name, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            p = self._parameters[name]
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self


def hc_widths(kind: str, n: int) -> tuple[int, int]:
    """(rows of ``fn`` / ``base``, entries of ``scale``) of one branch's hyper-connection."""
    return (2 * n, 2) if kind == "ihc" else ((2 + n) * n, 3)


def hyper_connection_params(config, layer_idx: int, has_mixer: bool, has_mlp: bool) -> tuple[int, int, int]:
    """(params, matmul params, stream FLOPs per token) the hyper-connections add to a layer (one module per
    branch it has). The stream FLOPs are the per-token contractions with the streams besides ``fn``:
    collapsing them with ``pre`` (N·H multiply-adds), adding the output with ``post`` (N·H) and, for mHC,
    mixing them with ``comb`` (N²·H), 2 FLOPs each."""
    kind = getattr(config, "hyper_connections", "none")
    if kind == "none":
        return 0, 0, 0
    n, h = config.hc_mult, config.hidden_size
    rows, scales = hc_widths(kind, n)
    branches = int(has_mixer) + int(has_mlp)
    stream_macs = 2 * n * h + (n * n * h if kind == "mhc" else 0)
    return branches * (rows * n * h + rows + scales), branches * rows * n * h, branches * 2 * stream_macs


def hyper_head_params(config) -> tuple[int, int, int]:
    """(params, matmul params, stream FLOPs per token) of the model's stream-collapsing head (iHC: learned,
    ``fn`` [N, N·H] is a matmul per token; mHC: the mean, none); collapsing the N streams is N·H
    multiply-adds either way."""
    kind = getattr(config, "hyper_connections", "none")
    if kind == "none":
        return 0, 0, 0
    n, h = config.hc_mult, config.hidden_size
    if kind != "ihc":
        return 0, 0, 2 * n * h
    return n * n * h + n + 1, n * n * h, 2 * n * h


class HyperConnection(_Fp32Params):
    """One branch's hyper-connection: ``forward(streams) -> (post, comb | None, branch input)`` and
    ``expand(streams, branch output, post, comb) -> new streams``."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.hyper_connections
        self.n = config.hc_mult
        self.eps = float(config.hc_eps)
        self.norm_eps = float(config.rms_norm_eps)
        self.magnitude = float(config.hc_magnitude)
        self.sinkhorn_iters = int(config.hc_sinkhorn_iters)
        rows, scales = hc_widths(self.kind, self.n)
        self.fn = nn.Parameter(torch.empty(rows, self.n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(rows, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(scales, dtype=torch.float32))

    def init_hybrid_weights(self, init_module, config) -> None:
        init_module.normal_(self.fn, mean=0.0, std=config.initializer_range)
        if self.kind == "ihc":  # HY-V4: pre starts near 1/(N-1) per stream, post near magnitude/2
            init_module.constant_(self.scale, 0.01)
            base = torch.zeros_like(self.base)
            base[: self.n] = -math.log(max(self.n - 1, 1))
            init_module.copy_(self.base, base)
        else:  # GLM-5-Next
            init_module.zeros_(self.base)
            init_module.ones_(self.scale)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        n = self.n
        with torch.autocast(device_type=streams.device.type, enabled=False):
            flat = streams.flatten(2).float()
            if self.kind == "ihc":
                mixes = F.linear(flat, self.fn.float()) * _inverse_rms(flat, self.norm_eps)
                pre_w, post_w = mixes.split(n, dim=-1)
                pre_b, post_b = self.base.split(n)
                pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.eps
                post = self.magnitude * torch.sigmoid(post_w * self.scale[1] + post_b) + self.eps
                collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2)
                return post, None, collapsed.to(streams.dtype)
            normed = flat * _inverse_rms(flat, self.norm_eps).to(flat.dtype)
            mixes = F.linear(normed, self.fn.float())
            pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
            pre_b, post_b, comb_b = self.base.split([n, n, n * n])
            pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.eps
            post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
            comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
            comb = torch.softmax(comb_w * self.scale[2] + comb_b.view(n, n), dim=-1) + self.eps
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
            for _ in range(self.sinkhorn_iters - 1):
                comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
                comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
            collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
            return post, comb, collapsed

    def expand(
        self, streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor | None
    ) -> torch.Tensor:
        """New streams from the branch input ``streams`` [B, T, N, H] and its output ``out`` [B, T, H]."""
        dtype = streams.dtype
        if comb is None:  # iHC, in fp32 (HY-V4)
            return (post.unsqueeze(-1) * out.float().unsqueeze(-2) + streams.float()).to(dtype)
        # mHC, in the model dtype (GLM-5-Next)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
            comb.to(dtype).transpose(-1, -2), streams
        )


class HyperHead(_Fp32Params):
    """Collapses the streams [B, T, N, H] into one [B, T, H] before the final norm: learned weights (iHC,
    HY-V4's ``hc_head``) or the mean (mHC, GLM-5-Next)."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.hyper_connections
        self.n = config.hc_mult
        self.eps = float(config.hc_eps)
        self.norm_eps = float(config.rms_norm_eps)
        if self.kind == "ihc":
            self.fn = nn.Parameter(torch.empty(self.n, self.n * config.hidden_size, dtype=torch.float32))
            self.base = nn.Parameter(torch.empty(self.n, dtype=torch.float32))
            self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def init_hybrid_weights(self, init_module, config) -> None:
        if self.kind == "ihc":
            init_module.normal_(self.fn, mean=0.0, std=config.initializer_range)
            init_module.constant_(self.scale, 0.01)
            init_module.constant_(self.base, -math.log(max(self.n - 1, 1)))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if self.kind != "ihc":
            return streams.mean(dim=2)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            flat = streams.flatten(2).float()
            mixes = F.linear(flat, self.fn.float()) * _inverse_rms(flat, self.norm_eps)
            pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.eps
            return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def naive_hyper_connection(module: HyperConnection, streams: torch.Tensor, branch) -> torch.Tensor:
    """Reference for one branch, token by token in float64 with explicit loops: the new streams of
    ``branch`` (a function [H] -> [H]) applied to the collapsed streams. For tests."""
    b, t, n, h = streams.shape
    fn, base, scale = (p.detach().double() for p in (module.fn, module.base, module.scale))
    out = torch.empty(b, t, n, h, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            s = streams[i, j].double()
            flat = s.reshape(-1)
            normed = flat / torch.sqrt((flat * flat).mean() + module.norm_eps)
            logits = fn @ normed
            pre = torch.tensor(
                [1 / (1 + math.exp(-float(logits[k] * scale[0] + base[k]))) for k in range(n)],
                dtype=torch.float64,
            )
            pre = pre + module.eps
            post = torch.tensor(
                [1 / (1 + math.exp(-float(logits[n + k] * scale[1] + base[n + k]))) for k in range(n)],
                dtype=torch.float64,
            )
            x = sum(pre[k] * s[k] for k in range(n))
            y = branch(x).double()
            if module.kind == "ihc":
                post = module.magnitude * post + module.eps
                out[i, j] = torch.stack([s[k] + post[k] * y for k in range(n)])
                continue
            post = 2 * post
            raw = (logits[2 * n :] * scale[2] + base[2 * n :]).view(n, n)
            comb = torch.exp(raw - raw.max(dim=-1, keepdim=True).values)
            comb = comb / comb.sum(dim=-1, keepdim=True) + module.eps
            comb = comb / (comb.sum(dim=0, keepdim=True) + module.eps)
            for _ in range(module.sinkhorn_iters - 1):
                comb = comb / (comb.sum(dim=1, keepdim=True) + module.eps)
                comb = comb / (comb.sum(dim=0, keepdim=True) + module.eps)
            out[i, j] = torch.stack(
                [sum(comb[k, m] * s[k] for k in range(n)) + post[m] * y for m in range(n)]
            )
    return out


__all__ = [
    "FP32_MODULE_NAMES",
    "HyperConnection",
    "HyperHead",
    "hyper_connection_params",
    "hyper_head_params",
    "naive_hyper_connection",
]
