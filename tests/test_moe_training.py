"""MoE training companions (issue 8): aux-loss-free bias updates (incl. 2-process DDP), load logging, heatmap,
CLI, and model-level integration (loss rule, save/load, bf16 load, PEFT LoRA on experts and router)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import hf_hybrid
import hf_hybrid.moe  # noqa: F401  (registers the "moe" MLP)
from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli.moe import add_parsers as add_expert_load_parser
from hf_hybrid.moe import HybridMoE
from hf_hybrid.moe_training import (
    AuxFreeBiasCallback,
    ExpertLoadLoggingCallback,
    collect_expert_load,
    install_moe_callbacks,
    load_metrics,
    plot_expert_load_heatmap,
    read_load_log,
    update_expert_bias,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def moe_config(**overrides) -> HybridConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_pattern="moe",
        first_k_dense=1,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def module_config(**overrides) -> HybridConfig:
    cfg = moe_config(**overrides)
    cfg._experts_implementation = "eager"
    return cfg


def build(cfg: HybridConfig, seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    cfg._attn_implementation = "sdpa"
    return HybridForCausalLM(cfg)


# ------------------------------------------------------------------------------------------------------------
# aux-loss-free bias


def test_bias_update_direction_and_reset():
    moe = HybridMoE(module_config(num_experts=4, router_bias_update_rate=0.01), 2)
    moe.router.accumulate_counts(torch.tensor([6.0, 0.0, 2.0, 0.0]))
    # summed over micro-batches: [10, 0, 5, 1]
    moe.router.accumulate_counts(torch.tensor([4.0, 0.0, 3.0, 1.0]))
    deltas = update_expert_bias(moe)
    expected = torch.tensor([-0.01, 0.01, -0.01, 0.01])  # mean 4: overloaded down, underloaded up
    torch.testing.assert_close(moe.router.e_score_correction_bias, expected)
    torch.testing.assert_close(deltas[2], expected)
    # logging has its own counts
    assert moe.router.pending_counts is None and moe.router.log_counts is not None
    update_expert_bias(moe)  # nothing accumulated since: no change
    torch.testing.assert_close(moe.router.e_score_correction_bias, expected)
    moe.router.accumulate_counts(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    update_expert_bias(moe, rate=0.5)  # perfectly balanced: sign 0
    torch.testing.assert_close(moe.router.e_score_correction_bias, expected)


def test_callback_balances_a_skewed_router_in_training():
    cfg = module_config(router_bias_update_rate=0.01, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    moe = HybridMoE(cfg, 0).train()
    torch.manual_seed(0)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
        moe.router.weight[:2, 0] += 1.5  # experts 0 and 1 favoured by the inputs' common direction
    x = torch.randn(4, 8, 32)
    x[..., 0] += 1.0
    moe(x, None)
    cv_before = load_metrics(moe.last_counts)["load_cv"]
    moe.router.pending_counts = None
    callback = AuxFreeBiasCallback()
    for _ in range(40):
        for micro in x.split(2):  # two micro-batches per optimizer step
            moe(micro, None)
        callback.on_step_end(None, None, None, model=moe)
    bias = moe.router.e_score_correction_bias
    assert bias[:2].mean() < bias[2:].mean() - 0.05  # the favoured experts were pushed down
    moe(x, None)
    assert cv_before > 0.4 and load_metrics(moe.last_counts)["load_cv"] < 0.5 * cv_before


def test_eval_forwards_do_not_accumulate():
    moe = HybridMoE(module_config(), 0).eval()
    moe(torch.randn(1, 4, 32), None)
    assert moe.router.pending_counts is None and moe.router.log_counts is None
    assert moe.last_counts.sum() == 8  # 4 tokens x k=2, still recorded for inspection


_DDP_WORKER = r"""
import datetime, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from hf_hybrid.configuration_hybrid import HybridConfig
from hf_hybrid.moe import HybridMoE
from hf_hybrid.moe_training import update_expert_bias

rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
cfg = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, mlp_pattern="moe", num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=16, router_bias_update_rate=0.01)
cfg._experts_implementation = "eager"
torch.manual_seed(0)
moe = HybridMoE(cfg, 0).train()
ddp = DDP(moe)  # broadcast_buffers=True: rank 0's buffers are copied to every rank before each forward
torch.manual_seed(100 + rank)  # each rank sees different data
for _ in range(2):  # two micro-batches in one optimizer step
    ddp(torch.randn(3, 4, 32) * (1 + rank)).pow(2).mean().backward()
local = moe.router.pending_counts.clone()
update_expert_bias(ddp)
synced = moe.router.e_score_correction_bias.clone()
ddp(torch.randn(1, 2, 32))  # a forward: DDP broadcasts buffers here
after_broadcast = moe.router.e_score_correction_bias.clone()
# negative control: a rank-local update diverges, and the next forward overwrites it with rank 0's
moe.router.pending_counts = local.clone()
update_expert_bias(ddp, all_reduce=False)
local_update = moe.router.e_score_correction_bias.clone()
ddp(torch.randn(1, 2, 32))
clobbered = moe.router.e_score_correction_bias.clone()
torch.save(dict(local=local, synced=synced, after_broadcast=after_broadcast, local_update=local_update,
                clobbered=clobbered), os.path.join(out_dir, f"rank{rank}.pt"))
os._exit(0)  # torch's gloo teardown races after the work is done (see tests/gloo_exit.py)
"""


def test_ddp_two_processes_keep_identical_biases(tmp_path):
    """Two gloo processes (plain subprocesses with a hard timeout, so a broken collective fails instead of
    hanging)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, str(rank), "2", str(tmp_path / "init"), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0["local"], r1["local"])  # the ranks really routed different loads
    global_counts = r0["local"] + r1["local"]
    expected = 0.01 * torch.sign(global_counts.mean() - global_counts)
    for r in (r0, r1):
        torch.testing.assert_close(r["synced"], expected)
        torch.testing.assert_close(r["after_broadcast"], expected)
    # without the all-reduce each rank moves its own way, and DDP's broadcast then erases rank 1's update
    assert not torch.equal(r0["local_update"], r1["local_update"])
    assert torch.equal(r1["clobbered"], r0["local_update"])


# ------------------------------------------------------------------------------------------------------------
# logging, heatmap, CLI


def test_load_metrics_values():
    m = load_metrics(torch.tensor([4.0, 2.0, 2.0, 0.0]))
    assert m["load_max_over_mean"] == pytest.approx(2.0)
    assert m["load_min"] == 0.0
    assert m["load_cv"] == pytest.approx(((4 + 0 + 0 + 4) / 4) ** 0.5 / 2)
    assert load_metrics(torch.ones(8)) == {"load_max_over_mean": 1.0, "load_cv": 0.0, "load_min": 1.0}


def test_logging_callback_adds_per_layer_keys_and_jsonl(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    cfg = module_config(num_experts=4, num_experts_per_tok=1)
    moe = HybridMoE(cfg, 5).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # a collapsed router: every token on expert 0 (ties go to the lower index)
    moe(torch.randn(2, 3, 32), None)
    moe(torch.randn(1, 4, 32), None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState()
    state.global_step = 7
    state.log_history.append({"loss": 1.0, "step": 7})
    logs = {"loss": 1.0}
    ExpertLoadLoggingCallback(save_jsonl=True).on_log(args, state, TrainerControl(), logs=logs, model=moe)
    assert logs["moe/layer5/load_max_over_mean"] == pytest.approx(4.0)
    assert logs["moe/layer5/load_min"] == 0.0
    assert logs["moe/layer5/load_cv"] == pytest.approx(3**0.5)
    assert state.log_history[-1]["moe/layer5/load_cv"] == logs["moe/layer5/load_cv"]
    record = json.loads((tmp_path / "expert_load.jsonl").read_text().splitlines()[-1])
    assert record == {"step": 7, "layers": [5], "load": [[1.0, 0.0, 0.0, 0.0]]}
    assert collect_expert_load(moe) == {}  # consumed


def test_heatmap_png_and_cli_from_log(tmp_path):
    load = torch.rand(3, 8)
    path = plot_expert_load_heatmap(load, tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000

    log = tmp_path / "loads.jsonl"
    log.write_text(
        "\n".join(json.dumps({"step": s, "layers": [1, 2], "load": [[s, 1.0], [1.0, 1.0]]}) for s in (10, 20))
    )
    assert read_load_log(log) == ([1, 2], [[20.0, 1.0], [1.0, 1.0]])
    assert read_load_log(log, step=10)[1][0] == [10.0, 1.0]
    (tmp_path / "dict.json").write_text(json.dumps({"3": [1, 2], "1": [3, 4]}))
    assert read_load_log(tmp_path / "dict.json") == ([1, 3], [[3.0, 4.0], [1.0, 2.0]])

    parser = argparse.ArgumentParser(prog="hf-hybrid")
    add_expert_load_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["expert-load", "--log", str(log), "-o", str(tmp_path / "cli.png")])
    assert args.func(args) == 0
    assert (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC


def _save_tiny_model_with_tokenizer(directory: str, cfg: HybridConfig) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}, " ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    build(cfg).save_pretrained(directory)


def test_cli_runs_a_saved_model_on_text(tmp_path):
    _save_tiny_model_with_tokenizer(str(tmp_path / "model"), moe_config())
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 10)
    parser = argparse.ArgumentParser()
    add_expert_load_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "expert-load",
            "--model",
            str(tmp_path / "model"),
            "--text",
            str(tmp_path / "t.txt"),
            "--seq-len",
            "64",
            "--save-json",
            str(tmp_path / "m.json"),
            "-o",
            str(tmp_path / "m.png"),
        ]
    )
    assert args.func(args) == 0
    layers, load = read_load_log(tmp_path / "m.json")
    assert layers == [1, 2] and all(abs(sum(row) - 1) < 1e-5 for row in load)
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------------------
# model integration


def test_model_loss_rule_with_moe():
    cfg = moe_config(num_shared_experts=1, router_seq_aux_loss_coef=0.1)
    model = build(cfg)
    ids = torch.randint(0, 64, (2, 7))
    out = model.train()(input_ids=ids, labels=ids)  # no output_router_logits needed
    expected = (
        out.lm_loss
        + cfg.router_aux_loss_coef * out.aux_loss
        + cfg.router_z_loss_coef * out.z_loss
        + cfg.router_seq_aux_loss_coef * out.seq_aux_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0 and out.loss > out.lm_loss
    assert set(out.layer_stats["expert_load"]) == {1, 2}
    out_eval = model.eval()(input_ids=ids, labels=ids)
    assert torch.equal(out_eval.loss, out_eval.lm_loss) and out_eval.aux_loss is None
    torch.testing.assert_close(out_eval.lm_loss, out.lm_loss)  # same maths: no dropout or jitter here


def test_model_padding_excluded_from_aux_loss():
    model = build(moe_config()).train()
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    padded = model(input_ids=ids, attention_mask=mask)
    alone = [model(input_ids=ids[:1]), model(input_ids=ids[1:, 2:])]
    loads = torch.stack(
        [torch.stack([a.layer_stats["expert_load"][i] * n for i in (1, 2)]) for a, n in zip(alone, (6, 4))]
    ).sum(0)
    got = torch.stack([padded.layer_stats["expert_load"][i] for i in (1, 2)])
    torch.testing.assert_close(got, loads / loads.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_save_load_round_trip_keeps_bias_and_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(moe_config()).eval()
    bias = torch.linspace(-0.1234567, 0.3456789, 8)
    model.model.layers[1].mlp.router.e_score_correction_bias.copy_(bias)
    ids = torch.randint(0, 64, (1, 9))
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.layers[1].mlp.router.e_score_correction_bias, bias)
    assert torch.equal(loaded(input_ids=ids).logits, ref)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    router = half.model.layers[1].mlp.router
    assert router.weight.dtype == torch.bfloat16 and router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, bias)


def test_model_experts_implementation_switch(tmp_path):
    from transformers import AutoModelForCausalLM

    build(moe_config()).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 5))
    logits = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
        assert model.model.layers[1].mlp.experts.config._experts_implementation == impl
        logits[impl] = model(input_ids=ids).logits
    for impl in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(logits[impl], logits["eager"], atol=1e-5, rtol=1e-5)


def test_trainer_with_moe_callbacks(tmp_path):
    from transformers import Trainer, TrainingArguments

    # A rate well below the spread of router scores, so one step's bias does not decide the next step's
    # routing.
    cfg = moe_config(router_bias_update_rate=1e-5)
    model = build(cfg)
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 12))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    install_moe_callbacks(trainer, save_jsonl=True)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], ExpertLoadLoggingCallback)
    bias_cb = next(c for c in callbacks if isinstance(c, AuxFreeBiasCallback))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("moe/layer1/load_cv" in h and "moe/layer2/load_min" in h for h in logged)
    assert set(bias_cb.last_update) == {1, 2}
    for layer in (1, 2):
        bias = model.model.layers[layer].mlp.router.e_score_correction_bias
        steps = bias / 1e-5  # two updates of +-1e-5 (or 0) per expert
        assert bias.dtype == torch.float32 and (bias != 0).any()
        torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
        assert steps.abs().max() <= 2 + 1e-3
    assert len((tmp_path / "expert_load.jsonl").read_text().splitlines()) == 2


def test_peft_lora_on_experts_router_and_shared_experts(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = moe_config(num_shared_experts=1)
    ids = torch.randint(0, 64, (2, 7))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,  # PEFT's parameter wrappers need dropout 0
        target_modules=["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"],
    )
    model = get_peft_model(build(cfg), lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for part in (
        "experts.lora_A",
        "experts.base_layer.lora_A",
        "router.lora_B",
        "shared_experts.down_proj.lora_A",
    ):
        assert any(part in n for n in names), part
    assert not any("gate_up_proj" in n or n.endswith("router.base_layer.weight") for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(cfg), tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, ref)
    merged = reloaded.merge_and_unload()
    assert type(merged.model.layers[1].mlp.experts).__name__ == "HybridExperts"
    torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(build(cfg).eval()(input_ids=ids).logits, ref)  # the adapter changed the model


def test_package_import_exposes_moe():
    assert hf_hybrid.HybridConfig is HybridConfig
    assert isinstance(build(moe_config()).model.layers[1].mlp, HybridMoE)


def test_hash_routing_in_model_uses_the_models_input_ids():
    """The model puts input_ids in ctx.stats (only the new tokens when decoding); hash routing runs and
    generates."""
    model = build(moe_config(moe_routing="hash")).eval()
    prompt = torch.randint(0, 64, (1, 4))
    out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    # prefill + one cached decode step == full forward: the decode step routed by its own token's id
    pre = model(input_ids=out[:, :-1], use_cache=True)
    step = model(input_ids=out[:, -1:], cache=pre.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, model(input_ids=out).logits[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(prompt))


def test_bias_frozen_during_dsa_dense_warmup():
    """DeepSeek's dense warm-up trains the indexers alone: the aux-loss-free bias must not move either (it
    did: the MoE layers still counted tokens and the callback still applied the update)."""
    from hf_hybrid.convert.dsa import freeze_all_but_indexers, set_dsa_mode
    from hf_hybrid.presets import preset_config

    cfg = preset_config(
        "tiny-dsa",
        vocab_size=64,
        mlp_pattern="moe",
        num_experts=4,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        router_bias_update_rate=0.05,
    )
    model = build(cfg).train()
    set_dsa_mode(model, "dense_warmup")
    freeze_all_but_indexers(model)
    callback = AuxFreeBiasCallback()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert any(m.router.pending_counts is not None for m in model.modules() if isinstance(m, HybridMoE))
    callback.on_step_end(None, None, None, model=model)
    for m in model.modules():
        if isinstance(m, HybridMoE):
            assert torch.count_nonzero(m.router.e_score_correction_bias) == 0
            assert m.router.pending_counts is None
    set_dsa_mode(model, "sparse")  # after the warm-up the same callback balances again
    model(input_ids=ids, labels=ids, use_cache=False)
    callback.on_step_end(None, None, None, model=model)
    assert callback.last_update and all(torch.count_nonzero(d) > 0 for d in callback.last_update.values())
