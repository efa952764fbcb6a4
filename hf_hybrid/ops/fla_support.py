"""When to hand a linear-mixer op to fla-core's Triton kernels, and when to keep our torch path.

Backends of every op in ``hf_hybrid.ops.{delta_rule,simple_gla}``:

- ``"torch"``: our chunked torch form (any device, autograd, torch.compile).
- ``"naive"``: the per-token recurrence (the spec; slow).
- ``"fla"``: fla-core's chunk kernel. Forced: raises if fla-core cannot serve the call (it does run on CPU
  tensors under ``TRITON_INTERPRET=1``, which is how the tests check it).
- ``"auto"``: fla when the tensors are on CUDA, fla-core imports, and fla can serve this call; otherwise
  torch, with one log line (logger ``"hf_hybrid"``) the first time each reason comes up.

fla-core 0.6 refuses every *gated* chunk backward (``chunk_bwd_dqkwg`` with ``g``: GDN and gated simple GLA)
on Hopper (sm90) with Triton >= 3.4.0 and < 3.7.1 (wrong results there, fla #640), unless its TileLang
backend takes the call: tilelang installed, an nvcc for its JIT, not switched off (``FLA_TILELANG=0`` or
``FLA_DISABLE_BACKEND_DISPATCH=1``), and the call accepted by its verifier, which requires the cached
chunk states in q's dtype. GDN keeps them in q's dtype; simple GLA's backward keeps them in fp32, so only
fp32 inputs get through. This module checks all of that up front, so ``auto`` uses fla only where it works:
forward-only calls always, backward where the check passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("hf_hybrid")

BACKENDS = ("auto", "torch", "naive", "fla")

# fla-core 0.6, fla/ops/common/chunk_o.py::chunk_bwd_dqkwg: Hopper and TRITON_ABOVE_3_4_0 and not
# TRITON_ABOVE_3_7_1
_BROKEN_TRITON = ((3, 4, 0), (3, 7, 1))

_logged: set[str] = set()


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on the ``hf_hybrid`` logger the first time ``key`` is seen in this process.

    Silent while torch.compile traces (a logging call would break the graph); eager calls still log.
    """
    if torch.compiler.is_compiling() or key in _logged:
        return
    _logged.add(key)
    logger.log(level, message)


_import_error: list[str | None] = []  # memo of fla_import_error (functools.cache would break tracing)


@torch.compiler.assume_constant_result
def fla_import_error() -> str | None:
    """None when fla-core's chunk kernels import, else why not (one short sentence). Checked once."""
    if not _import_error:
        _import_error.append(_try_import_fla())
    return _import_error[0]


def _try_import_fla() -> str | None:
    for package in ("triton", "fla"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed" + (" (fla-core)" if package == "fla" else "")
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
        importlib.import_module("fla.ops.simple_gla")
    except Exception as error:  # a broken install must not break import of hf_hybrid
        return f"fla-core failed to import ({type(error).__name__}: {error})"
    return None


# ops whose fla-core module is imported on first use, so that one broken kernel module only disables its own
# op
_OP_MODULES = {"kda": "fla.ops.kda"}
_op_import_errors: dict[str, str | None] = {}


@torch.compiler.assume_constant_result
def _op_import_error(op: str) -> str | None:
    """None when ``op``'s own fla-core module imports (or it has none beyond the common ones), else why
    not."""
    if op not in _op_import_errors:
        error = None
        if op in _OP_MODULES:
            try:
                importlib.import_module(_OP_MODULES[op])
            except Exception as exc:  # a broken install must not break the other ops
                error = f"fla-core's {_OP_MODULES[op]} failed to import ({type(exc).__name__}: {exc})"
        _op_import_errors[op] = error
    return _op_import_errors[op]


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def gated_backward_refusal(
    capability: tuple[int, int], triton_version: str, *, tilelang_usable: bool, states_in_q_dtype: bool
) -> str | None:
    """Why fla-core 0.6 would refuse a gated chunk backward, or None when it will run it.

    ``capability``: the CUDA device capability; ``tilelang_usable``: fla's TileLang backend is installed and
    enabled; ``states_in_q_dtype``: the op's backward caches its chunk states in q's dtype (GDN: yes; simple
    GLA: only for fp32 inputs), which fla's TileLang verifier requires.
    """
    low, high = _BROKEN_TRITON
    if capability[0] != 9 or not (low <= _version_tuple(triton_version) < high):
        return None
    if tilelang_usable and states_in_q_dtype:
        return None
    why = "tilelang is not usable" if not tilelang_usable else "its TileLang backend rejects this dtype"
    return (
        f"fla-core refuses gated chunk backward on Hopper with Triton {triton_version} "
        f"(broken for 3.4.0 <= Triton < 3.7.1) and {why}"
    )


def _tilelang_usable() -> bool:
    """fla's own test for its TileLang backend of the common kernels (installed, nvcc found, enabled)."""
    if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":  # fla's switch, mirrored
        return False
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend

        return CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled()
    except Exception:
        return False


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will want a backward through these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fla_refusal(op: str, tensors: tuple[torch.Tensor | None, ...], *, gated: bool) -> str | None:
    """Why fla-core cannot serve this call of ``op`` (None when it can)."""
    error = fla_import_error() or _op_import_error(op)
    if error is not None:
        return error
    q = tensors[0]
    if gated and q.is_cuda and needs_grad(*tensors):
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        return _gated_backward_refusal_on(index, op == "gated_delta_rule" or q.dtype == torch.float32)
    return None


@torch.compiler.assume_constant_result
def _gated_backward_refusal_on(device_index: int, states_in_q_dtype: bool) -> str | None:
    """:func:`gated_backward_refusal` for this CUDA device, this Triton and fla's TileLang backend."""
    import triton

    return gated_backward_refusal(
        torch.cuda.get_device_capability(device_index),
        triton.__version__,
        tilelang_usable=_tilelang_usable(),
        states_in_q_dtype=states_in_q_dtype,
    )


def resolve_backend(
    op: str,
    backend: str,
    tensors: tuple[torch.Tensor | None, ...],
    *,
    gated: bool,
) -> str:
    """Pick "torch", "naive" or "fla" for one call of ``op`` (see the module docstring).

    ``tensors``: the call's inputs, q first; ``gated``: fla would run its gated ``chunk_bwd_dqkwg`` backward
    (GDN, simple GLA with a scalar ``g``), the one fla refuses on Hopper with some Triton versions.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known for {op}; choose one of: {', '.join(BACKENDS)}")
    if backend in ("torch", "naive"):
        return backend
    if backend == "fla":
        refusal = fla_refusal(op, tensors, gated=gated)
        if refusal is not None:
            raise RuntimeError(f"{op}: backend='fla' was requested but {refusal}")
        return "fla"
    if not tensors[0].is_cuda:
        log_once(f"{op}:cpu", f"{op}: tensors are not on CUDA; using the chunked torch path")
        return "torch"
    refusal = fla_refusal(op, tensors, gated=gated)
    if refusal is not None:
        log_once(
            f"{op}:{refusal}",
            f"{op}: not using fla-core ({refusal}); using the chunked torch path",
            logging.WARNING,
        )
        return "torch"
    return "fla"


def without_autocast(like: torch.Tensor):
    """A context that turns an enclosing autocast off on ``like``'s device. The chunked delta-rule forms (GDN,
    KDA) choose their own precisions (fp32 decays and states); an enclosing autocast (Trainer's bf16 on CPU,
    TRL's default) would recast their inner matmuls and leave the hand-written backwards with mixed dtypes."""
    return torch.autocast(device_type=like.device.type, enabled=False)
