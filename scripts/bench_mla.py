"""MLA decode, one layer-step: our weight-absorbed path vs our naive (expand the latent cache) path, and on
CUDA also transformers' ``DeepseekV3Attention`` (which re-expands the whole cache every step), all in the same
run.

A layer-step = one ``HybridMLA.forward`` on one new token per row with ``context`` tokens already cached,
including the cache append (``DynamicLayer`` concatenation), as during ``generate()``. The cache grows by one
token per timed step, like real decoding (so kernels that plan per KV length show it).

    python scripts/bench_mla.py                      # CPU: batch 4, context 2048, DeepSeek-like sizes, fp32
    python scripts/bench_mla.py --contexts 4096 8192 16384 32768 --batch 16   # CUDA: bf16, CUDA-event medians

Anchors measured before (H100, batch 16, hidden 2048, 16 heads, kv_lora 512): transformers ≈ 5.7 ms GPU per
layer-step at 16K (+ up to ~56 ms CPU when cuDNN re-plans for a new KV length); reading the latent cache once
≈ 0.1 ms (HBM); goal ≤ 0.5 ms. On CUDA the script also profiles a few absorbed steps and lists the kernels:
the absorbed path is plain GEMMs + softmax (no SDPA/cuDNN attention), so nothing is planned per KV length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_hybrid import HybridCache, HybridConfig
from hf_hybrid.layers import rope_inv_freq
from hf_hybrid.mixers.base import MixerContext
from hf_hybrid.mixers.mla import HybridMLA


def make_config(args) -> HybridConfig:
    cfg = HybridConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        mixer_types=["mla"],
        mlp_types=["none"],
        q_lora_rank=args.q_lora,
        kv_lora_rank=args.kv_lora,
        qk_nope_head_dim=args.nope,
        qk_rope_head_dim=args.rope,
        v_head_dim=args.v,
        max_position_embeddings=max(args.contexts) + 4096,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def rope_fn(config, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, T, dim] in our rotate-half layout (what HybridModel hands the mixers)."""

    def rope(dim: int):
        inv_freq, scale = rope_inv_freq(config, dim, device=positions.device)
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    return rope


def filled_cache(config, batch: int, context: int, device, dtype, init_dtype=None) -> HybridCache:
    """A cache holding ``context`` random latents (what a prefill would have left), drawn in ``init_dtype``
    (default ``dtype``) and stored in ``dtype``."""
    cache = HybridCache(config=config)
    g = torch.Generator(device=device).manual_seed(0)
    init_dtype = init_dtype or dtype
    c_kv = torch.randn(batch, 1, context, config.kv_lora_rank, generator=g, device=device, dtype=init_dtype)
    k_pe = torch.randn(
        batch, 1, context, config.qk_rope_head_dim, generator=g, device=device, dtype=init_dtype
    )
    cache.update(c_kv.to(dtype), k_pe.to(dtype), 0)
    return cache


class Timer:
    """Median per-step time: CUDA events on GPU (device time), perf_counter on CPU; also wall time per
    step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def run(self, step, warmup: int, steps: int) -> tuple[float, float]:
        for _ in range(warmup):
            step()
        if self.cuda:
            torch.cuda.synchronize()
        device_ms, wall_ms = [], []
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                wall_ms.append((time.perf_counter() - t0) * 1e3)
                device_ms.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                wall_ms.append((time.perf_counter() - t0) * 1e3)
                device_ms.append(wall_ms[-1])
        return statistics.median(device_ms), statistics.median(wall_ms)


def make_decode_step(config, mode: str, batch: int, context: int, device, dtype, init_dtype=None):
    """(layer, step): ``step()`` runs one ``HybridMLA`` decode step with ``config.mla_decode = mode`` on a
    cache holding ``context`` random latents (appending to it, as generate() does) and returns the output [B,
    1, hidden]. Same seeds every call: two modes built at the same sizes see the same weights, cache and
    input. Weights, cache and input are rounded to ``init_dtype`` (default ``dtype``) first, so an fp32 build
    with a bf16 ``init_dtype`` is the exact-arithmetic reference of the bf16 build."""
    config.mla_decode = mode
    init_dtype = init_dtype or dtype
    torch.manual_seed(0)
    layer = HybridMLA(config, 0).to(device=device, dtype=init_dtype).to(dtype).eval()
    cache = filled_cache(config, batch, context, device, dtype, init_dtype)
    x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=init_dtype).to(dtype)

    def step():
        past = cache.get_seq_length()
        pos = torch.full((batch, 1), past, device=device)
        ctx = MixerContext(
            padding_mask=None,
            attention_mask_2d=None,
            masks={"full_attention": None},  # sdpa, no padding: what create_causal_mask returns in decode
            position_ids=pos,
            cu_seqlens=None,
            max_seqlen=None,
            rope=rope_fn(config, pos, dtype),
            cache=cache,
            past_length=past,
        )
        with torch.no_grad():
            return layer(x, ctx)

    return layer, step


def bench_ours(
    config, mode: str, batch: int, context: int, device, dtype, timer: Timer, args
) -> tuple[float, float]:
    _, step = make_decode_step(config, mode, batch, context, device, dtype)
    result = timer.run(step, args.warmup, args.steps)
    if mode == "absorbed" and device.type == "cuda" and args.profile:
        profile_kernels(step)
    return result


def bench_transformers(
    config, batch: int, context: int, device, dtype, timer: Timer, args
) -> tuple[float, float]:
    from transformers import DeepseekV3Config, DynamicCache
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    ref_cfg = DeepseekV3Config(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        max_position_embeddings=config.max_position_embeddings,
        num_hidden_layers=1,
    )
    ref_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = DeepseekV3Attention(ref_cfg, 0).to(device=device, dtype=dtype).eval()
    rotary = DeepseekV3RotaryEmbedding(ref_cfg).to(device)
    ours = filled_cache(config, batch, context, device, dtype)
    cache = DynamicCache(config=ref_cfg)
    cache.update(ours.layers[0].keys, ours.layers[0].values, 0)
    x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)

    def step():
        pos = torch.full((batch, 1), cache.get_seq_length(), device=device)
        with torch.no_grad():
            layer(x, rotary(x, pos), None, cache)  # positional: the keyword differs by version

    return timer.run(step, args.warmup, args.steps)


def profile_kernels(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    names = sorted(
        {e.key for e in prof.key_averages() if e.device_type.name == "CUDA" or "cuda" in e.key.lower()}
    )
    planned = [
        n for n in names if any(s in n.lower() for s in ("cudnn", "fmha", "flash", "sdpa", "attention"))
    ]
    print(f"    absorbed-step kernels ({len(names)}): attention/cuDNN kernels = {planned or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 4 on CPU")
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=None, help="default: 4K-32K on CUDA, 2048 on CPU"
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--q-lora", type=int, default=None, help="q_lora_rank (None: q_proj)")
    parser.add_argument("--kv-lora", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--nope", type=int, default=128)
    parser.add_argument("--v", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--transformers",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also time transformers' DeepseekV3Attention (auto: on CUDA only; slow on CPU)",
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (16 if cuda else 4)
    args.contexts = args.contexts or ([4096, 8192, 16384, 32768] if cuda else [2048])
    args.steps = args.steps or (20 if cuda else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = make_config(args)
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"MLA decode layer-step on {name}, {dtype}, batch {args.batch}, hidden "
        f"{args.hidden}, heads {args.heads}, kv_lora {args.kv_lora}, rope {args.rope}, nope "
        f"{args.nope}, v {args.v}; {'CUDA-event' if cuda else 'wall-clock'} median of {args.steps} steps"
    )
    bytes_per_token = (args.kv_lora + args.rope) * torch.finfo(dtype).bits // 8
    for context in args.contexts:
        rows = {}
        for mode in ("absorbed", "naive"):
            rows[f"ours {mode}"] = bench_ours(config, mode, args.batch, context, device, dtype, timer, args)
        if args.transformers == "yes" or (args.transformers == "auto" and cuda):
            rows["transformers DeepseekV3Attention"] = bench_transformers(
                config, args.batch, context, device, dtype, timer, args
            )
        cache_gb = args.batch * context * bytes_per_token / 1e9
        hbm = f", HBM floor to read it once ≈ {cache_gb / 3.35:.3f} ms at 3.35 TB/s" if cuda else ""
        print(f"context {context}: latent cache {cache_gb:.3f} GB{hbm}")
        base = rows["ours absorbed"][0]
        for label, (dev_ms, wall_ms) in rows.items():
            extra = f"  (wall {wall_ms:.3f} ms)" if cuda else ""
            print(f"  {label:36s} {dev_ms:9.3f} ms  ×{dev_ms / base:6.2f} vs absorbed{extra}")
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
