"""Benchmark the linear-time token mixers' ops against their baselines, in one run.

Ops: ``gdn`` (Gated DeltaNet), ``simple_gla`` (scalar decay per head: the Mamba-2 / SSD form),
``linear_attention`` (simple GLA without decay).
CPU (default when no GPU): our chunked torch path vs the per-token recurrence (the spec), B=1, H=4, D=64,
forward, min ms over runs.
GPU: our chunked torch path vs fla-core's Triton kernel vs transformers' torch fallback
(``torch_chunk_gated_delta_rule`` of Qwen3-Next for GDN, ``chunk_kimi_delta_attention`` of Kimi Linear for
KDA, ``mamba2_chunk_scan`` of Mamba-2 for simple GLA; none for linear attention) vs SDPA causal attention,
B=1, H=16, D=128, bf16, forward and forward+backward, median CUDA-event milliseconds. A baseline that is
missing, refuses the call, or runs out of memory prints "n/a".

    python scripts/bench_linear.py                          # CPU, T = 512 ... 4096
    python scripts/bench_linear.py --device cuda             # GPU, T = 1K ... 32K
    python scripts/bench_linear.py --op simple_gla --lengths 1024 4096
    python scripts/bench_linear.py --op kda                  # Kimi Delta Attention (per-channel decay)

``bench_rows`` is the importable form (scripts/gpu_check.py uses it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_hybrid import compat
from hf_hybrid.ops.delta_rule import (
    chunk_gated_delta_rule,
    chunk_kda,
    fla_chunk_gated_delta_rule,
    fla_chunk_kda,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_kda,
)
from hf_hybrid.ops.simple_gla import chunk_simple_gla, naive_recurrent_simple_gla
from hf_hybrid.ops.simple_gla.fla import fla_chunk_simple_gla

NA = "n/a"
OPS = ("gdn", "kda", "simple_gla", "linear_attention")


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int, dtype, device, grad: bool):
    """Inputs of a GDN / KDA (q, k, v, g, beta), simple GLA (q, k, v, g) or linear attention (q, k, v) call,
    [B, T, H, D] layout."""
    shape = (batch, length, heads, dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    tensors = [q, k, v]
    if op != "linear_attention":
        g_shape = shape if op == "kda" else shape[:3]  # KDA: one log decay per key channel
        tensors.append(F.logsigmoid(torch.randn(g_shape, device=device) + 3.0))  # fp32 log decay
    if op in ("gdn", "kda"):
        tensors.append(torch.rand(batch, length, heads, device=device, dtype=dtype))  # beta
    return [t.requires_grad_(grad) for t in tensors]


def timer(device: str, warmup: int, iters: int) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of fn(): median of CUDA-event timings on GPU; on CPU the minimum of perf_counter timings
    (the least disturbed run: CPU machines are often shared, and load only ever adds time)."""

    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times) if device == "cuda" else min(times)

    return measure


def step(fn: Callable, inputs: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One forward (no autograd graph) or forward+backward call of ``fn(*inputs) -> o``."""

    def run() -> None:
        if backward:
            fn(*inputs).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*inputs)

    return run


def transformers_gdn() -> Callable | None:
    """transformers' torch fallback for GDN (unwrapped: with fla-core installed, the public name is fla's)."""
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next
    except Exception:
        return None
    return compat.torch_reference(modeling_qwen3_next.torch_chunk_gated_delta_rule)


def transformers_mamba2() -> Callable | None:
    """transformers' torch SSD fallback ``mamba2_chunk_scan`` as a simple-GLA call ``(q, k, v, g) -> o``.

    Mamba-2 is simple GLA with q = C, k = B, v = Δ·x, g = Δ·A and scale 1 (fla's ``chunk_simple_gla``): with
    A = -1 per head, Δ = -g and x = v / Δ, the scan computes the simple GLA of (q, k, v, g) at scale 1 (one
    group per head)."""
    try:
        from transformers.models.mamba2 import modeling_mamba2
    except Exception:
        return None
    scan = compat.torch_reference(getattr(modeling_mamba2, "mamba2_chunk_scan", None))
    if getattr(scan, "__name__", "") != "mamba2_chunk_scan":
        return None  # an older transformers without the standalone scan

    def run(q, k, v, g):
        dt = -g
        minus_one = -torch.ones(q.shape[2], device=q.device, dtype=torch.float32)
        return scan(v / dt[..., None].to(v.dtype), dt, minus_one, k, q, chunk_size=64)

    return run


def transformers_kda() -> Callable | None:
    """transformers' torch fallback for KDA (Kimi Linear; unwrapped like ``transformers_gdn``)."""
    try:
        from transformers.models.kimi_linear import modeling_kimi_linear
    except Exception:
        return None
    return compat.torch_reference(modeling_kimi_linear.chunk_kimi_delta_attention)


def candidates(op: str, device: str, compile_ours: bool) -> dict[str, Callable | None]:
    """name -> fn(*inputs) returning the output, or None when the baseline is unavailable."""
    if op == "kda":
        ours = lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, use_qk_l2norm=True)[0]
        naive = lambda q, k, v, g, b: naive_recurrent_kda(q, k, v, g, b, use_qk_l2norm=True)[0]
        fla = lambda q, k, v, g, b: fla_chunk_kda(q, k, v, g, b, use_qk_l2norm=True)[0]
        hf_fn = transformers_kda()
        hf = (
            None
            if hf_fn is None
            else lambda q, k, v, g, b: hf_fn(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
        )
    elif op == "gdn":
        ours = lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True)[0]
        naive = lambda q, k, v, g, b: naive_recurrent_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True)[0]
        fla = lambda q, k, v, g, b: fla_chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True)[0]
        hf_fn = transformers_gdn()
        hf = (
            None
            if hf_fn is None
            else lambda q, k, v, g, b: hf_fn(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
        )
    elif op == "simple_gla":
        ours = lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0]
        naive = lambda q, k, v, g: naive_recurrent_simple_gla(q, k, v, g)[0]
        fla = lambda q, k, v, g: fla_chunk_simple_gla(q, k, v, g)[0]
        hf = transformers_mamba2()
    elif op == "linear_attention":
        ours = lambda q, k, v: chunk_simple_gla(q, k, v, None)[0]
        naive = lambda q, k, v: naive_recurrent_simple_gla(q, k, v, None)[0]
        fla = lambda q, k, v: fla_chunk_simple_gla(q, k, v, None)[0]
        hf = None  # transformers has no plain linear-attention op
    else:
        raise ValueError(f"op={op!r} is not known; choose one of: {', '.join(OPS)}")
    if compile_ours:
        ours = torch.compile(ours)
    if device == "cpu":
        return {"ours": ours, "naive": naive}
    sdpa = lambda q, k, v, *_: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return {"ours": ours, "fla": fla, "transformers": hf, "sdpa": sdpa}


def measure_or_na(
    measure, fn, inputs, backward: bool, on_error: Callable[[str], None] = print
) -> float | str:
    if fn is None:
        return NA
    try:
        return measure(step(fn, inputs, backward))
    except (RuntimeError, ImportError, torch.cuda.OutOfMemoryError) as error:  # refused, missing, or OOM
        on_error(f"    ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:100]})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return NA


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--op", choices=OPS, default="gdn")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths T (default per device)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: fp32 CPU, bf16 GPU"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, help="default: 4 on CPU, 16 on GPU")
    parser.add_argument("--dim", type=int, help="head dim (default: 64 on CPU, 128 on GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--modes", nargs="+", choices=["fwd", "fwd+bwd"], help="default: fwd on CPU, both on GPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our chunked path")
    parser.add_argument(
        "--naive-max-len", type=int, default=4096, help="skip the slow per-token loop above this T"
    )
    parser.add_argument(
        "--hf-max-len", type=int, default=16384, help="skip transformers' fallback above this T"
    )
    args = parser.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384, 32768] if gpu else [512, 1024, 2048, 4096])
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    heads, dim = args.heads or (16 if gpu else 4), args.dim or (128 if gpu else 64)
    modes = args.modes or (["fwd", "fwd+bwd"] if gpu else ["fwd"])
    fns = candidates(args.op, device, args.compile)
    measure = timer(device, args.warmup, args.iters)
    print(
        f"{args.op} on {torch.cuda.get_device_name() if gpu else 'CPU'} ({torch.get_num_threads()} threads), "
        f"B={args.batch} H={heads} D={dim} {dtype}, {'median' if gpu else 'min'} ms of {args.iters} runs"
    )

    for mode, length, row in bench_rows(
        args.op,
        device,
        lengths,
        dtype,
        args.batch,
        heads,
        dim,
        modes,
        fns,
        measure,
        naive_max_len=args.naive_max_len,
        hf_max_len=args.hf_max_len,
    ):
        if length == lengths[0]:
            header = f"{'T':>6} | " + " | ".join(f"{name:>12}" for name in fns)
            header += " | " + " | ".join(f"{name + '/ours':>17}" for name in fns if name != "ours")
            print(f"\n[{mode}]\n{header}\n{'-' * len(header)}")
        cells = [f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}" for v in row.values()]
        ratios = []
        for name, value in row.items():
            if name == "ours":
                continue
            ok = isinstance(value, float) and isinstance(row["ours"], float)
            ratios.append(f"{value / row['ours']:>16.2f}x" if ok else f"{NA:>17}")
        print(f"{length:>6} | " + " | ".join(cells) + " | " + " | ".join(ratios), flush=True)


def bench_rows(
    op: str,
    device: str,
    lengths: list[int],
    dtype,
    batch: int,
    heads: int,
    dim: int,
    modes: list[str],
    fns: dict[str, Callable | None],
    measure,
    *,
    naive_max_len: int,
    hf_max_len: int,
    keep_going: Callable[[], bool] = lambda: True,
    on_error: Callable[[str], None] = print,
):
    """Yield (mode, T, {candidate: ms or "n/a"}) for every mode and length, one row at a time; stops early
    when ``keep_going()`` turns False (a time budget). ``on_error`` gets the reason of each "n/a"."""
    for mode in modes:
        backward = mode == "fwd+bwd"
        for length in lengths:
            if not keep_going():
                return
            inputs = make_inputs(op, batch, length, heads, dim, dtype, device, grad=backward)
            row = {}
            for name, fn in fns.items():
                too_long = (name == "naive" and length > naive_max_len) or (
                    name == "transformers" and length > hf_max_len
                )
                row[name] = NA if too_long else measure_or_na(measure, fn, inputs, backward, on_error)
            yield mode, length, row


if __name__ == "__main__":
    main()
