"""Hub kernels (transformers 5.25 kernelizes in ``from_pretrained`` by default, and again on ``train()`` /
``eval()``): no module of ours is ever swapped for a Hub kernel, and the torch functions behind transformers'
kernel-dispatching functions stay reachable (``compat.torch_reference``)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from hf_hybrid import HybridForCausalLM, compat
from hf_hybrid.convert.native import get_family
from hf_hybrid.convert.native.kimi_linear import _KERNEL_FUNCTIONS as _KDA_FUNCTIONS
from hf_hybrid.convert.native.qwen3_next import _KERNEL_FUNCTIONS
from hf_hybrid.presets import preset_config

# Hub kernels transformers may attach to the activations we take from it: the same function, computed faster.
SAME_MATHS = {"SiLU", "GeLU", "FastGELU", "NewGELU", "GeluTanh", "QuickGELU"}


def _kernel_targets(model: nn.Module) -> dict[str, str]:
    """Module name -> Hub kernel layer name, for every module kernelize could replace."""
    return {
        name: type(module).kernel_layer_name
        for name, module in model.named_modules()
        if getattr(type(module), "kernel_layer_name", None) is not None
    }


def test_from_pretrained_train_and_eval_keep_our_modules(tmp_path):
    config = preset_config(
        "tiny-moe",
        mixer_types=["gated_deltanet", "mamba2", "mla", "attention"],
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        mamba_head_dim=8,
        mamba_state_size=8,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    )
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    classes = {name: type(module) for name, module in model.named_modules()}

    loaded = HybridForCausalLM.from_pretrained(tmp_path)  # use_kernels left at its default
    for stage in ("from_pretrained", "train", "eval"):
        if stage == "train":
            loaded.train()
        elif stage == "eval":
            loaded.eval()
        assert {name: type(module) for name, module in loaded.named_modules()} == classes, stage
        # kernelize swaps a module's forward on the instance
        assert [name for name, module in loaded.named_modules() if "forward" in vars(module)] == [], stage
        assert set(_kernel_targets(loaded).values()) <= SAME_MATHS, stage
        ours = [n for n, m in loaded.named_modules() if type(m).__module__.startswith("hf_hybrid")]
        assert ours and not set(ours) & set(_kernel_targets(loaded)), stage
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


def test_torch_reference_reaches_transformers_torch_functions():
    from transformers.models.mamba2 import modeling_mamba2

    scan = compat.torch_reference(modeling_mamba2.mamba2_chunk_scan)
    assert not isinstance(scan, nn.Module) and scan.__name__ == "mamba2_chunk_scan"
    assert compat.torch_reference(None) is None


@pytest.mark.parametrize("family", ["qwen3_next", "olmo_hybrid", "kimi_linear", "glm5_next_text"])
def test_native_torch_kernels_swaps_in_the_torch_functions(family):
    """The families' CPU workaround (``native_context``) must not be a silent no-op: inside it, every
    kernel-dispatching function the family's modeling module calls is the plain torch function of the same
    name (5.25 binds ``nn.Module`` dispatchers there, which ``inspect.unwrap`` alone does not see through)."""
    fam = get_family(family)
    if not fam.available:
        pytest.skip(f"{family} needs transformers >= {fam.min_transformers}, not installed here")
    module = importlib.import_module(fam.model_class.__module__)
    names = [
        n
        for n in dict.fromkeys((*_KERNEL_FUNCTIONS, *_KDA_FUNCTIONS))
        if getattr(module, n, None) is not None
    ]
    assert len(names) == 4, names  # two recurrence functions and the two convolutions
    before = {name: getattr(module, name) for name in names}
    with fam.native_context():
        for name in names:
            inside = getattr(module, name)
            assert not isinstance(inside, nn.Module) and inside.__name__ == name
            assert not hasattr(inside, "__wrapped__")
    assert {name: getattr(module, name) for name in names} == before
