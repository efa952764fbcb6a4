"""fla-core's Triton kernels against our chunked torch path, on CPU under the Triton interpreter; and the
rules ``auto`` dispatch uses to decide when fla-core can be trusted.

``TRITON_INTERPRET=1`` must be set before triton and fla-core are imported (``triton.jit`` decides at
decoration time), and by the time this module runs, transformers has usually imported triton already. So
the kernels run in a fresh subprocess: this file re-runs itself as a script, which sets up the interpreter,
computes every case once and prints the errors as JSON; the tests below only read them.

fla-core 0.6's chunk kernels need two patches to run in the interpreter (``TRITON_INTERPRET=1``), applied
in the subprocess only and never to site-packages:
1. the autotuner keeps one config: with several, it benchmarks them, which needs a GPU driver;
2. loop indices of ``for i in range(...)`` inside kernels become triton scalars: fla calls ``i.to(tl.int64)``
   on them, which a Python int (what the interpreter yields) does not have.
fp32 only: bf16 ``tl.dot`` is wrong in the interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# fp32, as a fraction of the reference tensor's largest magnitude: fla's kernels and our torch path are two
# fp32 chunk algorithms with different blockings and summation orders.
FP32_TOL = 1e-5
CASES = (
    "gdn_gva_l2norm",
    "gdn_varlen",
    "simple_gla",
    "linear_attention",
    "simple_gla_varlen",
    "gla_per_channel",
    "kda_gva_varlen_l2norm",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
HAVE_FLA = importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


def _patch_triton_interpreter() -> None:
    """The two patches (see the module docstring). Call before any fla kernel runs."""
    import ast

    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]

    def scalar_range(indices):
        for i in indices:
            yield interpreter._implicit_cvt(i)  # a triton scalar, like the compiler's induction variable

    # the interpreter copies its module globals into each rewritten kernel's globals, so the name resolves
    # there
    interpreter._hf_hybrid_scalar_range = scalar_range

    def visit_For(self, node):
        node = self.generic_visit(node)
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range":
            node.iter = ast.Call(ast.Name("_hf_hybrid_scalar_range", ast.Load()), [it], [])
        return node

    interpreter.ASTTransformer.visit_For = visit_For


def _run_cases() -> dict[str, dict[str, float]]:
    """Every case: {tensor name: max |fla - torch| / max |torch|} over output, final state and all gradients,
    and ``fla_calls``: how many times fla-core's entry point ran (so a silent fallback cannot pass)."""
    import fla.ops.gated_delta_rule
    import fla.ops.gla
    import fla.ops.kda
    import fla.ops.simple_gla
    import torch
    import torch.nn.functional as F

    from hf_hybrid.ops.gated_delta import gated_delta_rule
    from hf_hybrid.ops.kda import kda
    from hf_hybrid.ops.simple_gla import simple_gla

    calls = []
    for module, name in (
        (fla.ops.gated_delta_rule, "chunk_gated_delta_rule"),
        (fla.ops.simple_gla, "chunk_simple_gla"),
        (fla.ops.gla, "chunk_gla"),
        (fla.ops.kda, "chunk_kda"),
    ):
        entry = getattr(module, name)
        setattr(module, name, lambda *a, _entry=entry, **kw: calls.append(1) or _entry(*a, **kw))

    def compare(op, inputs, **kwargs):
        calls.clear()
        results = []
        for backend in ("torch", "fla"):
            leaves = {n: x.clone().requires_grad_() for n, x in inputs.items() if x is not None}
            args = [leaves.get(n) for n in inputs if n != "initial_state"]
            o, state = op(
                *args,
                initial_state=leaves["initial_state"],
                output_final_state=True,
                backend=backend,
                **kwargs,
            )
            gen = torch.Generator().manual_seed(1)
            loss = (o * torch.randn(o.shape, generator=gen)).sum()
            loss = loss + (state * torch.randn(state.shape, generator=gen)).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            results.append({"o": o, "final_state": state, **{f"d{n}": g for n, g in zip(leaves, grads)}})
        ours, fla = results
        errors = {n: ((fla[n] - ours[n]).abs().max() / ours[n].abs().max()).item() for n in ours}
        return {**errors, "fla_calls": len(calls)}

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen)

    def gdn_inputs(batch, length, hk, hv, states):
        return {
            "q": randn(batch, length, hk, 16),
            "k": randn(batch, length, hk, 16),
            "v": randn(batch, length, hv, 32),
            "g": F.logsigmoid(randn(batch, length, hv) + 2),
            "beta": torch.rand(batch, length, hv, generator=gen),
            "initial_state": randn(states, hv, 16, 32),
        }

    def gla_inputs(batch, length, states, g_shape):
        return {
            "q": randn(batch, length, 2, 16),
            "k": randn(batch, length, 2, 16) / 4,
            "v": randn(batch, length, 2, 32),
            "g": None if g_shape is None else F.logsigmoid(randn(*g_shape) + 2),
            "initial_state": randn(states, 2, 16, 32),
        }

    def kda_inputs(batch, length, hk, hv, states):
        inputs = gdn_inputs(batch, length, hk, hv, states)
        inputs["g"] = F.logsigmoid(randn(batch, length, hv, 16) + 2)  # one log decay per key channel
        return inputs

    cu_seqlens = torch.tensor([0, 13, 14, 45], dtype=torch.int32)
    return {
        "gdn_gva_l2norm": compare(gated_delta_rule, gdn_inputs(1, 50, 1, 2, 1), use_qk_l2norm=True),
        "gdn_varlen": compare(
            gated_delta_rule,
            gdn_inputs(1, 45, 2, 2, 3),
            use_qk_l2norm=True,
            cu_seqlens=cu_seqlens,
            chunk_size=16,
        ),
        "simple_gla": compare(simple_gla, gla_inputs(1, 50, 1, (1, 50, 2))),
        # two chunks: within one chunk and without decay, both paths do the very same matmuls (bitwise equal)
        "linear_attention": compare(simple_gla, gla_inputs(1, 100, 1, None)),
        "simple_gla_varlen": compare(simple_gla, gla_inputs(1, 45, 3, (1, 45, 2)), cu_seqlens=cu_seqlens),
        "gla_per_channel": compare(simple_gla, gla_inputs(1, 50, 1, (1, 50, 2, 16))),
        "kda_gva_varlen_l2norm": compare(
            kda, kda_inputs(1, 45, 1, 2, 3), use_qk_l2norm=True, cu_seqlens=cu_seqlens, chunk_size=32
        ),
    }


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, dict[str, float]]:
    if not HAVE_FLA:
        pytest.skip("fla-core and triton are not installed")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_fla_matches_torch_chunk(interpreter_errors, case):
    errors = dict(interpreter_errors[case])
    assert errors.pop("fla_calls") == 1, "fla-core's kernel did not run"
    assert {"o", "final_state", "dq", "dk", "dv", "dinitial_state"} <= errors.keys()
    bad = {name: err for name, err in errors.items() if not err <= FP32_TOL}  # also catches NaN
    assert not bad, f"{case}: fla-core and the torch chunk path differ beyond {FP32_TOL:.0e}: {bad}"


@pytest.mark.parametrize(
    ("capability", "triton_version", "tilelang", "states_in_q_dtype", "refused"),
    [
        ((9, 0), "3.6.0", False, True, True),  # the common H100 image: torch 2.11 + Triton 3.6
        ((9, 0), "3.4.0", False, True, True),
        ((9, 0), "3.7.0+git1234", False, True, True),
        ((9, 0), "3.6.0", True, True, False),  # TileLang takes the GDN backward
        ((9, 0), "3.6.0", True, False, True),  # ... but not simple GLA's fp32 states with bf16 inputs
        ((9, 0), "3.7.1", False, True, False),
        ((9, 0), "3.3.1", False, True, False),
        ((8, 0), "3.6.0", False, True, False),  # A100
        ((10, 0), "3.6.0", False, True, False),  # Blackwell
    ],
)
def test_gated_backward_refusal_rule(capability, triton_version, tilelang, states_in_q_dtype, refused):
    from hf_hybrid.ops.fla_support import gated_backward_refusal

    reason = gated_backward_refusal(
        capability, triton_version, tilelang_usable=tilelang, states_in_q_dtype=states_in_q_dtype
    )
    assert (reason is not None) == refused
    if refused:
        assert "Hopper" in reason and triton_version in reason


def test_forced_fla_without_fla_core_raises(monkeypatch):
    import torch

    from hf_hybrid.ops import fla_support
    from hf_hybrid.ops.gated_delta import gated_delta_rule

    monkeypatch.setattr(fla_support, "fla_import_error", lambda: "fla is not installed (fla-core)")
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="backend='fla' was requested but fla is not installed"):
        gated_delta_rule(q, q, q, q[..., 0], q[..., 0].sigmoid(), backend="fla")


if __name__ == "__main__":
    # the subprocess of `interpreter_errors`: TRITON_INTERPRET=1 is already in the environment
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (it sets TRITON_INTERPRET=1)"
    # the ops need nothing from the model package: load hf_hybrid as a bare namespace so its __init__ (the
    # whole transformers model stack) is not imported, which keeps this subprocess cheap
    import types

    package = types.ModuleType("hf_hybrid")
    package.__path__ = [str(REPO_ROOT / "hf_hybrid")]
    sys.modules["hf_hybrid"] = package
    _patch_triton_interpreter()
    print(json.dumps(_run_cases()))
