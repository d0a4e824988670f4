"""scripts/ab_study.py: the study's timing, target and verdict arithmetic, and a tiny study end to end (CPU)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, TINY_MODEL, load_script

study = load_script("ab_study")


def test_training_seconds_counts_the_first_step_as_a_typical_one():
    # 100 tokens per step; step 1 took 10 s (compile), then 1 s per step at 100 tok/s, then 0.5 s per step
    rows = [(1, 10.0), (5, 100.0), (9, 100.0), (13, 200.0)]
    clock, tps, compile_s = study.training_seconds(rows, tokens_per_step=100)
    assert clock == {1: 1.0, 5: 5.0, 9: 9.0, 13: 11.0}
    assert tps == 100.0 and compile_s == 9.0
    with pytest.raises(study.StudyError, match="first log row is step 5"):
        study.training_seconds(rows[1:] + [(17, 1.0)], tokens_per_step=100)


def _curve(arm, seed, evals, tps=1000.0):
    return study.RunCurve(arm, seed, 1_000_000, 6e6, tps, 5.0, evals)


def test_time_to_reach_interpolates_between_evals():
    curve = _curve("llama", 0, [(10, 10.0, 3.0), (20, 20.0, 2.0), (30, 30.0, 1.5)])
    assert study.time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert study.time_to_reach(curve, 3.5) == 10.0  # reached at the first evaluation
    assert study.time_to_reach(curve, 1.0) is None


def test_summarize_ratio_and_verdict_against_the_seed_spread():
    curves = [
        _curve("llama", 0, [(1, 10.0, 3.0), (2, 20.0, 2.0)]),
        _curve("llama", 1, [(1, 10.0, 3.0), (2, 22.0, 2.1)]),      # the worse seed sets the target 2.1
        _curve("hydra_default", 0, [(1, 30.0, 2.8), (2, 60.0, 2.05)]),
        _curve("hydra_default", 1, [(1, 30.0, 2.9), (2, 60.0, 2.06)]),
        _curve("waaagh", 0, [(1, 30.0, 2.9), (2, 60.0, 2.5)]),
    ]
    summary = study.summarize(curves)
    assert summary["target_bpb"] == 2.1
    # llama seed 0 reaches 2.1 at 10 + 10 * 0.9 / 1.0 = 19 s, seed 1 at 22 s
    assert summary["baseline_seconds"] == pytest.approx(20.5)
    rows = {r["arm"]: r for r in summary["rows"]}
    assert rows["llama"]["ratio"] == pytest.approx([19 / 20.5, 22 / 20.5])
    hydra_times = [30 + 30 * 0.7 / 0.75, 30 + 30 * 0.8 / 0.84]
    assert rows["hydra_default"]["time_to_target_s"] == pytest.approx(hydra_times)
    assert summary["seed_spread_ratio"] == pytest.approx(3 / 20.5)
    assert rows["hydra_default"]["verdict"] == "slower than llama, outside the seed spread"
    assert rows["llama"]["verdict"].startswith("the baseline")
    assert rows["waaagh"]["verdict"] == "does not reach the target within the budget"
    assert summary["seed_spread_bpb"] == pytest.approx(0.1)
    table = study.table_markdown(summary)
    assert "| hydra_default | 0 / 1 |" in table and "Seed-to-seed spread: 0.146" in table


def test_bad_plan_and_missing_inputs_exit_2(tmp_path, capsys):
    assert study.main(["run", "--out", str(tmp_path), "--train", "x", "--val", "y", "--tokenizer", "z",
                       "--arms", "gpt5:0"]) == 2
    assert "unknown arm 'gpt5'" in capsys.readouterr().err
    assert study.main(["run", "--out", str(tmp_path), "--train", str(tmp_path / "nope"), "--val", "y",
                       "--tokenizer", "z", "--arms", "llama:0"]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert study.main(["report", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as info:
        study.main(["run", "--out", str(tmp_path), "--train", "x", "--val", "y", "--tokenizer", "z", "--batch", "0"])
    assert info.value.code == 2


def _shards(tmp_path, name: str, lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "lord", "said", "unto", "moses", "light", "waters", "heaven", "earth", "and", "of", "in"]
    text = tmp_path / f"{name}.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, size=10)) for _ in range(lines)) + "\n")
    out = tmp_path / name / f"{name}.bin"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--input", str(text), "--output", str(out),
                    "--tokenizer", "kjv_bpe_4k"], cwd=REPO, check=True, capture_output=True)
    return str(out.parent)


def test_a_tiny_study_trains_every_arm_once_and_reports(tmp_path):
    train, val = _shards(tmp_path, "train", 300, 0), _shards(tmp_path, "val", 120, 1)
    out = tmp_path / "study"
    tiny = ["--model.flavor", "debug", *TINY_MODEL, "--compile.enable", "false"]
    common = ["run", "--out", str(out), "--train", train, "--val", val, "--tokenizer", "kjv_bpe_4k",
              "--seq-len", "64", "--batch", "4", "--evals", "3", "--log-freq", "2", "--lr", "3e-3"]
    proc = subprocess.run([sys.executable, "scripts/ab_study.py", *common, "--arms", "llama:0,hydra_best:0",
                           "--", *tiny], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    budget = int(proc.stdout.split("budget: ")[1].split(" steps")[0])
    assert budget >= 6
    with sqlite3.connect(out / "study.db") as con:
        runs = con.execute("SELECT status, last_step FROM runs").fetchall()
    assert runs == [("completed", budget)] * 2
    # a second call finds the arms done and trains nothing
    again = subprocess.run([sys.executable, "scripts/ab_study.py", *common, "--arms", "hydra_best:0", "--", *tiny],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "hydra_best:0: already completed" in again.stdout

    figures = tmp_path / "figures"
    assert study.main(["report", "--db", str(out / "study.db"), "--out", str(figures)]) == 0
    for name in study.AXES:
        assert (figures / name).stat().st_size > 10_000  # a drawn PNG, not an empty canvas
    summary = json.loads((figures / "summary.json").read_text())
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == {"llama", "hydra_best"} and rows["hydra_best"]["params"] > 0
    assert summary["target_bpb"] == rows["llama"]["final_bpb"][0]
    assert rows["hydra_best"]["verdict"] in ("no second seed: spread unknown",
                                             "does not reach the target within the budget")
    runs = summary["runs"]
    for run in runs:
        evals = run["evals"]
        assert [e[0] for e in evals] == sorted(e[0] for e in evals) and evals[-1][0] == budget * 4 * 64
        assert evals[-1][2] < evals[0][2]  # held-out bits/byte fell
        assert run["compile_s"] >= 0 and run["tokens_per_sec"] > 0
    assert "| hydra_best | 0 |" in (figures / "table.md").read_text()
