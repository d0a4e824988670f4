"""scripts/routing_healthcheck.py (DESIGN §9): a freshly initialised HYDRA passes; MoD routers planted
always on / never on, a MoR router planted always-recurse and a MoE expert planted dead are flagged
(exit 1) with their layer; a dense llama has nothing to check (exit 0); usage errors exit 2. Planted
models are tiny HYDRAs saved as dcp-to-torch files, a form load_inference_model reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, load_script

SCRIPT = REPO / "scripts" / "routing_healthcheck.py"
RUN = ["--batches", "2", "--batch-size", "2", "--seq-len", "64"]
TINY = {"dim": 128, "n_heads": 2, "head_dim": 32, "max_seq_len": 128}  # vocab 4096 = kjv_bpe_4k's


@pytest.fixture(scope="module")
def healthcheck():
    return load_script("routing_healthcheck")


def tiny_hydra(**overrides) -> torch.nn.Module:
    from hydra_titan.models import get_model_spec

    model = get_model_spec("hydra").build("debug", **TINY, **overrides)
    model.init_weights()
    return model


def save_torch_file(model: torch.nn.Module, path: Path) -> Path:
    """A dcp-to-torch style file: the model state and the checkpoint metadata riding along."""
    from hydra_titan.components.checkpoint_files import TORCH_FILE_META_KEY, model_args_to_dict

    meta = {"model_name": "hydra", "model_args": model_args_to_dict(model.args), "tokenizer": "kjv_bpe_4k"}
    torch.save({"model": model.state_dict(), TORCH_FILE_META_KEY: meta}, path)
    return path


def run_main(healthcheck, *args: str) -> tuple[int, dict]:
    out = Path(args[args.index("--json") + 1])
    return healthcheck.main([*args]), json.loads(out.read_text())


def test_fresh_debug_model_is_healthy(tmp_path):
    """The real command line on the debug config: exit 0, one MoD and one MoR row per block."""
    out = tmp_path / "health.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "train_configs/debug.toml", *RUN,
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "healthy: 2 MoD, 2 MoR, 0 MoE layer(s) reported, no collapse" in proc.stdout
    report = json.loads(out.read_text())
    assert report["healthy"] and report["flags"] == []
    assert [r["layer"] for r in report["mod"]] == [0, 1] and [r["layer"] for r in report["mor"]] == [0, 1]
    for row in report["mod"]:
        assert row["selected_frac"]["train"] == pytest.approx(0.75)  # static top-k: the capacity
        assert 0.01 < row["selected_frac"]["eval"] < 0.99
    for row in report["mor"]:
        assert row["depth_hist"]["train"] == pytest.approx([0.0, 0.5, 0.5])  # capacities (1, 0.5)
        assert sum(row["depth_hist"]["eval"]) == pytest.approx(1.0)
    assert report["source"]["seq_len"] == 64 and report["source"]["windows"] == 4


@torch.no_grad()
def test_planted_mod_and_mor_collapse_is_flagged(healthcheck, tmp_path, capsys):
    """Embedding channel 0 is +50 for every token. Block 0's MoD router reads +channel 0 (logit ~50: always
    on) and so does its second MoR step (every token recurses twice); block 1's MoD router reads -channel 0
    (never on). Every other router ignores channel 0, so nothing else collapses."""
    model = tiny_hydra()
    model.tok_embeddings.weight[:, 0] = 50.0
    for layer_id, sign in (("0", 1.0), ("1", -1.0)):
        layer = model.layers[layer_id]
        layer.mod.router.weight.zero_()[0, 0] = sign
        for router in layer.mor.routers:
            router.weight[:, 0] = 0.0
    model.layers["0"].mor.routers[1].weight.zero_()[0, 0] = 1.0
    tokens = torch.randint(0, 4096, (2, 64))
    out = model.eval()(tokens)  # the plant works
    assert out["mod_selected_frac"].tolist() == [1.0, 0.0] and out["mor_depth_hist"][0].tolist() == [0, 0, 1]
    path = save_torch_file(model, tmp_path / "collapsed.pt")

    code, report = run_main(healthcheck, "--checkpoint", str(path), *RUN, "--json", str(tmp_path / "h.json"))
    assert code == 1
    flags = {(f["router"], f["layer"], f["kind"]) for f in report["flags"]}
    assert flags == {("mod", 0, "mod_always_on"), ("mod", 1, "mod_never_on"), ("mor", 0, "mor_depth_peak")}
    assert all(f["mode"] == "eval" for f in report["flags"])
    assert report["mod"][0]["selected_frac"]["eval"] == 1.0 and report["mod"][1]["selected_frac"]["eval"] == 0.0
    assert report["mor"][0]["depth_hist"]["train"] == pytest.approx([0.0, 0.5, 0.5])  # top-k: fixed, not judged
    assert not report["mor"][1]["judged"]  # no token reached block 1's recursions: no histogram to judge
    printed = capsys.readouterr().out
    assert "eval MoD layer 0: mod_always_on (selected fraction 1.000 >= 0.99)" in printed
    assert "eval MoD layer 1: mod_never_on (selected fraction 0.000 <= 0.01)" in printed
    assert "eval MoR layer 0: mor_depth_peak (1.000 of the tokens at depth 2 > 0.95)" in printed
    assert "COLLAPSE: 3 flag(s)" in printed


@torch.no_grad()
def test_planted_dead_expert_is_flagged(healthcheck, tmp_path, capsys):
    """Expert 2 of block 1's MoE gets a choice bias of -1e4: no token ever picks it (a saved buffer)."""
    from hydra_titan.models.common.moe import MoE

    model = tiny_hydra(moe_num_experts=4)
    moe = next(m for m in model.layers["1"].modules() if isinstance(m, MoE))
    moe.expert_bias[2] = -1e4
    path = save_torch_file(model, tmp_path / "dead.pt")

    code, report = run_main(healthcheck, "--checkpoint", str(path), *RUN, "--json", str(tmp_path / "h.json"))
    assert code == 1
    assert {(f["mode"], f["layer"], f["kind"]) for f in report["flags"]} == {
        ("train", 1, "moe_dead_expert"), ("eval", 1, "moe_dead_expert")}
    assert all("expert 2 " in f["detail"] for f in report["flags"])
    assert [r["layer"] for r in report["moe"]] == [0, 1]
    assert report["moe"][1]["load"]["eval"][2] == 0.0
    assert "train MoE layer 1: moe_dead_expert (expert 2 gets 0.0000" in capsys.readouterr().out


def test_dense_llama_has_nothing_to_check(healthcheck, tmp_path, capsys):
    code, report = run_main(healthcheck, "--config", "train_configs/llama_debug.toml", "--model.overrides.dim", "128",
                            "--model.overrides.n_heads", "2", "--model.overrides.head_dim", "32", "--batches", "1",
                            "--seq-len", "32", "--json", str(tmp_path / "h.json"))
    assert code == 0 and report["healthy"] and not (report["mod"] or report["mor"] or report["moe"])
    assert "nothing to check" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "/no/such/checkpoint"], "does not exist"),
    (["--checkpoint", "{tmp}"], "is neither a DCP checkpoint"),
    (["--config", "/no/such.toml"], "bad config /no/such.toml"),
    (["--config", "debug", "--model.overrides.no_such_field", "1"], "no_such_field"),
    (["--checkpoint", "x", "--model.flavor", "1B"], "need --config"),
    (["--config", "debug", "--peak-threshold", "1.5"], "--peak-threshold must be in (0, 1)"),
    ([], "one of the arguments --checkpoint --config is required"),
])
def test_usage_errors_exit_2(healthcheck, tmp_path, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        healthcheck.main(args)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
