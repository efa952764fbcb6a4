"""Speculative (assisted) decoding on a 3:1 Gated DeltaNet : attention hybrid, on CPU: acceptance rate and
speed-up against plain greedy decoding, both measured in the same run.

A target and a smaller draft model of the same family are trained briefly on Shakespeare (bytes; a random
draft would agree with a random target only by chance), then both decode held-out prompts greedily, with and
without ``assistant_model=draft`` at a fixed draft length. The outputs must be identical token for token (the
script fails otherwise); the acceptance rate is accepted drafts / drafted tokens.

    python scripts/bench_speculative.py                 # target 8 layers × 128, draft 2 layers × 64, 1 thread
    python scripts/bench_speculative.py --steps 60      # a quicker look (worse models, less telling)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.data import byte_tokenizer, load_text_splits, tokenize_documents


def make_model(hidden: int, layers: int, vocab: int, seed: int) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        # 3:1 GDN:attention (a draft of fewer than 4 layers: GDN layers then one attention layer)
        mixer_types=(["gated_deltanet"] * 3 + ["attention"]) * (layers // 4)
        if layers % 4 == 0
        else ["gated_deltanet"] * (layers - 1) + ["attention"],
        gdn_num_key_heads=2,
        gdn_num_value_heads=4,
        gdn_key_head_dim=hidden // 4,
        gdn_value_head_dim=hidden // 4,
        max_position_embeddings=1024,
    )
    return HybridForCausalLM(config)


def train(
    model: HybridForCausalLM, stream: torch.Tensor, steps: int, *, seq: int, batch: int, seed: int
) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        ids = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps for each model")
    p.add_argument("--seq", type=int, default=64, help="training sequence length")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--target", default="128x8", help="hidden x layers of the target")
    p.add_argument("--draft", default="64x2", help="hidden x layers of the draft")
    p.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens (constant schedule)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default; 1 is steadiest on a shared CPU)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = byte_tokenizer()
    splits = load_text_splits("auto")
    train_ids = torch.tensor(tokenize_documents(tok, [t[:400_000] for t in splits.train[:8]]))
    held_ids = torch.tensor(tokenize_documents(tok, splits.eval[:1]))
    vocab = len(tok)

    (th, tl), (dh, dl) = (tuple(int(x) for x in s.split("x")) for s in (args.target, args.draft))
    target, draft = make_model(th, tl, vocab, seed=0), make_model(dh, dl, vocab, seed=1)
    t0 = time.perf_counter()
    target_loss = train(target, train_ids, args.steps, seq=args.seq, batch=args.batch, seed=0)
    draft_loss = train(draft, train_ids, args.steps, seq=args.seq, batch=args.batch, seed=1)
    train_s = time.perf_counter() - t0

    for m in (target, draft):
        m.generation_config.pad_token_id = tok.pad_token_id
        m.generation_config.eos_token_id = None  # decode exactly --new-tokens tokens
    draft.generation_config.num_assistant_tokens = args.draft_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"

    drafted = accepted = 0
    update = AssistedCandidateGenerator.update_candidate_strategy

    def count(self, input_ids, scores, num_matches):
        nonlocal drafted, accepted
        drafted += scores.shape[1] - 1
        accepted += int(num_matches)
        return update(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = count
    gen = torch.Generator().manual_seed(2)
    starts = torch.randint(0, len(held_ids) - args.prompt_len, (args.prompts,), generator=gen).tolist()
    prompts = [held_ids[s : s + args.prompt_len][None] for s in starts]
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        target.generate(prompts[0], **kwargs)  # warm-up
        target.generate(prompts[0], assistant_model=draft, **kwargs)
        drafted = accepted = 0
        plain_s = spec_s = 0.0
        mismatches = 0
        for ids in prompts:
            t = time.perf_counter()
            plain = target.generate(ids, **kwargs)
            plain_s += time.perf_counter() - t
            t = time.perf_counter()
            spec = target.generate(ids, assistant_model=draft, **kwargs)
            spec_s += time.perf_counter() - t
            mismatches += int(plain.tolist() != spec.tolist())
    AssistedCandidateGenerator.update_candidate_strategy = update

    result = {
        "target": f"{args.target}: {'/'.join(target.config.mixer_types)}, {_millions(target)}",
        "draft": f"{args.draft}: {'/'.join(draft.config.mixer_types)}, {_millions(draft)}",
        "train_steps": args.steps,
        "train_s": round(train_s, 1),
        "final_train_loss": {"target": round(target_loss, 3), "draft": round(draft_loss, 3)},
        "draft_tokens": args.draft_tokens,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "acceptance_rate": round(accepted / max(drafted, 1), 3),
        "plain_greedy_s": round(plain_s, 2),
        "speculative_s": round(spec_s, 2),
        "speed_up": round(plain_s / spec_s, 2),
        "outputs_identical": mismatches == 0,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if mismatches:
        raise SystemExit(f"{mismatches} of {args.prompts} speculative outputs differ from plain greedy")


if __name__ == "__main__":
    main()
