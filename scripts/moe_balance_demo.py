"""Train a tiny byte-level MoE on local text with and without load balancing; print per-layer load CV, write
heatmaps.

Settings (same seed, data and steps):
- ``none``:     no balancing at all (aux 0, z 0, no bias updates): routers are free to collapse;
- ``switch``:   Switch load-balancing loss, coefficient 1e-2 (+ z-loss 1e-3), the recommended start for
  upcycled MoEs;
- ``aux_free``: DeepSeek-V3's auxiliary-loss-free bias (``update_expert_bias`` once per optimizer step), no
  aux loss;
- ``both``:     the bias and the Switch loss together.

The text is Python's own documentation (``pydoc_data.topics``, always installed), split 90/10 into
train/held-out. Load is measured on the held-out text in eval mode (``measure_expert_load``); the LM loss
there is the LM loss alone (in eval mode the model adds no auxiliary term), so settings compare fairly.

    python scripts/moe_balance_demo.py --steps 200 --out /tmp/moe_demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_hybrid  # noqa: F401  (Auto registration)
import hf_hybrid.moe  # noqa: F401  (registers the "moe" MLP)
from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.moe_training import (
    load_metrics,
    measure_expert_load,
    plot_expert_load_heatmap,
    update_expert_bias,
)

SETTINGS = {
    "none": dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, router_bias_update_rate=0.0),
    "switch": dict(router_aux_loss_coef=1e-2, router_z_loss_coef=1e-3, router_bias_update_rate=0.0),
    "aux_free": dict(router_aux_loss_coef=0.0, router_z_loss_coef=1e-3, router_bias_update_rate=1e-3),
    "both": dict(router_aux_loss_coef=1e-2, router_z_loss_coef=1e-3, router_bias_update_rate=1e-3),
}


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = torch.tensor(
        list("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long
    )
    split = int(0.9 * data.numel())
    return data[:split], data[split:]


def make_model(setting: str, args: argparse.Namespace) -> HybridForCausalLM:
    cfg = HybridConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        mlp_pattern="moe",
        first_k_dense=1,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.hidden,
        router_scoring_func=args.scoring,
        max_position_embeddings=args.seq_len,
        **SETTINGS[setting],
    )
    torch.manual_seed(args.seed)
    return HybridForCausalLM(cfg)


def train(setting: str, train_ids: torch.Tensor, args: argparse.Namespace) -> HybridForCausalLM:
    model = make_model(setting, args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model)  # what AuxFreeBiasCallback does in on_step_end (no-op when the rate is 0)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            aux = "" if out.aux_loss is None else f" aux {out.aux_loss.item():.3f}"
            print(f"  [{setting}] step {step:4d}  lm {out.lm_loss.item():.3f}{aux}")
    return model


@torch.no_grad()
def held_out_loss(model: HybridForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = (ids.numel() // seq_len) * seq_len
    windows = ids[:n].view(-1, seq_len)[:32]
    return model(input_ids=windows, labels=windows).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--scoring", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="moe_balance_demo")
    args = parser.parse_args()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ids, held_ids = load_text()
    print(f"text: {train_ids.numel()} train / {held_ids.numel()} held-out bytes (pydoc_data.topics)")
    summary = []
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        t0 = time.perf_counter()
        model = train(setting, train_ids, args)
        loss = held_out_loss(model, held_ids, args.seq_len)
        counts = measure_expert_load(model, held_ids[:8192], seq_len=args.seq_len)
        layers = sorted(counts)
        load = torch.stack([counts[i] / counts[i].sum() for i in layers])
        png = plot_expert_load_heatmap(
            load,
            out_dir / f"expert_load_{setting}.png",
            layer_ids=layers,
            title=f"{setting}: expert load / mean (held-out)",
        )
        cvs = {i: load_metrics(counts[i])["load_cv"] for i in layers}
        mins = {i: load_metrics(counts[i])["load_min"] for i in layers}
        summary.append((setting, loss, cvs, mins, time.perf_counter() - t0))
        print(f"  [{setting}] held-out loss {loss:.3f}; wrote {png}")

    print(
        f"\n{'setting':<10} {'held-out loss':>13} | "
        + " | ".join(f"layer {i} CV  min/mean" for i in summary[0][2])
    )
    for setting, loss, cvs, mins, secs in summary:
        cells = " | ".join(f"{cvs[i]:>10.3f} {mins[i]:>9.2f}" for i in cvs)
        print(f"{setting:<10} {loss:>13.3f} | {cells}   ({secs:.0f} s)")


if __name__ == "__main__":
    main()
