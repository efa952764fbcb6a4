"""Benchmark the linear-time token mixers' ops against their baselines, in one run.

CPU (default when no GPU): our chunked torch path vs the per-token recurrence (the spec), B=1, H=4, D=64,
forward, min ms over runs.
GPU: our chunked torch path vs fla-core's Triton kernel vs transformers' torch fallback
(``torch_chunk_gated_delta_rule`` of Qwen3-Next, ``chunk_kimi_delta_attention`` of Kimi Linear) vs SDPA causal
attention, B=1, H=16, D=128, bf16, forward and forward+backward, median CUDA-event milliseconds. A baseline that is missing, refuses the call, or runs out of
memory prints "n/a".

    python scripts/bench_linear.py                          # CPU, T = 512 ... 4096
    python scripts/bench_linear.py --device cuda             # GPU, T = 1K ... 32K
    python scripts/bench_linear.py --op simple_gla --lengths 1024 4096
    python scripts/bench_linear.py --op kda                  # Kimi Delta Attention (per-channel decay)
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_hybrid.ops.gated_delta import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from hf_hybrid.ops.gated_delta.fla import fla_chunk_gated_delta_rule
from hf_hybrid.ops.kda import chunk_kda, naive_recurrent_kda
from hf_hybrid.ops.kda.fla import fla_chunk_kda
from hf_hybrid.ops.simple_gla import chunk_simple_gla, naive_recurrent_simple_gla
from hf_hybrid.ops.simple_gla.fla import fla_chunk_simple_gla

NA = "n/a"


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int, dtype, device, grad: bool):
    """Inputs of a GDN / KDA (q, k, v, g, beta) or simple GLA (q, k, v, g) call, [B, T, H, D] layout."""
    shape = (batch, length, heads, dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    g_shape = shape if op == "kda" else shape[:3]  # KDA: one log decay per key channel
    g = F.logsigmoid(torch.randn(g_shape, device=device) + 3.0)  # fp32 log decay
    tensors = [q, k, v, g]
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
    return inspect.unwrap(modeling_qwen3_next.torch_chunk_gated_delta_rule)


def transformers_kda() -> Callable | None:
    """transformers' torch fallback for KDA (Kimi Linear; unwrapped like ``transformers_gdn``)."""
    try:
        from transformers.models.kimi_linear import modeling_kimi_linear
    except Exception:
        return None
    return inspect.unwrap(modeling_kimi_linear.chunk_kimi_delta_attention)


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
    else:
        ours = lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0]
        naive = lambda q, k, v, g: naive_recurrent_simple_gla(q, k, v, g)[0]
        fla = lambda q, k, v, g: fla_chunk_simple_gla(q, k, v, g)[0]
        hf = None
    if compile_ours:
        ours = torch.compile(ours)
    if device == "cpu":
        return {"ours": ours, "naive": naive}
    sdpa = lambda q, k, v, *_: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return {"ours": ours, "fla": fla, "transformers": hf, "sdpa": sdpa}


def measure_or_na(measure, fn, inputs, backward: bool) -> float | str:
    if fn is None:
        return NA
    try:
        return measure(step(fn, inputs, backward))
    except (RuntimeError, ImportError, torch.cuda.OutOfMemoryError) as error:  # refused, missing, or OOM
        print(f"    ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return NA


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--op", choices=["gdn", "simple_gla", "kda"], default="gdn")
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

    for mode in modes:
        backward = mode == "fwd+bwd"
        header = f"{'T':>6} | " + " | ".join(f"{name:>12}" for name in fns)
        header += " | " + " | ".join(f"{name + '/ours':>17}" for name in fns if name != "ours")
        print(f"\n[{mode}]\n{header}\n{'-' * len(header)}")
        for length in lengths:
            inputs = make_inputs(args.op, args.batch, length, heads, dim, dtype, device, grad=backward)
            row = {}
            for name, fn in fns.items():
                too_long = (name == "naive" and length > args.naive_max_len) or (
                    name == "transformers" and length > args.hf_max_len
                )
                row[name] = NA if too_long else measure_or_na(measure, fn, inputs, backward)
            cells = [f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}" for v in row.values()]
            ratios = []
            for name, value in row.items():
                if name == "ours":
                    continue
                ok = isinstance(value, float) and isinstance(row["ours"], float)
                ratios.append(f"{value / row['ours']:>16.2f}x" if ok else f"{NA:>17}")
            print(f"{length:>6} | " + " | ".join(cells) + " | " + " | ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
