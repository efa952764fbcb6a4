"""Write ``tests/data/transformers_config_fields.json``: the config keys each pinned transformers release
knows for the native families hf_hybrid exports to (the fields a serving engine's transformers can read), so
a test can check, without network, that an export needs no newer field.

    pip download --no-deps transformers==5.19.0 transformers==5.22.2 -d wheels/
    python scripts/transformers_config_fields.py wheels/transformers-5.19.0-*.whl \
        wheels/transformers-5.22.2-*.whl

Known keys of a family = the annotated fields of its config class, the attributes its ``__post_init__``
sets (``self.qk_head_dim = ...``), and the annotated fields of ``PreTrainedConfig`` (``architectures``,
``dtype``, ``transformers_version``, ...). Read from the wheels' source with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

FAMILIES = {"deepseek_v3": "DeepseekV3Config", "deepseek_v32": "DeepseekV32Config"}
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "transformers_config_fields.json"


def class_fields(source: str, name: str) -> set[str]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields = {b.target.id for b in node.body if isinstance(b, ast.AnnAssign)}
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name in ("__post_init__", "__init__"):
                    for sub in ast.walk(fn):
                        targets = sub.targets if isinstance(sub, ast.Assign) else []
                        for t in targets:
                            if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                                fields.add(t.attr)
            return fields
    raise SystemExit(f"{name} not found")


def main(wheels: list[str]) -> None:
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for wheel in wheels:
        version = re.search(r"transformers-([^-]+)-", Path(wheel).name).group(1)
        with zipfile.ZipFile(wheel) as z:
            base = class_fields(z.read("transformers/configuration_utils.py").decode(), "PreTrainedConfig")
            entry = {}
            for model_type, cls in FAMILIES.items():
                path = f"transformers/models/{model_type}/configuration_{model_type}.py"
                entry[model_type] = sorted(class_fields(z.read(path).decode(), cls) | base)
        data[version] = entry
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({', '.join(sorted(data))})")


if __name__ == "__main__":
    main(sys.argv[1:])
