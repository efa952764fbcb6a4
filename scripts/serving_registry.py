"""Which serving engine serves each export natively: the architecture an export writes
(``config.architectures``: the installed transformers' ``AutoModelForCausalLM`` class of the family), looked
up in the engines' own model registries, read from their wheels (zips; nothing is imported or installed):

    pip download --no-deps vllm==0.34.0 -d wheels/
    pip download --no-deps sglang==0.5.23 -d wheels/
    python scripts/serving_registry.py wheels/vllm-0.34.0-*.whl wheels/sglang-0.5.23-*.whl

vLLM: ``vllm/model_executor/models/registry.py`` — ``_TEXT_GENERATION_MODELS`` and ``_MULTIMODAL_MODELS``
(its own implementation), ``_TRANSFORMERS_SUPPORTED_MODELS`` (served through its Transformers backend:
attention layers only), ``_PREVIOUSLY_SUPPORTED_MODELS`` (removed, with the last release that had it).
SGLang: every module of ``sglang/srt/models/`` with an ``EntryClass`` (its registry imports them all and keys
them by class name).
Also recorded: whether the engine has a config class of its own for the model_type (vLLM's
``_CONFIG_REGISTRY``; a ``model_type = ...`` class in SGLang's ``sglang/srt/configs/``), read instead of
transformers' (then it needs no transformers release that has the family), and the oldest transformers in
vLLM's range that has the family (``tests/data/transformers_config_fields.json``).

Writes ``tests/data/serving_engines.json`` (the README's "served natively by" column is checked against it)
and prints the table. Families: the registered ones and those refused today (``NEEDS_MISSING_LAYER``); run it
with the transformers that has the most of them (5.25) to name their architectures.
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
VLLM_TABLES = (
    "_TEXT_GENERATION_MODELS",
    "_MULTIMODAL_MODELS",
    "_TRANSFORMERS_SUPPORTED_MODELS",
    "_PREVIOUSLY_SUPPORTED_MODELS",
)
OUT = ROOT / "tests" / "data" / "serving_engines.json"
ENGINES = {"vLLM": "vllm 0.34.0", "SGLang": "sglang 0.5.23"}


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


def vllm_own_configs(wheel: str) -> set[str]:
    """model_types vLLM reads with a config class of its own (``_CONFIG_REGISTRY = LazyConfigDict(...)``)."""
    with zipfile.ZipFile(wheel) as z:
        tree = ast.parse(z.read("vllm/transformers_utils/config.py").decode())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if getattr(target, "id", None) == "_CONFIG_REGISTRY":
            call = node.value
            out = {k.arg for k in call.keywords if k.arg}
            for k in call.keywords:  # **{"unlimited-ocr": ...}
                if k.arg is None and isinstance(k.value, ast.Dict):
                    out |= {ast.literal_eval(key) for key in k.value.keys}
            return out
    raise SystemExit("vllm/transformers_utils/config.py: _CONFIG_REGISTRY not found")


def sglang_own_configs(wheel: str) -> set[str]:
    """model_types of the config classes SGLang defines itself (``sglang/srt/configs/*.py``)."""
    out = set()
    with zipfile.ZipFile(wheel) as z:
        for path in z.namelist():
            if re.fullmatch(r"sglang/srt/configs/\w+\.py", path):
                for node in ast.walk(ast.parse(z.read(path).decode())):
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "model_type":
                        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                            out.add(node.value.value)
    return out


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
    names: set[str] = set()
    for path in ("hf_hybrid/convert/families.py", "hf_hybrid/convert/native/__init__.py"):
        for node in ast.parse((ROOT / path).read_text()).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if getattr(target, "id", None) in ("FAMILY_MODULES", "NEEDS_MISSING_LAYER"):
                names |= set(ast.literal_eval(node.value))
    return sorted(names)


def export_architecture(model_type: str) -> str | None:
    """The class name ``hf-hybrid export --to model_type`` writes to ``config.architectures`` (a registered
    family this transformers has), else None."""
    sys.path.insert(0, str(ROOT))
    from hf_hybrid.convert.native import FAMILY_MODULES, get_family

    if model_type not in FAMILY_MODULES or not get_family(model_type).available:
        return None
    return get_family(model_type).model_class.__name__


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    vllm_wheel = next(a for a in argv if "vllm" in Path(a).name)
    sglang_wheel = next(a for a in argv if "sglang" in Path(a).name)
    vllm, vllm_configs = vllm_tables(vllm_wheel), vllm_own_configs(vllm_wheel)
    sglang, sglang_configs = sglang_entry_classes(sglang_wheel), sglang_own_configs(sglang_wheel)
    first = json.loads((ROOT / "tests/data/transformers_config_fields.json").read_text())["first_release"]
    table = {}
    for model_type in families():
        arch = export_architecture(model_type) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if arch is None:
            continue  # not in this transformers: no architecture name to look up
        if arch in vllm["_TEXT_GENERATION_MODELS"] or arch in vllm["_MULTIMODAL_MODELS"]:
            v = "native"
        elif arch in vllm["_TRANSFORMERS_SUPPORTED_MODELS"]:
            v = "Transformers backend"
        elif arch in vllm["_PREVIOUSLY_SUPPORTED_MODELS"]:
            v = f"removed after {vllm['_PREVIOUSLY_SUPPORTED_MODELS'][arch]}"
        else:
            v = None
        table[model_type] = {
            "architecture": arch,
            "vLLM": v if v in ("native", "Transformers backend") else None,
            "vLLM_note": v if v not in ("native", "Transformers backend") else None,
            "vLLM_own_config": model_type in vllm_configs,
            "SGLang": f"sglang/srt/models/{sglang[arch]}.py" if arch in sglang else None,
            "SGLang_own_config": model_type in sglang_configs,
            "first_transformers_in_vllm_range": first.get(model_type),
        }
    OUT.write_text(json.dumps({"engines": ENGINES, "families": table}, indent=1, sort_keys=True) + "\n")
    print(f"architectures as transformers {transformers.__version__} names them; wrote {OUT}")
    print("| family | architecture | vLLM 0.34.0 | SGLang 0.5.23 | first transformers (5.16.1-5.22.2) |")
    print("|---|---|---|---|---|")
    for model_type, row in table.items():
        cells = []
        for engine in ENGINES:
            cell = row[engine] or "no"
            if row.get(f"{engine}_note"):
                cell += f" ({row[f'{engine}_note']})"
            cells.append(cell + (" (own config class)" if row[f"{engine}_own_config"] else ""))
        first = row["first_transformers_in_vllm_range"]
        print(f"| `{model_type}` | `{row['architecture']}` | {' | '.join(cells)} | {first} |")


if __name__ == "__main__":
    main(sys.argv[1:])
