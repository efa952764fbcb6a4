"""The layer registry: a mixer defined outside the package is one file plus its import, and the whole library
(config validation, model, masks, cache, cost inspector, card, save / load) picks it up; the package has no
import circle."""

from __future__ import annotations

import ast
import inspect
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
from hf_hybrid.testing import CHECKS, check_layer_kind

# ---- the one file a user writes (here inside the test module) ----------------------------------------------


def toy_ema_cost(config, layer_idx: int) -> MixerCost:
    h = config.hidden_size
    return MixerCost(params=2 * h * h, matmul_params=2 * h * h, state_elements=h)


def toy_ema_validate(config) -> None:
    if not 0.0 < config.toy_ema_decay < 1.0:
        raise ValueError(f"HybridConfig.toy_ema_decay={config.toy_ema_decay!r} must be in (0, 1)")


class ToyEMA(nn.Module):
    """``h_t = a·h_{t-1} + (1 - a)·W_in x_t``, ``o_t = W_out h_t``: a recurrent mixer with a [B, H] state,
    kept in the cache through ``read_state`` / ``write_state``; padding leaves it alone, a packed document
    starts from zero. In training it records an auxiliary term, ``toy_l2`` = mean h², with coefficient
    ``toy_ema_l2_coef``."""

    # the mistakes a kind author can make, switched on by the kit's own tests below
    forgets_state = pad_moves_state = crosses_documents = hides_aux = detaches_aux = False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.decay = config.toy_ema_decay
        self.l2_coef = getattr(config, "toy_ema_l2_coef", 0.01)
        self.w_in = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.w_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        state = read_state(ctx, self.layer_idx)
        real = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        if ctx.padding_mask is not None and not self.pad_moves_state:
            real, hidden_states = ctx.padding_mask, zero_padding(hidden_states, ctx)
        x = self.w_in(hidden_states).float()
        starts = torch.zeros_like(real)  # first token of each packed document (then B == 1)
        if ctx.cu_seqlens is not None and not self.crosses_documents:
            starts[0, ctx.cu_seqlens[:-1].long()] = True
        h = state.recurrent if state.decoding else x.new_zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            h = torch.where(starts[:, t, None], torch.zeros_like(h), h)
            step = self.decay * h + (1 - self.decay) * x[:, t]
            h = torch.where(real[:, t, None], step, h)  # padding leaves the state alone
            outs.append(h)
        if not self.forgets_state:
            write_state(ctx, self.layer_idx, None, h)
        states = torch.stack(outs, dim=1)
        if self.training and self.l2_coef > 0:
            term = states.pow(2)[real].mean()
            ctx.add_aux("toy_l2", term.detach() if self.detaches_aux else term)
        return self.w_out(states.to(hidden_states.dtype))

    def aux_terms(self) -> dict[str, float]:
        """The terms it records in training -> their coefficient in the objective."""
        active = self.training and self.l2_coef > 0 and not self.hides_aux
        return {"toy_l2": self.l2_coef} if active else {}


@pytest.fixture(scope="module")
def toy_registered():
    registry.register_mixer(
        "toy_ema",
        layer_type="linear_attention",
        recurrent=True,
        cost=toy_ema_cost,
        config_defaults={"toy_ema_decay": 0.9, "toy_ema_l2_coef": 0.01},
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

    model.save_pretrained(tmp_path / "toy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    assert again.config.toy_ema_decay == 0.9

    # the invariance suite of the built-in kinds (hf_hybrid.testing): cached decode = full forward, generate
    # and beam search = uncached (the toy's state really travels through the cache), padding, packing, save /
    # load, cost = the modules and the cache's bytes, gradient flow, its auxiliary term in the objective
    assert check_layer_kind("toy_ema", config_overrides={"mixer_pattern": "toy_ema,attention"}) == list(
        CHECKS
    )
    report = estimate_cost(config, contexts=(1024,))
    assert report.layers[0].state_elements == 32
    card = render_model_card(config)
    assert "toy_ema" in card and "| toy EMA | decay 0.9 |" in card  # its own settings row, from its spec


class _Forgets(ToyEMA):
    forgets_state = True


class _PadMoves(ToyEMA):
    pad_moves_state = True


class _CrossesDocuments(ToyEMA):
    crosses_documents = True


class _HidesAux(ToyEMA):
    hides_aux = True


class _DetachesAux(ToyEMA):
    detaches_aux = True


class _Unused(ToyEMA):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.unused = nn.Linear(2, 2)  # never called: no gradient


def _toy_cost_off_by_one(config, layer_idx: int) -> MixerCost:
    cost = toy_ema_cost(config, layer_idx)
    return MixerCost(
        params=cost.params + 1, matmul_params=cost.matmul_params, state_elements=cost.state_elements
    )


@pytest.mark.parametrize(
    "check,cls,cost",
    [
        ("decode", _Forgets, toy_ema_cost),
        ("generate", _Forgets, toy_ema_cost),
        ("padding", _PadMoves, toy_ema_cost),
        ("packing", _CrossesDocuments, toy_ema_cost),
        ("cost", ToyEMA, _toy_cost_off_by_one),
        ("gradients", _Unused, toy_ema_cost),
        ("aux_terms", _HidesAux, toy_ema_cost),
        ("aux_terms", _DetachesAux, toy_ema_cost),
    ],
)
def test_the_kit_catches_each_mistake(check, cls, cost):
    """Each check can fail: a toy with one mistake fails exactly the check meant to catch it."""
    registry.register_mixer("toy_buggy", layer_type="linear_attention", recurrent=True, cost=cost)(cls)
    try:
        with pytest.raises(AssertionError, match=rf"mixer 'toy_buggy', check '{check}'"):
            check_layer_kind("toy_buggy", checks=[check], config_overrides={"toy_ema_decay": 0.9})
    finally:
        registry._MIXERS.pop("toy_buggy", None)
        registry.MIXER_REGISTRY.pop("toy_buggy", None)


def test_the_kit_refuses_unknown_kinds_and_checks():
    with pytest.raises(ValueError, match=r"mixer 'nope' is not registered"):
        check_layer_kind("nope")
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['decoding'\]; choose from decode"):
        check_layer_kind("attention", checks=["decoding"])


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


def test_a_kind_that_reads_the_registry_while_it_loads_is_an_import_circle(tmp_path, monkeypatch):
    (tmp_path / "circular_kinds.py").write_text("from hf_hybrid import registry\nregistry.mixer_specs()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", ("circular_kinds",))
    with pytest.raises(
        RuntimeError, match=r"asked for the registry while the built-in kinds are being imported"
    ):
        registry.mixer_specs()
    assert registry._builtins_loaded is False and registry._builtins_loading is False


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

# The module a user writes: the recurrent toy above (its own config fields, cost, auxiliary term and decode
# state) and a relu² MLP kind.
OUTSIDE_KINDS = (
    "from __future__ import annotations\n"
    "import torch\nfrom torch import nn\n"
    "from hf_hybrid.mixers import MixerContext, read_state, write_state, zero_padding\n"
    "from hf_hybrid.registry import MixerCost, MLPCost, register_mixer, register_mlp\n\n\n"
    + inspect.getsource(toy_ema_cost)
    + "\n\n"
    + inspect.getsource(ToyEMA)
    + """

register_mixer("ema", layer_type="linear_attention", recurrent=True, cost=toy_ema_cost,
               config_defaults={"toy_ema_decay": 0.9, "toy_ema_l2_coef": 0.01})(ToyEMA)


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
)

SAVE = """
import sys, torch, my_outside_kinds
from hf_hybrid import HybridConfig, HybridForCausalLM
config = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, mixer_pattern="ema,attention", mlp_pattern="relu2,dense",
                      toy_ema_decay=0.8)
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
from hf_hybrid.testing import check_layer_kind
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
        table.pop("ema", None), table.pop("relu2", None)
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
# and the kind passes the kit in this fresh process
kit = check_layer_kind("ema", mlp="relu2", config_overrides={"mixer_pattern": "ema,attention"},
                       checks=["decode", "cost", "aux_terms"])  # the rest: in-process, same class
decay, mixer = model.config.toy_ema_decay, type(model.model.layers[0].mixer).__name__
print(repr({"refusals": refusals, "same": same, "decay": decay, "codes": codes, "kit": kit, "mixer": mixer,
            "inspect": out.getvalue()}))
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


@pytest.fixture(scope="module")
def outside_checkpoint(tmp_path_factory):
    """A checkpoint saved in a fresh process whose layers use the kinds of ``my_outside_kinds`` (the module
    sits in the returned directory, under ``ckpt``)."""
    tmp_path = tmp_path_factory.mktemp("outside")
    (tmp_path / "my_outside_kinds.py").write_text(OUTSIDE_KINDS)
    _python(SAVE, str(tmp_path / "ckpt"), path=tmp_path)
    return tmp_path


def test_an_outside_kind_survives_save_and_loads_in_a_fresh_process_on_the_opt_in(outside_checkpoint):
    import ast as _ast

    tmp_path = outside_checkpoint
    ckpt = tmp_path / "ckpt"
    saved = (ckpt / "config.json").read_text()
    assert '"ema": "my_outside_kinds"' in saved and '"relu2": "my_outside_kinds"' in saved

    result = _ast.literal_eval(_python(LOAD, str(ckpt), path=tmp_path).strip().splitlines()[-1])
    *refusals, (cli_code, cli_err) = result["refusals"]
    for message in [*refusals, cli_err]:  # each names the kind, the module and the flag
        assert "mixer_types[0]='ema' is a layer kind defined outside hf_hybrid, in module " in message
        assert "'my_outside_kinds'" in message and "trust_remote_code=True" in message
        assert "--trust-remote-code" in message
    assert cli_code == 2
    assert result["same"] == [True, True]  # same logits as the model that was saved
    assert result["decay"] == 0.8 and result["mixer"] == "ToyEMA"
    assert result["kit"] == ["decode", "cost", "aux_terms"]
    assert result["codes"] == [0, 0]
    assert "ema" in result["inspect"] and "relu2" in result["inspect"]
    card = (ckpt / "README.md").read_text()
    assert (
        "`ema` (my_outside_kinds)" in card
        and 'from_pretrained("path/or/repo-id", trust_remote_code=True)' in card
    )


# Every CLI command that loads an hf_hybrid checkpoint, run on the one above without and with the opt-in.
CLI_RUNS = """
import contextlib, io, sys
from hf_hybrid.cli import main
src, out, trusted = sys.argv[1], sys.argv[2], sys.argv[3] == "trusted"
commands = {
    "upcycle": ["upcycle", src, out + "/up", "--num-experts", "2", "--top-k", "1", "--layers", "1"],
    "hybridize": ["hybridize", src, out + "/hy", "--attention-layers", "", "--mixer", "gated_deltanet"],
    "export": ["export", src, out + "/ex", "--to", "qwen3_next"],
}


def forget():  # as in a fresh process: each command imports the module itself
    from hf_hybrid import registry
    for table in (registry._MIXERS, registry.MIXER_REGISTRY, registry._MLPS, registry.MLP_REGISTRY):
        table.pop("ema", None), table.pop("relu2", None)
    sys.modules.pop("my_outside_kinds", None)


result = {}
for name, argv in commands.items():
    forget()
    err, out_ = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out_):
        code = main(argv + (["--trust-remote-code"] if trusted else []))
    result[name] = (code, err.getvalue(), "my_outside_kinds" in sys.modules)
print(repr(result))
"""


def test_the_cli_commands_that_load_a_checkpoint_take_trust_remote_code(outside_checkpoint, tmp_path):
    """``upcycle``, ``hybridize`` and ``export`` refuse an outside kind's checkpoint naming the flag, and with
    ``--trust-remote-code`` import the recorded module: upcycle and hybridize write their checkpoint, export
    gets as far as the family's own refusal of the kind."""
    import ast as _ast

    src = str(outside_checkpoint / "ckpt")
    runs = {}
    for mode in ("plain", "trusted"):
        (tmp_path / mode).mkdir()
        out = _python(CLI_RUNS, src, str(tmp_path / mode), mode, path=outside_checkpoint)
        runs[mode] = _ast.literal_eval(out.strip().splitlines()[-1])
    for name, (code, err, imported) in runs["plain"].items():
        assert code == 2 and not imported, name
        assert "mixer_types[0]='ema' is a layer kind defined outside hf_hybrid" in err, name
        assert "--trust-remote-code" in err, name
    for name, (_code, err, imported) in runs["trusted"].items():
        assert imported and "trust" not in err, (name, err)
    assert runs["trusted"]["upcycle"][0] == 0 and (tmp_path / "trusted/up/config.json").is_file()
    assert runs["trusted"]["hybridize"][0] == 0 and (tmp_path / "trusted/hy/config.json").is_file()
    code, err, _ = runs["trusted"]["export"]
    assert code == 2 and "mixer_types[0]='ema' (layer 0) has no counterpart" in err


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


# ---- docs the code cites live in the repository ------------------------------------------------------------


def test_no_file_cites_notes_outside_the_repository():
    """Code, tests, scripts and READMEs point to CONTRIBUTING.md / README.md, not to design notes a reader of
    the repository cannot open."""
    root = PACKAGE.parent
    citing = set()
    for path in [
        *root.glob("*.md"),
        *(
            p
            for d in ("hf_hybrid", "tests", "scripts", "recipes")
            for p in (root / d).rglob("*")
            if p.is_file()
        ),
    ]:
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".txt"):
            text = path.read_text(encoding="utf-8")
            if "DESIGN" + ".md" in text or "STYLE" + ".md" in text:
                citing.add(str(path.relative_to(root)))
    assert not citing, sorted(citing)


# ---- no import circles -------------------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "hf_hybrid"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _walk(tree: ast.AST):
    """ast.walk without the bodies of ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _imports(tree: ast.Module):
    """Every import statement, also those inside functions: a lazy import that closes a circle is still a
    circle (it only moves the failure to run time)."""
    return (node for node in _walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _string_values(
    tree: ast.Module, module: str, package: str, constants: dict[str, dict[str, set[str]]] | None = None
) -> dict[str, set[str]]:
    """The strings each name can hold: module-level constants (a string, or a tuple / list / dict of them),
    names imported from another package module that holds such a constant (``constants``: module -> its
    constants), and ``for`` loop variables over such a name."""
    values: dict[str, set[str]] = {"__name__": {module}, "__package__": {package}}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and constants is not None:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:
                if alias.name in constants.get(source, {}):
                    values[alias.asname or alias.name] = constants[source][alias.name]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            found = _strings(node.value, values)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and found:
                    values[target.id] = found
    for node in _walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            found = _strings(node.iter, values)
            if found:
                values.setdefault(node.target.id, set()).update(found)
    return values


def _strings(node: ast.AST, values: dict[str, set[str]]) -> set[str]:
    """The strings an expression can evaluate to, as far as constants tell (empty: unknown)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e, values) for e in node.elts)) if node.elts else set()
    if isinstance(node, ast.Dict):
        return set().union(*(_strings(v, values) for v in node.values)) if node.values else set()
    if isinstance(node, ast.Name):
        return set(values.get(node.id, ()))
    if isinstance(node, ast.Subscript):  # CONSTANT_TABLE[key]: any of its values
        return _strings(node.value, values)
    if isinstance(node, ast.JoinedStr):
        out = {""}
        for part in node.values:
            options = _strings(part.value if isinstance(part, ast.FormattedValue) else part, values)
            if not options:
                return set()
            out = {a + b for a in out for b in options}
        return out
    return set()


def _dynamic_imports(
    tree: ast.Module, module: str, package: str, constants: dict[str, dict[str, set[str]]]
) -> tuple[set[str], list[int]]:
    """Targets of ``importlib.import_module(...)`` calls (a module imported by a computed name is imported all
    the same), and the lines of calls whose name the walker cannot work out."""
    values = _string_values(tree, module, package, constants)
    targets, unknown = set(), []
    for node in _walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = getattr(func, "attr", None) or getattr(func, "id", None)
        if name != "import_module":
            continue
        found = _strings(node.args[0], values)
        if not found:
            unknown.append(node.lineno)
        for target in found:
            if target.startswith("."):  # relative to the package= argument (or this package)
                base, level = package, len(target) - len(target.lstrip("."))
                for _ in range(level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{target.lstrip('.')}".rstrip(".")
            targets.add(target)
    return targets, unknown


def _import_graph(package: Path = PACKAGE, unresolved: list | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports (statically, inside functions, or through
    ``importlib.import_module`` with a name the walker can work out); ``unresolved`` collects
    ``(module, line)`` of dynamic imports whose name it cannot."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules.items()}

    def package_of(name: str) -> str:
        return name if modules[name].name == "__init__.py" else name.rpartition(".")[0]

    constants = {name: _string_values(tree, name, package_of(name)) for name, tree in trees.items()}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = trees[name]
        dynamic, unknown = _dynamic_imports(tree, name, package_of(name), constants)
        if unresolved is not None:
            unresolved.extend((name, line) for line in unknown)
        for node in [*_imports(tree), *sorted(dynamic)]:
            targets = []
            if isinstance(node, str):
                targets = [node]
            elif isinstance(node, ast.Import):
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
    unresolved: list = []
    graph = _import_graph(unresolved=unresolved)
    # every import_module inside the package names its module in a way the walker can follow, but the one that
    # imports the module a saved config records for a kind defined outside the package
    assert [m for m, _ in unresolved] == ["hf_hybrid.configuration_hybrid"], unresolved
    assert {"hf_hybrid.mixers", "hf_hybrid.mlp", "hf_hybrid.moe"} <= graph["hf_hybrid.registry"]
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


def test_the_graph_walker_follows_import_module_and_skips_type_checking(tmp_path):
    """``importlib.import_module`` by a literal, a constant, a loop over constants, an f-string of
    ``__name__`` or a constant table (imported from another module, too) is an import; one inside ``if
    TYPE_CHECKING:`` is not; a name the walker cannot work out is reported."""
    pkg = tmp_path / "hf_hybrid"
    (pkg / "kinds").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "import importlib\nfrom importlib import import_module\nfrom typing import TYPE_CHECKING\n"
        "from .table import TABLE\nMODS = ('hf_hybrid.b', 'hf_hybrid.c')\n"
        "if TYPE_CHECKING:\n    from . import f\n"
        "def load(key, name):\n    for m in MODS:\n        importlib.import_module(m)\n"
        "    import_module('hf_hybrid.d')\n    import_module(f'{__package__}.{TABLE[key]}')\n"
        "    import_module(name)\n"
    )
    (pkg / "kinds" / "__init__.py").write_text(
        "import importlib\nfor _n in ('g',):\n    importlib.import_module(f'{__name__}.{_n}')\n"
    )
    (pkg / "table.py").write_text("TABLE = {'x': 'e'}\n")
    for leaf in "bcdefg":
        (pkg / ("kinds" if leaf == "g" else ".") / f"{leaf}.py").write_text("")
    unresolved: list = []
    graph = _import_graph(pkg, unresolved)
    assert graph["hf_hybrid.a"] == {
        "hf_hybrid.table",
        "hf_hybrid.b",
        "hf_hybrid.c",
        "hf_hybrid.d",
        "hf_hybrid.e",
    }
    assert graph["hf_hybrid.kinds"] == {"hf_hybrid.kinds.g"}
    assert unresolved == [("hf_hybrid.a", 13)]
