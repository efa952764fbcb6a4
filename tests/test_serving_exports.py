"""Exports load where they are served. Serving engines pin older transformers than ours (SGLang 0.5.23:
``transformers==5.19.0``; vLLM 0.34.0: ``>=5.16.1,<5.23``: 5.22.2 on a fresh install, 5.16.1 at its floor),
so every export must load there with the same function:

- default suite: every key of every family's exported config.json is a field those releases know (field lists
  read from their wheels by ``scripts/transformers_config_fields.py`` into
  ``tests/data/transformers_config_fields.json``; no network here), apart from :data:`ALLOWED_EXTRAS`, each
  with the reason it is harmless;
- slow: every export is loaded by those releases themselves (a subprocess with an unpacked wheel first on
  ``PYTHONPATH``) and gives the logits it gives under the installed transformers.

Both loop over whatever families are registered (``FAMILY_MODULES``): a new family is covered as soon as it is
registered, and fails here until the field lists are regenerated for it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_native_export_ours import context, left_padded, our_model
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import main as cli_main
from hf_hybrid.convert.native import FAMILY_MODULES, export_native, get_family
from hf_hybrid.mixers.dsa import index_ties

KNOWN_FIELDS = Path(__file__).parent / "data" / "transformers_config_fields.json"
SERVING_ENGINES = Path(__file__).parent / "data" / "serving_engines.json"
README = Path(__file__).resolve().parents[1] / "README.md"
ATOL = 1e-5  # fp32, the same torch on both sides: only the transformers release differs
SERVING_PINS = {  # release -> the engine that pins it
    "5.16.1": "vLLM 0.34.0's floor (transformers>=5.16.1,<5.23)",
    "5.19.0": "SGLang 0.5.23 (transformers==5.19.0)",
    "5.22.2": "vLLM 0.34.0's newest (transformers>=5.16.1,<5.23)",
}
REGENERATE = "regenerate it as scripts/transformers_config_fields.py's docstring says (pip downloads only)"
# Keys an export writes that a pinned release's config class does not declare, with why each is harmless
# (checked by loading: test_every_export_loads_under_the_serving_pins_with_equal_logits).
_UNREAD_IN_5_16 = (
    "written False; transformers 5.16.1's config class does not declare it (5.19 does) and its modeling code "
    "never reads it (no output_router_logits in modeling_{}.py): an inert attribute there"
)
# Keys released checkpoints carry that transformers does not declare and vLLM / SGLang read (the families'
# engine_keys write them).
_DEEPSEEK_LIKE = ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")
_DEEPSEEK_ROUTER_KEYS = ("scoring_func", "topk_method", "moe_layer_freq")
_DEEPSEEK_ROUTER = (
    "released DeepSeek-V3 / GLM configs carry it and vLLM's and SGLang's DeepSeek code reads it (SGLang "
    "without a default; vLLM scores by softmax and makes no correction bias without it); transformers keeps "
    "it as an inert attribute"
)
_INDEX_PATTERN = (
    "vLLM and SGLang lay out the shared indexers by it (F / S a layer), not by indexer_types; transformers "
    "reads the same layout from either"
)
_KIMI = (
    "released Kimi-Linear configs carry it: vLLM's and SGLang's own config classes build the KDA layers from "
    "linear_attn_config and the dense MLPs from first_k_dense_replace, and vLLM asserts mla_use_nope; "
    "transformers reads the same layers from layer_types / mlp_layer_types"
)
_GLM5_NEXT_KEYS = (
    "mhc",
    "mla_use_nope",
    "scoring_func",
    "topk_method",
    "moe_layer_freq",
    "first_k_dense_replace",
    "index_topk_pattern",
)
_GLM5_NEXT = (
    "vLLM's GLM-5-Next code reads topk_method, scoring_func, mhc and mla_use_nope without a default; "
    "SGLang's own class defaults mhc to False and first_k_dense_replace to 3, and both lay out shared "
    "indexers by index_topk_pattern; transformers keeps them as inert attributes"
)
_MINIMAX_M2_KEYS = ("scoring_func", "use_routing_bias", "use_qk_norm", "qk_norm_type")
_MINIMAX_M2 = (
    "released MiniMax-M2 configs carry it: vLLM and SGLang read scoring_func without a default, make the "
    "correction bias only with use_routing_bias, and SGLang applies the q/k norms only with use_qk_norm; "
    "transformers keeps it as an inert attribute"
)
_QWEN_NEXT_LIKE = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_QWEN_TOP = (
    "released Qwen3-Next / Qwen3.5 configs carry it at the top: SGLang's config classes read rope_theta only "
    "there (default 10000) and build the layer list from full_attention_interval alone; transformers reads "
    "the same values from rope_parameters / layer_types"
)

ALLOWED_EXTRAS: dict[tuple[str, str], str] = {
    ("qwen2", "head_dim"): "no Qwen2Config release declares head_dim (5.16-5.25 alike): it is kept as an "
    "attribute and modeling_qwen2 reads getattr(config, 'head_dim', hidden_size // num_attention_heads) in "
    "every release",
    ("qwen3_moe", "head_dim"): "as for qwen2: undeclared in every release, read by modeling_qwen3_moe's "
    "getattr(config, 'head_dim', hidden_size // num_attention_heads)",
    ("minimax_m2", "rotary_dim"): "released MiniMax-M2 configs carry it, and vLLM (config.rotary_dim, "
    "required) and SGLang (default: the whole head) read it for the rotated width; transformers keeps it as "
    "an attribute (5.24 / 5.25 derive partial_rotary_factor from it, equal to the one written)",
    **{(family, key): _DEEPSEEK_ROUTER for family in _DEEPSEEK_LIKE for key in _DEEPSEEK_ROUTER_KEYS},
    ("glm_moe_dsa", "index_topk_pattern"): _INDEX_PATTERN,
    **{
        ("kimi_linear", key): _KIMI for key in ("linear_attn_config", "first_k_dense_replace", "mla_use_nope")
    },
    **{("minimax_m2", key): _MINIMAX_M2 for key in _MINIMAX_M2_KEYS},
    **{("glm5_next_text", key): _GLM5_NEXT for key in _GLM5_NEXT_KEYS},
    **{
        (family, key): _QWEN_TOP
        for family in _QWEN_NEXT_LIKE
        for key in ("rope_theta", "full_attention_interval")
    },
    **{
        (family, "partial_rotary_factor"): "released Qwen3-Next / Qwen3.5 configs carry it at the top as "
        "well as in rope_parameters: SGLang's config classes read it only there (default 0.25); transformers "
        "folds the equal value into rope_parameters in every release"
        for family in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
    },
    **{
        (family, "indexer_rope_interleave"): "GLM's checkpoints carry it: vLLM and SGLang rotate the DSA "
        "indexer on interleaved pairs only where it is true (halves otherwise), as transformers always does "
        f"for {family}; kept as an inert attribute by every release"
        for family in ("glm_moe_dsa", "glm5_next_text")
    },
    **{
        (family, "output_router_logits"): _UNREAD_IN_5_16.format(family)
        for family in ("axk2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "nemotron_h")
    },
}

# Families whose exports some pinned releases load but compute differently, for a reason in those releases'
# modeling code (nothing the export writes could avoid it): family -> (those releases, how to agree there:
# a model override or a from_pretrained option, the reason). README.md states each one. The slow test checks
# both halves: the default tiny model differs exactly there, and agrees the other way.
_GROUPED_NORM = (
    "transformers < 5.23 normalises the Mamba-2 gated RMSNorm over all mamba_n_groups groups at once; 5.23 "
    "normalises each group, as Mamba-2 itself, hf_hybrid, and vLLM's / SGLang's Mixer2RMSNormGated do: equal "
    "only at mamba_n_groups=1"
)
_BOOL_MASK = (
    "transformers 5.16's DSA code adds the boolean mask SDPA gets to the indexer scores and masked_fill's it "
    "with a float (5.17 checks attention_mask.dtype == torch.bool): with padding anywhere in the batch the "
    "sparse selection is masked wrongly under SDPA; eager attention (a float mask) agrees"
)
_HALVES = (
    "transformers < 5.25 rotates HY-V4's RoPE (attention and indexer) by halves; the checkpoint's layout, "
    "which vLLM, SGLang, transformers 5.25 and hf_hybrid rotate, is interleaved pairs: equal only where the "
    "rope block is one pair (qk_rope_head_dim = 2)"
)
_BEFORE_5_23 = ("5.16.1", "5.19.0", "5.22.2")
OLD_RELEASES_DIFFER: dict[str, tuple[tuple[str, ...], dict, str]] = {
    "bamba": (_BEFORE_5_23, {"overrides": {"mamba_n_groups": 1}}, _GROUPED_NORM),
    "granitemoehybrid": (_BEFORE_5_23, {"overrides": {"mamba_n_groups": 1}}, _GROUPED_NORM),
    "deepseek_v32": (("5.16.1",), {"load": {"attn_implementation": "eager"}}, _BOOL_MASK),
    "glm_moe_dsa": (("5.16.1",), {"load": {"attn_implementation": "eager"}}, _BOOL_MASK),
    "axk2": (("5.16.1",), {"load": {"attn_implementation": "eager"}}, _BOOL_MASK),
    "hy_v4": (("5.19.0", "5.22.2"), {"overrides": {"qk_rope_head_dim": 2}}, _HALVES),
}


def pinned_fields(model_type: str) -> dict[str, set[str] | None]:
    """release -> the config keys it knows for ``model_type`` (None: the release does not have the family).
    Fails, naming the command, when the field lists predate the family."""
    known = json.loads(KNOWN_FIELDS.read_text())["fields"]
    missing = [v for v in SERVING_PINS if model_type not in known.get(v, {})]
    if missing:
        pytest.fail(
            f"{KNOWN_FIELDS.name} has no entry for model_type={model_type!r} under transformers "
            f"{', '.join(missing)}; {REGENERATE}"
        )
    return {v: None if known[v][model_type] is None else set(known[v][model_type]) for v in SERVING_PINS}


def assert_known_to_serving_pins(config_json: Path, model_type: str) -> None:
    """Every key of an exported config.json is a field each serving pin that has the family knows (or an
    :data:`ALLOWED_EXTRAS` entry, which must still be written)."""
    written = json.loads(Path(config_json).read_text())
    if "text_config" in written:
        # A vision-language wrapper around the family's text decoder (mistral_large4_text: transformers has no
        # text-only class): the field lists are the text config's; the wrapper's own keys are transformers'
        # vision-language config, written by its class, not by us.
        written = written["text_config"]
    keys = set(written)
    allowed = {key for (mt, key) in ALLOWED_EXTRAS if mt == model_type}
    assert allowed <= keys, f"ALLOWED_EXTRAS lists {sorted(allowed - keys)} for {model_type}: not written"
    for version, known in pinned_fields(model_type).items():
        if known is None:
            continue
        newer = sorted(keys - known - allowed)
        assert not newer, (
            f"export --to {model_type} writes config fields transformers {version} ({SERVING_PINS[version]}) "
            f"does not know: {newer}"
        )


def readme_served_cell(model_type: str) -> str:
    """The "served natively by" cell of ``model_type``'s row in the README's native family table."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family (`model_type`)"))
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        if f"`{model_type}`" in line.split("|")[1]:
            return line.rstrip(" |").rsplit("|", 1)[-1].strip()
    raise AssertionError(f"README.md's native family table has no row for `{model_type}`")


@pytest.mark.parametrize("model_type", sorted(FAMILY_MODULES))
def test_readme_names_the_engines_whose_registries_have_the_family(model_type):
    """The README's "served natively by" cell names exactly the engines whose model registry has the
    architecture the export writes (``tests/data/serving_engines.json``, read from the engines' wheels by
    scripts/serving_registry.py), and says "none" where neither has it."""
    pinned_fields(model_type)  # the field lists cover the family too
    engines = json.loads(SERVING_ENGINES.read_text())["families"]
    if model_type not in engines:
        pytest.fail(
            f"{SERVING_ENGINES.name} has no entry for model_type={model_type!r}; regenerate it as "
            "scripts/serving_registry.py's docstring says (two pip downloads, no install)"
        )
    row = engines[model_type]
    served = {engine for engine in ("vLLM", "SGLang") if row[engine]}
    cell = readme_served_cell(model_type)
    head = cell.split(";")[0]  # what follows a ';' qualifies (e.g. "not SGLang")
    if not served:
        assert cell.startswith("none"), f"no engine registers {row['architecture']}; README says {cell!r}"
    else:
        named = {engine for engine in ("vLLM", "SGLang") if engine in head}
        assert named == served and not cell.startswith("none"), f"registries: {sorted(served)}; {cell!r}"
    if row["vLLM"] == "Transformers backend":
        assert "Transformers backend" in head, cell


@pytest.mark.parametrize("model_type", sorted(FAMILY_MODULES))
def test_export_needs_no_field_newer_than_the_serving_pins(model_type, tmp_path):
    fields = pinned_fields(model_type)
    if all(f is None for f in fields.values()):
        pytest.skip(f"{model_type} exists in none of {', '.join(SERVING_PINS)}: no serving engine loads it")
    family = get_family(model_type)
    if not family.available:
        pytest.skip(f"{model_type} needs transformers >= {family.min_transformers}, not installed here")
    with context(model_type):
        export_native(our_model(model_type), tmp_path / "out", to=model_type)
    assert_known_to_serving_pins(tmp_path / "out" / "config.json", model_type)


@pytest.mark.parametrize(
    "model_type", [t for t in sorted(FAMILY_MODULES) if get_family(t).derived_native_fields]
)
def test_fields_the_class_derives_are_left_to_each_release(model_type, tmp_path):
    """DeepSeek-V3.2 / GLM-MoE-DSA derive layer_types themselves, spelled "deepseek_sparse_attention" by
    transformers 5.16 (which refuses the later "indexed_attention"): the export leaves such fields out, and
    the config read back derives the value the exported model had."""
    family = get_family(model_type)
    native = export_native(our_model(model_type), tmp_path / "out", to=model_type)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    reread = type(native.config).from_pretrained(tmp_path / "out")
    for key in family.derived_native_fields:
        assert key not in raw, f"{model_type} export writes {key}={raw.get(key)!r}"
        assert getattr(reread, key) == getattr(native.config, key), key


def test_allowed_extras_name_registered_families():
    assert {mt for mt, _ in ALLOWED_EXTRAS} <= set(FAMILY_MODULES)


# ---- the command: refusals name the family, writes are atomic ----------------------------------------------


@pytest.fixture(scope="module")
def no_family_model(tmp_path_factory) -> Path:
    """A saved model no native family expresses: ungated softmax attention beside Gated DeltaNet."""
    path = tmp_path_factory.mktemp("mix") / "mix"
    config = HybridConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mixer_types=["attention", "gated_deltanet"],
    )
    HybridForCausalLM(config).save_pretrained(path)
    return path


def left_behind(parent: Path, name: str) -> list[str]:
    """``name`` itself or a temporary sibling of it (``.name.tmp-*``) under ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp-"))


@pytest.mark.parametrize("model_type", sorted(FAMILY_MODULES))
def test_cli_export_refusals_name_the_family_and_write_nothing(model_type, no_family_model, tmp_path, capsys):
    """``--to F`` for a model F cannot express names F and a reason; a misspelt F names the family it
    resembles. Exit status 2, nothing written."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["export", str(no_family_model), str(out), "--to", model_type]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    refused = re.match(rf"hf-hybrid export: error: cannot export to {model_type}: (.*)", first)
    unavailable = f"model_type={model_type!r} needs transformers >=" in first  # only where it is absent
    assert refused or (unavailable and not get_family(model_type).available), first
    assert unavailable or re.search(r"\w+(\[\d+\])?=\S", refused.group(1)), first  # names an option=value
    misspelt = model_type.replace("_", "-") if "_" in model_type else model_type.capitalize()
    assert cli_main(["export", str(no_family_model), str(out), "--to", misspelt]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert f"model_type={misspelt!r} is not a native family" in first, first
    assert f"did you mean {model_type!r}" in first, first
    assert left_behind(tmp_path, "out") == []


@pytest.mark.parametrize("model_type", sorted(FAMILY_MODULES))
def test_export_that_fails_midway_leaves_nothing(model_type, tmp_path, monkeypatch):
    """The export writes into a temporary sibling and renames it: a failure after the weights are written
    (here: copying the tokenizer files) leaves neither the output directory nor the temporary one."""
    family = get_family(model_type)
    if not family.available:
        pytest.skip(f"{model_type} needs transformers >= {family.min_transformers}, not installed here")
    import hf_hybrid.convert.native as native

    def fail_after_weights(src, tmp, **kwargs):
        assert any(tmp.glob("*.safetensors")), "the failure should come after the weights are written"
        raise OSError("No space left on device")

    monkeypatch.setattr(native, "copy_carried_files", fail_after_weights)
    with context(model_type), pytest.raises(OSError, match="No space left"):
        export_native(our_model(model_type), tmp_path / "out", to=model_type)
    assert left_behind(tmp_path, "out") == []


# ---- slow: load every export under the pinned releases -----------------------------------------------------

# Runs under an old release, without hf_hybrid: what a serving engine's environment has. fla-core is hidden
# (transformers' GDN / KDA families would pick its Triton kernels, which need a GPU), so the torch paths run,
# as they do for the reference under the installed transformers (the families' native_context).
LOAD_SCRIPT = """
import json, sys
sys.modules["fla"] = None
import torch, transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
print(json.dumps({"version": transformers.__version__}), flush=True)
for path in sys.argv[1:]:
    ref = torch.load(path + "/reference.pt")
    try:
        # a vision-language wrapper (mistral_large4_text's export) loads through its own Auto class
        wrapped = "text_config" in json.load(open(path + "/config.json"))
        auto = AutoModelForImageTextToText if wrapped else AutoModelForCausalLM
        model = auto.from_pretrained(path, **ref["load"]).eval()
        with torch.no_grad():
            got = model(input_ids=ref["ids"], attention_mask=ref["mask"], position_ids=ref["positions"],
                        use_cache=False).logits
        err = (got - ref["logits"])[ref["mask"].bool()].abs().max().item()
        print(json.dumps({"path": path, "class": type(model).__name__, "err": err}), flush=True)
    except Exception as e:
        print(json.dumps({"path": path, "error": f"{type(e).__name__}: {e}"[:600]}), flush=True)
"""


def export_with_reference(model_type: str, dst: Path, *, overrides=None, load=None) -> None:
    """Export our tiny model of ``model_type`` to ``dst`` and store there the logits the export gives under
    the installed transformers (left-padded batch; DSA families on an input without top-k ties)."""
    ours = our_model(model_type, **(overrides or {}))
    ids, mask = left_padded(ours.config.vocab_size)
    if "dsa" in ours.config.mixer_types:  # torch.topk orders ties arbitrarily: compare where there are none
        for seed in range(1, 20):
            ids, mask = left_padded(ours.config.vocab_size, seed=seed)
            if not index_ties(ours, input_ids=ids, attention_mask=mask):
                break
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with context(model_type):
        export_native(ours, dst, to=model_type)
        wrapped = "text_config" in json.loads((dst / "config.json").read_text())
        auto = AutoModelForImageTextToText if wrapped else AutoModelForCausalLM  # mistral_large4_text
        native = auto.from_pretrained(dst).eval()
        with torch.no_grad():
            out = native(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    reference = {"ids": ids, "mask": mask, "positions": positions, "logits": out.logits, "load": load or {}}
    torch.save(reference, dst / "reference.pt")  # "load": from_pretrained options for the old release


@pytest.mark.slow
def test_every_export_loads_under_the_serving_pins_with_equal_logits(tmp_path):
    """For every registered family: export a tiny model of ours, load it with each pinned release and compare
    its logits with the export's under the installed transformers (fp32, ≤ 1e-5). No network.
    ``HF_HYBRID_OLD_TRANSFORMERS=/dir/5.16.1:/dir/5.19.0:/dir/5.22.2``, each dir an unpacked wheel (plus what
    that release needs and this environment lacks), as ``bash scripts/old_transformers.sh /dir`` makes them.
    Skipped when the variable is unset."""
    roots = [p for p in os.environ.get("HF_HYBRID_OLD_TRANSFORMERS", "").split(":") if p]
    if not roots:
        pytest.skip("set HF_HYBRID_OLD_TRANSFORMERS to unpacked transformers wheels (see the docstring)")
    exported: dict[str, tuple[str, tuple[str, ...]]] = {}  # directory -> (family, releases where it differs)
    for model_type in sorted(FAMILY_MODULES):
        if not get_family(model_type).available:
            continue
        differs_in, agree_by, _ = OLD_RELEASES_DIFFER.get(model_type, ((), None, None))
        exported[model_type] = (model_type, differs_in)
        export_with_reference(model_type, tmp_path / model_type)
        if agree_by:  # the documented difference, and the way that avoids it
            exported[f"{model_type}-agreeing"] = (model_type, ())
            export_with_reference(model_type, tmp_path / f"{model_type}-agreeing", **agree_by)
    failures, rows = [], []
    for root in roots:
        run = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, *(str(tmp_path / name) for name in exported)],
            env={**os.environ, "PYTHONPATH": root},
            cwd=tmp_path,  # not the checkout: hf_hybrid must not be importable there
            capture_output=True,
            text=True,
        )
        lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
        assert run.returncode == 0 and lines, run.stderr[-3000:]
        version = lines[0]["version"]
        assert version in SERVING_PINS, f"{root} holds transformers {version}, not a pin {list(SERVING_PINS)}"
        results = {Path(x["path"]).name: x for x in lines[1:]}
        for name, (model_type, differs_in) in exported.items():
            has_family = pinned_fields(model_type)[version] is not None
            got = results[name]
            if "error" in got:
                rows.append(f"{name:26} {version}: {got['error'][:90]}")
                if has_family:
                    failures.append(f"{name} under {version}: {got['error']}")
                continue
            rows.append(f"{name:26} {version}: {got['class']:30} max |Δlogit| {got['err']:.1e}")
            if not has_family:
                failures.append(f"{name} loads under {version}, which the field lists say lacks it")
            elif version not in differs_in and not got["err"] <= ATOL:
                failures.append(f"{name} under {version}: logits differ by {got['err']:.3g}")
            elif version in differs_in and got["err"] <= ATOL:  # the README's statement would be stale
                failures.append(f"{name} agrees under {version}: OLD_RELEASES_DIFFER[{model_type!r}] stale")
    print("\n".join(rows))
    assert not failures, "\n".join(failures)
