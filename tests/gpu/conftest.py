"""The GPU correctness tests (``pytest -m gpu tests/gpu``; ``scripts/gpu_check.py`` runs them on the GPU
machine and records the outcome in its report). Every test here is marked ``gpu``: the default run deselects
them, as it does ``slow``.

Without CUDA they skip, unless ``HF_HYBRID_GPU_TESTS_ON_CPU=1``: then they run at toy sizes on the CPU, the
Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton is first imported;
``scripts/gpu_check.py --dry-run`` sets both), so the checks themselves cannot rot between GPU runs. bf16 is
not checked in the interpreter (its bf16 ``tl.dot`` is wrong): fp32 and fp16 there, bf16 and fp16 on a GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from gpu_checks import Device

# bench_moe / bench_mla build the MoE and MLA cases the benchmarks time
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

ON_CPU = os.environ.get("HF_HYBRID_GPU_TESTS_ON_CPU") == "1"


@pytest.fixture(scope="session")
def gpu() -> Device:
    if torch.cuda.is_available():
        # fp32 references in full fp32 (cuDNN convolutions and matmuls default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return Device(torch.device("cuda"), True, (torch.bfloat16, torch.float16))
    if ON_CPU:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.fail("HF_HYBRID_GPU_TESTS_ON_CPU=1 needs TRITON_INTERPRET=1 set before triton is imported")
        return Device(torch.device("cpu"), False, (torch.float32, torch.float16))
    pytest.skip("needs a CUDA device (HF_HYBRID_GPU_TESTS_ON_CPU=1 runs the toy sizes on the CPU)")
