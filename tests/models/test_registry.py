"""The model registry: lookups, flavors, overrides, and the generated size table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_titan.models import ModelSpec, get_model_spec, register_model_spec, registered_models
from hydra_titan.models import registry as registry_mod
from hydra_titan.models.hydra import HydraModel, HydraModelArgs
from hydra_titan.models.llama import LlamaModel, LlamaModelArgs

REPO = Path(__file__).resolve().parents[2]
FLAVORS = ["debug", "100M", "250M", "500M", "750M", "900M", "1B", "1.5B", "4B"]
FAMILIES = {"hydra": (HydraModel, HydraModelArgs), "llama": (LlamaModel, LlamaModelArgs)}


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_get_model_spec(name):
    spec = get_model_spec(name)
    model_cls, args_cls = FAMILIES[name]
    assert isinstance(spec, ModelSpec)
    assert spec.name == name and spec.model_cls is model_cls and spec.args_cls is args_cls
    assert name in registered_models()


def test_unknown_model_lists_registered():
    with pytest.raises(ValueError, match="gpt2") as e:
        get_model_spec("gpt2")
    assert "hydra" in str(e.value) and "llama" in str(e.value)


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_unknown_flavor_lists_flavors(name):
    spec = get_model_spec(name)
    with pytest.raises(ValueError, match="7B") as e:
        spec.args("7B")
    for flavor in FLAVORS:
        assert repr(flavor) in str(e.value)
    with pytest.raises(ValueError, match="7B"):
        spec.build("7B")


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_all_nine_flavors_exist(name):
    assert list(get_model_spec(name).flavors) == FLAVORS


def test_overrides_are_applied():
    spec = get_model_spec("hydra")
    before = dataclasses.asdict(spec.flavors["debug"])
    assert before["vocab_size"] != 256 and before["mor_capacities"] is None
    args = spec.args("debug", vocab_size=256, mod_capacity=0.5, mor_capacities=[1.0, 0.25])
    assert (args.vocab_size, args.mod_capacity, args.mor_capacities) == (256, 0.5, (1.0, 0.25))
    assert args.dim == spec.flavors["debug"].dim == 512
    # the flavor itself is untouched
    assert dataclasses.asdict(spec.flavors["debug"]) == before
    largs = get_model_spec("llama").args("100M", n_layers=3)
    assert largs.n_layers == 3 and largs.dim == 768


@pytest.mark.parametrize("name", ["hydra", "llama"])
def test_unknown_override_names_the_field(name):
    with pytest.raises(ValueError, match="n_expertz"):
        get_model_spec(name).args("debug", n_expertz=8)


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="mod_capacity"):
        get_model_spec("hydra").args("debug", mod_capacity=1.5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_model_spec("llama").args("debug", n_kv_heads=3)


def test_args_without_overrides_is_a_copy():
    spec = get_model_spec("hydra")
    args = spec.args("debug")
    assert args is not spec.flavors["debug"]


@pytest.mark.parametrize("name", ["hydra", "llama"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_flavor_validates_and_builds_on_meta(name, flavor):
    spec = get_model_spec(name)
    args = spec.args(flavor)
    dataclasses.replace(args)  # re-runs __post_init__ validation
    with torch.device("meta"):
        model = spec.build(flavor)
    assert isinstance(model, spec.model_cls)
    assert model.output.weight.is_meta
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == spec.param_report(args).total
    # matched baselines: same width/vocab/head_dim, one llama layer per hydra block
    h, ll = get_model_spec("hydra").flavors[flavor], get_model_spec("llama").flavors[flavor]
    assert (h.dim, h.vocab_size, h.head_dim, h.n_mor_blocks) == (ll.dim, ll.vocab_size, ll.head_dim, ll.n_layers)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_hydra_flavor_head_shapes(flavor):
    args = get_model_spec("hydra").flavors[flavor]
    assert args.head_dim in (64, 128)
    assert args.n_kv_heads % 2 == 0  # value shift needs an even number of KV heads
    assert args.n_kv_heads < args.n_heads
    assert args.q_compression == int(args.q_compression) >= 1
    assert args.kv_compression >= args.q_compression


# DESIGN §3.5: dim, n_mor_blocks x recursions
DESIGN_SIZES = {"debug": (512, 2, 2), "100M": (768, 8, 4), "250M": (1024, 12, 4), "500M": (1536, 16, 4),
                "750M": (1792, 20, 4), "900M": (2048, 20, 4), "1B": (2048, 24, 4), "1.5B": (2560, 24, 5),
                "4B": (4096, 40, 4)}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_flavor_sizes_follow_the_design_table(flavor):
    h = get_model_spec("hydra").flavors[flavor]
    assert (h.dim, h.n_mor_blocks, h.recursions) == DESIGN_SIZES[flavor]
    ll = get_model_spec("llama").flavors[flavor]
    assert ll.n_heads * ll.head_dim == ll.dim and ll.n_heads % ll.n_kv_heads == 0


def test_flavor_param_counts_grow_with_size():
    for name in ("hydra", "llama"):
        spec = get_model_spec(name)
        totals = [spec.param_report(spec.flavors[f]).non_embedding for f in FLAVORS]
        assert totals == sorted(totals), (name, totals)
        assert len(set(totals)) == len(totals)


def test_register_same_name_twice_raises():
    hydra = get_model_spec("hydra")
    with pytest.raises(ValueError, match="hydra"):
        register_model_spec(hydra)
    fresh = dataclasses.replace(hydra, name="hydra_test_dup")
    try:
        assert register_model_spec(fresh) is fresh
        assert get_model_spec("hydra_test_dup") is fresh
        with pytest.raises(ValueError, match="hydra_test_dup"):
            register_model_spec(dataclasses.replace(hydra, name="hydra_test_dup"))
        assert get_model_spec("hydra_test_dup") is fresh  # the first registration is kept
    finally:
        registry_mod._REGISTRY.pop("hydra_test_dup", None)
    assert "hydra_test_dup" not in registered_models()


def test_model_table_script_lists_every_flavor():
    proc = subprocess.run([sys.executable, "scripts/model_table.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| hydra |") or line.startswith("| llama |")]
    moe_rows = [r for r in rows if ".toml)" in r]
    rows = [r for r in rows if r not in moe_rows]
    assert len(rows) == 2 * len(FLAVORS)
    # the MoE configs: active parameters as the dense flavor's (+ the router), total with every expert
    assert {r.split("|")[2].strip() for r in moe_rows} == {"500M (moe_500M.toml)", "1B (llama_moe_1B.toml)"}
    for row in moe_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        dense = next(r for r in rows if r.startswith(f"| {cells[0]} | {cells[1].split()[0]} |"))
        dense_cells = [c.strip() for c in dense.strip("|").split("|")]
        as_number = lambda c: float(c[:-1]) * (1e9 if c.endswith("B") else 1e6)  # noqa: E731
        assert as_number(cells[6]) == pytest.approx(as_number(dense_cells[6]), rel=0.002)  # active
        assert as_number(cells[4]) > 2 * as_number(dense_cells[4])  # total: 8 experts on half the layers
    for name in ("hydra", "llama"):
        spec = get_model_spec(name)
        for flavor in FLAVORS:
            matching = [r for r in rows if r.startswith(f"| {name} | {flavor} |")]
            assert len(matching) == 1, (name, flavor)
            cells = [c.strip() for c in matching[0].strip("|").split("|")]
            args = spec.flavors[flavor]
            assert cells[2] == str(args.dim)
            total = spec.param_report(args).total
            shown = float(cells[4][:-1]) * (1e9 if cells[4].endswith("B") else 1e6)
            assert shown == pytest.approx(total, rel=0.01)
            fc = spec.flops_per_token(args, 2048)
            assert float(cells[7]) == pytest.approx(fc.executed / 1e9, abs=0.006)
