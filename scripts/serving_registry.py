"""Which serving engine serves each export natively: the architecture an export writes
(``config.architectures``: the installed transformers' ``AutoModelForCausalLM`` class of the family), looked
up in the engines' own model registries, read from their wheels (zips; nothing is imported or installed):

    pip download --no-deps vllm==0.34.0 -d wheels/
    pip download --no-deps sglang==0.5.23 -d wheels/
    python scripts/serving_registry.py wheels/vllm-0.34.0-*.whl wheels/sglang-0.5.23-*.whl

vLLM: ``vllm/model_executor/models/registry.py`` — ``_TEXT_GENERATION_MODELS`` (its own implementation),
``_TRANSFORMERS_SUPPORTED_MODELS`` (served through its Transformers backend: attention layers only),
``_PREVIOUSLY_SUPPORTED_MODELS`` (removed, with the last release that had it). SGLang: every module of
``sglang/srt/models/`` with an ``EntryClass`` (its registry imports them all and keys them by class name).
Also printed: whether the transformers each engine pins has the family
(``tests/data/transformers_config_fields.json``): an engine loads the config through it. Run it with the
transformers that has every family (5.25 for ``minicpm5_moe``) to name every architecture.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_REGISTRY = "vllm/model_executor/models/registry.py"
VLLM_TABLES = ("_TEXT_GENERATION_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS", "_PREVIOUSLY_SUPPORTED_MODELS")
PINS = {"SGLang": "5.19.0", "vLLM": "5.22.2"}  # sglang==0.5.23: transformers==5.19.0; vllm 0.34.0: <5.23


def vllm_tables(wheel: str) -> dict[str, dict]:
    with zipfile.ZipFile(wheel) as z:
        tree = ast.parse(z.read(VLLM_REGISTRY).decode())
    tables = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if getattr(target, "id", None) in VLLM_TABLES:
            tables[target.id] = ast.literal_eval(node.value)
    if set(tables) != set(VLLM_TABLES):
        raise SystemExit(f"{VLLM_REGISTRY}: expected {VLLM_TABLES}, found {sorted(tables)}")
    return tables


def sglang_entry_classes(wheel: str) -> dict[str, str]:
    """architecture (class name) -> module, as SGLang's ``import_model_classes`` builds it."""
    out: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as z:
        for path in z.namelist():
            m = re.fullmatch(r"sglang/srt/models/(\w+)\.py", path)
            if not m:
                continue
            tree = ast.parse(z.read(path).decode())
            aliases = {}  # the class a module-level name stands for (`X = Y`, `from m import Y as X`)
            for node in tree.body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                    for t in node.targets:
                        aliases[getattr(t, "id", None)] = node.value.id
                if isinstance(node, ast.ImportFrom):
                    for a in node.names:
                        aliases[a.asname or a.name] = a.name
            for node in tree.body:
                target = node.targets[0] if isinstance(node, ast.Assign) else None
                if getattr(target, "id", None) != "EntryClass":
                    continue
                names = node.value.elts if isinstance(node.value, ast.List) else [node.value]
                for n in names:
                    name = getattr(n, "id", None) or getattr(n, "attr", None)
                    while name in aliases and aliases[name] != name:
                        name = aliases[name]
                    out[name] = m.group(1)
    return out


def families() -> list[str]:
    namespace: dict = {}
    exec(compile((ROOT / "hf_hybrid/convert/families.py").read_text(), "families.py", "exec"), namespace)
    return sorted(namespace["FAMILY_MODULES"])


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    vllm = vllm_tables(next(a for a in argv if "vllm" in Path(a).name))
    sglang = sglang_entry_classes(next(a for a in argv if "sglang" in Path(a).name))
    known = json.loads((ROOT / "tests/data/transformers_config_fields.json").read_text())
    print(f"architectures as transformers {transformers.__version__} names them")
    print("| family | architecture | vLLM 0.34.0 | SGLang 0.5.23 |")
    print("|---|---|---|---|")
    for model_type in families():
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if arch is None:
            print(f"| `{model_type}` | not in transformers {transformers.__version__} | ? | ? |")
            continue
        if arch in vllm["_TEXT_GENERATION_MODELS"]:
            v = f"`{arch}`"
        elif arch in vllm["_TRANSFORMERS_SUPPORTED_MODELS"]:
            v = f"`{arch}` (Transformers backend)"
        elif arch in vllm["_PREVIOUSLY_SUPPORTED_MODELS"]:
            v = f"no (removed after {vllm['_PREVIOUSLY_SUPPORTED_MODELS'][arch]})"
        else:
            v = "no"
        s = f"`{arch}` (`{sglang[arch]}.py`)" if arch in sglang else "no"
        cells = []
        for engine, cell in (("vLLM", v), ("SGLang", s)):
            pin = PINS[engine]
            if (known.get(pin) or {}).get(model_type, "?") is None:  # the engine's transformers lacks it
                cell += f"; transformers {pin} lacks `{model_type}`"
            cells.append(cell)
        print(f"| `{model_type}` | `{arch}` | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
