"""The layer registry: a mixer defined outside the package is one file plus its import, and the whole library
(config validation, model, masks, cache, cost inspector, card, save / load) picks it up; the package has no
import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_hybrid import HybridConfig, HybridForCausalLM, registry
from hf_hybrid.card import render_model_card
from hf_hybrid.cost import MixerCost, estimate_cost
from hf_hybrid.mixers import MixerContext
from hf_hybrid.mixers.recurrent import read_state, write_state, zero_padding

# ---- the one file a user writes (here inside the test module) ----------------------------------------------


def toy_ema_cost(config, layer_idx: int) -> MixerCost:
    h = config.hidden_size
    return MixerCost(params=2 * h * h, matmul_params=2 * h * h, state_elements=h)


def toy_ema_validate(config) -> None:
    if not 0.0 < config.toy_ema_decay < 1.0:
        raise ValueError(f"HybridConfig.toy_ema_decay={config.toy_ema_decay!r} must be in (0, 1)")


class ToyEMA(nn.Module):
    """``h_t = a·h_{t-1} + (1 - a)·W_in x_t``, ``o_t = W_out h_t``: a recurrent mixer with a [B, H] state."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.decay = config.toy_ema_decay
        self.w_in = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.w_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        state = read_state(ctx, self.layer_idx)
        x = self.w_in(zero_padding(hidden_states, ctx)).float()
        real = (
            torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            if ctx.padding_mask is None
            else ctx.padding_mask
        )
        h = state.recurrent if state.decoding else x.new_zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            step = self.decay * h + (1 - self.decay) * x[:, t]
            h = torch.where(real[:, t, None], step, h)  # padding leaves the state alone
            outs.append(h)
        write_state(ctx, self.layer_idx, None, h)
        return self.w_out(torch.stack(outs, dim=1).to(hidden_states.dtype))


@pytest.fixture(scope="module")
def toy_registered():
    registry.register_mixer(
        "toy_ema",
        layer_type="linear_attention",
        recurrent=True,
        cost=toy_ema_cost,
        config_defaults={"toy_ema_decay": 0.9},
        validate=toy_ema_validate,
        describe=lambda config: [("toy EMA", f"decay {config.toy_ema_decay}")],
    )(ToyEMA)
    yield
    registry._MIXERS.pop("toy_ema", None)
    registry.MIXER_REGISTRY.pop("toy_ema", None)


def _config(**kw) -> HybridConfig:
    return HybridConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mixer_pattern="toy_ema,attention",
        **kw,
    )


def test_external_mixer_builds_trains_decodes_saves_and_inspects(toy_registered, tmp_path):
    config = _config()
    assert config.toy_ema_decay == 0.9  # its default came from its spec
    assert config.layer_types == ["linear_attention", "full_attention"]
    assert config.has_recurrent_layers
    torch.manual_seed(0)
    model = HybridForCausalLM(config)

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert model.model.layers[0].mixer.w_in.weight.grad is None  # zeroed: it was in the graph and trained

    model.eval()
    prompt = ids[:2, :5]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)  # the toy's state really travels through the cache

    model.save_pretrained(tmp_path / "toy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    assert again.config.toy_ema_decay == 0.9
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)

    report = estimate_cost(config, contexts=(1024,))
    assert report.exact and report.total_params == sum(p.numel() for p in model.parameters())
    assert report.layers[0].state_elements == 32
    card = render_model_card(config)
    assert "toy_ema" in card and "| toy EMA | decay 0.9 |" in card  # its own settings row, from its spec


def test_external_mixer_field_is_validated_and_saved(toy_registered):
    with pytest.raises(Exception, match=r"toy_ema_decay=1.5 must be in \(0, 1\)"):
        _config(toy_ema_decay=1.5)
    assert _config(toy_ema_decay=0.5).to_dict()["toy_ema_decay"] == 0.5
    # only configs that use the mixer
    assert "toy_ema_decay" not in HybridConfig(num_hidden_layers=1).to_dict()


def test_unknown_mixer_names_the_choices():
    with pytest.raises(
        Exception,
        match=r"mixer_types\[1\]='gdn' is not a known mixer type; choose one of: "
        r"attention",
    ):
        HybridConfig(num_hidden_layers=2, mixer_types=["attention", "gdn"])


def test_registration_errors_are_clear():
    with pytest.raises(ValueError, match=r"layer_type='attn'; choose one of full_attention"):
        registry.register_mixer("bad_kind", layer_type="attn")
    with pytest.raises(ValueError, match=r"mask='causal'"):
        registry.register_mixer("bad_kind", layer_type="full_attention", mask="causal")
    with pytest.raises(ValueError, match=r"lower-case identifier"):
        registry.register_mixer("Bad-Kind", layer_type="full_attention")

    class Other(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"mixer 'attention' is registered twice"):
        registry.register_mixer("attention", layer_type="full_attention")(Other)
    with pytest.raises(
        ValueError,
        match=r"config field 'gdn_num_heads_x' of 'clash_b' is already declared "
        r"by 'clash_a'",
    ):
        try:
            registry.register_mixer(
                "clash_a", layer_type="full_attention", config_defaults={"gdn_num_heads_x": 1}
            )(Other)
            registry.register_mixer(
                "clash_b", layer_type="full_attention", config_defaults={"gdn_num_heads_x": 2}
            )(Other)
        finally:
            for name in ("clash_a", "clash_b"):
                registry._MIXERS.pop(name, None)
                registry.MIXER_REGISTRY.pop(name, None)


def test_a_taken_name_takes_only_the_same_class_again(toy_registered):
    spec = registry.mixer_spec("toy_ema")
    registry.register_mixer("toy_ema", layer_type="linear_attention", recurrent=True)(ToyEMA)  # same: no-op
    registry._MIXERS["toy_ema"] = spec  # (the spec arguments above were shorter; keep the fixture's)
    impostor = type("ToyEMA", (nn.Module,), {"__module__": "somewhere_else"})  # same name, other module
    with pytest.raises(ValueError, match=r"mixer 'toy_ema' is registered twice .* from 'somewhere_else'"):
        registry.register_mixer("toy_ema", layer_type="linear_attention", recurrent=True)(impostor)
    assert registry.MIXER_REGISTRY["toy_ema"] is ToyEMA and registry.mixer_spec("toy_ema") is spec
    with pytest.raises(ValueError, match=r"MLP 'dense' is registered twice"):
        registry.register_mlp("dense")(impostor)


def test_builtins_load_all_or_nothing(tmp_path, monkeypatch):
    """A built-in module that fails half-way leaves the registry as it was, and the next call fails again
    instead of answering from a partial registry."""
    (tmp_path / "half_broken_kinds.py").write_text(
        "from hf_hybrid.registry import register_mixer\n"
        "register_mixer('half_kind', layer_type='full_attention', mask='full_attention')(None)\n"
        "raise RuntimeError('broken kind file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("hf_hybrid.mixers", "half_broken_kinds"))
    before = dict(registry._MIXERS)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="broken kind file"):
            registry.mixer_specs()
        assert registry._MIXERS == before and "half_kind" not in registry.MIXER_REGISTRY
        assert registry._builtins_loaded is False


def test_every_builtin_kind_declares_its_layer_type_cost_and_mask():
    for spec in registry.mixer_specs().values():
        if spec.name == "toy_ema":
            continue
        assert spec.layer_type in registry.LAYER_TYPES and spec.cost is not None
        # a mixer that is not recurrent attends over past tokens and must declare the causal mask it reads
        assert spec.cls is None or spec.recurrent or spec.mask in registry.MASKS or callable(spec.mask), spec
        assert spec.describe is not None, spec.name  # its model-card rows
    for spec in registry.mlp_specs().values():
        assert spec.cost is not None
        assert spec.describe is not None or spec.cls is None, spec.name


# ---- an outside kind survives a save: a fresh process imports its module on the explicit opt-in -----------

OUTSIDE_KINDS = """
import torch
from torch import nn
from hf_hybrid.cost import MixerCost, MLPCost
from hf_hybrid.registry import register_mixer, register_mlp


def shift_cost(config, layer_idx):
    h = config.hidden_size
    return MixerCost(params=2 * h * h, matmul_params=2 * h * h)


@register_mixer("shift", layer_type="full_attention", mask="full_attention", cost=shift_cost,
                config_defaults={"shift_mix": 0.5})
class Shift(nn.Module):  # o_t = B(A x_t + mix * x_{t-1})
    def __init__(self, config, layer_idx):
        super().__init__()
        self.mix = config.shift_mix
        self.a = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.b = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, ctx):
        return self.b(self.a(x) + self.mix * torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1])


def relu2_cost(config, layer_idx):
    h, f = config.hidden_size, config.intermediate_size
    return MLPCost(params=2 * h * f, matmul_params=2 * h * f)


@register_mlp("relu2", cost=relu2_cost)
class Relu2(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, ctx):
        return self.down(torch.relu(self.up(x)) ** 2)
"""

SAVE = """
import sys, torch, my_outside_kinds
from hf_hybrid import HybridConfig, HybridForCausalLM
config = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, mixer_pattern="shift,attention", mlp_pattern="relu2,dense",
                      shift_mix=0.25)
torch.manual_seed(0)
model = HybridForCausalLM(config).eval()
model.save_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.arange(12)[None] % 64).logits, sys.argv[1] + "/logits.pt")
"""

LOAD = """
import contextlib, io, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from hf_hybrid import HybridConfig, HybridForCausalLM
from hf_hybrid.cli import main
path = sys.argv[1]
ids = torch.arange(12)[None] % 64
refusals = []
loaders = (AutoModelForCausalLM, HybridForCausalLM, AutoConfig, HybridConfig)
for load in [lambda cls=cls: cls.from_pretrained(path) for cls in loaders]:
    try:
        load()
        refusals.append("loaded")
    except ValueError as err:
        refusals.append(str(err))
err = io.StringIO()
with contextlib.redirect_stderr(err):
    refusals.append((main(["inspect", path]), err.getvalue()))
assert "my_outside_kinds" not in sys.modules  # nothing ran without the opt-in


def forget():  # as in a fresh process: each opt-in path below imports the module itself
    from hf_hybrid import registry
    for table in (registry._MIXERS, registry.MIXER_REGISTRY, registry._MLPS, registry.MLP_REGISTRY):
        table.pop("shift", None), table.pop("relu2", None)
    del sys.modules["my_outside_kinds"]


model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
forget()
again = HybridForCausalLM.from_pretrained(path, trust_remote_code=True)
with torch.no_grad():
    same = [torch.equal(m(ids).logits, torch.load(path + "/logits.pt")) for m in (model, again)]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    forget()
    codes = [main(["inspect", path, "--trust-remote-code"])]
    forget()
    codes.append(main(["card", path, "--trust-remote-code", "--force"]))
print(repr({"refusals": refusals, "same": same, "mix": model.config.shift_mix, "codes": codes,
            "mixer": type(model.model.layers[0].mixer).__name__, "inspect": out.getvalue()}))
"""


def _python(code: str, *args: str, path: Path) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(PACKAGE.parent)])}
    run = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_an_outside_kind_survives_save_and_loads_in_a_fresh_process_on_the_opt_in(tmp_path):
    import ast as _ast

    (tmp_path / "my_outside_kinds.py").write_text(OUTSIDE_KINDS)
    ckpt = tmp_path / "ckpt"
    _python(SAVE, str(ckpt), path=tmp_path)
    saved = (ckpt / "config.json").read_text()
    assert '"shift": "my_outside_kinds"' in saved and '"relu2": "my_outside_kinds"' in saved

    result = _ast.literal_eval(_python(LOAD, str(ckpt), path=tmp_path).strip().splitlines()[-1])
    *refusals, (cli_code, cli_err) = result["refusals"]
    for message in [*refusals, cli_err]:  # each names the kind, the module and the flag
        assert "mixer_types[0]='shift' is a layer kind defined outside hf_hybrid, in module " in message
        assert "'my_outside_kinds'" in message and "trust_remote_code=True" in message
        assert "--trust-remote-code" in message
    assert cli_code == 2
    assert result["same"] == [True, True]  # same logits as the model that was saved
    assert result["mix"] == 0.25 and result["mixer"] == "Shift"
    assert result["codes"] == [0, 0]
    assert "shift" in result["inspect"] and "relu2" in result["inspect"]
    card = (ckpt / "README.md").read_text()
    assert (
        "`shift` (my_outside_kinds)" in card
        and 'from_pretrained("path/or/repo-id", trust_remote_code=True)' in card
    )


def test_a_recorded_kind_is_checked_and_builtin_kinds_record_nothing():
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert HybridConfig(**kw).hf_hybrid_kind_modules is None
    assert HybridConfig(**kw).to_dict()["hf_hybrid_kind_modules"] is None
    with pytest.raises(
        ValueError,
        match=r"mixer_types\[0\]='shift' is a layer kind that was defined in a "
        r"script \(module '__main__'\)",
    ):
        HybridConfig(
            **kw, mixer_types=["shift"], hf_hybrid_kind_modules={"mixer_types": {"shift": "__main__"}}
        )
    with pytest.raises(ValueError, match=r"module 'no_such_module_xyz', which cannot be imported"):
        HybridConfig(
            **kw,
            mixer_types=["shift"],
            hf_hybrid_kind_modules={"mixer_types": {"shift": "no_such_module_xyz"}},
            trust_remote_code=True,
        )
    with pytest.raises(ValueError, match=r"importing 'json', the module recorded for it, did not register"):
        HybridConfig(
            **kw,
            mixer_types=["shift"],
            hf_hybrid_kind_modules={"mixer_types": {"shift": "json"}},
            trust_remote_code=True,
        )
    with pytest.raises(ValueError, match=r"hf_hybrid_kind_modules=\['x'\] must map 'mixer_types'"):
        HybridConfig(**kw, hf_hybrid_kind_modules=["x"])
    # a kind neither registered nor recorded: the known kinds are named, as before
    with pytest.raises(Exception, match=r"mixer_types\[0\]='shift' is not a known mixer type"):
        HybridConfig(**kw, mixer_types=["shift"])


def test_a_registered_outside_kind_is_recorded_and_needs_no_opt_in_in_its_process(toy_registered):
    config = _config()
    module = ToyEMA.__module__
    assert config.hf_hybrid_kind_modules == {"mixer_types": {"toy_ema": module}}
    again = HybridConfig.from_dict(config.to_dict())  # already imported here: nothing to trust
    assert again.mixer_types == config.mixer_types


# ---- no import circles -------------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "hf_hybrid"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module):
    """Every import statement, also those inside functions: a lazy import that closes a circle is still a
    circle (it only moves the failure to run time)."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for target in targets:
                # an ancestor package of the importer is already being initialised: no new edge
                if target in modules and not (name == target or name.startswith(target + ".")):
                    graph[name].add(target)
                    # importing a.b.c from outside package a.b first runs a.b's __init__
                    parent = target.rpartition(".")[0]
                    while parent and parent != "hf_hybrid" and not name.startswith(parent + "."):
                        if parent in modules and parent != name:
                            graph[name].add(parent)
                        parent = parent.rpartition(".")[0]
    return graph


def test_the_package_has_no_import_circle():
    graph = _import_graph()
    assert "hf_hybrid.cost" in graph and "hf_hybrid.configuration_hybrid" in graph
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
    # the inspector reads the registry, not the model
    reach, todo = set(), ["hf_hybrid.cost"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert "hf_hybrid.modeling_hybrid" not in reach


def test_the_graph_walker_sees_relative_and_parent_package_imports(tmp_path):
    """The circle test can fail: the walker follows relative imports (inside functions too) and implicit
    parent-package imports."""
    pkg = tmp_path / "hf_hybrid"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.leaf import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from ..a import z\n")
    graph = _import_graph(pkg)
    assert graph["hf_hybrid.a"] == {"hf_hybrid.b"}
    assert graph["hf_hybrid.b"] == {"hf_hybrid.sub", "hf_hybrid.sub.leaf"}
    assert graph["hf_hybrid.sub"] == {"hf_hybrid.sub.leaf"}
    assert graph["hf_hybrid.sub.leaf"] == {"hf_hybrid.a"}
