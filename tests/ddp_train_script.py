"""Trained by tests/test_training.py under ``accelerate launch --num_processes 2 --cpu`` (DDP over gloo).

Each rank writes ``rank{i}.json`` into the output directory: world size, logged losses and a checksum of its
parameters after training, so the test can check that both ranks trained the same model and the loss fell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from gloo_exit import exit_now
from transformers import Trainer, default_data_collator

from hf_hybrid import HybridForCausalLM
from hf_hybrid.data import build_lm_datasets, load_text_splits, train_tokenizer
from hf_hybrid.presets import preset_config
from hf_hybrid.training import logged_losses, training_arguments


def main(out_dir: str, max_steps: int) -> None:
    torch.set_num_threads(1)
    splits = load_text_splits("pydoc")  # always available, the same on every rank
    tokenizer = train_tokenizer(splits.train, vocab_size=512, max_chars=200_000)
    train_ds, _ = build_lm_datasets(tokenizer, 64, source=splits, max_train_chars=200_000, max_eval_blocks=2)
    torch.manual_seed(0)
    config = preset_config(
        "tiny-hybrid",
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        mixer_pattern="gated_deltanet,attention",
    )
    model = HybridForCausalLM(config)
    args = training_arguments(
        str(Path(out_dir) / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        # no use_cpu / ddp_backend: the defaults must join the process group on CPU by themselves
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=default_data_collator)
    trainer.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    record = {"world_size": args.world_size, "losses": logged_losses(trainer), "checksum": checksum}
    Path(out_dir, f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    exit_now()  # torch's gloo teardown races (see gloo_exit.py)
