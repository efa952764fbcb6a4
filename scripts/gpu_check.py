"""GPU truth in one call: install what the image lacks, check every kernel, take every benchmark, in a time
budget.

    python3 scripts/gpu_check.py                      # on the GPU machine (from the repo root; .whl/ carried)
    python3 scripts/gpu_check.py --dry-run            # CPU rehearsal: every section at toy sizes
    (tests/test_gpu_check.py) python3 scripts/gpu_check.py --budget-s 300 --sections
    ceilings,pytest_gpu,bench_dsa

1. environment: installs the wheels of ``.whl/`` (scripts/build_gpu_wheels.sh) that the image lacks, with no
   network (``pip install --no-index --find-links .whl --target <out>/site``, only where the installed version
   is missing or older than we need); prints versions, the GPU, and whether fla-core refuses gated backwards
   there.
2. ceilings: a large device-to-device copy (GB/s, bytes read + written) and an 8192³ bf16 matmul (TFLOP/s).
3. correctness: ``pytest -m gpu tests/gpu``, one report row per test (fresh random inputs, outputs poisoned:
   every ``torch.empty`` is NaN-filled while a check runs, so an element a kernel never writes fails; against
   an fp32 reference on the same rounded inputs, bound 4u for a low-precision dtype of unit roundoff u, 1e-5
   for fp32, norm-wise **and row by row**, so a few wrong rows fail: tests/gpu/gpu_checks.py): DSA Triton
   sparse attention fwd/bwd and indexer kernels (bf16 and fp16; fp32 and fp16 in the CPU interpreter, whose
   bf16 ``tl.dot`` is wrong), fla-core vs our chunked path, grouped experts vs the loop spec, absorbed vs
   naive MLA decode. The tests are the checks; this script installs, budgets and reports.
4. benchmarks, each a ratio against an anchor timed in the same run (median of CUDA-event timings after
   warm-up): linear mixers (scripts/bench_linear.py), DSA prefill and its memory against transformers'
   deepseek_v32 (scripts/bench_dsa_ops.py, scripts/dsa_memory.py), MLA decode (scripts/bench_mla.py), the MoE
   block (scripts/bench_moe.py), end-to-end training against transformers' qwen3_next, MQAR (scripts/mqar.py).

Every result is appended to ``<out>/gpu_report.json`` (rewritten whole, always valid) and
``<out>/gpu_report.md`` as soon as it exists, so a timeout loses nothing. ``--out`` defaults to ``$OUT`` (the
device call's folder) or ./gpu_out. Each section checks the clock (``--budget-s``, default 480) and skips
itself, or its remaining rows, with a line saying so; a section that raises records its traceback and the run
goes on; a dead CUDA context (an illegal access poisons the process) re-runs the script in a fresh process
from the next section.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# (distribution, oldest version we accept, needed only when the carried transformers is installed): what the
# checks import beyond the image's torch and triton; the last four are transformers 5.24's own requirements.
REQUIREMENTS = (
    ("transformers", "5.23.0", False),
    ("fla-core", "0.6.0", False),
    ("peft", "0.17.0", False),  # hf_hybrid's own floor (pyproject)
    ("tokenizers", "0.23.1", True),
    ("huggingface-hub", "1.31.0", True),
    ("safetensors", "0.8.0", True),
    ("regex", "2025.10.22", True),
)


# ---------------------------------------------------------------------------------------------------- install


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_key(version: str) -> tuple:
    from packaging.version import Version

    return Version(version)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_plan(wheel_dir: Path, installed: Callable[[str], str | None] = installed_version) -> list[dict]:
    """One row per requirement: installed version, needed minimum, the carried wheel, and the action
    ("ok", "install" or "missing wheel"). transformers' own requirements count only when it is installed from
    the carried wheel (an installed transformers that is new enough brings what it needs)."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    rows = []
    for dist, minimum, only_with_transformers in REQUIREMENTS:
        have = installed(dist)
        wheel = next((w for w in wheels if w.name.lower().startswith(_normalise(dist) + "-")), None)
        ok = have is not None and _version_key(have) >= _version_key(minimum)
        if only_with_transformers and rows[0]["action"] == "ok":
            ok = True
        action = "ok" if ok else ("install" if wheel is not None else "missing wheel")
        rows.append(
            {
                "package": dist,
                "installed": have,
                "needs": f">={minimum}",
                "wheel": wheel and wheel.name,
                "action": action,
            }
        )
    # hf-hybrid: the checked-out tree beside this script comes first on the path; its wheel serves a copy of
    # the script run outside the tree
    wheel = next((w for w in wheels if w.name.startswith("hf_hybrid-")), None)
    in_tree = (REPO / "hf_hybrid" / "__init__.py").is_file()
    rows.append(
        {
            "package": "hf-hybrid",
            "installed": "tree" if in_tree else installed("hf-hybrid"),
            "needs": "any",
            "wheel": wheel and wheel.name,
            "action": "ok"
            if in_tree or installed("hf-hybrid")
            else ("install" if wheel else "missing wheel"),
        }
    )
    return rows


def install(plan: list[dict], wheel_dir: Path, site: Path) -> str:
    """pip-install the planned wheels into ``site`` (no network, no dependencies) and put it first on the
    path."""
    wheels = [str(wheel_dir / row["wheel"]) for row in plan if row["action"] == "install"]
    if not wheels:
        return "nothing to install"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--find-links",
        str(wheel_dir),
        "--target",
        str(site),
        *wheels,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install failed ({proc.returncode}): {proc.stderr[-2000:]}")
    activate_site(site)
    return f"installed {len(wheels)} wheels into {site}"


def activate_site(site: Path) -> None:
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    parts = [str(site), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    importlib.invalidate_caches()


# ----------------------------------------------------------------------------------------------------- report


class Report:
    """Results as they come: the JSON file is rewritten whole (always valid), the Markdown file appended
    to."""

    def __init__(self, out: Path, meta: dict, resume: bool):
        self.json_path, self.md_path = out / "gpu_report.json", out / "gpu_report.md"
        out.mkdir(parents=True, exist_ok=True)
        if resume and self.json_path.exists():
            self.data = json.loads(self.json_path.read_text())
            self.data.setdefault("restarts", []).append(meta)
        else:
            self.data = {"meta": meta, "results": []}
            self.md_path.write_text(f"# hf-hybrid GPU check\n\n{_md_meta(meta)}\n")
        self._flush()

    def add(self, result: dict) -> None:
        self.data["results"].append(result)
        self._flush()
        with self.md_path.open("a") as f:
            f.write(_md_section(result))

    def update_meta(self, **fields) -> None:
        self.data["meta"].update(fields)
        self._flush()

    def _flush(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.json_path)


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


def _clean(x):
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), tuples lists, other objects
    strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _md_meta(meta: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in meta.items())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def _md_section(result: dict) -> str:
    lines = [f"\n## {result['section']} — {result['status']} ({result['seconds']:.1f} s)\n"]
    if result.get("reason"):
        lines.append(f"{result['reason']}\n")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    rows = result.get("rows") or []
    if rows:
        cols = list(dict.fromkeys(k for row in rows for k in row))
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines.extend("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows)
        lines.append("")
    if result.get("traceback"):
        lines.append("```\n" + result["traceback"][-4000:] + "\n```\n")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# runner


@dataclass
class Section:
    name: str
    kind: str  # setup | correctness | benchmark
    cap_s: float  # the most this section may take of the budget
    need_s: float  # the least worth starting with
    fn: Callable


SECTIONS: list[Section] = []


def section(kind: str, cap_s: float, need_s: float = 3.0):
    def register(fn):
        SECTIONS.append(Section(fn.__name__, kind, cap_s, need_s, fn))
        return fn

    return register


class Run:
    """What every section reads: device, sizes (toy in a dry run), the clock, results of earlier sections."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.dry = args.dry_run
        self.cuda = args.device == "cuda"
        self.device = torch.device(args.device)
        self.deadline = args.deadline
        self.section_end = args.deadline
        self.ceilings: dict[str, float] = {}
        self.skipped_rows = 0
        self.rows: list[dict] = []  # the running section's rows: kept when it raises half-way
        if self.cuda:  # fp32 references in full fp32 (cuDNN convolutions default to TF32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # low-precision dtypes checked: bf16 tl.dot is wrong in Triton's CPU interpreter
        self.low_dtypes = (torch.bfloat16, torch.float16) if self.cuda else (torch.float32, torch.float16)
        self.bench_dtype = torch.bfloat16 if self.cuda else torch.float32

    def left(self) -> float:
        return self.section_end - time.time()

    def keep_going(self, need_s: float = 0.0) -> bool:
        """False once this section's share of the budget is spent (each caller records what it skipped)."""
        ok = time.time() + need_s < self.section_end
        if not ok:
            self.skipped_rows += 1
        return ok

    def pick(self, gpu, dry):
        return dry if self.dry else gpu

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def empty_cache(self) -> None:
        import gc

        if self.cuda:  # (on CPU a collection of the whole heap costs more than it frees here)
            gc.collect()
            self.torch.cuda.empty_cache()

    def measure(self, warmup: int, iters: int) -> Callable[[Callable], float]:
        """ms of fn(): median of CUDA-event timings after warm-up on GPU (bench_linear.timer); the minimum of
        perf_counter timings on CPU."""
        import bench_linear

        return bench_linear.timer("cuda" if self.cuda else "cpu", warmup, iters)

    def peak_gib(self, fn: Callable) -> float:
        """Peak memory rise during fn(): the CUDA allocator's peak on GPU, peak RSS on CPU (bench_dsa_ops)."""
        import bench_dsa_ops

        return (bench_dsa_ops.gpu_peak_mib(fn) if self.cuda else bench_dsa_ops.cpu_peak_mib(fn)) / 1024


def skipped_row(**keys) -> dict:
    return {**keys, "result": "skipped: section's time budget spent"}


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def short_error(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def cuda_context_alive() -> bool:
    import torch

    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


def run_sections(run: Run, report: Report, names: list[str], start: int) -> int:
    """Run SECTIONS[start:] that are in ``names``; returns the index to resume from after a dead CUDA context,
    or -1 when all ran."""
    for i, sec in enumerate(SECTIONS):
        if i < start or sec.name not in names:
            continue
        t0 = time.time()
        left = run.deadline - t0
        result = {"section": sec.name, "kind": sec.kind}
        if left < sec.need_s:
            result.update(
                status="skip",
                reason=f"skipped: {left:.0f} s of the budget left, this section needs ≥ {sec.need_s:.0f} s",
                seconds=0.0,
            )
            print(f"[{sec.name}] {result['reason']}", flush=True)
            report.add(result)
            continue
        run.section_end = min(run.deadline, t0 + sec.cap_s)
        run.skipped_rows = 0
        run.rows = []
        print(
            f"[{sec.name}] start ({left:.0f} s of the budget left, this section ≤ {sec.cap_s:.0f} s)",
            flush=True,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sec.fn(run) or {}
            result.update(out)
            result.setdefault("status", "ok")
            if run.skipped_rows and result["status"] == "ok":
                result["status"] = "partial"
                result.setdefault("notes", []).append(
                    f"{run.skipped_rows} measurement(s) skipped: the section's share of the budget was spent"
                )
        except Exception as error:
            result.update(
                status="error", reason=short_error(error), traceback=traceback.format_exc(), rows=run.rows
            )
        result["seconds"] = time.time() - t0
        result = _clean(result)
        report.add(result)
        print(
            f"[{sec.name}] {result['status']} in {result['seconds']:.1f} s"
            + (f": {result['reason']}" if result.get("reason") else ""),
            flush=True,
        )
        for row in result.get("rows", [])[:40]:
            print("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        run.empty_cache()
        if result["status"] == "error" and run.cuda and not cuda_context_alive():
            return i + 1
    return -1


# --------------------------------------------------------------------------------------------------- helpers


def _accepting(fn: Callable) -> Callable:
    """``fn`` that drops keyword arguments it does not take (what transformers' kernel wrapper does)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    return lambda *a, **kw: fn(*a, **{k: v for k, v in kw.items() if k in params})


@contextlib.contextmanager
def qwen3_next_torch_fallback():
    """transformers' qwen3_next on its torch fallback even where fla-core is importable (it then binds fla's
    kernels behind the torch names at import)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    names = [
        n
        for n in (
            "torch_chunk_gated_delta_rule",
            "torch_recurrent_gated_delta_rule",
            "causal_conv1d_fn",
            "causal_conv1d_update",
        )
        if hasattr(m, n)
    ]
    saved = {n: getattr(m, n) for n in names}
    for n in names:
        setattr(m, n, _accepting(inspect.unwrap(saved[n])))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(m, n, fn)


# -------------------------------------------------------------------------------------------- setup sections


@section("setup", cap_s=60, need_s=0)
def environment(run: Run) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(run.device),
        "dry_run": run.dry,
    }
    for mod in ("triton", "transformers", "fla", "hf_hybrid"):
        try:
            m = importlib.import_module(mod)
            info[mod] = f"{getattr(m, '__version__', '?')} ({Path(m.__file__).parent})"
        except Exception as error:
            info[mod] = f"not importable ({short_error(error)})"
    notes = [f"install: {run.args.install_note}"]
    if run.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        from hf_hybrid.ops import fla_support

        error = fla_support.fla_import_error()
        if error is None:
            reason = fla_support._gated_backward_refusal_on(0, True)
            notes.append(f"fla-core gated backward: {reason or 'served by fla-core'}")
        else:
            notes.append(f"fla-core: {error}")
    else:
        info["gpu"] = "none (CPU dry run)"
    rows = [{"item": k, "value": v} for k, v in info.items()] + [
        {"item": f"package {r['package']}", "value": f"{r['installed']} (needs {r['needs']}): {r['action']}"}
        for r in run.args.plan
    ]
    run.info = info
    missing = [r["package"] for r in run.args.plan if r["action"] == "missing wheel"]
    out = {"rows": rows, "notes": notes}
    if missing:
        out.update(
            status="fail",
            reason=f"no carried wheel for {', '.join(missing)} (run scripts/build_gpu_wheels.sh)",
        )
    return out


@section("setup", cap_s=30)
def ceilings(run: Run) -> dict:
    """The two numbers every benchmark is read against: copy bandwidth and dense matmul rate, on random
    data."""
    import torch

    n_bytes = run.pick(4 * 2**30, 32 * 2**20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=run.device).random_()
    dst = torch.empty_like(src)
    measure = run.measure(warmup=3, iters=run.pick(10, 2))
    copy_ms = measure(lambda src=src, dst=dst: dst.copy_(src))
    src = dst = None
    n = run.pick(8192, 256)
    dtype = run.pick(torch.bfloat16, torch.float32)
    a = torch.randn(n, n, device=run.device, dtype=dtype)
    b = torch.randn(n, n, device=run.device, dtype=dtype)
    mm_ms = measure(lambda: a @ b)
    run.ceilings = {"copy_gbs": 2 * n_bytes / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / mm_ms / 1e9}
    rows = [
        {
            "ceiling": "device-to-device copy",
            "size": f"{n_bytes / 2**30:.3g} GiB",
            "ms": copy_ms,
            "rate": f"{run.ceilings['copy_gbs']:.0f} GB/s (read + write)",
        },
        {
            "ceiling": "matmul",
            "size": f"{n}^3 {str(dtype).removeprefix('torch.')}",
            "ms": mm_ms,
            "rate": f"{run.ceilings['matmul_tflops']:.1f} TFLOP/s",
        },
    ]
    return {"rows": rows, "data": run.ceilings}


# --------------------------------------------------------------------------------------- correctness section


@section("correctness", cap_s=150, need_s=10)
def pytest_gpu(run: Run) -> dict:
    """The correctness checks: ``pytest -m gpu tests/gpu`` (DSA Triton kernels, fla-core dispatch, grouped
    experts, MLA decode; see tests/gpu/gpu_checks.py for the poisoned outputs and the per-row error bounds),
    one row per test. The CPU dry run runs them at toy sizes in Triton's interpreter
    (``HF_HYBRID_GPU_TESTS_ON_CPU=1``; fla-core's skip there)."""
    import tempfile
    import xml.etree.ElementTree as ET

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if not run.cuda:
        env.update(HF_HYBRID_GPU_TESTS_ON_CPU="1", TRITON_INTERPRET="1")
    timeout = max(10.0, run.left())
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "gpu_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
        cmd.append(f"--junitxml={xml_path}")
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {
                "status": "partial",
                "reason": f"pytest -m gpu tests/gpu did not finish in {timeout:.0f} s",
            }
        rows = []
        if xml_path.is_file():
            for case in ET.parse(xml_path).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    found = case.find(tag)
                    if found is not None:
                        outcome = tag
                        message = ((found.get("message") or "").splitlines() or [""])[0][:300]
                        break
                rows.append(
                    {
                        "test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                        "outcome": outcome,
                        "seconds": float(case.get("time") or 0.0),
                        "message": message,
                        "pass": outcome in ("passed", "skipped"),
                    }
                )
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    out = {"rows": rows, "notes": [f"{' '.join(cmd[2:-1])}: {tail}"]}
    if proc.returncode == 5:  # nothing collected
        out.update(status="fail", reason="no test is marked gpu in tests/gpu")
    elif proc.returncode != 0:
        out.update(status="fail", reason=tail, traceback=proc.stdout[-6000:] + proc.stderr[-2000:])
    elif not rows:
        out.update(status="fail", reason="pytest wrote no per-test results")
    return out


def _mla_config(run: Run, **sizes):
    import bench_mla

    ns = SimpleNamespace(**sizes)
    return bench_mla.make_config(ns)


MLA_GPU = dict(hidden=2048, heads=16, q_lora=None, kv_lora=512, rope=64, nope=128, v=128, contexts=[16384])
MLA_DRY = dict(hidden=64, heads=4, q_lora=None, kv_lora=32, rope=8, nope=16, v=16, contexts=[64])


# ------------------------------------------------------------------------------------------ benchmark
# sections


@section("benchmark", cap_s=90, need_s=10)
def bench_linear(run: Run) -> dict:
    """GDN, Mamba-2 (simple GLA) and linear attention: our chunked path vs fla-core, transformers' torch
    fallback and SDPA, fwd and fwd+bwd."""
    import bench_linear as bl

    lengths = run.pick([8192, 32768], [64, 128])
    heads, dim = run.pick((16, 128), (2, 16))
    measure = run.measure(warmup=1, iters=run.pick(3, 1))
    rows, notes = run.rows, []
    for op in bl.OPS:
        fns = bl.candidates(op, "cuda", compile_ours=False)  # every GPU candidate, also in the CPU dry run
        if not run.cuda:
            fns["fla"] = None
            notes.append(f"{op}: fla n/a (needs CUDA)")
        for mode, length, row in bl.bench_rows(
            op,
            "cuda" if run.cuda else "cpu",
            lengths,
            run.bench_dtype,
            1,
            heads,
            dim,
            ["fwd", "fwd+bwd"],
            fns,
            measure,
            naive_max_len=0,
            hf_max_len=max(lengths),
            keep_going=lambda: run.keep_going(3),
            on_error=lambda msg, op=op: notes.append(f"{op}: {msg.strip()}"),
        ):
            out = {"op": op, "mode": mode, "T": length}
            out.update({f"{k} ms": v for k, v in row.items()})
            ours = row["ours"]
            for k, v in row.items():
                if k != "ours":
                    out[f"{k}/ours"] = v / ours if isinstance(v, float) and isinstance(ours, float) else "n/a"
            rows.append(out)
            run.empty_cache()
    return {"rows": rows, "notes": notes}


# H, Hkv, Dqk, Dv, scale; lengths (dense SDPA with Dqk != Dv runs the slow mem-efficient kernel)
DSA_SHAPES = {
    "gqa H16/Hkv4 D128": ((16, 4, 128, 128, 128**-0.5), (16384, 65536, 131072)),
    "mla-latent H16 Dqk576/Dv512": ((16, 1, 576, 512, 192**-0.5), (16384, 65536)),
}
DSA_SHAPES_DRY = {"gqa": ((2, 1, 16, 16, 0.25), (16,)), "mla-latent": ((2, 1, 24, 16, 0.2), (16,))}
DSA_MODEL_GPU = dict(
    hidden=2048,
    heads=16,
    index=dict(index_n_heads=64, index_head_dim=128),
    mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
)
DSA_MODEL_DRY = dict(hidden=64, heads=4, mla=None, index=dict(index_n_heads=2, index_head_dim=16))


def attempt(row: dict, fn: Callable[[], dict]) -> bool:
    """row.update(fn()); an out-of-memory becomes the row's result ("OOM"), any other error too (returns
    False)."""
    try:
        row.update(fn())
        return True
    except Exception as error:
        row["result"] = "OOM" if is_oom(error) else short_error(error)
        return is_oom(error)


@section("benchmark", cap_s=120, need_s=15)
def bench_dsa(run: Run) -> dict:
    """Peak memory of a one-layer DSA model vs transformers' deepseek_v32 (a dense T×T mask: its OOM is the
    result); DSA prefill fwd and fwd+bwd (Triton, torch) vs dense SDPA; the indexer top-k."""
    import bench_dsa_ops as bd
    import dsa_memory
    import torch

    Ts = run.pick([16384, 65536, 131072], [16])
    K = run.pick(2048, 4)
    reps = run.pick(3, 1)
    # the dry run times one call, no warm-up: Triton's interpreter takes about a second per call
    time_ms = bd.gpu_time_ms if run.cuda else (lambda fn, reps: run.measure(warmup=0, iters=reps)(fn))
    peak_mib = bd.gpu_peak_mib if run.cuda else bd.cpu_peak_mib
    rows, ok = run.rows, True
    # 1. one-layer models: ours (MLA + DSA) vs transformers' deepseek_v32, prefill and training
    sizes = run.pick(DSA_MODEL_GPU, DSA_MODEL_DRY)
    for variant in ("dsa-mla", "deepseek_v32"):
        model = dsa_memory.build(
            variant, sizes["hidden"], K, max(Ts), sizes["heads"], sizes["mla"], sizes["index"]
        )
        model.to(run.device, run.bench_dtype)
        dsa_memory.run_pass(model, torch.randint(0, dsa_memory.VOCAB, (1, 256), device=run.device), "train")
        model.zero_grad(set_to_none=True)
        for mode in ("fwd", "train"):
            model.train(mode == "train")
            for T in Ts:
                if not run.keep_going(10):
                    rows.append(skipped_row(table="model memory", model=variant, mode=mode, T=T))
                    continue
                ids = torch.randint(0, dsa_memory.VOCAB, (1, T), device=run.device)
                row = {"table": "model memory", "model": variant, "mode": mode, "T": T, "K": K}

                def one_pass(m=model, ids=ids, mode=mode):
                    t0 = time.perf_counter()
                    peak = run.peak_gib(lambda: (dsa_memory.run_pass(m, ids, mode), run.sync()))
                    return {"peak GiB": peak, "s": time.perf_counter() - t0}

                ok &= attempt(row, one_pass)
                model.zero_grad(set_to_none=True)
                rows.append(row)
                run.empty_cache()
        model = None
        run.empty_cache()
    # 2. sparse attention vs dense SDPA
    for shape_name, (shape, lengths) in run.pick(DSA_SHAPES, DSA_SHAPES_DRY).items():
        for T in lengths:
            if not run.keep_going(10):
                rows.append(skipped_row(table="attention", shape=shape_name, T=T))
                continue
            row = {"table": "attention", "shape": shape_name, "T": T, "K": K}
            got = {}
            ok &= attempt(
                row,
                lambda T=T, shape=shape, got=got: (
                    got.update(
                        bd._gpu_attention_rows(
                            T,
                            K,
                            reps,
                            run.pick(16384, 32),
                            *shape,
                            dev=run.device,
                            dt=run.bench_dtype,
                            time_ms=time_ms,
                            peak_mib=peak_mib,
                        )
                    )
                    or {}
                ),
            )
            if not got:
                rows.append(row)
            base = got.get("sdpa", (None, None, None))
            for op, (tf, tb, mb) in got.items():
                rows.append(
                    {
                        **row,
                        "op": op,
                        "fwd ms": tf if tf is not None else "OOM",
                        "f+b ms": tb if tb is not None else "OOM",
                        "f+b peak GiB": mb if mb is not None else "OOM",
                        "sdpa/this fwd": base[0] / tf if tf and base[0] else None,
                        "sdpa/this f+b": base[1] / tb if tb and base[1] else None,
                    }
                )
            run.empty_cache()
    # 3. indexer top-k: torch vs fused Triton logits
    chunks = run.pick(
        (("torch", (64, 8192)), ("triton", (256, 16384))), (("torch", (16, 32)), ("triton", (16, 32)))
    )
    for T in Ts:
        if not run.keep_going(5):
            rows.append(skipped_row(table="indexer top-k", T=T))
            continue
        row = {"table": "indexer top-k", "T": T, "K": K}
        got = {}
        ok &= attempt(
            row,
            lambda T=T, got=got: (
                got.update(
                    bd._gpu_indexer_rows(
                        T,
                        K,
                        reps,
                        run.pick(16384, 64),
                        *run.pick((64, 128), (2, 8)),
                        dev=run.device,
                        dt=run.bench_dtype,
                        time_ms=time_ms,
                        peak_mib=peak_mib,
                        chunks=chunks,
                    )
                )
                or {}
            ),
        )
        if not got:
            rows.append(row)
        torch_ms = got.get("torch", (None,))[0]
        for backend, (t, m) in got.items():
            rows.append(
                {
                    **row,
                    "op": backend,
                    "fwd ms": "OOM" if t is None else t,
                    "peak GiB": "OOM" if m is None else m,
                    "torch/this": torch_ms / t if torch_ms and t else None,
                }
            )
        run.empty_cache()
    if not ok:
        return {
            "status": "fail",
            "reason": "a measurement failed with an error other than out-of-memory (see rows)",
            "rows": rows,
        }
    return {"rows": rows}


@section("benchmark", cap_s=40, need_s=5)
def bench_mla(run: Run) -> dict:
    """MLA decode layer-step: our absorbed path vs our naive path vs transformers' DeepseekV3Attention."""
    import bench_mla as bm

    sizes = run.pick(MLA_GPU, MLA_DRY)
    batch, context = run.pick((16, 16384), (2, 64))
    config = _mla_config(run, **sizes)
    args = SimpleNamespace(warmup=run.pick(3, 1), steps=run.pick(10, 2), profile=False)
    timer = bm.Timer(run.device)
    rows = run.rows
    results = {}
    for label, fn in (
        (
            "ours absorbed",
            lambda: bm.bench_ours(
                config, "absorbed", batch, context, run.device, run.bench_dtype, timer, args
            ),
        ),
        (
            "ours naive",
            lambda: bm.bench_ours(config, "naive", batch, context, run.device, run.bench_dtype, timer, args),
        ),
        (
            "transformers deepseek_v3",
            lambda: bm.bench_transformers(config, batch, context, run.device, run.bench_dtype, timer, args),
        ),
    ):
        if not run.keep_going(3):
            rows.append(skipped_row(path=label))
            continue
        results[label] = fn()
        run.empty_cache()
    base = results.get("ours absorbed", (None,))[0]
    cache_gb = batch * context * (sizes["kv_lora"] + sizes["rope"]) * (2 if run.cuda else 4) / 1e9
    floor = cache_gb / (run.ceilings.get("copy_gbs", float("nan")) / 2) * 1e3 if run.ceilings else None
    for label, (dev_ms, wall_ms) in results.items():
        rows.append(
            {
                "path": label,
                "batch": batch,
                "context": context,
                "device ms": dev_ms,
                "wall ms": wall_ms,
                "this/absorbed": dev_ms / base if base else None,
            }
        )
    notes = [
        f"latent cache {cache_gb:.3f} GB; reading it once at the measured copy bandwidth ≈ {floor:.3g} ms"
        if floor
        else "no copy ceiling measured"
    ]
    return {"rows": rows, "notes": notes}


@section("benchmark", cap_s=40, need_s=5)
def bench_moe(run: Run) -> dict:
    """MoE block fwd and fwd+bwd: HybridMoE vs transformers' Qwen3MoeSparseMoeBlock, same weights, TFLOP/s of
    the routed expert GEMMs and their share of the measured matmul ceiling."""
    import bench_moe as bm

    tokens, E, K, H, inter = run.pick((16384, 64, 8, 2048, 1024), (64, 8, 2, 32, 16))
    iters = run.pick(10, 1)
    time_fn = bm.time_cuda if run.cuda else (lambda fn, n: bm.time_cpu(fn, n))
    ceiling = run.ceilings.get("matmul_tflops")
    rows = run.rows
    for impl in ("grouped_mm", "eager"):
        if not run.keep_going(5):
            rows.append(skipped_row(impl=impl))
            continue
        res = bm.compare_with_qwen3(
            E,
            K,
            inter,
            impl,
            H=H,
            tokens=tokens,
            device=run.device,
            dtype=run.bench_dtype,
            iters=iters,
            time_fn=time_fn,
        )
        flops = res["flops_fwd"]
        for block in ("qwen3_moe", "hf_hybrid"):
            f, b, peak = res[block]
            tf_f, tf_b = flops / f / 1e9, 3 * flops / b / 1e9
            rows.append(
                {
                    "impl": impl,
                    "block": block,
                    "tokens": tokens,
                    "E": E,
                    "k": K,
                    "H": H,
                    "I": inter,
                    "fwd ms": f,
                    "fwd TFLOP/s": tf_f,
                    "f+b ms": b,
                    "f+b TFLOP/s": tf_b,
                    "f+b % of matmul ceiling": 100 * tf_b / ceiling if ceiling else None,
                    "peak GiB": peak,
                    "qwen3/this fwd": res["qwen3_moe"][0] / f,
                    "qwen3/this f+b": res["qwen3_moe"][1] / b,
                    "tokens agreeing within 2%": res["agree"],
                }
            )
        run.empty_cache()
    return {"rows": rows}


TRAIN_GPU = dict(
    vocab=32000,
    hidden=1024,
    layers=12,
    heads=8,
    kv_heads=2,
    head_dim=128,
    lin_k_heads=8,
    lin_v_heads=16,
    lin_dim=128,
    experts=32,
    topk=4,
    moe_inter=512,
    shapes=((4, 2048), (1, 8192)),
)
TRAIN_DRY = dict(
    vocab=128,
    hidden=64,
    layers=4,
    heads=4,
    kv_heads=2,
    head_dim=16,
    lin_k_heads=2,
    lin_v_heads=4,
    lin_dim=16,
    experts=4,
    topk=2,
    moe_inter=32,
    shapes=((2, 32), (1, 64)),
)


def train_models(w: dict) -> dict[str, Callable]:
    """Builders of the two models with the same widths: ours (3:1 GDN:attention, MoE everywhere, one shared
    expert, gated attention with q/k norm) and transformers' qwen3_next."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from hf_hybrid import HybridConfig, HybridForCausalLM

    ctx = max(t for _, t in w["shapes"])

    def ours():
        cfg = HybridConfig(
            vocab_size=w["vocab"],
            hidden_size=w["hidden"],
            intermediate_size=4 * w["hidden"],
            num_hidden_layers=w["layers"],
            num_attention_heads=w["heads"],
            num_key_value_heads=w["kv_heads"],
            head_dim=w["head_dim"],
            mixer_pattern="3:1 gated_deltanet:attention",
            mlp_pattern="moe",
            gdn_num_key_heads=w["lin_k_heads"],
            gdn_num_value_heads=w["lin_v_heads"],
            gdn_key_head_dim=w["lin_dim"],
            gdn_value_head_dim=w["lin_dim"],
            num_experts=w["experts"],
            num_experts_per_tok=w["topk"],
            moe_intermediate_size=w["moe_inter"],
            num_shared_experts=1,
            attention_output_gate=True,
            use_qk_norm=True,
            max_position_embeddings=ctx,
        )
        cfg._attn_implementation = "sdpa"
        return HybridForCausalLM(cfg)

    def qwen3_next():
        cfg = Qwen3NextConfig(
            vocab_size=w["vocab"],
            hidden_size=w["hidden"],
            intermediate_size=4 * w["hidden"],
            num_hidden_layers=w["layers"],
            num_attention_heads=w["heads"],
            num_key_value_heads=w["kv_heads"],
            head_dim=w["head_dim"],
            linear_num_key_heads=w["lin_k_heads"],
            linear_num_value_heads=w["lin_v_heads"],
            linear_key_head_dim=w["lin_dim"],
            linear_value_head_dim=w["lin_dim"],
            num_experts=w["experts"],
            num_experts_per_tok=w["topk"],
            moe_intermediate_size=w["moe_inter"],
            shared_expert_intermediate_size=w["moe_inter"],
            max_position_embeddings=ctx,
        )
        cfg._attn_implementation = "sdpa"
        return Qwen3NextForCausalLM(cfg)

    return {"hf_hybrid": ours, "qwen3_next": qwen3_next}


@section("benchmark", cap_s=120, need_s=20)
def bench_train(run: Run) -> dict:
    """End-to-end training tokens/s and peak memory: our hybrid vs transformers' qwen3_next (its torch
    fallback forced, and with fla-core where fla serves), bf16 weights, AdamW."""
    import torch

    w = run.pick(TRAIN_GPU, TRAIN_DRY)
    builders = train_models(w)
    variants = [
        ("hf_hybrid", "hf_hybrid", contextlib.nullcontext),
        ("qwen3_next (torch fallback)", "qwen3_next", qwen3_next_torch_fallback),
        ("qwen3_next (fla-core)", "qwen3_next", contextlib.nullcontext),
    ]
    measure = run.measure(warmup=run.pick(2, 1), iters=run.pick(3, 1))
    rows, notes = run.rows, []
    for label, key, patch in variants:
        if label.endswith("(fla-core)") and not run.cuda:
            rows.append({"model": label, "result": "skipped: fla-core needs CUDA"})
            continue
        with patch():
            torch.manual_seed(0)
            with torch.device(run.device):
                model = builders[key]().to(run.bench_dtype)
            model.train()
            params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for B, T in w["shapes"]:
                if not run.keep_going(8):
                    rows.append(skipped_row(model=label, shape=f"{B}x{T}"))
                    continue
                ids = torch.randint(0, w["vocab"], (B, T), device=run.device)

                def step(ids=ids, model=model, opt=opt):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                row = {"model": label, "params M": params / 1e6, "shape": f"{B}x{T}"}
                try:
                    if run.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    ms = measure(step)
                    row.update({"step ms": ms, "tokens/s": B * T / ms * 1e3})
                    if run.cuda:
                        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
                except Exception as error:
                    row["result"] = "OOM" if is_oom(error) else short_error(error)
                    opt.zero_grad(set_to_none=True)
                rows.append(row)
                run.empty_cache()
            model = opt = None
            run.empty_cache()
    ours = {r["shape"]: r["tokens/s"] for r in rows if r.get("model") == "hf_hybrid" and "tokens/s" in r}
    for r in rows:
        if "tokens/s" in r and r["model"] != "hf_hybrid" and r["shape"] in ours:
            r["hf_hybrid/this"] = ours[r["shape"]] / r["tokens/s"]
    # an OOM is a result, and so is fla-core refusing qwen3_next's backward; any other failure is ours to fix
    broken = [
        r
        for r in rows
        if "(fla-core)" not in r["model"]
        and r.get("result", "OOM") not in ("OOM",)
        and not r["result"].startswith("skipped")
    ]
    if broken:
        return {
            "status": "fail",
            "reason": f"{broken[0]['model']} {broken[0]['shape']}: {broken[0]['result']}",
            "rows": rows,
            "notes": notes,
        }
    return {"rows": rows, "notes": notes}


MQAR_GPU = dict(
    vocab=8192,
    seq_len=512,
    pairs=64,
    d_model=128,
    heads=2,
    layers=2,
    steps=800,
    batch=64,
    lr=1e-3,
    models=("attention", "gated_deltanet", "hybrid_gdn", "mamba2", "hybrid_mamba2", "linear_attention"),
)
MQAR_DRY = dict(
    vocab=64,
    seq_len=32,
    pairs=2,
    d_model=32,
    heads=2,
    layers=2,
    steps=2,
    batch=4,
    lr=1e-3,
    models=("attention", "gated_deltanet"),
)
MQAR_INIT = {"mamba2": 0.1}  # scripts/mqar.py: Mamba-2 trains with transformers' 0.1, the others with 0.02


@section("benchmark", cap_s=120, need_s=20)
def mqar(run: Run) -> dict:
    """MQAR at a Zoology-like size the CPU table cannot reach (scripts/mqar.py), one model at a time."""
    import mqar as mq
    import torch

    # fp32 training as users run it (TF32 matmuls); the last section
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = dict(run.pick(MQAR_GPU, MQAR_DRY))
    models = cfg.pop("models")
    pairs = cfg.pop("pairs")
    args = SimpleNamespace(**cfg, seed=0, device=str(run.device))
    rows = run.rows
    per_model = None
    for name in models:
        need = per_model * 1.2 if per_model else 5
        if not run.keep_going(need):
            rows.append(skipped_row(model=name, pairs=pairs))
            continue
        t0 = time.time()
        row = mq.run(name, args, pairs, MQAR_INIT.get(name, 0.02))
        per_model = time.time() - t0
        rows.append(
            {
                "model": name,
                "pairs": pairs,
                "seq": cfg["seq_len"],
                "vocab": cfg["vocab"],
                "steps": cfg["steps"],
                "init": row["init_std"],
                "accuracy": row["accuracy"],
                "train s": row["train_s"],
            }
        )
        run.empty_cache()
    return {"rows": rows}


# most valuable first: the kernels' correctness, then the benchmarks that are quick, then the long ones (a
# budget that runs out drops the tail; --sections runs the rest in a second call)
ORDER = [
    "environment",
    "ceilings",
    "pytest_gpu",
    "bench_mla",
    "bench_moe",
    "bench_dsa",
    "bench_linear",
    "bench_train",
    "mqar",
]
SECTIONS.sort(key=lambda sec: ORDER.index(sec.name))


# ---------------------------------------------------------------------------------------------------------
# main


def summary(report: Report) -> str:
    lines = [f"{'section':<14} {'status':<8} {'s':>6}  note"]
    for r in report.data["results"]:
        note = r.get("reason") or ""
        if r["kind"] == "correctness" and r.get("rows"):
            checked = [x for x in r["rows"] if "pass" in x]
            worst = max(
                (
                    x["error"] / x["bound"]
                    for x in checked
                    if isinstance(x.get("error"), float) and x.get("bound")
                ),
                default=None,
            )
            note = note or f"{sum(x['pass'] for x in checked)}/{len(checked)} pass" + (
                f", worst error/bound {worst:.2f}" if worst is not None else ""
            )
        lines.append(f"{r['section']:<14} {r['status']:<8} {r['seconds']:>6.1f}  {note[:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dry-run", action="store_true", help="toy sizes (on CPU: Triton's interpreter, CPU timers)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--budget-s", type=float, default=480.0, help="global time budget in seconds (default 8 min)"
    )
    p.add_argument("--out", default=None, help="report folder (default: $OUT, else ./gpu_out)")
    p.add_argument(
        "--wheels", default=str(REPO / ".whl"), help="carried wheels (scripts/build_gpu_wheels.sh)"
    )
    p.add_argument("--sections", default="all", help="comma-separated subset of the sections, in their order")
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # a resumed run's clock
    p.add_argument("--start-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    started = time.time()
    args.deadline = args.deadline or started + args.budget_s
    out = Path(args.out or os.environ.get("OUT") or "gpu_out")
    names = [s.name for s in SECTIONS] if args.sections == "all" else args.sections.split(",")
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        p.error(
            f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(s.name for s in SECTIONS)}"
        )

    # 1. packages: before torch, transformers or hf_hybrid are imported
    for path in (str(REPO), str(SCRIPTS)):
        if path not in sys.path:
            sys.path.insert(0, path)
    wheel_dir, site = Path(args.wheels), out / "site"
    if site.is_dir() and args.start_at:
        activate_site(site)  # a resumed run: installed by the first process
    args.plan = install_plan(wheel_dir)
    if args.dry_run:
        todo = [r["package"] for r in args.plan if r["action"] == "install"]
        args.install_note = (
            f"dry run: would install {', '.join(todo)}" if todo else "dry run: nothing to install"
        )
    else:
        site.mkdir(parents=True, exist_ok=True)
        args.install_note = install(args.plan, wheel_dir, site)
        args.plan = install_plan(wheel_dir)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        if not args.dry_run:
            p.error("without CUDA only --dry-run is supported (the full sizes need a GPU)")
        # before triton is first imported: @triton.jit decides at decoration time
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            p.error("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "argv": " ".join(sys.argv),
        "device": args.device,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
    }
    report = Report(out, meta, resume=args.start_at > 0)
    run = Run(args)
    for r in report.data["results"]:  # a resumed run reads the ceilings the first process measured
        if r["section"] == "ceilings" and r["status"] == "ok":
            run.ceilings = r["data"]
    resume_at = run_sections(run, report, names, args.start_at)
    if resume_at >= 0 and resume_at < len(SECTIONS):
        print(
            f"CUDA context is dead after {SECTIONS[resume_at - 1].name}: continuing in a fresh process",
            flush=True,
        )
        cmd = [
            sys.executable,
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--deadline",
            str(args.deadline),
            "--start-at",
            str(resume_at),
            "--out",
            str(out),
        ]
        sys.stdout.flush()
        return subprocess.run(cmd).returncode
    report.update_meta(
        finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        seconds=round(time.time() - started, 1),
    )
    print(f"\n{summary(report)}\nreport: {report.json_path} and {report.md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
