"""Run by tests/test_hyper_connections.py in a subprocess (one gloo rank on CPU): a model with
hyper-connection streams (in bf16: fp32 weights inside bf16 layers) sharded with FSDP2 the way accelerate's
transformer wrap policy does it — ``fully_shard`` on every module whose class ``model._no_split_modules``
names, children first, then the root — runs forward and backward next to the unsharded model. Prints one JSON
line: the parameter dtypes, the number of units, both losses and the gradients' relative differences (largest
per tensor, and over all)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from gloo_exit import exit_now
from torch.distributed.fsdp import fully_shard

from hf_hybrid import HybridForCausalLM
from hf_hybrid.testing import tiny_config


def build(kind: str, dtype: torch.dtype) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(hyper_connections=kind, hc_mult=2, mixer_types=["attention", "gated_deltanet"])
    return HybridForCausalLM(config).to(dtype).train()


def main(kind: str, dtype: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    plain, sharded = build(kind, getattr(torch, dtype)), build(kind, getattr(torch, dtype))
    names = set(sharded._no_split_modules)
    units = [m for m in reversed(list(sharded.modules())) if type(m).__name__ in names]  # children first
    for module in units:
        fully_shard(module)
    fully_shard(sharded)
    dtypes = sorted({str(p.dtype) for p in plain.parameters()})
    losses = []
    for model in (plain, sharded):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in plain.named_parameters()}
    delta = {n: p.grad.full_tensor().float() - grads[n].float() for n, p in sharded.named_parameters()}
    per_tensor = max((delta[n].norm() / grads[n].float().norm()).item() for n in delta)
    total = sum(d.square().sum() for d in delta.values()) / sum(
        g.float().square().sum() for g in grads.values()
    )
    out = {
        "dtypes": dtypes,
        "units": len(units),
        "losses": losses,
        "per_tensor": per_tensor,
        "total": total.sqrt().item(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_now()  # torch's gloo teardown races (see gloo_exit.py)
