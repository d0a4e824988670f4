"""Power-law fits (hydra_titan/components/scaling.py) and scripts/scaling_analysis.py end to end.

The fits are checked on synthetic data with a known exponent; the script on pre-made run folders
(config.toml + metrics.jsonl with losses drawn from a known law, fast) plus one real tiny trainer
run, which proves the reading path of what the trainer writes (its training.db); and on bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, TINY_RUN, load_script, run_trainer
from hydra_titan.components.scaling import FitError, fit_power_law
from hydra_titan.config import load_config
from hydra_titan.config.manager import save_config

SCRIPT = REPO / "scripts" / "scaling_analysis.py"
TRUE_B = 0.3


@pytest.fixture(scope="module")
def script():
    return load_script("scaling_analysis")


# ---------------------------------------------------------------- the fits


@pytest.mark.parametrize("c,noise,form", [(1.8, 0.002, "saturating"), (0.0, 0.01, "loglinear")])
def test_fit_recovers_the_exponent_of_noisy_power_law_data(c, noise, form):
    rng = np.random.default_rng(0)
    x = np.logspace(15, 19, 12)
    y = (400.0 * (x / 1e15) ** -TRUE_B + c) * (1 + noise * rng.standard_normal(x.size))
    fit = fit_power_law(x, y)  # auto: must pick the saturating form only when c is there
    assert fit.form == form, fit.note
    assert abs(fit.b - TRUE_B) / TRUE_B < 0.02, fit.to_dict()
    assert fit.stderr()["b"] < 0.02
    # the band of an extrapolation 10x past the data covers the truth
    target = 1e20
    band = fit.interval(target)
    truth = 400.0 * (target / 1e15) ** -TRUE_B + c
    assert band.lower < truth < band.upper and band.lower < band.value < band.upper


def test_standard_errors_weight_the_fit():
    """An outlier with a large standard error barely moves a weighted fit; unweighted it drags b off."""
    x = np.logspace(6, 10, 8)
    y = 50.0 * x ** -TRUE_B
    y[-1] *= 1.5
    sigma = np.full(x.size, 1e-3)
    sigma[-1] = 10.0
    assert abs(fit_power_law(x, y, form="loglinear", sigma=sigma).b - TRUE_B) / TRUE_B < 0.02
    assert abs(fit_power_law(x, y, form="loglinear").b - TRUE_B) / TRUE_B > 0.05
    with pytest.raises(FitError, match="sigma"):
        fit_power_law(x, y, sigma=np.zeros(x.size))


def test_c_pinned_at_zero_falls_back_to_the_log_log_line_and_says_why():
    x = np.logspace(6, 9, 5)
    y = 30.0 * x ** -0.1 * (1 + 0.003 * np.random.default_rng(1).standard_normal(5))
    fit = fit_power_law(x, y)
    assert fit.form == "loglinear" and "c not identifiable" in fit.note and fit.c == 0.0
    assert abs(fit.b - 0.1) < 0.01


@pytest.mark.parametrize("x,y,needle", [([1, 2], [3, 2], "at least 3"), ([1, 2, 3], [3, -1, 1], "positive"),
                                        ([2, 2, 2], [3, 2, 1], "same x")])
def test_unfittable_points_raise(x, y, needle):
    with pytest.raises(FitError, match=needle):
        fit_power_law(x, y)


# ---------------------------------------------------------------- the script

FAKE_DIMS = (64, 96, 128, 192)


def _fake_runs(script, root, dims=FAKE_DIMS, steps=20, seeds=(None,)):
    """Run folders as the trainer leaves them (config.toml + metrics.jsonl), losses = 60·N^-0.3 (active N),
    +-1% for the two seeds of a pair."""
    for dim in dims:
        for i, seed in enumerate(seeds):
            folder = root / (f"fake_dim{dim}" if seed is None else f"fake_dim{dim}_s{seed}")
            cfg = load_config([*TINY_RUN, "--model.overrides.dim", str(dim), "--model.overrides.n_heads",
                               str(dim // 32), "--model.overrides.n_kv_heads", str(dim // 32),
                               "--model.overrides.head_dim", "16", "--training.steps", str(steps),
                               "--job.seed", str(seed or 42), "--job.dump_folder", str(folder)])
            save_config(cfg, folder / "config.toml")
            loss = 60.0 * script.model_size(cfg).active ** -TRUE_B * (1 + 0.01 * (-1) ** i * (seed is not None))
            _write_metrics(folder, loss, steps)


def _write_metrics(folder, loss, steps):
    rows = [{"step": s, "loss/total": loss + 1} for s in (1, steps)]
    rows += [{"step": steps // 2, "validation/loss": loss + 0.5}, {"step": steps, "validation/loss": loss}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_script_fits_fake_runs_and_reads_a_real_trainer_run(script, tmp_path):
    runs = tmp_path / "runs"
    _fake_runs(script, runs)
    real = runs / "real"
    proc = run_trainer([*TINY_RUN, "--model.overrides.dim", "64", "--model.overrides.n_heads", "2",
                        "--model.overrides.n_kv_heads", "1", "--model.overrides.head_dim", "16",
                        "--training.steps", "3", "--validation.freq", "3", "--validation.steps", "1"], real)
    assert proc.returncode == 0, proc.stdout[-3000:]

    # the fake runs alone: the script's size fit recovers the law they were drawn from
    out = tmp_path / "fake_only"
    fake_sources = [runs / f"fake_dim{d}" for d in FAKE_DIMS]
    proc = _run_script("--from", *fake_sources, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "scaling_report.json").read_text())
    assert report["fits"]["params"]["form"] == "loglinear"
    assert abs(report["fits"]["params"]["b"] - TRUE_B) / TRUE_B < 0.02
    assert report["param_kind"] == "active"

    # everything under runs/: the real run is read from its training.db, the fakes from metrics.jsonl
    out = tmp_path / "all"
    proc = _run_script("--from", runs, "--out", out, "--params", "non_embedding")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "scaling_report.json").read_text())
    by_name = {r["name"]: r for r in report["runs"]}
    assert set(by_name) == {"real", *(f"fake_dim{d}" for d in FAKE_DIMS)}
    assert by_name["real"]["source"] == "training.db" and by_name["fake_dim64"]["source"] == "metrics.jsonl"
    real_run = by_name["real"]
    assert real_run["step"] == 3 and real_run["tokens_seen"] == 3 * 8 * 64
    assert real_run["flops"] == pytest.approx(real_run["size"]["flops_per_token"] * 3 * 8 * 64)
    losses = [json.loads(line) for line in (real / "metrics.jsonl").read_text().splitlines()]
    assert real_run["val_loss"] == pytest.approx([r for r in losses if "validation/loss" in r][-1]["validation/loss"])
    for axis in ("flops", "params"):
        fit, extrap = report["fits"][axis], report["extrapolation"][axis]
        assert fit["b"] > 0 and fit["stderr"]["b"] >= 0
        assert extrap["lower"] <= extrap["value"] <= extrap["upper"]
    from hydra_titan.models import get_model_spec
    spec = get_model_spec("hydra")
    assert report["target"]["active"] == spec.active_params(spec.args("4B"), 2048)
    assert report["extrapolation"]["params"]["x"] == report["target"]["non_embedding"]
    for name in ("loss_vs_flops.png", "loss_vs_params.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exponent b =" in proc.stdout


def test_runs_that_differ_only_in_seed_are_one_weighted_point(script, tmp_path, capsys):
    _fake_runs(script, tmp_path / "runs", dims=(64, 96, 128), seeds=(1, 2))
    out = tmp_path / "out"
    assert script.main(["--from", str(tmp_path / "runs"), "--out", str(out)]) == 0
    report = json.loads((out / "scaling_report.json").read_text())
    assert len(report["runs"]) == 6 and [p["n"] for p in report["points"]] == [2, 2, 2]
    spread = np.std([1.01, 0.99], ddof=1)  # each pair is L·(1 +- 1%)
    pooled = np.sqrt(np.mean([(spread * p["val_loss"]) ** 2 for p in report["points"]]))
    assert report["seed_std_pooled"] == pytest.approx(pooled, rel=1e-6)
    assert all(p["val_loss_std"] > 0 for p in report["points"])
    assert abs(report["fits"]["params"]["b"] - TRUE_B) / TRUE_B < 0.02  # the +-1% pairs average out
    assert "3 points (runs that differ only in seed averaged" in capsys.readouterr().out


def _sentinel(out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_report.json").write_text("old report")
    return out / "scaling_report.json"


def test_a_folder_without_runs_exits_2_and_overwrites_nothing(script, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    report = _sentinel(tmp_path / "out")
    assert script.main(["--from", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no runs found" in err and "need at least 3" in err
    assert report.read_text() == "old report" and not (tmp_path / "out" / "loss_vs_flops.png").exists()


def test_fewer_than_three_runs_exits_2(script, tmp_path, capsys):
    _fake_runs(script, tmp_path / "runs", dims=(64, 128))
    report = _sentinel(tmp_path / "out")
    assert script.main(["--from", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    assert "need at least 3 finished runs" in capsys.readouterr().err and report.read_text() == "old report"


def test_unfinished_runs_are_skipped_with_the_reason(script, tmp_path, capsys):
    _fake_runs(script, tmp_path / "runs", dims=(64, 96, 128))
    cut = tmp_path / "runs" / "fake_dim128" / "metrics.jsonl"
    cut.write_text("\n".join(cut.read_text().splitlines()[:-1]) + "\n")  # lose the final validation
    assert script.main(["--from", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    assert "unfinished: last validation at step 10 of 20" in capsys.readouterr().err


def _size(dim: int) -> str:
    return f"dim={dim},n_heads={dim // 32},n_kv_heads={dim // 32},head_dim=16"


@pytest.mark.parametrize("args,needle", [
    (["--sizes", _size(64), "dim=63", _size(128)], "size dim63"),  # the model refuses dim 63 (4 heads x 64)
    (["--sizes", _size(64), _size(128)], "at least 3 sizes"),
    (["--sizes", _size(64), _size(96), _size(128), "--steps", "5", "6"], "one value or one per size"),
    (["--sizes", _size(64), "dom=96", _size(128)], "dom"),
])
def test_bad_sizes_exit_2_before_any_run(script, tmp_path, capsys, args, needle):
    assert script.main(["--runs", "--out", str(tmp_path / "out"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()
