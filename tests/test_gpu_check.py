"""scripts/gpu_check.py, the one-call GPU verification, rehearsed on CPU so it cannot rot between GPU runs.

The dry run (toy sizes, Triton's interpreter, CPU timers) runs in a subprocess: TRITON_INTERPRET=1 must be set
before triton is first imported, which this test session has usually done already. The runner itself
(isolation of a failing section, the time budget, the install plan) is tested in-process with stand-in
sections.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"

# the only tests of tests/gpu that may skip themselves on a CPU (fla-core needs CUDA; bf16 is not checked in
# Triton's interpreter)
CPU_SKIPS = ("test_fla_against_our_chunked_path", "bf16]")
# per benchmark section: a column every measured row must fill with a positive number
TIMED = {
    "bench_linear": "ours ms",
    "bench_mla": "device ms",
    "bench_moe": "f+b ms",
    "bench_train": "tokens/s",
    "mqar": "accuracy",
}


def load_gpu_check():
    """The script as a module (it imports only the standard library at the top)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    env.pop("OUT", None)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--dry-run",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--budget-s",
        "600",
    ]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out, proc, time.time() - start


def test_dry_run_gives_every_section_a_result(dry_run):
    out, proc, _ = dry_run
    report = json.loads((out / "gpu_report.json").read_text())
    results = {r["section"]: r for r in report["results"]}
    names = [s.name for s in load_gpu_check().SECTIONS]
    assert list(results) == names, "every section reports once, in order"
    for name, r in results.items():
        assert r["status"] == "ok", f"{name}: {r['status']} {r.get('reason')}\n{r.get('traceback', '')}"
        assert r["rows"], f"{name} produced no rows"
        assert "summary" not in r  # (the printed summary is not part of the data)
    assert report["meta"]["dry_run"] is True and report["meta"]["seconds"] > 0
    # the printed summary names every section
    for name in names:
        assert name in proc.stdout.split("section        status")[-1]


def test_dry_run_runs_the_gpu_tests_at_toy_sizes(dry_run):
    """The correctness checks are tests/gpu's tests: the dry run runs them in Triton's interpreter and
    reports one row per test; only fla-core's (CUDA) and the bf16 ones skip there."""
    out, _, _ = dry_run
    results = {r["section"]: r for r in json.loads((out / "gpu_report.json").read_text())["results"]}
    rows = {r["test"]: r for r in results["pytest_gpu"]["rows"]}
    ran = {t for t, r in rows.items() if r["outcome"] == "passed"}
    skipped = {t for t, r in rows.items() if r["outcome"] == "skipped"}
    assert ran | skipped == set(rows) and all(r["pass"] for r in rows.values())
    assert all(any(mark in t for mark in CPU_SKIPS) for t in skipped), skipped
    for expected in (
        "test_gpu_dsa_triton::test_poisoning_works_here",
        "test_gpu_dsa_triton::test_sparse_attention[gqa-fp16]",
        "test_gpu_dsa_triton::test_sparse_attention[mla-latent-fp32]",
        "test_gpu_dsa_triton::test_indexer_logits[fp16]",
        "test_gpu_dsa_triton::test_indexer_topk_on_exact_inputs[fp16]",
        "test_gpu_moe_mla::test_experts_implementation_matches_the_loop[grouped_mm]",
        "test_gpu_moe_mla::test_mla_decode_absorbed_and_naive",
    ):
        assert expected in ran, (expected, sorted(rows))


def test_dry_run_benchmarks_measure_every_anchor(dry_run):
    out, _, _ = dry_run
    results = {r["section"]: r for r in json.loads((out / "gpu_report.json").read_text())["results"]}
    for name, column in TIMED.items():
        measured = [r for r in results[name]["rows"] if column in r]
        assert measured, f"{name}: no row has {column!r}"
        assert all(isinstance(r[column], (int, float)) and r[column] > 0 for r in measured), name
    linear = results["bench_linear"]["rows"]
    assert {r["op"] for r in linear} == {"gdn", "kda", "simple_gla", "linear_attention"}
    assert all(isinstance(r["sdpa ms"], float) for r in linear)
    assert all(isinstance(r["transformers ms"], float) for r in linear if r["op"] != "linear_attention")
    dsa = results["bench_dsa"]["rows"]
    assert {r["table"] for r in dsa} == {"attention", "indexer top-k", "model memory"}
    assert {r["op"] for r in dsa if r["table"] == "attention"} == {"sdpa", "triton", "torch"}
    assert {r["model"] for r in dsa if r["table"] == "model memory"} == {"dsa-mla", "deepseek_v32"}
    train = {r["model"] for r in results["bench_train"]["rows"] if "tokens/s" in r}
    assert train == {"hf_hybrid", "qwen3_next (torch fallback)"}
    ceilings = results["ceilings"]["data"]
    assert ceilings["copy_gbs"] > 0 and ceilings["matmul_tflops"] > 0


def test_dry_run_markdown_report(dry_run):
    out, _, _ = dry_run
    md = (out / "gpu_report.md").read_text()
    for s in load_gpu_check().SECTIONS:
        assert f"\n## {s.name} — " in md
    assert "| test |" in md and "| op |" in md


def test_dry_run_is_quick(dry_run):
    # the dry run belongs in the default suite: toy sizes only (generous: the CI machine may be busy)
    assert dry_run[2] < 300


# ---------------------------------------------------------------------------------------------- the runner


@pytest.fixture
def gpu_check():
    sys.path[:0] = [str(REPO / "scripts")]
    try:
        yield load_gpu_check()
    finally:
        sys.path.remove(str(REPO / "scripts"))


def _run(gpu_check, budget_s: float):
    args = SimpleNamespace(dry_run=True, device="cpu", deadline=time.time() + budget_s)
    return gpu_check.Run(args)


def test_failing_section_is_recorded_and_the_run_goes_on(gpu_check, tmp_path, monkeypatch):
    def boom(run):
        raise ValueError("planted failure")

    def fine(run):
        return {"rows": [{"x": 1.5}]}

    def slow(run):
        rows = []
        for i in range(3):
            if not run.keep_going(1e6 if i == 2 else 0):
                rows.append(gpu_check.skipped_row(i=i))
                continue
            rows.append({"i": i})
        return {"rows": rows}

    def greedy(run):
        return {"rows": [{"never": True}]}

    sections = [
        gpu_check.Section("boom", "benchmark", 10, 0, boom),
        gpu_check.Section("fine", "benchmark", 10, 0, fine),
        gpu_check.Section("slow", "benchmark", 10, 0, slow),
        gpu_check.Section("greedy", "benchmark", 10, 1e6, greedy),
    ]
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    report = gpu_check.Report(tmp_path, {"test": True}, resume=False)
    assert gpu_check.run_sections(_run(gpu_check, 60), report, [s.name for s in sections], 0) == -1
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    got = {r["section"]: r for r in data["results"]}
    assert got["boom"]["status"] == "error" and "planted failure" in got["boom"]["traceback"]
    assert got["fine"]["status"] == "ok" and got["fine"]["rows"] == [{"x": 1.5}]
    assert got["slow"]["status"] == "partial" and "skipped" in got["slow"]["rows"][2]["result"]
    assert got["greedy"]["status"] == "skip" and "budget" in got["greedy"]["reason"]
    md = (tmp_path / "gpu_report.md").read_text()
    assert "## boom — error" in md and "planted failure" in md and "| x |" in md


def test_report_json_stays_valid_with_non_finite_numbers(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path, {}, resume=False)
    report.add(
        gpu_check._clean(
            {
                "section": "s",
                "kind": "benchmark",
                "status": "ok",
                "seconds": 1.0,
                "rows": [{"error": float("nan"), "ms": float("inf"), "t": (1, 2)}],
            }
        )
    )
    row = json.loads((tmp_path / "gpu_report.json").read_text())["results"][0]["rows"][0]
    assert row == {"error": "nan", "ms": "inf", "t": [1, 2]}


def test_install_plan_installs_only_what_is_missing_or_old(gpu_check, tmp_path):
    for name in (
        "transformers-5.24.0-py3-none-any.whl",
        "fla_core-0.6.0-py3-none-any.whl",
        "peft-0.21.2-py3-none-any.whl",
        "regex-2026.11.19-cp312-cp312-manylinux2014_x86_64.whl",
        "tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.whl",
        "huggingface_hub-1.33.0-py3-none-any.whl",
        "safetensors-0.8.0-cp310-abi3-manylinux_2_17_x86_64.whl",
    ):
        (tmp_path / name).touch()
    # the GPU image as recorded: transformers 5.17, no fla-core; say its regex is too old and its peft new
    # enough
    image = {
        "transformers": "5.17.0",
        "tokenizers": "0.23.2",
        "huggingface-hub": "1.33.0",
        "safetensors": "0.8.0",
        "regex": "2024.11.6",
        "peft": "0.17.1",
    }
    plan = {r["package"]: r for r in gpu_check.install_plan(tmp_path, image.get)}
    assert {p for p, r in plan.items() if r["action"] == "install"} == {"transformers", "fla-core", "regex"}
    assert plan["transformers"]["wheel"] == "transformers-5.24.0-py3-none-any.whl"
    assert plan["hf-hybrid"]["action"] == "ok" and plan["hf-hybrid"]["installed"] == "tree"
    # transformers new enough: its own requirements are its business, fla-core still comes from the wheel
    plan = {
        r["package"]: r for r in gpu_check.install_plan(tmp_path, {**image, "transformers": "5.23.0"}.get)
    }
    assert {p for p, r in plan.items() if r["action"] == "install"} == {"fla-core"}
    plan = {r["package"]: r for r in gpu_check.install_plan(tmp_path, {**image, "peft": "0.16.0"}.get)}
    assert plan["peft"]["action"] == "install" and plan["peft"]["wheel"] == "peft-0.21.2-py3-none-any.whl"
    # nothing carried: a missing package is named, not silently skipped
    plan = {r["package"]: r for r in gpu_check.install_plan(tmp_path / "none", image.get)}
    assert plan["fla-core"]["action"] == "missing wheel" and plan["transformers"]["action"] == "missing wheel"
