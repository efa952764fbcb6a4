"""Trained by tests/test_training.py under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo).

accelerate 1.15 enables FSDP only for accelerator device types (``AcceleratorState`` sets
``DistributedType.FSDP`` for MULTI_GPU / NPU / XPU / ..., not MULTI_CPU): on CPU, ``Trainer(fsdp=True)``
silently trains with DDP instead. So the sharding is done here with torch's FSDP2 ``fully_shard`` directly
(one per decoder layer, then the root): a hybrid MoE (Gated DeltaNet + attention, MoE MLPs) trains a few AdamW
steps; the sharded checkpoint (torch.distributed.checkpoint, each rank writes its own shards) is loaded into a
freshly built and sharded model, whose full parameters and next loss must equal the trained ones exactly. Each
rank writes ``rank{i}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from gloo_exit import exit_now
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from hf_hybrid import HybridForCausalLM
from hf_hybrid.presets import preset_config


def build() -> HybridForCausalLM:
    torch.manual_seed(0)
    config = preset_config(
        "tiny-moe",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        mixer_pattern="gated_deltanet,attention",
        first_k_dense=0,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_shared_experts=0,
        tie_word_embeddings=False,
    )
    model = HybridForCausalLM(config).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}


def loss_on(model, ids) -> torch.Tensor:
    return model(ids, labels=ids, use_cache=False).loss


def main(out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.randint(0, 128, (steps * world * 4, 32), generator=torch.Generator().manual_seed(0))
    model = build()
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    probe = data[:4]
    with torch.no_grad():
        first_loss = float(loss_on(model, probe))
    losses = []
    for step in range(steps):
        ids = data[(step * world + rank) * 4 : (step * world + rank + 1) * 4]  # each rank its own micro-batch
        loss = loss_on(model, ids)
        loss.backward()
        optim.step()
        optim.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    trained = full_params(model)
    with torch.no_grad():
        next_loss = float(loss_on(model, probe))
    ckpt = Path(out_dir) / "sharded"
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(ckpt))
    dist.barrier()

    fresh = build()
    before = max(float((trained[k] - v).abs().max()) for k, v in full_params(fresh).items())
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(fresh, state["model"])
    loaded = full_params(fresh)
    with torch.no_grad():
        reloaded_loss = float(loss_on(fresh, probe))
    record = {
        "world_size": world,
        "param_types": kinds,
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "full_numel": sum(t.numel() for t in trained.values()),
        "losses": losses,
        "diff_fresh_vs_trained": before,
        "diff_reloaded_vs_trained": max(float((trained[k] - loaded[k]).abs().max()) for k in trained),
        "first_loss": first_loss,
        "next_loss": next_loss,
        "reloaded_loss": reloaded_loss,
        "shard_files": sorted(p.name for p in ckpt.iterdir()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
    exit_now()  # torch's gloo teardown races (see gloo_exit.py)
