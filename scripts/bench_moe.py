"""Benchmark the MoE MLP; every table prints a ratio against a baseline measured in the same run.

CPU (always): the experts paths against the naive per-expert loop (``experts_forward_loop``), fp32, at a few
shapes: our sort-and-slice ``eager`` path and transformers' ``batched_mm`` / ``grouped_mm`` through the same
module.

GPU (when CUDA is available): our ``HybridMoE`` block against transformers' ``Qwen3MoeSparseMoeBlock`` with
the same weights, bf16, 16K tokens, at E=64 k=8 H=2048 I=1024 and E=8 k=2 H=2048 I=4096, forward and
forward+backward, median milliseconds (CUDA events), TFLOP/s of the routed expert GEMMs (6·N·k·H·I per
forward, 3× that with backward), peak memory, and ours/theirs. Anchors measured before (H100, torch 2.11):
Qwen3-MoE block at E=64 k=8, fwd 8.6 ms, fwd+bwd 22.6 ms with grouped_mm, 29.4 ms eager.

    python scripts/bench_moe.py               # CPU tables, then GPU tables if CUDA is there
    python scripts/bench_moe.py --quick       # smaller CPU shapes, fewer iterations
    python scripts/bench_moe.py --gpu-only --impls grouped_mm
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_hybrid.configuration_hybrid import HybridConfig
from hf_hybrid.moe import HybridMoE, experts_forward_loop


def moe_block(
    hidden: int, experts: int, k: int, inter: int, impl: str, **overrides
) -> tuple[HybridMoE, HybridConfig]:
    cfg = HybridConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=1,
        mlp_pattern="moe",
        num_experts=experts,
        num_experts_per_tok=k,
        moe_intermediate_size=inter,
        norm_topk_prob=True,
        **overrides,
    )
    cfg._experts_implementation = impl
    return HybridMoE(cfg, 0), cfg


def routed_block(N: int, E: int, K: int, H: int, inter: int, impl: str = "eager"):
    """(moe, cfg, x [N, H], weights [N, K], index [N, K]): a block with unit-scale expert weights and its
    router's choice for random tokens (the experts paths are then compared on the same routing)."""
    moe, cfg = moe_block(H, E, K, inter, impl)
    with torch.no_grad():
        moe.experts.gate_up_proj.normal_(std=H**-0.5)
        moe.experts.down_proj.normal_(std=inter**-0.5)
    x = torch.randn(N, H)
    with torch.no_grad():
        _, weights, index = moe.router(x)
    return moe, cfg, x, weights, index


def time_cpu(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_cuda(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


# ------------------------------------------------------------------------------------------------------------


def _cpu_paths(moe: HybridMoE, cfg: HybridConfig) -> dict:
    experts = moe.experts

    def implementation(name: str):
        def run(*tensors):
            cfg._experts_implementation = name
            return experts(*tensors)

        return run

    paths = {"loop": lambda *tensors: experts_forward_loop(experts, *tensors)}
    paths.update({name: implementation(name) for name in ("eager", "batched_mm", "grouped_mm")})
    return paths


def _cpu_times(
    fn, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, iters: int
) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            fn(x, index, weights)

    def fwd_bwd():
        fn(x.detach().requires_grad_(True), index, weights).sum().backward()

    return time_cpu(fwd, iters), time_cpu(fwd_bwd, iters)


def bench_cpu(quick: bool, iters: int) -> None:
    shapes = [  # (tokens, E, k, H, I)
        (256, 8, 2, 128, 256),
        (512, 32, 4, 128, 128),
        (1024, 64, 8, 128, 64),
    ]
    if not quick:
        shapes.append((2048, 16, 2, 256, 512))
    print(
        "\nCPU experts paths vs naive loop (fp32, "
        f"{torch.get_num_threads()} threads, median ms; ratio = loop / path)"
    )
    print(
        f"{'N':>6} {'E':>4} {'k':>3} {'H':>5} {'I':>5} | {'path':<11} {'fwd':>8} {'ratio':>6} | "
        f"{'fwd+bwd':>8} {'ratio':>6}"
    )
    for N, E, K, H, inter in shapes:
        torch.manual_seed(0)
        moe, cfg, x, weights, index = routed_block(N, E, K, H, inter)
        times = {name: _cpu_times(fn, x, index, weights, iters) for name, fn in _cpu_paths(moe, cfg).items()}
        base_f, base_b = times["loop"]
        for name, (f, b) in times.items():
            print(
                f"{N:>6} {E:>4} {K:>3} {H:>5} {inter:>5} | {name:<11} "
                f"{f:>8.2f} {base_f / f:>6.2f} | {b:>8.2f} {base_b / b:>6.2f}"
            )


# ------------------------------------------------------------------------------------------------------------


def qwen3_block(hidden: int, experts: int, k: int, inter: int, impl: str):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    cfg._experts_implementation = impl
    return Qwen3MoeSparseMoeBlock(cfg), cfg


def _gpu_times(
    call, x: torch.Tensor, grad: torch.Tensor, iters: int, time_fn=None
) -> tuple[float, float, float]:
    """(fwd ms, fwd+bwd ms, peak GiB) of ``call(x)``; ``time_fn(fn, iters)`` defaults to CUDA events (on CPU
    the peak is not measured: 0)."""
    time_fn = time_fn or time_cuda
    cuda = x.is_cuda

    def fwd():
        with torch.no_grad():
            call(x)

    def fwd_bwd():
        call(x.detach().requires_grad_(True)).backward(grad)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    f = time_fn(fwd, iters)
    b = time_fn(fwd_bwd, iters)
    return f, b, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def compare_with_qwen3(
    E: int, K: int, inter: int, impl: str, *, H: int, tokens: int, device, dtype, iters: int, time_fn=None
) -> dict:
    """Our HybridMoE block vs transformers' Qwen3MoeSparseMoeBlock with the same weights, one experts
    implementation: {"qwen3_moe": (fwd ms, f+b ms, peak GiB), "hf_hybrid": (...), "agree": fraction of tokens
    within 2%, "flops_fwd": routed expert GEMM FLOPs of one forward}."""
    torch.manual_seed(0)
    x = torch.randn(1, tokens, H, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    ours, _ = moe_block(H, E, K, inter, impl)
    theirs, _ = qwen3_block(H, E, K, inter, impl)
    ours.to(device=device, dtype=dtype).train()
    theirs.to(device=device, dtype=dtype).train()
    with torch.no_grad():
        theirs.experts.gate_up_proj.normal_(std=0.02)
        theirs.experts.down_proj.normal_(std=0.02)
        theirs.gate.weight.normal_(std=0.02)
        ours.experts.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
        ours.router.weight.copy_(theirs.gate.weight)
        diff = (ours(x, None) - theirs(x)).float()
        ref = theirs(x).float()
    agree = (diff.abs().amax(-1) <= 0.02 * ref.abs().amax(-1).clamp_min(1e-3)).float().mean().item()
    return {
        "qwen3_moe": _gpu_times(lambda t, b=theirs: b(t), x, grad, iters, time_fn),
        "hf_hybrid": _gpu_times(lambda t, b=ours: b(t, None), x, grad, iters, time_fn),
        "agree": agree,
        "flops_fwd": 6 * tokens * K * H * inter,
    }


def bench_gpu(iters: int, impls: list[str], tokens: int) -> None:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    print(
        "\nGPU: ours (HybridMoE) vs transformers' Qwen3MoeSparseMoeBlock, "
        f"{torch.cuda.get_device_name()}, bf16, {tokens} tokens, same weights; "
        "TFLOP/s of the routed expert GEMMs; ratio = theirs / ours (>1: ours faster)"
    )
    print(
        f"{'E':>4} {'k':>3} {'I':>5} {'impl':<11} {'block':<14} | {'fwd ms':>8} {'TF/s':>6} "
        f"| {'f+b ms':>8} {'TF/s':>6} | {'peak GiB':>8} | {'ratio fwd':>9} {'ratio f+b':>9}"
    )
    H = 2048
    for E, K, inter in ((64, 8, 1024), (8, 2, 4096)):
        for impl in impls:
            result = compare_with_qwen3(
                E, K, inter, impl, H=H, tokens=tokens, device=device, dtype=dtype, iters=iters
            )
            flops_fwd = result["flops_fwd"]
            rows = {name: result[name] for name in ("qwen3_moe", "hf_hybrid")}
            for name, (f, b, peak) in rows.items():
                ratio = ""
                if name == "hf_hybrid":
                    ratio = f"{rows['qwen3_moe'][0] / f:>9.2f} {rows['qwen3_moe'][1] / b:>9.2f}"
                print(
                    f"{E:>4} {K:>3} {inter:>5} {impl:<11} {name:<14} | {f:>8.2f} {flops_fwd / f / 1e9:>6.0f} "
                    f"| {b:>8.2f} {3 * flops_fwd / b / 1e9:>6.0f} | {peak:>8.2f} | {ratio}"
                )
            print(
                f"{'':>24} tokens whose outputs agree within 2% (routing "
                f"ties differ: our router is fp32): {result['agree']:.3f}"
            )
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--impls", default="eager,grouped_mm", help="GPU experts implementations to compare")
    args = parser.parse_args()
    if not args.gpu_only:
        bench_cpu(args.quick, args.iters or (3 if args.quick else 5))
    if not args.cpu_only:
        if torch.cuda.is_available():
            bench_gpu(args.iters or 20, [s.strip() for s in args.impls.split(",") if s.strip()], args.tokens)
        else:
            print("\n(no CUDA device: GPU comparison with Qwen3MoeSparseMoeBlock skipped)")


if __name__ == "__main__":
    main()
