"""One optimizer step of the gradient-invariance matrix (tests/test_gradient_invariance.py) under DDP: run by
``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo). Each rank trains the MoE model through our
head and ``Trainer`` on its half of the 4 rows (gradient accumulation 2, one row per micro-batch) and saves
the gradient it holds before the optimizer step (after DDP's all-reduce) and the inputs of its training
forwards into ``rank{i}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_gradient_invariance as matrix  # noqa: E402
from gloo_exit import exit_now  # noqa: E402

from hf_hybrid.data import byte_tokenizer  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    model = matrix.build("moe", len(tok))
    recorder = matrix.Recorder(model)
    grads = matrix.run_head_trainer(model, tok, Path(out_dir) / "trainer", 2, 1)
    recorder.remove()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # the forward inputs only (tensors): the test loads this with weights_only=True
    calls = [
        {k: v for k, v in c.items() if k in matrix._FORWARD_KEYS and torch.is_tensor(v)}
        for c in recorder.calls
    ]
    torch.save({"grads": grads, "calls": calls, "world": world}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    exit_now()  # torch's gloo teardown races (see gloo_exit.py)
