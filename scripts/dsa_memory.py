"""Peak CPU memory and time of one DSA layer (sparse, top-k) against its dense base and transformers'
``deepseek_v32``.

    OMP_NUM_THREADS=1 python scripts/dsa_memory.py [--seq-len 4096] [--hidden 256] [--topk 256] [--modes
    fwd,train]
                                                  [--variants all] [--repeats 3] [--json out.json]

Each (variant, mode) runs in a fresh subprocess that builds a one-layer causal LM (embedding, one decoder
layer with a dense SwiGLU, norm, a 256-token LM head: everything but the attention is small and the same
across variants), runs it once at a short length (lazy initialisation, kernels), then once at ``--seq-len``
(batch 1). Reported: ``peak`` = the growth of the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during the measured pass over what it was before, i.e. the
memory that pass needed beyond the model and the short run, and the wall time of that pass; the table shows
the median over ``--repeats`` fresh processes (CPU timings on a shared machine are noisy). ``fwd``: forward
under ``no_grad``; ``train``: forward + backward of the LM loss.

Variants (hidden 256, 8 heads):
- ``attention``: hf_hybrid GQA attention (8 query / 2 KV heads, head dim 32), SDPA.
- ``dsa-attention``: the same with DSA (``dsa_base="attention"``, sparse, indexer 8×64, top-k).
- ``mla``: hf_hybrid MLA (q_lora 128, kv_lora 128, qk 32+16, v 32), SDPA.
- ``dsa-mla``: the same with DSA (``dsa_base="mla"``, sparse, latent MQA).
- ``deepseek_v32``: transformers' ``DeepseekV32ForCausalLM`` with the same MLA and indexer sizes (SDPA): its
  indexer builds dense ``[T, T]`` scores and the selection becomes a dense ``[T, T]`` mask.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("attention", "dsa-attention", "mla", "dsa-mla", "deepseek_v32")
MODES = ("fwd", "train")
VOCAB = 256


def build(
    variant: str,
    hidden: int,
    topk: int,
    seq_len: int,
    heads: int = 8,
    mla: dict | None = None,
    index: dict | None = None,
):
    """One-layer causal LM of ``variant``; ``mla`` / ``index`` override the MLA and indexer sizes below (the
    GPU check uses DeepSeek-like ones)."""
    import torch

    torch.manual_seed(0)
    mla = mla or dict(
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32
    )
    index = dict(index or dict(index_n_heads=8, index_head_dim=64), index_topk=topk)
    if variant == "deepseek_v32":
        from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

        config = DeepseekV32Config(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            first_k_dense_replace=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=hidden,
            max_position_embeddings=max(seq_len, 4096),
            **mla,
            **index,
        )
        config._attn_implementation = "sdpa"
        return DeepseekV32ForCausalLM(config)

    import hf_hybrid  # noqa: F401
    from hf_hybrid import HybridConfig, HybridForCausalLM

    base = variant.removeprefix("dsa-")
    config = HybridConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        max_position_embeddings=max(seq_len, 4096),
        mixer_types=["dsa" if variant.startswith("dsa-") else base],
        dsa_base=base if base == "mla" else "attention",
        dsa_mode="sparse",
        **mla,
        **index,
    )
    config._attn_implementation = "sdpa"
    return HybridForCausalLM(config)


def run_pass(model, ids, mode: str) -> float:
    import torch

    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    else:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    return time.perf_counter() - start


def child(variant: str, mode: str, seq_len: int, hidden: int, topk: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = build(variant, hidden, topk, seq_len)
    model.train(mode == "train")
    params = sum(p.numel() for p in model.parameters())
    short = torch.randint(0, VOCAB, (1, 64))
    ids = torch.randint(0, VOCAB, (1, seq_len))
    run_pass(model, short, mode)  # lazy init, kernel selection, autograd buffers
    model.zero_grad(set_to_none=True)
    gc.collect()
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = run_pass(model, ids, mode)
    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "mode": mode,
        "seq_len": seq_len,
        "params": params,
        "peak_mib": (after_kib - before_kib) / 1024,
        "seconds": seconds,
        "rss_before_mib": before_kib / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--modes", default="fwd,train")
    p.add_argument("--variants", default="all", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per measurement; the median is shown"
    )
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.seq_len, args.hidden, args.topk)))
        return 0

    variants = VARIANTS if args.variants == "all" else tuple(v for v in args.variants.split(",") if v)
    modes = tuple(m for m in args.modes.split(",") if m)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")

    rows = []
    for mode in modes:
        for variant in variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                mode,
                "--seq-len",
                str(args.seq_len),
                "--hidden",
                str(args.hidden),
                "--topk",
                str(args.topk),
            ]
            runs, error = [], None
            for _ in range(max(1, args.repeats)):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    break
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if error is not None:
                print(f"{variant} {mode}: failed ({error})", file=sys.stderr)
                rows.append({"variant": variant, "mode": mode, "error": error})
                continue
            row = dict(runs[0])
            row["peak_mib"] = statistics.median(r["peak_mib"] for r in runs)
            row["seconds"] = statistics.median(r["seconds"] for r in runs)
            row["runs"] = [{"peak_mib": r["peak_mib"], "seconds": r["seconds"]} for r in runs]
            rows.append(row)
            print(
                f"{variant:14s} {mode:5s} peak "
                f"+{row['peak_mib']:8.1f} MiB  {row['seconds']:7.3f} s  (median of {len(runs)})",
                flush=True,
            )

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"\nT={args.seq_len}, batch 1, hidden {args.hidden}, top-k {args.topk}, fp32, "
        f"CPU, OMP_NUM_THREADS={threads}; peak = growth of ru_maxrss during the pass"
    )
    print("| variant | mode | peak memory (MiB) | time (s) | memory vs hf_hybrid dense base | time vs base |")
    print("|---|---|---:|---:|---:|---:|")
    by_key = {(r["variant"], r["mode"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['mode']} | failed | | | |")
            continue
        base = {"dsa-attention": "attention", "dsa-mla": "mla", "deepseek_v32": "mla"}.get(r["variant"])
        ref = by_key.get((base, r["mode"])) if base else None
        mem = f"{r['peak_mib'] / ref['peak_mib']:.2f}×" if ref and ref["peak_mib"] > 0 else ""
        tim = f"{r['seconds'] / ref['seconds']:.2f}×" if ref and ref["seconds"] > 0 else ""
        print(f"| {r['variant']} | {r['mode']} | {r['peak_mib']:.1f} | {r['seconds']:.3f} | {mem} | {tim} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
