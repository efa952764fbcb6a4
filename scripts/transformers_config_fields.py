"""Write ``tests/data/transformers_config_fields.json``: for the transformers releases serving engines pin,
the config keys each knows for every native family hf_hybrid exports to (the fields a serving engine's
transformers can read), so a test can check, without network, that an export needs no newer field; and, over
every release given, the oldest one that has each family.

- ``fields[version][model_type]``: the known keys, for the pins in :data:`PINS` (``null``: the release does
  not have the family, so an engine pinned to it cannot load its exports);
- ``first_release[model_type]``: the oldest release given that has the family (``null``: none of them);
  ``first_release_scanned``: the releases given.

    for V in 5.16.1 5.17.0 5.18.0 5.19.0 5.20.0 5.21.0 5.22.2; do
        pip download --no-deps transformers==$V -d wheels/; done      # one version per command
    python scripts/transformers_config_fields.py wheels/transformers-*.whl

Run it again after registering a family (``hf_hybrid/convert/families.py``): the families are read from there
(and from ``NEEDS_MISSING_LAYER``, the families refused today, so they are listed ahead). Patch releases not
given are not scanned: a family added in one is attributed to the next release given.
Known keys of a family = the annotated fields of its config class and of the config classes it derives from
(found in the same wheel), the attributes their ``__init__`` / ``__post_init__`` set
(``self.qk_head_dim = ...``), both sides of their ``attribute_map``, and the annotated fields of
``PreTrainedConfig`` (``architectures``, ``dtype``, ``transformers_version``, ...). Read from the wheels'
source with ``ast``: nothing is imported from them.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "transformers_config_fields.json"
BASES = {"PreTrainedConfig", "PretrainedConfig"}
# vLLM 0.34.0: transformers>=5.16.1,<5.23 (its floor and the newest it allows); SGLang 0.5.23: ==5.19.0
PINS = ("5.16.1", "5.19.0", "5.22.2")


def registered_families() -> list[str]:
    """The families of this checkout (``FAMILY_MODULES``) and those it refuses today for a missing layer
    (``NEEDS_MISSING_LAYER``: recorded ahead, so that registering one later finds its fields here), read from
    the source without importing the package."""
    names: set[str] = set()
    for path in ("hf_hybrid/convert/families.py", "hf_hybrid/convert/native/__init__.py"):
        for node in ast.parse((ROOT / path).read_text()).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if getattr(target, "id", None) in ("FAMILY_MODULES", "NEEDS_MISSING_LAYER"):
                names |= set(ast.literal_eval(node.value))
    if not names:
        raise SystemExit("FAMILY_MODULES not found in hf_hybrid/convert/families.py")
    return sorted(names)


def config_class_names(z: zipfile.ZipFile) -> dict[str, str]:
    """model_type -> config class name, from the release's ``CONFIG_MAPPING_NAMES`` literal(s)."""
    names: dict[str, str] = {}
    for name in ("auto_mappings.py", "configuration_auto.py"):
        path = f"transformers/models/auto/{name}"
        if path not in z.namelist():
            continue
        for node in ast.walk(ast.parse(z.read(path).decode())):
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
                continue
            if not any(getattr(t, "id", None) == "CONFIG_MAPPING_NAMES" for t in node.targets):
                continue
            for arg in node.value.args:
                for item in getattr(arg, "elts", []):
                    try:
                        key, value = ast.literal_eval(item)
                    except (ValueError, TypeError):
                        continue
                    names[key] = value
    if not names:
        raise SystemExit("CONFIG_MAPPING_NAMES not found in the wheel: the script needs updating")
    return names


def class_defs(z: zipfile.ZipFile) -> dict[str, ast.ClassDef]:
    """Every class defined in a ``configuration_*.py`` of the wheel (and ``configuration_utils.py``)."""
    out: dict[str, ast.ClassDef] = {}
    for path in z.namelist():
        name = path.rsplit("/", 1)[-1]
        if path.startswith("transformers/") and name.startswith("configuration_") and name.endswith(".py"):
            for node in ast.parse(z.read(path).decode()).body:
                if isinstance(node, ast.ClassDef):
                    out.setdefault(node.name, node)
    return out


def class_fields(classes: dict[str, ast.ClassDef], name: str) -> set[str]:
    node = classes[name]
    fields = {b.target.id for b in node.body if isinstance(b, ast.AnnAssign)}
    for b in node.body:
        if isinstance(b, ast.Assign) and any(getattr(t, "id", None) == "attribute_map" for t in b.targets):
            try:  # both sides: config.json may hold either name (to_dict writes the target)
                aliases = ast.literal_eval(b.value)
            except ValueError:
                continue
            fields |= set(aliases) | set(aliases.values())
        if isinstance(b, ast.FunctionDef) and b.name in ("__post_init__", "__init__"):
            for sub in ast.walk(b):
                for t in sub.targets if isinstance(sub, ast.Assign) else []:
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                        fields.add(t.attr)
    for base in node.bases:
        base_name = getattr(base, "id", None)
        if base_name in classes and base_name not in BASES:  # a config derived from another family's
            fields |= class_fields(classes, base_name)
    return fields


def release_fields(wheel: str, families: list[str]) -> tuple[str, dict[str, list[str] | None]]:
    version = re.search(r"transformers-([^-]+)-", Path(wheel).name).group(1)
    with zipfile.ZipFile(wheel) as z:
        classes = class_defs(z)
        mapping = config_class_names(z)
        base = class_fields(classes, "PreTrainedConfig")
        entry: dict[str, list[str] | None] = {}
        for model_type in families:
            cls = mapping.get(model_type)
            if cls is not None and cls not in classes:
                raise SystemExit(f"{version}: {model_type} -> {cls}, but no such class in the wheel")
            entry[model_type] = sorted(class_fields(classes, cls) | base) if cls else None
    return version, entry


def main(wheels: list[str]) -> None:
    if not wheels:
        raise SystemExit(__doc__)
    families = registered_families()
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    fields, has = data.get("fields", {}), {}
    for wheel in wheels:
        version, entry = release_fields(wheel, families)
        has[version] = {t for t, f in entry.items() if f is not None}
        if version in PINS:
            fields[version] = entry
        absent = ", ".join(sorted(set(entry) - has[version]))
        print(f"{version}: {len(has[version])} families; absent: {absent}")
    order = sorted(has, key=lambda v: tuple(int(x) for x in v.split(".")))
    data = {
        "fields": fields,
        "first_release": {t: next((v for v in order if t in has[v]), None) for t in families},
        "first_release_scanned": order,
    }
    missing = [v for v in PINS if v not in fields]
    if missing:
        raise SystemExit(f"give the wheels of every pin too: {', '.join(missing)} missing")
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} (fields of {', '.join(sorted(fields))}; scanned {', '.join(order)})")


if __name__ == "__main__":
    main(sys.argv[1:])
