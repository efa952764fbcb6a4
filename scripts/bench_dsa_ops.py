"""Benchmark the DSA ops against dense attention, printing times, peak memory and ratios from one run.

CPU (always): sparse attention (torch gather path) vs dense causal SDPA vs the dense-masked naive DSA
(what transformers' deepseek_v32 does), forward and forward+backward, T = 1024..4096, K = T/4 (``--cpu-K``
fixes K), each as a ratio to SDPA; the dense dispatch a DSA layer takes at K >= T (SDPA through
``dense_visible_attention``); and the
streaming indexer top-k vs dense scores + sort. Peak memory is the rise of the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) over the RSS before the call: large tensors are mmap'd, so
RSS follows tensor allocations closely.

GPU (when CUDA is available): Triton vs torch vs SDPA, forward and forward+backward, T = 8K..128K,
K = 2048, B = 1, bf16: GQA (H = 16, Hkv = 4, D = 128) and MLA latent (H = 16, Hkv = 1, Dqk = 576,
Dv = 512); indexer top-k (HI = 64, DI = 128) torch vs fused Triton logits. Medians of CUDA-event
timings; peak memory from ``torch.cuda.max_memory_allocated``; out-of-memory is reported, not fatal.

    python scripts/bench_dsa_ops.py                # everything the machine has
    python scripts/bench_dsa_ops.py --cpu-only --cpu-T 1024 2048
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_hybrid.ops.dsa import dense_visible_attention, indexer_topk, sparse_attention
from hf_hybrid.ops.dsa.naive import indexer_scores_naive, sparse_attention_naive, topk_indices

MiB = 2**20


# --------------------------------------------------------------------------------------------- helpers


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak RSS rise during fn(), in MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_bytes("VmRSS")
    out = fn()
    peak = _rss_bytes("VmHWM")
    del out
    gc.collect()
    return (peak - base) / MiB


def cpu_time_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_time_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / MiB


def guarded(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except torch.OutOfMemoryError:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def fmt(x: float | None, unit: str = "") -> str:
    return "OOM" if x is None else f"{x:.1f}{unit}" if x >= 10 else f"{x:.2f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def causal_selection(B: int, T: int, K: int, device, seed: int = 0) -> torch.Tensor:
    """A realistic selection without running an indexer: the K most recent keys are a poor proxy (they are
    contiguous), so take the last 64 keys plus K - 64 random earlier ones, distinct, -1 where t < K."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(B, T, T, generator=g) if T <= 4096 else None
    if scores is not None:
        t = torch.arange(T)
        scores = scores + (t[None, :] > t[:, None] - 64).float()  # recent keys first
        scores = scores.masked_fill(t[None, :] > t[:, None], float("-inf"))
        return topk_indices(scores, K).to(device)
    # long sequences: per query, random distinct earlier keys (sorted positions do not matter), drawn on the
    # target device (a CPU top-k over [1024, T] rows takes minutes at T = 128K)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.empty(B, T, K, dtype=torch.int64, device=device)
    for t0 in range(0, T, 1024):
        t1 = min(T, t0 + 1024)
        r = torch.rand(B, t1 - t0, T, generator=g, device=device)
        t = torch.arange(t0, t1, device=device)
        r = r.masked_fill(torch.arange(T, device=device)[None, None, :] > t[None, :, None], -1.0)
        vals, ids = r.topk(K, dim=-1)
        idx[:, t0:t1] = torch.where(vals >= 0, ids, -1)
    return idx


def sdpa_causal(q, k, v, scale):
    G = q.shape[2] // k.shape[2]
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=G > 1
    ).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- CPU


def _fwd_and_fwd_bwd(op: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]):
    def fwd():
        with torch.no_grad():
            return op()

    def fwd_bwd():
        o = op()
        o.backward(torch.ones_like(o))
        for x in leaves:
            x.grad = None

    return fwd, fwd_bwd


def _cpu_attention_rows(T: int, K: int, reps: int, B=1, H=8, Hkv=2, D=64) -> dict[str, tuple]:
    scale = D**-0.5
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, requires_grad=True)
    idx = causal_selection(B, T, K, "cpu")
    ops = {
        "SDPA dense causal": lambda: sdpa_causal(q, k, v, scale),
        "DSA naive (masked)": lambda: sparse_attention_naive(q, k, v, idx, scale=scale),
        "DSA torch (gather)": lambda: sparse_attention(q, k, v, idx, scale=scale, backend="torch"),
        "DSA at K>=T (dispatch)": lambda: dense_visible_attention(q, k, v, scale=scale),
    }
    rows = {}
    for name, op in ops.items():
        if name.startswith("DSA naive") and T > 2048:
            rows[name] = None  # O(H·T²) fp32 masks: skipped
            continue
        fwd, fwd_bwd = _fwd_and_fwd_bwd(op, (q, k, v))
        rows[name] = (
            cpu_time_ms(fwd, reps),
            cpu_peak_mib(fwd),
            cpu_time_ms(fwd_bwd, reps),
            cpu_peak_mib(fwd_bwd),
        )
    return rows


def _cpu_indexer_rows(T: int, K: int, reps: int, B=1, HI=8, DI=64) -> dict[str, tuple]:
    q_I, k_I, w = torch.randn(B, T, HI, DI), torch.randn(B, T, DI), torch.rand(B, T, HI)
    ops = {
        "dense scores + sort (naive)": lambda: topk_indices(indexer_scores_naive(q_I, k_I, w), K),
        "streaming (128 x 1024)": lambda: indexer_topk(
            q_I, k_I, w, topk=K, query_chunk=128, key_chunk=1024, backend="torch"
        ),
    }
    return {name: (cpu_time_ms(op, reps), cpu_peak_mib(op)) for name, op in ops.items()}


def bench_cpu(Ts: list[int], K: int | None, reps: int) -> None:
    k_text = "T/4" if K is None else str(K)
    print(
        f"\n== CPU sparse attention: B=1 H=8 Hkv=2 D=64 K={k_text} fp32, {torch.get_num_threads()} threads =="
    )
    print(
        f"{'T':>6} {'op':>22} | {'fwd ms':>9} {'fwd MiB':>9} | "
        f"{'f+b ms':>9} {'f+b MiB':>9} | f+b vs SDPA: ms, MiB"
    )
    for T in Ts:
        rows = _cpu_attention_rows(T, K or T // 4, reps)
        base = rows["SDPA dense causal"]
        for name, row in rows.items():
            if row is None:
                print(f"{T:>6} {name:>22} | {'skipped: O(H*T^2) memory':>43} |")
                continue
            tf, mf, tb, mb = row
            print(
                f"{T:>6} {name:>22} | {fmt(tf):>9} {fmt(mf):>9} | {fmt(tb):>9} {fmt(mb):>9} | "
                f"{ratio(tb, base[2])}, {ratio(mb, base[3])}"
            )
    print(f"\n== CPU indexer top-k: B=1 HI=8 DI=64 K={k_text} ==")
    print(f"{'T':>6} {'op':>28} | {'ms':>9} {'MiB':>9}")
    for T in Ts:
        for name, (t, m) in _cpu_indexer_rows(T, K or T // 4, max(1, reps // 2)).items():
            print(f"{T:>6} {name:>28} | {fmt(t):>9} {fmt(m):>9}")


# ----------------------------------------------------------------------------------------------- GPU


def _gpu_attention_rows(
    T,
    K,
    reps,
    torch_max_T,
    H,
    Hkv,
    Dqk,
    Dv,
    scale,
    *,
    dev="cuda",
    dt=torch.bfloat16,
    time_ms=gpu_time_ms,
    peak_mib=gpu_peak_mib,
) -> dict[str, tuple]:
    """{op: (fwd ms, fwd+bwd ms, fwd+bwd peak GiB)}, None for out-of-memory. ``time_ms(fn, reps)`` and
    ``peak_mib(fn)`` measure (CUDA events and allocator peaks by default; scripts/gpu_check.py's CPU dry run
    passes CPU ones)."""
    q = torch.randn(1, T, H, Dqk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, T, Hkv, Dqk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, T, Hkv, Dv, device=dev, dtype=dt, requires_grad=True)
    idx = causal_selection(1, T, K, dev)
    ops = {
        # Dqk != Dv: SDPA falls back to its mem-efficient kernel; still the dense baseline
        "sdpa": lambda: sdpa_causal(q, k, v, scale),
        "triton": lambda: sparse_attention(q, k, v, idx, scale=scale, backend="triton"),
        "torch": lambda: sparse_attention(q, k, v, idx, scale=scale, backend="torch"),
    }
    rows = {}
    for name, op in ops.items():
        if name == "torch" and T > torch_max_T:
            continue
        fwd, fwd_bwd = _fwd_and_fwd_bwd(op, (q, k, v))
        n = reps if name != "torch" else max(1, reps // 5)
        rows[name] = (
            guarded(lambda fwd=fwd, n=n: time_ms(fwd, n)),
            guarded(lambda fwd_bwd=fwd_bwd, n=n: time_ms(fwd_bwd, n)),
            guarded(lambda fwd_bwd=fwd_bwd: peak_mib(fwd_bwd) / 1024),
        )
    return rows


def _gpu_indexer_rows(
    T,
    K,
    reps,
    torch_max_T,
    HI=64,
    DI=128,
    *,
    dev="cuda",
    dt=torch.bfloat16,
    time_ms=gpu_time_ms,
    peak_mib=gpu_peak_mib,
    chunks=(("torch", (64, 8192)), ("triton", (256, 16384))),
) -> dict[str, tuple]:
    """{backend: (ms, peak GiB)} of the streaming indexer top-k; ``chunks``: (backend, (query, key chunk))."""
    q_I = torch.randn(1, T, HI, DI, device=dev, dtype=dt)
    k_I = torch.randn(1, T, DI, device=dev, dtype=dt)
    w = torch.rand(1, T, HI, device=dev) * HI**-0.5 * DI**-0.5
    rows = {}
    for backend, (qc, kc) in chunks:
        if backend == "torch" and T > torch_max_T:
            continue

        def op(backend=backend, qc=qc, kc=kc):
            return indexer_topk(q_I, k_I, w, topk=K, query_chunk=qc, key_chunk=kc, backend=backend)

        rows[backend] = (
            guarded(lambda op=op: time_ms(op, reps)),
            guarded(lambda op=op: peak_mib(op) / 1024),
        )
    return rows


def bench_gpu(Ts: list[int], K: int, reps: int, torch_max_T: int) -> None:
    print(f"\n== GPU ({torch.cuda.get_device_name()}) sparse attention, B=1, K={K}, bf16 ==")
    shapes = {
        "GQA H16/Hkv4 D128": (16, 4, 128, 128, 128**-0.5),
        "MLA latent H16 Dqk576/Dv512": (16, 1, 576, 512, 192**-0.5),
    }
    for shape_name, shape in shapes.items():
        print(f"-- {shape_name}")
        print(f"{'T':>7} {'op':>8} | {'fwd ms':>9} {'f+b ms':>9} {'f+b GiB':>8} | vs SDPA: fwd, f+b")
        for T in Ts:
            try:
                rows = _gpu_attention_rows(T, K, reps, torch_max_T, *shape)
            except torch.OutOfMemoryError:
                print(f"{T:>7} inputs OOM")
                continue
            base = rows.get("sdpa", (None, None, None))
            for name, (tf, tb, mb) in rows.items():
                print(
                    f"{T:>7} {name:>8} | {fmt(tf):>9} {fmt(tb):>9} {fmt(mb):>8} | "
                    f"{ratio(tf, base[0])}, {ratio(tb, base[1])}"
                )
            torch.cuda.empty_cache()
    print(f"\n== GPU indexer top-k: HI=64 DI=128 K={K}, bf16 inputs ==")
    print(f"{'T':>7} {'backend':>8} | {'ms':>9} {'GiB':>8} | torch / this")
    for T in Ts:
        rows = _gpu_indexer_rows(T, K, max(1, reps // 5), torch_max_T)
        for backend, (t, m) in rows.items():
            print(
                f"{T:>7} {backend:>8} | {fmt(t):>9} {fmt(m):>8} | {ratio(rows.get('torch', (None,))[0], t)}"
            )
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-T", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--cpu-K", type=int, default=None, help="keys per query on CPU (default T/4)")
    ap.add_argument("--cpu-reps", type=int, default=3)
    ap.add_argument("--gpu-T", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--gpu-K", type=int, default=2048)
    ap.add_argument("--gpu-reps", type=int, default=10)
    ap.add_argument(
        "--torch-max-T", type=int, default=32768, help="skip the (slow) torch path above this T on GPU"
    )
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc keeps freed large blocks in its heap (dynamic mmap threshold), hiding later peaks from RSS:
        # a fixed 128 KiB threshold makes every tensor buffer an mmap that is returned on free
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if not args.gpu_only:
        bench_cpu(args.cpu_T, args.cpu_K, args.cpu_reps)
    if not args.cpu_only:
        if torch.cuda.is_available():
            bench_gpu(args.gpu_T, args.gpu_K, args.gpu_reps, args.torch_max_T)
        else:
            print("\n(no CUDA device: GPU benchmarks skipped)")


if __name__ == "__main__":
    main()
